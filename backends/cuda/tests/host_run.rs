//! The CUDA C++ of the layer kernels and of the step kernels, run on the host (`host/`) by the
//! CUDA path itself — `PlanKernels` and `CudaOptimizer` on a `Gpu` standing on the host, on
//! CPU tensors — against the reference backend. No GPU needed; this is where the eight-lane
//! bf16 and f16 vector kernels, and the buffers and `info_st` the CUDA path hands every
//! kernel, are run before a GPU runs them.

mod host;

use host::HostCompiler;
use normforge_cubecl::kernel::LProgram;
use normforge_cubecl::{compile_for, plan, Dtype, Precision, Source};
use normforge_cuda::check::{layer_against_reference, LayerCall};
use normforge_cuda::plans::{kind_of, pick, Bound, PlanKernels};
use normforge_cuda::{Arena, CudaOptimizer, Gpu};
use normforge_dsl::ir::{Entry, Program, Programs, Target};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn entry(name: &str) -> Arc<Entry> {
    normforge_std::link();
    normforge_registry::Registry::with_builtins().unwrap().get(name).unwrap().entry
}

/// Values spread over [-1, 1), a different sequence per seed.
fn values(seed: u64, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f64 * 0.618_034 + seed as f64 * 0.414_214).fract() * 2.0 - 1.0) as f32).collect()
}

/// `n` values stored as `kind`, starting `skip` elements into their storage (a view that
/// starts mid-vector where `skip` is odd).
fn stored(v: &[f32], kind: Kind, skip: usize, shape: &[usize]) -> Tensor {
    let mut all = vec![0.0; skip];
    all.extend_from_slice(v);
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&all).to_kind(kind).narrow(0, skip as i64, v.len() as i64).view(dims.as_slice())
}

/// One program of `e` run on the host by `PlanKernels`, as a layer's call runs it: every
/// output by target, and the kernels it launched.
/// (With `work_skip`, in a kept work arena starting that many values into its storage.)
#[allow(clippy::too_many_arguments)]
fn run(gpu: &Arc<Gpu>, e: &Entry, prog: &Program, hp: &[f64], io: Dtype, x: &Tensor, data: &dyn Fn(Source) -> Option<Tensor>, work_skip: usize) -> (Vec<(Target, Tensor)>, Vec<LProgram>) {
    let p = plan(e, prog).unwrap();
    let dims: Vec<usize> = x.size().iter().map(|&d| d as usize).collect();
    let b = normforge_dsl::bind::bind_axes(&e.axes, &dims, "x").unwrap();
    let kernels = PlanKernels::new(gpu.clone());
    let lay = kernels.layout(&p, &b, hp, 0.0, io).unwrap();
    let given: Vec<(Source, Tensor)> = p.tensors.iter().filter_map(|&(s, _, _)| data(s).map(|t| (s, t))).collect();
    let find = |s: Source| given.iter().find(|(g, _)| *g == s).map(|(_, t)| t);
    let work = (work_skip > 0).then(|| Tensor::zeros([(lay.work_len + work_skip) as i64], (Kind::Float, Device::Cpu)).narrow(0, work_skip as i64, lay.work_len as i64));
    // What `run_laid` binds and launches (bound here too, for the list).
    let launched = Bound::new(&p, &lay, io, Device::Cpu, &find, work.as_ref()).unwrap().launches(&lay, io).into_iter().map(|(k, _)| k).collect();
    (kernels.run_laid(&p, &lay, io, &find, work.as_ref()).unwrap(), launched)
}

/// A training call of layer `name` (forward and backward) on the host, its input of `shape`
/// stored as `io` and starting `skip` elements into its storage: its largest relative errors
/// against the reference backend, and the kernels it launched.
fn call(gpu: &Arc<Gpu>, name: &str, shape: &[usize], io: Dtype, skip: usize) -> (f64, f64, Vec<LProgram>) {
    call_in(gpu, name, shape, io, skip, true, 0)
}

