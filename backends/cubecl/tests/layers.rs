//! Every standard layer through the CubeCL layer kernels on lavapipe against the f64 reference
//! backend: forward in training (buffers updated) and evaluation, and the derived backward, on
//! fresh random inputs and parameters, with reduced extents of 1, 7, 1000 and 4097.

mod common;

use common::{registry, rel, values};
use normforge_cubecl::kernel::{Buf, LOp, Reach, PARAM_LANES};
use normforge_cubecl::{cpu_device, CubeLayer, Dtype, Held, Launch};
use normforge_reference::{Layer, Tensor};

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Shapes whose reduced extents (the last axis for `x[..., d]`, the spatial axis and channel
/// groups for `x[n, c, s...]`) are 1, 7, 1000 and 4097.
fn shapes(name: &str) -> Vec<Vec<usize>> {
    if ["layer_norm", "rms_norm", "dyt"].contains(&name) {
        vec![vec![3, 1], vec![2, 3, 7], vec![4, 1000], vec![2, 4097]]
    } else if name.starts_with("weight_") || ["fix_norm", "scale_norm", "crms_norm", "spectral_norm"].contains(&name) {
        // Rows (or weights [out, in...]) of 3, 21, 1000 and 4097 values. Not rows of one value:
        // weight_norm, fix_norm, scale_norm and crms_norm then give a constant times the sign of
        // x, whose gradient is zero (f32 leaves rounding noise that has no relative error to
        // measure); nor two for weight_standardization (standardized to exactly ±1, as with
        // batch_norm below).
        vec![vec![3, 3], vec![2, 3, 7], vec![4, 1000], vec![2, 4097]]
    } else {
        // Not [2, 4, 1]: a normalized set of exactly two values has an input gradient that is
        // zero but for an O(eps) remainder, which f32 cannot resolve.
        vec![vec![3, 6, 1], vec![3, 4, 7], vec![2, 4, 10, 100], vec![2, 4, 4097]]
    }
}

fn check(name: &str, shape: &[usize], seed: u64) {
    check_stored(name, shape, seed, Dtype::F32, 1e-5, 1e-4);
}

/// Forward within `fwd`, gradients within `bwd` (relative), with the input, output and their
/// gradients stored as `dtype` on the device.
fn check_stored(name: &str, shape: &[usize], seed: u64, dtype: Dtype, fwd: f64, bwd: f64) {
    let reg = registry();
    let device = cpu_device().expect("lavapipe (mesa-vulkan-drivers) is installed by scripts/test.sh");
    let entry = reg.get(name).unwrap().entry;
    let mut h: Vec<(String, f64)> = Vec::new();
    if entry.hparams.iter().any(|p| p.name == "groups") {
        h.push(("groups".into(), 2.0));
    }
    if name == "rms_norm" && shape[shape.len() - 1] == 1 {
        // With one feature and eps = 1e-8 the true input gradient is ~1e-8 of the output
        // gradient: f32 cannot resolve it against anything (the reference's own finite
        // differences use the same setting).
        h.push(("eps".into(), 0.1));
    }
    let mut ours = CubeLayer::new(entry.clone(), &h, shape, &device).unwrap().with_storage(dtype).unwrap();
    let mut oracle = Layer::new(entry.clone(), &h, shape).unwrap();
    // Both start from the same initial values...
    for (a, b) in ours.params.iter().zip(&oracle.params).chain(ours.buffers.iter().zip(&oracle.buffers)) {
        assert!(rel(a, &b.data) < 1e-6, "{name}: initial values differ");
    }
    // ...then take random parameters and positive buffers (running variances must be).
    for (k, p) in oracle.params.iter_mut().enumerate() {
        p.data = values(seed * 31 + k as u64, p.data.len()).iter().map(|v| 1.0 + 0.5 * v).collect();
    }
    for (k, b) in oracle.buffers.iter_mut().enumerate() {
        b.data = values(seed * 37 + k as u64, b.data.len()).iter().map(|v| 1.0 + 0.5 * v).collect();
    }
    // The oracle computes on exactly the f32 values ours gets.
    let round = |v: &mut Vec<f64>| *v = f64s(&f32s(v));
    oracle.params.iter_mut().chain(oracle.buffers.iter_mut()).for_each(|t| round(&mut t.data));
    ours.params = oracle.params.iter().map(|t| f32s(&t.data)).collect();
    ours.buffers = oracle.buffers.iter().map(|t| f32s(&t.data)).collect();
    let n: usize = shape.iter().product();
    // ...and on the input and output gradient as stored (rounded to `dtype`): a half-precision
    // tensor holds these values, and the comparison measures what the kernels add to them.
    let stored = |v: Vec<f64>| {
        let mut f = f32s(&v);
        dtype.round(&mut f);
        f64s(&f)
    };
    let x = stored(values(seed, n).iter().map(|v| 2.0 * v + 0.3).collect());
    let gy = stored(values(seed + 1000, n));
    let xt = Tensor::new(shape.to_vec(), x.clone()).unwrap();
    let gt = Tensor::new(shape.to_vec(), gy.clone()).unwrap();
    for train in [true, false] {
        let what = format!("{name} {shape:?} {dtype:?} {}", if train { "train" } else { "eval" });
        let y = ours.forward(&f32s(&x), shape, train).unwrap();
        let want = oracle.forward(&xt, train).unwrap();
        let e = rel(&y, &want.data);
        assert!(e < fwd, "{what}: forward relative error {e:e}");
        for (k, (a, b)) in ours.buffers.iter().zip(&oracle.buffers).enumerate() {
            let e = rel(a, &b.data);
            assert!(e < fwd, "{what}: buffer {k} relative error {e:e}");
        }
        let g = ours.backward(&f32s(&x), &f32s(&gy), shape, train).unwrap();
        let want = oracle.backward(&xt, &gt, train).unwrap();
        let e = rel(&g.input, &want.input.data);
        assert!(e < bwd, "{what}: input gradient relative error {e:e}");
        for (k, (a, b)) in g.params.iter().zip(&want.params).enumerate() {
            let e = rel(a, &b.data);
            assert!(e < bwd, "{what}: parameter {k} gradient relative error {e:e}");
        }
    }
}

macro_rules! layer_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            for (i, shape) in shapes(stringify!($name)).iter().enumerate() {
                check(stringify!($name), shape, 7 + i as u64);
            }
        }
    )*};
}

