//! What the CUDA path passes a kernel, checked against the generated code on a machine with no
//! GPU: as many buffer pointers as the kernel declares, and an `info_st` of the size it reads
//! (CubeCL's own packing), for rule kernels and both variants of every layer kernel (the
//! per-unit ones also compiled by NVRTC; the nvrtc test compiles the rest); the flat arena's views and in-place gradient accumulation; and, with
//! no GPU, clear errors instead of launches.

use normforge_cubecl::emit::{self, Lang};
use normforge_cubecl::kernel::{LProgram, BLOCK};
use normforge_cubecl::{compile, Dtype, Precision};
use normforge_cuda::plans::LAYER_BUFFERS;
use normforge_cuda::{driver, Arena, Gpu};
use normforge_dsl::ir::{Kind as EntryKind, Programs};
use tch::{Kind, Tensor};

/// Buffer parameters of the one kernel of a unit, and the `static_meta` length of its info.
fn signature(src: &str) -> (usize, usize) {
    let start = src.find("__global__").unwrap();
    let sig = &src[start..start + src[start..].find('{').unwrap()];
    let buffers = sig.matches("__restrict__").count() - 1; // the last is the info pointer
    let meta = src.split("static_meta[").nth(1).map_or(0, |r| r[..r.find(']').unwrap()].parse().unwrap());
    (buffers, meta)
}

/// The pointer types of a kernel's parameters, in order (`float const*`).
fn parameter_types(src: &str) -> Vec<String> {
    let start = src.find("__global__").unwrap();
    let sig = &src[start..start + src[start..].find('{').unwrap()];
    let list = &sig[sig.rfind("](").map_or_else(|| sig.rfind('(').unwrap(), |i| i + 1) + 1..sig.rfind(')').unwrap()];
    list.split(", ").map(|p| p[..p.find(" const __restrict__").unwrap()].to_string()).collect()
}

#[test]
fn every_fused_rule_kernel_takes_the_arguments_the_cuda_path_passes() {
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let mut checked = 0;
    for r in reg.list(None) {
        let e = &r.entry;
        let Programs::Optimizer { step } = &e.programs else { continue };
        for prog in [step, &e.init] {
            // Rules with per-axis reductions are not on the fused path (CudaOptimizer refuses them).
            let Ok(c) = compile(e, prog) else { continue };
            // The parameter and gradient arenas in the parameters' dtype, the state in its own,
            // the rest f32 and the block table's words: as `CudaOptimizer::run` passes them.
            for (types, p, s) in [(Precision::default(), "float", "float"), (Precision { param: Dtype::BF16, state: Dtype::F32 }, "__nv_bfloat16", "float"), (Precision::uniform(Dtype::F16), "__half", "__half")] {
                let mut units = emit::program_units(&c, types, Lang::Cuda).unwrap().into_iter();
                for phase in &c.phases {
                    let unit = units.next().unwrap();
                    // A launch gives exactly the shared memory the tree reduction indexes.
                    assert_eq!(unit.shared_bytes, phase.accums.len() * BLOCK * 4, "{}: step kernel shared memory", e.name);
                    let (buffers, meta) = signature(&unit.source);
                    assert_eq!(buffers, 7, "{}: step kernel buffers", e.name);
                    assert_eq!(meta * 4, driver::info(&[1; 7]).len(), "{}: step kernel info", e.name);
                    let elements: Vec<String> = parameter_types(&unit.source).iter().map(|t| t.split([' ', '*']).next().unwrap().to_string()).collect();
                    // The parameter, gradient and state streams as vectors of the phase's lanes
                    // (their lengths in the info count vectors: `StepSizes::step`).
                    let lanes = |t: &str| if phase.lanes == 1 { t.to_string() } else { format!("{t}_{}", phase.lanes) };
                    assert_eq!(elements, [lanes(p), lanes(p), lanes(s), "float".into(), "uint32_t".into(), "float".into(), "float".into(), "info_st".into()], "{} {types:?}: step kernel parameters", e.name);
                    if !phase.accums.is_empty() {
                        let (buffers, meta) = signature(&units.next().unwrap().source);
                        assert_eq!(buffers, 3, "{}: combine kernel buffers", e.name);
                        assert_eq!(meta * 4, driver::info(&[1; 3]).len(), "{}: combine kernel info", e.name);
                    }
                    checked += 1;
                }
                assert!(units.next().is_none(), "{}: a unit no phase launches", e.name);
            }
        }
    }
    assert!(checked >= 3 * 28, "{checked} phases");
}

