//! Compiled plugins: the example plugin builds, loads through libloading, lists, and runs on
//! the reference backend; broken plugins are refused with a clear error and leave the registry
//! exactly as it was; a plugin whose specs do not check fails its own build.
//!
//! Plugins are built here with cargo into `target/plugin-tests` (one build per variant of the
//! hand-written "foreign" plugin, selected by cargo features).

mod common;

use normforge::reference::{Layer, Optimizer, Tensor};
use normforge::registry::{Error, Origin, Registry};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    root().join("target/plugin-tests")
}

/// Build `package` with `features` and return a copy of the library unique to that variant.
fn build(package: &str, features: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{package}+{features}");
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", package, "--target-dir"]).arg(target_dir()).current_dir(root());
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(out.status.success(), "building {key} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let lib = format!("{}{}{}", std::env::consts::DLL_PREFIX, package.replace('-', "_"), std::env::consts::DLL_SUFFIX);
    let src = target_dir().join("debug").join(&lib);
    let variants = target_dir().join("variants");
    std::fs::create_dir_all(&variants).unwrap();
    let dst = variants.join(format!("{}-{}{}", package, if features.is_empty() { "default" } else { features }, std::env::consts::DLL_SUFFIX));
    std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("{src:?}: {e}"));
    built.insert(key, dst.clone());
    dst
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn example() -> PathBuf {
    build("normforge-plugin-example", "")
}

fn foreign(features: &str) -> PathBuf {
    build("normforge-test-foreign-plugin", features)
}

/// Names and origins, to compare a registry before and after a failed load.
fn snapshot(r: &Registry) -> Vec<(String, String)> {
    r.list(None).into_iter().map(|e| (e.name, e.origin.to_string())).collect()
}

#[test]
fn example_plugin_loads_lists_and_runs() {
    let reg = common::registry();
    let before = reg.len();
    let names = sorted(reg.load_plugin(&example()).unwrap());
    assert_eq!(names, vec!["qk_norm".to_string(), "signum".to_string()]);
    assert_eq!(reg.len(), before + 2);
    let listed: Vec<String> = reg.list(Some("*")).into_iter().map(|r| r.name).collect();
    assert!(listed.contains(&"qk_norm".to_string()) && listed.contains(&"signum".to_string()));
    let r = reg.get("qk_norm").unwrap();
    assert!(matches!(&r.origin, Origin::Plugin { plugin, file, .. } if plugin == "example" && file == "nf/qk_norm.nf"), "{:?}", r.origin);

    // QKNorm: g starts at log2(L^2 - L) (a hyper-parameter feeds the initializer), and each row
    // comes out with norm g.
    let mut rng = common::Rng::new(11);
    let g0 = (10f64 * 10.0 - 10.0).log2();
    let mut layer = Layer::new(r.entry.clone(), &[("length".into(), 10.0)], &[3, 8]).unwrap();
    assert!((layer.params[0].data[0] - g0).abs() < 1e-12, "{}", layer.params[0].data[0]);
    let x = rng.tensor(&[3, 8]);
    let y = layer.forward(&x, true).unwrap();
    for row in y.data.chunks(8) {
        let n: f64 = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((n - g0).abs() < 1e-9, "row norm {n}");
    }
    let g = layer.backward(&x, &rng.tensor(&[3, 8]), true).unwrap();
    assert_eq!(g.input.shape, vec![3, 8]);

    // Signum: every coordinate moves by exactly lr once the momentum has its gradient's sign.
    let mut opt = Optimizer::new(reg.get("signum").unwrap().entry, &[("lr".into(), 0.05)]).unwrap();
    let mut p = vec![Tensor::new(vec![4], vec![1.0, -2.0, 3.0, 0.5]).unwrap()];
    let loss = |p: &Tensor| p.data.iter().map(|v| v * v).sum::<f64>();
    let start = loss(&p[0]);
    let grad = |p: &Tensor| Tensor::new(vec![4], p.data.iter().map(|v| 2.0 * v).collect()).unwrap();
    let g = grad(&p[0]);
    opt.step(&mut p, &[g]).unwrap();
    for (after, before) in p[0].data.iter().zip([1.0, -2.0, 3.0, 0.5]) {
        assert!(((before - after) - 0.05 * f64::signum(before)).abs() < 1e-12, "{before} -> {after}");
    }
    for _ in 1..50 {
        let g = grad(&p[0]);
        opt.step(&mut p, &[g]).unwrap();
    }
    assert!(loss(&p[0]) < 0.5 * start, "signum did not descend: {} -> {}", start, loss(&p[0]));
}

#[test]
fn namespaced_loading_avoids_clashes() {
    let reg = common::registry();
    reg.load_plugin(&example()).unwrap();
    // Loading the same plugin again clashes by name and changes nothing...
    let before = snapshot(&reg);
    let err = reg.load_plugin(&example()).unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("plugin `example`") && err.to_string().contains("namespace"), "{err}");
    assert_eq!(snapshot(&reg), before);
    // ...but under its namespace both copies coexist.
    let names = sorted(reg.load_plugin_namespaced(&example()).unwrap());
    assert_eq!(names, vec!["example::qk_norm".to_string(), "example::signum".to_string()]);
    assert_eq!(reg.get("example::qk_norm").unwrap().entry.name, "qk_norm");
}