layer_tests!(
    layer_norm,
    rms_norm,
    batch_norm,
    group_norm,
    instance_norm,
    evonorm_b0,
    evonorm_s0,
    dyt,
    evonorm_b1,
    evonorm_b2,
    evonorm_s1,
    evonorm_s2,
    weight_norm,
    weight_standardization,
    scale_norm,
    crms_norm,
    fix_norm,
    spectral_norm,
    batch_channel_norm
);

#[test]
fn bad_shapes_are_errors() {
    let reg = registry();
    let device = cpu_device().unwrap();
    let entry = reg.get("group_norm").unwrap().entry;
    // 3 channels do not split into 2 groups.
    let err = CubeLayer::new(entry.clone(), &[("groups".into(), 2.0)], &[2, 3, 5], &device).err().expect("refused");
    assert!(err.0.contains("groups"), "{err}");
    let mut layer = CubeLayer::new(entry, &[("groups".into(), 2.0)], &[2, 4, 5], &device).unwrap();
    // Parameters sized for 4 channels, an input with 6.
    let err = layer.forward(&[0.0; 60], &[2, 6, 5], true).unwrap_err();
    assert!(err.0.contains("weight"), "{err}");
    let err = layer.forward(&[0.0; 7], &[2, 4, 5], true).unwrap_err();
    assert!(err.0.contains("7 values"), "{err}");
}

const LAYERS: [&str; 19] = [
    "layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm", "evonorm_b0", "evonorm_s0", "dyt", "evonorm_b1", "evonorm_b2",
    "evonorm_s1", "evonorm_s2", "weight_norm", "weight_standardization", "scale_norm", "crms_norm", "fix_norm",
    "spectral_norm", "batch_channel_norm",
];

