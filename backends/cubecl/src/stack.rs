//! Update rules that run through layer kernels (per-axis reductions: AdamP, SGDP; matrix
//! products: Muon), over stacks of same-shaped tensors: the rule's program gains a first axis,
//! one index per tensor, which nothing reduces, so one launch per kernel serves every tensor of
//! a stack while each tensor keeps its own reductions. A model's 196 bias vectors of one length
//! are then one stack, not 196 rounds of launches.

use crate::plan::{plan_stacked, Plan};
use crate::Error;
use normforge_dsl::bind::{self, AxisBinding};
use normforge_dsl::ir::{Axis, Entry, Extent, Op, Program, Shape};
use normforge_dsl::uniform;
use std::ops::Range;

/// `p` over a stack of tensors: every value that varies between tensors (all but the uniform
/// ones: hyper-parameters, the step, shape queries, which every tensor of a stack shares) and
/// every output (one per tensor, uniform or not: a state's initial zeros) gains a full first
/// axis; axis numbers in operations move up by one.
fn stacked_program(p: &Program) -> Program {
    let flags = uniform::flags(p, uniform::is_shape_query);
    let front = |e: Extent, s: &Shape| Shape(std::iter::once(e).chain(s.0.iter().cloned()).collect());
    let mut out = p.clone();
    for (i, (node, &uniform)) in out.nodes.iter_mut().zip(&flags).enumerate() {
        let output = p.outputs.iter().any(|o| o.node as usize == i);
        node.shape = front(if uniform && !output { Extent::One } else { Extent::Full }, &node.shape);
        node.op = match &node.op {
            Op::Size(s) => Op::Size(front(Extent::One, s)),
            Op::Rank(axes) => Op::Rank(axes.iter().map(|a| a + 1).collect()),
            Op::Swap(a, x, y) => Op::Swap(*a, x + 1, y + 1),
            op => op.clone(),
        };
    }
    out
}

/// A rule's step and initial-state plans over stacks.
#[derive(Clone, Debug, PartialEq)]
pub struct Stacked {
    entry: Entry,
    pub step: Plan,
    pub init: Plan,
}

impl Stacked {
    pub fn new(entry: &Entry, step: &Program) -> Result<Stacked, Error> {
        let mut e = entry.clone();
        e.axes.insert(0, Axis { name: Some("tensor".into()), variadic: false, twin: None });
        for a in &mut e.axes[1..] {
            a.twin = a.twin.map(|t| t + 1);
        }
        Ok(Stacked { step: plan_stacked(&e, &stacked_program(step), 1)?, init: plan_stacked(&e, &stacked_program(&entry.init), 1)?, entry: e })
    }

    /// The binding of a stack of `count` tensors of `shape` (checked against the rule's
    /// program: groups must divide their axes).
    pub fn bind(&self, count: usize, shape: &[usize], hparams: &[f64], what: &str) -> Result<AxisBinding, Error> {
        let dims: Vec<usize> = std::iter::once(count).chain(shape.iter().copied()).collect();
        let b = bind::bind_axes(&self.entry.axes, &dims, what).map_err(Error)?;
        bind::check_program(&self.step.program, &b, hparams).map_err(Error)?;
        Ok(b)
    }
}

/// Consecutive tensors of one shape, as stacks (index ranges), where `joins(k)` says tensor
/// `k` may follow tensor `k - 1` in memory (always, for host copies; on a device, where no
/// padding lies between them).
pub fn stacks(shapes: &[Vec<usize>], joins: impl Fn(usize) -> bool) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (k, s) in shapes.iter().enumerate() {
        match out.last_mut() {
            Some(r) if shapes[r.start] == *s && joins(k) => r.end = k + 1,
            _ => out.push(k..k + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_runs_of_one_shape_that_may_join() {
        let shapes = vec![vec![4, 4], vec![4, 4], vec![3], vec![3], vec![3], vec![4, 4]];
        assert_eq!(stacks(&shapes, |_| true), vec![0..2, 2..5, 5..6]);
        assert_eq!(stacks(&shapes, |k| k != 3), vec![0..2, 2..3, 3..5, 5..6]);
        assert!(stacks(&[], |_| true).is_empty());
    }
}
