//! Values that are one number for the whole run of a program (hyper-parameters, the step, shape
//! queries where a backend knows them, and arithmetic on those): backends compute them on the
//! host in f64, once, instead of per element, and may pick a `select`'s branch before running it.

use crate::bind::{self, AxisBinding};
use crate::ir::{Args, Op, Program};

/// Per node, whether it is uniform. `leaf` says which other ops count as uniform (shape
/// queries, for a backend that runs one tensor at a time).
pub fn flags(p: &Program, leaf: impl Fn(&Op) -> bool) -> Vec<bool> {
    let mut flags = vec![false; p.nodes.len()];
    for (i, node) in p.nodes.iter().enumerate() {
        flags[i] = match &node.op {
            Op::Const(_) | Op::HParam(_) | Op::Step => true,
            Op::Unary(..) | Op::Binary(..) | Op::Select(..) | Op::Expand(_) => node.op.args().iter().all(|a| flags[*a as usize]),
            op => leaf(op),
        };
    }
    flags
}

/// Whether `op` asks for a shape (`bind::query`): uniform where a backend binds one
/// tensor's shape at a time.
pub fn is_shape_query(op: &Op) -> bool {
    matches!(op, Op::Size(_) | Op::Rank(_))
}

/// [`flags`] and [`values`] for a run on the shapes `b`, its shape queries uniform.
pub fn on_shapes(p: &Program, b: &AxisBinding, hparams: &[f64], step: f64) -> (Vec<bool>, Vec<f64>) {
    let flags = flags(p, is_shape_query);
    let values = values(p, &flags, hparams, step, |op| bind::query(op, b, hparams).expect("only shape queries are admitted") as f64);
    (flags, values)
}

/// The value of every uniform node (0 elsewhere); `query` answers the leaves `flags` admitted.
pub fn values(p: &Program, flags: &[bool], hparams: &[f64], step: f64, query: impl Fn(&Op) -> f64) -> Vec<f64> {
    let mut val = vec![0f64; p.nodes.len()];
    for (i, n) in p.nodes.iter().enumerate() {
        if !flags[i] {
            continue;
        }
        let v = |id: &u32| val[*id as usize];
        val[i] = match &n.op {
            Op::Const(c) => *c,
            Op::HParam(h) => hparams[*h as usize],
            Op::Step => step,
            Op::Unary(u, a) => u.apply(v(a)),
            Op::Binary(b, x, y) => b.apply(v(x), v(y)),
            Op::Select(c, x, y) => {
                if v(c) != 0.0 {
                    v(x)
                } else {
                    v(y)
                }
            }
            Op::Expand(a) => v(a),
            op => query(op),
        };
    }
    val
}

/// The nodes the outputs read, through a `select` whose condition is uniform only along the
/// branch `value` says it takes. `reads(i)` is what node `i` reads: its arguments, unless a
/// backend computes it otherwise.
pub fn needed(p: &Program, flags: &[bool], value: &[f64], reads: impl Fn(usize) -> Args) -> Vec<bool> {
    let mut needed = vec![false; p.nodes.len()];
    for o in &p.outputs {
        needed[o.node as usize] = true;
    }
    for i in (0..p.nodes.len()).rev() {
        if !needed[i] {
            continue;
        }
        match p.nodes[i].op {
            Op::Select(c, x, y) if flags[c as usize] => needed[if value[c as usize] != 0.0 { x } else { y } as usize] = true,
            _ => reads(i).into_iter().for_each(|a| needed[a as usize] = true),
        }
    }
    needed
}
