//! The single database writer: jobs queue up while a commit is in flight and
//! the next transaction runs all of them, so many concurrent requests share
//! one fsync (group commit). A job's caller hears back only after the commit
//! that holds its changes is durable.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use redb::{Database, Durability, WriteTransaction};

use super::StorageError;

/// Most jobs committed together.
const MAX_BATCH: usize = 1024;

/// Tells a job's caller how its commit went.
pub(super) type Completion = Box<dyn FnOnce(Result<(), StorageError>) + Send>;
/// A unit of work: writes into the batch's transaction. An error aborts the
/// whole batch.
pub(super) type Job =
    Box<dyn FnOnce(&WriteTransaction) -> (Result<(), StorageError>, Completion) + Send>;

struct Queued {
    job: Job,
    durable: bool,
}

/// Handle to the writer thread. Dropping it lets the queued jobs finish,
/// then waits for the thread, which holds the database open.
pub(super) struct Writer {
    tx: Option<Sender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Writer {
    pub(super) fn start(db: Arc<Database>) -> Result<Writer, StorageError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || run(&db, &rx))
            .map_err(|e| StorageError::Io(format!("spawning the writer: {e}")))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs `f` in a write transaction and returns its value once that
    /// transaction has committed. `durable = false` lets the commit skip the
    /// fsync when no job in the batch needs one (challenges: losing one in a
    /// crash only makes its client ask again).
    pub(super) async fn write<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (reply, wait) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |txn| match f(txn) {
            Ok(v) => (
                Ok(()),
                Box::new(move |commit: Result<(), StorageError>| {
                    let _ = reply.send(commit.map(|()| v));
                }),
            ),
            Err(e) => {
                let mine = e.clone();
                (
                    Err(e),
                    Box::new(move |_| {
                        let _ = reply.send(Err(mine));
                    }),
                )
            }
        });
        self.tx
            .as_ref()
            .ok_or(StorageError::WriterGone)?
            .send(Queued { job, durable })
            .map_err(|_| StorageError::WriterGone)?;
        wait.await.map_err(|_| {
            StorageError::Aborted("the batch holding this write was not committed".into())
        })?
    }
}

fn run(db: &Database, rx: &Receiver<Queued>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|q| q.durable);
        let mut txn = match db.begin_write() {
            Ok(t) => t,
            // Dropping the batch tells every caller it was not committed.
            Err(e) => {
                tracing::error!("database: begin write: {e}");
                continue;
            }
        };
        if !durable {
            txn.set_durability(Durability::None);
        }
        let mut done: Vec<Completion> = Vec::with_capacity(batch.len());
        let mut failed = None;
        for q in batch {
            let (r, completion) = (q.job)(&txn);
            done.push(completion);
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        let result = match failed {
            Some(e) => {
                let _ = txn.abort();
                Err(StorageError::Aborted(e.to_string()))
            }
            None => txn.commit().map_err(StorageError::from),
        };
        if let Err(e) = &result {
            tracing::error!("database: commit failed: {e}");
        }
        for c in done {
            c(result.clone());
        }
    }
}
