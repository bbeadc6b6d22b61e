//! The `.snapshots` namespace: how the mount numbers the inodes of
//! snapshots and of `.snapshots` itself.
//!
//! Inode numbers: the live file system's are below 2^40 ([`MAX_INO`]).
//! Snapshot `id`'s inode `i` is `2^63 | id << 40 | i`, so numbers are stable
//! across remounts (ids are never reused) and never collide with the live
//! tree's or another snapshot's. `.snapshots` itself is `2^63 | 1` (id 0).

use crate::fs::{Ino, SnapshotId, MAX_INO, MAX_SNAPSHOT_ID, ROOT_INO};

pub const SNAP_BIT: u64 = 1 << 63;
pub const SNAPDIR_INO: u64 = SNAP_BIT | 1;
pub const SNAPDIR_NAME: &[u8] = b".snapshots";
const ID_SHIFT: u32 = MAX_INO.trailing_zeros();
/// Largest snapshot id the numbering can show (the volume never hands out
/// a larger one).
const MAX_ID: u64 = MAX_SNAPSHOT_ID;
const _: () = assert!(MAX_ID < SNAP_BIT >> ID_SHIFT);

/// Where an inode number points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Live(Ino),
    SnapDir,
    /// (snapshot id, inode in the snapshot)
    Snap(SnapshotId, Ino),
}

pub fn node(ino: u64) -> Node {
    if ino & SNAP_BIT == 0 {
        Node::Live(Ino(ino))
    } else if ino == SNAPDIR_INO {
        Node::SnapDir
    } else {
        Node::Snap(
            SnapshotId((ino & !SNAP_BIT) >> ID_SHIFT),
            Ino(ino & (MAX_INO - 1)),
        )
    }
}

/// The mount's number for inode `ino` of snapshot `id`; the snapshot's
/// root's parent is `.snapshots`.
pub fn snap_ino(id: SnapshotId, ino: Ino) -> u64 {
    SNAP_BIT | id.0 << ID_SHIFT | ino.0
}

/// Whether `name` in `parent` is the reserved `.snapshots` entry.
pub fn is_reserved(parent: Ino, name: &[u8]) -> bool {
    parent == ROOT_INO && name == SNAPDIR_NAME
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_round_trips_and_never_collides() {
        assert_eq!(node(1), Node::Live(ROOT_INO));
        assert_eq!(node(MAX_INO - 1), Node::Live(Ino(MAX_INO - 1)));
        assert_eq!(node(SNAPDIR_INO), Node::SnapDir);
        for id in [1, 2, 77, MAX_ID].map(SnapshotId) {
            for ino in [1, 2, 12345, MAX_INO - 1].map(Ino) {
                let n = snap_ino(id, ino);
                assert!(n >= SNAP_BIT && n != SNAPDIR_INO);
                assert_eq!(node(n), Node::Snap(id, ino));
            }
        }
        assert_ne!(
            snap_ino(SnapshotId(1), Ino(5)),
            snap_ino(SnapshotId(2), Ino(5))
        );
    }
}
