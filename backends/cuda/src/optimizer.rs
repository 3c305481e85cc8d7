//! An update rule on tch's CUDA tensors: the CubeCL step kernels (every tensor in one launch per
//! phase, per-tensor reductions as partial reduce + combine), compiled by NVRTC, launched on the
//! flat arena's device pointers on torch's current stream. Hyper-parameters and the step count
//! travel in a small scalar buffer (copied from pinned memory, queued on the stream, so a step
//! never waits for the last), so changing them never recompiles. Rules the step kernels
//! cannot fuse (per-axis reductions: AdamP, SGDP; matrix products: Muon) run a stack of
//! same-shaped tensors at a time
//! through the layer kernels of their plans (`plans`), as on the CubeCL runtime.

use crate::arena::Arena;
use crate::driver::{self, Gpu, Kernel};
use crate::parallel::each_in_parallel;
use crate::plans::{kind_of, pick, PlanKernels};
use crate::upload::{self, upload, words};
use normforge_cubecl::emit::{self, Lang};
use normforge_cubecl::kernel::{StepLayout, StepSizes, BLOCK, COMBINE_BLOCK};
use normforge_cubecl::{compile, compile_for, stacks, Compiled, Precision, Source, Stacked};
use normforge_cubecl::{indexable, Layout, Plan};
use normforge_dsl::bind::{self, AxisBinding};
use normforge_dsl::ir::{Entry, Kind as EntryKind, Programs, Target};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Rule(String),
    #[error(transparent)]
    Driver(#[from] driver::Error),
}

impl From<normforge_dsl::Error> for Error {
    fn from(e: normforge_dsl::Error) -> Self {
        Error::Rule(e.0)
    }
}

/// A rule's state after `step` steps: per tensor, a value per declared state.
pub struct RuleState {
    pub step: u64,
    pub tensors: Vec<Vec<Tensor>>,
}

/// A stack of same-shaped neighbours of the arena (`tensors`), bound and laid out — or, where
/// the kernels' 32-bit tables cannot index its products (`indexable`: Muon on 1024 x 4096), not
/// laid out: each of its tensors then steps in libtorch's operations (`lowered_step`, whose
/// matrix products are cuBLAS's), on the same stream.
struct Stack {
    tensors: Range<usize>,
    binding: AxisBinding,
    layout: Option<Layout>,
}

/// What a stack keeps between steps.
enum Kept {
    /// Its work arena, which holds its states.
    Work(Tensor),
    /// Per tensor, its states (`None` before its first step).
    Lowered(Vec<Option<Vec<Tensor>>>),
}

impl Kept {
    /// Storage for `stack`, its states not yet computed.
    fn new(stack: &Stack, device: Device) -> Kept {
        match &stack.layout {
            Some(lay) => Kept::Work(Tensor::zeros([lay.work_len.max(1) as i64], (Kind::Float, device))),
            None => Kept::Lowered(stack.tensors.clone().map(|_| None).collect()),
        }
    }
}

/// Whether what was kept since the first step still serves these stacks.
fn fits(kept: &[Kept], stacks: &[Stack]) -> bool {
    kept.len() == stacks.len()
        && kept.iter().zip(stacks).all(|(k, s)| match (k, &s.layout) {
            (Kept::Work(w), Some(lay)) => w.numel() >= lay.work_len,
            (Kept::Lowered(each), None) => each.len() == s.tensors.len(),
            _ => false,
        })
}

/// A phase's kernel and, when it reduces, the combine that folds its partials (the phase's
/// program is its `Compiled`'s, at the same index).
struct Phase {
    step: Kernel,
    combine: Option<Kernel>,
}

/// A fused rule's programs reading every gradient times the scalar buffer's last entry
/// ([`Compiled::grad_scaled`]), and their kernels: the same launches, sizes and buffers.
struct Scaled {
    step_prog: Compiled,
    init_prog: Compiled,
    steps: Vec<Phase>,
    inits: Vec<Phase>,
}

