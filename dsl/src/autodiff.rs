//! Reverse-mode symbolic differentiation of a forward program.
//!
//! The backward program recomputes what it needs of the forward graph and appends adjoint
//! nodes through the same hash-consing [`Builder`], so shared subexpressions and constants
//! fold as the gradient is built; dead forward nodes (buffer updates) are dropped at the end.

use crate::builder::Builder;
use crate::ir::*;

/// Derive `GradInput` and every `GradParam(i)` from a forward program whose output `Y` is
/// seeded with the incoming gradient (`Op::GradOutput`).
pub fn backward(forward: &Program, rank: usize, param_shapes: &[Shape]) -> Program {
    let mut b = Builder::from_program(forward, rank);
    let n = forward.nodes.len();
    // Which nodes depend on a differentiable leaf (the input or a parameter).
    let mut active = vec![false; n];
    for (i, node) in forward.nodes.iter().enumerate() {
        active[i] = match node.op {
            Op::Input | Op::Param(_) => true,
            _ => node.ty == Type::Float && node.op.args().iter().any(|&a| active[a as usize]),
        };
    }
    let mut adj: Vec<Option<NodeId>> = vec![None; n];
    let full = Shape::full(rank);
    if let Some(y) = forward.output(Target::Y) {
        if active[y as usize] {
            adj[y as usize] = Some(b.leaf(Op::GradOutput, full.clone()));
        }
    }
    for i in (0..n).rev() {
        let Some(g) = adj[i] else { continue };
        let node = forward.nodes[i].clone();
        let out = i as NodeId;
        for (arg, contribution) in local_gradients(&mut b, &node, out, g, &active) {
            // Broadcasting in the forward pass sums back in the backward pass.
            let target = b.shape(arg).clone();
            let c = if b.shape(contribution).fits_in(&target) {
                b.expand(contribution, &target)
            } else {
                b.reduce(ReduceOp::Sum, contribution, &target)
            };
            adj[arg as usize] = Some(match adj[arg as usize] {
                Some(prev) => b.binary(Binary::Add, prev, c),
                None => c,
            });
        }
    }
    let mut outputs = Vec::new();
    let leaf_grad = |b: &mut Builder, op: Op, shape: &Shape| -> NodeId {
        let found = (0..n).find(|&i| forward.nodes[i].op == op).and_then(|i| adj[i]);
        let zero = b.constant(0.0);
        b.expand(found.unwrap_or(zero), shape)
    };
    outputs.push(Output { target: Target::GradInput, node: leaf_grad(&mut b, Op::Input, &full) });
    for (p, shape) in param_shapes.iter().enumerate() {
        let node = leaf_grad(&mut b, Op::Param(p as u32), shape);
        outputs.push(Output { target: Target::GradParam(p as u32), node });
    }
    b.finish(outputs)
}

