//! The GPU check, in one run on a CUDA machine (scripts/gpu-check.sh builds nothing there: it
//! runs this binary, built on a CPU machine, then gpu_peers.py — scripts/gpu-stage.sh stages
//! both):
//! 1. correctness: every std rule on CUDA tensors (fused, or through layer kernels) against the
//!    reference backend, 10 steps (Muon on matrices), and against libtorch's C++ optimizer on
//!    the same GPU where it has one (SGD, Adam, AMSGrad, AdamW); Muon on matrices the kernels
//!    take and on ones too large for them (which step in libtorch's operations) against the
//!    rule in libtorch's operations;
//!    every std layer through our CUDA kernels (forward, derived backward, as one autograd node)
//!    against the same layer lowered to libtorch's own CUDA ops and differentiated by autograd,
//!    against the reference backend (f64), and against libtorch's built-in where it has one
//!    (layer, RMS, group, instance and batch norm): forward within 1e-5, gradients within 1e-4;
//! 2. speed: each rule's step over the parameter set of gpu_peers.py (212 fp32 tensors: 12 of
//!    4096x4096, 4 of 4096x1024, 196 of 4096), as a fraction of the device-to-device copy
//!    bandwidth measured in the same run, and each rule's first-step compile time; the layers
//!    of gpu_peers.py (forward counted as 2 passes over x, forward + backward as 5), forward +
//!    backward also launched otherwise: the parameter gradients' column sums in a kernel of
//!    their own (with 1 or 8 columns per cube) rather than inside the row kernel, whose cubes
//!    take at least 16 rows (the default) or 64, and number no more than the GPU runs at once
//!    (the default) or as many as 16 rows each make, and the rest of `check::layer_launches`
//!    (nothing kept in registers, other values per unit or access, reductions folded in
//!    shared memory rather than by shuffles in each warp) — each launch first checked at the timed
//!    shape against the layer lowered to libtorch's operations in f64 (`check::LayerOracle`;
//!    f32 within 1e-5 forward and 1e-4 backward, bf16 within 2^-8 more).
//!
//! Prints a table; with an output directory, also one JSON line per figure in `normforge.jsonl`,
//! each written as it is measured.
//!
//! Each check and timing is an item (`normforge_cuda::items`): where one leaves the CUDA context
//! unusable (a fault is sticky) the rest are skipped and the process ends with status 75, and
//! where one runs past `--item-limit` seconds the process ends at once with status 76; either
//! way `scripts/gpu-check.sh` goes on from the next item (`--from`) in a fresh process.

use normforge_cubecl::kernel::StepLayout;
use normforge_cubecl::Precision;
use normforge_cuda::items::Items;
use normforge_cuda::{check, Arena, CudaOptimizer, Gpu};
use tch::nn;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Medians over `reps` runs of `f`, after 3 untimed: its device time, in ms, between CUDA events
/// on torch's stream, with the L2 cache flushed (a 256 MB buffer zeroed) before each run, as
/// triton's `do_bench` times the peers in `gpu_peers.py`; and the host's time queueing it. The
/// device is held for twice the last untimed run's queueing (at least 0.2 ms) before each run,
/// so a host slower than the device shows in `host_ms`, not in `ms`.
fn time_ms(gpu: &Gpu, reps: usize, mut f: impl FnMut()) -> Timing {
    let mut queued = Duration::ZERO;
    for _ in 0..3 {
        let start = Instant::now();
        f();
        queued = start.elapsed();
    }
    let ahead = (2 * queued).clamp(Duration::from_micros(200), Duration::from_millis(50));
    let stream = gpu.stream().expect("libtorch's CUDA support is loaded");
    let mut flush = Tensor::empty([64i64 << 20], (Kind::Float, gpu.device()));
    let t = gpu.time(stream, reps, ahead, || _ = flush.zero_(), f).expect("CUDA events");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[reps / 2]
    };
    Timing { ms: median(t.iter().map(|t| t.device_ms).collect()), host_ms: median(t.iter().map(|t| t.host_ms).collect()) }
}

/// What [`time_ms`] measured.
#[derive(Clone, Copy)]
struct Timing {
    ms: f64,
    host_ms: f64,
}

