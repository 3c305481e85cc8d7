//! The fused optimizer kernels on lavapipe (Mesa's software Vulkan) against the f64 reference
//! backend: every update rule of the standard library the backend takes, 5 steps over 50
//! tensors of mixed sizes (one launch per phase for all of them).

mod common;

use common::{registry, rel, values};
use normforge_cubecl::{cpu_device, CubeOptimizer, Dtype};
use normforge_dsl::ir::Programs;
use normforge_reference::{Optimizer, Tensor};

const ELEMENTWISE: &[(&str, f64)] = &[
    ("sgd", 0.05),
    ("adam", 0.01),
    ("adamw", 0.01),
    ("amsgrad", 0.01),
    ("radam", 0.01),
    ("adabelief", 0.01),
    ("lion", 0.001),
    ("grams", 0.01),
    ("ademamix", 0.01),
    ("adan", 0.01),
    ("diffgrad", 0.01),
    // Per-tensor reductions: partial reduce, combine, apply.
    ("lamb", 0.01),
    ("lars", 0.05),
    ("novograd", 0.01),
    // Per-axis reductions (per output channel): through layer kernels, a stack at a time.
    ("adamp", 0.01),
    ("sgdp", 0.05),
];

#[test]
fn rules_match_the_reference_over_fifty_tensors() {
    let reg = registry();
    let device = cpu_device().expect("lavapipe (mesa-vulkan-drivers) is installed by scripts/test.sh");
    // Odd sizes, and sizes around and well past one cube (256), so reductions span cubes.
    let mut sizes: Vec<usize> = (0..45).map(|i| 1 + (i * 37) % 97 + if i % 7 == 0 { 300 } else { 0 }).collect();
    sizes.extend([255, 256, 257, 1000, 4097]);
    // Blocks that do not fill whole cubes of elementwise phases (four blocks each): the layout
    // pads the last tensor with whole blocks.
    let blocks: usize = sizes.iter().map(|n| n.div_ceil(normforge_cubecl::kernel::BLOCK)).sum();
    assert_ne!(blocks % normforge_cubecl::kernel::BLOCKS_PER_CUBE, 0);
    assert_eq!(normforge_cubecl::kernel::padded_layout(&sizes).2, blocks.next_multiple_of(normforge_cubecl::kernel::BLOCKS_PER_CUBE));
    // Even sizes as matrices (LARS adapts only tensors of rank 2 and more).
    let shapes: Vec<Vec<usize>> = sizes.iter().map(|&n| if n % 2 == 0 { vec![2, n / 2] } else { vec![n] }).collect();
    for &(name, lr) in ELEMENTWISE {
        let entry = reg.get(name).unwrap().entry;
        let mut h = vec![("lr".to_string(), lr)];
        if entry.hparams.iter().any(|p| p.name == "momentum") {
            h.push(("momentum".into(), 0.9));
        }
        let mut ours = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
        // Reductions take a phase and a combine each; the rest is one launch.
        let per_tensor = ["adamp", "sgdp"].contains(&name);
        assert_eq!(ours.fused(), !per_tensor, "{name}");
        if !per_tensor {
            let reductions = ["lamb", "lars", "novograd"].contains(&name);
            assert_eq!(ours.launches_per_step(), if reductions { 3 } else { 1 }, "{name}");
        }
        let mut oracle = Optimizer::new(entry.clone(), &h).unwrap();
        let init: Vec<Vec<f64>> = sizes.iter().enumerate().map(|(i, &n)| values(i as u64 + 1, n)).collect();
        let mut p32: Vec<Vec<f32>> = init.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
        // The oracle starts from exactly the f32 values.
        let mut p64: Vec<Tensor> = p32.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
        for step in 0..5u64 {
            let g64: Vec<Vec<f64>> = sizes.iter().enumerate().map(|(i, &n)| values(1000 * (step + 1) + i as u64, n)).collect();
            let g32: Vec<Vec<f32>> = g64.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
            let gt: Vec<Tensor> = g32.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
            ours.step_shaped(&mut p32, &g32, shapes.clone()).unwrap();
            oracle.step(&mut p64, &gt).unwrap();
            for (k, (a, b)) in p32.iter().zip(&p64).enumerate() {
                let e = rel(a, &b.data);
                assert!(e < 1e-5, "{name}: tensor {k} ({} values) after step {}: relative error {e:e}", a.len(), step + 1);
            }
        }
    }
}