#[test]
fn a_plugin_written_without_the_sdk_loads() {
    let reg = Registry::new();
    assert_eq!(reg.load_plugin(&foreign("")).unwrap(), vec!["sign_sgd".to_string()]);
}

/// Load a broken plugin into a registry holding std and the example: it must fail with a
/// message containing `expect`, and the registry must be exactly as before.
fn refused(path: &Path, expect: &str) -> Error {
    let reg = common::registry();
    reg.load_plugin(&example()).unwrap();
    let before = snapshot(&reg);
    let err = reg.load_plugin(path).unwrap_err();
    let msg = err.render();
    assert!(msg.contains(expect), "expected {expect:?} in:\n{msg}");
    assert_eq!(snapshot(&reg), before, "a failed load changed the registry");
    err
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let path = target_dir().join("not-a-library.so");
    std::fs::create_dir_all(target_dir()).unwrap();
    std::fs::write(&path, b"layer a(x[d]) { return x }\n").unwrap();
    refused(&path, "not a loadable shared library");
    refused(&root().join("tests/plugins/does-not-exist.so"), "no such file");
}

#[test]
fn a_library_without_the_entry_point_is_refused() {
    refused(&foreign("no_symbol"), "does not export `normforge_plugin_entry_v1`");
}

#[test]
fn a_wrong_abi_version_is_refused() {
    refused(&foreign("wrong_abi"), "ABI version 99; this normforge supports version 1");
}

#[test]
fn corrupt_and_truncated_manifests_are_refused() {
    refused(&foreign("corrupt_manifest"), "manifest is corrupt or truncated");
    refused(&foreign("truncated_manifest"), "manifest is corrupt or truncated");
    refused(&foreign("null_manifest"), "manifest is a null pointer");
}

#[test]
fn a_manifest_with_dsl_errors_names_plugin_entry_and_line() {
    let err = refused(&foreign("bad_dsl"), "unknown name `wieght`");
    let line = err.to_string();
    assert!(line.contains("plugin `foreign`") && line.contains("entry `broken`") && line.contains("broken.nf:3:16"), "{line}");
    // The valid entry of the same plugin did not land either.
    let reg = common::registry();
    let _ = reg.load_plugin(&foreign("bad_dsl"));
    assert!(reg.get("fine").is_err());
}

