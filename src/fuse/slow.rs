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
}