/// As [`call`], a training call or (`train` false) an evaluation call.
fn call_in(gpu: &Arc<Gpu>, name: &str, shape: &[usize], io: Dtype, skip: usize, train_mode: bool, work_skip: usize) -> (f64, f64, Vec<LProgram>) {
    let e = entry(name);
    let overrides = normforge_cuda::check::in_groups_of_two(&e);
    let hp = normforge_dsl::hyper::resolve(&e, &overrides).unwrap();
    let Programs::Layer { train, eval, train_backward, eval_backward } = &e.programs else { unreachable!() };
    let (forward, backward) = if train_mode { (train, train_backward) } else { (eval, eval_backward) };
    let n: usize = shape.iter().product();
    let kind = kind_of(io);
    let x = stored(&values(1, n).iter().map(|v| 3.0 * v + 1.0).collect::<Vec<_>>(), kind, skip, shape);
    let gy = stored(&values(2, n), kind, skip, shape);
    // Parameters other than their initial ones, each element its own, so a value read at the
    // wrong position shows; buffers as the reference initialises them.
    let init = normforge_reference::Layer::new(e.clone(), &overrides, shape).unwrap();
    let host = |t: &normforge_reference::Tensor, f: &dyn Fn(usize, f64) -> f64| {
        Tensor::from_slice(&t.data.iter().enumerate().map(|(j, &v)| f(j, v) as f32).collect::<Vec<_>>()).view(t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>().as_slice())
    };
    let params: Vec<Tensor> = init.params.iter().enumerate().map(|(i, p)| host(p, &|j, v| v + 0.5 * (v * 7.3 + i as f64 * 1.9 + j as f64 * 0.37).sin())).collect();
    let buffers: Vec<Tensor> = init.buffers.iter().map(|b| host(b, &|_, v| v)).collect();
    let data = |s: Source| match s {
        Source::Input => Some(x.shallow_clone()),
        Source::GradOutput => Some(gy.shallow_clone()),
        Source::Param(i) => params.get(i as usize).map(|t| t.shallow_clone()),
        Source::Buffer(i) => buffers.get(i as usize).map(|t| t.shallow_clone()),
        _ => None,
    };
    let (fwd, fwd_k) = run(gpu, &e, forward, &hp, io, &x, &data, work_skip);
    let (bwd, bwd_k) = run(gpu, &e, backward, &hp, io, &x, &data, work_skip);
    let y = pick(&fwd, Target::Y).unwrap().view(x.size().as_slice());
    let after: Vec<Tensor> = buffers.iter().enumerate().map(|(i, b)| pick(&fwd, Target::Buffer(i as u32)).map(|t| t.view(b.size().as_slice())).unwrap_or_else(|_| b.shallow_clone())).collect();
    let grad_x = pick(&bwd, Target::GradInput).unwrap().view(x.size().as_slice());
    let grad_params: Vec<Tensor> = params.iter().enumerate().map(|(i, p)| pick(&bwd, Target::GradParam(i as u32)).map(|g| g.view(p.size().as_slice())).unwrap_or_else(|_| Tensor::new())).collect();
    let c = LayerCall { x: &x, gy: &gy, train: train_mode, params: &params, buffers_before: &buffers, buffers_after: &after, y: &y, grad_x: &grad_x, grad_params: &grad_params };
    let (f, b) = layer_against_reference(&e, &hp, &c).unwrap();
    (f, b, fwd_k.into_iter().chain(bwd_k).collect())
}

