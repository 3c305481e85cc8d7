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
use normforge_cubecl::kernel::{KProgram, StepSizes, BLOCK, BLOCKS_PER_CUBE, COMBINE_BLOCK};
use normforge_cubecl::{compile, compile_for, stacks, Compiled, Dtype, Source, Stacked};
use normforge_dsl::bind;
use normforge_dsl::ir::{Entry, Kind as EntryKind, Programs, Target};
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

/// A phase's kernel and, when it reduces, the combine that folds its partials.
struct Phase {
    program: KProgram,
    step: Kernel,
    combine: Option<Kernel>,
}

/// Device buffers and launch metadata for one arena.
struct Bound {
    state: Tensor,
    partial: Tensor,
    /// `info_st` of each phase's kernels (step, combine), on the device.
    infos: Vec<(Tensor, Option<Tensor>)>,
    init_infos: Vec<(Tensor, Option<Tensor>)>,
}

pub struct CudaOptimizer {
    gpu: Arc<Gpu>,
    entry: Arc<Entry>,
    pub hparams: Vec<f64>,
    path: Path,
    state_dtype: Dtype,
    step: u64,
    /// Compile (or cache) and load time of every kernel, at construction.
    pub prepared_in: Duration,
}

// (One per optimizer, made once: its size costs nothing.)
#[allow(clippy::large_enum_variant)]
enum Path {
    /// Every tensor in one launch per phase.
    Fused { step_prog: Compiled, init_prog: Compiled, steps: Vec<Phase>, inits: Vec<Phase>, bound: Option<Bound> },
    /// Through the layer kernels, a stack of same-shaped tensors at a time; per stack its work
    /// arena, which holds its states.
    PerTensor { plans: Stacked, kernels: PlanKernels, works: Vec<Tensor> },
}

