//! IR -> kernel programs. A rule splits three ways: values uniform over every element
//! (functions of hyper-parameters and the step count, like `1 - beta1^t`) are computed once per
//! launch on the host in f64, as PyTorch computes them in Python; per-tensor reductions cut the
//! rest into phases (a phase computes what the next one's reductions need); each phase is one
//! kernel over every element of every tensor.

use crate::kernel::{BOp, KOp, KProgram, Pure, ROp, StepLayout, UOp};
use crate::{Dtype, Error};
use normforge_dsl::{bind, uniform};
use normforge_dsl::ir::{Binary, Entry, Op, Program, ReduceOp, Target, Unary};
use std::collections::HashMap;

/// The nodes whose value is the same for every element (functions of hyper-parameters, the step
/// count and, in a layer, the input's shape): computed on the host in f64, read by kernels from
/// a scalar buffer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Uniforms {
    pub flags: Vec<bool>,
    /// The uniform nodes the kernels read, in the order of their scalar buffer.
    exported: Vec<u32>,
    index: HashMap<u32, usize>,
}

impl Uniforms {
    /// `leaf` says which other ops (shape queries, in a layer) count as uniform.
    pub fn new(p: &Program, leaf: impl Fn(&Op) -> bool) -> Self {
        Uniforms { flags: uniform::flags(p, leaf), exported: Vec::new(), index: HashMap::new() }
    }

    /// The scalar-buffer entry of a uniform node.
    pub fn export(&mut self, id: u32) -> usize {
        let exported = &mut self.exported;
        *self.index.entry(id).or_insert_with(|| {
            exported.push(id);
            exported.len() - 1
        })
    }

    /// The scalar buffer; `query` answers the shape queries.
    pub fn values(&self, p: &Program, hparams: &[f64], t: f64, query: impl Fn(&Op) -> f64) -> Vec<f32> {
        let val = uniform::values(p, &self.flags, hparams, t, query);
        let mut out: Vec<f32> = self.exported.iter().map(|&i| val[i as usize] as f32).collect();
        // Never empty (not every runtime allows an empty binding); a rule's gradient scale.
        out.push(0.0);
        out
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    /// In launch order; after each phase with reductions, their combine.
    pub phases: Vec<KProgram>,
    program: Program,
    uniforms: Uniforms,
    /// Per-tensor values the host knows from shapes alone (`rank`, sizes of some axes): the
    /// node and its result slot.
    host: Vec<(u32, usize)>,
}

impl Compiled {
    /// The kernels' scalar buffer for these hyper-parameters and step count; its last entry is
    /// the factor the kernels of [`Self::grad_scaled`] multiply every gradient by (the others
    /// never read it).
    pub fn scalars(&self, hparams: &[f64], t: f64, grad_scale: f64) -> Vec<f32> {
        let mut out = self.uniforms.values(&self.program, hparams, t, |_| unreachable!("no shape queries are uniform in a rule"));
        *out.last_mut().expect("never empty") = grad_scale as f32;
        out
    }

    /// The same program reading every gradient times the scalar buffer's last entry: a clipped
    /// step's scale applied where the gradient is loaded (in f32, as libtorch multiplies an f32
    /// tensor by a scalar, and as torch's fused optimizers apply their `grad_scale`), instead of
    /// a pass of its own reading and writing every gradient before the step.
    pub fn grad_scaled(&self) -> Compiled {
        let scale = self.uniforms.exported.len();
        let mut out = self.clone();
        for ph in &mut out.phases {
            let mut ops = Vec::with_capacity(ph.ops.len() + 2);
            // Where each old instruction's value now is: a gradient's, at its product.
            let mut at: Vec<usize> = Vec::with_capacity(ph.ops.len());
            for op in &ph.ops {
                let op = match op.clone() {
                    KOp::Pure(p) => KOp::Pure(p.map(|a| at[a])),
                    KOp::Accum(k, a) => KOp::Accum(k, at[a]),
                    KOp::StoreP(a) => KOp::StoreP(at[a]),
                    KOp::StoreState(j, a) => KOp::StoreState(j, at[a]),
                    load => load,
                };
                let gradient = op == KOp::LoadG;
                ops.push(op);
                if gradient {
                    ops.push(KOp::Pure(Pure::Scalar(scale)));
                    ops.push(KOp::Pure(Pure::Binary(BOp::Mul, ops.len() - 2, ops.len() - 1)));
                }
                at.push(ops.len() - 1);
            }
            ph.ops = ops;
        }
        out
    }

    /// Per-tensor results the rule needs (the row length of its result buffers).
    pub fn slots(&self) -> usize {
        self.phases[0].slots
    }