/// The kernels the GPU check times, at rows a GPU would vectorise (16 bytes an access: f32 in
/// fours, bf16 and f16 in eights), run as the CUDA C++ says: each within the issue's f32 bounds
/// of the reference (1e-5 forward, 1e-4 backward), or within what half precision storage
/// rounds (1e-2). A row of 16384 takes a cube of 512 units.
#[test]
fn vector_kernels_compute_on_the_host_what_the_reference_does() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    let cases: [(&str, &[usize], &[Dtype]); 6] = [
        ("layer_norm", &[8, 4096], &[Dtype::F32, Dtype::BF16, Dtype::F16]),
        ("rms_norm", &[8, 4096], &[Dtype::F32, Dtype::BF16]),
        ("dyt", &[8, 4096], &[Dtype::F32, Dtype::BF16]),
        ("scale_norm", &[8, 2048], &[Dtype::BF16]),
        ("evonorm_s0", &[2, 64, 8, 8], &[Dtype::F32, Dtype::BF16]),
        ("layer_norm", &[2, 16384], &[Dtype::BF16]),
    ];
    for (name, shape, dtypes) in cases {
        for &io in dtypes {
            let (f, b, kernels) = call(&gpu, name, shape, io, 0);
            let lanes = kernels.iter().map(|k| k.vector.max(1)).max().unwrap();
            let units = kernels.iter().map(|k| k.units).max().unwrap();
            let what = format!("{name} {shape:?} {io:?}, {lanes} lanes, cubes of {units}");
            eprintln!("{what}: forward {f:.2e}, backward {b:.2e}");
            let bound = if io == Dtype::F32 { (1e-5, 1e-4) } else { (1e-2, 1e-2) };
            assert!(f < bound.0 && b < bound.1, "{what}: forward {f:.2e}, backward {b:.2e} from the reference");
            assert_eq!(lanes, 16 / io.size(), "{what}: no 16-byte vectors");
            assert_eq!(units > 256, shape[1] == 16384, "{what}: the cube's size");
            // Parameters along the row four values an access, in a cube of 256 units.
            let wide = kernels.iter().filter(|k| k.vector >= 4 && k.units == 256 && !k.phases.is_empty());
            assert!(wide.clone().all(|k| k.vector_params) && wide.count() > 0 || units > 256, "{what}: parameters read a value per lane");
        }
    }
}

/// A view starting mid-vector runs the same kernels a value at a time (`Bound::launches`), to
/// the same results.
#[test]
fn views_starting_mid_vector_compute_the_same_a_value_at_a_time() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    for io in [Dtype::BF16, Dtype::F32] {
        let (f, b, kernels) = call(&gpu, "layer_norm", &[8, 1024], io, 1);
        assert!(kernels.iter().all(|k| k.vector <= 1), "{io:?}: a misaligned view read as vectors");
        let bound = if io == Dtype::F32 { (1e-5, 1e-4) } else { (1e-2, 1e-2) };
        assert!(f < bound.0 && b < bound.1, "{io:?}: forward {f:.2e}, backward {b:.2e} from the reference");
    }
}

/// A kept work arena starting mid-vector (a view) keeps rows read as vectors but their f32
/// parameters a value per lane (`Bound::launches`), to the same results.
#[test]
fn a_work_arena_starting_mid_vector_reads_parameters_a_value_per_lane() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    for io in [Dtype::BF16, Dtype::F32] {
        for (work_skip, wide) in [(0, true), (1, false)] {
            let (f, b, kernels) = call_in(&gpu, "layer_norm", &[8, 1024], io, 0, true, work_skip);
            let vectors: Vec<&LProgram> = kernels.iter().filter(|k| k.vector > 1).collect();
            assert!(!vectors.is_empty() && vectors.iter().all(|k| k.vector_params == wide), "{io:?}, work {work_skip} values in: parameters as vectors {wide} expected");
            let bound = if io == Dtype::F32 { (1e-5, 1e-4) } else { (1e-2, 1e-2) };
            assert!(f < bound.0 && b < bound.1, "{io:?}, work {work_skip} values in: forward {f:.2e}, backward {b:.2e} from the reference");
        }
    }
}

