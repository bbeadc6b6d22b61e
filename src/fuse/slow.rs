//! Requests that may take long (fsync, fallocate, truncate) run on their
//! own threads, so that one process's slow work never occupies the request
//! threads that every other process's operations need. The kernel takes
//! replies in any order; each job replies when done.

use crossbeam::channel::{unbounded, Sender};
use std::thread::JoinHandle;

/// Threads for slow requests. They mostly wait on the disk (fdatasync) or
/// on the metadata lock between short transactions, so they outnumber the
/// CPUs; more slow requests than threads queue behind each other, never
/// behind or in front of quick ones.
const SLOW_THREADS: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

pub struct SlowWork {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl SlowWork {
    pub fn new() -> SlowWork {
        let (tx, rx) = unbounded::<Job>();
        let threads = (0..SLOW_THREADS)
            .filter_map(|n| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("lsvfs-slow-{n}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
                    .map_err(|e| tracing::warn!("starting a slow-request thread: {e}"))
                    .ok()
            })
            .collect();
        SlowWork {
            tx: Some(tx),
            threads,
        }
    }

    /// Runs `job` on a slow-request thread; on the caller's thread if none
    /// could be started.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        match &self.tx {
            Some(tx) if !self.threads.is_empty() => {
                if let Err(e) = tx.send(job) {
                    (e.into_inner())();
                }
            }
            _ => job(),
        }
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
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
