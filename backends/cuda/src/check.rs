//! Correctness on a GPU, shared by the tests and the GPU check binary: a rule on CUDA tensors
//! (fused, or through layer kernels) against the reference backend (f64), and against libtorch's own
//! optimizer where it has one, over several steps.

use crate::{Arena, CudaOptimizer, Gpu};
use normforge_cubecl::Dtype;
use normforge_dsl::ir::Entry;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn host(t: &Tensor) -> Result<Vec<f64>, String> {
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(|e| e.to_string())?;
    Ok(v.into_iter().map(f64::from).collect())
}

fn dims(s: &[usize]) -> Vec<i64> {
    s.iter().map(|&d| d as i64).collect()
}

/// max |got - want| / max |want| of one tensor.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().map(|b| b.abs()).fold(1e-30, f64::max);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale
}

/// Run `steps` steps of `entry` on parameters of `shapes` with random gradients, on the GPU
/// (fused phases that reduce nothing taking `blocks_per_cube` blocks per cube) and in the
/// reference backend; the largest relative error over the tensors (max |diff| / max
/// |reference|). `Err` for a rule the CUDA path refuses or a failed launch.
pub fn against_reference(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shapes: &[Vec<usize>], steps: usize, blocks_per_cube: usize) -> Result<f64, String> {
    let mut opt = CudaOptimizer::new(gpu.clone(), entry.clone(), &[], Dtype::F32).and_then(|o| o.with_blocks_per_cube(blocks_per_cube)).map_err(|e| e.to_string())?;
    let mut oracle = normforge_reference::Optimizer::new(entry.clone(), &[]).map_err(|e| e.0)?;
    let dev = Device::Cuda(gpu.ordinal());
    tch::manual_seed(7);
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
        worst = worst.max(rel_err(&host(v)?, &w.data));
    }
    Ok(worst)
}

/// As [`against_reference`], against libtorch's own optimizer on the same GPU
/// (`normforge_tch::builtins`); `None` for a rule libtorch lacks.
pub fn against_builtin(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shapes: &[Vec<usize>], steps: usize) -> Option<Result<f64, String>> {
    let dev = Device::Cuda(gpu.ordinal());
    let hparams = normforge_dsl::hyper::resolve(entry, &[]).ok()?;
    let vs = tch::nn::VarStore::new(dev);
    let mut theirs = match normforge_tch::builtins::optimizer(entry, &hparams, &vs)? {
        Ok(o) => o,
        Err(e) => return Some(Err(e.0)),
    };
    let mut run = || -> Result<f64, String> {
        let mut opt = CudaOptimizer::new(gpu.clone(), entry.clone(), &[], Dtype::F32).map_err(|e| e.to_string())?;
        tch::manual_seed(11);
        let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev)).set_requires_grad(true)).collect();
        let twins: Vec<Tensor> = vars.iter().enumerate().map(|(i, v)| vs.root().var_copy(&format!("p{i}"), v)).collect();
        let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
        for _ in 0..steps {
            let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev))).collect();
            tch::no_grad(|| {
                for (v, g) in vars.iter().zip(&grads) {
                    v.grad().copy_(g);
                }
            });
            // Theirs get the same gradients by backpropagation: d/dt sum(t * g) = g.
            theirs.zero_grad();
            let loss = twins.iter().zip(&grads).map(|(t, g)| (t * g).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, dev)), |a, b| a + b);
            loss.f_backward().map_err(|e| e.to_string())?;
            opt.step(&arena).map_err(|e| e.to_string())?;
            theirs.step();
        }
        let mut worst = 0f64;
        for (v, t) in vars.iter().zip(&twins) {
            worst = worst.max(rel_err(&host(v)?, &host(t)?));
        }
        Ok(worst)
    };
    Some(run())
}
