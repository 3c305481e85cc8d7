//! NVRTC on this machine, no GPU needed: every kernel the CubeCL backend emits for the standard
//! library compiles for Hopper (compute_90), and the cache gives back exactly what it stored.
//! Without NVRTC the tests say so and skip, unless NORMFORGE_REQUIRE_NVRTC=1 (scripts/test.sh
//! installs NVRTC and sets it), where a missing library fails them.

use normforge_cubecl::emit::Lang;
use normforge_cubecl::{Dtype, Precision};
use normforge_cuda::{Compiler, Error, Origin};
use normforge_dsl::ir::Kind;
use std::path::PathBuf;

const ARCH: &str = "compute_90";

fn compiler(disk: Option<PathBuf>) -> Option<Compiler> {
    match Compiler::new(ARCH, Compiler::default_include_dirs(), disk) {
        Ok(c) => Some(c),
        Err(e @ Error::NoNvrtc { .. }) => {
            assert!(std::env::var("NORMFORGE_REQUIRE_NVRTC").as_deref() != Ok("1"), "{e}");
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("normforge-nvrtc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn every_std_kernel_compiles_for_hopper() {
    let Some(nvrtc) = compiler(None) else { return };
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let (mut modules, mut slowest) = (0, std::time::Duration::ZERO);
    for r in reg.list(None) {
        let e = &r.entry;
        let passes: &[&str] =
            if e.kind == Kind::Optimizer { &["step", "init"] } else { &["forward", "backward", "forward-eval", "backward-eval"] };
        for &pass in passes {
            for dtype in [Dtype::F32, Dtype::BF16] {
                let what = format!("{} {pass} {dtype:?}", e.name);
                // One module per kernel, as the CUDA path loads them.
                let units = normforge_cubecl::emit_units(e, pass, dtype, Lang::Cuda).unwrap_or_else(|err| panic!("{what}: {err}"));
                assert!(!units.is_empty(), "{what}: no kernels");
                for unit in units {
                    let out = nvrtc.compile(&unit.source).unwrap_or_else(|err| panic!("{what}: {err}"));
                    // Identical sources (the same state initializer in two rules) come from memory.
                    assert_ne!(out.origin, Origin::Disk);
                    slowest = slowest.max(out.elapsed);
                    assert_eq!(unit.source.matches("__global__").count(), 1, "{what}: one kernel per unit");
                    let name = normforge_cuda::driver::entry_point(&unit.source).unwrap_or_else(|| panic!("{what}: no entry point"));
                    assert!(out.ptx.contains(&format!(".entry {name}(")), "{what}: PTX lacks `{name}`");
                    assert!(out.ptx.contains(".target sm_90"), "{what}: not built for sm_90");
                    modules += 1;
                }
            }
        }
    }
    assert!(modules >= 2 * 2 * 16 + 2 * 4 * 19, "{modules} modules");
    eprintln!("{modules} modules compiled for {ARCH}; slowest {slowest:?}");
}

#[test]
fn the_cache_returns_what_it_stored() {
    let Some(_) = compiler(None) else { return };
    let dir = scratch("cache");
    let src = r#"extern "C" __global__ void scale(float* x, float a, unsigned n) {
        unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) x[i] *= a;
    }"#;
    let first = compiler(Some(dir.clone())).unwrap();
    let a = first.compile(src).unwrap();
    assert_eq!(a.origin, Origin::Compiled);
    let b = first.compile(src).unwrap();
    assert_eq!((b.origin, &b.ptx), (Origin::Memory, &a.ptx));
    // A new process (a new compiler) finds it on disk.
    let second = compiler(Some(dir.clone())).unwrap();
    let c = second.compile(src).unwrap();
    assert_eq!((c.origin, &c.ptx), (Origin::Disk, &a.ptx));
    // A damaged file is a miss: compiled again and rewritten, never loaded.
    let file = dir.join(format!("{:032x}.ptx", a.key));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, &text[..text.len() / 3]).unwrap();
    let third = compiler(Some(dir.clone())).unwrap();
    let d = third.compile(src).unwrap();
    assert_eq!((d.origin, &d.ptx), (Origin::Compiled, &a.ptx));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    // Another source or another architecture is another key.
    assert_ne!(first.key(src), first.key(&src.replace("*= a", "+= a")));
    let sm80 = Compiler::new("compute_80", Compiler::default_include_dirs(), None).unwrap();
    assert_ne!(sm80.key(src), first.key(src));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_kernel_is_an_error_with_nvrtcs_log() {
    let Some(nvrtc) = compiler(None) else { return };
    let err = nvrtc.compile("extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Compile { .. }) && text.contains("compute_90") && text.contains("undefined_name"), "{text}");
}

/// The GPU check holds the stream before each timed run with a kernel written by hand: it
/// compiles, spins on the global timer (the device's nanoseconds, not the SM clock, which moves
/// with the load) with the SM clock as a bound, and touches no memory.
#[test]
fn the_hold_kernel_reads_the_global_timer() {
    let Some(nvrtc) = compiler(None) else { return };
    assert_eq!(normforge_cuda::driver::entry_point(normforge_cuda::driver::HOLD), Some("normforge_hold"));
    let ptx = nvrtc.compile(normforge_cuda::driver::HOLD).unwrap().ptx;
    assert!(ptx.matches("%globaltimer").count() >= 2, "{ptx}");
    // ...and ends by its own clock should that timer stand still.
    assert!(ptx.contains("%clock64"), "{ptx}");
    assert!(!ptx.contains("st.global") && !ptx.contains("ld.global"), "{ptx}");
    let usage = nvrtc.usage(normforge_cuda::driver::HOLD).unwrap();
    assert_eq!((usage.spill_stores, usage.stack_bytes), (0, 0), "{usage:?}");
}

/// Each branch of a PTX listing (its lines trimmed): its line, its target label's line, and
/// whether it is conditional.
fn branches(lines: &[&str]) -> Vec<(usize, usize, bool)> {
    let label_at = |name: &str| lines.iter().position(|l| l.strip_suffix(':') == Some(name));
    let mut out = Vec::new();
    for (k, l) in lines.iter().enumerate() {
        let conditional = l.starts_with('@');
        if let Some(target) = l.strip_prefix('@').and_then(|r| r.split_once(" bra")).map(|(_, t)| t).or_else(|| l.strip_prefix("bra")) {
            if let Some(at) = label_at(target.trim_start_matches(".uni").trim().trim_end_matches(';')) {
                out.push((k, at, conditional));
            }
        }
    }
    out
}

/// The instructions of a PTX listing that `is` picks and that lie inside a loop (between a label
/// and a branch back to it).
fn in_loops(ptx: &str, is: impl Fn(&str) -> bool) -> Vec<String> {
    let lines: Vec<&str> = ptx.lines().map(str::trim).collect();
    let mut inside = vec![false; lines.len()];
    for (k, start, _) in branches(&lines).into_iter().filter(|&(k, at, _)| at < k) {
        inside[start..=k].iter_mut().for_each(|x| *x = true);
    }
    lines.iter().zip(inside).filter(|(l, i)| *i && is(l)).map(|(l, _)| l.to_string()).collect()
}

/// The integer divisions of a PTX listing that lie inside a loop.
fn divisions_in_loops(ptx: &str) -> Vec<String> {
    in_loops(ptx, |l| l.starts_with("div.u") || l.starts_with("rem.u") || l.starts_with("div.s") || l.starts_with("rem.s"))
}

/// A cooperative kernel's reductions fold within each warp by shuffles and meet at two
/// barriers each, none in a loop (`LProgram::planes`); without, the tree in shared memory meets
/// at a barrier per halving of the cube. Layer and RMS norms, forward and backward, rows of
/// 4096 and of 100, as launched.
#[test]
fn reductions_fold_in_warps_by_shuffles() {
    let Some(nvrtc) = compiler(None) else { return };
    let ptx = |k: &normforge_cubecl::kernel::LProgram| nvrtc.compile(&normforge_cubecl::emit::layer_unit(k, Dtype::F32, Lang::Cuda).unwrap().source).unwrap().ptx;
    let barriers = |ptx: &str| ptx.lines().filter(|l| l.trim().starts_with("bar.sync")).count();
    let mut checked = 0;
    for (name, plan) in row_norm_plans() {
        for n in [4096, 100] {
            let launched = |planes| {
                let launch = normforge_cubecl::Launch { planes, ..Default::default() };
                plan.kernels.iter().map(|k| normforge_cubecl::launched(k, n, 1, &launch)).filter(|k| k.cooperative).map(|k| normforge_cubecl::keeping(k, &|_| n, &launch)).collect::<Vec<_>>()
            };
            for (shuffled, plain) in launched(true).iter().zip(&launched(false)) {
                let (shuffled, plain) = (ptx(shuffled), ptx(plain));
                assert!(shuffled.contains("shfl.sync.bfly") && !plain.contains("shfl.sync"), "{name} at {n}");
                let in_loop = in_loops(&shuffled, |l| l.starts_with("bar.sync"));
                assert!(in_loop.is_empty(), "{name} at {n}: barriers in loops {in_loop:?}");
                assert!(barriers(&shuffled) < barriers(&plain), "{name} at {n}: {} barriers with shuffles, {} without", barriers(&shuffled), barriers(&plain));
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "{checked} kernels checked");
}

/// The plans of layer_norm's and rms_norm's training forward and backward, by name.
fn row_norm_plans() -> Vec<(&'static str, normforge_cubecl::Plan)> {
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let mut out = Vec::new();
    for name in ["layer_norm", "rms_norm"] {
        let e = reg.get(name).unwrap().entry;
        let normforge_dsl::ir::Programs::Layer { train, train_backward, .. } = &e.programs else { unreachable!() };
        for prog in [train, train_backward] {
            out.push((name, normforge_cubecl::plan(&e, prog).unwrap()));
        }
    }
    out
}

/// A row of a layer norm or an RMS norm is addressed without integer division (on a GPU the
/// costly part of each element's work; the shape's kind along each axis is fixed when the plan
/// is made, so full and broadcast axes need none), and without local memory: every kernel,
/// forward and backward, with the column sums in the row kernel or not.
#[test]
fn row_kernels_divide_nowhere_inside_their_loops() {
    let Some(nvrtc) = compiler(None) else { return };
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let mut checked = 0;
    for name in ["layer_norm", "rms_norm"] {
        let e = reg.get(name).unwrap().entry;
        for pass in ["forward", "backward"] {
            for unit in normforge_cubecl::emit_units(&e, pass, Dtype::BF16, Lang::Cuda).unwrap() {
                let ptx = nvrtc.compile(&unit.source).unwrap().ptx;
                assert!(ptx.contains("bra"), "{name} {pass}: no loop found");
                let found = divisions_in_loops(&ptx);
                assert!(found.is_empty(), "{name} {pass}: {found:?}");
                // A row kernel folding column sums keeps its partials in registers.
                assert!(!ptx.contains(".local"), "{name} {pass}: {}local memory", unit.comment);
                checked += 1;
            }
        }
    }
    assert!(checked >= 4);
}

/// A row kept in registers between phases (rows of 4096: sixteen positions per unit, unrolled,
/// beside the backward's column partials) stays in registers: no local memory, and no division
/// in a loop.
#[test]
fn kept_rows_stay_in_registers() {
    let Some(nvrtc) = compiler(None) else { return };
    let launch = normforge_cubecl::Launch::default();
    let mut checked = 0;
    for (name, plan) in row_norm_plans() {
        let mut kernels: Vec<_> = plan.kernels.iter().map(|k| normforge_cubecl::launched(k, 4096, 1, &launch)).collect();
        if let Some(a) = &plan.across {
            kernels.push(a.row_kernel(4096));
        }
        for k in kernels {
            let k = normforge_cubecl::keeping(k, &|_| 4096, &launch);
            if k.kept.is_empty() {
                continue;
            }
            for dtype in [Dtype::F32, Dtype::BF16] {
                let unit = normforge_cubecl::emit::layer_unit(&k, dtype, Lang::Cuda).unwrap();
                let ptx = nvrtc.compile(&unit.source).unwrap().ptx;
                assert!(!ptx.contains(".local"), "{name}: {} loads kept, {} across: local memory", k.kept.len(), k.across());
                let found = divisions_in_loops(&ptx);
                assert!(found.is_empty(), "{name}: {found:?}");
                checked += 1;
            }
        }
    }
    // Per layer, the forward row kernel and the backward's with and without column sums,
    // in f32 and bf16.
    assert_eq!(checked, 12);
}

/// The kernels a std layer launches for an input of `shape` stored as `dtype` with the default
/// launch, as the CUDA path launches them (rows read a vector at a time where they may), per
/// pass ("forward", "backward"), in launch order.
fn launched_at(name: &str, shape: &[usize], dtype: Dtype) -> Vec<(&'static str, normforge_cubecl::kernel::LProgram)> {
    normforge_std::link();
    let e = normforge_registry::Registry::with_builtins().unwrap().get(name).unwrap().entry;
    let normforge_dsl::ir::Programs::Layer { train, train_backward, .. } = &e.programs else { unreachable!() };
    let b = normforge_dsl::bind::bind_axes(&e.axes, shape, "x").unwrap();
    let hp = normforge_dsl::hyper::resolve(&e, &[]).unwrap();
    let mut out = Vec::new();
    for (pass, prog) in [("forward", train), ("backward", train_backward)] {
        let plan = normforge_cubecl::plan(&e, prog).unwrap();
        let launch = normforge_cubecl::Launch::default();
        let mut lay = normforge_cubecl::layout(&plan, &b, &hp, 0.0, &launch).unwrap();
        lay.vectorize(dtype.size(), &launch);
        out.extend(lay.launches.into_iter().map(|(k, _)| (pass, k)));
    }
    out
}

/// What ptxas (sm_90) makes of every kernel the GPU check's layers launch, at its shapes and at
/// rows of 16384 and 32768 (kept by cubes of 512 and 1024 units): no spills, no stack, and no
/// more registers per unit than a cube of its units gets (65536 per cube), so each kernel
/// launches and keeps in registers what it means to.
#[test]
fn launched_layer_kernels_fit_the_register_file() {
    let Some(nvrtc) = compiler(None) else { return };
    let cases: [(&str, &[usize]); 6] = [
        ("layer_norm", &[16384, 4096]),
        ("rms_norm", &[16384, 4096]),
        ("dyt", &[16384, 4096]),
        ("evonorm_s0", &[32, 256, 56, 56]),
        ("layer_norm", &[64, 16384]),
        ("layer_norm", &[64, 32768]),
    ];
    let (mut checked, mut big) = (0, 0);
    for (name, shape) in cases {
        for dtype in [Dtype::F32, Dtype::BF16] {
            for (pass, k) in launched_at(name, shape, dtype) {
                let unit = normforge_cubecl::emit::layer_unit(&k, dtype, Lang::Cuda).unwrap();
                let u = nvrtc.usage(&unit.source).unwrap();
                let what = format!("{name} {shape:?} {pass} {dtype:?}: {} units, {} kept x {} x {}", k.units, k.kept.len(), k.unroll, k.vector);
                eprintln!("{what}: {u:?}");
                assert_eq!((u.spill_stores, u.spill_loads, u.stack_bytes), (0, 0, 0), "{what}: spills");
                assert!(u.registers as usize * k.units <= normforge_cubecl::REGISTERS_PER_CUBE, "{what}: {} registers", u.registers);
                big += (k.units > normforge_cubecl::kernel::BLOCK) as usize;
                checked += 1;
            }
        }
    }
    assert!(big >= 4 && checked >= 36, "{checked} kernels, {big} in larger cubes");
}

#[test]
fn a_division_in_a_loop_is_found() {
    let ptx = "mov.u32 %r1, 0;\n$L__BB0_1:\ndiv.u32 %r2, %r3, %r4;\nadd.s32 %r1, %r1, 1;\n@%p1 bra $L__BB0_1;\nrem.u32 %r5, %r6, %r7;\n";
    assert_eq!(divisions_in_loops(ptx), vec!["div.u32 %r2, %r3, %r4;"]);
    assert!(divisions_in_loops("$L__BB0_1:\nadd.s32 %r1, %r1, 1;\n@%p1 bra $L__BB0_1;\ndiv.u32 %r2, %r3, %r4;\n").is_empty());
}


/// The stretches of a PTX listing (its lines trimmed) a branch may skip: from each conditional
/// branch to its label further down.
fn skips(lines: &[&str]) -> Vec<std::ops::Range<usize>> {
    branches(lines).into_iter().filter(|&(k, at, conditional)| conditional && at > k).map(|(k, at, _)| k..at).collect()
}

/// The lines of a PTX listing that match `is` and lie in a block a branch may skip.
fn skippable(ptx: &str, is: impl Fn(&str) -> bool) -> Vec<String> {
    let lines: Vec<&str> = ptx.lines().map(str::trim).collect();
    let mut skipped = vec![false; lines.len()];
    for r in skips(&lines) {
        skipped[r].iter_mut().for_each(|x| *x = true);
    }
    lines.iter().zip(skipped).filter(|(l, s)| *s && is(l)).map(|(l, _)| l.to_string()).collect()
}

/// An elementwise kernel gives each unit several elements (`Launch::values_per_unit`), and
/// reads them under no branch — a unit past the end reads the first element and stores
/// nothing — so its loads can all be in flight before its first store: every std layer's
/// elementwise kernel reading the input or the output gradient, in bf16 (whose loads are the
/// only 16-bit ones).
#[test]
fn elementwise_kernels_load_under_no_branch() {
    let Some(nvrtc) = compiler(None) else { return };
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let launch = normforge_cubecl::Launch::default();
    let mut checked = 0;
    for r in reg.list(None) {
        let normforge_dsl::ir::Programs::Layer { train, train_backward, .. } = &r.entry.programs else { continue };
        for prog in [train, train_backward] {
            for k in &normforge_cubecl::plan(&r.entry, prog).unwrap().kernels {
                let k = normforge_cubecl::launched(k, 1, 1 << 20, &launch);
                use normforge_cubecl::kernel::{Buf, LOp};
                let reads_storage = k.phases.iter().flat_map(|p| &p.ops).any(|op| matches!(op, LOp::Load(_, _, Buf::Input | Buf::GradOutput)));
                if k.values_per_unit == 1 || !reads_storage {
                    continue;
                }
                let unit = normforge_cubecl::emit::layer_unit(&k, Dtype::BF16, Lang::Cuda).unwrap();
                let ptx = nvrtc.compile(&unit.source).unwrap().ptx;
                let loads = ptx.lines().filter(|l| l.contains("ld.global.nc.u16")).count();
                assert!(loads >= launch.values_per_unit, "{}: {loads} loads of the storage type", r.name);
                let found = skippable(&ptx, |l| l.starts_with("ld.global.nc.u16"));
                assert!(found.is_empty(), "{}: loads under a branch: {found:?}", r.name);
                checked += 1;
            }
        }
    }
    // DyT's forward at least, and the elementwise kernels of other layers.
    assert!(checked >= 3, "{checked} elementwise kernels");
}

#[test]
fn a_skippable_load_is_found() {
    let ptx = "ld.global.nc.u16 %rs1, [%rd1];\n@%p1 bra $L__BB0_2;\nld.global.nc.u16 %rs2, [%rd2];\nst.global.u16 [%rd3], %rs2;\n$L__BB0_2:\nret;\n";
    assert_eq!(skippable(ptx, |l| l.starts_with("ld.global")), vec!["ld.global.nc.u16 %rs2, [%rd2];"]);
}

/// For each conditional branch of a PTX listing jumping ahead, how many lines matching `is` it
/// skips.
fn skipped_per_branch(ptx: &str, is: impl Fn(&str) -> bool) -> Vec<usize> {
    let lines: Vec<&str> = ptx.lines().map(str::trim).collect();
    skips(&lines).into_iter().map(|r| lines[r].iter().filter(|l| is(l)).count()).collect()
}

#[test]
fn loads_skipped_per_branch_are_counted() {
    let ptx = "@%p1 bra $L__BB0_3;\nld.global.nc.u16 %rs1, [%rd1];\n@%p2 bra $L__BB0_2;\nld.global.nc.u16 %rs2, [%rd2];\n$L__BB0_2:\nst.global.u16 [%rd3], %rs2;\n$L__BB0_3:\nret;\n";
    assert_eq!(skipped_per_branch(ptx, |l| l.starts_with("ld.global")), vec![2, 1]);
}

/// The rows kept in registers are read in one unrolled walk (the first keeping phase's, also
/// for rows only later phases use: `LProgram::prefetches`) whose loads are under no branch of
/// their own — a position past the row's end reads the first again and counts for nothing —
/// so that ptxas may have them in flight together (each under its own branch, it issued a few
/// at a time, each after the shape table's entries read again for it): a branch skips all of
/// them or none. Each row is read once, and read and written eight bf16 values (16 bytes) an
/// access, not two bytes (`LProgram::vector`): the kernels the GPU check's layers launch at
/// 16384 x 4096 that keep rows in a cube of `BLOCK` units, in bf16 (whose vectors of x, dy
/// and the outputs are the only 16-byte accesses).
#[test]
fn kept_rows_are_read_in_one_unbranched_walk() {
    let Some(nvrtc) = compiler(None) else { return };
    use normforge_cubecl::kernel::{Buf, BLOCK};
    let mut checked = 0;
    for name in ["layer_norm", "rms_norm", "dyt"] {
        for (pass, k) in launched_at(name, &[16384, 4096], Dtype::BF16).into_iter().filter(|(_, k)| k.cooperative && !k.kept.is_empty() && k.units == BLOCK) {
            assert_eq!(k.vector, 8, "{name} {pass}: rows of 4096 bf16 values are read 16 bytes at a time");
            let ptx = nvrtc.compile(&normforge_cubecl::emit::layer_unit(&k, Dtype::BF16, Lang::Cuda).unwrap().source).unwrap().ptx;
            let count = |op: &str| ptx.lines().filter(|l| l.trim().starts_with(op)).count();
            let storage = |l: &str| l.starts_with("ld.global.nc.v4.u32");
            let rows = k.kept.iter().filter(|(_, _, buf)| matches!(buf, Buf::Input | Buf::GradOutput)).count();
            assert_eq!(count("ld.global.nc.v4.u32"), rows * k.unroll, "{name} {pass}: vectors of x and dy");
            assert_eq!(count("ld.global.nc.u16"), 0, "{name} {pass}: a value of x or dy read alone");
            // Each output a vector per position, none a value at a time.
            let outputs = k.phases.iter().flat_map(|p| &p.stores).filter(|s| s.2).count();
            assert_eq!((count("st.global.v4.u32"), count("st.global.u16")), (outputs * k.unroll, 0), "{name} {pass}: stores");
            let skipped = skipped_per_branch(&ptx, storage);
            assert!(skipped.iter().all(|&n| n == 0 || n >= rows * k.unroll), "{name} {pass}: loads skipped per branch {skipped:?}, {} per row", k.unroll);
            checked += 1;
        }
    }
    // The forwards of a layer norm and an RMS norm, and the three backwards.
    assert_eq!(checked, 5);
}

/// An elementwise kernel the GPU check times (DyT's forward at 16384 x 4096) reads and writes
/// 16 bytes an access, each unit `values_per_unit` vectors, their loads under no branch: in
/// f32 (four values a vector) and bf16 (eight).
#[test]
fn timed_elementwise_kernels_read_vectors_under_no_branch() {
    let Some(nvrtc) = compiler(None) else { return };
    let launch = normforge_cubecl::Launch::default();
    let mut checked = 0;
    for (dtype, load, store) in [(Dtype::F32, "ld.global.nc.v4.f32", "st.global.v4.f32"), (Dtype::BF16, "ld.global.nc.v4.u32", "st.global.v4.u32")] {
        for (pass, k) in launched_at("dyt", &[16384, 4096], dtype).into_iter().filter(|(_, k)| !k.cooperative && k.values_per_unit > 1) {
            assert_eq!(k.vector * dtype.size(), launch.vector_bytes, "dyt {pass} {dtype:?}");
            let ptx = nvrtc.compile(&normforge_cubecl::emit::layer_unit(&k, dtype, Lang::Cuda).unwrap().source).unwrap().ptx;
            let count = |op: &str| ptx.lines().filter(|l| l.trim().starts_with(op)).count();
            // (In f32, gamma's and beta's vectors too: `row_parameters_are_read_four_values_an_access`.)
            let params = if dtype == Dtype::F32 { k.lane_params(0).len() * k.values_per_unit } else { 0 };
            assert_eq!((count(load), count(store)), (k.values_per_unit + params, k.values_per_unit), "dyt {pass} {dtype:?}: vectors of x and y");
            let found = skippable(&ptx, |l| l.starts_with(load));
            assert!(found.is_empty(), "dyt {pass} {dtype:?}: loads under a branch: {found:?}");
            checked += 1;
        }
    }
    // DyT's forward, in f32 and bf16.
    assert_eq!(checked, 2);
}

/// A kernel walking rows unrolled without column partials holds its shape table in registers
/// (`LProgram::holds_table`): each entry it uses is read once (an EvoNorm's group kernel read
/// its 23 entries 660 times, again for each position under the branch using them). The table
/// is the only 32-bit integer data a layer kernel loads.
#[test]
fn held_shape_tables_are_read_once() {
    let Some(nvrtc) = compiler(None) else { return };
    let cases: [(&str, &[usize]); 4] = [("layer_norm", &[16384, 4096]), ("rms_norm", &[16384, 4096]), ("evonorm_s0", &[32, 256, 56, 56]), ("layer_norm", &[64, 32768])];
    let mut checked = 0;
    for (name, shape) in cases {
        for dtype in [Dtype::F32, Dtype::BF16] {
            for (_, k) in launched_at(name, shape, dtype).into_iter().filter(|(_, k)| k.holds_table()) {
                let ptx = nvrtc.compile(&normforge_cubecl::emit::layer_unit(&k, dtype, Lang::Cuda).unwrap().source).unwrap().ptx;
                let reads: Vec<&str> = ptx.lines().filter_map(|l| l.trim().strip_prefix("ld.global.nc.u32")).filter_map(|l| l.split_once('[')).map(|(_, at)| at).collect();
                let distinct: std::collections::BTreeSet<&str> = reads.iter().copied().collect();
                assert!(!reads.is_empty() && reads.len() <= k.table_len(), "{name} {shape:?} {dtype:?}: {} table reads", reads.len());
                assert_eq!(reads.len(), distinct.len(), "{name} {shape:?} {dtype:?}: an entry read twice: {reads:?}");
                checked += 1;
            }
        }
    }
    // The forwards of the four, an EvoNorm's backward group kernel and the long rows' backward
    // row kernel (rows of 4096 fold column partials in theirs), in f32 and bf16.
    assert_eq!(checked, 2 * 6, "kernels holding their table");
}

/// A fused step phase that reduces nothing updates several blocks per cube, a unit reading and
/// writing four neighbouring elements of each stream as one vector, every load made before any
/// work, under no branch: each unit has 4 x (p, g, states) in flight, held in registers (ptxas
/// spills nothing). Every std rule fused this way, f32 parameters with f32 or bf16 states, and bf16
/// or f16 parameters with states of their dtype.
#[test]
fn step_kernels_load_under_no_branch() {
    let Some(nvrtc) = compiler(None) else { return };
    normforge_std::link();
    let reg = normforge_registry::Registry::with_builtins().unwrap();
    let mut checked = 0;
    for r in reg.list(None) {
        let normforge_dsl::ir::Programs::Optimizer { step } = &r.entry.programs else { continue };
        let Ok(prog) = normforge_cubecl::compile(&r.entry, step) else { continue };
        let (f32s, bf16s) = (Precision::default(), Precision { param: Dtype::F32, state: Dtype::BF16 });
        let scaled = prog.grad_scaled();
        let variants = [f32s, bf16s, Precision::uniform(Dtype::BF16), Precision::uniform(Dtype::F16)].map(|d| (&prog, d, ""));
        // And the kernels of a clipped step, reading each gradient scaled.
        let variants = variants.into_iter().chain([f32s, Precision::uniform(Dtype::BF16)].map(|d| (&scaled, d, " scaled")));
        for (prog, dtype, what) in variants {
            let units = normforge_cubecl::emit::program_units(prog, dtype, Lang::Cuda).unwrap();
            // (A reducing phase's unit is followed by its combine's.)
            let mut units = units.into_iter();
            for phase in &prog.phases {
                let unit = units.next().unwrap();
                if !phase.accums.is_empty() {
                    units.next();
                    assert_eq!(phase.blocks_per_cube, 1, "{}: a reducing phase takes a block per cube", r.name);
                    continue;
                }
                assert_eq!((phase.blocks_per_cube, phase.lanes), (normforge_cubecl::kernel::BLOCKS_PER_CUBE, normforge_cubecl::kernel::LANES));
                let ptx = nvrtc.compile(&unit.source).unwrap().ptx;
                // Every stream a whole vector per access: one vector load per load of the
                // program, one vector store per store (the scalars are read one by one).
                let vector = |op: &str| ptx.lines().filter(|l| l.trim_start().starts_with(op) && l.contains(".v")).count();
                let (loads, stores) = (vector("ld.global"), vector("st.global"));
                assert_eq!((loads, stores), (phase.loads(), phase.stores()), "{}{what} {dtype:?}: vector loads and stores", r.name);
                let found = skippable(&ptx, |l| l.starts_with("ld.global"));
                assert!(found.is_empty(), "{}{what} {dtype:?}: loads under a branch: {found:?}", r.name);
                // The loaded values wait in registers, not in local memory.
                let u = nvrtc.usage(&unit.source).unwrap();
                assert_eq!((u.spill_stores, u.stack_bytes), (0, 0), "{}{what} {dtype:?}: {u:?}", r.name);
                eprintln!("{}{what} {dtype:?}: {} registers", r.name, u.registers);
                checked += 1;
            }
        }
    }
    assert!(checked >= 6 * 10, "{checked} step phases");
}


/// A kernel reading rows as vectors reads its f32 parameters along the row (gamma, beta) four
/// values an access, not a value per lane, where a warp's loads of one lane would lie a vector
/// apart: in the timed layers' kernels, each of these loads replaces four single ones, and
/// every parameter along the row is so read — in every phase running lanes, kept or not, at
/// each of a unit's vectors (`LProgram::lane_params`).
#[test]
fn row_parameters_are_read_four_values_an_access() {
    let Some(nvrtc) = compiler(None) else { return };
    use normforge_cubecl::kernel::{LProgram, PARAM_LANES};
    let mut checked = 0;
    for name in ["layer_norm", "rms_norm", "dyt"] {
        for dtype in [Dtype::F32, Dtype::BF16] {
            for (pass, k) in launched_at(name, &[16384, 4096], dtype).into_iter().filter(|(_, k)| k.vector > 1) {
                let what = format!("{name} {pass} {dtype:?}");
                assert!(k.vector_params, "{what}: parameters read a value per lane");
                // Loads of f32 values (parameters, reductions) and of f32 vectors (x, dy in
                // f32; the parameters) in the kernel and in the same reading per lane.
                let loads = |k: &LProgram| {
                    let ptx = nvrtc.compile(&normforge_cubecl::emit::layer_unit(k, dtype, Lang::Cuda).unwrap().source).unwrap().ptx;
                    let count = |ops: &[&str]| ptx.lines().filter(|l| ops.iter().any(|op| l.trim().starts_with(op))).count();
                    (count(&["ld.global.f32", "ld.global.nc.f32"]), count(&["ld.global.v4.f32", "ld.global.nc.v4.f32"]))
                };
                let (single, wide) = loads(&k);
                let (per_lane, wide_per_lane) = loads(&LProgram { vector_params: false, ..k.clone() });
                // Each load along the row at each of a unit's vectors, in each phase reading it.
                let expected = k.wide_loads().len() * k.unroll * k.vector / PARAM_LANES;
                assert_eq!(wide - wide_per_lane, expected, "{what}: 16-byte loads of parameters");
                assert_eq!(per_lane - single, PARAM_LANES * expected, "{what}: single loads replaced");
                checked += (expected > 0) as usize;
            }
        }
    }
    // In f32 and bf16: the forwards of the three (DyT's elementwise), the backwards' row kernels.
    assert_eq!(checked, 12);
}