#[test]
fn every_layer_kernel_variant_takes_the_arguments_the_cuda_path_passes() {
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let nvrtc = normforge_cuda::Compiler::new("compute_90", normforge_cuda::Compiler::default_include_dirs(), None).ok();
    let (mut variants, mut big) = (0, 0);
    for r in reg.list(None) {
        let Programs::Layer { train, eval, train_backward, eval_backward } = &r.entry.programs else { continue };
        for prog in [train, eval, train_backward, eval_backward] {
            let plan = normforge_cubecl::plan(&r.entry, prog).unwrap();
            // Short reductions fold per unit, long ones per cube (or per few neighbouring
            // columns): all are launched. So is a row kernel folding column sums too, and the
            // kernel folding its partials.
            let launch = normforge_cubecl::Launch::default();
            let mut kernels: Vec<LProgram> = Vec::new();
            for k in &plan.kernels {
                kernels.extend([(1, 1), (1 << 20, 1), (1 << 20, 1 << 20)].map(|(per_value, last)| normforge_cubecl::launched(k, per_value, last, &launch)));
                // Values of 4096 elements: loads read again kept in registers; of 25088 (an
                // EvoNorm's group at the GPU check's shape): kept by a cube of 1024 units.
                for n in [4096, 25088] {
                    kernels.push(normforge_cubecl::keeping(normforge_cubecl::launched(k, n, 1, &launch), &|_| n, &launch));
                }
            }
            if let Some(a) = &plan.across {
                for (i, k) in a.kernels.iter().enumerate() {
                    // The row kernel as launched for rows of 4096, its loads kept in registers.
                    kernels.push(if i == a.row { normforge_cubecl::keeping(a.row_kernel(4096), &|_| 4096, &launch) } else { normforge_cubecl::launched(k, 1 << 20, 1 << 20, &launch) });
                }
            }
            {
                for launched in kernels {
                    let unit = emit::layer_unit(&launched, Dtype::F32, Lang::Cuda).unwrap();
                    let src = unit.source;
                    let want = if launched.cube_per_value() && launched.reductions() > 0 { launched.units * 4 } else { 0 };
                    assert_eq!(unit.shared_bytes, want, "{}: layer kernel shared memory", r.name);
                    // The cube the launch gives it is the one it was generated for.
                    assert!(src.contains(&format!("__launch_bounds__({})", launched.units)), "{}: launch bounds", r.name);
                    big += (launched.units > BLOCK) as usize;
                    assert_eq!(src.contains("extern __shared__"), want > 0, "{}: shared declaration", r.name);
                    let (buffers, meta) = signature(&src);
                    assert_eq!(buffers, LAYER_BUFFERS, "{}: layer kernel buffers", r.name);
                    // In the order `PlanKernels::run` passes them: the input and the output
                    // gradient read-only in the storage type, the arenas, then the tables.
                    // (CubeCL makes an arena a kernel does not write `const` too.)
                    let types = parameter_types(&src);
                    let elements: Vec<&str> = types.iter().map(|t| t.split([' ', '*']).next().unwrap()).collect();
                    assert_eq!(elements, ["float", "float", "float", "float", "uint32_t", "float", "info_st"], "{}: layer kernel parameters", r.name);
                    assert!(types[..2].iter().all(|t| t == "float const*"), "{}: the input and gradient are written: {types:?}", r.name);
                    assert_eq!(meta * 4, driver::info(&[1; LAYER_BUFFERS]).len(), "{}: layer kernel info", r.name);
                    if let (Some(c), false) = (&nvrtc, launched.cooperative) {
                        c.compile(&src).unwrap_or_else(|e| panic!("{}: {e}", r.name));
                    }
                    variants += 1;
                }
            }
        }
    }
    assert!(variants >= 19 * 4 * 2, "{variants} variants");
    assert!(big > 0, "no kernel kept its loads in a cube of more than {BLOCK} units");
}