/// Every bool hyper-parameter away from its default: a rule through layer kernels loads what
/// only one branch of a `select` on such a value reads only when that branch is taken
/// (`LPhase::guards`), so both values must give the reference's steps.
#[test]
fn bool_hyper_parameters_take_either_branch() {
    let reg = registry();
    let device = cpu_device().expect("lavapipe (mesa-vulkan-drivers) is installed by scripts/test.sh");
    let mut flipped = 0;
    for r in reg.list(None) {
        let Some(&(_, lr)) = ELEMENTWISE.iter().find(|(n, _)| *n == r.name).or((r.name == "muon").then_some(&("muon", 0.02))) else { continue };
        let entry = r.entry;
        // Matrices of several shapes (Muon takes nothing else), in stacks of two, and a vector.
        let mut shapes: Vec<Vec<usize>> = vec![vec![9, 4], vec![9, 4], vec![4, 33], vec![17, 17]];
        if r.name != "muon" {
            shapes.push(vec![300]);
        }
        for hp in entry.hparams.iter().filter(|h| h.ty == normforge_dsl::ir::HType::Bool) {
            let mut h = vec![("lr".to_string(), lr), (hp.name.clone(), 1.0 - hp.default)];
            if entry.hparams.iter().any(|p| p.name == "momentum") {
                h.push(("momentum".into(), 0.9));
            }
            let mut ours = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
            let mut oracle = Optimizer::new(entry.clone(), &h).unwrap();
            let mut p32: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, s)| values(i as u64 + 11, s.iter().product()).iter().map(|&x| x as f32).collect()).collect();
            let mut p64: Vec<Tensor> = p32.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
            for step in 0..3u64 {
                let g32: Vec<Vec<f32>> = p32.iter().enumerate().map(|(i, v)| values(700 * (step + 1) + i as u64, v.len()).iter().map(|&x| x as f32).collect()).collect();
                let gt: Vec<Tensor> = g32.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
                ours.step_shaped(&mut p32, &g32, shapes.clone()).unwrap();
                oracle.step(&mut p64, &gt).unwrap();
                for (k, (a, b)) in p32.iter().zip(&p64).enumerate() {
                    let e = rel(a, &b.data);
                    assert!(e < 1e-5, "{} with {} = {}: tensor {k} after step {}: relative error {e:e}", r.name, hp.name, 1.0 - hp.default, step + 1);
                }
            }
            flipped += 1;
        }
    }
    // adamp, sgdp, muon (two), and the fused rules': sgd, lars, adan, diffgrad (two), novograd (two).
    assert!(flipped >= 11, "{flipped} bool hyper-parameters flipped");
}

/// Muon's Gram matrices read the iterate transposed (`swap`): per tensor, tall, wide and square,
/// and tall and wide among themselves in one step.
#[test]
fn muon_matches_the_reference_on_matrices() {
    let device = cpu_device().expect("lavapipe (mesa-vulkan-drivers) is installed by scripts/test.sh");
    let entry = registry().get("muon").unwrap().entry;
    let h = [("lr".to_string(), 0.02), ("nesterov".to_string(), 1.0)];
    let mut ours = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
    assert!(!ours.fused(), "matrix products run through layer kernels");
    // Only the form the shape takes is launched: a wide matrix skips the tall form's products.
    let Programs::Optimizer { step } = &entry.programs else { unreachable!() };
    let plan = normforge_cubecl::plan(&entry, step).unwrap();
    let hp = normforge_dsl::hyper::resolve(&entry, &h).unwrap();
    for shape in [[4, 9], [9, 4]] {
        let b = normforge_dsl::bind::bind_axes(&entry.axes, &shape, "p").unwrap();
        let launched = normforge_cubecl::layout(&plan, &b, &hp, 1.0, &normforge_cubecl::Launch::default()).unwrap().launches.len();
        assert!(launched < plan.kernels.len(), "{shape:?}: {launched} of {} kernels launched", plan.kernels.len());
    }
    let mut oracle = Optimizer::new(entry.clone(), &h).unwrap();
    // Neighbours of one shape run as one stack: each keeps its own Gram matrices.
    let shapes: Vec<Vec<usize>> = vec![vec![9, 4], vec![9, 4], vec![4, 9], vec![4, 9], vec![4, 9], vec![7, 7], vec![1, 5], vec![33, 70], vec![33, 70]];
    let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    let mut p32: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| values(i as u64 + 7, n).iter().map(|&x| x as f32).collect()).collect();
    let mut p64: Vec<Tensor> = p32.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
    for step in 0..4u64 {
        let g32: Vec<Vec<f32>> =
            sizes.iter().enumerate().map(|(i, &n)| values(500 * (step + 1) + i as u64, n).iter().map(|&x| x as f32).collect()).collect();
        let gt: Vec<Tensor> = g32.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
        ours.step_shaped(&mut p32, &g32, shapes.clone()).unwrap();
        oracle.step(&mut p64, &gt).unwrap();
        for (k, (a, b)) in p32.iter().zip(&p64).enumerate() {
            let e = rel(a, &b.data);
            assert!(e < 1e-5, "muon: tensor {k} {:?} after step {}: relative error {e:e}", shapes[k], step + 1);
        }
    }
    // A vector is not a matrix: refused, nothing moved.
    let mut vector = vec![vec![0.5f32; 9]];
    let err = ours.step_shaped(&mut vector, &[vec![0.1; 9]], vec![vec![9]]).unwrap_err();
    assert!(err.to_string().contains("[o, i]"), "{err}");
    assert_eq!(vector, [vec![0.5f32; 9]]);
}