#[test]
fn half_precision_storage_with_f32_arithmetic() {
    // f16 and bf16 inputs and output gradients, f32 statistics and arithmetic, outputs and input
    // gradients stored in half precision: within 1e-2 of the f64 reference on the same inputs.
    let device = cpu_device().unwrap();
    for dtype in [Dtype::F16, Dtype::BF16] {
        // lavapipe has f16 buffers but no bf16 ones (WGSL has no bf16): bf16 values are held in
        // f32 words, every store rounded to bf16, so the numbers below are bf16's all the same.
        let held = dtype.held_on(&device.client()).unwrap();
        let want = if dtype == Dtype::BF16 && !device.client().properties().supports_type(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::BF16)) { Held::Bf16InF32 } else { Held::Native(dtype) };
        assert_eq!(held, want);
        // The storage really is half precision: the output differs from f32 storage's.
        let entry = registry().get("layer_norm").unwrap().entry;
        let x: Vec<f32> = values(5, 3 * 100).iter().map(|&v| v as f32).collect();
        let y32 = CubeLayer::new(entry.clone(), &[], &[3, 100], &device).unwrap().forward(&x, &[3, 100], true).unwrap();
        let y16 = CubeLayer::new(entry, &[], &[3, 100], &device).unwrap().with_storage(dtype).unwrap().forward(&x, &[3, 100], true).unwrap();
        assert_eq!(y16.len(), y32.len());
        assert!(y16.iter().zip(&y32).any(|(a, b)| a != b), "{dtype:?} storage gave f32 results");
        let representable = |v: f32| {
            let mut c = [v];
            dtype.round(&mut c);
            c[0] == v
        };
        assert!(y16.iter().all(|&v| representable(v)), "{dtype:?}: outputs are not {dtype:?} values");
        // Stores round as a conversion to the type does (to nearest, ties to even): on inputs that
        // are already such values, the stored output is exactly the f32 output, rounded.
        let entry = registry().get("layer_norm").unwrap().entry;
        let mut xr = x.clone();
        dtype.round(&mut xr);
        let f32_out = CubeLayer::new(entry.clone(), &[], &[3, 100], &device).unwrap().forward(&xr, &[3, 100], true).unwrap();
        let stored = CubeLayer::new(entry, &[], &[3, 100], &device).unwrap().with_storage(dtype).unwrap().forward(&xr, &[3, 100], true).unwrap();
        let mut want = f32_out;
        dtype.round(&mut want);
        assert_eq!(stored, want, "{dtype:?}: stores do not round to nearest");
        for name in LAYERS {
            for (i, shape) in shapes(name).iter().enumerate().skip(1) {
                check_stored(name, shape, 70 + i as u64, dtype, 1e-2, 1e-2);
            }
        }
    }
}

#[test]
fn every_std_layer_is_covered() {
    for r in registry().list(None) {
        if r.entry.kind != normforge_dsl::ir::Kind::Optimizer {
            assert!(LAYERS.contains(&r.entry.name.as_str()), "no CubeCL test for `{}`", r.entry.name);
        }
    }
}

#[test]
fn every_launch_shape_gives_the_same_results() {
    // Long reductions run a cube per value, or per few neighbouring values where they are
    // columns (a layer norm's parameter gradients: 300 rows summed per column), in lanes; the
    // per-unit fold is the short-reduction path and the benchmark's baseline. All agree on long
    // reductions, including a last cube only partly filled (40 columns, 32 per cube) and
    // columns too few to share a cube (7).
    let launches = [
        Launch::default(),
        Launch { columns: 1, ..Launch::default() },
        Launch { columns: 32, ..Launch::default() },
        Launch { columns: 256, ..Launch::default() },
        Launch::per_unit(),
        Launch { rows_per_cube: 0, ..Launch::default() },
        Launch { rows_per_cube: 7, ..Launch::default() },
        Launch { rows_per_cube: 1000, ..Launch::default() },
        // Elementwise kernels: one target element per unit, and 32 (default: 4).
        Launch { values_per_unit: 1, ..Launch::default() },
        Launch { values_per_unit: 32, ..Launch::default() },
    ];
    // Column sums folded inside the row kernel (`rows_per_cube`) from 64 columns on: a last
    // cube with fewer rows (300 = 9 * 32 + 12, 43 * 7 + 1), cubes with none (4 rows, 7 per
    // cube), rows longer than a cube's units (257, 1000: two and four positions per unit).
    let cases = [
        ("layer_norm", vec![4, 1000]),
        ("layer_norm", vec![300, 40]),
        ("layer_norm", vec![300, 100]),
        ("rms_norm", vec![130, 19]),
        ("rms_norm", vec![130, 257]),
        ("dyt", vec![100, 7]),
        ("dyt", vec![2, 3, 65]),
        // Three cubes of 4 x 256 elements, the last partly filled.
        ("dyt", vec![3, 1000]),
        ("batch_norm", vec![2, 4, 4097]),
        ("group_norm", vec![2, 4, 300]),
        ("group_norm", vec![3, 4, 10]),
        ("evonorm_s0", vec![3, 4, 100]),
        ("instance_norm", vec![3, 2, 70]),
    ];
    // The column form is what runs for a layer norm's parameter gradients over 40 columns.
    let entry = registry().get("layer_norm").unwrap().entry;
    let normforge_dsl::ir::Programs::Layer { train_backward, .. } = &entry.programs else { unreachable!() };
    for (launch, want) in [(launches[0], 8), (launches[1], 1), (launches[2], 32), (launches[3], 1)] {
        let lay = laid(&entry, train_backward, &[300, 40], &launch);
        let widest = lay.launches.iter().map(|(k, _)| k.values_per_cube).max();
        assert_eq!(widest, Some(want), "{launch:?}");
    }
    for (name, shape) in cases {
        same_results(name, &shape, &launches);
    }
}

/// A layer's forward in training (buffers updated) and backward agree under every launch.
fn same_results(name: &str, shape: &[usize], launches: &[Launch]) {
    same_results_stored(name, shape, launches, Dtype::F32);
}

