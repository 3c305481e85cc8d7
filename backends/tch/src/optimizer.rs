//! A registry update rule driving the variables of a VarStore.
//!
//! A step is all or nothing: every new parameter and state value is computed first, and only
//! when all exist (and, unless disabled, every gradient is finite) are they written back.

use crate::lower::{Leaves, Lowering, Values};
use crate::state_file::{self, Expected, Saved};
use crate::{float_kind, Error};
use normforge_dsl::bind;
use normforge_dsl::ir::{Entry, Kind as EntryKind, Program, Programs, Target};
use std::path::Path;
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

#[derive(Debug)]
struct Slot {
    name: String,
    var: Tensor,
    step: i64,
    states: Option<Vec<Tensor>>,
}

/// Parameters sharing hyper-parameter values.
#[derive(Debug)]
pub struct Group {
    pub hparams: Vec<f64>,
    slots: Vec<Slot>,
}

impl Group {
    pub fn param_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum StepReport {
    /// Every parameter with a gradient was updated; `grad_norm` is the global gradient norm
    /// when clipping is on.
    Applied { grad_norm: Option<f64>, clipped: bool },
    /// `param`'s gradient held NaN or infinity: nothing was changed.
    SkippedNonFinite { param: String },
}

/// What a training loop needs of an optimizer, so one loop (and its set-up) serves
/// `DslOptimizer` and the CUDA fast path's `FusedOptimizer` (normforge-cuda), and several
/// rules can share a model (Muon for the matrices, AdamW for the rest: `zero_grad` each,
/// backpropagate once, `step` each).
pub trait Optimize {
    fn zero_grad(&mut self);
    /// Update the parameters from their gradients (or skip, where one is not finite).
    fn step(&mut self) -> Result<StepReport, Error>;
    /// `zero_grad`, `loss.backward()`, `step`.
    fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport, Error> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }
    /// The parameters `select` takes (by name) into a new group with `overrides`.
    fn split_group(&mut self, select: &dyn Fn(&str) -> bool, overrides: &[(String, f64)]) -> Result<usize, Error>;
    /// Clip the global gradient norm to this value before each update.
    fn clip_grad_norm(&mut self, max: Option<f64>);
    /// Save the rule's state and step counts (`state_file`: either optimizer reads it).
    fn save(&self, path: &Path) -> Result<(), Error>;
    /// Load a state saved for the same parameters. All or nothing.
    fn load(&mut self, path: &Path) -> Result<(), Error>;
    /// Set a hyper-parameter in every group (a schedule's learning rate): a run-time value.
    fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error>;
}

impl Optimize for DslOptimizer {
    fn zero_grad(&mut self) {
        DslOptimizer::zero_grad(self)
    }
    fn step(&mut self) -> Result<StepReport, Error> {
        DslOptimizer::step(self)
    }
    fn split_group(&mut self, select: &dyn Fn(&str) -> bool, overrides: &[(String, f64)]) -> Result<usize, Error> {
        DslOptimizer::split_group(self, select, overrides)
    }
    fn clip_grad_norm(&mut self, max: Option<f64>) {
        self.max_grad_norm = max;
    }
    fn save(&self, path: &Path) -> Result<(), Error> {
        DslOptimizer::save(self, path)
    }
    fn load(&mut self, path: &Path) -> Result<(), Error> {
        DslOptimizer::load(self, path)
    }
    fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        DslOptimizer::set_hparam(self, name, v)
    }
}

#[derive(Debug)]
pub struct DslOptimizer {
    entry: Arc<Entry>,
    groups: Vec<Group>,
    /// Clip the global gradient norm to this value before the update (`clip_grad_norm_`).
    pub max_grad_norm: Option<f64>,
    /// Skip a step whose gradients are not all finite (the default).
    pub skip_nonfinite: bool,
}

impl DslOptimizer {
    /// One group holding every trainable variable of `vs`, in name order.
    pub fn new(entry: Arc<Entry>, vs: &nn::VarStore, overrides: &[(String, f64)]) -> Result<Self, Error> {
        Self::selected(entry, vs, overrides, |_, _| true)
    }

