//! Program evaluation: every node becomes a dense array over the extents its shape has.

use crate::{Error, Result};
use normforge_dsl::ir::*;

pub use normforge_dsl::bind::AxisBinding;
use normforge_dsl::{bind, uniform};

pub fn bind_axes(axes: &[Axis], shape: &[usize], what: &str) -> Result<AxisBinding> {
    bind::bind_axes(axes, shape, what).map_err(Error)
}

/// Everything a program may read.
pub struct Inputs<'a> {
    pub binding: &'a AxisBinding,
    pub hparams: &'a [f64],
    pub step: f64,
    pub input: Option<&'a [f64]>,
    pub grad: Option<&'a [f64]>,
    pub grad_output: Option<&'a [f64]>,
    pub params: &'a [&'a [f64]],
    pub buffers: &'a [&'a [f64]],
    pub states: &'a [&'a [f64]],
}

pub fn extents(shape: &Shape, b: &AxisBinding, hparams: &[f64]) -> Result<Vec<usize>> {
    bind::extents(shape, b, hparams).map_err(Error)
}

/// `f` called with, for each element of `fine` (row-major), the offset of the element of
/// `coarse` it maps to. Per axis: the same extent maps index to index, a grouped extent maps an
/// index to its group, a single element maps everything to 0. No table of offsets is built,
/// and no division made per element: a large product's operands are read as they are walked.
fn each_offset(fine: &[usize], coarse: &[usize], mut f: impl FnMut(usize)) {
    if fine.contains(&0) {
        return;
    }
    let mut stride: usize = coarse.iter().product();
    // Per axis, each index's share of the offset.
    let steps: Vec<Vec<usize>> = fine
        .iter()
        .zip(coarse)
        .map(|(&n, &c)| {
            stride /= c.max(1);
            (0..n).map(|i| if c == 1 { 0 } else { i / (n / c) * stride }).collect()
        })
        .collect();
    let Some((inner, outer)) = steps.split_last() else { return f(0) };
    let mut idx = vec![0usize; outer.len()];
    loop {
        let base: usize = outer.iter().zip(&idx).map(|(s, &i)| s[i]).sum();
        for &s in inner {
            f(base + s);
        }
        // The next index along the outer axes, the last fastest.
        let mut a = outer.len();
        loop {
            if a == 0 {
                return;
            }
            a -= 1;
            idx[a] += 1;
            if idx[a] < outer[a].len() {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// The values of a node of extents `ext` read by one of extents `fine` (row-major), each
/// element's own: borrowed where the extents are the same, else gathered.
fn spread<'a>(fine: &[usize], ext: &[usize], v: &'a [f64]) -> std::borrow::Cow<'a, [f64]> {
    if fine == ext {
        return v.into();
    }
    let mut out = Vec::with_capacity(fine.iter().product());
    each_offset(fine, ext, |o| out.push(v[o]));
    out.into()
}

/// For each element of a value of extents `ext` (row-major), the offset of the element it reads
/// in the same value with axes `x` and `y` exchanged.
fn swapped_offsets(ext: &[usize], x: usize, y: usize) -> Vec<usize> {
    let mut src = ext.to_vec();
    src.swap(x, y);
    let mut strides = vec![0usize; src.len()];
    let mut s = 1;
    for a in (0..src.len()).rev() {
        strides[a] = s;
        s *= src[a];
    }
    strides.swap(x, y);
    let n: usize = ext.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; ext.len()];
    for _ in 0..n {
        out.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum());
        for a in (0..ext.len()).rev() {
            idx[a] += 1;
            if idx[a] < ext[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

fn leaf<'a>(v: Option<&'a [f64]>, what: &str) -> Result<&'a [f64]> {
    v.ok_or_else(|| Error(format!("this program reads {what}, which was not supplied")))
}

fn indexed<'a>(v: &'a [&'a [f64]], i: u32, what: &str) -> Result<&'a [f64]> {
    v.get(i as usize).copied().ok_or_else(|| Error(format!("{what} #{i} was not supplied")))
}

/// Evaluate every node the outputs need; returns the node values, those no output holds emptied
/// once read for the last time (so a long program's intermediates, Muon's products, are not all
/// held at once). A `select` whose condition is known before the run (a hyper-parameter, a shape:
/// `uniform`) computes its condition and the branch that condition takes, not the other (Muon's
/// tall form of a wide matrix, many times its cost); the condition is computed here all the
/// same, and a branch chosen otherwise than it says is an error, never a value.
pub fn run(p: &Program, inp: &Inputs) -> Result<Vec<Vec<f64>>> {
    let n = p.nodes.len();
    let (known, value) = uniform::on_shapes(p, inp.binding, inp.hparams, inp.step);
    let reads = |i: usize| match p.nodes[i].op {
        Op::Select(c, x, y) if known[c as usize] => Args::of(&[c, if value[c as usize] != 0.0 { x } else { y }]),
        ref op => op.args(),
    };
    let mut needed = vec![false; n];
    for o in &p.outputs {
        needed[o.node as usize] = true;
    }
    let mut last = vec![None; n];
    for i in (0..n).rev() {
        if needed[i] {
            for a in reads(i) {
                needed[a as usize] = true;
                last[a as usize] = last[a as usize].or(Some(i));
            }
        }
    }
    for o in &p.outputs {
        last[o.node as usize] = None;
    }
    let mut vals: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut exts: Vec<Vec<usize>> = Vec::with_capacity(n);
    for (i, node) in p.nodes.iter().enumerate() {
        let ext = extents(&node.shape, inp.binding, inp.hparams)?;
        let len: usize = ext.iter().product();
        let v: Vec<f64> = match &node.op {
            _ if !needed[i] => Vec::new(),
            Op::Const(c) => vec![*c],
            Op::HParam(i) => vec![inp.hparams[*i as usize]],
            op @ (Op::Size(_) | Op::Rank(_)) => vec![bind::query(op, inp.binding, inp.hparams).unwrap_or_default() as f64],
            Op::Step => vec![inp.step],
            Op::Input => leaf(inp.input, "the input")?.to_vec(),
            Op::Grad => leaf(inp.grad, "the gradient")?.to_vec(),
            Op::GradOutput => leaf(inp.grad_output, "the output gradient")?.to_vec(),
            Op::Param(i) => indexed(inp.params, *i, "parameter")?.to_vec(),
            Op::Buffer(i) => indexed(inp.buffers, *i, "buffer")?.to_vec(),
            Op::State(i) => indexed(inp.states, *i, "state")?.to_vec(),
            Op::Unary(u, a) => vals[*a as usize].iter().map(|&x| u.apply(x)).collect(),
            Op::Binary(b, x, y) => {
                let at = |k: u32| spread(&ext, &exts[k as usize], &vals[k as usize]);
                let (vx, vy) = (at(*x), at(*y));
                vx.iter().zip(vy.iter()).map(|(&x, &y)| b.apply(x, y)).collect()
            }
            Op::Select(c, x, y) if known[*c as usize] => {
                let taken = value[*c as usize] != 0.0;
                if vals[*c as usize].iter().any(|&v| (v != 0.0) != taken) {
                    return Err(Error("a select's condition, known before the run, differs from its value computed in it".into()));
                }
                let pick = if taken { *x } else { *y } as usize;
                spread(&ext, &exts[pick], &vals[pick]).into_owned()
            }
            Op::Select(c, x, y) => {
                let at = |k: u32| spread(&ext, &exts[k as usize], &vals[k as usize]);
                let (vc, vx, vy) = (at(*c), at(*x), at(*y));
                vc.iter().zip(vx.iter()).zip(vy.iter()).map(|((&c, &x), &y)| if c != 0.0 { x } else { y }).collect()
            }
            Op::Reduce(r, a) => {
                let init = match r {
                    ReduceOp::Sum => 0.0,
                    ReduceOp::Max => f64::NEG_INFINITY,
                    ReduceOp::Min => f64::INFINITY,
                };
                let mut out = vec![init; len];
                let mut xs = vals[*a as usize].iter();
                each_offset(&exts[*a as usize], &ext, |o| {
                    let Some(&x) = xs.next() else { return };
                    out[o] = match r {
                        ReduceOp::Sum => out[o] + x,
                        ReduceOp::Max if x.is_nan() || out[o].is_nan() => f64::NAN,
                        ReduceOp::Min if x.is_nan() || out[o].is_nan() => f64::NAN,
                        ReduceOp::Max => out[o].max(x),
                        ReduceOp::Min => out[o].min(x),
                    };
                });
                out
            }
            Op::Swap(a, x, y) => {
                let va = &vals[*a as usize];
                swapped_offsets(&ext, *x as usize, *y as usize).into_iter().map(|o| va[o]).collect()
            }
            Op::Expand(a) => spread(&ext, &exts[*a as usize], &vals[*a as usize]).into_owned(),
        };
        if needed[i] && v.len() != len {
            return Err(Error(format!("a value read by the program holds {} numbers where {len} were expected", v.len())));
        }
        vals.push(v);
        exts.push(ext);
        for a in if needed[i] { reads(i) } else { Args::of(&[]) } {
            if last[a as usize] == Some(i) {
                vals[a as usize] = Vec::new();
            }
        }
    }
    Ok(vals)
}

/// The value of output `target`, if the program has it.
pub fn output(p: &Program, vals: &[Vec<f64>], target: Target) -> Option<Vec<f64>> {
    p.output(target).map(|n| vals[n as usize].clone())
}

pub fn dims_of(shape: &Shape, b: &AxisBinding, hparams: &[f64]) -> Result<Vec<usize>> {
    bind::dims_of(shape, b, hparams).map_err(Error)
}

#[cfg(test)]
mod tests {
    fn coarse_offsets(fine: &[usize], coarse: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        super::each_offset(fine, coarse, |o| out.push(o));
        out
    }

    #[test]
    fn a_select_known_before_the_run_computes_only_its_branch() {
        use normforge_dsl::ir::{Binary, Node, Op, Output, Program, Shape, Target, Type};
        let node = |op, shape| Node { op, shape, ty: Type::Float };
        // select(hparam > 0.5, the input + 1, 7): the input is read only where the first
        // branch is taken.
        let prog = Program {
            nodes: vec![
                node(Op::HParam(0), Shape::scalar(1)),
                node(Op::Const(0.5), Shape::scalar(1)),
                node(Op::Binary(Binary::Gt, 0, 1), Shape::scalar(1)),
                node(Op::Input, Shape::full(1)),
                node(Op::Const(1.0), Shape::scalar(1)),
                node(Op::Binary(Binary::Add, 3, 4), Shape::full(1)),
                node(Op::Const(7.0), Shape::scalar(1)),
                node(Op::Select(2, 5, 6), Shape::full(1)),
            ],
            outputs: vec![Output { target: Target::Y, node: 7 }],
        };
        let binding = super::AxisBinding { dims: vec![vec![3]], extents: vec![3] };
        let run = |h: f64, input: Option<&[f64]>| {
            let hparams = [h];
            let inp = super::Inputs { binding: &binding, hparams: &hparams, step: 1.0, input, grad: None, grad_output: None, params: &[], buffers: &[], states: &[] };
            super::run(&prog, &inp).map(|vals| vals[7].clone())
        };
        // Not taken: no input needed, and none read.
        assert_eq!(run(0.0, None).unwrap(), [7.0, 7.0, 7.0]);
        assert_eq!(run(1.0, Some(&[1.0, 2.0, 3.0])).unwrap(), [2.0, 3.0, 4.0]);
        assert!(run(1.0, None).is_err(), "the branch taken reads the input");
        // The values no output holds are emptied once read; the output stays.
        let hparams = [1.0];
        let inp = super::Inputs { binding: &binding, hparams: &hparams, step: 1.0, input: Some(&[1.0, 2.0, 3.0]), grad: None, grad_output: None, params: &[], buffers: &[], states: &[] };
        let vals = super::run(&prog, &inp).unwrap();
        assert!(vals[3].is_empty() && vals[5].is_empty() && vals[6].is_empty());
    }

    #[test]
    fn each_element_maps_to_its_group_or_to_the_broadcast_element() {
        // Grouped along the last axis (4 -> 2), broadcast along the first.
        assert_eq!(coarse_offsets(&[2, 4], &[1, 2]), [0, 0, 1, 1, 0, 0, 1, 1]);
        // Kept along the first, broadcast along the last.
        assert_eq!(coarse_offsets(&[2, 3], &[2, 1]), [0, 0, 0, 1, 1, 1]);
        // Grouped in the middle of three, the outer axis kept: strides of the coarse shape.
        assert_eq!(coarse_offsets(&[2, 4, 2], &[2, 2, 2]), [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7]);
        assert_eq!(coarse_offsets(&[], &[]), [0]);
        assert!(coarse_offsets(&[3, 0], &[1, 0]).is_empty());
    }
}