/// As `same_results`, the input, output and their gradients stored as `dtype`.
fn same_results_stored(name: &str, shape: &[usize], launches: &[Launch], dtype: Dtype) {
    let device = cpu_device().unwrap();
    let entry = registry().get(name).unwrap().entry;
    let h = groups(&entry);
    let n: usize = shape.iter().product();
    let x = f32s(&values(11, n).iter().map(|v| 3.0 * v + 1.0).collect::<Vec<_>>());
    let gy = f32s(&values(12, n));
    let mut out = Vec::new();
    for &launch in launches {
        let mut l = CubeLayer::new(entry.clone(), &h, shape, &device).unwrap().with_storage(dtype).unwrap().with_launch(launch).unwrap();
        // Parameters other than their initial ones (a layer norm's gamma of ones would hide a
        // value read for the wrong position).
        for (k, p) in l.params.iter_mut().enumerate() {
            *p = f32s(&values(20 + k as u64, p.len()).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>());
        }
        let y = l.forward(&x, shape, true).unwrap();
        let g = l.backward(&x, &gy, shape, true).unwrap();
        out.push((y, g, l.buffers.clone()));
    }
    let a = &out[0];
    for (b, launch) in out[1..].iter().zip(&launches[1..]) {
        let what = format!("{name} {shape:?} {launch:?}");
        assert!(rel(&a.0, &f64s(&b.0)) < 1e-5, "{what}: outputs differ");
        assert!(rel(&a.1.input, &f64s(&b.1.input)) < 1e-4, "{what}: input gradients differ");
        for (p, q) in a.1.params.iter().zip(&b.1.params).chain(a.2.iter().zip(&b.2)) {
            assert!(rel(p, &f64s(q)) < 1e-5, "{what}: parameter gradients or buffers differ");
        }
    }
}

/// `prog` of `entry` bound to an input of `shape` (two groups where the layer has them).
fn laid(entry: &normforge_dsl::ir::Entry, prog: &normforge_dsl::ir::Program, shape: &[usize], launch: &Launch) -> normforge_cubecl::Layout {
    let b = normforge_dsl::bind::bind_axes(&entry.axes, shape, "x").unwrap();
    let hp = normforge_dsl::hyper::resolve(entry, &groups(entry)).unwrap();
    normforge_cubecl::layout(&normforge_cubecl::plan(entry, prog).unwrap(), &b, &hp, 0.0, launch).unwrap()
}

/// Every std layer's parameters and buffers, in its forward and backward, lie side by side at
/// the start of the work arena, in table order, so the CUDA path copies them in with one
/// launch (not one per tensor: three for DyT, beside its one forward kernel); nothing else
/// lies there. Each starts at whole vectors of `PARAM_LANES` values, where the last one ends
/// or at most three values on (DyT's gamma follows its alpha of one value), as every tensor
/// of the work arena does, so that rows may read them as vectors.
#[test]
fn handed_tensors_open_the_work_arena() {
    for r in registry().list(None) {
        let normforge_dsl::ir::Programs::Layer { train, train_backward, .. } = &r.entry.programs else { continue };
        let shape: Vec<usize> = if r.entry.axes.len() == 2 { vec![6, 3, 40] } else { vec![2, 8, 5, 5] };
        for prog in [train, train_backward] {
            let plan = normforge_cubecl::plan(&r.entry, prog).unwrap();
            let lay = laid(&r.entry, prog, &shape, &Launch::default());
            let mut end = 0usize;
            for (t, &(src, ..)) in plan.tensors.iter().enumerate().filter(|(_, x)| x.0.handed()) {
                assert_eq!(plan.tensors[t].2, Buf::Work, "{}: {src:?}", r.name);
                assert_eq!(lay.offsets[t], end.next_multiple_of(PARAM_LANES), "{}: {src:?} not where the last one ends", r.name);
                end = lay.offsets[t] + lay.len(&plan, t);
            }
            for (t, &(src, _, buf)) in plan.tensors.iter().enumerate() {
                if buf == Buf::Work {
                    assert!(lay.offsets[t].is_multiple_of(PARAM_LANES), "{}: {src:?} at {}", r.name, lay.offsets[t]);
                    assert!(src.handed() || lay.offsets[t] >= end, "{}: {src:?} among the handed tensors", r.name);
                }
            }
        }
    }
}

