//! The GPU check, in one run on a CUDA machine (scripts/gpu-check.sh builds nothing there: it
//! runs this binary, built on a CPU machine, then ../shared/tools/gpu_peers.py):
//! 1. correctness: every fused std rule on CUDA tensors against the reference backend, 10 steps;
//! 2. speed: each rule's step over the parameter set of gpu_peers.py (212 fp32 tensors: 12 of
//!    4096x4096, 4 of 4096x1024, 196 of 4096), as a fraction of the device-to-device copy
//!    bandwidth measured in the same run, and each rule's first-step compile time.
//!
//! Prints a table; with an output directory, also one JSON line per figure in `normforge.jsonl`.

use normforge_cubecl::Dtype;
use normforge_cuda::{check, Arena, CudaOptimizer, Gpu};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Median wall time of `reps` runs of `f`, in ms, each ended by a device synchronization.
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    tch::Cuda::synchronize(0);
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            tch::Cuda::synchronize(0);
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() {
    let out = std::env::args().nth(1).map(std::path::PathBuf::from);
    let mut lines = Vec::new();
    let mut emit = |s: String| {
        println!("{s}");
        lines.push(s);
    };
    if !normforge_tch::load_cuda() {
        eprintln!("gpu_check: libtorch sees no CUDA device");
        std::process::exit(2);
    }
    let gpu = match Gpu::open(0, normforge_cuda::Compiler::default_cache_dir()) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("gpu_check: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {} ({})", gpu.name(), gpu.arch());
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().expect("the standard library loads");
    let rules: Vec<_> = reg.list(None).into_iter().filter(|r| r.entry.kind == normforge_dsl::ir::Kind::Optimizer).collect();

    let mut failed = 0;
    for r in &rules {
        match check::against_reference(&gpu, &r.entry, &[1, 7, 256, 1000, 4097, 192], 10) {
            Ok(err) if err < 1e-5 => emit(format!(r#"{{"check":"{}","rel_err":{err:e},"ok":true}}"#, r.name)),
            Ok(err) => {
                failed += 1;
                emit(format!(r#"{{"check":"{}","rel_err":{err:e},"ok":false}}"#, r.name))
            }
            Err(e) => emit(format!(r#"{{"check":"{}","skipped":{:?}}}"#, r.name, e)),
        }
    }

    let dev = Device::Cuda(0);
    let x = Tensor::randn([1i64 << 28], (Kind::Float, dev));
    let mut y = x.empty_like();
    let copy_ms = time_ms(50, || {
        let _ = y.copy_(&x);
    });
    let copy_gbps = 2.0 * (1u64 << 28) as f64 * 4.0 / copy_ms / 1e6;
    emit(format!(r#"{{"op":"copy","impl":"tch","ms":{copy_ms:.4},"GBps":{copy_gbps:.1}}}"#));
    drop((x, y));

    let mut shapes: Vec<Vec<i64>> = vec![vec![4096, 4096]; 12];
    shapes.extend(vec![vec![4096, 1024]; 4]);
    shapes.extend(vec![vec![4096]; 196]);
    // Bytes each rule must move per element at the least: every parameter, gradient and
    // state read once, parameter and state written once.
    for (name, bytes) in [("adamw", 28.0), ("lion", 20.0), ("lamb", 28.0), ("adam", 28.0), ("sgd", 20.0)] {
        let Some(r) = rules.iter().find(|r| r.name == name) else { continue };
        let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(s.as_slice(), (Kind::Float, dev)).set_requires_grad(true)).collect();
        let n: usize = vars.iter().map(Tensor::numel).sum();
        let arena = Arena::adopt(&mut vars).expect("the parameter set fits one arena");
        tch::no_grad(|| {
            let _ = arena.g.shallow_clone().normal_(0.0, 1.0);
        });
        let start = Instant::now();
        let mut opt = match CudaOptimizer::new(gpu.clone(), r.entry.clone(), &[], Dtype::F32) {
            Ok(o) => o,
            Err(e) => {
                emit(format!(r#"{{"op":"{name}_step","skipped":{:?}}}"#, e.to_string()));
                continue;
            }
        };
        opt.step(&arena).expect("first step");
        tch::Cuda::synchronize(0);
        let first = start.elapsed().as_secs_f64();
        let ms = time_ms(50, || opt.step(&arena).expect("step"));
        let gbps = bytes * n as f64 / ms / 1e6;
        emit(format!(
            r#"{{"op":"{name}_step","impl":"normforge","tensors":{},"elements":{n},"ms":{ms:.4},"GBps":{gbps:.1},"of_copy":{:.3},"first_step_s":{first:.3},"launches":{}}}"#,
            vars.len(),
            gbps / copy_gbps,
            opt.launches_per_step()
        ));
    }
    if let Some(dir) = out {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("normforge.jsonl"), lines.join("\n") + "\n");
    }
    if failed > 0 {
        eprintln!("gpu_check: {failed} rule(s) disagree with the reference backend");
        std::process::exit(1);
    }
}
