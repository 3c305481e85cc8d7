//! What the bench binaries share.

use std::time::Instant;

/// `reps` timed runs of `f` after two warm-ups, in ms, sorted.
fn runs_ms(reps: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t
}

/// Median of `reps` timed runs of `f` after two warm-ups, in ms.
#[allow(dead_code)]
pub fn median_ms(reps: usize, f: impl FnMut()) -> f64 {
    runs_ms(reps, f)[reps / 2]
}

/// The fastest of `reps` timed runs of `f` after two warm-ups, in ms: on a shared machine
/// another tenant's load only ever slows a run, and it comes in bursts longer than a run, so
/// the fastest says more of the code than the median does.
#[allow(dead_code)]
pub fn fastest_ms(reps: usize, f: impl FnMut()) -> f64 {
    runs_ms(reps, f)[0]
}