#[test]
fn layers_are_not_optimizers() {
    let reg = registry();
    let device = cpu_device().unwrap();
    let err = CubeOptimizer::new(reg.get("layer_norm").unwrap().entry, &[], &device).err().unwrap();
    assert!(err.0.contains("not an optimizer"), "{err}");
}

#[test]
fn changing_the_learning_rate_keeps_the_program() {
    // The learning rate reaches the kernel through the scalar buffer: the comptime program,
    // which is what CubeCL compiles and caches kernels by, does not change with it.
    let reg = registry();
    let device = cpu_device().unwrap();
    let entry = reg.get("adamw").unwrap().entry;
    let a = normforge_cubecl::compile(&entry, step_of(&entry)).unwrap();
    let mut opt = CubeOptimizer::new(entry.clone(), &[("lr".into(), 0.1)], &device).unwrap();
    let mut p = vec![vec![1.0f32; 8]];
    let g = vec![vec![0.5f32; 8]];
    opt.step(&mut p, &g).unwrap();
    let after_one = p[0][0];
    opt.set_hparam("lr", 0.0).unwrap();
    opt.step(&mut p, &g).unwrap();
    // lr = 0 freezes the parameter (decay is lr * weight_decay), so the new value arrived.
    assert_eq!(p[0][0], after_one);
    let b = normforge_cubecl::compile(&entry, step_of(&entry)).unwrap();
    assert_eq!(a.phases, b.phases);
    // ...while the scalars it reads do.
    assert_ne!(a.scalars(&[0.1, 0.9, 0.999, 1e-8, 0.01], 1.0, 1.0), a.scalars(&[0.0, 0.9, 0.999, 1e-8, 0.01], 1.0, 1.0));
}

/// A rule of several phases stores each state once, in the first phase that can compute it, and
/// later phases read it back rather than computing it again from the gradient and the old
/// state — with f32 states; narrower ones are computed again (`compile_for`). Per element,
/// loads and stores over all phases of a step.
#[test]
fn later_phases_read_the_states_earlier_ones_stored() {
    use normforge_cubecl::kernel::KOp;
    let reg = registry();
    let traffic = |c: &normforge_cubecl::Compiled| -> (usize, usize, usize) {
        let ops = || c.phases.iter().flat_map(|k| &k.ops);
        let stores = ops().filter(|op| matches!(op, KOp::StoreP(_) | KOp::StoreState(..))).count();
        (ops().filter(|op| op.is_load()).count(), stores, ops().filter(|op| matches!(op, KOp::LoadG)).count())
    };
    for name in ["lamb", "lars", "novograd"] {
        let entry = reg.get(name).unwrap().entry;
        let f32s = normforge_cubecl::compile(&entry, step_of(&entry)).unwrap();
        let f16s = normforge_cubecl::compile_for(&entry, step_of(&entry), Dtype::F16).unwrap();
        assert!(f32s.phases.len() > 1, "{name}");
        let (reads, writes, g_reads) = traffic(&f32s);
        let (reads16, writes16, _) = traffic(&f16s);
        eprintln!("{name}: per element {reads} reads, {writes} writes ({g_reads} of g) with f32 states; {reads16} reads, {writes16} writes with f16");
        // Every state and the parameter written once per step either way.
        assert_eq!(writes, entry.states.len() + 1, "{name}");
        assert_eq!(writes16, writes, "{name}");
        if name == "lamb" {
            // p, g, m, v; then p and the new m and v: no second read of g.
            assert_eq!((reads, writes, g_reads), (7, 3, 1));
            assert_eq!(reads16, 8);
        } else {
            // LARS' momentum and NovoGrad's m follow from the reductions: the last phase.
            assert_eq!(reads, reads16, "{name}");
        }
    }
}

fn step_of(e: &normforge_dsl::ir::Entry) -> &normforge_dsl::ir::Program {
    match &e.programs {
        normforge_dsl::ir::Programs::Optimizer { step } => step,
        _ => unreachable!(),
    }
}

#[test]
fn the_unfused_baseline_computes_the_same_steps() {
    // The benchmark's baseline (one kernel per operation) must be the same rule, or its ratio
    // means nothing.
    let reg = registry();
    let device = cpu_device().unwrap();
    let sizes = [1usize, 7, 300, 1000, 33];
    for name in ["adamw", "radam", "lion"] {
        let entry = reg.get(name).unwrap().entry;
        let h = [("lr".to_string(), 0.01)];
        let mut fused = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
        let mut split = CubeOptimizer::unfused(entry.clone(), &h, &device).unwrap();
        assert_eq!(fused.launches_per_step(), 1);
        assert!(split.launches_per_step() >= 5, "{name}: {} launches", split.launches_per_step());
        let mut a: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| values(i as u64 + 7, n).iter().map(|&x| x as f32).collect()).collect();
        let mut b = a.clone();
        for step in 0..4u64 {
            let g: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| values(99 * (step + 1) + i as u64, n).iter().map(|&x| x as f32).collect()).collect();
            fused.step(&mut a, &g).unwrap();
            split.step(&mut b, &g).unwrap();
            for (x, y) in a.iter().zip(&b) {
                let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
                assert!(rel(x, &y64) < 1e-6, "{name} step {}: {}", step + 1, rel(x, &y64));
            }
        }
    }
}