/// The standard update rules whose steps the step kernels fuse (`fused`), or the others.
fn std_rules(fused: bool) -> Vec<(String, Arc<Entry>)> {
    normforge_std::link();
    let all = normforge_registry::Registry::with_builtins().unwrap().list(None);
    let fuses = |e: &Entry| matches!(&e.programs, Programs::Optimizer { step } if compile_for(e, step, Dtype::F32).is_ok());
    all.into_iter().filter(|r| r.entry.kind == normforge_dsl::ir::Kind::Optimizer && fuses(&r.entry) == fused).map(|r| (r.name, r.entry)).collect()
}

/// `steps` steps of rule `name` at learning rate `lr` on tensors of `shapes` stored as
/// `types.param`, its states as `types.state`, by `CudaOptimizer` on the host: the largest
/// relative error of the parameters' moves against the reference backend's, which starts from
/// the same (stored) values and gradients. Where `scale` is not 1, a clipped step
/// (`step_scaled`: the fused kernels read every gradient times `scale`), and so the reference.
fn steps_on_host(gpu: &Arc<Gpu>, name: &str, lr: f64, scale: f64, shapes: &[Vec<usize>], types: Precision, steps: usize) -> f64 {
    stepped_on_host(gpu, name, lr, scale, shapes, types, steps).0
}

/// As [`steps_on_host`]: the error of the moves, and the largest relative error of the
/// parameters' values (max |diff| / max |reference|, the GPU check's measure).
fn stepped_on_host(gpu: &Arc<Gpu>, name: &str, lr: f64, scale: f64, shapes: &[Vec<usize>], types: Precision, steps: usize) -> (f64, f64) {
    let e = entry(name);
    let h = [("lr".to_string(), lr)];
    let mut opt = CudaOptimizer::new(gpu.clone(), e.clone(), &h, types).unwrap();
    let kind = kind_of(types.param);
    // Parameters small beside a move (lr for most rules, lr times the parameter's norm for
    // LAMB's), so that half precision keeps most of each.
    let mut vars: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| stored(&values(10 + i as u64, s.iter().product()).iter().map(|v| 0.02 * v).collect::<Vec<_>>(), kind, 0, s).copy().set_requires_grad(true)).collect();
    let as_ref = |t: &Tensor| normforge_reference::Tensor::new(t.size().iter().map(|&d| d as usize).collect(), Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()).unwrap();
    let start: Vec<normforge_reference::Tensor> = vars.iter().map(as_ref).collect();
    let mut want = start.clone();
    let mut oracle = normforge_reference::Optimizer::new(e.clone(), &h).unwrap();
    let arena = Arena::adopt(&mut vars).unwrap();
    for t in 1..=steps {
        let grads: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| stored(&values(100 + 7 * t as u64 + i as u64, s.iter().product()), kind, 0, s)).collect();
        tch::no_grad(|| vars.iter().zip(&grads).for_each(|(v, g)| v.grad().copy_(g)));
        opt.step_scaled(&arena, scale).unwrap();
        let scaled = |g: &Tensor| normforge_reference::Tensor { data: as_ref(g).data.iter().map(|v| v * scale).collect(), ..as_ref(g) };
        oracle.step(&mut want, &grads.iter().map(scaled).collect::<Vec<_>>()).unwrap();
    }
    let (mut moves, mut values) = (0f64, 0f64);
    let largest = |v: &[f64]| v.iter().fold(0f64, |m, d| m.max(d.abs()));
    for ((v, w), s) in vars.iter().zip(&want).zip(&start) {
        let got = as_ref(v).data;
        let diff: Vec<f64> = got.iter().zip(&w.data).map(|(a, b)| a - b).collect();
        let moved: Vec<f64> = w.data.iter().zip(&s.data).map(|(a, b)| a - b).collect();
        moves = moves.max(largest(&diff) / largest(&moved));
        values = values.max(largest(&diff) / largest(&w.data));
    }
    (moves, values)
}

