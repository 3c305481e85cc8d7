//! A layer program -> layer kernels. Every reduction is materialized: one kernel per reduction,
//! one unit per reduced value, looping over the values it folds; the elementwise work feeding
//! it is recomputed inside that loop rather than stored. Outputs of one shape share one
//! elementwise kernel. Shapes stay symbolic: extents arrive at run time in the `meta` table, so
//! a kernel serves every input shape and group count.

use crate::compile::{binary, reduce, unary, Uniforms};
use crate::kernel::{LOp, LProgram};
use crate::Error;
use normforge_dsl::ir::{Entry, Op, Program, Shape, Target};

/// Where a tensor of the arena comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Input,
    GradOutput,
    Param(u32),
    Buffer(u32),
    /// A value the kernels compute: a reduction, or an output.
    Node(u32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// In launch order.
    pub kernels: Vec<LProgram>,
    /// The shape table.
    pub shapes: Vec<Shape>,
    /// The tensor table: where each comes from, and its shape's index.
    pub tensors: Vec<(Source, usize)>,
    /// Which tensor holds each output.
    pub outputs: Vec<(Target, usize)>,
    pub(crate) program: Program,
    pub(crate) uniforms: Uniforms,
}

struct Tables {
    shapes: Vec<Shape>,
    tensors: Vec<(Source, usize)>,
}

impl Tables {
    fn shape(&mut self, s: &Shape) -> usize {
        self.shapes.iter().position(|x| x == s).unwrap_or_else(|| {
            self.shapes.push(s.clone());
            self.shapes.len() - 1
        })
    }
    fn tensor(&mut self, src: Source, s: &Shape) -> usize {
        let sh = self.shape(s);
        self.tensors.iter().position(|(x, _)| *x == src).unwrap_or_else(|| {
            self.tensors.push((src, sh));
            self.tensors.len() - 1
        })
    }
}

pub fn plan(entry: &Entry, p: &Program) -> Result<Plan, Error> {
    let unsupported = |what: &str| Error(format!("`{}`: {what} is not supported in a layer by the CubeCL backend", entry.name));
    let mut uniforms = Uniforms::new(p, |op| matches!(op, Op::Size(_) | Op::Rank(_)));
    let n = p.nodes.len();
    let materialized: Vec<bool> = (0..n).map(|i| !uniforms.flags[i] && matches!(p.nodes[i].op, Op::Reduce(..))).collect();
    let mut t = Tables { shapes: Vec::new(), tensors: Vec::new() };
    let rank = entry.axes.len();
    let mut kernels = Vec::new();

    // The ops computing `roots` from tensors and scalars; returns their registers.
    let build = |roots: &[u32], t: &mut Tables, uniforms: &mut Uniforms| -> Result<(Vec<LOp>, Vec<usize>), Error> {
        let mut needed = vec![false; n];
        for &r in roots {
            needed[r as usize] = true;
        }
        for i in (0..n).rev() {
            if needed[i] && !uniforms.flags[i] && !materialized[i] {
                for a in p.nodes[i].op.args() {
                    needed[a as usize] = true;
                }
            }
        }
        let mut ops = Vec::new();
        let mut reg = vec![usize::MAX; n];
        for (i, node) in p.nodes.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let load = |src: Source, t: &mut Tables| LOp::Load(t.tensor(src, &node.shape), t.shape(&node.shape));
            let op = if uniforms.flags[i] {
                LOp::Scalar(uniforms.export(i as u32))
            } else if materialized[i] {
                load(Source::Node(i as u32), t)
            } else {
                match &node.op {
                    Op::Input => load(Source::Input, t),
                    Op::GradOutput => load(Source::GradOutput, t),
                    Op::Param(k) => load(Source::Param(*k), t),
                    Op::Buffer(k) => load(Source::Buffer(*k), t),
                    Op::Expand(a) => {
                        // Broadcasting is free: a load reads where the element falls.
                        reg[i] = reg[*a as usize];
                        continue;
                    }
                    Op::Unary(u, a) => LOp::Unary(unary(*u), reg[*a as usize]),
                    Op::Binary(b, x, y) => LOp::Binary(binary(*b), reg[*x as usize], reg[*y as usize]),
                    Op::Select(c, x, y) => LOp::Select(reg[*c as usize], reg[*x as usize], reg[*y as usize]),
                    other => return Err(unsupported(&format!("{other:?}"))),
                }
            };
            ops.push(op);
            reg[i] = ops.len() - 1;
        }
        Ok((ops, roots.iter().map(|&r| reg[r as usize]).collect()))
    };

    for (i, node) in p.nodes.iter().enumerate() {
        if !materialized[i] {
            continue;
        }
        let Op::Reduce(r, a) = &node.op else { unreachable!() };
        let (ops, regs) = build(&[*a], &mut t, &mut uniforms)?;
        let out = t.tensor(Source::Node(i as u32), &node.shape);
        let domain = t.shape(&p.nodes[*a as usize].shape);
        let target = t.shape(&node.shape);
        kernels.push(LProgram { rank, shapes: 0, domain, target, ops, reduce: Some((reduce(*r), regs[0], out)), stores: Vec::new() });
    }
    // Outputs that are reductions are already in their tensors; the rest, by shape.
    let mut outputs = Vec::new();
    let mut by_shape: Vec<(Shape, Vec<u32>)> = Vec::new();
    for o in &p.outputs {
        let node = &p.nodes[o.node as usize];
        outputs.push((o.target, t.tensor(Source::Node(o.node), &node.shape)));
        if !materialized[o.node as usize] {
            match by_shape.iter_mut().find(|(s, _)| *s == node.shape) {
                Some((_, v)) if v.contains(&o.node) => {}
                Some((_, v)) => v.push(o.node),
                None => by_shape.push((node.shape.clone(), vec![o.node])),
            }
        }
    }
    for (shape, nodes) in by_shape {
        // Materialized nodes are loaded, not recomputed: treat the outputs as roots only.
        let (ops, regs) = build(&nodes, &mut t, &mut uniforms)?;
        let target = t.shape(&shape);
        let stores = nodes.iter().zip(regs).map(|(&nd, r)| (t.tensor(Source::Node(nd), &shape), r)).collect();
        kernels.push(LProgram { rank, shapes: 0, domain: target, target, ops, reduce: None, stores });
    }
    for k in &mut kernels {
        k.shapes = t.shapes.len();
    }
    Ok(Plan { kernels, shapes: t.shapes, tensors: t.tensors, outputs, program: p.clone(), uniforms })
}
