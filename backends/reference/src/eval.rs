//! Program evaluation: every node becomes a dense array over the extents its shape has.

use crate::{Error, Result};
use normforge_dsl::ir::*;

pub use normforge_dsl::bind::AxisBinding;
use normforge_dsl::bind;

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

/// For each element of `fine` (row-major), the offset of the element of `coarse` it maps to.
/// Per axis: the same extent maps index to index, a grouped extent maps an index to its
/// group, a single element maps everything to 0.
fn coarse_offsets(fine: &[usize], coarse: &[usize]) -> Vec<usize> {
    let mut stride: usize = coarse.iter().product();
    // Built an axis at a time, outermost first: each offset so far followed by its children's.
    // (Per element, a division per axis took most of a large product's time.)
    let mut out = vec![0usize];
    for (&f, &c) in fine.iter().zip(coarse) {
        stride /= c.max(1);
        let step: Vec<usize> = (0..f).map(|i| if c == 1 { 0 } else { i / (f / c) * stride }).collect();
        let mut next = Vec::with_capacity(out.len() * f);
        for &o in &out {
            next.extend(step.iter().map(|&s| o + s));
        }
        out = next;
    }
    out
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

/// Evaluate every node; returns the node values.
pub fn run(p: &Program, inp: &Inputs) -> Result<Vec<Vec<f64>>> {
    let mut vals: Vec<Vec<f64>> = Vec::with_capacity(p.nodes.len());
    let mut exts: Vec<Vec<usize>> = Vec::with_capacity(p.nodes.len());
    for n in &p.nodes {
        let ext = extents(&n.shape, inp.binding, inp.hparams)?;
        let len: usize = ext.iter().product();
        let v: Vec<f64> = match &n.op {
            Op::Const(c) => vec![*c],
            Op::HParam(i) => vec![inp.hparams[*i as usize]],
            Op::Size(s) => vec![bind::size(s, inp.binding, inp.hparams) as f64],
            Op::Rank(axes) => vec![axes.iter().map(|&a| inp.binding.dims[a as usize].len()).sum::<usize>() as f64],
            Op::Step => vec![inp.step],
            Op::Input => leaf(inp.input, "the input")?.to_vec(),
            Op::Grad => leaf(inp.grad, "the gradient")?.to_vec(),
            Op::GradOutput => leaf(inp.grad_output, "the output gradient")?.to_vec(),
            Op::Param(i) => indexed(inp.params, *i, "parameter")?.to_vec(),
            Op::Buffer(i) => indexed(inp.buffers, *i, "buffer")?.to_vec(),
            Op::State(i) => indexed(inp.states, *i, "state")?.to_vec(),
            Op::Unary(u, a) => vals[*a as usize].iter().map(|&x| u.apply(x)).collect(),
            Op::Binary(b, x, y) => {
                let (ox, oy) = (coarse_offsets(&ext, &exts[*x as usize]), coarse_offsets(&ext, &exts[*y as usize]));
                let (vx, vy) = (&vals[*x as usize], &vals[*y as usize]);
                (0..len).map(|i| b.apply(vx[ox[i]], vy[oy[i]])).collect()
            }
            Op::Select(c, x, y) => {
                let oc = coarse_offsets(&ext, &exts[*c as usize]);
                let (ox, oy) = (coarse_offsets(&ext, &exts[*x as usize]), coarse_offsets(&ext, &exts[*y as usize]));
                let (vc, vx, vy) = (&vals[*c as usize], &vals[*x as usize], &vals[*y as usize]);
                (0..len).map(|i| if vc[oc[i]] != 0.0 { vx[ox[i]] } else { vy[oy[i]] }).collect()
            }
            Op::Reduce(r, a) => {
                let init = match r {
                    ReduceOp::Sum => 0.0,
                    ReduceOp::Max => f64::NEG_INFINITY,
                    ReduceOp::Min => f64::INFINITY,
                };
                let mut out = vec![init; len];
                let offs = coarse_offsets(&exts[*a as usize], &ext);
                for (&x, &o) in vals[*a as usize].iter().zip(&offs) {
                    out[o] = match r {
                        ReduceOp::Sum => out[o] + x,
                        ReduceOp::Max if x.is_nan() || out[o].is_nan() => f64::NAN,
                        ReduceOp::Min if x.is_nan() || out[o].is_nan() => f64::NAN,
                        ReduceOp::Max => out[o].max(x),
                        ReduceOp::Min => out[o].min(x),
                    };
                }
                out
            }
            Op::Swap(a, x, y) => {
                let va = &vals[*a as usize];
                swapped_offsets(&ext, *x as usize, *y as usize).into_iter().map(|o| va[o]).collect()
            }
            Op::Expand(a) => {
                let offs = coarse_offsets(&ext, &exts[*a as usize]);
                let va = &vals[*a as usize];
                offs.iter().map(|&o| va[o]).collect()
            }
        };
        if v.len() != len {
            return Err(Error(format!("a value read by the program holds {} numbers where {len} were expected", v.len())));
        }
        vals.push(v);
        exts.push(ext);
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
    use super::coarse_offsets;

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
