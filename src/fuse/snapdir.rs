//! The `.snapshots` namespace: inode numbering and the snapshots a mount
//! shows.
//!
//! Inode numbers: the live file system's are below 2^40 ([`MAX_INO`]).
//! Snapshot `id`'s inode `i` is `2^63 | id << 40 | i`, so numbers are stable
//! across remounts (ids are never reused) and never collide with the live
//! tree's or another snapshot's. `.snapshots` itself is `2^63 | 1` (id 0).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::fs::format::ROOT_INO;
use crate::fs::{Fs, MAX_INO};
use crate::volume::SnapshotInfo;
use crate::{Error, FsError, Result};

pub const SNAP_BIT: u64 = 1 << 63;
pub const SNAPDIR_INO: u64 = SNAP_BIT | 1;
pub const SNAPDIR_NAME: &[u8] = b".snapshots";
const ID_SHIFT: u32 = MAX_INO.trailing_zeros();
/// Snapshot views kept open at once.
const MAX_VIEWS: usize = 16;
/// Largest snapshot id the numbering can show (the volume never hands out
/// a larger one).
const MAX_ID: u64 = crate::volume::format::MAX_SNAPSHOT_ID;
const _: () = assert!(MAX_ID < SNAP_BIT >> ID_SHIFT);

/// Where an inode number points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Live(u64),
    SnapDir,
    /// (snapshot id, inode in the snapshot)
    Snap(u64, u64),
}

pub fn node(ino: u64) -> Node {
    if ino & SNAP_BIT == 0 {
        Node::Live(ino)
    } else if ino == SNAPDIR_INO {
        Node::SnapDir
    } else {
        Node::Snap((ino & !SNAP_BIT) >> ID_SHIFT, ino & (MAX_INO - 1))
    }
}

/// The mount's number for inode `ino` of snapshot `id`; the snapshot's
/// root's parent is `.snapshots`.
pub fn snap_ino(id: u64, ino: u64) -> u64 {
    SNAP_BIT | id << ID_SHIFT | ino
}

/// Whether `name` in `parent` is the reserved `.snapshots` entry.
pub fn is_reserved(parent: u64, name: &[u8]) -> bool {
    parent == ROOT_INO && name == SNAPDIR_NAME
}

/// The snapshots of a mounted file system and the read-only views open on
/// them.
pub struct Snapshots {
    /// None once the mount is ending.
    fs: Mutex<Option<Arc<Fs>>>,
    views: Mutex<HashMap<u64, Arc<Fs>>>,
    /// List `.snapshots` in the root directory.
    pub show: bool,
    mountpoint: PathBuf,
    /// Creates and deletes one at a time.
    busy: Mutex<()>,
}

impl Snapshots {
    pub fn new(fs: Arc<Fs>, mountpoint: PathBuf, show: bool) -> Snapshots {
        Snapshots {
            fs: Mutex::new(Some(fs)),
            views: Mutex::new(HashMap::new()),
            show,
            mountpoint,
            busy: Mutex::new(()),
        }
    }

    fn fs(&self) -> Result<Arc<Fs>> {
        self.fs
            .lock()
            .map_err(|_| Error::PreviousIo)?
            .clone()
            .ok_or_else(|| Error::Busy("the file system is being unmounted".into()))
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
    pub fn view(&self, id: u64) -> Result<Arc<Fs>> {
        let mut v = self.views.lock().map_err(|_| Error::PreviousIo)?;
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
    pub fn names(&self) -> Result<Vec<(u64, String)>> {
        Ok(self
            .fs()?
            .volume()
            .snapshot_names()?
            .into_iter()
            .map(|(id, n, _, _)| (id, n))
            .collect())
    }

    pub fn id_of(&self, name: &[u8]) -> Result<Option<u64>> {
        Ok(self
            .names()?
            .into_iter()
            .find(|(_, n)| n.as_bytes() == name)
            .map(|(id, _)| id))
    }

    /// Takes a snapshot. The kernel's dirty pages are written back first
    /// (syncfs), so every write that returned before the call is in it.
    /// Must not run on a FUSE request thread: the write-back needs them.
    pub fn create(&self, name: &str) -> Result<u64> {
        sync_mount(&self.mountpoint)?;
        let _one = self.busy.lock().map_err(|_| Error::PreviousIo)?;
        self.fs()?.snapshot_create(name)
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let _one = self.busy.lock().map_err(|_| Error::PreviousIo)?;
        let id = self.id_of(name.as_bytes())?.ok_or_else(|| Error::Fs {
            kind: FsError::NotFound,
            what: format!("snapshot {name:?}"),
        })?;
        self.fs()?.volume().snapshot_delete(name)?;
        if let Ok(mut v) = self.views.lock() {
            v.remove(&id);
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        self.fs()?.volume().snapshot_list()
    }
}

/// syncfs(2) on the mount: the kernel writes back every dirty page and
/// inode of it (through this process's request threads).
fn sync_mount(mountpoint: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(mountpoint)
        .map_err(|e| Error::io(format!("opening {}", mountpoint.display()), e))?;
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(Error::io(
            format!("syncfs on {}", mountpoint.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_round_trips_and_never_collides() {
        assert_eq!(node(1), Node::Live(1));
        assert_eq!(node(MAX_INO - 1), Node::Live(MAX_INO - 1));
        assert_eq!(node(SNAPDIR_INO), Node::SnapDir);
        for id in [1, 2, 77, MAX_ID] {
            for ino in [1, 2, 12345, MAX_INO - 1] {
                let n = snap_ino(id, ino);
                assert!(n >= SNAP_BIT && n != SNAPDIR_INO);
                assert_eq!(node(n), Node::Snap(id, ino));
            }
        }
        assert_ne!(snap_ino(1, 5), snap_ino(2, 5));
    }
}