#[test]
fn a_duplicate_name_is_refused_naming_both_origins() {
    let err = refused(&foreign("duplicate"), "`adamw`");
    let msg = err.to_string();
    assert!(msg.contains("plugin `foreign`") && msg.contains("built in (std/adamw.nf)"), "{msg}");
    let reg = common::registry();
    let _ = reg.load_plugin(&foreign("duplicate"));
    assert!(reg.get("foreign_only").is_err(), "half of a refused plugin landed");
    // Namespaced, it loads.
    assert_eq!(
        sorted(reg.load_plugin_namespaced(&foreign("duplicate")).unwrap()),
        vec!["foreign::adamw".to_string(), "foreign::foreign_only".to_string()]
    );
}

#[test]
fn dsl_errors_fail_the_plugins_own_build() {
    // A scratch plugin crate whose spec has a typo: its cargo build must fail with the
    // diagnostic. It lives outside the workspace, so it gets its own manifest.
    let dir = target_dir().join("bad-plugin");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join("nf")).unwrap();
    let sdk = root().join("registry/plugin");
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"bad-plugin\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nnormforge-plugin = {{ path = {:?} }}\n\n[workspace]\n",
            sdk.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("src/lib.rs"), "normforge_plugin::export!(name = \"bad\", specs = [\"nf/bad.nf\"]);\n").unwrap();
    std::fs::write(dir.join("nf/bad.nf"), "layer bad(x[d]) {\n    return x * wieght\n}\n").unwrap();
    // Reuse the workspace's lock file so no new versions are resolved.
    std::fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["build", "-q", "--offline", "--target-dir"])
        .arg(target_dir())
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a plugin with a DSL error built");
    assert!(err.contains("unknown name `wieght`") && err.contains("nf/bad.nf:2:16"), "{err}");
}

#[test]
fn concurrent_loading_from_several_threads() {
    let reg = common::registry();
    let base = reg.len();
    let example = example();
    let foreign = foreign("");
    let results: Vec<Result<Vec<String>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (reg, example, foreign) = (&reg, &example, &foreign);
                s.spawn(move || {
                    let r = match i % 4 {
                        0 => reg.load_plugin(example),
                        1 => reg.load_plugin(foreign),
                        2 => reg.load_str(&format!("optimizer thread_{i}(lr = 0.1) {{ p = p - lr * g }}"), "thread"),
                        _ => reg.load_plugin_namespaced(example),
                    };
                    // Readers run alongside the writers.
                    assert!(reg.get("layer_norm").is_ok());
                    r.map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each plugin landed exactly once whichever thread won; the others got a clash.
    let ok = |k: usize| results.iter().skip(k).step_by(4).filter(|r| r.is_ok()).count();
    assert_eq!((ok(0), ok(1), ok(2), ok(3)), (1, 1, 2, 1), "{results:?}");
    assert_eq!(reg.len(), base + 2 + 1 + 2 + 2);
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_normforge")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_lists_and_describes_plugin_entries() {
    let lib = example();
    let lib = lib.to_str().unwrap();
    let (ok, out, err) = cli(&["list", "--plugin", lib]);
    assert!(ok, "{err}");
    assert!(out.contains("qk_norm") && out.contains("signum") && out.contains("layer_norm"), "{out}");
    let (ok, out, _) = cli(&["list", "--plugin", lib, "--namespaced", "example::*"]);
    assert!(ok && out.contains("example::qk_norm") && !out.contains("layer_norm"), "{out}");
    let (ok, out, err) = cli(&["info", "qk_norm", "--plugin", lib]);
    assert!(ok, "{err}");
    assert!(out.contains("plugin `example`") && out.contains("length: float = 64") && out.contains("arXiv:2010.04245"), "{out}");
    let (ok, _, err) = cli(&["info", "qk_nrom", "--plugin", lib]);
    assert!(!ok && err.contains("nearest: qk_norm"), "{err}");
    let (ok, _, err) = cli(&["list", "--plugin", foreign("wrong_abi").to_str().unwrap()]);
    assert!(!ok && err.contains("ABI version 99"), "{err}");
}