#[test]
fn adamp_projects_on_scale_invariant_weights() {
    // Gradients orthogonal to each weight row (as on weights followed by a normalization):
    // AdamP removes the radial part of its update per channel, so it must both match the
    // reference and differ from Adam, which it equals when nothing is projected.
    let reg = registry();
    let device = cpu_device().unwrap();
    // (Neighbours of one shape run as one stack: each keeps its own channel and layer sums.)
    let shapes = vec![vec![4, 64], vec![4, 64], vec![3, 5, 7], vec![3, 5, 7], vec![3, 5, 7], vec![8, 33]];
    let h = [("lr".to_string(), 0.01)];
    let mut ours = CubeOptimizer::new(reg.get("adamp").unwrap().entry, &h, &device).unwrap();
    let mut adam = CubeOptimizer::new(reg.get("adam").unwrap().entry, &h, &device).unwrap();
    let mut oracle = Optimizer::new(reg.get("adamp").unwrap().entry, &h).unwrap();
    let mut p: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, s)| values(50 + i as u64, s.iter().product()).iter().map(|&x| x as f32).collect()).collect();
    // Adam, fed the same gradients.
    let mut q = p.clone();
    let mut p64: Vec<Tensor> = p.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
    for step in 0..5u64 {
        let g: Vec<Vec<f32>> = p
            .iter()
            .zip(&shapes)
            .enumerate()
            .map(|(i, (w, s))| {
                let raw = values(700 + 10 * step + i as u64, w.len());
                if i == 1 {
                    // Not scale-invariant, beside one that is in the same stack: each tensor
                    // decides on its own sums.
                    return raw.iter().map(|&x| x as f32).collect();
                }
                let row = w.len() / s[0];
                let mut g = vec![0f32; w.len()];
                for r in 0..s[0] {
                    let (wr, gr) = (&w[r * row..(r + 1) * row], &raw[r * row..(r + 1) * row]);
                    let dot: f64 = wr.iter().zip(gr).map(|(a, b)| *a as f64 * b).sum();
                    let nn: f64 = wr.iter().map(|a| (*a as f64).powi(2)).sum();
                    for k in 0..row {
                        g[r * row + k] = (gr[k] - dot / nn * wr[k] as f64) as f32;
                    }
                }
                g
            })
            .collect();
        let gt: Vec<Tensor> = g.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
        ours.step_shaped(&mut p, &g, shapes.clone()).unwrap();
        adam.step_shaped(&mut q, &g, shapes.clone()).unwrap();
        oracle.step(&mut p64, &gt).unwrap();
        for (k, (a, b)) in p.iter().zip(&p64).enumerate() {
            let e = rel(a, &b.data);
            assert!(e < 1e-5, "tensor {k} after step {}: relative error {e:e}", step + 1);
        }
    }
    let moved = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(p.iter().zip(&q).any(|(a, b)| moved(a, b) > 1e-4), "AdamP projected nothing: it took Adam's steps");
}

#[test]
fn state_dtype_is_selectable() {
    // Moments stored in f16 and bf16, computed in f32: within 1e-2 of the
    // f64 reference after 5 steps of gradients of order one.
    let reg = registry();
    let device = cpu_device().unwrap();
    for dtype in [Dtype::F16, Dtype::BF16] {
        // bf16 without bf16 buffers (lavapipe) is held in f32 words rounded to bf16 (`Held`).
        dtype.held_on(&device.client()).unwrap();
        for name in ["adamw", "lamb", "adamp"] {
            let entry = reg.get(name).unwrap().entry;
            let h = [("lr".to_string(), 0.01)];
            let mut ours = CubeOptimizer::new(entry.clone(), &h, &device).unwrap().with_state_dtype(dtype).unwrap();
            let mut full = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
            let mut oracle = Optimizer::new(entry, &h).unwrap();
            let shapes = vec![vec![4, 50], vec![300], vec![3, 7]];
            let mut p: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, s)| values(i as u64 + 3, s.iter().product()).iter().map(|&x| x as f32).collect()).collect();
            let mut p64: Vec<Tensor> = p.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
            let mut p_full = p.clone();
            for step in 0..5u64 {
                let g: Vec<Vec<f32>> = p.iter().enumerate().map(|(i, v)| values(300 + 7 * step + i as u64, v.len()).iter().map(|&x| x as f32).collect()).collect();
                let gt: Vec<Tensor> = g.iter().zip(&shapes).map(|(v, s)| Tensor::new(s.clone(), v.iter().map(|&x| x as f64).collect()).unwrap()).collect();
                ours.step_shaped(&mut p, &g, shapes.clone()).unwrap();
                full.step_shaped(&mut p_full, &g, shapes.clone()).unwrap();
                oracle.step(&mut p64, &gt).unwrap();
            }
            // The state really is kept in `dtype`: the steps differ from those of f32 state.
            assert_ne!(p, p_full, "{name} {dtype:?}: the same steps as with f32 state");
            // The parameters move by about lr per step: compare the moves, not the values.
            let init: Vec<Vec<f64>> = shapes.iter().enumerate().map(|(i, s)| values(i as u64 + 3, s.iter().product()).iter().map(|&x| x as f32 as f64).collect()).collect();
            for (k, ((a, b), p0)) in p.iter().zip(&p64).zip(&init).enumerate() {
                let da: Vec<f32> = a.iter().zip(p0).map(|(x, y)| (*x as f64 - y) as f32).collect();
                let db: Vec<f64> = b.data.iter().zip(p0).map(|(x, y)| x - y).collect();
                let e = rel(&da, &db);
                assert!(e < 1e-2, "{name} {dtype:?}: tensor {k}: relative error of the update {e:e}");
            }
        }
    }
}