/// A fused rule's buffers for one arena, on the arena's device: the states, the reductions'
/// partials, and each phase's `info_st`. What every step on that arena launches with — on the
/// GPU here, on the CPU in the tests that run the same CUDA C++ on the host.
pub struct Bound {
    state: Tensor,
    partial: Tensor,
    /// `info_st` of each phase's kernels (step, combine).
    infos: Vec<(Tensor, Option<Tensor>)>,
    init_infos: Vec<(Tensor, Option<Tensor>)>,
}

/// One launch of a fused step: phase `phase`'s step kernel or (`combine`) the kernel folding
/// its partials, over `grid` cubes of `units` units, given `buffers` (device pointers, in the
/// kernel's parameter order) and `info` (its `info_st`).
pub struct StepLaunch {
    pub phase: usize,
    pub combine: bool,
    pub grid: (u32, u32, u32),
    pub units: u32,
    pub buffers: Vec<u64>,
    pub info: u64,
}

impl Bound {
    /// The buffers for `arena` (states zeroed, stored as `types.state`), for the phases of
    /// `step_prog` and of `init_prog`.
    pub fn new(entry: &Entry, hparams: &[f64], types: Precision, arena: &Arena, step_prog: &Compiled, init_prog: &Compiled) -> Bound {
        let slots = entry.states.len().max(1);
        let n = arena.len();
        let r = step_prog.slots().max(1).max(init_prog.slots().max(1));
        let state = Tensor::zeros([(slots * n) as i64], (kind_of(types.state), arena.device));
        let partial = Tensor::zeros([(arena.cubes.max(1) * r) as i64], (Kind::Float, arena.device));
        let infos = |prog: &Compiled| -> Vec<(Tensor, Option<Tensor>)> {
            prog.phases
                .iter()
                .map(|ph| {
                    let sizes = StepSizes { n, slots, scalars: prog.scalars(hparams, 0.0, 1.0).len(), cubes: arena.cubes, tensors: arena.sizes.len(), results: ph.slots };
                    // (A phase that reduces has a combine: `phases`.)
                    let combine = (!ph.accums.is_empty()).then(|| upload(&driver::info(&sizes.combine()), arena.device));
                    (upload(&driver::info(&sizes.step(ph.lanes)), arena.device), combine)
                })
                .collect()
        };
        Bound { state, partial, infos: infos(step_prog), init_infos: infos(init_prog) }
    }

    /// The launches of one step of `prog` at step `t` (or of its state initialiser, `init`),
    /// each gradient read times `grad_scale`, in order; and the buffer of the step's scalars
    /// and host values they read, to keep until they have run.
    #[allow(clippy::too_many_arguments)]
    pub fn launches(&self, entry: &Entry, hparams: &[f64], prog: &Compiled, init: bool, arena: &Arena, t: f64, grad_scale: f64) -> Result<(upload::Packed, Vec<StepLaunch>), Error> {
        // This step's scalars and the per-tensor values known on the host: one copy, queued.
        let scalars = prog.scalars(hparams, t, grad_scale);
        let values = upload::pack(&[&words(&scalars), &words(&prog.host_values(entry, hparams, &arena.shapes)?)], arena.device);
        let (scalars, red) = (values.ptr(0), values.ptr(1));
        let ptr = |t: &Tensor| t.data_ptr() as u64;
        let infos = if init { &self.init_infos } else { &self.infos };
        let mut out = Vec::new();
        for (phase, (ph, (info, cinfo))) in prog.phases.iter().zip(infos).enumerate() {
            let buffers = vec![ptr(&arena.p), ptr(&arena.g), ptr(&self.state), scalars, ptr(&arena.blocks), ptr(&self.partial), red];
            out.push(StepLaunch { phase, combine: false, grid: (ph.cubes(arena.cubes) as u32, 1, 1), units: BLOCK as u32, buffers, info: ptr(info) });
            if let Some(ci) = cinfo {
                let grid = (arena.sizes.len().div_ceil(COMBINE_BLOCK as usize) as u32, 1, 1);
                let buffers = vec![ptr(&self.partial), ptr(&arena.ranges), red];
                out.push(StepLaunch { phase, combine: true, grid, units: COMBINE_BLOCK, buffers, info: ptr(ci) });
            }
        }
        Ok((values, out))
    }
}

