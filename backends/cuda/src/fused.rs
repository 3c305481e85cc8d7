//! The fast path behind the user's API: a registry layer whose forward and derived backward
//! run our kernels inside autograd ([`fused_layer`]), and an optimizer with `DslOptimizer`'s
//! options — parameter groups, gradient clipping, skipping a step whose gradients are not
//! finite, saving and loading its state in `DslOptimizer`'s format — whose groups each step
//! through [`CudaOptimizer`] on a flat arena ([`FusedOptimizer`]).

use crate::arena::Arena;
use crate::driver::Gpu;
use crate::layer::CudaLayerKernels;
use crate::optimizer::{CudaOptimizer, RuleState};
use crate::plans::dtype_of;
use normforge_cubecl::{Dtype, Precision};
use std::collections::BTreeMap;
use normforge_dsl::hyper;
use normforge_dsl::ir::{Entry, Kind as EntryKind};
use normforge_tch::state_file::{self, Expected, Saved};
use normforge_tch::{DslLayer, Error, Optimize, StepReport};
use std::path::Path;
use std::sync::Arc;
use tch::{nn, Tensor};

/// `layer` with its forward and backward run by our CUDA kernels, recorded as one custom
/// autograd node (its inputs must be f32, bf16 or f16 tensors on `gpu`).
pub fn fused_layer(layer: DslLayer, gpu: &Arc<Gpu>) -> Result<DslLayer, Error> {
    fused_layer_launched(layer, gpu, normforge_cubecl::Launch::default())
}

/// [`fused_layer`], its kernels launched as `launch` (tuning: the GPU check compares several).
pub fn fused_layer_launched(layer: DslLayer, gpu: &Arc<Gpu>, launch: normforge_cubecl::Launch) -> Result<DslLayer, Error> {
    let kernels = CudaLayerKernels::new(gpu.clone(), layer.entry().clone(), layer.hparams().to_vec())?.with_launch(launch)?;
    Ok(layer.with_kernels(Arc::new(kernels)))
}

/// Parameters of a group stepped together: views into one arena (so of one dtype), one rule
/// instance (so one step count).
struct Part {
    /// Indices into the group's parameters.
    members: Vec<usize>,
    vars: Vec<Tensor>,
    arena: Arena,
    opt: CudaOptimizer,
}

/// Parameters sharing hyper-parameter values. From the first step on, those with a gradient
/// are stepped in parts: the ones that had one by the first step in one part per dtype, any
/// that gets its first later in a part of its own, with its own step count (as `DslOptimizer` keeps one
/// per parameter); the rest (`idle`) wait, unstepped, as `DslOptimizer`'s do. A parameter
/// whose state was loaded waits too (`loaded`: its step count and states), until its first
/// gradient since, and joins a part of the parameters sharing its step count.
struct Group {
    names: Vec<String>,
    vars: Vec<Tensor>,
    hparams: Vec<f64>,
    parts: Vec<Part>,
    idle: Vec<usize>,
    loaded: Vec<(usize, u64, Vec<Tensor>)>,
}

impl Group {
    fn new(names: Vec<String>, vars: Vec<Tensor>, hparams: Vec<f64>) -> Group {
        let idle = (0..vars.len()).collect();
        Group { names, vars, hparams, parts: Vec::new(), idle, loaded: Vec::new() }
    }

    /// Parameter `k`'s dtype (checked when the group was made).
    fn dtype(&self, k: usize) -> Dtype {
        dtype_of(self.vars[k].kind()).expect("checked by `FusedOptimizer::selected`")
    }

    /// The parameters that wait, idle or loaded.
    fn waiting(&self) -> impl Iterator<Item = usize> + '_ {
        self.idle.iter().copied().chain(self.loaded.iter().map(|l| l.0))
    }
}