/// The row kernels of `name`'s `pass` launched at `shape`: per kernel, the loads it keeps in
/// registers and how many of its phases read the input, and the output gradient, from memory.
fn kept_and_reads(name: &str, pass: &str, shape: &[usize], launch: &Launch) -> Vec<(usize, usize, usize)> {
    let entry = registry().get(name).unwrap().entry;
    let normforge_dsl::ir::Programs::Layer { train, train_backward, .. } = &entry.programs else { unreachable!() };
    let lay = laid(&entry, if pass == "forward" { train } else { train_backward }, shape, launch);
    // A phase reads memory where a load of its own is not in registers, or where it fills the
    // registers of a kept load only later phases use.
    let from_memory = |k: &normforge_cubecl::kernel::LProgram, buf: Buf| {
        let own = |ph: usize| k.phases[ph].ops.iter().any(|op| matches!(*op, LOp::Load(t, s, b) if b == buf && k.kept_slot(ph, (t, s, b)).is_none_or(|(_, fills)| fills)));
        let ahead = |ph: usize| k.prefetches(ph).iter().any(|&(_, (.., b))| b == buf);
        (0..k.phases.len()).filter(|&ph| own(ph) || ahead(ph)).count()
    };
    lay.launches.iter().filter(|(k, _)| k.cube_per_value()).map(|(k, _)| (k.kept.len(), from_memory(k, Buf::Input), from_memory(k, Buf::GradOutput))).collect()
}

#[test]
fn loads_read_again_stay_in_registers() {
    // (layer, pass, row length, (kept, phases reading x, phases reading dy from memory) of its
    // row kernel with nothing kept, and by default). A layer norm's forward reads x in its
    // mean, variance and output phases; with x kept, once. Its backward (column sums inside
    // the row kernel) reads x and dy once each, the column partials and both rows in 64
    // registers per unit at rows of 4096; rows of 8192 leave no room beside its two partials
    // (an RMS norm's one leaves room for x). DyT's forward has no row kernel.
    let cases = [
        ("layer_norm", "forward", 4096, (0, 3, 0), (1, 1, 0)),
        ("layer_norm", "forward", 8192, (0, 3, 0), (1, 1, 0)),
        ("layer_norm", "forward", 512, (0, 3, 0), (0, 3, 0)),
        ("layer_norm", "backward", 4096, (0, 5, 4), (2, 1, 1)),
        ("layer_norm", "backward", 8192, (0, 5, 4), (0, 5, 4)),
        ("rms_norm", "forward", 4096, (0, 2, 0), (1, 1, 0)),
        // Its weight is kept too.
        ("rms_norm", "backward", 4096, (0, 3, 3), (3, 1, 1)),
        ("rms_norm", "backward", 8192, (0, 3, 3), (1, 1, 3)),
        ("dyt", "backward", 4096, (0, 2, 2), (2, 1, 1)),
        // Rows of 16384 and 32768: a cube of 512 and 1024 units.
        ("layer_norm", "forward", 16384, (0, 3, 0), (1, 1, 0)),
        ("layer_norm", "forward", 32768, (0, 3, 0), (1, 1, 0)),
    ];
    let off = Launch { keep_from: 0, ..Launch::default() };
    for (name, pass, n, before, now) in cases {
        assert_eq!(kept_and_reads(name, pass, &[64, n], &off)[0], before, "{name} {pass} {n}, nothing kept");
        assert_eq!(kept_and_reads(name, pass, &[64, n], &Launch::default())[0], now, "{name} {pass} {n}");
    }
    // An EvoNorm's group of 8 channels of 56 x 56 (as at the GPU check's 32x256x56x56 with 32
    // groups; `laid` binds two) is kept by a cube of 1024 units, 25 positions each: x in its
    // forward; in its backward x in the group's phases (the sums per channel inside the group
    // walk each channel in turn and read memory).
    let evonorm = |pass| kept_and_reads("evonorm_s0", pass, &[4, 16, 56, 56], &Launch::default());
    assert_eq!((evonorm("forward"), evonorm("backward")), (vec![(1, 1, 0)], vec![(1, 2, 3)]));
}

#[test]
fn long_rows_keep_in_larger_cubes() {
    // Rows too long for 256 units' registers take 512 or 1024 units, each walking as many
    // positions as it needs (256 units: a power of two, at most 32); those kernels give what
    // the same launch reading memory gives.
    let off = Launch { keep_from: 0, ..Launch::default() };
    let cases = [("layer_norm", vec![2, 8192], (256, 32)), ("layer_norm", vec![2, 9000], (512, 18)), ("layer_norm", vec![2, 16385], (1024, 17)), ("evonorm_s0", vec![2, 4, 9000], (1024, 18))];
    for (name, shape, walk) in cases {
        let entry = registry().get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train, .. } = &entry.programs else { unreachable!() };
        let lay = laid(&entry, train, &shape, &Launch::default());
        let kept: Vec<_> = lay.launches.iter().filter(|(k, _)| !k.kept.is_empty()).map(|(k, _)| (k.units, k.unroll)).collect();
        assert_eq!(kept, [walk], "{name} {shape:?}");
        same_results(name, &shape, &[off, Launch::default()]);
    }
    // Held to cubes of 256 units, a row of 9000 is read again.
    let small = Launch { max_units: normforge_cubecl::kernel::BLOCK, ..Launch::default() };
    let entry = registry().get("layer_norm").unwrap().entry;
    let normforge_dsl::ir::Programs::Layer { train, .. } = &entry.programs else { unreachable!() };
    assert!(laid(&entry, train, &[2, 9000], &small).launches.iter().all(|(k, _)| k.kept.is_empty() && k.units == 256));
}

