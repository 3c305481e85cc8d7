//! Layers on tch's CUDA tensors: the CubeCL layer kernels (forward, and the DSL's derived
//! backward) launched through the driver (`plans`), as the two halves of a custom autograd
//! function (`normforge_tch::LayerKernels`), so `loss.backward()` runs our backward kernels.
//! Each call reads the input (and the output gradient) in place; outputs are views of the
//! arena the kernels wrote.

use crate::driver::Gpu;
use crate::plans::{dtype_of, pick, PlanKernels};
use normforge_cubecl::{plan, Plan, Source};
use normforge_dsl::bind;
use normforge_dsl::ir::{Entry, Programs, Target};
use normforge_tch::layer::{input_grads, saved_inputs, split_inputs};
use normforge_tch::{Error, LayerKernels};
use std::sync::Arc;
use tch::Tensor;

pub struct CudaLayerKernels {
    entry: Arc<Entry>,
    hparams: Vec<f64>,
    /// Train, eval, train backward, eval backward.
    plans: [Plan; 4],
    kernels: PlanKernels,
}

impl CudaLayerKernels {
    pub fn new(gpu: Arc<Gpu>, entry: Arc<Entry>, hparams: Vec<f64>) -> Result<Self, Error> {
        let Programs::Layer { train, eval, train_backward, eval_backward } = &entry.programs else {
            return Err(Error(format!("`{}` is not a layer", entry.name)));
        };
        let plans = [plan(&entry, train)?, plan(&entry, eval)?, plan(&entry, train_backward)?, plan(&entry, eval_backward)?];
        Ok(CudaLayerKernels { entry, hparams, plans, kernels: PlanKernels::new(gpu) })
    }

    /// Launch the kernels so (tuning: the GPU check compares several).
    pub fn with_launch(mut self, launch: normforge_cubecl::Launch) -> Result<Self, Error> {
        self.kernels = self.kernels.with_launch(launch)?;
        Ok(self)
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
        // (`PlanKernels::run` checks that every tensor it reads is on its GPU.)
        let io = dtype_of(x.kind()).ok_or_else(|| Error(format!("the CUDA kernels take f32, bf16 or f16 inputs, not {:?}", x.kind())))?;
        let dims: Vec<usize> = x.size().iter().map(|&d| d as usize).collect();
        let b = bind::bind_axes(&self.entry.axes, &dims, "the input").map_err(Error)?;
        self.kernels.run(plan, &b, &self.hparams, 0.0, io, &data)
    }
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