/// A kernel reading rows a vector at a time (`LProgram::vector`) takes the input, the output
/// gradient and the `io` arena as 16-byte vectors of the storage type, aligned to 16 — the
/// alignment `PlanKernels::run_laid` checks each pointer for —, the rest as any layer kernel:
/// the kernels the GPU check's layers launch at 16384 x 4096, in f32, bf16 and f16 (each
/// compiled by NVRTC where it is installed).
#[test]
fn vectorized_layer_kernels_take_aligned_vectors_of_the_storage_type() {
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let nvrtc = normforge_cuda::Compiler::new("compute_90", normforge_cuda::Compiler::default_include_dirs(), None).ok();
    let launch = normforge_cubecl::Launch::default();
    let mut checked = 0;
    for name in ["layer_norm", "rms_norm", "dyt"] {
        let e = reg.get(name).unwrap().entry;
        let Programs::Layer { train, train_backward, .. } = &e.programs else { unreachable!() };
        let b = normforge_dsl::bind::bind_axes(&e.axes, &[16384, 4096], "x").unwrap();
        let hp = normforge_dsl::hyper::resolve(&e, &[]).unwrap();
        for prog in [train, train_backward] {
            for (dtype, vector) in [(Dtype::F32, "float_4"), (Dtype::BF16, "__nv_bfloat16_8"), (Dtype::F16, "__half_8")] {
                let mut lay = normforge_cubecl::layout(&normforge_cubecl::plan(&e, prog).unwrap(), &b, &hp, 0.0, &launch).unwrap();
                lay.vectorize(dtype.size(), &launch);
                for (k, _) in lay.launches.iter().filter(|(k, _)| k.vector > 1) {
                    assert_eq!(k.vector * dtype.size(), launch.vector_bytes, "{name} {dtype:?}");
                    let src = emit::layer_unit(k, dtype, Lang::Cuda).unwrap().source;
                    assert!(src.contains(&format!("struct alignas(16) {vector} {{")), "{name} {dtype:?}: {vector} undeclared or unaligned");
                    let types = parameter_types(&src);
                    let io = format!("{vector} *");
                    assert_eq!(&types[..3], [format!("{vector} const*"), format!("{vector} const*"), io], "{name} {dtype:?}");
                    // (`work` is `const` where the kernel writes nothing there.)
                    assert!(["float *", "float const*"].contains(&types[3].as_str()), "{name} {dtype:?}: {types:?}");
                    assert_eq!(&types[4..], ["uint32_t const*", "float const*", "info_st const*"], "{name} {dtype:?}");
                    let (buffers, meta) = signature(&src);
                    assert_eq!((buffers, meta * 4), (LAYER_BUFFERS, driver::info(&[1; LAYER_BUFFERS]).len()), "{name} {dtype:?}");
                    if let Some(c) = &nvrtc {
                        c.compile(&src).unwrap_or_else(|e| panic!("{name} {dtype:?}: {e}"));
                    }
                    checked += 1;
                }
            }
        }
    }
    // Per dtype: the three forwards (DyT's elementwise), and the three backwards' row kernels.
    assert_eq!(checked, 3 * 6);
}

#[test]
fn info_holds_each_buffer_length_in_order() {
    let bytes = driver::info(&[10, 20, 30]);
    let words: Vec<u32> = bytes.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(&words[..3], &[10, 20, 30]);
    assert!(words[3..].iter().all(|&w| w == 0), "padding: {words:?}");
}