pub struct CudaOptimizer {
    gpu: Arc<Gpu>,
    entry: Arc<Entry>,
    pub hparams: Vec<f64>,
    path: Path,
    /// What the parameters (the arena) and the states are stored in.
    types: Precision,
    step: u64,
    /// Compile (or cache) and load time of every kernel, at construction.
    pub prepared_in: Duration,
}

// (One per optimizer, made once: its size costs nothing.)
#[allow(clippy::large_enum_variant)]
enum Path {
    /// Every tensor in one launch per phase; `scaled`, the same reading the gradients scaled,
    /// compiled at the first step that scales them.
    Fused { step_prog: Compiled, init_prog: Compiled, steps: Vec<Phase>, inits: Vec<Phase>, bound: Option<Bound>, scaled: Option<Box<Scaled>> },
    /// Through the layer kernels, a stack of same-shaped tensors at a time; per stack what it
    /// keeps (its work arena, which holds its states).
    PerTensor { plans: Stacked, kernels: PlanKernels, works: Vec<Kept> },
}

impl CudaOptimizer {
    /// Compile the rule's kernels for `gpu`, for arenas of `types.param` (f32, bf16, f16) and
    /// states kept in `types.state`. A rule through layer kernels reads the parameter and its
    /// gradient in their dtype (the kernels' storage type) and keeps its states and products
    /// in the f32 work arena.
    pub fn new(gpu: Arc<Gpu>, entry: Arc<Entry>, overrides: &[(String, f64)], types: Precision) -> Result<Self, Error> {
        if entry.kind != EntryKind::Optimizer {
            return Err(Error::Rule(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let Programs::Optimizer { step } = &entry.programs else { unreachable!("checked above") };
        let start = std::time::Instant::now();
        let path = match compile_for(&entry, step, types.state) {
            Ok(step_prog) => {
                let init_prog = compile(&entry, &entry.init)?;
                let steps = phases(&gpu, &step_prog, types)?;
                let inits = phases(&gpu, &init_prog, types)?;
                Path::Fused { step_prog, init_prog, steps, inits, bound: None, scaled: None }
            }
            Err(fused) => {
                let plans = Stacked::new(&entry, step).map_err(|e| Error::Rule(format!("`{}` cannot run on the CUDA path: {}; {}", entry.name, fused.0, e.0)))?;
                let kernels = PlanKernels::new(gpu.clone());
                for p in [&plans.step, &plans.init] {
                    kernels.prepare(p, types.param).map_err(|e| Error::Rule(e.0))?;
                }
                Path::PerTensor { plans, kernels, works: Vec::new() }
            }
        };
        Ok(CudaOptimizer { gpu, entry, hparams, path, types, step: 0, prepared_in: start.elapsed() })
    }

    /// The same rule with the step phases that reduce nothing walking the layout as `layout`
    /// says (default [`StepLayout::DEFAULT`]) — tuning, never meaning: the GPU check compares
    /// them. Before the first step.
    pub fn with_layout(mut self, layout: StepLayout) -> Result<Self, Error> {
        let layout = layout.checked().map_err(Error::Rule)?;
        if let Path::Fused { step_prog, init_prog, steps, inits, bound, .. } = &mut self.path {
            if bound.is_some() {
                return Err(Error::Rule("the step layout is chosen before the first step".into()));
            }
            for prog in [&mut *step_prog, &mut *init_prog] {
                prog.phases = prog.phases.drain(..).map(|p| p.laid_out(layout)).collect();
            }
            *steps = phases(&self.gpu, step_prog, self.types)?;
            *inits = phases(&self.gpu, init_prog, self.types)?;
        }
        Ok(self)
    }

    /// Whether every tensor goes through the same launches (false for rules that run through
    /// layer kernels, a stack of same-shaped tensors at a time).
    pub fn fused(&self) -> bool {
        matches!(self.path, Path::Fused { .. })
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        Ok(normforge_dsl::hyper::set(&self.entry, &mut self.hparams, name, v)?)
    }

    /// Kernel launches per step; per stack of same-shaped tensors for a rule that runs through
    /// layer kernels.
    pub fn launches_per_step(&self) -> usize {
        match &self.path {
            Path::Fused { steps, .. } => steps.iter().map(|p| 1 + p.combine.is_some() as usize).sum(),
            Path::PerTensor { plans, .. } => plans.step.kernels.len(),
        }
    }

    /// One step over every tensor of `arena` (its gradients as backpropagation left them):
    /// launches only, on torch's current stream. The first step binds the state to this
    /// arena's layout; later arenas must have the same sizes.
    pub fn step(&mut self, arena: &Arena) -> Result<(), Error> {
        self.step_scaled(arena, 1.0)
    }

    /// [`Self::step`] with every gradient read as `grad_scale` times its value (a clipped step):
    /// the fused kernels scale each where they load it (compiled at the first such step), so
    /// the gradients are left as they are; a rule through layer kernels has its stack's
    /// gradients scaled in place first.
    pub fn step_scaled(&mut self, arena: &Arena, grad_scale: f64) -> Result<(), Error> {
        if arena.is_empty() {
            return Ok(());
        }
        self.check_arena(arena)?;
        let stream = self.gpu.stream()?;
        if !self.fused() {
            if grad_scale != 1.0 {
                arena.scale_grads(grad_scale);
            }
            return self.step_per_tensor(arena);
        }
        if let Path::Fused { step_prog, init_prog, scaled: scaled @ None, .. } = &mut self.path {
            if grad_scale != 1.0 {
                let (step_prog, init_prog) = (step_prog.grad_scaled(), init_prog.grad_scaled());
                let (steps, inits) = (phases(&self.gpu, &step_prog, self.types)?, phases(&self.gpu, &init_prog, self.types)?);
                *scaled = Some(Box::new(Scaled { step_prog, init_prog, steps, inits }));
            }
        }
        let Path::Fused { step_prog, init_prog, bound, .. } = &self.path else { unreachable!("fused") };
        if bound.is_none() {
            let b = Bound::new(&self.entry, &self.hparams, self.types, arena, step_prog, init_prog);
            if let Path::Fused { bound, .. } = &mut self.path {
                *bound = Some(b);
            }
        }
        let Path::Fused { step_prog, init_prog, steps, inits, bound: Some(b), scaled } = &self.path else { unreachable!("bound above") };
        let (step_prog, init_prog, steps, inits) = match scaled {
            Some(s) if grad_scale != 1.0 => (&s.step_prog, &s.init_prog, &s.steps, &s.inits),
            _ => (step_prog, init_prog, steps, inits),
        };
        // (A state taken with `set_states` is not initialised again.)
        if self.step == 0 {
            self.run(b, init_prog, inits, true, arena, stream, 0.0, grad_scale)?;
        }
        let t = self.step + 1;
        self.run(b, step_prog, steps, false, arena, stream, t as f64, grad_scale)?;
        self.step = t;
        Ok(())
    }

    /// Whether `arena` is on this optimizer's GPU and of the parameters' dtype it compiled for.
    fn check_arena(&self, arena: &Arena) -> Result<(), Error> {
        if arena.device != self.gpu.device() {
            return Err(Error::Rule(format!("the parameters are on {:?}, this optimizer runs on {:?}", arena.device, self.gpu.device())));
        }
        if arena.dtype() != self.types.param {
            return Err(Error::Rule(format!("the parameters are {:?}, this optimizer was compiled for {:?} parameters", arena.dtype(), self.types.param)));
        }
        // The fused kernels read and write whole vectors of up to 16 bytes (a fresh arena's
        // buffers are torch allocations, far more aligned); a misaligned access would fault the
        // context, not just this step.
        if [&arena.p, &arena.g].iter().any(|t| !(t.data_ptr() as usize).is_multiple_of(16)) {
            return Err(Error::Rule("the arena's buffers are not 16-byte aligned".into()));
        }
        Ok(())
    }

    /// Each stack of same-shaped neighbours in `arena` (read in place as one tensor), bound and
    /// laid out with its states where the step after `steps` reads them; and whether the layout
    /// swaps them from step to step (`Layout::swap_states`). Every binding checked.
    fn laid_stacks(&self, arena: &Arena, steps: u64) -> Result<(Vec<Stack>, bool), Error> {
        let Path::PerTensor { plans, kernels, .. } = &self.path else { unreachable!("per tensor") };
        let t = steps as f64 + 1.0;
        let mut out = Vec::new();
        for r in stacks(&arena.shapes, |k| arena.joins(k)) {
            let shape = bind::param_view(&self.entry, &arena.shapes[r.start]);
            let b = plans.bind(r.len(), &shape, &self.hparams, &format!("parameters {}..{}", r.start, r.end))?;
            let layout = match indexable(&plans.step, &b, &self.hparams)? {
                true => Some(kernels.layout(&plans.step, &b, &self.hparams, t, self.types.param).map_err(rule)?),
                false => None,
            };
            out.push(Stack { tensors: r, binding: b, layout });
        }
        let swaps = out.iter().find_map(|s| s.layout.as_ref()).is_some_and(|lay| lay.clone().swap_states(&plans.step));
        if swaps && steps % 2 == 1 {
            out.iter_mut().filter_map(|s| s.layout.as_mut()).for_each(|lay| _ = lay.swap_states(&plans.step));
        }
        Ok((out, swaps))
    }

    /// A rule that runs through layer kernels, a stack of same-shaped neighbours at a time
    /// (read in place from the arena): every binding is checked before anything runs. Each
    /// stack keeps its work arena between steps and its states in it, read on alternate steps
    /// from where the last step wrote them (`Layout::swap_states`), so no state is copied; the
    /// first step computes them.
    fn step_per_tensor(&mut self, arena: &Arena) -> Result<(), Error> {
        let (laid, swaps) = self.laid_stacks(arena, self.step)?;
        let (t, hparams, entry, state_kind, io) = (self.step + 1, &self.hparams, &self.entry, kind_of(self.types.state), self.types.param);
        let Path::PerTensor { plans, kernels, works } = &mut self.path else { unreachable!("per tensor") };
        if !works.is_empty() && !fits(works, &laid) {
            return Err(Error::Rule("the parameters changed since the first step".into()));
        }
        if works.is_empty() {
            for stack in &laid {
                let mut kept = Kept::new(stack, arena.device);
                if let (Kept::Work(work), Some(lay)) = (&mut kept, &stack.layout) {
                    let p = arena.stack(&arena.p, stack.tensors.clone());
                    let out = kernels.run(&plans.init, &stack.binding, hparams, 0.0, io, &|src| (src == Source::Input).then_some(&p)).map_err(rule)?;
                    for (i, slot) in state_slots(&plans.step, entry, lay).into_iter().enumerate() {
                        let Some((off, len)) = slot else { continue };
                        let v = pick(&out, Target::State(i as u32)).map_err(rule)?;
                        tch::no_grad(|| work.narrow(0, off, len).copy_(&v.to_kind(state_kind).to_kind(Kind::Float).reshape([-1])));
                    }
                }
                works.push(kept);
            }
        }
        for (stack, kept) in laid.iter().zip(works.iter_mut()) {
            let (r, lay, work) = match (&stack.layout, kept) {
                (Some(lay), Kept::Work(work)) => (stack.tensors.clone(), lay, work),
                (_, Kept::Lowered(each)) => {
                    for (k, states) in stack.tensors.clone().zip(each.iter_mut()) {
                        let dims: Vec<i64> = arena.shapes[k].iter().map(|&d| d as i64).collect();
                        let (p, g) = (arena.tensor(&arena.p, k).view(dims.as_slice()), arena.tensor(&arena.g, k).view(dims.as_slice()));
                        // In f32 whatever the parameters' dtype, as the kernels compute (a
                        // narrower state would otherwise be kept in the parameter's; no copy of
                        // an f32 parameter).
                        let (p32, g32) = (p.to_kind(Kind::Float), g.to_kind(Kind::Float));
                        let (p_new, new) = normforge_tch::optimizer::lowered_step(entry, hparams, t as i64, &p32, &g32, states.as_deref(), &format!("parameter {k}")).map_err(rule)?;
                        tch::no_grad(|| p.shallow_clone().copy_(&p_new));
                        // Kept in the state dtype's values, as the kernels keep them.
                        *states = Some(new.into_iter().map(|v| if state_kind == Kind::Float { v } else { v.to_kind(state_kind).to_kind(Kind::Float) }).collect());
                    }
                    continue;
                }
                _ => unreachable!("fits"),
            };
            let (p, g) = (arena.stack(&arena.p, r.clone()), arena.stack(&arena.g, r.clone()));
            let data = |src: Source| match src {
                Source::Input => Some(&p),
                Source::Grad => Some(&g),
                _ => None,
            };
            let out = kernels.run_laid(&plans.step, lay, io, &data, Some(work)).map_err(rule)?;
            let read_at = state_slots(&plans.step, entry, lay);
            // The stream runs these after the kernels that read p and the state.
            tch::no_grad(|| -> Result<(), Error> {
                // (Nothing to copy where the plan wrote the new parameter over the old one.)
                let p_new = pick(&out, Target::P).map_err(rule)?;
                if p_new.data_ptr() != p.data_ptr() {
                    p.shallow_clone().copy_(&p_new.reshape(p.size()));
                }
                for i in 0..entry.states.len() as u32 {
                    let Ok(v) = pick(&out, Target::State(i)) else { continue };
                    // Kept in the state dtype's values, as the fused kernels store them.
                    if state_kind != Kind::Float {
                        v.shallow_clone().copy_(&v.to_kind(state_kind));
                    }
                    // A rule whose states cannot swap copies them back where they are read.
                    if let (false, Some((off, len))) = (swaps, read_at[i as usize]) {
                        work.narrow(0, off, len).copy_(v);
                    }
                }
                Ok(())
            })?;
        }
        self.step += 1;
        Ok(())
    }

    /// Where each state of each tensor of `arena` is, flat, for the step after `steps` to read:
    /// `None` before the storage exists (and for a state no step reads).
    fn state_views(&self, arena: &Arena, steps: u64) -> Result<Vec<Vec<Option<Tensor>>>, Error> {
        let count = arena.sizes.len();
        let mut views: Vec<Vec<Option<Tensor>>> = (0..count).map(|_| (0..self.entry.states.len()).map(|_| None).collect()).collect();
        match &self.path {
            Path::Fused { bound: Some(b), .. } => {
                let n = arena.len() as i64;
                for (k, v) in views.iter_mut().enumerate() {
                    for (i, slot) in v.iter_mut().enumerate() {
                        *slot = Some(arena.tensor(&b.state.narrow(0, i as i64 * n, n), k));
                    }
                }
            }
            Path::PerTensor { plans, works, .. } if !works.is_empty() => {
                let (laid, _) = self.laid_stacks(arena, steps)?;
                for (stack, kept) in laid.iter().zip(works) {
                    let r = stack.tensors.clone();
                    match (kept, &stack.layout) {
                        (Kept::Work(work), Some(lay)) => {
                            for (i, slot) in state_slots(&plans.step, &self.entry, lay).into_iter().enumerate() {
                                let Some((off, len)) = slot else { continue };
                                let each = len / r.len() as i64;
                                for k in r.clone() {
                                    views[k][i] = Some(work.narrow(0, off + (k - r.start) as i64 * each, each));
                                }
                            }
                        }
                        (Kept::Lowered(each), _) => {
                            for (k, states) in r.zip(each) {
                                for (i, t) in states.iter().flatten().enumerate() {
                                    views[k][i] = Some(t.reshape([-1]));
                                }
                            }
                        }
                        _ => return Err(Error::Rule("the parameters changed since the first step".into())),
                    }
                }
            }
            _ => {}
        }
        Ok(views)
    }

    /// Each state's dims, as `DslOptimizer` holds it, for a parameter of `shape`.
    fn state_dims(&self, shape: &[usize], what: &str) -> Result<Vec<Vec<i64>>, Error> {
        let dims = bind::state_dims(&self.entry, shape, &self.hparams, what).map_err(Error::Rule)?;
        Ok(dims.into_iter().map(|d| d.into_iter().map(|x| x as i64).collect()).collect())
    }

    /// The step count and, per tensor of `arena`, its state values where the next step reads
    /// them — each in its declared shape, as `DslOptimizer` holds it, f32, a copy; `None`
    /// before the first step. (The fused kernels hold a per-tensor value at every element.)
    pub fn states(&self, arena: &Arena) -> Result<Option<RuleState>, Error> {
        if self.step == 0 {
            return Ok(None);
        }
        let views = self.state_views(arena, self.step)?;
        let mut out = Vec::new();
        for (k, v) in views.iter().enumerate() {
            let mut states = Vec::new();
            for ((view, dims), d) in v.iter().zip(self.state_dims(&arena.shapes[k], &format!("parameter {k}"))?).zip(&self.entry.states) {
                let view = view.as_ref().ok_or_else(|| Error::Rule(format!("the CUDA path keeps no value of state `{}` between steps", d.name)))?;
                let numel: i64 = dims.iter().product();
                let held = if numel == view.numel() as i64 { view.shallow_clone() } else { view.narrow(0, 0, 1) };
                states.push(tch::no_grad(|| held.to_kind(Kind::Float).reshape(dims.as_slice()).copy()));
            }
            out.push(states);
        }
        Ok(Some(RuleState { step: self.step, tensors: out }))
    }

    /// Take `state` (per tensor of `arena`, per state, each of its declared shape's element
    /// count) as the state after `state.step` steps (at least one). All or nothing: every
    /// value is checked before anything changes.
    pub fn set_states(&mut self, arena: &Arena, state: &RuleState) -> Result<(), Error> {
        let (step, states) = (state.step, &state.tensors);
        if step == 0 {
            return Err(Error::Rule("a state is taken after one step or more, not 0".into()));
        }
        self.check_arena(arena)?;
        if states.len() != arena.sizes.len() {
            return Err(Error::Rule(format!("{} parameters' states for {} parameters", states.len(), arena.sizes.len())));
        }
        // Each tensor's state dims, kept for the tensors stepped in libtorch's operations.
        let mut all_dims = Vec::new();
        for (k, v) in states.iter().enumerate() {
            let dims = self.state_dims(&arena.shapes[k], &format!("parameter {k}"))?;
            if v.len() != dims.len() {
                return Err(Error::Rule(format!("parameter {k}: {} states, the rule has {}", v.len(), dims.len())));
            }
            for ((t, dims), d) in v.iter().zip(&dims).zip(&self.entry.states) {
                if t.numel() as i64 != dims.iter().product::<i64>() || !t.is_floating_point() {
                    return Err(Error::Rule(format!("parameter {k}: state `{}` is {:?} {:?}, not {dims:?}", d.name, t.kind(), t.size())));
                }
            }
            all_dims.push(dims);
        }
        // Where the states go: bound now for a rule that has not stepped (its first step then
        // skips the initialisation), checked against this arena for one that has.
        let changed = || Error::Rule("the parameters changed since the first step".into());
        let state_kind = kind_of(self.types.state);
        match &self.path {
            Path::Fused { bound: Some(b), .. } => {
                if b.state.numel() != self.entry.states.len().max(1) * arena.len() {
                    return Err(changed());
                }
            }
            Path::Fused { step_prog, init_prog, bound: None, .. } => {
                let b = Bound::new(&self.entry, &self.hparams, self.types, arena, step_prog, init_prog);
                if let Path::Fused { bound, .. } = &mut self.path {
                    *bound = Some(b);
                }
            }
            Path::PerTensor { works, .. } => {
                let (laid, _) = self.laid_stacks(arena, step)?;
                if !works.is_empty() && !fits(works, &laid) {
                    return Err(changed());
                }
                let Path::PerTensor { works, .. } = &mut self.path else { unreachable!("per tensor") };
                if works.is_empty() {
                    *works = laid.iter().map(|s| Kept::new(s, arena.device)).collect();
                }
                // Tensors stepped in libtorch's operations take fresh tensors, filled below.
                for (stack, kept) in laid.iter().zip(works.iter_mut()) {
                    if let Kept::Lowered(each) = kept {
                        for (k, states) in stack.tensors.clone().zip(each) {
                            *states = Some(all_dims[k].iter().map(|d| Tensor::zeros(d.as_slice(), (Kind::Float, arena.device))).collect());
                        }
                    }
                }
            }
        }
        let views = self.state_views(arena, step)?;
        tch::no_grad(|| {
            for (view, t) in views.iter().flatten().zip(states.iter().flatten()) {
                let Some(view) = view else { continue };
                let t = t.to_device(arena.device).to_kind(state_kind).to_kind(view.kind()).reshape([-1]);
                view.shallow_clone().copy_(&t.expand([view.numel() as i64], false));
            }
        });
        self.step = step;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run(&self, b: &Bound, prog: &Compiled, phases: &[Phase], init: bool, arena: &Arena, stream: *mut std::ffi::c_void, t: f64, grad_scale: f64) -> Result<(), Error> {
        // (`_values` holds the buffer they read until they are queued.)
        let (_values, launches) = b.launches(&self.entry, &self.hparams, prog, init, arena, t, grad_scale)?;
        for l in &launches {
            let ph = &phases[l.phase];
            let kernel = match l.combine {
                false => &ph.step,
                true => ph.combine.as_ref().ok_or_else(|| Error::Rule("a reducing phase without its combine".into()))?,
            };
            // SAFETY: every buffer lives on this device until the stream has run the launch
            // (torch's caching allocator reuses freed memory only in stream order); the info
            // gives each buffer's true length; a cube per `blocks_per_cube` entries of `blocks`
            // (whose count it divides: `padded_layout`), or for a combine one unit per tensor.
            unsafe { self.gpu.launch(kernel, l.grid, l.units, &l.buffers, l.info, stream)? };
        }
        Ok(())
    }
}

fn rule(e: normforge_tch::Error) -> Error {
    Error::Rule(e.0)
}

/// Where the step of `plan` reads each state of the rule in `work` as `lay` places it: offset
/// and length (`None`: the step never reads it).
fn state_slots(plan: &Plan, entry: &Entry, lay: &Layout) -> Vec<Option<(i64, i64)>> {
    (0..entry.states.len() as u32)
        .map(|i| plan.tensors.iter().position(|x| x.0 == Source::State(i)))
        .map(|k| k.map(|k| (lay.offsets[k] as i64, lay.len(plan, k) as i64)))
        .collect()
}

/// The kernels of each phase, compiled and loaded.
fn phases(gpu: &Gpu, prog: &Compiled, types: Precision) -> Result<Vec<Phase>, Error> {
    let units = emit::program_units(prog, types, Lang::Cuda)?;
    // Compiled at once; taken below in launch order from the loaded ones.
    each_in_parallel(&units, |u| gpu.kernel(&u.source, u.shared_bytes).map(|_| ()))?;
    let mut units = units.into_iter();
    let mut out = Vec::new();
    for p in &prog.phases {
        let unit = units.next().expect("one unit per phase");
        let step = gpu.kernel(&unit.source, unit.shared_bytes)?;
        let combine = match p.accums.is_empty() {
            true => None,
            false => {
                let unit = units.next().expect("a combine per reducing phase");
                Some(gpu.kernel(&unit.source, unit.shared_bytes)?)
            }
        };
        out.push(Phase { step, combine });
    }
    Ok(out)
}