/// A parameter dtype changes what is stored, nothing else: every rule of `ELEMENTWISE` (fused,
/// with reductions, through layer kernels) and Muon (matrix products through layer kernels,
/// their f32 work arena) stepping f16 or bf16 parameters stores exactly the
/// rounded parameters the same rule computes for f32 ones from the same values, states of
/// that dtype in both, over 5 steps (each step the f32 run starts from the rounded values).
/// Checked exactly: the arithmetic is the same f32 and each store rounds to nearest.
#[test]
fn parameter_dtype_changes_only_what_is_stored() {
    let reg = registry();
    let device = cpu_device().unwrap();
    let vectors: Vec<Vec<usize>> = vec![vec![4, 50], vec![300], vec![3, 7], vec![2, 600]];
    let matrices: Vec<Vec<usize>> = vec![vec![9, 4], vec![4, 9], vec![33, 70]];
    let rules = ELEMENTWISE.iter().map(|&(name, lr)| (name, lr, &vectors)).chain([("muon", 0.02, &matrices)]);
    for dtype in [Dtype::F16, Dtype::BF16] {
        let held = dtype.held_on(&device.client()).unwrap();
        for (name, lr, shapes) in rules.clone() {
            let entry = reg.get(name).unwrap().entry;
            let h = [("lr".to_string(), lr)];
            let mut narrow = CubeOptimizer::new(entry.clone(), &h, &device).unwrap().with_param_dtype(dtype).unwrap().with_state_dtype(dtype).unwrap();
            let mut wide = CubeOptimizer::new(entry.clone(), &h, &device).unwrap().with_state_dtype(dtype).unwrap();
            let rounded = |mut v: Vec<f32>| {
                dtype.round(&mut v);
                v
            };
            let mut p: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, s)| rounded(values(i as u64 + 3, s.iter().product()).iter().map(|&x| x as f32).collect())).collect();
            for step in 1..=5u64 {
                let g: Vec<Vec<f32>> = p.iter().enumerate().map(|(i, v)| rounded(values(300 + 7 * step + i as u64, v.len()).iter().map(|&x| x as f32).collect())).collect();
                let mut q = p.clone();
                narrow.step_shaped(&mut p, &g, shapes.clone()).unwrap();
                wide.step_shaped(&mut q, &g, shapes.clone()).unwrap();
                for (k, (a, b)) in p.iter().zip(q).enumerate() {
                    assert_ne!(a, &b, "{name} {dtype:?}: tensor {k} after step {step}: the f32 run stored {dtype:?} values");
                    assert_eq!(a, &rounded(b), "{name} {dtype:?} ({held:?}): tensor {k} after step {step}");
                }
            }
        }
    }
}

