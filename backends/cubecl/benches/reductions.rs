//! Layer reductions on lavapipe: a cube per reduced value (units stride over the reduction,
//! then a tree in shared memory) against one unit folding each value alone, for layers whose
//! reductions are long — rows of a layer norm, channels of a batch norm, groups of a group
//! norm — and, where a layer's backward has column sums (a layer norm's parameter gradients),
//! those folded inside its row kernel against a column kernel of their own reading x and dy
//! again. Forward + backward in training, fp32. A bench binary, not a test:
//! `cargo bench -p normforge-cubecl --bench reductions`; prints a Markdown table.

use normforge_cubecl::{cpu_device, CubeLayer, Launch};
use normforge_registry::Registry;
use std::time::Instant;

fn main() {
    normforge_std::link();
    let reg = Registry::with_builtins().expect("std");
    let device = cpu_device().expect("lavapipe: apt-get install mesa-vulkan-drivers libvulkan1");
    // (layer, input shape, hyper-parameters)
    type Case<'a> = (&'a str, Vec<usize>, Vec<(String, f64)>);
    let cases: [Case; 5] = [
        ("layer_norm", vec![64, 4096], vec![]),
        ("rms_norm", vec![64, 4096], vec![]),
        ("dyt", vec![64, 4096], vec![]),
        ("batch_norm", vec![16, 32, 32, 32], vec![]),
        ("group_norm", vec![16, 32, 32, 32], vec![("groups".into(), 8.0)]),
    ];
    let reps = 5;
    println!("lavapipe, fp32, forward + backward (training), median of {reps} after a warm-up call");
    println!();
    println!("| layer | input | cube per value, column sums in the row kernel (ms) | cube per value, column kernel (ms) | unit per value (ms) | speed-up over the column kernel | over unit per value |");
    println!("|---|---|---|---|---|---|---|");
    for (name, shape, h) in cases {
        let entry = reg.get(name).expect("std entry").entry;
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1009) as f32 / 500.0 - 1.0).collect();
        let gy: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 / 500.0 - 1.0).collect();
        let mut ms = Vec::new();
        for launch in [Launch::default(), Launch { rows_per_cube: 0, ..Launch::default() }, Launch::per_unit()] {
            let mut l = CubeLayer::new(entry.clone(), &h, &shape, &device).expect("layer").with_launch(launch).expect("launch");
            let mut call = || {
                l.forward(&x, &shape, true).expect("forward");
                l.backward(&x, &gy, &shape, true).expect("backward");
            };
            call();
            let mut t: Vec<f64> = (0..reps)
                .map(|_| {
                    let s = Instant::now();
                    call();
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(f64::total_cmp);
            ms.push(t[reps / 2]);
        }
        println!("| {name} | {shape:?} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x |", ms[0], ms[1], ms[2], ms[1] / ms[0], ms[2] / ms[0]);
    }
}