    /// One group holding the trainable variables of `vs` that `select` takes (by name and
    /// tensor), so that two rules can share a model: Muon for the 2-D weights
    /// (`|_, t| t.dim() == 2`), AdamW for the rest.
    pub fn selected(
        entry: Arc<Entry>,
        vs: &nn::VarStore,
        overrides: &[(String, f64)],
        select: impl Fn(&str, &Tensor) -> bool,
    ) -> Result<Self, Error> {
        if entry.kind != EntryKind::Optimizer {
            return Err(Error(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let mut vars: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(n, t)| t.requires_grad() && select(n, t)).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars.into_iter().map(|(name, var)| Slot { name, var, step: 0, states: None }).collect();
        Ok(DslOptimizer { entry, groups: vec![Group { hparams, slots }], max_grad_norm: None, skip_nonfinite: true })
    }

    /// Move the parameters whose VarStore name satisfies `select` into a new group whose
    /// hyper-parameters are the first group's with `overrides` applied. Returns how many moved.
    /// The usual use: `split_group(|n| n.ends_with("bias") || n.contains("norm"), &[("weight_decay".into(), 0.0)])`.
    pub fn split_group(&mut self, select: impl Fn(&str) -> bool, overrides: &[(String, f64)]) -> Result<usize, Error> {
        let mut hparams = self.groups[0].hparams.clone();
        for (name, v) in overrides {
            normforge_dsl::hyper::set(&self.entry, &mut hparams, name, *v)?;
        }
        let mut moved = Vec::new();
        for g in &mut self.groups {
            let (take, keep): (Vec<Slot>, Vec<Slot>) = g.slots.drain(..).partition(|s| select(&s.name));
            g.slots = keep;
            moved.extend(take);
        }
        let n = moved.len();
        self.groups.push(Group { hparams, slots: moved });
        Ok(n)
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    fn hparam_index(&self, name: &str) -> Result<usize, Error> {
        Ok(normforge_dsl::hyper::index(&self.entry, name)?)
    }

    /// Set a hyper-parameter in every group. Values are run-time scalars: nothing recompiles.
    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        let i = self.hparam_index(name)?;
        let v = normforge_dsl::hyper::check_value(&self.entry, i, v)?;
        for g in &mut self.groups {
            g.hparams[i] = v;
        }
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        self.set_hparam("lr", lr)
    }

    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for s in &mut g.slots {
                zero_grad_in_place(&s.var);
            }
        }
    }

    /// `zero_grad`, `loss.backward()`, `step`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport, Error> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }

    pub fn step(&mut self) -> Result<StepReport, Error> {
        // Gradients, checked against their parameters.
        let mut grads: Vec<Vec<Option<Tensor>>> = Vec::new();
        for g in &self.groups {
            let mut v = Vec::new();
            for s in &g.slots {
                let grad = s.var.grad();
                if !grad.defined() {
                    v.push(None);
                    continue;
                }
                if grad.size() != s.var.size() || grad.kind() != s.var.kind() {
                    return Err(Error(format!(
                        "the gradient of `{}` is {:?} {:?}, the parameter {:?} {:?}",
                        s.name,
                        grad.kind(),
                        grad.size(),
                        s.var.kind(),
                        s.var.size()
                    )));
                }
                v.push(Some(grad));
            }
            grads.push(v);
        }
        // Each check's values read back together: one wait for a GPU per step, not one per
        // tensor.
        let present: Vec<(&str, &Tensor)> =
            self.groups.iter().zip(&grads).flat_map(|(g, gs)| g.slots.iter().zip(gs).filter_map(|(s, grad)| grad.as_ref().map(|t| (s.name.as_str(), t)))).collect();
        // Each gradient's norm, in one read of it: non-finite exactly where a value is, so it
        // serves the check and the clipping both (no mask the size of the gradient).
        let grad_norms = if self.skip_nonfinite || self.max_grad_norm.is_some() { norms(present.iter().map(|(_, t)| *t)) } else { Vec::new() };
        if self.skip_nonfinite {
            if let Some(k) = grad_norms.iter().position(|n| !n.is_finite()) {
                return Ok(StepReport::SkippedNonFinite { param: present[k].0.to_string() });
            }
        }
        let (scale, grad_norm) = match self.max_grad_norm {
            None => (None, None),
            Some(max) => {
                let norm = grad_norms.iter().map(|n| n * n).sum::<f64>().sqrt();
                // As torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6) when above max.
                let coef = max / (norm + 1e-6);
                (if coef < 1.0 { Some(coef) } else { None }, Some(norm))
            }
        };
        // Compute every update before writing any.
        let mut updates: Vec<(usize, usize, Tensor, Vec<Tensor>)> = Vec::new();
        for (gi, (g, gs)) in self.groups.iter().zip(&grads).enumerate() {
            for (si, (s, grad)) in g.slots.iter().zip(gs).enumerate() {
                let Some(grad) = grad else { continue };
                let grad = match scale {
                    Some(c) => grad * c,
                    None => grad.shallow_clone(),
                };
                let (p, states) = lowered_step(&self.entry, &g.hparams, s.step + 1, &s.var, &grad, s.states.as_deref(), &s.name)?;
                updates.push((gi, si, p, states));
            }
        }
        for (gi, si, p, states) in updates {
            let s = &mut self.groups[gi].slots[si];
            tch::no_grad(|| s.var.f_copy_(&p))?;
            s.states = Some(states);
            s.step += 1;
        }
        Ok(StepReport::Applied { grad_norm, clipped: scale.is_some() })
    }

