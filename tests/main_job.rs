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

#[test]
fn training_resumes_from_its_checkpoint_where_it_stopped() {
    let dir = std::env::temp_dir().join(format!("normforge-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let train = |ckpt: &str, extra: &[&str]| {
        let out = Command::new(example("train"))
            .args(["--cpu", "--train-size", "640", "--checkpoint"])
            .arg(dir.join(ckpt))
            .arg("--plot")
            .arg(dir.join(format!("{ckpt}.png")))
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, whole, err) = train("whole", &["--epochs", "2"]);
    assert!(ok, "{whole}\n{err}");
    let (ok, first, err) = train("split", &["--epochs", "1"]);
    assert!(ok, "{first}\n{err}");
    // An interrupted save leaves a partial directory, which resuming ignores.
    std::fs::create_dir_all(dir.join("split/epoch-2.partial")).unwrap();
    let (ok, second, err) = train("split", &["--epochs", "2", "--resume"]);
    assert!(ok, "{second}\n{err}");
    assert!(second.contains("resuming after epoch 1"), "{second}");
    assert!(!second.contains("epoch  1 "), "epoch 1 trained again:\n{second}");
    let epoch2 = |s: &str| s.lines().find(|l| l.starts_with("epoch  2")).map(str::to_owned);
    assert_eq!(epoch2(&second), epoch2(&whole), "the resumed epoch differs:\n{whole}\n{second}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let read = |ckpt: &str| std::fs::read(dir.join(ckpt).join("epoch-2").join(file)).unwrap();
        assert!(read("whole") == read("split"), "{file} differs after resuming");
    }
    assert!(!dir.join("split/epoch-1").exists(), "the older checkpoint was kept");
    // A checkpoint of another rule is refused before anything trains.
    let (ok, out, err) = train("split", &["--epochs", "3", "--resume", "--optimizer", "lion"]);
    assert!(!ok && err.contains("not `batch_norm` with `lion`"), "{out}\n{err}");
    assert!(!out.contains("epoch  3"), "it trained anyway:\n{out}");
}
