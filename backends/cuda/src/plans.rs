//! CubeCL plans (the layer kernels) on tch's CUDA tensors: what layers run, and update rules
//! that run tensor by tensor (per-axis reductions, matrix products).
//!
//! Each run lays its tensors out in two device arenas, as the CubeCL runtime does: `io` in the
//! storage dtype (a layer's input, output and their gradients; a rule's parameter) and `work` in
//! f32 (everything else). Filling them costs a copy of what the plan reads; outputs are views.

use crate::driver::{self, Gpu, Kernel};
use normforge_cubecl::emit::{layer_unit, Lang};
use normforge_cubecl::kernel::{LProgram, BLOCK};
use normforge_cubecl::{launched, layout, Dtype, Plan, Source, COOPERATIVE_MIN};
use normforge_dsl::bind::AxisBinding;
use normforge_dsl::ir::Target;
use normforge_tch::Error;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

fn err(e: impl std::fmt::Display) -> Error {
    Error(e.to_string())
}

/// The tch kind of a storage dtype.
pub fn kind_of(d: Dtype) -> Kind {
    match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
    }
}

/// Layer kernels compiled for one GPU, each once per storage dtype.
pub struct PlanKernels {
    gpu: Arc<Gpu>,
    kernels: Mutex<HashMap<(LProgram, Dtype), Kernel>>,
}

impl PlanKernels {
    pub fn new(gpu: Arc<Gpu>) -> Self {
        PlanKernels { gpu, kernels: Mutex::new(HashMap::new()) }
    }

    /// Compile (or load from the cache) every kernel `plan` may launch, in both forms of its
    /// reductions, so the first run pays no compile time.
    pub fn prepare(&self, plan: &Plan, io: Dtype) -> Result<(), Error> {
        for k in &plan.kernels {
            for per_value in [1, usize::MAX] {
                self.kernel(&launched(k, per_value, COOPERATIVE_MIN), io)?;
            }
        }
        Ok(())
    }

    fn kernel(&self, k: &LProgram, io: Dtype) -> Result<Kernel, Error> {
        let key = (k.clone(), io);
        if let Some(found) = self.kernels.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(found.clone());
        }
        let unit = layer_unit(k, io, Lang::Cuda)?;
        let kernel = self.gpu.kernel(&unit.source, unit.shared_bytes).map_err(err)?;
        self.kernels.lock().unwrap_or_else(|e| e.into_inner()).insert(key, kernel.clone());
        Ok(kernel)
    }

    /// Run `plan` bound to `b` on this GPU, on torch's current stream: `data` gives the tensors
    /// it reads (on this GPU); every output comes back, by target, flat.
    #[allow(clippy::too_many_arguments)]
    pub fn run<'a>(
        &self,
        plan: &Plan,
        b: &AxisBinding,
        hparams: &[f64],
        step: f64,
        io: Dtype,
        data: &dyn Fn(Source) -> Option<&'a Tensor>,
    ) -> Result<Vec<(Target, Tensor)>, Error> {
        let dev = Device::Cuda(self.gpu.ordinal());
        let lay = layout(plan, b, hparams, step, COOPERATIVE_MIN)?;
        let io_arena = Tensor::zeros([lay.io_len.max(1) as i64], (kind_of(io), dev));
        let work = Tensor::zeros([lay.work_len.max(1) as i64], (Kind::Float, dev));
        for (t, &(src, _, in_io)) in plan.tensors.iter().enumerate() {
            let (off, len) = (lay.offsets[t] as i64, lay.len(plan, t) as i64);
            match data(src) {
                Some(d) if d.numel() as i64 != len => return Err(Error(format!("{src:?} has {} values, the plan expects {len}", d.numel()))),
                Some(d) if d.device() != dev => return Err(Error(format!("{src:?} is on {:?}, these kernels run on cuda:{}", d.device(), self.gpu.ordinal()))),
                Some(d) => {
                    let arena = if in_io { &io_arena } else { &work };
                    arena.narrow(0, off, len).copy_(&d.reshape([-1]));
                }
                None if matches!(src, Source::Node(_)) => {}
                None => return Err(Error(format!("{src:?} is missing"))),
            }
        }
        let meta = Tensor::from_slice(&lay.meta.iter().map(|&v| v as i32).collect::<Vec<_>>()).to_device(dev);
        let scalars = Tensor::from_slice(&lay.scalars).to_device(dev);
        let info = Tensor::from_slice(&driver::info(&[io_arena.numel(), work.numel(), lay.meta.len(), lay.scalars.len()])).to_device(dev);
        let stream = normforge_tch::shim::current_cuda_stream(self.gpu.ordinal()).ok_or_else(|| Error("libtorch's CUDA support is not loaded".into()))?;
        let ptr = |t: &Tensor| t.data_ptr() as u64;
        for (k, grid) in &lay.launches {
            let kernel = self.kernel(k, io)?;
            let bufs = [ptr(&io_arena), ptr(&work), ptr(&meta), ptr(&scalars)];
            // SAFETY: the arenas hold every tensor at the offsets of `meta` (built from the
            // same layout), the info gives their lengths, units or cubes past the target's size
            // do nothing; all four live until the stream has run the launch (torch's allocator
            // reuses memory in stream order).
            unsafe { self.gpu.launch(&kernel, *grid, BLOCK as u32, &bufs, ptr(&info), stream) }.map_err(err)?;
        }
        Ok(plan
            .outputs
            .iter()
            .map(|&(target, t)| {
                let (off, len) = (lay.offsets[t] as i64, lay.len(plan, t) as i64);
                let arena = if plan.tensors[t].2 { &io_arena } else { &work };
                (target, arena.narrow(0, off, len))
            })
            .collect())
    }
}

/// Output `target` of a run.
pub fn pick(out: &[(Target, Tensor)], target: Target) -> Result<&Tensor, Error> {
    out.iter().find(|(t, _)| *t == target).map(|(_, v)| v).ok_or_else(|| Error(format!("the program lacks the output {target:?}")))
}