    /// Save the state (every state tensor and step count, dtypes kept) as safetensors
    /// (`state_file`: `FusedOptimizer` reads it too).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let slots = self.groups.iter().flat_map(|g| &g.slots);
        let saved = slots.filter_map(|s| {
            let states = s.states.as_ref()?.iter().map(Tensor::shallow_clone).collect();
            Some((s.name.as_str(), Saved { step: s.step, states }))
        });
        state_file::write(path, &self.entry, saved.collect())
    }

    /// Load a state saved by [`DslOptimizer::save`] (or `FusedOptimizer::save`) for the same
    /// parameters. All or nothing.
    pub fn load(&mut self, path: &Path) -> Result<(), Error> {
        let expected = self.groups.iter().flat_map(|g| g.slots.iter().map(|s| Expected::of(&self.entry, &s.name, &s.var, &g.hparams)));
        let mut saved = state_file::read(path, &self.entry, &expected.collect::<Result<Vec<_>, _>>()?)?;
        for s in self.groups.iter_mut().flat_map(|g| &mut g.slots) {
            if let Some(v) = saved.remove(&s.name) {
                s.step = v.step;
                s.states = Some(v.states.iter().map(|t| t.to_device(s.var.device())).collect());
            }
        }
        Ok(())
    }

    /// The parameters this optimizer updates, by VarStore name.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        self.groups.iter().flat_map(|g| &g.slots).map(|s| (s.name.clone(), s.var.shallow_clone())).collect()
    }

    /// The step count and state of parameter `name`, if it has taken a step.
    pub fn state_of(&self, name: &str) -> Option<(i64, &[Tensor])> {
        self.groups.iter().flat_map(|g| &g.slots).find(|s| s.name == name).and_then(|s| s.states.as_deref().map(|st| (s.step, st)))
    }
}