#[test]
fn entry_points_are_found_with_or_without_launch_bounds() {
    assert_eq!(driver::entry_point("extern \"C\" __global__ void __launch_bounds__(256)  step_f32_ab12(float* a) {}"), Some("step_f32_ab12"));
    assert_eq!(driver::entry_point("extern \"C\" __global__ void k(int x) {}"), Some("k"));
    assert_eq!(driver::entry_point("__device__ int f(int x);"), None);
    assert_eq!(driver::architecture(9, 0), "compute_90");
}

#[test]
fn the_arena_makes_parameters_views_and_gradients_accumulate_in_place() {
    let mut vars = vec![
        Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true),
        Tensor::from_slice(&(0..300).map(|i| i as f32).collect::<Vec<_>>()).reshape([3, 100]).set_requires_grad(true),
    ];
    let mut arena = Arena::adopt(&mut vars).unwrap();
    assert_eq!(arena.sizes, vec![3, 300]);
    // One block and two, and one of padding: whole cubes of four blocks for the step kernels.
    assert_eq!(arena.cubes, 1 + 2 + 1);
    assert_eq!(arena.p.numel(), 4 * 256);
    // Each tensor's own elements, as the per-tensor path reads them: views of the flat buffers.
    assert_eq!(Vec::<f32>::try_from(arena.tensor(&arena.p, 1)).unwrap(), (0..300).map(|i| i as f32).collect::<Vec<_>>());
    assert_eq!(arena.tensor(&arena.g, 0).data_ptr(), arena.g.data_ptr());
    // Values moved in: tensor 1 starts at the second cube.
    assert_eq!(f64::try_from(arena.p.get(1)).unwrap(), 2.0);
    assert_eq!(f64::try_from(arena.p.get(256 + 299)).unwrap(), 299.0);
    // Writing the flat buffer changes the parameters.
    tch::no_grad(|| {
        let _ = arena.p.shallow_clone().g_mul_scalar_(2.0);
    });
    assert_eq!(Vec::<f32>::try_from(&vars[0]).unwrap(), vec![2.0, 4.0, 6.0]);
    // Backpropagation lands in the flat gradient buffer, twice = accumulated.
    for _ in 0..2 {
        (vars[0].sum(Kind::Float) * 3.0 + vars[1].square().sum(Kind::Float)).backward();
    }
    assert_eq!(f64::try_from(arena.g.get(2)).unwrap(), 6.0);
    assert_eq!(f64::try_from(arena.g.get(256 + 10)).unwrap(), 2.0 * (2.0 * 20.0), "d(x^2)/dx at x = 20 (doubled from 10), accumulated twice");
    assert_eq!(f64::try_from(arena.g.get(3)).unwrap(), 0.0, "padding stays zero");
    // The norm, padding contributing nothing: sqrt(3 * 6^2 + sum_i (8 i)^2). Summed in f32,
    // so within what any order of 303 roundings in f32 allows (each square is exact there).
    let want = (3.0 * 36.0 + (0..300).map(|i| (8.0 * i as f64).powi(2)).sum::<f64>()).sqrt();
    assert!((arena.grad_norm() - want).abs() < 303.0 * f64::from(f32::EPSILON) * want, "{} vs {want}", arena.grad_norm());
    // Several arenas' norms read back together: each its own.
    let mut other_vars = vec![Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true)];
    let other = Arena::adopt(&mut other_vars).unwrap();
    tch::no_grad(|| {
        other_vars[0].grad().copy_(&Tensor::from_slice(&[3.0f32, 4.0]));
    });
    assert_eq!(Arena::grad_norms(&[&other, &arena, &other]), vec![5.0, arena.grad_norm(), 5.0]);
    assert!(Arena::grad_norms(&[]).is_empty());
    // An arena of no parameters (a group a split left empty) has a zero norm.
    let empty = Arena::adopt(&mut []).unwrap();
    assert!(empty.is_empty());
    assert_eq!(Arena::grad_norms(&[&empty, &other]), vec![0.0, 5.0]);
    assert_eq!(arena.nonfinite_grad(), None);
    arena.scale_grads(0.5);
    assert_eq!(f64::try_from(arena.g.get(2)).unwrap(), 3.0);
    // Values whose squares overflow f32 are finite; NaN and infinity are found, by tensor.
    tch::no_grad(|| {
        let _ = vars[0].grad().fill_(1e30);
    });
    // (Summed again in f64 there: exactly the norm of those values.)
    let want = (3.0 * f64::from(1e30f32).powi(2) + (0..300).map(|i| (4.0 * i as f64).powi(2)).sum::<f64>()).sqrt();
    assert!((arena.grad_norm() - want).abs() < 1e-12 * want, "{} vs {want}", arena.grad_norm());
    for bad in [f64::NAN, f64::INFINITY] {
        tch::no_grad(|| {
            let _ = vars[1].grad().get(2).get(7).fill_(bad);
        });
        assert!(!arena.grad_norm().is_finite(), "{bad}");
        assert_eq!(arena.nonfinite_grad(), Some(1), "{bad}");
    }
    arena.zero_grad();
    assert_eq!(f64::try_from(vars[1].grad().abs().sum(Kind::Float)).unwrap(), 0.0);
    assert_eq!(arena.grad_norm(), 0.0);
    // Every parameter where the arena put it; then one taken by a second arena, and one whose
    // gradient was set to none, are found.
    assert_eq!(arena.moved(&vars), None);
    let mut taken = vec![vars[1].shallow_clone()];
    let _second = Arena::adopt(&mut taken).unwrap();
    assert_eq!(arena.moved(&vars), Some(1));
    let mut fresh = vec![Tensor::from_slice(&[1.0f32]).set_requires_grad(true)];
    let own = Arena::adopt(&mut fresh).unwrap();
    assert_eq!(own.moved(&fresh), None);
    normforge_tch::shim::clear_grad(&mut fresh[0]).unwrap();
    assert_eq!(own.moved(&fresh), Some(0));
}

