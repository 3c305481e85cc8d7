//! `scripts/gpu-check.sh` with no GPU: a stand-in for the check's binary that loses the device
//! in some items, in each way a process can (the context lost, an item past its limit, a
//! crash), and stand-ins for `nvidia-smi` and for python3's `import torch`. The script must go on
//! after each such item in a fresh process, record every lost item once, and fail the run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Items 0 to 5 in the binary's protocol (`--from`, `--progress`, `normforge.jsonl`), losing the
/// device in items 2 (the context: status 75, reported by the binary), 3 (the watchdog: 76,
/// reported) and 4 (a crash, reported by no one); `NO_DEVICE`: none from the start.
const STAND_IN: &str = r#"#!/usr/bin/env bash
out=$1; shift; from=0; progress=/dev/null
while [ $# -gt 0 ]; do case $1 in --from) from=$2; shift 2 ;; --progress) progress=$2; shift 2 ;; *) shift ;; esac; done
echo "$from" >> "$out/starts"
[ -n "${NO_DEVICE:-}" ] && exit 2
[ "$from" = 0 ] && : > "$out/normforge.jsonl"
for i in 0 1 2 3 4 5; do
    [ "$i" -lt "$from" ] && continue
    printf '%d\titem %d' "$i" "$i" > "$progress"
    case $i in
        2) echo '{"check":"item 2","error":"an illegal memory access"}' >> "$out/normforge.jsonl"
           echo '{"lost":2,"label":"item 2","why":"the CUDA context stopped working"}' >> "$out/normforge.jsonl"
           exit 75 ;;
        3) echo '{"lost":3,"label":"item 3","why":"ran past 120 s"}' >> "$out/normforge.jsonl"
           exit 76 ;;
        4) kill -SEGV $$ ;;
    esac
    echo "{\"check\":\"item $i\",\"ok\":true}" >> "$out/normforge.jsonl"
done
echo done > "$progress"
"#;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn real_python() -> String {
    let out = Command::new("sh").args(["-c", "command -v python3"]).output().expect("sh runs");
    String::from_utf8(out.stdout).expect("a path").trim().to_string()
}

/// Run the script on the stand-ins in a fresh folder: its status, its stderr, the folder.
fn run(name: &str, env: &[(&str, &str)]) -> (Option<i32>, String, PathBuf) {
    let dir = std::env::temp_dir().join(format!("normforge-gpu-check-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (bin, out) = (dir.join("bin"), dir.join("out"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let script = |name: &str, text: &str| {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        Command::new("chmod").arg("+x").arg(&path).status().unwrap();
        path
    };
    script("nvidia-smi", "#!/bin/sh\necho 'a stand-in card, 0, 0 MiB'\n");
    // `python3 -c 'import torch ...'` names a torch library folder; the summary table runs for real.
    script("python3", &format!("#!/bin/sh\n[ \"$1\" = -c ] && {{ echo /nonexistent/torch/lib; exit 0; }}\nexec {} \"$@\"\n", real_python()));
    let check = script("gpu_check", STAND_IN);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("scripts/gpu-check.sh")).arg(&check).arg(&out).arg("ours").env("PATH", path).env("NORMFORGE_CACHE_DIR", dir.join("cache"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("bash runs");
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned(), out)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn the_check_goes_on_after_each_item_that_lost_the_device() {
    let (status, stderr, out) = run("lost", &[]);
    // Four processes: from the start, then after items 2, 3 and 4.
    assert_eq!(lines(&out.join("starts")), ["0", "3", "4", "5"], "{stderr}");
    let log = lines(&out.join("normforge.jsonl"));
    for i in [0, 1, 5] {
        assert_eq!(log.iter().filter(|l| l.contains(&format!(r#""check":"item {i}","ok":true"#))).count(), 1, "{log:?}");
    }
    // Each lost item once: two reported by the binary, the crash by the script.
    for i in 2..=4 {
        assert_eq!(log.iter().filter(|l| l.starts_with(&format!(r#"{{"lost":{i},"#))).count(), 1, "{log:?}");
    }
    assert!(log.contains(&r#"{"lost":4,"label":"item 4","why":"the process ended (status 139)"}"#.to_string()), "{log:?}");
    assert!(stderr.contains("going on from item 5 in a fresh process"), "{stderr}");
    assert_ne!(status, Some(0), "a run that lost the device fails");
    let table = std::fs::read_to_string(out.join("table.md")).expect("the summary table");
    assert!(table.contains("- item 4 (item 4): the process ended (status 139)."), "{table}");
}

#[test]
fn a_binary_ending_before_its_first_item_runs_once() {
    let (status, stderr, out) = run("no-device", &[("NO_DEVICE", "1")]);
    assert_eq!(lines(&out.join("starts")), ["0"], "{stderr}");
    assert_eq!(status, Some(2), "{stderr}");
}