/// A clipped step — every gradient read as c times its value (`step_shaped_scaled`: the fused
/// kernels of `Compiled::grad_scaled` multiply each where they load it; the rules through layer
/// kernels get their gradients scaled first) — against the same rule fed the gradients
/// multiplied by c beforehand, in f32 as the kernels multiply: the same steps, and each scaled
/// gradient load feeds one multiply by the scalar buffer's last entry, and nothing else.
/// The step phases that reduce nothing give the same values in every layout the GPU check
/// times — vectors of four (the default), an element per access, one block per cube — with f32,
/// bf16 (held in f32 words) and f16 storage: the same arithmetic per element, so exactly.
#[test]
fn every_layout_steps_alike() {
    use normforge_cubecl::kernel::StepLayout;
    let reg = registry();
    let device = cpu_device().unwrap();
    // Tensors ending inside a vector, a block and a cube, and a reducing rule (LAMB), whose
    // last phase is elementwise.
    let shapes: Vec<Vec<usize>> = vec![vec![4, 50], vec![301], vec![3, 7], vec![1030]];
    for (name, lr) in ELEMENTWISE.iter().copied().chain([("lamb", 1e-2)]) {
        let entry = reg.get(name).unwrap().entry;
        for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let made = |layout: StepLayout| {
                let opt = CubeOptimizer::new(entry.clone(), &[("lr".to_string(), lr)], &device).unwrap();
                opt.with_param_dtype(dtype).and_then(|o| o.with_state_dtype(dtype)).and_then(|o| o.with_layout(layout))
            };
            let Ok(mut want) = made(StepLayout::DEFAULT) else {
                eprintln!("{name} {dtype:?}: this adapter has no such buffers; skipped");
                continue;
            };
            let mut others: Vec<_> = StepLayout::COMPARED[1..].iter().map(|&l| (l, made(l).unwrap())).collect();
            let mut p: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, s)| values(i as u64 + 9, s.iter().product()).iter().map(|&x| x as f32).collect()).collect();
            let mut theirs = vec![p.clone(); others.len()];
            for step in 1..=3u64 {
                let g: Vec<Vec<f32>> = p.iter().enumerate().map(|(i, v)| values(900 + 7 * step + i as u64, v.len()).iter().map(|&x| x as f32).collect()).collect();
                want.step_shaped(&mut p, &g, shapes.clone()).unwrap();
                for ((layout, opt), q) in others.iter_mut().zip(&mut theirs) {
                    opt.step_shaped(q, &g, shapes.clone()).unwrap();
                    for (k, (a, b)) in p.iter().zip(q.iter()).enumerate() {
                        let first = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
                        assert!(first.is_none(), "{name} {dtype:?}: layout {} after step {step}, tensor {k} element {}: {} against {} in {}", layout.name(), first.unwrap(), b[first.unwrap()], a[first.unwrap()], StepLayout::DEFAULT.name());
                    }
                }
            }
        }
    }
    let bad = StepLayout { blocks_per_cube: 2, lanes: 4 };
    let entry = reg.get("adamw").unwrap().entry;
    let err = CubeOptimizer::new(entry, &[], &device).unwrap().with_layout(bad).err().expect("lanes past the blocks are refused");
    assert!(err.0.contains("2 blocks per cube of 4 lanes"), "{}", err.0);
}

#[test]
fn scaled_gradients_step_as_gradients_scaled_first() {
    use normforge_cubecl::kernel::{BOp, KOp, Pure};
    let reg = registry();
    let device = cpu_device().unwrap();
    let vectors: Vec<Vec<usize>> = vec![vec![4, 50], vec![300], vec![3, 7]];
    let matrices: Vec<Vec<usize>> = vec![vec![9, 4], vec![33, 70]];
    let c = 0.37f64;
    let mut changed = Vec::new();
    for (name, lr, shapes) in ELEMENTWISE.iter().map(|&(name, lr)| (name, lr, &vectors)).chain([("muon", 0.02, &matrices)]) {
        let entry = reg.get(name).unwrap().entry;
        if let Programs::Optimizer { step } = &entry.programs {
            if let Ok(prog) = normforge_cubecl::compile(&entry, step) {
                let scaled = prog.grad_scaled();
                let scalars = prog.scalars(&normforge_dsl::hyper::resolve(&entry, &[]).unwrap(), 1.0, c);
                let last = scalars.len() - 1;
                assert_eq!(scalars[last], c as f32, "{name}: the scale is the scalar buffer's last entry");
                for (a, b) in prog.phases.iter().zip(&scaled.phases) {
                    assert_eq!(a.loads(), b.loads(), "{name}: the same loads");
                    let gradients = a.ops.iter().filter(|op| **op == KOp::LoadG).count();
                    assert_eq!(b.ops.len(), a.ops.len() + 2 * gradients, "{name}");
                    for (k, _) in b.ops.iter().enumerate().filter(|(_, op)| **op == KOp::LoadG) {
                        assert_eq!(b.ops[k + 1], KOp::Pure(Pure::Scalar(last)), "{name}");
                        assert_eq!(b.ops[k + 2], KOp::Pure(Pure::Binary(BOp::Mul, k, k + 1)), "{name}");
                        // Nothing reads the unscaled load but its product.
                        let reads = |op: &KOp| match op {
                            KOp::Pure(p) => {
                                let mut hit = false;
                                p.map(|a| {
                                    hit |= a == k;
                                    a
                                });
                                hit
                            }
                            KOp::Accum(_, a) | KOp::StoreP(a) | KOp::StoreState(_, a) => *a == k,
                            _ => false,
                        };
                        assert_eq!(b.ops.iter().filter(|op| reads(op)).count(), 1, "{name}");
                    }
                }
            }
        }
        let h = [("lr".to_string(), lr)];
        let mut scaled = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
        let mut first = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
        let mut plain = CubeOptimizer::new(entry.clone(), &h, &device).unwrap();
        let mut p: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, s)| values(i as u64 + 5, s.iter().product()).iter().map(|&x| x as f32).collect()).collect();
        let (mut q, mut u) = (p.clone(), p.clone());
        for step in 1..=5u64 {
            let g: Vec<Vec<f32>> = p.iter().enumerate().map(|(i, v)| values(500 + 7 * step + i as u64, v.len()).iter().map(|&x| x as f32).collect()).collect();
            // Clipped steps and unclipped ones in turn, as a training run meets them: the same
            // states whichever kernels ran last.
            let c = if step == 4 { 1.0 } else { c };
            let gc: Vec<Vec<f32>> = g.iter().map(|v| v.iter().map(|x| x * c as f32).collect()).collect();
            scaled.step_shaped_scaled(&mut p, &g, shapes.clone(), c).unwrap();
            first.step_shaped(&mut q, &gc, shapes.clone()).unwrap();
            plain.step_shaped(&mut u, &g, shapes.clone()).unwrap();
            // Exactly: lavapipe rounds the product before anything adds to it (CUDA's default
            // contraction may fuse it into a later add instead: a rounding apart there).
            for (k, (a, b)) in p.iter().zip(&q).enumerate() {
                assert_eq!(a, b, "{name}: tensor {k} after step {step}, against the step on gradients scaled first");
            }
        }
        if p != u {
            changed.push(name);
        }
    }
    // (Rules that normalise the gradient — Adam's kind away from eps, Lion's sign, Muon —
    // barely see a scale; these see it plainly.)
    for name in ["sgd", "lars", "sgdp", "adamp"] {
        assert!(changed.contains(&name), "{name}: the scaled step is the unscaled one");
    }
}