/// The adjoint contributions of node `out` (adjoint `g`) to each of its active arguments,
/// each in `out`'s shape (or the argument's own for reductions/expansions).
fn local_gradients(b: &mut Builder, node: &Node, out: NodeId, g: NodeId, active: &[bool]) -> Vec<(NodeId, NodeId)> {
    let is = |a: NodeId| active[a as usize];
    let mut v = Vec::new();
    match node.op {
        Op::Unary(u, a) if is(a) => {
            let d = match u {
                Unary::Neg => Some(b.unary(Unary::Neg, g)),
                Unary::Sqrt => {
                    // g / (2 sqrt(a))
                    let two = b.constant(2.0);
                    let den = b.binary(Binary::Mul, two, out);
                    Some(b.binary(Binary::Div, g, den))
                }
                Unary::Rsqrt => {
                    // -0.5 * out^3 * g
                    let o2 = b.binary(Binary::Mul, out, out);
                    let o3 = b.binary(Binary::Mul, o2, out);
                    let h = b.constant(-0.5);
                    let k = b.binary(Binary::Mul, h, o3);
                    Some(b.binary(Binary::Mul, g, k))
                }
                Unary::Exp => Some(b.binary(Binary::Mul, g, out)),
                Unary::Log => Some(b.binary(Binary::Div, g, a)),
                Unary::Tanh => {
                    let one = b.constant(1.0);
                    let o2 = b.binary(Binary::Mul, out, out);
                    let d = b.binary(Binary::Sub, one, o2);
                    Some(b.binary(Binary::Mul, g, d))
                }
                Unary::Sigmoid => {
                    let one = b.constant(1.0);
                    let c = b.binary(Binary::Sub, one, out);
                    let d = b.binary(Binary::Mul, out, c);
                    Some(b.binary(Binary::Mul, g, d))
                }
                Unary::Abs => {
                    let s = b.unary(Unary::Sign, a);
                    Some(b.binary(Binary::Mul, g, s))
                }
                Unary::Relu => {
                    let zero = b.constant(0.0);
                    let pos = b.binary(Binary::Gt, a, zero);
                    Some(b.select(pos, g, zero))
                }
                Unary::Softplus => {
                    let s = b.unary(Unary::Sigmoid, a);
                    Some(b.binary(Binary::Mul, g, s))
                }
                Unary::Recip => {
                    // -g * out^2
                    let o2 = b.binary(Binary::Mul, out, out);
                    let m = b.binary(Binary::Mul, g, o2);
                    Some(b.unary(Unary::Neg, m))
                }
                Unary::Sign | Unary::Not | Unary::StopGradient => None,
            };
            v.extend(d.map(|d| (a, d)));
        }
        Op::Binary(op, x, y) => {
            let (ax, ay) = (is(x), is(y));
            match op {
                Binary::Add => {
                    if ax { v.push((x, g)) }
                    if ay { v.push((y, g)) }
                }
                Binary::Sub => {
                    if ax { v.push((x, g)) }
                    if ay { v.push((y, b.unary(Unary::Neg, g))) }
                }
                Binary::Mul => {
                    if ax { v.push((x, b.binary(Binary::Mul, g, y))) }
                    if ay { v.push((y, b.binary(Binary::Mul, g, x))) }
                }
                Binary::Div => {
                    if ax { v.push((x, b.binary(Binary::Div, g, y))) }
                    if ay {
                        // -g * out / y
                        let q = b.binary(Binary::Div, out, y);
                        let m = b.binary(Binary::Mul, g, q);
                        v.push((y, b.unary(Unary::Neg, m)));
                    }
                }
                Binary::Pow => {
                    if ax {
                        // g * y * x^(y - 1)
                        let one = b.constant(1.0);
                        let ym1 = b.binary(Binary::Sub, y, one);
                        let p = b.binary(Binary::Pow, x, ym1);
                        let k = b.binary(Binary::Mul, y, p);
                        v.push((x, b.binary(Binary::Mul, g, k)));
                    }
                    if ay {
                        let l = b.unary(Unary::Log, x);
                        let k = b.binary(Binary::Mul, out, l);
                        v.push((y, b.binary(Binary::Mul, g, k)));
                    }
                }
                Binary::Min | Binary::Max => {
                    // The winner takes the gradient; ties split it, as torch.minimum/maximum do.
                    let win = if op == Binary::Min { Binary::Lt } else { Binary::Gt };
                    let half = b.constant(0.5);
                    let zero = b.constant(0.0);
                    let tie = b.binary(Binary::Eq, x, y);
                    let hg = b.binary(Binary::Mul, g, half);
                    let tie_or_zero = b.select(tie, hg, zero);
                    if ax {
                        let w = b.binary(win, x, y);
                        v.push((x, b.select(w, g, tie_or_zero)));
                    }
                    if ay {
                        let w = b.binary(win, y, x);
                        v.push((y, b.select(w, g, tie_or_zero)));
                    }
                }
                _ => {} // comparisons and logic carry no gradient
            }
        }
        Op::Select(c, x, y) => {
            let zero = b.constant(0.0);
            if is(x) { v.push((x, b.select(c, g, zero))) }
            if is(y) { v.push((y, b.select(c, zero, g))) }
        }
        Op::Reduce(r, a) if is(a) => {
            let a_shape = b.shape(a).clone();
            let ge = b.expand(g, &a_shape);
            match r {
                ReduceOp::Sum => v.push((a, ge)),
                ReduceOp::Max | ReduceOp::Min => {
                    let oe = b.expand(out, &a_shape);
                    let hit = b.binary(Binary::Eq, a, oe);
                    let zero = b.constant(0.0);
                    v.push((a, b.select(hit, ge, zero)));
                }
            }
        }
        Op::Expand(a) if is(a) => v.push((a, g)),
        _ => {}
    }
    v
}
