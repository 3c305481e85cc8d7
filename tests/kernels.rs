//! The CUDA C++ and WGSL that the CubeCL backend generates for every standard entry, as insta
//! snapshots: a codegen change shows as a snapshot diff. Entry points carry a hash of the kernel
//! id (`step_kernel_940bb9a2`), which is redacted.

use normforge::cubecl::emit::Lang;
use normforge::cubecl::Dtype;
use normforge::dsl::ir::Kind;
use std::process::Command;

/// `step_kernel_<8 hex digits>` -> `step_kernel_[hash]`, also after a type suffix
/// (`step_kernel_s_f32_<8 hex digits>`), and the same for the other kernels. The hash covers the
/// kernel's type identity, which changes with the compiler flags, not with the generated code.
fn redact(src: &str) -> String {
    let mut text = src.to_string();
    for name in ["step_kernel_", "combine_kernel_", "layer_kernel_"] {
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(i) = rest.find(name) {
            let (head, tail) = rest.split_at(i + name.len());
            out.push_str(head);
            let ident = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').count();
            let word = &tail[..ident];
            let hashed = word.len() >= 8
                && word[word.len() - 8..].chars().all(|c| c.is_ascii_hexdigit())
                && (word.len() == 8 || word.as_bytes()[word.len() - 9] == b'_');
            if hashed {
                out.push_str(&word[..word.len() - 8]);
                out.push_str("[hash]");
            } else {
                out.push_str(word);
            }
            rest = &tail[ident..];
        }
        out.push_str(rest);
        text = out;
    }
    text
}

#[test]
fn every_std_kernel_as_cuda_and_wgsl() {
    let reg = normforge::builtin_registry().unwrap();
    let mut emitted = 0;
    for r in reg.list(None) {
        let e = &r.entry;
        let passes: &[&str] = if e.kind == Kind::Optimizer { &["step", "init"] } else { &["forward", "backward"] };
        for &pass in passes {
            for (lang, ext) in [(Lang::Cuda, "cuda"), (Lang::Wgsl, "wgsl")] {
                let src = normforge::cubecl::emit(e, pass, Dtype::F32, lang).unwrap_or_else(|err| panic!("{} {pass}: {err}", e.name));
                insta::assert_snapshot!(format!("kernel__{}__{pass}.{ext}", e.name), redact(&src));
                emitted += 1;
            }
        }
    }
    assert_eq!(emitted, 144, "17 rules and 19 layers and reparams, 2 passes, 2 languages");
}

#[test]
fn half_precision_kernels() {
    // Storage types change only loads and stores: arithmetic stays f32.
    let reg = normforge::builtin_registry().unwrap();
    for (name, pass, dtype, lang, tag) in [
        ("layer_norm", "forward", Dtype::BF16, Lang::Cuda, "bf16.cuda"),
        ("layer_norm", "backward", Dtype::BF16, Lang::Cuda, "bf16.cuda"),
        ("rms_norm", "forward", Dtype::F16, Lang::Wgsl, "f16.wgsl"),
        ("adamw", "step", Dtype::BF16, Lang::Cuda, "bf16.cuda"),
        ("adamw", "step", Dtype::F16, Lang::Wgsl, "f16.wgsl"),
    ] {
        let e = reg.get(name).unwrap().entry;
        let src = normforge::cubecl::emit(&e, pass, dtype, lang).unwrap_or_else(|err| panic!("{name} {pass} {dtype:?}: {err}"));
        let half = if dtype == Dtype::BF16 { "__nv_bfloat16" } else { "f16" };
        assert!(src.contains(half), "{name} {pass}: no {half} in\n{src}");
        insta::assert_snapshot!(format!("kernel__{name}__{pass}.{tag}"), redact(&src));
    }
}

/// The first kernel of std layer `name`'s forward in training, as planned (not yet launched).
fn first_forward_kernel(name: &str) -> normforge::cubecl::kernel::LProgram {
    let reg = normforge::builtin_registry().unwrap();
    let e = reg.get(name).unwrap().entry;
    let normforge::dsl::ir::Programs::Layer { train, .. } = &e.programs else { unreachable!() };
    normforge::cubecl::plan(&e, train).unwrap().kernels.swap_remove(0)
}

