//! An update rule on tch's CUDA tensors: the CubeCL step kernels (every tensor in one launch per
//! phase, per-tensor reductions as partial reduce + combine), compiled by NVRTC, launched on the
//! flat arena's device pointers on torch's current stream. Hyper-parameters and the step count
//! travel in a small scalar buffer, so changing them never recompiles.

use crate::arena::Arena;
use crate::driver::{self, Gpu, Kernel};
use normforge_cubecl::emit::{self, Lang};
use normforge_cubecl::kernel::{KProgram, StepSizes, BLOCK, COMBINE_BLOCK};
use normforge_cubecl::{compile, Compiled, Dtype};
use normforge_dsl::ir::{Entry, Kind as EntryKind, Programs};
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
    step_prog: Compiled,
    init_prog: Compiled,
    steps: Vec<Phase>,
    inits: Vec<Phase>,
    state_dtype: Dtype,
    bound: Option<Bound>,
    step: u64,
    /// Compile (or cache) and load time of every kernel, at construction.
    pub prepared_in: Duration,
}

impl CudaOptimizer {
    /// Compile the rule's kernels for `gpu` (state kept in `state_dtype`).
    pub fn new(gpu: Arc<Gpu>, entry: Arc<Entry>, overrides: &[(String, f64)], state_dtype: Dtype) -> Result<Self, Error> {
        if entry.kind != EntryKind::Optimizer {
            return Err(Error::Rule(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let Programs::Optimizer { step } = &entry.programs else { unreachable!("checked above") };
        let step_prog = compile(&entry, step).map_err(|e| {
            Error::Rule(format!("`{}` is not fused on the CUDA path yet (per-axis reductions run tensor by tensor): {}", entry.name, e.0))
        })?;
        let init_prog = compile(&entry, &entry.init)?;
        let start = std::time::Instant::now();
        let steps = phases(&gpu, &step_prog, state_dtype)?;
        let inits = phases(&gpu, &init_prog, state_dtype)?;
        Ok(CudaOptimizer {
            gpu,
            entry,
            hparams,
            step_prog,
            init_prog,
            steps,
            inits,
            state_dtype,
            bound: None,
            step: 0,
            prepared_in: start.elapsed(),
        })
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        Ok(normforge_dsl::hyper::set(&self.entry, &mut self.hparams, name, v)?)
    }

    /// Kernel launches per step.
    pub fn launches_per_step(&self) -> usize {
        self.steps.iter().map(|p| 1 + p.combine.is_some() as usize).sum()
    }

    fn bind(&mut self, arena: &Arena) -> Result<(), Error> {
        if arena.device != Device::Cuda(self.gpu.ordinal()) {
            return Err(Error::Rule(format!("the parameters are on {:?}, this optimizer runs on cuda:{}", arena.device, self.gpu.ordinal())));
        }
        let slots = self.entry.states.len().max(1);
        let n = arena.len();
        let r = self.step_prog.slots().max(1).max(self.init_prog.slots().max(1));
        let kind = match self.state_dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
        };
        let state = Tensor::zeros([(slots * n) as i64], (kind, arena.device));
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
        let (step_infos, init_infos) = (infos(&self.step_prog, &self.steps), infos(&self.init_prog, &self.inits));
        self.bound = Some(Bound { state, partial, infos: step_infos, init_infos });
        Ok(())
    }

    /// One step over every tensor of `arena` (its gradients as backpropagation left them):
    /// launches only, on torch's current stream. The first step binds the state to this
    /// arena's layout; later arenas must have the same sizes.
    pub fn step(&mut self, arena: &Arena) -> Result<(), Error> {
        if arena.is_empty() {
            return Ok(());
        }
        let first = self.bound.is_none();
        if first {
            self.bind(arena)?;
        }
        let stream = normforge_tch::shim::current_cuda_stream(self.gpu.ordinal())
            .ok_or_else(|| Error::Rule("libtorch's CUDA support is not loaded (normforge_tch::load_cuda)".into()))?;
        if first {
            self.run(&self.init_prog, &self.inits, true, arena, stream)?;
        }
        self.step += 1;
        self.run(&self.step_prog, &self.steps, false, arena, stream)
    }

    fn run(&self, prog: &Compiled, phases: &[Phase], init: bool, arena: &Arena, stream: *mut std::ffi::c_void) -> Result<(), Error> {
        let b = self.bound.as_ref().expect("bound before a run");
        let scalars = upload_f32(&prog.scalars(&self.hparams, self.step as f64), arena.device);
        let red = upload_f32(&prog.host_values(&self.entry, &self.hparams, &arena.shapes)?, arena.device);
        let ptr = |t: &Tensor| t.data_ptr() as u64;
        let infos = if init { &b.init_infos } else { &b.infos };
        for (ph, (info, cinfo)) in phases.iter().zip(infos) {
            let bufs = [ptr(&arena.p), ptr(&arena.g), ptr(&b.state), ptr(&scalars), ptr(&arena.blocks), ptr(&b.partial), ptr(&red)];
            // SAFETY: every buffer lives on this device until the stream has run the launch
            // (torch's caching allocator reuses freed memory only in stream order); the info
            // gives each buffer's true length; one cube per entry of `blocks`.
            unsafe { self.gpu.launch(&ph.step, (arena.cubes as u32, 1, 1), BLOCK as u32, &bufs, ptr(info), stream)? };
            if let (Some(k), Some(ci)) = (&ph.combine, cinfo) {
                let tensors = arena.sizes.len();
                let bufs = [ptr(&b.partial), ptr(&arena.ranges), ptr(&red)];
                // SAFETY: as above; one unit per tensor, 64 per cube.
                unsafe { self.gpu.launch(k, (tensors.div_ceil(COMBINE_BLOCK as usize) as u32, 1, 1), COMBINE_BLOCK, &bufs, ptr(ci), stream)? };
            }
        }
        Ok(())
    }
}

/// The kernels of each phase, compiled and loaded.
fn phases(gpu: &Gpu, prog: &Compiled, state: Dtype) -> Result<Vec<Phase>, Error> {
    let mut units = emit::program_units(prog, state, Lang::Cuda)?.into_iter();
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

fn upload(bytes: &[u8], device: Device) -> Tensor {
    Tensor::from_slice(bytes).to_device(device)
}

fn upload_f32(v: &[f32], device: Device) -> Tensor {
    Tensor::from_slice(v).to_device(device)
}