#[test]
fn the_arena_refuses_mixed_tensors_and_changes_nothing() {
    let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    let b = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
    let before = a.data_ptr();
    let mut vars = vec![a.shallow_clone(), b];
    let e = Arena::adopt(&mut vars).err().expect("f64 after f32 refused");
    assert!(e.0.contains("parameter 1 is Double") && e.0.contains("of one kind (Float)"), "{e}");
    assert_eq!(a.data_ptr(), before, "the first parameter was not moved");
    let mut doubles = vec![Tensor::from_slice(&[1.0f64]).set_requires_grad(true)];
    let e = Arena::adopt(&mut doubles).err().expect("f64 refused");
    assert!(e.0.contains("f32, bf16 or f16"), "{e}");
    // bf16 parameters get bf16 buffers, their values kept.
    let values = [1.5f32, -2.0, 3.25];
    let mut halves: Vec<Tensor> = [&values[..2], &values[2..]].iter().map(|v| Tensor::from_slice(v).to_kind(Kind::BFloat16).set_requires_grad(true)).collect();
    let arena = Arena::adopt(&mut halves).unwrap();
    assert_eq!((arena.p.kind(), arena.g.kind(), arena.dtype()), (Kind::BFloat16, Kind::BFloat16, Dtype::BF16));
    let kept: Vec<f32> = halves.iter().flat_map(|t| Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap()).collect();
    assert_eq!(kept, values);
    assert_eq!(halves[1].data_ptr() as usize, arena.p.data_ptr() as usize + 2 * BLOCK, "the second tensor's view is a block on, in bf16");
}

