//! The GPU check's checks and timings as numbered items, so that one the device loses does not
//! cost the rest of the one run a lent GPU gives. An illegal address in a kernel is sticky: every
//! later CUDA call of the process fails, and a kernel that never ends holds it for good. So each
//! item's number and label are written to a progress file as it starts; after an item fails, a probe asks
//! whether the context still works, and if not the items left are skipped; an item running past
//! its limit is reported by a watchdog, which ends the process. `scripts/gpu-check.sh` then starts
//! a fresh process from the next item (`--from`), whatever ended the last.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the progress file says once every item has run (or been skipped by `--from`); until
/// then, the item running or last run: its number, a tab, its label.
pub const DONE: &str = "done";

/// The item running now, and since when (`None` between items).
type Current = Arc<Mutex<Option<(usize, String, Instant)>>>;

pub struct Items {
    from: usize,
    next: usize,
    lost: Option<(usize, String)>,
    progress: Option<PathBuf>,
    probe: Box<dyn Fn() -> bool>,
    current: Current,
}

impl Items {
    /// Items numbered from 0 in the order `run` is called; those before `from` are skipped.
    /// `probe` says whether the device still works (asked after an item fails).
    pub fn new(from: usize, progress: Option<PathBuf>, probe: impl Fn() -> bool + 'static) -> Self {
        Items { from, next: 0, lost: None, progress, probe: Box::new(probe), current: Arc::default() }
    }

    /// Item `label`: `None` where it is skipped (before `from`, or after the device was lost),
    /// else what `f` gave, a panic (tch panics on libtorch's errors) as a message.
    pub fn run<T>(&mut self, label: &str, f: impl FnOnce() -> Result<T, String>) -> Option<Result<T, String>> {
        let i = self.next;
        self.next += 1;
        if i < self.from || self.lost.is_some() {
            return None;
        }
        self.mark(&format!("{i}\t{label}"));
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((i, label.to_string(), Instant::now()));
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => Err(normforge_tch::shim::panic_message(&*p).unwrap_or_else(|| "panic".into())),
        };
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if r.is_err() && !(self.probe)() {
            self.lost = Some((i, label.to_string()));
        }
        Some(r)
    }

    /// The item (number and label) after which the device stopped working, if one did.
    pub fn lost(&self) -> Option<(usize, &str)> {
        self.lost.as_ref().map(|(i, l)| (*i, l.as_str()))
    }

    /// The end of the run: the progress file says [`DONE`], unless the device was lost (it
    /// keeps the item that lost it, which the next process starts after).
    pub fn finish(&self) {
        if self.lost.is_none() {
            self.mark(DONE);
        }
    }

    /// A thread calling `on_hang(number, label)` once an item has run longer than `limit` (and
    /// then nothing more): `on_hang` should report and end the process, since the item's
    /// thread may be waiting on the device for ever.
    pub fn watch(&self, limit: Duration, on_hang: impl FnOnce(usize, &str) + Send + 'static) {
        let current = self.current.clone();
        let tick = (limit / 10).clamp(Duration::from_millis(1), Duration::from_secs(1));
        std::thread::spawn(move || loop {
            std::thread::sleep(tick);
            let over = current.lock().unwrap_or_else(|e| e.into_inner()).as_ref().filter(|(.., start)| start.elapsed() > limit).map(|(i, l, _)| (*i, l.clone()));
            if let Some((i, label)) = over {
                on_hang(i, &label);
                return;
            }
        });
    }

    fn mark(&self, what: &str) {
        if let Some(path) = &self.progress {
            // Written whole then renamed, so the script never reads half a number.
            let tmp = path.with_extension("tmp");
            let _ = std::fs::write(&tmp, what).and_then(|()| std::fs::rename(&tmp, path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn progress(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("normforge-items-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("progress")
    }

    #[test]
    fn items_before_from_are_skipped_and_each_run_one_is_marked() {
        let path = progress("from");
        let mut items = Items::new(2, Some(path.clone()), || true);
        let mut ran = Vec::new();
        for i in 0..4 {
            if let Some(r) = items.run(&format!("item {i}"), || Ok::<_, String>(i)) {
                ran.push(r.unwrap());
                assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{i}\titem {i}"));
            }
        }
        assert_eq!(ran, [2, 3]);
        items.finish();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), DONE);
    }

    #[test]
    fn a_panic_is_a_message_and_a_working_device_goes_on() {
        let mut items = Items::new(0, None, || true);
        let r = items.run("panics", || -> Result<(), String> { panic!("libtorch said no") });
        assert_eq!(r, Some(Err("libtorch said no".to_string())));
        assert_eq!(items.run("next", || Ok::<_, String>(7)), Some(Ok(7)));
        assert_eq!(items.lost(), None);
    }

    #[test]
    fn after_the_device_is_lost_the_rest_is_skipped_and_the_progress_names_where() {
        let path = progress("lost");
        let alive = Arc::new(AtomicBool::new(true));
        let probe = alive.clone();
        let mut items = Items::new(0, Some(path.clone()), move || probe.load(Ordering::SeqCst));
        assert_eq!(items.run("fine", || Ok::<_, String>(())), Some(Ok(())));
        // An item that succeeds is not probed: the device is taken as working.
        alive.store(false, Ordering::SeqCst);
        assert_eq!(items.run("also fine", || Ok::<_, String>(())), Some(Ok(())));
        assert_eq!(items.lost(), None);
        assert!(items.run("faults", || Err::<(), _>("illegal address".to_string())).is_some());
        assert_eq!(items.lost(), Some((2, "faults")));
        let mut later = false;
        assert_eq!(
            items.run("never", || {
                later = true;
                Ok::<_, String>(())
            }),
            None
        );
        assert!(!later);
        items.finish();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2\tfaults");
    }

    #[test]
    fn the_watchdog_names_the_item_past_its_limit() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut items = Items::new(0, None, || true);
        items.watch(Duration::from_millis(50), move |i, label| tx.send((i, label.to_string())).unwrap());
        items.run("quick", || Ok::<_, String>(()));
        items.run("slow", || {
            std::thread::sleep(Duration::from_millis(400));
            Ok::<_, String>(())
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (1, "slow".to_string()));
    }
}
