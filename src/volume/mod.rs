//! Volume layer: an encrypted, log-structured block store.
//!
//! Logical 4 KiB blocks are written as atomic [`Transaction`]s appended to
//! a log of segments. A paged block map (a Merkle tree of authenticated
//! pages) says where each block's latest version lives; bitmaps say which
//! blocks are allocated, changed since a mark, and sealed by which key
//! generation. Checkpoints make the trees durable; recovery rolls the log
//! forward from the last one. The cleaner reclaims segments in the
//! background and whenever space runs short.
//!
//! Locking: one mutex guards the state (map, log head, usage). Data is
//! sealed before taking it and read and opened after releasing it; the
//! `reuse` lock keeps a segment from being reused while a reader that
//! looked up a block in it is still reading.

mod api;
mod check;
mod checkpoint;
mod cleaner;
mod ctx;
mod error;
pub mod format;
mod geometry;
mod header;
mod ids;
mod log;
mod recovery;
mod rekey;
mod snapshot;
mod state;
mod tree;
mod txn;
mod usage;

pub use api::{Options, Stats, Volume};
pub use check::CheckReport;
pub use error::{Result, VolumeError};
pub use format::{Header, KeySlot, RestoredFrom, SlotKind, DEFAULT_SEGMENT_BLOCKS, KEY_SLOTS};
pub use geometry::{check_segment_blocks, largest_fitting, max_segments_for};
pub use header::{
    create, create_restoring, erase, finish_restore, key_ring, new_key_generation, read_header,
    refuse_erased, set_restoring, write_header, CreateOptions,
};
pub use ids::{Generation, Lba, SegmentId, SnapshotId};
pub use recovery::Recovery;
pub use rekey::{RekeyStatus, DEFAULT_REKEY_AFTER_SECS};
pub use snapshot::SnapshotInfo;
pub use txn::{Transaction, MAX_TXN_BLOCKS, TRIM_CHUNK_BLOCKS};