/// Step `step` (from 1) of update rule `entry` for one parameter `p` in libtorch operations:
/// its new value and new states, the states initialised from `p` first where there are none
/// yet. `name` is for messages. The CUDA path runs this on its own tensors where its kernels
/// cannot index a rule's products (Muon on large matrices).
pub fn lowered_step(entry: &Entry, hparams: &[f64], step: i64, p: &Tensor, grad: &Tensor, states: Option<&[Tensor]>, name: &str) -> Result<(Tensor, Vec<Tensor>), Error> {
    let Programs::Optimizer { step: prog } = &entry.programs else {
        return Err(Error(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
    };
    tch::no_grad(|| {
        let shape: Vec<usize> = p.size().iter().map(|&d| d as usize).collect();
        let view = bind::param_view(entry, &shape);
        let binding = bind::bind_axes(&entry.axes, &view, &format!("`{name}`")).map_err(Error)?;
        let kind = float_kind(p.kind());
        let low = Lowering::new(&[prog, &entry.init], &binding, hparams, step as f64, kind, p.device())?;
        // Each state in the parameter's kind, copied where it may view a leaf (`kept`).
        let outputs = |prog: &Program, vals: &Values| -> Result<Vec<Option<Tensor>>, Error> {
            let each = entry.states.iter().enumerate().map(|(k, d)| {
                let target = Target::State(k as u32);
                let Some(node) = prog.output(target) else { return Ok(None) };
                Ok(Some(kept(low.output(prog, vals, target, &d.shape)?.to_kind(p.kind()), prog, node)))
            });
            each.collect()
        };
        let states: Vec<Tensor> = match states {
            Some(st) => st.iter().map(Tensor::shallow_clone).collect(),
            None => {
                let vals = low.run(&entry.init, &Leaves { input: Some(p), ..Leaves::default() })?;
                let init = outputs(&entry.init, &vals)?.into_iter().zip(&entry.states);
                init.map(|(t, d)| t.ok_or_else(|| Error(format!("`{}` does not initialise state `{}`", entry.name, d.name)))).collect::<Result<_, _>>()?
            }
        };
        let leaves = Leaves { input: Some(p), grad: Some(grad), states: &states, ..Leaves::default() };
        let vals = low.run(prog, &leaves)?;
        let new_p = low.output(prog, &vals, Target::P, &entry.input_shape())?.reshape(p.size()).to_kind(p.kind());
        let new_states = outputs(prog, &vals)?.into_iter().zip(states).map(|(new, old)| new.unwrap_or(old)).collect();
        Ok((new_p, new_states))
    })
}

/// A state tensor to keep until the next step: a copy where it may view the gradient (zeroed
/// before the next backward) or the parameter (overwritten by this step), as Adan's and
/// DiffGrad's previous gradient would.
fn kept(t: Tensor, prog: &Program, node: u32) -> Tensor {
    if crate::lower::may_alias_leaf(prog, node) {
        t.copy()
    } else {
        t
    }
}

/// `var`'s gradient, where it has one, set to zero where it is. `Tensor::zero_grad` detaches
/// it in place first, which libtorch refuses for a gradient that is a view — of a fused
/// optimizer's flat buffer, which an optimizer made later over the same variables (resuming a
/// saved state) finds there.
pub fn zero_grad_in_place(var: &Tensor) {
    let grad = var.grad();
    if grad.defined() {
        tch::no_grad(|| _ = grad.shallow_clone().zero_());
    }
}

/// Scalar tensors (f64, on any devices), read back to the host at once — a GPU waited for
/// once, not once per value (values on the CPU join the others' device): NaN for a value that
/// cannot be read.
pub fn gathered(values: impl Iterator<Item = Tensor>) -> Vec<f64> {
    let values: Vec<Tensor> = values.collect();
    if values.is_empty() {
        return Vec::new();
    }
    let device = values.iter().map(Tensor::device).find(|&d| d != tch::Device::Cpu).unwrap_or(tch::Device::Cpu);
    let host = Tensor::stack(&values.iter().map(|v| v.to_device(device)).collect::<Vec<_>>(), 0).to_device(tch::Device::Cpu);
    Vec::<f64>::try_from(&host).unwrap_or_else(|_| vec![f64::NAN; values.len()])
}

/// Each tensor's 2-norm, read back at once ([`gathered`]): summed in f32 (f64 for f64 values),
/// as `clip_grad_norm_` sums, in one read of each tensor — an f64 norm of f32 values makes
/// libtorch cast the whole tensor first, a copy twice its size. A sum of squares past f32's
/// range comes out infinite though every value is finite: such a tensor is summed again in f64
/// (no square of a finite f32 overflows an f64), so only a NaN or an infinity makes a norm
/// non-finite.
pub fn norms<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> Vec<f64> {
    tch::no_grad(|| {
        let tensors: Vec<&Tensor> = tensors.collect();
        // (Flat: `linalg_norm` of a matrix with ord 2 is its largest singular value.)
        let norm = |t: &Tensor, kind: Kind| t.reshape([-1]).linalg_norm(2.0, None::<&[i64]>, false, kind);
        let mut out = gathered(tensors.iter().map(|t| norm(t, crate::float_kind(t.kind())).to_kind(Kind::Double)));
        for (n, t) in out.iter_mut().zip(&tensors) {
            if *n == f64::INFINITY {
                *n = f64::try_from(norm(t, Kind::Double)).unwrap_or(f64::NAN);
            }
        }
        out
    })
}
