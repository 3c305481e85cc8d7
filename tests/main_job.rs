//! The README's main job, shortened: the training example (built by `cargo build --examples`,
//! which the test command runs first) learns the generated task and writes its loss curve.

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(p.exists(), "{p:?} is missing: run `cargo build --examples` first");
    p
}

#[test]
fn training_example_learns_and_plots() {
    let dir = std::env::temp_dir().join(format!("normforge-main-job-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plot = dir.join("loss.png");
    let out = Command::new(example("train"))
        .args(["--cpu", "--epochs", "3", "--train-size", "3000", "--plot"])
        .arg(&plot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let acc: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("final test accuracy: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in:\n{stdout}"));
    assert!(acc > 0.85, "accuracy {acc} after 3 epochs:\n{stdout}");
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
}

#[test]
fn training_example_reports_bad_flags() {
    let out = Command::new(example("train")).args(["--norm", "layer_nrom", "--epochs", "1"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no entry named `layer_nrom`") && err.contains("layer_norm"), "{err}");
}

#[test]
fn training_example_refuses_the_fused_path_without_cuda() {
    let out = Command::new(example("train")).args(["--cpu", "--fused", "--epochs", "1"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--fused") && err.contains("needs CUDA"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("epoch"), "it trained anyway");
}
