//! Layers on tch's CUDA tensors: the CubeCL layer kernels (forward, and the DSL's derived
//! backward) launched through the driver, as the two halves of a custom autograd function
//! (`normforge_tch::LayerKernels`), so `loss.backward()` runs our backward kernels.
//!
//! Each call lays its tensors out in two device arenas, as the CubeCL runtime does: `io` in the
//! input's dtype (input, output, their gradients) and `work` in f32 (parameters, buffers,
//! statistics). Filling them costs a copy of the input; outputs are views.

use crate::driver::{self, Gpu, Kernel};
use normforge_cubecl::emit::{layer_unit, Lang};
use normforge_cubecl::kernel::{LProgram, BLOCK};
use normforge_cubecl::{layout, plan, Dtype, Plan, Source, COOPERATIVE_MIN};
use normforge_dsl::bind;
use normforge_dsl::ir::{Entry, Programs, Target};
use normforge_tch::layer::{input_grads, saved_inputs, split_inputs};
use normforge_tch::{Error, LayerKernels};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

pub struct CudaLayerKernels {
    gpu: Arc<Gpu>,
    entry: Arc<Entry>,
    hparams: Vec<f64>,
    /// Train, eval, train backward, eval backward.
    plans: [Plan; 4],
    kernels: Mutex<HashMap<(LProgram, Dtype), Kernel>>,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error(e.to_string())
}

impl CudaLayerKernels {
    pub fn new(gpu: Arc<Gpu>, entry: Arc<Entry>, hparams: Vec<f64>) -> Result<Self, Error> {
        let Programs::Layer { train, eval, train_backward, eval_backward } = &entry.programs else {
            return Err(Error(format!("`{}` is not a layer", entry.name)));
        };
        let plans = [plan(&entry, train)?, plan(&entry, eval)?, plan(&entry, train_backward)?, plan(&entry, eval_backward)?];
        Ok(CudaLayerKernels { gpu, entry, hparams, plans, kernels: Mutex::new(HashMap::new()) })
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

    /// Run one plan on the input `x` (and, for a backward, the output gradient `gy`): every
    /// output, by target, flat.
    fn run(&self, plan: &Plan, x: &Tensor, gy: Option<&Tensor>, params: &[Tensor], buffers: &[Tensor]) -> Result<Vec<(Target, Tensor)>, Error> {
        let data = |src: Source| match src {
            Source::Input => Some(x),
            Source::GradOutput => gy,
            Source::Param(i) => params.get(i as usize),
            Source::Buffer(i) => buffers.get(i as usize),
            _ => None,
        };
        let dev = x.device();
        if dev != Device::Cuda(self.gpu.ordinal()) {
            return Err(Error(format!("the input is on {dev:?}, these kernels run on cuda:{}", self.gpu.ordinal())));
        }
        let (io, io_kind) = match x.kind() {
            Kind::Float => (Dtype::F32, Kind::Float),
            Kind::BFloat16 => (Dtype::BF16, Kind::BFloat16),
            Kind::Half => (Dtype::F16, Kind::Half),
            k => return Err(Error(format!("the CUDA kernels take f32, bf16 or f16 inputs, not {k:?}"))),
        };
        let dims: Vec<usize> = x.size().iter().map(|&d| d as usize).collect();
        let b = bind::bind_axes(&self.entry.axes, &dims, "the input").map_err(Error)?;
        let lay = layout(plan, &b, &self.hparams, 0.0, COOPERATIVE_MIN)?;
        let io_arena = Tensor::zeros([lay.io_len.max(1) as i64], (io_kind, dev));
        let work = Tensor::zeros([lay.work_len.max(1) as i64], (Kind::Float, dev));
        for (t, &(src, _, in_io)) in plan.tensors.iter().enumerate() {
            let (off, len) = (lay.offsets[t] as i64, lay.len(plan, t) as i64);
            match data(src) {
                Some(d) if d.numel() as i64 != len => return Err(Error(format!("{src:?} has {} values, the layer expects {len}", d.numel()))),
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

fn pick(out: &[(Target, Tensor)], target: Target) -> Result<&Tensor, Error> {
    out.iter().find(|(t, _)| *t == target).map(|(_, v)| v).ok_or_else(|| Error(format!("the program lacks the output {target:?}")))
}

impl LayerKernels for CudaLayerKernels {
    fn forward(&self, inputs: &[Tensor], train: bool) -> Result<(Tensor, Vec<Tensor>), Error> {
        let (x, params, buffers) = split_inputs(&self.entry, inputs)?;
        let out = self.run(&self.plans[if train { 0 } else { 1 }], x, None, params, buffers)?;
        let y = pick(&out, Target::Y)?.reshape(x.size()).to_kind(x.kind());
        let saved = saved_inputs(x, params, buffers);
        for (i, buf) in buffers.iter().enumerate() {
            if let Ok(new) = pick(&out, Target::Buffer(i as u32)) {
                buf.shallow_clone().copy_(&new.reshape(buf.size()));
            }
        }
        Ok((y, saved))
    }

    fn backward(&self, saved: &[Tensor], grad_y: &Tensor, train: bool) -> Result<Vec<Option<Tensor>>, Error> {
        let (x, params, buffers) = split_inputs(&self.entry, saved)?;
        let gy = grad_y.to_kind(x.kind()).contiguous();
        let out = self.run(&self.plans[if train { 2 } else { 3 }], x, Some(&gy), params, buffers)?;
        let gx = pick(&out, Target::GradInput)?.reshape(x.size()).to_kind(x.kind());
        let gparams = params.iter().enumerate().map(|(i, p)| pick(&out, Target::GradParam(i as u32)).ok().map(|g| g.reshape(p.size()).to_kind(p.kind()))).collect();
        Ok(input_grads(gx, gparams, buffers.len()))
    }
}
