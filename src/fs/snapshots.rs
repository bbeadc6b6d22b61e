//! The snapshot manager of a mounted file system: takes, deletes and lists
//! snapshots, and keeps read-only file systems open on them. The FUSE
//! layer shows them under `.snapshots`; the control socket drives them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::Fs;
use crate::fs::{FsError, Posix, Result};
use crate::volume::{RekeyStatus, SnapshotId, SnapshotInfo, Volume};

/// Snapshot views kept open at once.
const MAX_VIEWS: usize = 16;

/// What must happen before a snapshot is taken so that it holds every write
/// that returned before: the mount writes back the kernel's dirty pages.
pub type BeforeSnapshot = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// The snapshots of a mounted file system and the read-only views open on
/// them.
pub struct Snapshots {
    /// None once the mount is ending.
    fs: Mutex<Option<Arc<Fs>>>,
    views: Mutex<HashMap<SnapshotId, Arc<Fs>>>,
    before: BeforeSnapshot,
    /// Creates and deletes one at a time.
    busy: Mutex<()>,
    /// A thread runs the rekey pass.
    rekeying: AtomicBool,
    /// Why the last rekey pass stopped early, if it did.
    rekey_error: Mutex<Option<String>>,
}

impl Snapshots {
    pub fn new(fs: Arc<Fs>, before: BeforeSnapshot) -> Snapshots {
        Snapshots {
            fs: Mutex::new(Some(fs)),
            views: Mutex::new(HashMap::new()),
            before,
            busy: Mutex::new(()),
            rekeying: AtomicBool::new(false),
            rekey_error: Mutex::new(None),
        }
    }

    fn fs(&self) -> Result<Arc<Fs>> {
        self.fs
            .lock()
            .map_err(|_| FsError::PreviousIo)?
            .clone()
            .ok_or(FsError::Unmounting)
    }

    /// Lets go of the file system and every view (at unmount).
    pub fn shutdown(&self) {
        if let Ok(mut f) = self.fs.lock() {
            *f = None;
        }
        if let Ok(mut v) = self.views.lock() {
            v.clear();
        }
    }

    /// The open view of snapshot `id` (opened on first use).
    pub fn view(&self, id: SnapshotId) -> Result<Arc<Fs>> {
        let mut v = self.views.lock().map_err(|_| FsError::PreviousIo)?;
        if let Some(f) = v.get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.fs()?.open_snapshot(id)?);
        if v.len() >= MAX_VIEWS {
            // Each view caches up to NODE_CACHE metadata nodes; reopening
            // one reads its superblock and the path to its last key.
            v.clear();
        }
        v.insert(id, f.clone());
        Ok(f)
    }

    /// (id, name) of every snapshot, oldest first.
    pub fn names(&self) -> Result<Vec<(SnapshotId, String)>> {
        self.fs()?.snapshot_names()
    }

    pub fn id_of(&self, name: &[u8]) -> Result<Option<SnapshotId>> {
        Ok(self
            .names()?
            .into_iter()
            .find(|(_, n)| n.as_bytes() == name)
            .map(|(id, _)| id))
    }

    /// Takes a snapshot, after the `before` hook (the kernel's write-back):
    /// every write that returned before the call is in it. With the mount's
    /// hook it must not run on a FUSE request thread: the write-back needs
    /// them.
    pub fn create(&self, name: &str) -> Result<SnapshotId> {
        (self.before)()?;
        let _one = self.busy.lock().map_err(|_| FsError::PreviousIo)?;
        self.fs()?.snapshot_create(name)
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let _one = self.busy.lock().map_err(|_| FsError::PreviousIo)?;
        let id = self
            .id_of(name.as_bytes())?
            .ok_or_else(|| Posix::NotFound.at(format!("snapshot {name:?}")))?;
        self.fs()?.snapshot_delete(name)?;
        if let Ok(mut v) = self.views.lock() {
            v.remove(&id);
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        self.fs()?.snapshot_list()
    }

    /// Starts key generation `entry` from its `secret` (see
    /// [`Volume::rekey_start`]) and the pass that seals every older block
    /// again, on a thread of its own. Changes still waiting in memory are
    /// committed first, as for a snapshot: the volume's record of the new
    /// generation then follows every operation that completed before it.
    pub fn rekey_start(
        self: &Arc<Self>,
        entry: crate::volume::format::KeyGenEntry,
        secret: &crate::crypto::MasterKey,
    ) -> Result<()> {
        self.fs()?.commit_pending()?;
        self.with_volume(|v, _| v.rekey_start(entry, secret))??;
        self.rekey_in_background();
        Ok(())
    }

    /// Where the rekey stands, whether a thread runs it, and why it last
    /// stopped early (if it did).
    pub fn rekey_status(&self) -> Result<(RekeyStatus, bool, Option<String>)> {
        let st = self.with_volume(|v, _| v.rekey_status())??;
        let error = self.rekey_error.lock().ok().and_then(|e| e.clone());
        Ok((st, self.rekeying.load(Ordering::SeqCst), error))
    }

    /// Runs the rekey pass, if one is due, on a thread of its own until it
    /// is done, fails, or the mount ends. Each step holds the volume for one
    /// segment, so the mount's other work goes on between steps.
    pub fn rekey_in_background(self: &Arc<Self>) {
        if self.rekeying.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut e) = self.rekey_error.lock() {
            *e = None;
        }
        let me = self.clone();
        let started = std::thread::Builder::new()
            .name("lsvfs-rekey".into())
            .spawn(move || {
                loop {
                    // A step holds the volume for one segment. When other
                    // processes used the volume meanwhile, the pass then
                    // waits twice as long as the step took, so that they
                    // get two thirds of the time (and of the disk); an idle
                    // volume is rekeyed flat out.
                    let step = me.with_volume(|v, mounted| -> crate::volume::Result<bool> {
                        if !mounted() {
                            return Ok(false);
                        }
                        let (before, t) = (v.activity(), std::time::Instant::now());
                        let more = v.rekey_step()?;
                        if more && v.activity() != before {
                            std::thread::sleep(2 * t.elapsed());
                        }
                        Ok(more)
                    });
                    match step {
                        Ok(Ok(true)) => continue,
                        Ok(Ok(false)) | Err(_) => break,
                        Ok(Err(e)) => {
                            tracing::warn!(
                                "the rekey stopped: {e}; it goes on at the next mount, or now \
                                 with `lsvfs rekey MOUNTPOINT`"
                            );
                            if let Ok(mut last) = me.rekey_error.lock() {
                                *last = Some(e.to_string());
                            }
                            break;
                        }
                    }
                }
                me.rekeying.store(false, Ordering::SeqCst);
            });
        if started.is_err() {
            self.rekeying.store(false, Ordering::SeqCst);
        }
    }

    /// Runs `f` on the live volume (a snapshot export reads through it).
    /// `f` is handed a check that turns false once the mount is ending: a
    /// long `f` polls it and stops, so that it never holds up an unmount.
    pub fn with_volume<T>(&self, f: impl FnOnce(&Volume, &dyn Fn() -> bool) -> T) -> Result<T> {
        let fs = self.fs()?;
        let mounted = || self.fs.lock().map(|g| g.is_some()).unwrap_or(false);
        Ok(f(fs.volume(), &mounted))
    }
}