impl CudaOptimizer {
    /// Compile the rule's kernels for `gpu` (state kept in `state_dtype`).
    pub fn new(gpu: Arc<Gpu>, entry: Arc<Entry>, overrides: &[(String, f64)], state_dtype: Dtype) -> Result<Self, Error> {
        if entry.kind != EntryKind::Optimizer {
            return Err(Error::Rule(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let Programs::Optimizer { step } = &entry.programs else { unreachable!("checked above") };
        let start = std::time::Instant::now();
        let path = match compile_for(&entry, step, state_dtype) {
            Ok(step_prog) => {
                let init_prog = compile(&entry, &entry.init)?;
                let steps = phases(&gpu, &step_prog, state_dtype)?;
                let inits = phases(&gpu, &init_prog, state_dtype)?;
                Path::Fused { step_prog, init_prog, steps, inits, bound: None }
            }
            Err(fused) => {
                let plans = Stacked::new(&entry, step).map_err(|e| Error::Rule(format!("`{}` cannot run on the CUDA path: {}; {}", entry.name, fused.0, e.0)))?;
                let kernels = PlanKernels::new(gpu.clone());
                for p in [&plans.step, &plans.init] {
                    kernels.prepare(p, Dtype::F32).map_err(|e| Error::Rule(e.0))?;
                }
                Path::PerTensor { plans, kernels, works: Vec::new() }
            }
        };
        Ok(CudaOptimizer { gpu, entry, hparams, path, state_dtype, step: 0, prepared_in: start.elapsed() })
    }

    /// The same rule with the step phases that reduce nothing updating `blocks` blocks of the
    /// layout per cube (1, 2 or 4; default [`BLOCKS_PER_CUBE`]) — tuning, never meaning: the
    /// GPU check compares them. Before the first step.
    pub fn with_blocks_per_cube(mut self, blocks: usize) -> Result<Self, Error> {
        if blocks == 0 || !BLOCKS_PER_CUBE.is_multiple_of(blocks) {
            return Err(Error::Rule(format!("blocks per cube must divide {BLOCKS_PER_CUBE}, not {blocks}")));
        }
        if let Path::Fused { step_prog, init_prog, steps, inits, bound } = &mut self.path {
            if bound.is_some() {
                return Err(Error::Rule("blocks per cube are chosen before the first step".into()));
            }
            for prog in [&mut *step_prog, &mut *init_prog] {
                prog.phases.iter_mut().filter(|p| p.accums.is_empty()).for_each(|p| p.blocks_per_cube = blocks);
            }
            *steps = phases(&self.gpu, step_prog, self.state_dtype)?;
            *inits = phases(&self.gpu, init_prog, self.state_dtype)?;
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

    fn bind(&self, arena: &Arena, step_prog: &Compiled, init_prog: &Compiled, steps: &[Phase], inits: &[Phase]) -> Bound {
        let slots = self.entry.states.len().max(1);
        let n = arena.len();
        let r = step_prog.slots().max(1).max(init_prog.slots().max(1));
        let state = Tensor::zeros([(slots * n) as i64], (kind_of(self.state_dtype), arena.device));
        let partial = Tensor::zeros([(arena.cubes.max(1) * r) as i64], (Kind::Float, arena.device));
        let infos = |prog: &Compiled, phases: &[Phase]| -> Vec<(Tensor, Option<Tensor>)> {
            phases
                .iter()
                .map(|ph| {
                    let sizes = StepSizes {
                        n,
                        slots,
                        scalars: prog.scalars(&self.hparams, 0.0).len(),
                        cubes: arena.cubes,
                        tensors: arena.sizes.len(),
                        results: ph.program.slots,
                    };
                    let combine = ph.combine.as_ref().map(|_| upload(&driver::info(&sizes.combine()), arena.device));
                    (upload(&driver::info(&sizes.step()), arena.device), combine)
                })
                .collect()
        };
        let (infos, init_infos) = (infos(step_prog, steps), infos(init_prog, inits));
        Bound { state, partial, infos, init_infos }
    }

    /// One step over every tensor of `arena` (its gradients as backpropagation left them):
    /// launches only, on torch's current stream. The first step binds the state to this
    /// arena's layout; later arenas must have the same sizes.
    pub fn step(&mut self, arena: &Arena) -> Result<(), Error> {
        if arena.is_empty() {
            return Ok(());
        }
        if arena.device != Device::Cuda(self.gpu.ordinal()) {
            return Err(Error::Rule(format!("the parameters are on {:?}, this optimizer runs on cuda:{}", arena.device, self.gpu.ordinal())));
        }
        let stream = normforge_tch::shim::current_cuda_stream(self.gpu.ordinal())
            .ok_or_else(|| Error::Rule("libtorch's CUDA support is not loaded (normforge_tch::load_cuda)".into()))?;
        if !self.fused() {
            return self.step_per_tensor(arena);
        }
        let Path::Fused { step_prog, init_prog, steps, inits, bound } = &self.path else { unreachable!("fused") };
        let first = bound.is_none();
        if first {
            let b = self.bind(arena, step_prog, init_prog, steps, inits);
            if let Path::Fused { bound, .. } = &mut self.path {
                *bound = Some(b);
            }
        }
        let Path::Fused { step_prog, init_prog, steps, inits, bound: Some(b) } = &self.path else { unreachable!("bound above") };
        if first {
            self.run(b, init_prog, inits, true, arena, stream, 0.0)?;
        }
        let t = self.step + 1;
        self.run(b, step_prog, steps, false, arena, stream, t as f64)?;
        self.step = t;
        Ok(())
    }

    /// A rule that runs through layer kernels, a stack of same-shaped neighbours at a time
    /// (read in place from the arena): every binding is checked before anything runs. Each
    /// stack keeps its work arena between steps and its states in it, read on alternate steps
    /// from where the last step wrote them (`Layout::swap_states`), so no state is copied; the
    /// first step computes them.
    fn step_per_tensor(&mut self, arena: &Arena) -> Result<(), Error> {
        let runs = stacks(&arena.shapes, |k| arena.joins(k));
        let (t, odd, hparams, entry, state_kind) = (self.step as f64 + 1.0, self.step % 2 == 1, &self.hparams, &self.entry, kind_of(self.state_dtype));
        let Path::PerTensor { plans, kernels, works } = &mut self.path else { unreachable!("per tensor") };
        let rule = |e: normforge_tch::Error| Error::Rule(e.0);
        let mut bound = Vec::new();
        for r in &runs {
            let shape = bind::param_view(entry, &arena.shapes[r.start]);
            let b = plans.bind(r.len(), &shape, hparams, &format!("parameters {}..{}", r.start, r.end))?;
            let lay = kernels.layout(&plans.step, &b, hparams, t, Dtype::F32).map_err(rule)?;
            bound.push((b, lay));
        }
        if !works.is_empty() && (works.len() != runs.len() || works.iter().zip(&bound).any(|(w, (_, lay))| w.numel() < lay.work_len)) {
            return Err(Error::Rule("the parameters changed since the first step".into()));
        }
        // Where each state is read in the unswapped layout (`None`: the step never reads it).
        let slots = |lay: &normforge_cubecl::Layout| -> Vec<Option<(i64, i64)>> {
            (0..entry.states.len() as u32)
                .map(|i| plans.step.tensors.iter().position(|x| x.0 == Source::State(i)))
                .map(|k| k.map(|k| (lay.offsets[k] as i64, lay.len(&plans.step, k) as i64)))
                .collect()
        };
        let swaps = bound.first().is_some_and(|(_, lay)| lay.clone().swap_states(&plans.step));
        if works.is_empty() {
            for (r, (b, lay)) in runs.iter().zip(&bound) {
                let p = arena.stack(&arena.p, r.clone());
                let out = kernels.run(&plans.init, b, hparams, 0.0, Dtype::F32, &|src| (src == Source::Input).then_some(&p)).map_err(rule)?;
                let work = Tensor::zeros([lay.work_len.max(1) as i64], (Kind::Float, arena.device));
                for (i, slot) in slots(lay).into_iter().enumerate() {
                    let Some((off, len)) = slot else { continue };
                    let v = pick(&out, Target::State(i as u32)).map_err(rule)?;
                    tch::no_grad(|| work.narrow(0, off, len).copy_(&v.to_kind(state_kind).to_kind(Kind::Float).reshape([-1])));
                }
                works.push(work);
            }
        }
        for ((r, (_, lay)), work) in runs.iter().zip(bound.iter_mut()).zip(works.iter()) {
            if odd && swaps {
                lay.swap_states(&plans.step);
            }
            let (p, g) = (arena.stack(&arena.p, r.clone()), arena.stack(&arena.g, r.clone()));
            let data = |src: Source| match src {
                Source::Input => Some(&p),
                Source::Grad => Some(&g),
                _ => None,
            };
            let out = kernels.run_laid(&plans.step, lay, Dtype::F32, &data, Some(work)).map_err(rule)?;
            let read_at = slots(lay);
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

    #[allow(clippy::too_many_arguments)]
    fn run(&self, b: &Bound, prog: &Compiled, phases: &[Phase], init: bool, arena: &Arena, stream: *mut std::ffi::c_void, t: f64) -> Result<(), Error> {
        // This step's scalars and the per-tensor values known on the host: one copy, queued.
        let values =
            upload::pack(&[&words(&prog.scalars(&self.hparams, t)), &words(&prog.host_values(&self.entry, &self.hparams, &arena.shapes)?)], arena.device);
        let (scalars, red) = (values.ptr(0), values.ptr(1));
        let ptr = |t: &Tensor| t.data_ptr() as u64;
        let infos = if init { &b.init_infos } else { &b.infos };
        for (ph, (info, cinfo)) in phases.iter().zip(infos) {
            let bufs = [ptr(&arena.p), ptr(&arena.g), ptr(&b.state), scalars, ptr(&arena.blocks), ptr(&b.partial), red];
            // SAFETY: every buffer lives on this device until the stream has run the launch
            // (torch's caching allocator reuses freed memory only in stream order); the info
            // gives each buffer's true length; a cube per `blocks_per_cube` entries of `blocks`
            // (whose count it divides: `padded_layout`).
            unsafe { self.gpu.launch(&ph.step, (ph.program.cubes(arena.cubes) as u32, 1, 1), BLOCK as u32, &bufs, ptr(info), stream)? };
            if let (Some(k), Some(ci)) = (&ph.combine, cinfo) {
                let tensors = arena.sizes.len();
                let bufs = [ptr(&b.partial), ptr(&arena.ranges), red];
                // SAFETY: as above; one unit per tensor, 64 per cube.
                unsafe { self.gpu.launch(k, (tensors.div_ceil(COMBINE_BLOCK as usize) as u32, 1, 1), COMBINE_BLOCK, &bufs, ptr(ci), stream)? };
            }
        }
        Ok(())
    }
}

/// The kernels of each phase, compiled and loaded.
fn phases(gpu: &Gpu, prog: &Compiled, state: Dtype) -> Result<Vec<Phase>, Error> {
    let units = emit::program_units(prog, state, Lang::Cuda)?;
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
        out.push(Phase { program: p.clone(), step, combine });
    }
    Ok(out)
}