#[test]
fn launches_the_kernels_cannot_take_are_refused() {
    let bad = [
        Launch { columns: 3, ..Launch::default() },
        Launch { columns: 512, ..Launch::default() },
        Launch { max_units: 300, ..Launch::default() },
        Launch { max_units: 2048, ..Launch::default() },
        Launch { values_per_unit: 3, ..Launch::default() },
        Launch { values_per_unit: 64, ..Launch::default() },
        Launch { vector_bytes: 12, ..Launch::default() },
        Launch { vector_bytes: 32, ..Launch::default() },
    ];
    for launch in bad {
        assert!(launch.check().is_err(), "{launch:?}");
    }
    for vector_bytes in [0, 1, 2, 4, 8, 16] {
        Launch { vector_bytes, ..Launch::default() }.check().unwrap();
    }
    // And so is a layer given one, before anything runs.
    let entry = registry().get("dyt").unwrap().entry;
    let layer = CubeLayer::new(entry, &[], &[2, 8], &cpu_device().unwrap()).unwrap();
    assert!(layer.with_launch(bad[4]).is_err());
}

#[test]
fn every_layer_agrees_with_its_loads_kept() {
    // Keeping forced from one position on: every standard layer, forward and backward, agrees
    // with the same launch reading memory in every phase (reductions of 300 to 600 elements:
    // two or three positions per unit).
    let off = Launch { keep_from: 0, ..Launch::default() };
    let on = Launch { keep_from: 1, ..Launch::default() };
    let mut keeping_nothing = Vec::new();
    for name in LAYERS {
        let shape = if shapes(name)[0].len() == 2 { vec![5, 300] } else { vec![3, 4, 150] };
        let entry = registry().get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train, train_backward, .. } = &entry.programs else { unreachable!() };
        let kept = |p| laid(&entry, p, &shape, &on).launches.iter().any(|(k, _)| !k.kept.is_empty());
        if !(kept(train) || kept(train_backward)) {
            keeping_nothing.push(name);
        }
        same_results(name, &shape, &[off, on]);
    }
    // A spectral norm's kernels (a power iteration on its weight) read nothing twice.
    assert_eq!(keeping_nothing, ["spectral_norm"]);
}

#[test]
fn kept_loads_give_the_same_results() {
    // Every length of row a kernel of its own (one, two and four positions per unit, the last
    // partly filled), against the same launches reading memory in every phase; with and
    // without column sums inside the row kernel, and several values per cube.
    let off = Launch { keep_from: 0, ..Launch::default() };
    let on = Launch { keep_from: 1, ..Launch::default() };
    let launches = [off, on, Launch { rows_per_cube: 0, ..on }, Launch { rows_per_cube: 0, columns: 1, ..on }];
    for (name, shape) in [("layer_norm", vec![5, 1000]), ("rms_norm", vec![9, 257]), ("group_norm", vec![2, 4, 60]), ("evonorm_s0", vec![3, 4, 100]), ("batch_norm", vec![3, 40, 30])] {
        let entry = registry().get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train, .. } = &entry.programs else { unreachable!() };
        let lay = laid(&entry, train, &shape, &on);
        assert!(lay.launches.iter().any(|(k, _)| !k.kept.is_empty()), "{name} {shape:?}: nothing kept");
        same_results(name, &shape, &launches);
    }
}