/// The fused step kernels — elementwise rules and rules reducing per tensor (LAMB: a partial
/// per cube, then a combine) — on f32, bf16 and f16 parameters (states in their dtype, as
/// torch keeps them), each unit four elements an access, and a clipped step: their moves within
/// 1e-5 of the reference's for f32, within what half precision storage rounds (1e-2) for the
/// others.
#[test]
fn fused_step_kernels_compute_on_the_host_what_the_reference_does() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    // Tensors of whole blocks, of a part of one, and of several cubes' worth.
    let shapes = vec![vec![64, 33], vec![300], vec![3, 7], vec![4096]];
    for (name, lr) in [("adamw", 0.01), ("lion", 0.01), ("lamb", 0.25), ("ademamix", 0.01)] {
        for d in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let e = steps_on_host(&gpu, name, lr, 1.0, &shapes, Precision::uniform(d), 3);
            eprintln!("{name} {d:?}: {e:.2e}");
            assert!(e < if d == Dtype::F32 { 1e-5 } else { 1e-2 }, "{name} {d:?}: moves {e:.2e} from the reference's");
        }
    }
    // A clipped step, by a rule whose move is in proportion to the gradient (Adam's and Lion's
    // are not: a scale the kernels ignored would not show).
    for d in [Dtype::F32, Dtype::BF16] {
        // (lr 0.04: moves as large as the other rules', halved gradients and all.)
        let e = steps_on_host(&gpu, "sgd", 0.04, 0.5, &shapes, Precision::uniform(d), 3);
        eprintln!("sgd {d:?}, gradients halved: {e:.2e}");
        assert!(e < if d == Dtype::F32 { 1e-5 } else { 1e-2 }, "sgd {d:?}, gradients halved: moves {e:.2e} from the reference's");
    }
}

/// Every standard layer's kernels, training and evaluation, forward and backward, as the CUDA
/// C++ computes them: within the issue's f32 bounds of the reference (1e-5 forward, 1e-4
/// backward), and within half precision's rounding (1e-2) with bf16 storage — what the GPU
/// check asks of them on the device. Rows of 32, a whole number of vectors.
#[test]
fn every_std_layer_computes_on_the_host_what_the_reference_does() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    normforge_std::link();
    let layers: Vec<String> = normforge_registry::Registry::with_builtins().unwrap().list(None).into_iter().filter(|r| r.entry.kind != normforge_dsl::ir::Kind::Optimizer).map(|r| r.name).collect();
    assert!(layers.len() >= 19, "{} std layers", layers.len());
    // Rows of 32 (each a unit's), and (in f32: the cube's size is the same for every storage
    // type) of 100, a cube of 64 units each (`Launch::min_units`).
    let mut short_cubes = 0;
    for name in &layers {
        for shape in [&[2, 4, 6, 32][..], &[2, 4, 100]] {
            for io in [Dtype::F32, Dtype::BF16].into_iter().filter(|&io| shape.len() == 4 || io == Dtype::F32) {
                for train in [true, false] {
                    let (f, b, kernels) = call_in(&gpu, name, shape, io, 0, train, 0);
                    let what = format!("{name} {shape:?} {io:?} {}", if train { "training" } else { "evaluation" });
                    eprintln!("{what}: forward {f:.2e}, backward {b:.2e}");
                    let bound = if io == Dtype::F32 { (1e-5, 1e-4) } else { (1e-2, 1e-2) };
                    assert!(f < bound.0 && b < bound.1, "{what}: forward {f:.2e}, backward {b:.2e} from the reference");
                    short_cubes += kernels.iter().filter(|k| k.cooperative && k.units < normforge_cubecl::kernel::BLOCK).count();
                }
            }
        }
    }
    assert!(short_cubes >= 19 * 2, "{short_cubes} kernels in cubes of fewer than a block's units");
}

