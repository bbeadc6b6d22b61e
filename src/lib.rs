//! lsvfs: encrypted, log-structured volumes for Linux hosts.
//!
//! The layers, bottom-up; each calls only the one below it:
//!
//! | module     | owns |
//! |------------|------|
//! | [`device`] | the backing file or block device: read_at / write_at / flush / discard |
//! | [`crypto`] | key types, AES-256-XTS per block, per-block MAC, HKDF, key wrapping, the parallel chunk engine |
//! | [`volume`] | segments, the log, the paged block map, bitmaps, checkpoints, roll-forward recovery, the cleaner |
//! | [`fs`]     | the POSIX file system on a volume: inodes, directories, data, xattrs |
//! | [`fuse`]   | the fuser adapter: the kernel mount (types and replies only) |
//! | [`keys`]   | key files and volume key slots: turning what the user holds into a master key |
//! | [`export`] | snapshot exports and restore: encrypted, incremental, hash-chained streams of a snapshot's blocks |
//! | [`cli`]    | the `lsvfs` command |
//!
//! The on-disk format is specified byte by byte in `docs/FORMAT.md`.

pub mod cli;
pub mod crypto;
pub mod device;
pub mod error;
pub mod export;
pub mod fs;
pub mod fuse;
pub mod keys;
pub mod volume;
mod wire;

pub use cli::{Error, Result};
pub use error::Class;

/// Size of a logical block, a segment block and every metadata page.
pub const BLOCK_SIZE: usize = 4096;
