//! File-system layer: the POSIX file system that the FUSE layer serves,
//! kept free of any FUSE types.
//!
//! Its metadata (inodes, directory entries, xattrs, extents) lives in one
//! B+tree ([`btree`]) whose nodes are volume blocks; each file-system
//! operation stages its node, data and trim changes, and they reach the
//! volume in whole volume transactions, in order (a metadata-only
//! operation, or a small write into new blocks, waits for the next
//! commit: [`store::Pending`]), so every operation is atomic across
//! crashes.

pub mod acl;
pub mod btree;
mod check;
mod data;
mod error;
mod filesystem;
pub mod format;
mod holds;
mod snapshots;
pub mod store;
pub use crate::error::Posix;
pub use crate::volume::format::MAX_SNAPSHOT_ID;
pub use crate::volume::{SnapshotId, SnapshotInfo};
pub use check::FsReport;
pub use data::{
    FsStats, SetAttr, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, MAX_FILE_SIZE,
    XATTR_CREATE, XATTR_REPLACE,
};
pub use error::{FsError, Result};
pub use filesystem::{
    DirEntry, Fs, Leftover, LINK_MAX, MAX_INO, RENAME_EXCHANGE, RENAME_NOREPLACE,
};
pub use format::{Ino, ROOT_INO};
pub use snapshots::{BeforeSnapshot, Snapshots};