/// A registry update rule over the trainable variables of a `VarStore` on the GPU, each group's
/// parameters of one dtype (f32, bf16 or f16) updated in one launch per phase (a few for rules
/// through layer kernels), computed in f32, each state kept in its parameter's dtype as
/// torch's optimizers keep it. The first step
/// moves each group's parameters that have a gradient into a flat arena (their values kept,
/// the `VarStore` still naming them) and their gradients into another, where backpropagation
/// then accumulates them; a parameter whose first gradient comes later moves then, into an
/// arena of its own. The groups are fixed from the first step (or load) on.
pub struct FusedOptimizer {
    gpu: Arc<Gpu>,
    entry: Arc<Entry>,
    groups: Vec<Group>,
    started: bool,
    /// Clip the global gradient norm to this value before the update (`clip_grad_norm_`): the
    /// fused kernels read each gradient scaled, leaving the gradients as they are, as
    /// `DslOptimizer` does (a rule through layer kernels scales them in place first).
    pub max_grad_norm: Option<f64>,
    /// Skip a step whose gradients are not all finite (the default).
    pub skip_nonfinite: bool,
}

impl FusedOptimizer {
    /// One group holding every trainable variable of `vs` (in name order), which must be
    /// contiguous f32, bf16 or f16 tensors on `gpu`: checked here, before anything changes.
    pub fn new(gpu: Arc<Gpu>, entry: Arc<Entry>, vs: &nn::VarStore, overrides: &[(String, f64)]) -> Result<Self, Error> {
        Self::selected(gpu, entry, vs, overrides, |_, _| true)
    }