#[test]
fn rows_read_as_vectors_give_the_same_results() {
    // A kernel keeping rows reads and writes four neighbouring values of a row as one access
    // where every row is whole vectors: the same results as one value at a time, forward and
    // backward (a layer norm's column partials per lane among them), in f32 and in half
    // precision (f16 in vec4<f16>, bf16 held in f32 words). Rows of 1000 take one vector per
    // unit, a cube's last units none; DyT's broadcast alpha is kept, one value for all lanes;
    // its forward is an elementwise kernel, each unit taking four vectors. Rows of 16384 keep
    // in cubes of 512 units, an EvoNorm's groups of 2 x 80 x 128 in cubes of 1024.
    let one = Launch { keep_from: 1, vector_bytes: 0, ..Launch::default() };
    let four = Launch { keep_from: 1, ..Launch::default() };
    let vectored = |entry: &normforge_dsl::ir::Entry, p: &normforge_dsl::ir::Program, shape: &[usize]| {
        let mut lay = laid(entry, p, shape, &four);
        lay.vectorize(4, &four);
        lay.launches.iter().filter(|(k, _)| k.vector == 4).count()
    };
    for (name, shape) in [("layer_norm", vec![5, 1024]), ("layer_norm", vec![3, 1000]), ("rms_norm", vec![3, 2048]), ("dyt", vec![4, 1024]), ("scale_norm", vec![3, 1024]), ("layer_norm", vec![3, 2, 1024]), ("layer_norm", vec![2, 16384]), ("evonorm_s0", vec![2, 4, 80, 128])] {
        let entry = registry().get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train, train_backward, .. } = &entry.programs else { unreachable!() };
        let (forward, backward) = (vectored(&entry, train, &shape), vectored(&entry, train_backward, &shape));
        assert!(forward + backward > 0, "{name} {shape:?}: no kernel reads vectors");
        match name {
            // Its forward, and its backward's row kernel (with the column partials at rows of
            // 1024 or fewer).
            "layer_norm" => assert_eq!((forward, backward), (1, 1), "{name} {shape:?}"),
            // The elementwise forward, and the backward's row kernel.
            "dyt" => assert_eq!((forward, backward), (1, 1), "{name} {shape:?}"),
            // The forward's group kernel (the backward's folds sums per channel inside each
            // group, which it walks channel by channel).
            "evonorm_s0" => assert_eq!(forward, 1, "{name} {shape:?}"),
            _ => {}
        }
        same_results(name, &shape, &[one, four]);
    }
    for dtype in [Dtype::F16, Dtype::BF16] {
        same_results_stored("layer_norm", &[5, 1024], &[one, four], dtype);
    }
    // Rows that are not whole vectors read a value at a time.
    let entry = registry().get("layer_norm").unwrap().entry;
    let normforge_dsl::ir::Programs::Layer { train, .. } = &entry.programs else { unreachable!() };
    assert_eq!(vectored(&entry, train, &[5, 1002]), 0);
    same_results("layer_norm", &[5, 1002], &[one, four]);
}

/// Two groups where the layer has them.
fn groups(entry: &normforge_dsl::ir::Entry) -> Vec<(String, f64)> {
    if entry.hparams.iter().any(|p| p.name == "groups") {
        vec![("groups".into(), 2.0)]
    } else {
        vec![]
    }
}

#[test]
fn column_sums_fold_inside_the_row_kernel() {
    // A layer norm's backward reads x and dy in one kernel for the input gradient and the
    // parameter gradients alike (two more passes over both otherwise), keeping column partials
    // in registers over a block of rows; an EvoNorm's or a group norm's folds its sums per
    // channel of a sample inside each group. A second kernel folds the partials. Rows too long
    // for the registers, or too short for a cube, keep the column kernel.
    let reads = |lay: &normforge_cubecl::Layout| {
        lay.launches.iter().filter(|(k, _)| k.phases.iter().flat_map(|p| &p.ops).any(|op| matches!(op, LOp::Load(_, _, Buf::Input)))).count()
    };
    let rows = |n: usize| vec![300, n];
    let channels = |n: usize| vec![4, 8, n];
    // (layer, its input shape for a reduced extent, a reduced extent too long, one too short)
    type Case<'a> = (&'a str, &'a dyn Fn(usize) -> Vec<usize>, usize, usize);
    let cases: [Case; 6] = [
        ("layer_norm", &rows, 32 * 256 + 1, 40),
        ("rms_norm", &rows, 32 * 256 + 1, 40),
        ("dyt", &rows, 32 * 256 + 1, 40),
        ("evonorm_s0", &channels, 63, 1),
        ("group_norm", &channels, 63, 1),
        ("instance_norm", &channels, 63, 1),
    ];
    for (name, shape, long, short) in cases {
        let entry = registry().get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train_backward, .. } = &entry.programs else { unreachable!() };
        let plan = normforge_cubecl::plan(&entry, train_backward).unwrap();
        assert!(plan.across.is_some(), "{name}: no column reduction folds inside the row kernel");
        for (shape, launch, want) in [
            (shape(4096), Launch::default(), 1),
            (shape(4096), Launch { rows_per_cube: 0, ..Launch::default() }, 2),
            (shape(long), Launch::default(), 2),
            (shape(short), Launch::default(), 2),
        ] {
            let lay = laid(&entry, train_backward, &shape, &launch);
            assert_eq!(reads(&lay), want, "{name} {shape:?} {launch:?}: kernels reading x");
            let inside = lay.launches.iter().filter(|(k, _)| k.phases.iter().any(|p| p.reach != Reach::Element)).count();
            assert_eq!(inside, usize::from(want == 1), "{name} {shape:?}");
        }
    }
}