/// Every standard rule the step kernels fuse, on f32 parameters and states, within the issue's
/// bound (1e-5) of the reference, as the GPU check measures it (the parameters' values). The
/// rest (AdamP, SGDP, Muon) run through layer kernels a stack at a time: below.
#[test]
fn every_fused_std_rule_steps_on_the_host_as_the_reference_does() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    let shapes = vec![vec![64, 33], vec![300], vec![4096]];
    let rules = std_rules(true);
    assert!(rules.len() >= 14, "{} fused std rules", rules.len());
    for (name, _) in rules {
        let (moves, values) = stepped_on_host(&gpu, &name, 0.01, 1.0, &shapes, Precision::default(), 3);
        eprintln!("{name}: values {values:.2e}, moves {moves:.2e}");
        assert!(values < 1e-5, "{name}: values {values:.2e} from the reference's");
        // A kernel that stored its parameters unchanged would be within 1e-5 for a rule whose
        // moves are that small (LARS's); not within a tenth of the moves.
        assert!(moves < 0.1, "{name}: moves {moves:.2e} from the reference's");
    }
}

/// The rules the step kernels cannot fuse (AdamP and SGDP reduce per axis, Muon multiplies
/// matrices), by `CudaOptimizer` through their stacked plans' layer kernels: a stack of two
/// same-shaped neighbours at a time (each filling whole cubes of the arena, so they join), its
/// states kept in the stack's work arena and read from where the last step wrote them (the
/// layout swapping them at alternate steps). Three steps, within the issue's bound (1e-5) of
/// the reference's values, and of a tenth of its moves. Muon on wide, tall and square
/// matrices, so both of its forms run; a clipped step, where the stacks' gradients are scaled
/// in place first.
#[test]
fn stacked_std_rules_step_on_the_host_as_the_reference_does() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    let rules = std_rules(false);
    assert!(rules.len() >= 3, "{} stacked std rules", rules.len());
    let shapes = vec![vec![32, 40], vec![32, 40], vec![40, 32], vec![40, 32], vec![32, 32], vec![32, 32], vec![5, 3]];
    for (name, _) in rules {
        for scale in [1.0, 0.5] {
            let (moves, values) = stepped_on_host(&gpu, &name, 0.02, scale, &shapes, Precision::default(), 3);
            eprintln!("{name}, gradients times {scale}: values {values:.2e}, moves {moves:.2e}");
            assert!(values < 1e-5 && moves < 0.1, "{name}, gradients times {scale}: values {values:.2e}, moves {moves:.2e} from the reference's");
        }
    }
}

/// The rules the GPU check times, on the structure of the parameter set it times them on
/// (gpu_peers.py's 212 tensors: 12 square matrices, 4 with a quarter of their columns, 196
/// vectors as long as a matrix's rows) at a sixty-fourth of its width, each tensor still whole
/// blocks: one arena of 212 tensors, LAMB's 212 norms each folded from its own cubes' partials,
/// AdamP's three stacks. Within the issue's bound (1e-5) of the reference's values, and a tenth
/// of its moves, after three steps.
#[test]
fn the_timed_rules_step_the_timed_parameter_sets_structure_as_the_reference_does() {
    let Some(gpu) = HostCompiler::gpu() else { return };
    let mut shapes = vec![vec![64, 64]; 12];
    shapes.extend(vec![vec![64, 16]; 4]);
    shapes.extend(vec![vec![256]; 196]);
    for name in ["adamw", "lion", "lamb", "adamp"] {
        let (moves, values) = stepped_on_host(&gpu, name, 0.01, 1.0, &shapes, Precision::default(), 3);
        eprintln!("{name} on 212 tensors: values {values:.2e}, moves {moves:.2e}");
        assert!(values < 1e-5 && moves < 0.1, "{name} on 212 tensors: values {values:.2e}, moves {moves:.2e} from the reference's");
    }
}

