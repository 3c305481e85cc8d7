//! The compile half of a first step, with no GPU: every standard update rule's kernels (step and
//! state initialiser) as the CUDA path compiles them — CubeCL's expansion to CUDA C++, then
//! NVRTC to PTX for compute_90 with no cache — and the layers of the GPU check as launched at
//! its shapes (forward and backward, loads kept in registers where the rows allow), NVRTC
//! taking a rule's or a layer's kernels in parallel as the CUDA path does, on every core.
//! Loading the PTX on a device is left out. A bench binary, not a test (`cargo bench -p normforge-cuda
//! --bench compile`, NVRTC from `scripts/setup-libtorch.sh` on `LD_LIBRARY_PATH`); prints
//! Markdown tables. Each rule and layer gets a fresh compiler, so none reuses another's PTX.

use normforge_cubecl::emit::{layer_unit, Lang, Unit};
use normforge_cubecl::{emit_units, layout, plan, Dtype, Launch};
use normforge_cuda::parallel::each_in_parallel;
use normforge_cuda::Compiler;
use normforge_dsl::ir::{Kind, Programs};
use normforge_registry::Registry;
use std::time::{Duration, Instant};

fn main() {
    normforge_std::link();
    let reg = Registry::with_builtins().expect("std");
    if let Err(e) = Compiler::new("compute_90", Compiler::default_include_dirs(), None) {
        println!("SKIPPED: {e}");
        return;
    }
    // Expanded by CubeCL, then compiled, each timed.
    let time = |units: &dyn Fn() -> Vec<Unit>| -> (usize, Duration, Duration) {
        let nvrtc = Compiler::new("compute_90", Compiler::default_include_dirs(), None).expect("NVRTC");
        let start = Instant::now();
        let units = units();
        let expand = start.elapsed();
        // In parallel, as the CUDA path compiles a rule's or a layer's kernels.
        let start = Instant::now();
        each_in_parallel(&units, |u| nvrtc.compile(&u.source).map(|_| ())).expect("compiles");
        (units.len(), expand, start.elapsed())
    };
    let row = |name: &str, (n, expand, nvrtc): (usize, Duration, Duration)| {
        println!("| {name} | {n} | {:.2} | {:.2} | {:.2} |", expand.as_secs_f64(), nvrtc.as_secs_f64(), (expand + nvrtc).as_secs_f64());
        expand + nvrtc
    };
    println!("Update rules, step and state initialiser, f32 (s)");
    println!();
    println!("| rule | kernels | CubeCL expansion | NVRTC | total |");
    println!("|---|---|---|---|---|");
    let mut worst = Duration::ZERO;
    for r in reg.list(None).iter().filter(|r| r.entry.kind == Kind::Optimizer) {
        let units = || ["step", "init"].iter().flat_map(|pass| emit_units(&r.entry, pass, Dtype::F32, Lang::Cuda).expect("emits")).collect();
        worst = worst.max(row(&r.name, time(&units)));
    }
    println!();
    println!("slowest rule: {:.2} s", worst.as_secs_f64());
    println!();
    println!("Layers at the GPU check's shapes, forward and backward in training, as launched (s)");
    println!();
    println!("| layer | kernels | CubeCL expansion | NVRTC | total |");
    println!("|---|---|---|---|---|");
    let cases: [(&str, &[usize], Dtype); 4] = [
        ("layer_norm", &[16384, 4096], Dtype::BF16),
        ("rms_norm", &[16384, 4096], Dtype::BF16),
        ("dyt", &[16384, 4096], Dtype::BF16),
        ("evonorm_s0", &[32, 256, 56, 56], Dtype::F32),
    ];
    for (name, shape, dtype) in cases {
        let entry = reg.get(name).expect("std entry").entry;
        let Programs::Layer { train, train_backward, .. } = &entry.programs else { unreachable!("a layer") };
        let groups = if name == "evonorm_s0" { vec![("groups".to_string(), 32.0)] } else { vec![] };
        let hp = normforge_dsl::hyper::resolve(&entry, &groups).expect("hyper-parameters");
        let b = normforge_dsl::bind::bind_axes(&entry.axes, shape, "x").expect("shape");
        let units = || {
            [train, train_backward]
                .iter()
                .flat_map(|p| layout(&plan(&entry, p).expect("plan"), &b, &hp, 0.0, &Launch::default()).expect("layout").launches)
                .map(|(k, _)| layer_unit(&k, dtype, Lang::Cuda).expect("emits"))
                .collect()
        };
        row(&format!("{name} {shape:?} {dtype:?}"), time(&units));
    }
}