#[test]
fn stacked_rules_swap_where_their_states_are_read_and_written() {
    // The CUDA path keeps a stack's work arena between steps and swaps, on alternate steps,
    // where each state is read and where its new value goes: no state is copied. The rules
    // above run their odd steps swapped; here, that every such rule can swap, and that a swap
    // exchanges the offsets (twice: back where it started).
    let reg = registry();
    let mut swapped = 0;
    for r in reg.list(None) {
        let Programs::Optimizer { step } = &r.entry.programs else { continue };
        if normforge_cubecl::compile(&r.entry, step).is_ok() {
            continue;
        }
        let plans = normforge_cubecl::Stacked::new(&r.entry, step).unwrap();
        let hp = normforge_dsl::hyper::resolve(&r.entry, &[]).unwrap();
        let b = plans.bind(3, &[6, 6], &hp, "p").unwrap();
        let lay = normforge_cubecl::layout(&plans.step, &b, &hp, 1.0, &normforge_cubecl::Launch::default()).unwrap();
        let mut other = lay.clone();
        assert!(other.swap_states(&plans.step), "{}: states cannot swap", r.name);
        assert_ne!(other.offsets, lay.offsets, "{}", r.name);
        assert_ne!(other.meta, lay.meta, "{}", r.name);
        assert!(other.swap_states(&plans.step));
        assert_eq!((other.offsets, other.meta), (lay.offsets, lay.meta), "{}", r.name);
        swapped += 1;
    }
    assert!(swapped >= 3, "adamp, sgdp, muon");
}

/// Every rule that runs through layer kernels writes its new parameter over the old one: the
/// parameter alone fills the `io` arena (the CUDA path passes the parameter itself there, and
/// copies nothing back), and the work arena keeps no parameter-sized place for it. The rules
/// above check the values against the reference.
#[test]
fn stacked_rules_update_their_parameter_in_place() {
    let reg = registry();
    let mut stacked = 0;
    for r in reg.list(None) {
        let Programs::Optimizer { step } = &r.entry.programs else {
            // A layer's output is never its input.
            let Programs::Layer { train, .. } = &r.entry.programs else { unreachable!() };
            assert!(!normforge_cubecl::plan(&r.entry, train).unwrap().in_place(), "{}", r.name);
            continue;
        };
        if normforge_cubecl::compile(&r.entry, step).is_ok() {
            continue;
        }
        let plans = normforge_cubecl::Stacked::new(&r.entry, step).unwrap();
        assert!(plans.step.in_place(), "{}", r.name);
        let hp = normforge_dsl::hyper::resolve(&r.entry, &[]).unwrap();
        let shape = [24, 40];
        let b = plans.bind(3, &shape, &hp, "p").unwrap();
        let lay = normforge_cubecl::layout(&plans.step, &b, &hp, 1.0, &normforge_cubecl::Launch::default()).unwrap();
        let n = 3 * 24 * 40;
        assert_eq!(lay.io_len, n, "{}", r.name);
        // In the work arena, of the stack's size: where each state is read and where its new
        // value goes, and (Muon) the Newton–Schulz iterates; nowhere the new parameter.
        let full: Vec<_> = (0..plans.step.tensors.len()).filter(|&t| plans.step.tensors[t].2 == normforge_cubecl::kernel::Buf::Work && lay.len(&plans.step, t) == n).map(|t| plans.step.tensors[t].0).collect();
        if r.name != "muon" {
            assert_eq!(full.len(), 2 * r.entry.states.len(), "{}: {full:?}", r.name);
        }
        stacked += 1;
    }
    assert_eq!(stacked, 3, "adamp, sgdp, muon");
}