    /// As `DslOptimizer::selected`: one group holding the trainable variables of `vs` that
    /// `select` takes, so that two rules can share a model — Muon for the 2-D weights
    /// (`|_, t| t.dim() == 2`), AdamW for the rest — each moving its own into arenas.
    pub fn selected(gpu: Arc<Gpu>, entry: Arc<Entry>, vs: &nn::VarStore, overrides: &[(String, f64)], select: impl Fn(&str, &Tensor) -> bool) -> Result<Self, Error> {
        if entry.kind != EntryKind::Optimizer {
            return Err(Error(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = hyper::resolve(&entry, overrides)?;
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(n, t)| t.requires_grad() && select(n, t)).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let device = gpu.device();
        if let Some((name, v)) = vars.iter().find(|(_, v)| dtype_of(v.kind()).is_none() || v.device() != device || !v.is_contiguous()) {
            return Err(Error(format!(
                "`{name}` is {:?} on {:?}{}: the fused optimizer takes contiguous f32, bf16 or f16 parameters on {device:?}",
                v.kind(),
                v.device(),
                if v.is_contiguous() { "" } else { ", not contiguous" }
            )));
        }
        let (names, vars) = vars.into_iter().unzip();
        Ok(FusedOptimizer { gpu, entry, groups: vec![Group::new(names, vars, hparams)], started: false, max_grad_norm: None, skip_nonfinite: true })
    }

    /// As `DslOptimizer::split_group`: the parameters whose name `select` takes move to a new
    /// group with the first group's hyper-parameters and `overrides`. Before the first step or load.
    pub fn split_group(&mut self, select: impl Fn(&str) -> bool, overrides: &[(String, f64)]) -> Result<usize, Error> {
        if self.started {
            return Err(Error("parameter groups are fixed once the optimizer has stepped or loaded a state".into()));
        }
        let mut hparams = self.groups[0].hparams.clone();
        for (name, v) in overrides {
            hyper::set(&self.entry, &mut hparams, name, *v)?;
        }
        let (mut names, mut vars) = (Vec::new(), Vec::new());
        for g in &mut self.groups {
            let group = std::mem::take(&mut g.names).into_iter().zip(std::mem::take(&mut g.vars));
            for (name, var) in group {
                let (to_names, to_vars) = if select(&name) { (&mut names, &mut vars) } else { (&mut g.names, &mut g.vars) };
                to_names.push(name);
                to_vars.push(var);
            }
        }
        self.groups.iter_mut().for_each(|g| g.idle = (0..g.vars.len()).collect());
        let n = names.len();
        self.groups.push(Group::new(names, vars, hparams));
        Ok(n)
    }

    /// Each group's parameter names.
    pub fn groups(&self) -> Vec<&[String]> {
        self.groups.iter().map(|g| g.names.as_slice()).collect()
    }

    /// Set a hyper-parameter in every group: a run-time scalar, nothing recompiles.
    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        // (Every group takes the same values: the first refuses a bad one before any changes.)
        for g in &mut self.groups {
            hyper::set(&self.entry, &mut g.hparams, name, v)?;
            for part in &mut g.parts {
                part.opt.hparams.clone_from(&g.hparams);
            }
        }
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        self.set_hparam("lr", lr)
    }

    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            g.parts.iter_mut().for_each(|part| part.arena.zero_grad());
            let waiting: Vec<usize> = g.waiting().collect();
            for k in waiting {
                normforge_tch::optimizer::zero_grad_in_place(&g.vars[k]);
            }
        }
    }

    /// `zero_grad`, `loss.backward()`, `step`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport, Error> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }

    /// A rule for a new part of group `g` whose parameters are `dtype`, compiled (or found
    /// compiled).
    fn rule(&self, g: &Group, dtype: Dtype) -> Result<CudaOptimizer, Error> {
        let mut opt = CudaOptimizer::new(self.gpu.clone(), self.entry.clone(), &[], Precision::uniform(dtype)).map_err(|e| Error(e.to_string()))?;
        opt.hparams = g.hparams.clone();
        Ok(opt)
    }

    /// Waiting parameters become parts (per part: a group, its parameters, and the state they
    /// take, if loaded), each with a rule and an arena of its own: every rule compiled before
    /// any parameter moves.
    fn add_parts(&mut self, parts: Vec<(usize, Vec<usize>, Option<RuleState>)>) -> Result<(), Error> {
        let rules = parts.iter().map(|(gi, members, _)| self.rule(&self.groups[*gi], self.groups[*gi].dtype(members[0]))).collect::<Result<Vec<_>, _>>()?;
        for ((gi, members, state), mut opt) in parts.into_iter().zip(rules) {
            let g = &mut self.groups[gi];
            let mut vars: Vec<Tensor> = members.iter().map(|&k| g.vars[k].shallow_clone()).collect();
            let arena = Arena::adopt(&mut vars).map_err(|e| Error(e.0))?;
            if let Some(state) = state {
                opt.set_states(&arena, &state).map_err(|e| Error(e.to_string()))?;
            }
            g.idle.retain(|k| !members.contains(k));
            g.loaded.retain(|l| !members.contains(&l.0));
            g.parts.push(Part { members, vars, arena, opt });
        }
        Ok(())
    }

    /// The waiting parameters that now have a gradient join: per group and dtype, the idle
    /// ones in a part, the loaded ones in a part per step count.
    fn activate(&mut self) -> Result<(), Error> {
        let mut parts = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let ready = |k: usize| g.vars[k].grad().defined();
            let mut by_step = BTreeMap::<(u64, Dtype), Vec<_>>::new();
            for (k, step, states) in g.loaded.iter().filter(|l| ready(l.0)) {
                by_step.entry((*step, g.dtype(*k))).or_default().push((*k, states.iter().map(Tensor::shallow_clone).collect()));
            }
            for ((step, _), each) in by_step {
                let (members, tensors) = each.into_iter().unzip();
                parts.push((gi, members, Some(RuleState { step, tensors })));
            }
            let mut fresh: BTreeMap<Dtype, Vec<usize>> = Default::default();
            for k in g.idle.iter().copied().filter(|&k| ready(k)) {
                fresh.entry(g.dtype(k)).or_default().push(k);
            }
            parts.extend(fresh.into_values().map(|members| (gi, members, None)));
        }
        self.add_parts(parts)?;
        self.started = true;
        Ok(())
    }

    pub fn step(&mut self) -> Result<StepReport, Error> {
        self.activate()?;
        let parts = || self.groups.iter().flat_map(|g| g.parts.iter().map(move |part| (g, part)));
        for (g, part) in parts() {
            if let Some(k) = part.arena.moved(&part.vars) {
                return Err(Error(format!(
                    "`{}` no longer lives in this optimizer's flat buffers (another fused optimizer took it, its data was replaced, or its gradient set to none): nothing was updated",
                    g.names[part.members[k]]
                )));
            }
        }
        // One pass over each part's gradients serves both checks, every part's norm read back
        // at once (`Arena::grad_norms`).
        let (mut grad_scale, mut grad_norm) = (1.0, None);
        if self.skip_nonfinite || self.max_grad_norm.is_some() {
            let norms = Arena::grad_norms(&parts().map(|(_, part)| &part.arena).collect::<Vec<_>>());
            let mut sq = 0f64;
            for ((g, part), norm) in parts().zip(norms) {
                if self.skip_nonfinite && !norm.is_finite() {
                    let at = part.arena.nonfinite_grad();
                    return Ok(StepReport::SkippedNonFinite { param: at.map_or_else(|| "a parameter".into(), |k| g.names[part.members[k]].clone()) });
                }
                sq += norm * norm;
            }
            if let Some(max) = self.max_grad_norm {
                // As torch.nn.utils.clip_grad_norm_ (the padding between tensors is zero).
                let norm = sq.sqrt();
                // The step kernels scale each gradient where they load it (`step_scaled`).
                let coef = max / (norm + 1e-6);
                if coef < 1.0 {
                    grad_scale = coef;
                }
                grad_norm = Some(norm);
            }
        }
        for part in self.groups.iter_mut().flat_map(|g| &mut g.parts) {
            part.opt.step_scaled(&part.arena, grad_scale).map_err(|e| Error(e.to_string()))?;
        }
        Ok(StepReport::Applied { grad_norm, clipped: grad_scale != 1.0 })
    }

    /// Save every part's state and step count, and the loaded states still waiting, in
    /// `DslOptimizer`'s format (`state_file`), so either optimizer resumes from it (a parameter
    /// not yet stepped has none).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut saved = Vec::new();
        for g in &self.groups {
            for part in &g.parts {
                let Some(RuleState { step, tensors }) = part.opt.states(&part.arena).map_err(|e| Error(e.to_string()))? else { continue };
                for (&k, states) in part.members.iter().zip(tensors) {
                    // In the parameter's kind, as `DslOptimizer` saves them (the values are the
                    // ones that kind holds: the states were stored in it).
                    let states = states.iter().map(|t| t.to_kind(g.vars[k].kind())).collect();
                    saved.push((g.names[k].as_str(), Saved { step: step as i64, states }));
                }
            }
            for (k, step, states) in &g.loaded {
                saved.push((g.names[*k].as_str(), Saved { step: *step as i64, states: states.iter().map(Tensor::shallow_clone).collect() }));
            }
        }
        state_file::write(path, &self.entry, saved)
    }

    /// Load a state saved by [`FusedOptimizer::save`] or `DslOptimizer::save` for the same
    /// parameters, before the first step: each saved parameter waits with its state for its
    /// first gradient, then joins the parameters of its group that share its step count; one
    /// the file does not name waits as a fresh one does. All or nothing: the file is checked
    /// whole before anything changes; the groups are then fixed.
    pub fn load(&mut self, path: &Path) -> Result<(), Error> {
        if self.started {
            return Err(Error("a fused optimizer loads a state before its first step (make a fresh one)".into()));
        }
        let expected = self.groups.iter().flat_map(|g| g.names.iter().zip(&g.vars).map(|(name, v)| Expected::of(&self.entry, name, v, &g.hparams)));
        let mut saved = state_file::read(path, &self.entry, &expected.collect::<Result<Vec<_>, _>>()?)?;
        for g in &mut self.groups {
            for (k, name) in g.names.iter().enumerate() {
                if let Some(s) = saved.remove(name) {
                    g.loaded.push((k, s.step as u64, s.states));
                }
            }
            let loaded: Vec<usize> = g.loaded.iter().map(|l| l.0).collect();
            g.idle.retain(|k| !loaded.contains(k));
        }
        self.started = true;
        Ok(())
    }
}

impl Optimize for FusedOptimizer {
    fn zero_grad(&mut self) {
        FusedOptimizer::zero_grad(self)
    }
    fn step(&mut self) -> Result<StepReport, Error> {
        FusedOptimizer::step(self)
    }
    fn split_group(&mut self, select: &dyn Fn(&str) -> bool, overrides: &[(String, f64)]) -> Result<usize, Error> {
        FusedOptimizer::split_group(self, select, overrides)
    }
    fn clip_grad_norm(&mut self, max: Option<f64>) {
        self.max_grad_norm = max;
    }
    fn save(&self, path: &Path) -> Result<(), Error> {
        FusedOptimizer::save(self, path)
    }
    fn load(&mut self, path: &Path) -> Result<(), Error> {
        FusedOptimizer::load(self, path)
    }
    fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        FusedOptimizer::set_hparam(self, name, v)
    }
}