/// The harness the GPU check holds our CUDA layer kernels to the reference backend with, run
/// here on libtorch's CPU ops (the lowered layer, differentiated by autograd): every std layer,
/// training and evaluation, within the GPU check's bounds. A parameter or buffer handed over in
/// the wrong place, or the buffers read after the forward updated them, would fail it.
#[test]
fn layer_calls_hold_to_the_reference_backend() {
    use normforge_tch::RegistryExt;
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let mut layers = 0;
    for r in reg.list(None).into_iter().filter(|r| r.entry.kind != EntryKind::Optimizer) {
        let shape: Vec<i64> = if r.entry.axes.len() == 2 { vec![8, 3, 100] } else { vec![4, 8, 6, 6] };
        let mut spec = reg.layer(&r.name).unwrap();
        if r.entry.hparams.iter().any(|h| h.name == "groups") {
            spec = spec.hparam("groups", 2.0);
        }
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let layer = spec.build(&vs.root(), &shape).unwrap();
        let _seeded = normforge_tch::seeded(5);
        tch::no_grad(|| {
            for t in layer.params().iter().chain(layer.buffers()) {
                t.shallow_clone().copy_(&(Tensor::rand(t.size(), (Kind::Float, tch::Device::Cpu)) * 0.5 + 0.75));
            }
        });
        for train in [true, false] {
            let x = (Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu)) * 2.0 + 0.3).set_requires_grad(true);
            let gy = Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu));
            for p in layer.params() {
                p.shallow_clone().zero_grad();
            }
            let before: Vec<Tensor> = layer.buffers().iter().map(Tensor::copy).collect();
            let y = layer.try_forward_t(&x, train).unwrap();
            (&y * &gy).sum(Kind::Float).backward();
            let grads: Vec<Tensor> = layer.params().iter().map(Tensor::grad).collect();
            let call = normforge_cuda::check::LayerCall {
                x: &x,
                gy: &gy,
                train,
                params: layer.params(),
                buffers_before: &before,
                buffers_after: layer.buffers(),
                y: &y,
                grad_x: &x.grad(),
                grad_params: &grads,
            };
            let (fwd, bwd) = normforge_cuda::check::layer_against_reference(&r.entry, layer.hparams(), &call).unwrap_or_else(|e| panic!("{}: {e}", r.name));
            assert!(fwd < 1e-5 && bwd < 1e-4, "{} (train: {train}): forward {fwd:e}, backward {bwd:e}", r.name);
        }
        layers += 1;
    }
    assert!(layers >= 19, "{layers} layers");
}

/// The oracle the GPU check holds the timed layer kernels to at their shapes (the layer lowered
/// to libtorch's operations in f64), here on the CPU with the same layer lowered in f32 in its
/// place: within the f32 bounds, and in bf16 (x and gy rounded to it, taken exactly in f64)
/// within the 2^-8 the GPU check allows; a layer whose epsilon differs is found.
#[test]
fn the_oracle_at_the_timed_shapes_finds_what_differs() {
    use normforge_tch::RegistryExt;
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let _seeded = normforge_tch::seeded(23);
    for (name, shape) in [("layer_norm", vec![64i64, 256]), ("rms_norm", vec![64, 256]), ("evonorm_s0", vec![2, 64, 5, 5])] {
        let mut spec = reg.layer(name).unwrap();
        if name == "evonorm_s0" {
            spec = spec.hparam("groups", 8.0);
        }
        let x = Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu)) * 2.0 + 0.3;
        let gy = Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu));
        let oracle = normforge_cuda::check::LayerOracle::new(&spec, &shape, &x, &gy).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let same = spec.build(&vs.root(), &shape).unwrap();
        let (fwd, bwd) = oracle.errors(&same, &x, &gy).unwrap();
        assert!(fwd < 1e-5 && bwd < 1e-4, "{name}: forward {fwd:e}, backward {bwd:e}");
        assert!(fwd > 0.0 && bwd > 0.0, "{name}: f32 against f64 agrees exactly ({fwd:e}, {bwd:e}): is the oracle in f64?");
        // bf16 values, taken exactly: only the f32 arithmetic differs.
        let (xb, gb) = (x.to_kind(Kind::BFloat16), gy.to_kind(Kind::BFloat16));
        let oracle_b = normforge_cuda::check::LayerOracle::new(&spec, &shape, &xb, &gb).unwrap();
        let (fwd, bwd) = oracle_b.errors(&same, &xb.to_kind(Kind::Float), &gb.to_kind(Kind::Float)).unwrap();
        assert!(fwd < 1e-5 && bwd < 1e-4, "{name} from bf16 values: forward {fwd:e}, backward {bwd:e}");
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let off = spec.clone().hparam("eps", 0.1).build(&vs.root(), &shape).unwrap();
        let (fwd, bwd) = oracle.errors(&off, &x, &gy).unwrap();
        assert!(fwd > 1e-3 && bwd > 1e-3, "{name} with eps 0.1: forward {fwd:e}, backward {bwd:e}");
    }
}

