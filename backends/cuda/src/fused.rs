//! The fast path behind the user's API: a registry layer whose forward and derived backward
//! run our kernels inside autograd ([`fused_layer`]), and an optimizer with `DslOptimizer`'s
//! options — parameter groups, gradient clipping, skipping a step whose gradients are not
//! finite, saving and loading its state in `DslOptimizer`'s format — whose groups each step
//! through [`CudaOptimizer`] on a flat arena ([`FusedOptimizer`]).

use crate::arena::Arena;
use crate::driver::Gpu;
use crate::layer::CudaLayerKernels;
use crate::optimizer::{CudaOptimizer, RuleState};
use normforge_cubecl::Dtype;
use normforge_dsl::hyper;
use normforge_dsl::ir::{Entry, Kind as EntryKind};
use normforge_tch::state_file::{self, Expected, Saved};
use normforge_tch::{DslLayer, Error, Optimize, StepReport};
use std::path::Path;
use std::sync::Arc;
use tch::{nn, Device, Kind, Tensor};

/// `layer` with its forward and backward run by our CUDA kernels, recorded as one custom
/// autograd node (its inputs must be f32, bf16 or f16 tensors on `gpu`).
pub fn fused_layer(layer: DslLayer, gpu: &Arc<Gpu>) -> Result<DslLayer, Error> {
    let kernels = CudaLayerKernels::new(gpu.clone(), Arc::new(layer.entry().clone()), layer.hparams().to_vec())?;
    Ok(layer.with_kernels(Arc::new(kernels)))
}

/// Parameters sharing hyper-parameter values; from the first step on, in an arena of their
/// own, stepped by a rule of their own.
struct Group {
    names: Vec<String>,
    vars: Vec<Tensor>,
    hparams: Vec<f64>,
    run: Option<(Arena, CudaOptimizer)>,
}

/// A registry update rule over the trainable variables of a `VarStore` on the GPU, each group
/// updated in one launch per phase (a few for rules through layer kernels). The first step
/// moves each group's parameters into a flat arena (their values kept, the `VarStore` still
/// naming them) and their gradients into another, where backpropagation accumulates them; from
/// then on every parameter of a group is stepped each step, a missing gradient counting as
/// zero, and the groups are fixed.
pub struct FusedOptimizer {
    gpu: Arc<Gpu>,
    entry: Arc<Entry>,
    groups: Vec<Group>,
    /// Clip the global gradient norm to this value before the update (`clip_grad_norm_`).
    pub max_grad_norm: Option<f64>,
    /// Skip a step whose gradients are not all finite (the default).
    pub skip_nonfinite: bool,
}