    /// The result buffer before the first phase: per tensor, the slots the host fills from the
    /// tensor's shape (the rest are the reductions', filled on the device).
    pub fn host_values(&self, entry: &Entry, hparams: &[f64], shapes: &[Vec<usize>]) -> Result<Vec<f32>, Error> {
        let slots = self.slots().max(1);
        let mut out = vec![0f32; shapes.len().max(1) * slots];
        if self.host.is_empty() {
            return Ok(out);
        }
        for (t, shape) in shapes.iter().enumerate() {
            let b = bind::bind_axes(&entry.axes, shape, &format!("parameter {t}")).map_err(Error)?;
            for &(node, slot) in &self.host {
                out[t * slots + slot] = bind::query(&self.program.nodes[node as usize].op, &b, hparams).expect("only shape queries are host values") as f32;
            }
        }
        Ok(out)
    }
}

/// Compile an update rule's program (a step or the state initialiser), its states held in f32.
pub fn compile(entry: &Entry, p: &Program) -> Result<Compiled, Error> {
    compile_for(entry, p, Dtype::F32)
}

/// [`compile`] for states held in `states`. Only f32 states are read back by the phase after
/// the one that stores them: a later phase reading a rounded state would disagree with the
/// reductions the earlier phase took of the unrounded value (f16 moments underflow where f32
/// ones do not), so narrower states are computed again from the gradient in each phase.
pub fn compile_for(entry: &Entry, p: &Program, states: Dtype) -> Result<Compiled, Error> {
    let unsupported = |what: &str| Error(format!("`{}`: {what} is not supported by the CubeCL backend yet", entry.name));
    let n = p.nodes.len();
    let input = entry.input_shape();
    let full = |i: u32| p.nodes[i as usize].shape == input;
    let mut uniforms = Uniforms::new(p, |_| false);
    let uniform = uniforms.flags.clone();
    let mut level = vec![0usize; n];
    let mut slot = vec![usize::MAX; n];
    let mut slots = 0;
    let mut host = Vec::new();
    for (i, node) in p.nodes.iter().enumerate() {
        if uniform[i] {
            continue;
        }
        // Values vary per element or per tensor; anything in between is a per-axis reduction.
        if !(full(i as u32) || node.shape.is_scalar()) {
            return Err(unsupported("a per-axis reduction"));
        }
        level[i] = node.op.args().iter().map(|a| level[*a as usize]).max().unwrap_or(0);
        match &node.op {
            Op::Reduce(_, a) => {
                level[i] += 1;
                slot[i] = slots;
                slots += 1;
                if !node.shape.is_scalar() || !(full(*a) || uniform[*a as usize]) {
                    return Err(unsupported("a per-axis reduction"));
                }
            }
            Op::Size(s) if *s != input => {
                slot[i] = slots;
                slots += 1;
                host.push((i as u32, slot[i]));
            }
            Op::Rank(_) => {
                slot[i] = slots;
                slots += 1;
                host.push((i as u32, slot[i]));
            }
            Op::Param(_) | Op::Buffer(_) | Op::GradOutput => return Err(unsupported("a layer program")),
            _ => {}
        }
    }
    let last = p.outputs.iter().map(|o| level[o.node as usize]).max().unwrap_or(0);
    let feeds = |k: usize| -> Vec<usize> { (0..n).filter(|&i| matches!(p.nodes[i].op, Op::Reduce(..)) && level[i] == k + 1).collect() };
    // What phase `k` computes: the reductions it feeds, everything they and (last) the outputs
    // need, short of the results of earlier phases (reductions, and the new states of `early`).
    let needed = |k: usize, early: &[Option<(usize, usize)>]| -> Vec<bool> {
        let mut needed = vec![false; n];
        for r in feeds(k) {
            needed[p.nodes[r].op.args()[0] as usize] = true;
        }
        if k == last {
            for o in &p.outputs {
                needed[o.node as usize] = true;
            }
        }
        for i in (0..n).rev() {
            let loaded = (matches!(p.nodes[i].op, Op::Reduce(..)) && level[i] <= k) || early[i].is_some_and(|(e, _)| e < k);
            if needed[i] && !uniform[i] && !loaded {
                for a in p.nodes[i].op.args() {
                    needed[a as usize] = true;
                }
            }
        }
        needed
    };
    // A state whose new value needs no later phase's reduction is stored by the phase that can
    // first compute it, and later phases read it back rather than computing it again from the
    // gradient and the old state: LAMB's update reads p, g, m and v, then p, m and v (7 reads,
    // 3 writes per element), not p, g, m and v twice. Not where a later phase still needs the
    // old state: dropping one such store can make another's old state needed, so repeat.
    let mut early: Vec<Option<(usize, usize)>> = vec![None; n];
    loop {
        for o in &p.outputs {
            let (i, e) = (o.node as usize, level[o.node as usize]);
            if let Target::State(j) = o.target {
                if states == Dtype::F32 && e < last && !uniform[i] && !matches!(p.nodes[i].op, Op::State(_)) && early[i].is_none() {
                    early[i] = Some((e, j as usize));
                }
            }
        }
        let clash = (0..n).find(|&i| {
            early[i].is_some_and(|(e, j)| (e + 1..=last).any(|k| needed(k, &early).iter().enumerate().any(|(a, &need)| need && p.nodes[a].op == Op::State(j as u32))))
        });
        match clash {
            Some(i) => early[i] = None,
            None => break,
        }
    }
    let mut phases = Vec::new();
    for k in 0..=last {
        let feeds = feeds(k);
        let needed = needed(k, &early);
        let mut ops = Vec::new();
        let mut reg: Vec<Option<usize>> = vec![None; n];
        // A node's register; a uniform value becomes one more entry of the scalar buffer.
        let mut fetch = |id: u32, ops: &mut Vec<KOp>, reg: &mut Vec<Option<usize>>| -> usize {
            if let Some(r) = reg[id as usize] {
                return r;
            }
            ops.push(KOp::Pure(Pure::Scalar(uniforms.export(id))));
            reg[id as usize] = Some(ops.len() - 1);
            ops.len() - 1
        };
        for (i, node) in p.nodes.iter().enumerate() {
            if !needed[i] || uniform[i] {
                continue;
            }
            let op = match &node.op {
                _ if early[i].is_some_and(|(e, _)| e < k) => KOp::LoadState(early[i].map_or(0, |(_, j)| j)),
                Op::Input => KOp::LoadP,
                Op::Grad => KOp::LoadG,
                Op::State(j) => KOp::LoadState(*j as usize),
                Op::Size(_) | Op::Rank(_) if slot[i] != usize::MAX => KOp::LoadR(slot[i]),
                Op::Size(_) => KOp::TensorLen,
                Op::Reduce(..) => KOp::LoadR(slot[i]),
                Op::Expand(a) => {
                    // Broadcasting is free: each unit holds its own copy of the value.
                    let r = fetch(*a, &mut ops, &mut reg);
                    reg[i] = Some(r);
                    continue;
                }
                Op::Unary(u, a) => KOp::Pure(Pure::Unary(unary(*u), fetch(*a, &mut ops, &mut reg))),
                Op::Binary(b, x, y) => {
                    let (x, y) = (fetch(*x, &mut ops, &mut reg), fetch(*y, &mut ops, &mut reg));
                    KOp::Pure(Pure::Binary(binary(*b), x, y))
                }
                Op::Select(c, x, y) => {
                    let (c, x, y) = (fetch(*c, &mut ops, &mut reg), fetch(*x, &mut ops, &mut reg), fetch(*y, &mut ops, &mut reg));
                    KOp::Pure(Pure::Select(c, x, y))
                }
                _ => unreachable!("refused above"),
            };
            ops.push(op);
            reg[i] = Some(ops.len() - 1);
        }
        let mut accums = Vec::new();
        for &r in &feeds {
            let Op::Reduce(op, a) = &p.nodes[r].op else { unreachable!() };
            let v = fetch(*a, &mut ops, &mut reg);
            ops.push(KOp::Accum(accums.len(), v));
            accums.push((reduce(*op), slot[r]));
        }
        for o in &p.outputs {
            let stored_in = early[o.node as usize].filter(|&(_, j)| o.target == Target::State(j as u32)).map_or(last, |(e, _)| e);
            if k == stored_in {
                let v = fetch(o.node, &mut ops, &mut reg);
                ops.push(match o.target {
                    Target::P => KOp::StoreP(v),
                    Target::State(j) => KOp::StoreState(j as usize, v),
                    _ => return Err(unsupported("this output")),
                });
            }
        }
        phases.push(KProgram { ops, accums, slots, blocks_per_cube: 1, lanes: 1 }.laid_out(StepLayout::DEFAULT));
    }
    Ok(Compiled { phases, program: p.clone(), uniforms, host })
}

pub(crate) fn reduce(r: ReduceOp) -> ROp {
    match r {
        ReduceOp::Sum => ROp::Sum,
        ReduceOp::Max => ROp::Max,
        ReduceOp::Min => ROp::Min,
    }
}

pub(crate) fn unary(u: Unary) -> UOp {
    match u {
        Unary::Neg => UOp::Neg,
        Unary::Not => UOp::Not,
        Unary::Sqrt => UOp::Sqrt,
        Unary::Rsqrt => UOp::Rsqrt,
        Unary::Exp => UOp::Exp,
        Unary::Log => UOp::Log,
        Unary::Tanh => UOp::Tanh,
        Unary::Sigmoid => UOp::Sigmoid,
        Unary::Sign => UOp::Sign,
        Unary::Abs => UOp::Abs,
        Unary::Relu => UOp::Relu,
        Unary::Softplus => UOp::Softplus,
        Unary::Recip => UOp::Recip,
        // Kernels compute values; the derivative it stops was taken when the IR was built.
        Unary::StopGradient => UOp::Identity,
    }
}

pub(crate) fn binary(b: Binary) -> BOp {
    match b {
        Binary::Add => BOp::Add,
        Binary::Sub => BOp::Sub,
        Binary::Mul => BOp::Mul,
        Binary::Div => BOp::Div,
        Binary::Pow => BOp::Pow,
        Binary::Min => BOp::Min,
        Binary::Max => BOp::Max,
        Binary::Lt => BOp::Lt,
        Binary::Le => BOp::Le,
        Binary::Gt => BOp::Gt,
        Binary::Ge => BOp::Ge,
        Binary::Eq => BOp::Eq,
        Binary::Ne => BOp::Ne,
        Binary::And => BOp::And,
        Binary::Or => BOp::Or,
    }
}