/// The GPU check: correctness on CUDA against the reference backend and torch, then our
/// kernels' timings (scripts/gpu-check.sh runs it beside gpu_peers.py).
#[derive(clap::Parser)]
struct Args {
    /// Where to write `normforge.jsonl`, one JSON line per figure as it is measured.
    out: Option<std::path::PathBuf>,
    /// Skip the items before this one, appending to `normforge.jsonl` (a run going on after
    /// a process lost its device).
    #[arg(long, default_value_t = 0)]
    from: usize,
    /// A file holding the item running or last run (its number, a tab, its label), or `done`.
    #[arg(long)]
    progress: Option<std::path::PathBuf>,
    /// Seconds an item may run before the process reports it and ends (status 76).
    #[arg(long, default_value_t = 120)]
    item_limit: u64,
}

/// `normforge.jsonl`, where each figure goes as it comes, so a run cut short keeps what it
/// measured (shared with the watchdog's thread).
static LOG: Mutex<Option<std::fs::File>> = Mutex::new(None);

fn emit(s: String) {
    println!("{s}");
    if let Some(f) = LOG.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = writeln!(f, "{s}").and_then(|()| f.flush());
    }
}

/// The line for an item the device lost: gpu-table.py lists it, and counts a lost check as
/// failed.
fn lost_line(item: usize, label: &str, why: &str) -> String {
    format!(r#"{{"lost":{item},"label":{label:?},"why":{why:?}}}"#)
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    if let Some(dir) = &args.out {
        let _ = std::fs::create_dir_all(dir);
        let file = std::fs::OpenOptions::new().create(true).append(true).truncate(false).open(dir.join("normforge.jsonl"));
        // A fresh run starts the file afresh; one going on from an item adds to it.
        let file = file.and_then(|f| if args.from == 0 { f.set_len(0).map(|()| f) } else { Ok(f) });
        *LOG.lock().unwrap_or_else(|e| e.into_inner()) = file.ok();
    }
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
    // Whether the context still works after an item failed: a sticky fault fails both the
    // driver's synchronisation and libtorch's next operation.
    let probe = {
        let gpu = gpu.clone();
        move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                gpu.synchronize(std::ptr::null_mut()).is_ok() && Tensor::ones([2], (Kind::Float, gpu.device())).sum(Kind::Float).double_value(&[]) == 2.0
            }))
            .unwrap_or(false)
        }
    };
    let mut items = Items::new(args.from, args.progress.clone(), probe);
    let limit = args.item_limit;
    items.watch(Duration::from_secs(limit), move |item, label| {
        emit(lost_line(item, label, &format!("ran past {limit} s: the process was ended")));
        eprintln!("gpu_check: item {item} ({label}) ran past {limit} s");
        // No exit handlers: libtorch's and CUDA's would wait on the device the item holds.
        // SAFETY: ends the process; nothing after it runs.
        unsafe { libc::_exit(76) }
    });
    println!("device: {} ({})", gpu.name(), gpu.arch());
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().expect("the standard library loads");
    let rules: Vec<_> = reg.list(None).into_iter().filter(|r| r.entry.kind == normforge_dsl::ir::Kind::Optimizer).collect();

    let mut failed = 0;
    for r in &rules {
        let shapes = &check::rule_shapes(&r.entry);
        // Fused phases that reduce nothing in each layout the timings compare (blocks per cube
        // x elements per access; the default first). A rule through layer kernels has no such
        // phase: checked once.
        let fused = CudaOptimizer::new(gpu.clone(), r.entry.clone(), &[], Precision::default()).is_ok_and(|o| o.fused());
        let layouts = if fused { &StepLayout::COMPARED[..] } else { &StepLayout::COMPARED[..1] };
        for &layout in layouts {
            let name = layout.name();
            match items.run(&format!("check {} {name}", r.name), || check::against_reference(&gpu, &r.entry, shapes, 10, layout)) {
                None => {}
                Some(Ok(err)) if err < 1e-5 => emit(format!(r#"{{"check":"{}","layout":"{name}","rel_err":{err:e},"ok":true}}"#, r.name)),
                Some(Ok(err)) => {
                    failed += 1;
                    emit(format!(r#"{{"check":"{}","layout":"{name}","rel_err":{err:e},"ok":false}}"#, r.name))
                }
                Some(Err(e)) => emit(format!(r#"{{"check":"{}","layout":"{name}","skipped":{:?}}}"#, r.name, e)),
            }
        }
        // And against libtorch's own optimizer (C++ torch::optim) on the same GPU, where it has one.
        match items.run(&format!("check {} torch", r.name), || check::against_builtin(&gpu, &r.entry, shapes, 10).transpose()) {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(err))) => {
                failed += usize::from(err >= 1e-5);
                emit(format!(r#"{{"check":"{}","against":"torch","rel_err":{err:e},"ok":{}}}"#, r.name, err < 1e-5))
            }
            Some(Err(e)) => {
                failed += 1;
                emit(format!(r#"{{"check":"{}","against":"torch","error":{:?}}}"#, r.name, e))
            }
        }
        // Matrices too large for the kernels' 32-bit tables (Muon's products at 1024 x 4096
        // span 2^32 values) step in libtorch's operations beside ones the kernels take, in one
        // arena: both against the rule in libtorch's operations (`DslOptimizer`).
        if check::takes_matrices(&r.entry) {
            let mixed = [vec![64, 300], vec![1024, 4096], vec![4096, 1024]];
            match items.run(&format!("check {} lowered", r.name), || check::against_lowered(&gpu, &r.entry, &mixed, 3)) {
                None => {}
                Some(Ok(err)) => {
                    failed += usize::from(err >= 1e-5);
                    emit(format!(r#"{{"check":"{}","against":"lowered","shapes":{mixed:?},"rel_err":{err:e},"ok":{}}}"#, r.name, err < 1e-5))
                }
                Some(Err(e)) => {
                    failed += 1;
                    emit(format!(r#"{{"check":"{}","against":"lowered","error":{:?}}}"#, r.name, e))
                }
            }
        }
    }

    // bf16 and f16 parameters (their moments in their dtype, the arithmetic in f32) against
    // torch's fused AdamW kernel: a value the two round differently is one unit in the last
    // place apart, and can be again at each later step (so at most `STEPS` apart); values
    // rounded differently at all are rare (a formula off makes nearly all of them differ).
    if let Some(adamw) = rules.iter().find(|r| r.name == "adamw") {
        const STEPS: usize = 10;
        let vectors = check::rule_shapes(&adamw.entry);
        for kind in [Kind::BFloat16, Kind::Half] {
            match items.run(&format!("check adamw {kind:?} torch_fused"), || check::against_fused_adamw(&gpu, &adamw.entry, kind, &vectors, STEPS)) {
                None => {}
                Some(Ok((ulps, differ, total))) => {
                    let ok = ulps <= STEPS as f64 && differ * 100 <= total;
                    failed += usize::from(!ok);
                    emit(format!(r#"{{"check":"adamw","params":"{kind:?}","against":"torch_fused","max_ulps":{ulps},"differ":{differ},"of":{total},"ok":{ok}}}"#))
                }
                Some(Err(e)) => {
                    failed += 1;
                    emit(format!(r#"{{"check":"adamw","params":"{kind:?}","against":"torch_fused","error":{e:?}}}"#))
                }
            }
        }
    }

    for r in reg.list(None).into_iter().filter(|r| r.entry.kind != normforge_dsl::ir::Kind::Optimizer) {
        let shape = check::layer_shape(&r.entry);
        match items.run(&format!("check {}", r.name), || check::layer_against_torch(&gpu, &r.entry, &shape)) {
            None => {}
            Some(Ok(errs)) => {
                // Forward < 1e-5, gradients < 1e-4, against the lowering, the reference and the built-in.
                let ok = errs.iter().all(|e| e.forward < 1e-5 && e.backward < 1e-4);
                failed += usize::from(!ok);
                let each: Vec<String> = errs.iter().map(|e| format!(r#""{}":{{"fwd":{:e},"bwd":{:e}}}"#, e.against, e.forward, e.backward)).collect();
                emit(format!(r#"{{"check":"{}","shape":{shape:?},"rel_err":{{{}}},"ok":{ok}}}"#, r.name, each.join(",")))
            }
            Some(Err(e)) => {
                failed += 1;
                emit(format!(r#"{{"check":"{}","error":{:?}}}"#, r.name, e))
            }
        }
    }

    // Training through the user's API on our kernels (`fused_layer`, `FusedOptimizer`) against
    // libtorch's operations: groups, clipping, a skipped NaN step, and the state saved after
    // three steps and resumed by either optimizer (an odd count: a rule through layer kernels
    // then reads its states from the swapped layout).
    // (`check::training_cases`: which, and their bounds.)
    for case in check::training_cases() {
        let (layer, rule, matrix_kind, bound) = (case.layer, case.rule(), case.matrix_kind, case.bound());
        let Some(chosen) = case.rules.iter().map(|(name, select)| rules.iter().find(|r| r.name == *name).map(|r| (r.entry.clone(), *select))).collect::<Option<Vec<_>>>() else { continue };
        match items.run(&format!("check fused_training {layer} {rule} {matrix_kind:?}"), || check::fused_training(&gpu, &layer_entry(&reg, layer), &chosen, 7, matrix_kind)) {
            None => {}
            Some(Ok(err)) => {
                failed += usize::from(err >= bound);
                emit(format!(r#"{{"check":"fused_training","layer":"{layer}","rule":"{rule}","matrix":"{matrix_kind:?}","rel_err":{err:e},"ok":{}}}"#, err < bound))
            }
            Some(Err(e)) => {
                failed += 1;
                emit(format!(r#"{{"check":"fused_training","layer":"{layer}","rule":"{rule}","matrix":"{matrix_kind:?}","error":{e:?}}}"#))
            }
        }
    }

    let dev = gpu.device();
    // The copy bandwidth, measured by the first timing this process runs.
    let mut copy = None;

    let mut shapes: Vec<Vec<i64>> = vec![vec![4096, 4096]; 12];
    shapes.extend(vec![vec![4096, 1024]; 4]);
    shapes.extend(vec![vec![4096]; 196]);
    // Bytes each rule must move per element at the least: every parameter, gradient and
    // state read once, parameter and state written once.
    // AdamP runs through layer kernels, a stack of same-shaped tensors at a time (three stacks
    // here): timed all the same.
    for (name, bytes) in [("adamw", 28.0), ("lion", 20.0), ("lamb", 28.0), ("adamp", 28.0), ("adam", 28.0), ("sgd", 20.0)] {
        let Some(r) = rules.iter().find(|r| r.name == name) else { continue };
        let line = items.run(&format!("op {name}_step"), || -> Result<String, String> {
            let copy_gbps = copy_bandwidth(&gpu, &mut copy);
            let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(s.as_slice(), (Kind::Float, dev)).set_requires_grad(true)).collect();
            let n: usize = vars.iter().map(Tensor::numel).sum();
            let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
            tch::no_grad(|| {
                let _ = arena.g.shallow_clone().normal_(0.0, 1.0);
            });
            // A fresh compiler with no disk cache: the first step pays every compile, as a
            // first run would (the checks above warmed the shared one).
            let cold = Arc::new(Gpu::open(0, None).map_err(|e| e.to_string())?);
            let start = Instant::now();
            let mut opt = CudaOptimizer::new(cold, r.entry.clone(), &[], Precision::default()).map_err(|e| e.to_string())?;
            opt.step(&arena).map_err(|e| e.to_string())?;
            tch::Cuda::synchronize(0);
            let first = start.elapsed().as_secs_f64();
            let Timing { ms, host_ms } = time_ms(&gpu, 50, || opt.step(&arena).expect("step"));
            let gbps = bytes * n as f64 / ms / 1e6;
            // The fused rules again in the other layouts (an element per access; one block per
            // cube), and reading every gradient scaled, as a clipped step does (the same passes
            // over memory).
            let (ms_layouts, ms_scaled) = match opt.fused() {
                true => {
                    let mut by = Vec::new();
                    for layout in &StepLayout::COMPARED[1..] {
                        let mut other = CudaOptimizer::new(gpu.clone(), r.entry.clone(), &[], Precision::default()).and_then(|o| o.with_layout(*layout)).map_err(|e| e.to_string())?;
                        other.step(&arena).map_err(|e| e.to_string())?;
                        by.push(format!(r#""{}":{:.4}"#, layout.name(), time_ms(&gpu, 50, || other.step(&arena).expect("step")).ms));
                    }
                    opt.step_scaled(&arena, 0.5).map_err(|e| e.to_string())?;
                    let ms_scaled = time_ms(&gpu, 50, || opt.step_scaled(&arena, 0.5).expect("step")).ms;
                    (format!("{{{}}}", by.join(",")), format!("{ms_scaled:.4}"))
                }
                false => ("null".to_string(), "null".to_string()),
            };
            Ok(format!(
                r#"{{"op":"{name}_step","impl":"normforge","tensors":{},"elements":{n},"ms":{ms:.4},"host_ms":{host_ms:.4},"GBps":{gbps:.1},"of_copy":{:.3},"first_step_s":{first:.3},"launches":{},"fused":{},"ms_other_layouts":{ms_layouts},"ms_grad_scaled":{ms_scaled}}}"#,
                vars.len(),
                gbps / copy_gbps,
                opt.launches_per_step(),
                opt.fused()
            ))
        });
        if let Some(line) = line {
            emit(line.unwrap_or_else(|e| format!(r#"{{"op":"{name}_step","error":{e:?}}}"#)));
        }
    }
    // For the record (no target): AdamW on the same parameter set in bf16 — 14 bytes per
    // element at the least — ours and torch's fused kernel, on the same tensors.
    if let Some(r) = rules.iter().find(|r| r.name == "adamw") {
        let lines = items.run("op half_params adamw bf16", || -> Result<Vec<String>, String> {
            let copy_gbps = copy_bandwidth(&gpu, &mut copy);
            let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(s.as_slice(), (Kind::BFloat16, dev)).set_requires_grad(true)).collect();
            let n: usize = vars.iter().map(Tensor::numel).sum();
            let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
            tch::no_grad(|| {
                let _ = arena.g.shallow_clone().normal_(0.0, 1.0);
            });
            let mut opt = CudaOptimizer::new(gpu.clone(), r.entry.clone(), &[], Precision::uniform(normforge_cubecl::Dtype::BF16)).map_err(|e| e.to_string())?;
            opt.step(&arena).map_err(|e| e.to_string())?;
            let ours = time_ms(&gpu, 50, || opt.step(&arena).expect("step")).ms;
            let hparams = normforge_dsl::hyper::resolve(&r.entry, &[]).map_err(|e| e.0)?;
            let mut theirs = normforge_tch::builtins::FusedAdamW::new(&r.entry, &hparams, &vars).ok_or("adamw has one")?.map_err(|e| e.0)?;
            let grads: Vec<Tensor> = vars.iter().map(Tensor::grad).collect();
            theirs.step(&grads).map_err(|e| e.0)?;
            let torch = time_ms(&gpu, 50, || theirs.step(&grads).expect("torch's fused step")).ms;
            let line = |imp: &str, ms: f64| {
                let gbps = 14.0 * n as f64 / ms / 1e6;
                format!(r#"{{"op":"half_params","rule":"adamw","dtype":"bf16","impl":"{imp}","elements":{n},"ms":{ms:.4},"GBps":{gbps:.1},"of_copy":{:.3}}}"#, gbps / copy_gbps)
            };
            Ok(vec![line("normforge", ours), line("torch_fused", torch)])
        });
        match lines {
            None => {}
            Some(Ok(lines)) => lines.into_iter().for_each(emit),
            Some(Err(e)) => emit(format!(r#"{{"op":"half_params","rule":"adamw","dtype":"bf16","error":{e:?}}}"#)),
        }
    }
    for (name, shape, kind) in [
        ("layer_norm", vec![16384i64, 4096], Kind::Float),
        ("rms_norm", vec![16384, 4096], Kind::Float),
        ("dyt", vec![16384, 4096], Kind::Float),
        ("layer_norm", vec![16384, 4096], Kind::BFloat16),
        ("rms_norm", vec![16384, 4096], Kind::BFloat16),
        ("dyt", vec![16384, 4096], Kind::BFloat16),
        ("evonorm_s0", vec![32, 256, 56, 56], Kind::Float),
    ] {
        let line = items.run(&format!("check {name} {kind:?} timed"), || -> Result<(String, String, bool), String> {
            let copy_gbps = copy_bandwidth(&gpu, &mut copy);
            let vs = nn::VarStore::new(dev);
            let spec = check::timed_layer(layer_entry(&reg, name));
            let x = Tensor::randn(shape.as_slice(), (kind, dev)).set_requires_grad(true);
            let gy = Tensor::randn(shape.as_slice(), (kind, dev));
            let bytes = x.numel() as f64 * x.kind().elt_size_in_bytes() as f64;
            let oracle = check::LayerOracle::new(&spec, &shape, &x, &gy)?;
            // In f32, the acceptance's bounds; bf16 outputs are rounded to 8 significant bits,
            // each within 2^-8 of its value computed exactly.
            let (fwd_bound, bwd_bound) = if kind == Kind::Float { (1e-5, 1e-4) } else { (2f64.powi(-8) + 1e-5, 2f64.powi(-8) + 1e-4) };
            let mut worst = (0f64, 0f64, "");
            // The default launch first (the figure), then the others, for the record; the
            // forward has no column sums, so only the default and reading memory in every
            // phase (no loads kept in registers) differ there.
            let mut fwd = Vec::new();
            let mut both = Vec::new();
            let launches = check::layer_launches();
            for (label, launch) in launches {
                let layer = check::with_launch(&gpu, &spec, &(vs.root() / label), &shape, launch)?;
                let (f, b) = oracle.errors(&layer, &x, &gy)?;
                // (NaN, a gradient missing or not a number, is the worst.)
                let score = |f: f64, b: f64| if f.is_nan() || b.is_nan() { f64::INFINITY } else { f / fwd_bound + b / bwd_bound };
                if score(f, b) > score(worst.0, worst.1) || worst.2.is_empty() {
                    worst = (f, b, label);
                }
                if ["default", "nothing_kept", "kept_in_cubes_of_256", "one_value_per_unit", "eight_values_per_unit", "one_value_per_access", "parameters_per_lane", "folds_in_shared_memory"].contains(&label) {
                    let t = time_ms(&gpu, 20, || {
                        let _ = tch::no_grad(|| layer.try_forward_t(&x, true).expect("forward"));
                    });
                    fwd.push((label, t));
                }
                let t = time_ms(&gpu, 20, || {
                    // Fresh gradients each run, as the peers' `grad = None`: else each run
                    // after the first adds into x's gradient (three more passes over x).
                    for v in std::iter::once(&x).chain(layer.params()) {
                        normforge_tch::shim::clear_grad(&mut v.shallow_clone()).expect("clear a gradient");
                    }
                    let y = layer.try_forward_t(&x, true).expect("forward");
                    normforge_tch::shim::backward_with_grad(&y, &gy).expect("backward");
                });
                both.push((label, t));
            }
            let by_launch = |t: &[(&str, Timing)]| t.iter().map(|(c, t)| format!(r#""{c}":{:.4}"#, t.ms)).collect::<Vec<_>>().join(",");
            let (f, b) = (2.0 * bytes / fwd[0].1.ms / 1e6, 5.0 * bytes / both[0].1.ms / 1e6);
            let ok = worst.0 < fwd_bound && worst.1 < bwd_bound;
            let check = format!(
                r#"{{"check":"{name}","shape":{shape:?},"dtype":"{kind:?}","against":"lowered_f64","worst_launch":"{}","rel_err":{{"fwd":{:e},"bwd":{:e}}},"ok":{ok}}}"#,
                worst.2, worst.0, worst.1
            );
            let timing = format!(
                r#"{{"op":"{name}","impl":"normforge","shape":{shape:?},"dtype":"{kind:?}","fwd_ms":{:.4},"fwd_host_ms":{:.4},"fwd_GBps":{f:.1},"fwd_of_copy":{:.3},"fwd_bwd_ms":{:.4},"fwd_bwd_host_ms":{:.4},"fwd_bwd_GBps":{b:.1},"fwd_bwd_of_copy":{:.3},"fwd_ms_by_launch":{{{}}},"fwd_bwd_ms_by_launch":{{{}}}}}"#,
                fwd[0].1.ms,
                fwd[0].1.host_ms,
                f / copy_gbps,
                both[0].1.ms,
                both[0].1.host_ms,
                b / copy_gbps,
                by_launch(&fwd),
                by_launch(&both)
            );
            Ok((check, timing, ok))
        });
        match line {
            None => {}
            Some(Ok((check, timing, ok))) => {
                failed += usize::from(!ok);
                emit(check);
                emit(timing);
            }
            Some(Err(e)) => {
                failed += 1;
                emit(format!(r#"{{"check":"{name}","shape":{shape:?},"dtype":"{kind:?}","against":"lowered_f64","error":{e:?}}}"#));
            }
        }
    }
    // For the record (no target): Muon's step on one matrix through our kernels (products as
    // folds, no tensor cores) and in libtorch's operations (cuBLAS), which the CUDA path runs
    // where the kernels cannot index a matrix: where the second wins, it should run there
    // sooner than the 32-bit limit makes it.
    if let Some(muon) = rules.iter().find(|r| r.name == "muon") {
        for shape in [[256i64, 256], [512, 2048], [1024, 1024], [1024, 4096]] {
            let line = items.run(&format!("op muon_routing {shape:?}"), || -> Result<String, String> {
                let mut vars = vec![Tensor::randn(shape, (Kind::Float, dev)).set_requires_grad(true)];
                let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
                tch::no_grad(|| {
                    let _ = arena.g.shallow_clone().normal_(0.0, 1.0);
                });
                let mut ours = CudaOptimizer::new(gpu.clone(), muon.entry.clone(), &[], Precision::default()).map_err(|e| e.to_string())?;
                ours.step(&arena).map_err(|e| e.to_string())?;
                let kernels_ms = time_ms(&gpu, 20, || ours.step(&arena).expect("step")).ms;
                let vs = nn::VarStore::new(dev);
                let p = vs.root().var_copy("p", &vars[0]);
                let mut theirs = normforge_tch::DslOptimizer::new(muon.entry.clone(), &vs, &[]).map_err(|e| e.0)?;
                normforge_tch::shim::set_grad(&mut p.shallow_clone(), &vars[0].grad().copy()).map_err(|e| e.0)?;
                theirs.step().map_err(|e| e.0)?;
                let lowered_ms = time_ms(&gpu, 20, || _ = theirs.step().expect("step")).ms;
                let indexable = shape[0] * shape[0] * shape[1] < 1 << 32 && shape[1] * shape[1] * shape[0] < 1 << 32;
                Ok(format!(r#"{{"op":"muon_routing","shape":{shape:?},"kernels_index_it":{indexable},"ms":{kernels_ms:.4},"lowered_ms":{lowered_ms:.4}}}"#))
            });
            if let Some(line) = line {
                emit(line.unwrap_or_else(|e| format!(r#"{{"op":"muon_routing","shape":{shape:?},"error":{e:?}}}"#)));
            }
        }
    }
    items.finish();
    if let Some((item, label)) = items.lost() {
        emit(lost_line(item, label, "the CUDA context stopped working: the items after it were skipped"));
        eprintln!("gpu_check: the device stopped working in item {item} ({label})");
        std::process::exit(75);
    }
    if failed > 0 {
        eprintln!("gpu_check: {failed} check(s) failed");
        std::process::exit(1);
    }
}

/// The device-to-device copy bandwidth (GB/s, bytes read and written), measured once per
/// process, at its first timing, and reported: every fraction of copy a process reports is of
/// its own figure.
fn copy_bandwidth(gpu: &Gpu, copy: &mut Option<f64>) -> f64 {
    *copy.get_or_insert_with(|| {
        let x = Tensor::randn([1i64 << 28], (Kind::Float, gpu.device()));
        let mut y = x.empty_like();
        let ms = time_ms(gpu, 50, || {
            y.copy_(&x);
        })
        .ms;
        let gbps = 2.0 * (1u64 << 28) as f64 * 4.0 / ms / 1e6;
        emit(format!(r#"{{"op":"copy","impl":"tch","ms":{ms:.4},"GBps":{gbps:.1}}}"#));
        gbps
    })
}

fn layer_entry(reg: &normforge_registry::Registry, name: &str) -> Arc<normforge_dsl::Entry> {
    reg.get(name).expect("std layer").entry.clone()
}