/// A hand-written kernel in CubeCL's form (its buffers, then its `info_st`): each of 64 units
/// writes its input's value plus its neighbour's, as `FAULT_BODY` reads it.
const FAULTING: &str = r#"
struct info_st { uint32_t static_meta[2]; };
struct alignas(16) float_4 { float i_0; float i_1; float i_2; float i_3; };
extern "C" __global__ void fault_FAULT(float const* const __restrict__ v0, float* const __restrict__ v1, info_st const* const __restrict__ v2) {
extern __shared__ __align__(4) char v3[];
    float* const sh = reinterpret_cast<float*>(v3);
    uint32_t const i = threadIdx.x;
    uint32_t const n = v2->static_meta[0];
    FAULT_BODY
}
"#;

/// How each case of [`FAULTING`] reads the neighbour: within bounds; one float past the
/// input's end; 16 bytes from 4 bytes into it; through shared memory with a barrier between
/// the writes and the reads; without (after one, so that the units run as a cube's); through
/// shared memory written one float on, past its end.
const FAULTS: [(&str, &str); 6] = [
    ("within", "v1[i] = v0[i] + v0[(i + 1) % n];"),
    ("past_end", "v1[i] = v0[i] + v0[i + 1];"),
    ("misaligned", "v1[i] = v0[i] + reinterpret_cast<float_4 const*>(v0 + 1)[i / 4 % (n / 4 - 1)].i_0;"),
    ("synced", "sh[i] = v0[i]; __syncthreads(); v1[i] = v0[i] + sh[(i + 1) % n];"),
    ("unsynced", "__syncthreads(); sh[i] = v0[i]; v1[i] = v0[i] + sh[(i + 1) % n];"),
    ("shared_past_end", "sh[i + 1] = v0[i]; __syncthreads(); v1[i] = v0[i] + sh[i == 0 ? n : i];"),
];

/// Runs the case of [`FAULTING`] that `NF_FAULT` names, for the test below (in a process of
/// its own: the faults end it).
#[test]
#[ignore = "faults on purpose: run in a child process by faults_a_gpu_would_take_stop_the_host_test"]
fn a_kernel_faulting_as_told() {
    let cc = HostCompiler::find().expect("the host's compiler");
    let fault = std::env::var("NF_FAULT").expect("NF_FAULT");
    let body = FAULTS.iter().find(|f| f.0 == fault).expect("a case").1;
    let unit = cc.kernel(&FAULTING.replace("FAULT_BODY", body).replace("FAULT", &fault)).unwrap();
    // Starting at a whole vector, as a tensor's storage does.
    #[repr(align(16))]
    struct Aligned([f32; 64]);
    let (input, mut output) = (Aligned([1f32; 64]), [0f32; 64]);
    let info = normforge_cuda::driver::info(&[input.0.len(), output.len()]);
    // SAFETY: the kernel's parameters: two buffers of 64 floats and their info; a float of
    // shared memory per unit.
    unsafe { normforge_cuda::driver::HostKernel::launch(&unit, (1, 1, 1), 64, 64 * 4, &[input.0.as_ptr() as u64, output.as_mut_ptr() as u64, info.as_ptr() as u64]) };
    assert_eq!(output, [2f32; 64], "what the kernel wrote");
}

#[test]
fn faults_a_gpu_would_take_stop_the_host_test() {
    if HostCompiler::find().is_none() {
        return;
    }
    let said = [
        ("within", None),
        ("past_end", Some("out of bounds: kernel fault_past_end touched 0 bytes past the end of its buffer 0")),
        ("misaligned", Some("misaligned address")),
        ("synced", None),
        ("unsynced", Some("what the kernel wrote")),
        ("shared_past_end", Some("out of bounds: kernel fault_shared_past_end touched 0 bytes past the end of its shared memory")),
    ];
    for (fault, says) in said {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe).args(["--exact", "a_kernel_faulting_as_told", "--ignored", "--nocapture"]).env("NF_FAULT", fault).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        match says {
            None => assert!(out.status.success(), "{fault}: the kernel failed:\n{err}"),
            Some(says) => assert!(!out.status.success() && err.contains(says), "{fault}: expected the test stopped with {says:?}, got {:?}:\n{err}", out.status),
        }
    }
}
