//! Requests that may take long (fsync, fallocate, truncate) run on their
//! own threads, so that one process's slow work never occupies the request
//! threads that every other process's operations need. The kernel takes
//! replies in any order; each job replies when done.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Threads for slow requests. They mostly wait on the disk (fdatasync) or
/// on the metadata lock between short transactions, so they outnumber the
/// CPUs; more slow requests than threads queue behind each other, never
/// behind or in front of quick ones. Eight fsyncing processes each find a
/// thread and join one shared flush: fio `--fsync=1 --numjobs=8` on 2 CPUs
/// did 10,900 IOPS with eight threads and 9,800 with four (four runs each).
const SLOW_THREADS: usize = 8;

type Job = Box<dyn FnOnce() + Send>;

/// The jobs waiting for a thread. Idle threads sleep on a condition
/// variable: a channel whose receivers spin and yield before they sleep
/// (crossbeam's) cost every job a burst of sched_yield calls from each idle
/// thread, which on a small machine took CPU from the caller waiting for
/// its fsync.
#[derive(Default)]
struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

#[derive(Default)]
struct Jobs {
    waiting: VecDeque<Job>,
    /// No job comes any more: the threads end once `waiting` is empty.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        // A job runs outside the lock, so a panic cannot poison it midway.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next job, or None once the queue is closed and empty.
    fn next(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            if let Some(job) = q.waiting.pop_front() {
                return Some(job);
            }
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

pub struct SlowWork {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

impl SlowWork {
    pub fn new() -> SlowWork {
        SlowWork::with_threads(SLOW_THREADS, "lsvfs-slow")
    }

    /// A pool of `count` threads named `name-N`.
    pub fn with_threads(count: usize, name: &str) -> SlowWork {
        let queue = Arc::new(Queue::default());
        let threads = (0..count)
            .filter_map(|n| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{n}"))
                    .spawn(move || {
                        while let Some(job) = queue.next() {
                            // A job that panics loses its reply (the
                            // kernel gets EIO), not its thread: the queue
                            // would otherwise keep jobs that no thread runs.
                            super::guarded(job);
                        }
                    })
                    .map_err(|e| tracing::warn!("starting a slow-request thread: {e}"))
                    .ok()
            })
            .collect();
        SlowWork { queue, threads }
    }

    /// Runs `job` on a slow-request thread; on the caller's thread if none
    /// could be started.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        if self.threads.is_empty() {
            return job();
        }
        self.queue.lock().waiting.push_back(Box::new(job));
        self.queue.ready.notify_one();
    }
}

/// Work that keeps its order per key but runs beside other keys' work:
/// one thread per lane, and a key always on the same lane. The large
/// writes of one file so run one at a time, in the order the ring threads
/// handed them over, rather than racing each other on several threads
/// (which would scatter the file's blocks in the log, whose order a
/// sequential read follows).
pub struct Lanes(Vec<SlowWork>);

impl Lanes {
    /// `count` lanes (at least one), their threads named `name-N-0`.
    pub fn new(count: usize, name: &str) -> Lanes {
        Lanes(
            (0..count.max(1))
                .map(|n| SlowWork::with_threads(1, &format!("{name}-{n}")))
                .collect(),
        )
    }

    /// Runs `job` on `key`'s lane, after the jobs queued there before it.
    pub fn run(&self, key: u64, job: impl FnOnce() + Send + 'static) {
        self.0[(key % self.0.len() as u64) as usize].run(job)
    }
}

impl Default for SlowWork {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SlowWork {
    /// Finishes the jobs already queued (each owes the kernel a reply).
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More panicking jobs than threads, then ordinary ones: the threads
    /// survive the panics and every ordinary job still runs.
    #[test]
    fn jobs_after_panicking_ones_still_run() {
        let work = SlowWork::new();
        assert_eq!(work.threads.len(), SLOW_THREADS);
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..SLOW_THREADS + 2 {
            work.run(|| panic!("a slow job panics (expected by this test)"));
        }
        for i in 0..SLOW_THREADS * 2 {
            let tx = tx.clone();
            work.run(move || tx.send(i).unwrap());
        }
        let mut ran: Vec<usize> = (0..SLOW_THREADS * 2)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(30))
                    .expect("a queued job never ran: the panics took its threads")
            })
            .collect();
        ran.sort_unstable();
        assert_eq!(ran, (0..SLOW_THREADS * 2).collect::<Vec<_>>());
    }

    /// Each key's jobs run in the order given, even while another lane's
    /// job is slow; every job runs.
    #[test]
    fn a_keys_jobs_keep_their_order_beside_other_lanes() {
        let lanes = Lanes::new(2, "test-lane");
        let (tx, rx) = std::sync::mpsc::channel();
        // Key 1's lane is held up; key 0's jobs still run, in order.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        lanes.run(1, move || hold_rx.recv().unwrap());
        for i in 0..100u32 {
            let tx = tx.clone();
            lanes.run(0, move || tx.send((0u64, i)).unwrap());
        }
        let first: Vec<u32> = (0..100)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(30))
                    .unwrap()
                    .1
            })
            .collect();
        assert_eq!(
            first,
            (0..100).collect::<Vec<_>>(),
            "key 0's jobs out of order"
        );
        for i in 0..100u32 {
            let tx = tx.clone();
            lanes.run(3, move || tx.send((3, i)).unwrap());
        }
        hold_tx.send(()).unwrap();
        let rest: Vec<(u64, u32)> = (0..100)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap())
            .collect();
        assert_eq!(rest, (0..100).map(|i| (3, i)).collect::<Vec<_>>());
    }
}
