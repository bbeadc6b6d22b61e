//! An ordered parallel map over threads of a scope: the export reads
//! several runs of blocks at once (several reads in flight on the disk) and
//! seals several chunks at once, while the stream keeps its order.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::Scope;

use crossbeam::channel::{bounded, Receiver, Sender};

/// Runs `f` over `items` on `workers` threads of `s`, at most `window`
/// items ahead of the consumer, and yields the results in the items'
/// order. The result of an item whose `f` panicked is `lost()`.
///
/// Dropping the returned iterator stops the work: the thread feeding the
/// workers finds no one to hand results to, stops taking items and drops
/// `items`, and the workers end when their queue is empty.
pub(super) fn ordered_map<'scope, T, R, F>(
    s: &'scope Scope<'scope, '_>,
    items: impl Iterator<Item = T> + Send + 'scope,
    workers: usize,
    window: usize,
    f: F,
    lost: fn() -> R,
) -> impl Iterator<Item = R> + Send + 'scope
where
    T: Send + 'scope,
    R: Send + 'scope,
    F: Fn(T) -> R + Send + Sync + 'scope,
{
    let window = window.max(1);
    // Each item travels with the sender of its own one-slot channel; the
    // receivers queue up in item order for the consumer.
    let (jobs_tx, jobs_rx) = bounded::<(T, Sender<R>)>(window);
    let (order_tx, order_rx) = bounded::<Receiver<R>>(window);
    s.spawn(move || {
        for item in items {
            let (tx, rx) = bounded(1);
            if order_tx.send(rx).is_err() || jobs_tx.send((item, tx)).is_err() {
                break;
            }
        }
    });
    let f = Arc::new(f);
    for _ in 0..workers.max(1) {
        let (jobs_rx, f) = (jobs_rx.clone(), f.clone());
        s.spawn(move || {
            for (item, tx) in jobs_rx {
                // A panic in `f` loses this result (the consumer sees
                // `lost()`) instead of ending the thread, so the scope does
                // not panic in turn. The consumer may have gone: then the
                // result goes nowhere.
                if let Ok(r) = std::panic::catch_unwind(AssertUnwindSafe(|| f(item))) {
                    let _ = tx.send(r);
                }
            }
        });
    }
    order_rx
        .into_iter()
        .map(move |rx| rx.recv().unwrap_or_else(|_| lost()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn results_come_in_order_whatever_order_the_workers_finish_in() {
        let out: Vec<u64> = std::thread::scope(|s| {
            ordered_map(
                s,
                0..200u64,
                4,
                8,
                |i| {
                    // Earlier items take longer, so later ones finish first.
                    std::thread::sleep(Duration::from_micros((200 - i) * 20));
                    i * 3
                },
                || u64::MAX,
            )
            .collect()
        });
        assert_eq!(out, (0..200).map(|i| i * 3).collect::<Vec<_>>());
    }

    #[test]
    fn dropping_the_results_stops_the_work_and_nothing_waits_forever() {
        let started = AtomicUsize::new(0);
        let first: Vec<usize> = std::thread::scope(|s| {
            let it = ordered_map(
                s,
                0..1_000_000usize,
                3,
                4,
                |i| {
                    started.fetch_add(1, Ordering::Relaxed);
                    i
                },
                || usize::MAX,
            );
            it.take(5).collect()
        });
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        // The window bounds how far the work ran ahead.
        let n = started.load(Ordering::Relaxed);
        assert!(n < 100, "{n} items were worked on");
    }

    #[test]
    fn a_worker_that_dies_yields_lost_not_a_short_stream() {
        let out: Vec<i32> = std::thread::scope(|s| {
            let v = ordered_map(
                s,
                0..6,
                2,
                2,
                |i| {
                    if i == 3 {
                        panic!("worker failure (expected by the test)");
                    }
                    i
                },
                || -1,
            )
            .collect();
            v
        });
        assert_eq!(out, vec![0, 1, 2, -1, 4, 5]);
    }
}