/// The GPU half: skipped, visibly, without a GPU; on one, every rule on CUDA tensors (fused or
/// through layer kernels) follows the reference backend for 10 steps (the GPU check script runs these with a GPU).
#[test]
fn rules_on_cuda_tensors_follow_the_reference_backend() {
    let gpu = match Gpu::open(0, None) {
        Ok(g) if normforge_tch::load_cuda() => std::sync::Arc::new(g),
        Ok(_) => panic!("a CUDA device without libtorch CUDA support"),
        Err(e) => {
            eprintln!("SKIPPED (no GPU): {e}");
            return;
        }
    };
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    for r in reg.list(None) {
        if r.entry.kind != EntryKind::Optimizer {
            continue;
        }
        // Every rule: fused, or through layer kernels (AdamP, SGDP, Muon); Muon takes matrices.
        let shapes = &normforge_cuda::check::rule_shapes(&r.entry);
        // Every layout of the phases that reduce nothing the GPU check times (the default first);
        // a rule through layer kernels has none.
        let (fused, all) = (normforge_cuda::CudaOptimizer::new(gpu.clone(), r.entry.clone(), &[], normforge_cubecl::Precision::default()).is_ok_and(|o| o.fused()), normforge_cubecl::kernel::StepLayout::COMPARED);
        let layouts = if fused { &all[..] } else { &all[..1] };
        for &layout in layouts {
            let err = normforge_cuda::check::against_reference(&gpu, &r.entry, shapes, 10, layout).unwrap_or_else(|e| panic!("{}: {e}", r.name));
            let name = layout.name();
            assert!(err < 1e-5, "{} (layout {name}): relative error {err:e} after 10 steps", r.name);
            eprintln!("{} (layout {name}): 10 steps match the reference on {} ({}), relative error {err:.1e}", r.name, gpu.name(), gpu.arch());
        }
    }
}

/// The GPU half of the timing scaffolding: a hold of 3 ms keeps the stream 3 ms busy (the device
/// time of a run is the hold's), and a run timed behind a hold longer than its queueing is timed
/// by the device alone: skipped, visibly, without a GPU.
#[test]
fn a_hold_keeps_the_stream_busy_for_its_time() {
    let gpu = match Gpu::open(0, None) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED (no GPU): {e}");
            return;
        }
    };
    let stream = std::ptr::null_mut();
    let hold = std::time::Duration::from_millis(3);
    // Compiled and loaded here, not inside the first timed run.
    gpu.hold(stream, std::time::Duration::ZERO).unwrap();
    let t = gpu.time(stream, 5, std::time::Duration::ZERO, || {}, || gpu.hold(stream, hold).unwrap()).unwrap();
    for t in &t {
        assert!((3.0..30.0).contains(&t.device_ms), "a 3 ms hold took {} ms on the device", t.device_ms);
    }
    // Nothing queued between the events: a few microseconds, however slow the host was.
    let empty = gpu.time(stream, 5, hold, || {}, || std::thread::sleep(std::time::Duration::from_millis(1))).unwrap();
    for t in &empty {
        assert!(t.host_ms >= 1.0 && t.device_ms < 0.5, "{t:?}");
    }
}