#[test]
fn independent_reductions_share_one_walk() {
    // Phases of a kernel over the same elements that need nothing from one another walk them
    // once: an EvoNorm's three sums per channel, a DyT's alpha gradient with its input
    // gradient, a layer norm's backward sums that wait only for the mean.
    let reg = registry();
    let backward = |name: &str| {
        let entry = reg.get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train_backward, .. } = &entry.programs else { unreachable!() };
        normforge_cubecl::plan(&entry, train_backward).unwrap()
    };
    let evo = backward("evonorm_s0");
    let a = evo.across.as_ref().unwrap();
    let finer: Vec<usize> = a.kernels[a.row].phases.iter().filter(|p| matches!(p.reach, Reach::Finer(_))).map(|p| p.reduces.len()).collect();
    assert_eq!(finer, [3], "evonorm_s0: sums per channel by phase");
    let dyt = backward("dyt");
    let a = dyt.across.as_ref().unwrap();
    assert!(a.kernels[a.row].phases.iter().any(|p| !p.reduces.is_empty() && !p.stores.is_empty()), "dyt: alpha's gradient walks the row apart from the input gradient");
    let ln = backward("layer_norm");
    let row = &ln.kernels[0];
    assert!(row.phases.len() < row.reductions() + 1, "layer_norm: {} phases for {} reductions and the input gradient", row.phases.len(), row.reductions());
}

#[test]
fn single_values_are_folded_by_many_cubes() {
    // A kernel computing a single value runs as one cube: it may fold values along one axis
    // (partials), never read a whole tensor or write one (a DyT's scalar gradient over a
    // 16384x4096 input was one cube's work).
    use normforge_dsl::ir::{Extent, Programs};
    let mut split = 0;
    for r in registry().list(None) {
        let programs: Vec<&normforge_dsl::ir::Program> = match &r.entry.programs {
            Programs::Layer { train, eval, train_backward, eval_backward } => vec![train, eval, train_backward, eval_backward],
            Programs::Optimizer { step } => vec![step],
        };
        // Plans as they run: layers alone; rules through layer kernels in stacks, where the
        // first axis indexes the tensors and a single value is one per tensor.
        let mut plans = Vec::new();
        for prog in programs {
            match normforge_cubecl::plan(&r.entry, prog) {
                Ok(plan) if r.entry.kind != normforge_dsl::ir::Kind::Optimizer => plans.push((plan, 0)),
                _ if r.entry.kind == normforge_dsl::ir::Kind::Optimizer && normforge_cubecl::compile(&r.entry, prog).is_err() => {
                    plans.push((normforge_cubecl::Stacked::new(&r.entry, prog).unwrap().step, 1))
                }
                _ => {}
            }
        }
        for (plan, lead) in plans {
            let spans = |s: usize| plan.shapes[s].0[lead..].iter().filter(|e| **e != Extent::One).count();
            for k in plan.kernels.iter().filter(|k| spans(k.target) == 0) {
                for ph in &k.phases {
                    assert!(spans(ph.domain) <= 1, "{}: a single value folded over {} axes in one cube", r.name, spans(ph.domain));
                    assert!(ph.stores.is_empty() || spans(ph.domain) == 0, "{}: elementwise work in a single-value kernel", r.name);
                }
            }
            split += plan.tensors.iter().filter(|t| matches!(t.0, normforge_cubecl::Source::Partial(_))).count();
        }
    }
    assert!(split > 0, "no reduction took two stages");
}

#[test]
fn phases_over_the_same_elements_share_a_kernel() {
    // (layer, program, kernels): a forward whose statistics and output cover the same rows or
    // channels is one kernel; a backward adds one for the parameter gradients (summed over
    // rows, not along them).
    let reg = registry();
    for (name, pass, want) in [("layer_norm", 0, 1), ("rms_norm", 0, 1), ("batch_norm", 0, 1), ("group_norm", 0, 1), ("layer_norm", 2, 2), ("rms_norm", 2, 2)] {
        let entry = reg.get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train, eval, train_backward, eval_backward } = &entry.programs else { unreachable!() };
        let prog = [train, eval, train_backward, eval_backward][pass];
        let plan = normforge_cubecl::plan(&entry, prog).unwrap();
        let phases: Vec<usize> = plan.kernels.iter().map(|k| k.phases.len()).collect();
        assert_eq!(plan.kernels.len(), want, "{name} pass {pass}: phases per kernel {phases:?}");
        assert!(plan.kernels[0].phases.len() >= 2, "{name} pass {pass}: nothing fused ({phases:?})");
    }
}
