//! The standard library's specs: they check, they are formatted, formatting them is
//! idempotent and keeps their meaning, and their IR (text and serde) is stable.

mod common;

use normforge::dsl::{self, text};
use std::path::{Path, PathBuf};
use std::process::Command;

fn std_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/std/nf");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    assert!(v.len() >= 13, "std has {} files", v.len());
    v
}

fn cli(args: &[&str], files: &[PathBuf]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_normforge")).args(args).args(files).output().unwrap()
}

#[test]
fn cli_check_passes_on_every_std_file() {
    let out = cli(&["check"], &std_files());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("ok: ")).count(), std_files().len());
}

#[test]
fn cli_fmt_check_passes_on_every_std_file() {
    let out = cli(&["fmt", "--check"], &std_files());
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cli_check_fails_on_a_bad_file() {
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad/unknown_name_typo.nf");
    let out = cli(&["check"], &[bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown_name_typo.nf:3:16") && err.contains("^^^^^^"), "{err}");
}

#[test]
fn fmt_is_idempotent_and_keeps_comments_and_meaning() {
    for f in std_files() {
        let src = std::fs::read_to_string(&f).unwrap();
        let once = dsl::fmt::format(&src).unwrap();
        let twice = dsl::fmt::format(&once).unwrap();
        assert_eq!(once, twice, "{f:?}: formatting is not idempotent");
        assert_eq!(once, src, "{f:?} is not in canonical form");
        let comments = |s: &str| s.lines().filter_map(|l| l.find('#').map(|i| l[i..].to_string())).collect::<Vec<_>>();
        assert_eq!(comments(&src), comments(&once), "{f:?}: comments changed");
        assert_eq!(dsl::compile(&src).unwrap(), dsl::compile(&once).unwrap(), "{f:?}: formatting changed the IR");
    }
}

/// An `if` assigning several values merges them in one order every time: each compile's maps
/// hash with seeds of their own, so an order taken from a map would differ from one compile
/// to the next (sgd's `if momentum != 0` assigns `buf` and `g`).
#[test]
fn an_if_assigning_several_values_compiles_to_one_ir() {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/std/nf/sgd.nf")).unwrap();
    let first = dsl::compile(&src).unwrap();
    for _ in 0..20 {
        assert_eq!(dsl::compile(&src).unwrap(), first);
    }
}

#[test]
fn registry_holds_the_standard_library() {
    let reg = common::registry();
    for name in [
        "layer_norm", "rms_norm", "batch_norm", "group_norm", "evonorm_b0", "evonorm_s0", "dyt", "sgd", "adam", "adamw",
        "lion", "lamb", "adamp",
    ] {
        let r = reg.get(name).unwrap();
        assert!(r.entry.meta.paper.is_some(), "`{name}` names no paper");
        assert!(r.entry.meta.reference.is_some(), "`{name}` names no reference implementation");
    }
}

#[test]
fn ir_serde_round_trips() {
    for r in common::registry().list(None) {
        let json = serde_json::to_string(&*r.entry).unwrap();
        let back: normforge::Entry = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, &*r.entry, "{}", r.entry.name);
    }
}

/// A max over axes its value is constant along is the value itself: in an update rule it folds
/// only the axes the value varies along (AdamP's `max(cos_channel)`: over channels, not every
/// weight); a layer keeps the broadcast fold, whose derivative sends the gradient to every tie.
#[test]
fn a_max_folds_only_the_axes_its_value_varies_along() {
    use dsl::ir::{Extent, Op, Programs};
    let src = "optimizer o(p[o, r...]; lr: float = 0.1) {\n    let n = norm(p, over r)\n    p = p - lr * max(n) * sign(p) + min(n, over o)\n}\n\
               layer l(x[n, d]) {\n    let s = sum(x, over d)\n    return x - max(s, over n, d)\n}\n";
    let entries = dsl::compile(src).unwrap();
    for e in &entries {
        let p = match &e.programs {
            Programs::Optimizer { step } => step,
            Programs::Layer { train, .. } => train,
        };
        let folds: Vec<(Vec<Extent>, Vec<Extent>)> = p
            .nodes
            .iter()
            .filter_map(|nd| match nd.op {
                Op::Reduce(dsl::ir::ReduceOp::Max | dsl::ir::ReduceOp::Min, a) => Some((p.nodes[a as usize].shape.0.clone(), nd.shape.0.clone())),
                _ => None,
            })
            .collect();
        if e.name == "o" {
            // max(n) and min(n, over o): both from n's own shape, [o].
            assert_eq!(folds.len(), 2, "{folds:?}");
            for (from, to) in &folds {
                assert_eq!(from, &vec![Extent::Full, Extent::One], "{folds:?}");
                assert_eq!(to, &vec![Extent::One, Extent::One], "{folds:?}");
            }
        } else {
            assert_eq!(folds, vec![(vec![Extent::Full, Extent::Full], vec![Extent::One, Extent::One])]);
        }
    }
}

#[test]
fn ir_text_snapshots() {
    for r in common::registry().list(None) {
        let e = &r.entry;
        insta::assert_snapshot!(format!("ir__{}", e.name), text::entry_text(e, false));
        if e.kind != dsl::ir::Kind::Optimizer {
            insta::assert_snapshot!(format!("ir__{}__backward", e.name), text::entry_text(e, true));
        }
    }
}

#[test]
fn the_docs_table_lists_every_entry() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/STD.md")).unwrap();
    for r in common::registry().list(None) {
        assert!(doc.contains(&format!("\n| {} | {} |", r.name, r.entry.kind.keyword())), "docs/STD.md has no row for `{}`", r.name);
    }
}

#[test]
fn cli_list_shows_every_entry_with_defaults() {
    let out = Command::new(env!("CARGO_BIN_EXE_normforge")).arg("list").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for r in common::registry().list(None) {
        assert!(text.lines().any(|l| l.starts_with(&format!("{} ", r.name))), "`list` lacks {}", r.name);
        for h in &r.entry.hparams {
            assert!(text.contains(&normforge::dsl::text::hparam_text(h)), "`list` lacks {}.{}", r.name, h.name);
        }
    }
}
