//! The snapshot manager of a mounted file system: takes, deletes and lists
//! snapshots, and keeps read-only file systems open on them. The FUSE
//! layer shows them under `.snapshots`; the control socket drives them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Fs;
use crate::fs::{FsError, Posix, Result};
use crate::volume::{SnapshotId, SnapshotInfo, Volume};

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
}

impl Snapshots {
    pub fn new(fs: Arc<Fs>, before: BeforeSnapshot) -> Snapshots {
        Snapshots {
            fs: Mutex::new(Some(fs)),
            views: Mutex::new(HashMap::new()),
            before,
            busy: Mutex::new(()),
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

    /// Runs `f` on the live volume (a snapshot export reads through it).
    /// `f` is handed a check that turns false once the mount is ending: a
    /// long `f` polls it and stops, so that it never holds up an unmount.
    pub fn with_volume<T>(&self, f: impl FnOnce(&Volume, &dyn Fn() -> bool) -> T) -> Result<T> {
        let fs = self.fs()?;
        let mounted = || self.fs.lock().map(|g| g.is_some()).unwrap_or(false);
        Ok(f(fs.volume(), &mounted))
    }
}