impl FusedOptimizer {
    /// One group holding every trainable variable of `vs` (in name order), which must be
    /// contiguous f32 tensors on `gpu`: checked here, before anything changes.
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
        let device = Device::Cuda(gpu.ordinal());
        if let Some((name, v)) = vars.iter().find(|(_, v)| v.kind() != Kind::Float || v.device() != device || !v.is_contiguous()) {
            return Err(Error(format!(
                "`{name}` is {:?} on {:?}{}: the fused optimizer takes contiguous f32 parameters on {device:?}",
                v.kind(),
                v.device(),
                if v.is_contiguous() { "" } else { ", not contiguous" }
            )));
        }
        let (names, vars) = vars.into_iter().unzip();
        Ok(FusedOptimizer { gpu, entry, groups: vec![Group { names, vars, hparams, run: None }], max_grad_norm: None, skip_nonfinite: true })
    }

    /// As `DslOptimizer::split_group`: the parameters whose name `select` takes move to a new
    /// group with the first group's hyper-parameters and `overrides`. Before the first step or load.
    pub fn split_group(&mut self, select: impl Fn(&str) -> bool, overrides: &[(String, f64)]) -> Result<usize, Error> {
        if self.started() {
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
        let n = names.len();
        self.groups.push(Group { names, vars, hparams, run: None });
        Ok(n)
    }

    /// Each group's parameter names.
    pub fn groups(&self) -> Vec<&[String]> {
        self.groups.iter().map(|g| g.names.as_slice()).collect()
    }

    fn started(&self) -> bool {
        self.groups.iter().any(|g| g.run.is_some())
    }

    /// Set a hyper-parameter in every group: a run-time scalar, nothing recompiles.
    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        // (Every group takes the same values: the first refuses a bad one before any changes.)
        for g in &mut self.groups {
            hyper::set(&self.entry, &mut g.hparams, name, v)?;
            if let Some((_, opt)) = &mut g.run {
                opt.hparams.clone_from(&g.hparams);
            }
        }
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        self.set_hparam("lr", lr)
    }

    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            match &mut g.run {
                Some((arena, _)) => arena.zero_grad(),
                None => g.vars.iter_mut().for_each(Tensor::zero_grad),
            }
        }
    }

    /// `zero_grad`, `loss.backward()`, `step`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport, Error> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }

    /// Compile each group's rule, then move its parameters into their arena: every compile
    /// done before any parameter moves.
    fn start(&mut self) -> Result<(), Error> {
        let mut rules = Vec::new();
        for g in &self.groups {
            let mut opt = CudaOptimizer::new(self.gpu.clone(), self.entry.clone(), &[], Dtype::F32).map_err(|e| Error(e.to_string()))?;
            opt.hparams = g.hparams.clone();
            rules.push(opt);
        }
        for (g, opt) in self.groups.iter_mut().zip(rules) {
            let arena = Arena::adopt(&mut g.vars).map_err(|e| Error(e.0))?;
            g.run = Some((arena, opt));
        }
        Ok(())
    }

    pub fn step(&mut self) -> Result<StepReport, Error> {
        if !self.started() {
            self.start()?;
        }
        for g in &self.groups {
            let Some((arena, _)) = &g.run else { continue };
            if let Some(k) = arena.moved(&g.vars) {
                return Err(Error(format!(
                    "`{}` no longer lives in this optimizer's flat buffers (another fused optimizer took it, its data was replaced, or its gradient set to none): nothing was updated",
                    g.names[k]
                )));
            }
        }
        // One pass over each group's gradients serves both checks, every group's norm read
        // back at once (`Arena::grad_norms`).
        let (mut clipped, mut grad_norm) = (false, None);
        if self.skip_nonfinite || self.max_grad_norm.is_some() {
            let running: Vec<(&Group, &Arena)> = self.groups.iter().filter_map(|g| g.run.as_ref().map(|(arena, _)| (g, arena))).collect();
            let norms = Arena::grad_norms(&running.iter().map(|(_, a)| *a).collect::<Vec<_>>());
            let mut sq = 0f64;
            for ((g, arena), norm) in running.into_iter().zip(norms) {
                if self.skip_nonfinite && !norm.is_finite() {
                    let at = arena.nonfinite_grad();
                    return Ok(StepReport::SkippedNonFinite { param: at.map_or_else(|| "a parameter".into(), |k| g.names[k].clone()) });
                }
                sq += norm * norm;
            }
            if let Some(max) = self.max_grad_norm {
                // As torch.nn.utils.clip_grad_norm_ (the padding between tensors is zero).
                let norm = sq.sqrt();
                let coef = max / (norm + 1e-6);
                if coef < 1.0 {
                    for (arena, _) in self.groups.iter().filter_map(|g| g.run.as_ref()) {
                        arena.scale_grads(coef);
                    }
                    clipped = true;
                }
                grad_norm = Some(norm);
            }
        }
        for g in &mut self.groups {
            if let Some((arena, opt)) = &mut g.run {
                opt.step(arena).map_err(|e| Error(e.to_string()))?;
            }
        }
        Ok(StepReport::Applied { grad_norm, clipped })
    }

    /// Save every group's state and step count in `DslOptimizer`'s format (`state_file`), so
    /// either optimizer resumes from it.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut saved = Vec::new();
        for g in &self.groups {
            let Some((arena, opt)) = &g.run else { continue };
            let Some(RuleState { step, tensors: states }) = opt.states(arena).map_err(|e| Error(e.to_string()))? else { continue };
            for (name, states) in g.names.iter().zip(states) {
                saved.push((name.as_str(), Saved { step: step as i64, states }));
            }
        }
        state_file::write(path, &self.entry, saved)
    }

    /// Load a state saved by [`FusedOptimizer::save`] or `DslOptimizer::save` for the same
    /// parameters: every parameter of a group, at one step count (a group steps them
    /// together), or none. All or nothing: the file is checked whole before anything changes;
    /// before the first step, the groups are then fixed.
    pub fn load(&mut self, path: &Path) -> Result<(), Error> {
        let expected = self.groups.iter().flat_map(|g| g.names.iter().zip(&g.vars).map(|(name, v)| Expected::of(&self.entry, name, v, &g.hparams)));
        let mut saved = state_file::read(path, &self.entry, &expected.collect::<Result<Vec<_>, _>>()?)?;
        let mut per_group = Vec::new();
        for g in &self.groups {
            let found: Vec<Option<Saved>> = g.names.iter().map(|n| saved.remove(n)).collect();
            let Some(Some(first)) = found.iter().find(|s| s.is_some()) else {
                per_group.push(None);
                continue;
            };
            let t = first.step;
            let odd = found.iter().position(|s| s.as_ref().is_none_or(|s| s.step != t)).map(|k| match &found[k] {
                None => format!("no state for `{}`, which shares a group with saved ones", g.names[k]),
                Some(s) => format!("`{}` at step {}, others of its group at step {t}", g.names[k], s.step),
            });
            if let Some(odd) = odd {
                return Err(Error(format!("{}: the parameters of a fused group step together, and the file holds {odd}", path.display())));
            }
            per_group.push(Some(RuleState { step: t as u64, tensors: found.into_iter().flatten().map(|s| s.states).collect() }));
        }
        if !self.started() {
            self.start()?;
        }
        for (g, loaded) in self.groups.iter_mut().zip(per_group) {
            let (Some((arena, opt)), Some(state)) = (&mut g.run, loaded) else { continue };
            opt.set_states(arena, &state).map_err(|e| Error(e.to_string()))?;
        }
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