/// Reads and writes of parameter-sized tensors per step, counting a tensor once per kernel
/// (a cube's rows are read again from cache): the first kernel stores each new state, the
/// update loads it rather than the gradient and the old state again, and a load only the
/// branch not taken needs (`nesterov`, false by default) is skipped — AdamP 7 + 3, was 8 + 3;
/// SGDP 5 + 2, was 6 + 2. And two walks over the parameter's elements: the first kernel's
/// reductions in one (a max over channels of a per-channel value folds the channels, not
/// every weight, so none of them waits for another), then the update. The values:
/// `rules_match_the_reference_over_fifty_tensors`, `bool_hyper_parameters_take_either_branch`.
#[test]
fn stacked_rules_read_the_states_their_first_kernel_stored() {
    use normforge_cubecl::kernel::LOp;
    let reg = registry();
    for (name, want) in [("adamp", (7, 3)), ("sgdp", (5, 2))] {
        let entry = reg.get(name).unwrap().entry;
        let Programs::Optimizer { step } = &entry.programs else { unreachable!() };
        let plans = normforge_cubecl::Stacked::new(&entry, step).unwrap();
        let hp = normforge_dsl::hyper::resolve(&entry, &[]).unwrap();
        let b = plans.bind(2, &[24, 40], &hp, "p").unwrap();
        let lay = normforge_cubecl::layout(&plans.step, &b, &hp, 1.0, &normforge_cubecl::Launch::default()).unwrap();
        let n = 2 * 24 * 40;
        let full = |t: usize| lay.len(&plans.step, t) == n;
        let (mut reads, mut writes) = (0, 0);
        let walks = lay.launches.iter().flat_map(|(k, _)| &k.phases).filter(|ph| lay.sizes[ph.domain] == n).count();
        assert_eq!(walks, 2, "{name}");
        for (k, _) in &lay.launches {
            let mut loaded = Vec::new();
            let mut stored = Vec::new();
            for ph in &k.phases {
                for (op, guard) in ph.ops.iter().zip(ph.guards()) {
                    let taken = guard.is_none_or(|(s, want)| (lay.scalars[s] != 0.0) == want);
                    if let LOp::Load(t, ..) = *op {
                        if taken && full(t) && !loaded.contains(&t) {
                            loaded.push(t);
                        }
                    }
                }
                for &(t, ..) in &ph.stores {
                    if full(t) && !stored.contains(&t) {
                        stored.push(t);
                    }
                }
            }
            reads += loaded.len();
            writes += stored.len();
        }
        assert_eq!((reads, writes), want, "{name}");
    }
}

#[test]
fn every_std_rule_is_covered() {
    for r in registry().list(None) {
        if r.entry.kind == normforge_dsl::ir::Kind::Optimizer {
            // Muon takes matrices only: `muon_matches_the_reference_on_matrices`.
            let covered = ELEMENTWISE.iter().any(|(n, _)| *n == r.name) || r.name == "muon";
            assert!(covered, "`{}` is not checked on lavapipe", r.name);
        }
    }
}

/// Muon's Newton–Schulz products fold a Gram matrix's every entry over a row — a stack's m x m
/// x n values for the wide form of m x n matrices, n x n x m for the tall form, both laid out
/// whichever a call takes — past the 32-bit shape tables from 2^32 on. `indexable` says so
/// before `layout` is asked (the CUDA path then steps such matrices in libtorch's operations),
/// and `layout` refuses exactly what it does not index.
#[test]
fn products_past_32_bit_indexing_are_found_before_layout() {
    let entry = registry().get("muon").unwrap().entry;
    let Programs::Optimizer { step } = &entry.programs else { unreachable!() };
    let plans = normforge_cubecl::Stacked::new(&entry, step).unwrap();
    let hp = normforge_dsl::hyper::resolve(&entry, &[]).unwrap();
    let cases = [
        (1, [64, 300], true),
        (1, [1024, 4096], false),
        (1, [4096, 1024], false),
        // 1625^3 < 2^32 <= 1626^3
        (1, [1625, 1625], true),
        (1, [1626, 1626], false),
        // The wide form would fit; the tall one's 4096 x 4096 x 1000 does not.
        (1, [1000, 4096], false),
        (3, [1024, 1024], true),
        (4, [1024, 1024], false),
    ];
    for (count, shape, fits) in cases {
        let b = plans.bind(count, &shape, &hp, "p").unwrap();
        let indexable = normforge_cubecl::indexable(&plans.step, &b, &hp).unwrap();
        let laid = normforge_cubecl::layout(&plans.step, &b, &hp, 1.0, &normforge_cubecl::Launch::default());
        assert_eq!(indexable, fits, "{count} x {shape:?}");
        assert_eq!(laid.is_ok(), fits, "{count} x {shape:?}: {:?}", laid.err());
    }
}