#[test]
fn a_row_kept_in_registers() {
    // A layer norm's forward on rows of 1024: four positions per unit, unrolled, x read from
    // memory in the first phase (the mean) and from registers in the variance and output phases.
    let launch = normforge::cubecl::Launch::default();
    let k = normforge::cubecl::keeping(normforge::cubecl::launched(&first_forward_kernel("layer_norm"), 1024, 1, &launch), &|_| 1024, &launch);
    assert_eq!((k.kept.len(), k.unroll, k.phases.len()), (1, 4, 3));
    let src = normforge::cubecl::emit::layer_unit(&k, Dtype::F32, Lang::Cuda).unwrap().source;
    // The input is the kernel's first parameter: read at four places, not twelve.
    let x = src.split("__restrict__ ").nth(1).and_then(|p| p.split(',').next()).unwrap();
    assert_eq!(src.matches(&format!("&{x}[")).count(), 4, "{x} in\n{src}");
    insta::assert_snapshot!("kernel__layer_norm__forward_rows_of_1024.cuda", redact(&src));
}

#[test]
fn cli_emit_prints_source_and_refuses_clearly() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_normforge")).args(args).output().unwrap();
    let out = run(&["emit", "lion", "--target", "cuda"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let src = String::from_utf8_lossy(&out.stdout);
    assert!(src.contains("extern \"C\" __global__ void") && src.contains("step_kernel_"), "{src}");
    // A rule with a per-tensor reduction: two phases, the first followed by its combine.
    let out = run(&["emit", "lamb", "--target", "wgsl"]);
    let src = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && src.contains("// phase 2 of 2") && src.contains("combine_kernel_"), "{src}");
    // A layer: its reductions, then one elementwise kernel per output shape.
    let out = run(&["emit", "batch_norm", "--target", "cuda"]);
    let src = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && src.contains("Sum reduction") && src.contains("layer_kernel_"), "{src}");
    let out = run(&["emit", "dyt", "--dtype", "bf16"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("__nv_bfloat16"));
    let out = run(&["emit", "lion", "--target", "wgsl", "--pass", "init"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("@compute"));
    for (args, msg) in [
        (&["emit", "lion", "--target", "ptx"][..], "unknown target `ptx`"),
        (&["emit", "lion", "--dtype", "f8"][..], "unknown dtype `f8`"),
        (&["emit", "lion", "--pass", "forward"][..], "its passes are `step` and `init`"),
        (&["emit", "layer_norm", "--pass", "step"][..], "its passes are `forward`, `backward`"),
        (&["emit", "adamx"][..], "adamw"),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(msg), "{args:?}: {err}");
    }
}

#[test]
fn redaction_only_touches_the_hash() {
    assert_eq!(redact("void step_kernel_940bb9a2(x) step_kernel_"), "void step_kernel_[hash](x) step_kernel_");
    assert_eq!(redact("combine_kernel_0123abcd step_kernel_12"), "combine_kernel_[hash] step_kernel_12");
    assert_eq!(redact("step_kernel_s_f32_47d47915(x) layer_kernel_f16(y)"), "step_kernel_s_f32_[hash](x) layer_kernel_f16(y)");
    assert_eq!(redact("layer_kernel_f_bf16_deadbeef layer_kernel_abcdefab12"), "layer_kernel_f_bf16_[hash] layer_kernel_abcdefab12");
}

#[test]
fn an_elementwise_kernel_takes_several_values_per_unit() {
    // DyT's forward as launched: each unit takes four elements a cube apart, every load of x
    // made (a unit past the end reads element 0), each store guarded.
    let k = normforge::cubecl::launched(&first_forward_kernel("dyt"), 1, 4096, &normforge::cubecl::Launch::default());
    assert_eq!((k.cooperative, k.values_per_unit), (false, 4));
    let src = normforge::cubecl::emit::layer_unit(&k, Dtype::BF16, Lang::Cuda).unwrap().source;
    insta::assert_snapshot!("kernel__dyt__forward_four_values_per_unit.cuda", redact(&src));
}
