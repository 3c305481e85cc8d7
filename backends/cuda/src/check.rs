//! Correctness on a GPU, shared by the tests and the GPU check binary: a rule on CUDA tensors
//! (fused, or tensor by tensor) against the reference backend (f64) over several steps.

use crate::{Arena, CudaOptimizer, Gpu};
use normforge_cubecl::Dtype;
use normforge_dsl::ir::Entry;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn host(t: &Tensor) -> Result<Vec<f64>, String> {
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(|e| e.to_string())?;
    Ok(v.into_iter().map(f64::from).collect())
}

/// Run `steps` steps of `entry` on parameters of `shapes` with random gradients, on the GPU and
/// in the reference backend; the largest relative error over the tensors (max |diff| / max
/// |reference|). `Err` for a rule the CUDA path refuses or a failed launch.
pub fn against_reference(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shapes: &[Vec<usize>], steps: usize) -> Result<f64, String> {
    let mut opt = CudaOptimizer::new(gpu.clone(), entry.clone(), &[], Dtype::F32).map_err(|e| e.to_string())?;
    let mut oracle = normforge_reference::Optimizer::new(entry.clone(), &[]).map_err(|e| e.0)?;
    let dev = Device::Cuda(gpu.ordinal());
    tch::manual_seed(7);
    let dims = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev)).set_requires_grad(true)).collect();
    let as_ref = |t: &Tensor| -> Result<normforge_reference::Tensor, String> {
        normforge_reference::Tensor::new(t.size().iter().map(|&d| d as usize).collect(), host(t)?).map_err(|e| e.0)
    };
    let mut want = vars.iter().map(as_ref).collect::<Result<Vec<_>, _>>()?;
    let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
    for _ in 0..steps {
        let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, Device::Cpu))).collect();
        tch::no_grad(|| {
            for (v, g) in vars.iter().zip(&grads) {
                v.grad().copy_(g);
            }
        });
        opt.step(&arena).map_err(|e| e.to_string())?;
        let gs = grads.iter().map(as_ref).collect::<Result<Vec<_>, _>>()?;
        oracle.step(&mut want, &gs).map_err(|e| e.0)?;
    }
    let mut worst = 0f64;
    for (v, w) in vars.iter().zip(&want) {
        let got = host(v)?;
        let scale = w.data.iter().map(|b| b.abs()).fold(1e-30, f64::max);
        worst = worst.max(got.iter().zip(&w.data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale);
    }
    Ok(worst)
}