#[test]
fn same_shaped_tensors_that_fill_whole_cubes_read_as_one_stack() {
    // 256 values fill a cube: the next tensor follows it directly; 3 values do not.
    let mut vars: Vec<Tensor> = [256i64, 256, 256, 3, 3]
        .iter()
        .enumerate()
        .map(|(k, &n)| Tensor::full([n], k as f64, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true))
        .collect();
    let arena = Arena::adopt(&mut vars).unwrap();
    let joins: Vec<bool> = (0..5).map(|k| arena.joins(k)).collect();
    assert_eq!(joins, [false, true, true, true, false]);
    assert_eq!(normforge_cubecl::stacks(&arena.shapes, |k| arena.joins(k)), vec![0..3, 3..4, 4..5]);
    let stack = Vec::<f32>::try_from(arena.stack(&arena.p, 0..3)).unwrap();
    assert_eq!(stack, (0..768).map(|i| (i / 256) as f32).collect::<Vec<_>>());
    assert_eq!(Vec::<f32>::try_from(arena.stack(&arena.p, 4..5)).unwrap(), vec![4.0; 3]);
}

/// The training harness the GPU check holds `fused_layer` and `FusedOptimizer` to, run here on
/// libtorch's CPU operations alone: every run interrupted halfway (each optimizer's state
/// saved, fresh ones loading it) ends bit for bit where the uninterrupted run does, every
/// optimizer skips the NaN step, and two rules can share the model (Muon the matrix, AdamW the
/// rest), and a bf16 matrix among f32 parameters. A hand-off that lost or misplaced a state, or a harness that let one run see
/// another's batches, would show here before it cost a GPU run.
#[test]
fn the_training_harness_resumes_exactly_on_libtorch() {
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let entry = |name: &str| reg.get(name).unwrap().entry.clone();
    // The GPU check's cases, a bf16 matrix's state saved and resumed in bf16 among them.
    for case in normforge_cuda::check::training_cases() {
        let what = format!("{} with {}, a {:?} matrix", case.layer, case.rule(), case.matrix_kind);
        let rules: Vec<_> = case.rules.iter().map(|&(name, select)| (entry(name), select)).collect();
        let worst = normforge_cuda::check::training_runs(tch::Device::Cpu, None, &entry(case.layer), &rules, 7, case.matrix_kind).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(worst, 0.0, "{what}: an interrupted run ended elsewhere");
    }
}

/// A variable in a fused optimizer's arena has a gradient that is a view of the arena's flat
/// buffer. An optimizer made later over the same variables — resuming a saved state, of either
/// kind — zeroes it where it is: `Tensor::zero_grad` detaches it in place first, which
/// libtorch refuses for a view (a panic in tch).
#[test]
fn an_optimizer_made_after_a_fused_one_zeroes_its_arenas_gradients_in_place() {
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let w = vs.root().randn("w", &[4, 3], 0.0, 1.0);
    w.sum(Kind::Float).backward();
    let mut vars = vec![w.shallow_clone()];
    let arena = Arena::adopt(&mut vars).unwrap();
    let mut opt = normforge_tch::DslOptimizer::new(reg.get("adamw").unwrap().entry.clone(), &vs, &[]).unwrap();
    assert_eq!(f64::try_from(arena.g.abs().sum(Kind::Double)).unwrap(), 12.0, "the gradient moved into the arena");
    opt.zero_grad();
    assert_eq!(f64::try_from(arena.g.abs().sum(Kind::Double)).unwrap(), 0.0, "the arena's gradients were not zeroed");
    assert_eq!(arena.moved(&vars), None, "the gradient left the arena");
}
