//! The fused AdamW step against the same rule run one kernel per operation, on whatever
//! Vulkan adapter wgpu calls a CPU (lavapipe here). A bench binary, not a test: run it with
//! `cargo bench -p normforge-cubecl --bench fusion`; it prints a Markdown table for
//! BENCHMARKS.md.

use normforge_cubecl::kernel::StepLayout;
use normforge_cubecl::{cpu_device, CubeOptimizer};
use normforge_registry::Registry;
use std::time::Instant;

/// Tensor sizes of a small transformer-like model: 50 tensors, 1.8M parameters (the
/// baseline's intermediates must fit lavapipe's 128 MB binding limit).
fn sizes() -> Vec<usize> {
    let mut v = Vec::new();
    for _ in 0..12 {
        v.extend([256, 256]);
    }
    for _ in 0..4 {
        v.extend([256 * 768, 768, 768 * 256, 256, 256, 256]);
    }
    v.extend([1000 * 256, 1000]);
    v
}

fn main() {
    normforge_std::link();
    let reg = Registry::with_builtins().expect("std");
    let device = cpu_device().expect("lavapipe: apt-get install mesa-vulkan-drivers libvulkan1");
    let entry = reg.get("adamw").expect("adamw").entry;
    let sizes = sizes();
    let n: usize = sizes.iter().sum();
    let params: Vec<Vec<f32>> = sizes.iter().map(|&k| (0..k).map(|i| (i % 17) as f32 * 0.01 - 0.08).collect()).collect();
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&k| (0..k).map(|i| (i % 13) as f32 * 0.003 - 0.02).collect()).collect();
    let steps = 20;
    eprintln!("adapter's largest buffer: {} MB", device.client().properties().memory.max_page_size >> 20);
    // AdamW's least traffic per element: read p, g, m, v; write p, m, v.
    let bytes = (7 * 4 * n) as f64;
    println!("AdamW, {} tensors, {n} parameters, fp32, {steps} timed steps after 3 warm-up steps", sizes.len());
    println!();
    println!("| variant | launches/step | first step (compile + run) | ms/step | GB/s (7 x 4 B/param) |");
    println!("|---|---|---|---|---|");
    let mut per_step = Vec::new();
    // The fused step as it runs (vectors of four), then with an element per access — the
    // GPU check's first compared layout, so both time the same pair — then the baseline.
    let scalar = StepLayout::COMPARED[1];
    assert_eq!(scalar.lanes, 1, "COMPARED[1] is the scalar layout this bench labels");
    for (name, mut opt) in [
        ("fused (normforge)", CubeOptimizer::new(entry.clone(), &[], &device).expect("fused")),
        ("fused, an element per access", CubeOptimizer::new(entry.clone(), &[], &device).and_then(|o| o.with_layout(scalar)).expect("fused")),
        ("one kernel per operation", CubeOptimizer::unfused(entry.clone(), &[], &device).expect("unfused")),
    ] {
        let flat = opt.upload(&params, &grads).expect("upload");
        opt.sync().expect("sync");
        let t0 = Instant::now();
        opt.step_flat(&flat).expect("step");
        opt.sync().expect("sync");
        let first = t0.elapsed().as_secs_f64();
        for _ in 0..2 {
            opt.step_flat(&flat).expect("step");
        }
        opt.sync().expect("sync");
        let t0 = Instant::now();
        for _ in 0..steps {
            opt.step_flat(&flat).expect("step");
        }
        opt.sync().expect("sync");
        let t = t0.elapsed().as_secs_f64() / steps as f64;
        per_step.push(t);
        println!("| {name} | {} | {:.0} ms | {:.2} | {:.1} |", opt.launches_per_step(), first * 1e3, t * 1e3, bytes / t / 1e9);
    }
    println!();
    println!("one kernel per operation / fused: {:.2}x the time per step", per_step[2] / per_step[0]);
    println!("an element per access / vectors of four: {:.2}x the time per step", per_step[1] / per_step[0]);
}
