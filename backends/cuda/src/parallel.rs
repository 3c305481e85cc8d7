//! Many kernels compiled at once: NVRTC takes one core per program, and a rule such as Muon
//! has 33 kernels, a layer's launch variants several, so a first step spreads them over the
//! machine's cores (std's scoped threads; the compiler and the GPU's kernel table are locked).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Run `f` on every item, on as many threads as the machine has cores (at most one per item);
/// the first error, if any, once every thread has stopped. A panic in `f` goes on in the
/// caller's thread.
pub fn each_in_parallel<T: Sync, E: Send>(items: &[T], f: impl Fn(&T) -> Result<(), E> + Sync) -> Result<(), E> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len());
    if threads <= 1 {
        return items.iter().try_for_each(f);
    }
    let next = AtomicUsize::new(0);
    let (f, next) = (&f, &next);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || -> Result<(), E> {
                    while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                        f(item)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut first = Ok(());
        for w in workers {
            let r = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

#[cfg(test)]
mod tests {
    use super::each_in_parallel;
    use std::sync::Mutex;

    #[test]
    fn every_item_once_and_the_first_error() {
        let seen = Mutex::new(Vec::new());
        let items: Vec<usize> = (0..100).collect();
        each_in_parallel(&items, |&i| -> Result<(), ()> {
            seen.lock().unwrap().push(i);
            Ok(())
        })
        .unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, items);
        let err = each_in_parallel(&items, |&i| if i % 10 == 7 { Err(i) } else { Ok(()) }).unwrap_err();
        assert_eq!(err % 10, 7);
        assert_eq!(each_in_parallel(&[] as &[usize], |_| Err(())), Ok(()));
    }
}
