//! Snapshot exports: portable, encrypted, incremental streams of a
//! snapshot's blocks, and their restore into a new volume
//! (docs/FORMAT.md, "Export stream").
//!
//! An export holds the blocks a snapshot maps (a full export) or the
//! blocks that changed since a base snapshot, trims included (an
//! increment). Its chunks are sealed with the export's own random key,
//! bound to their position and to the header; the key is held by slots
//! for recipients' public keys and for key files, never by the volume's
//! data key. Each export names its snapshot and its base by a link hash,
//! so a chain can be checked without any key, and its trailer holds the
//! hash of every byte before it.

mod format;
mod keys;
mod ordered;
mod read;
mod write;

/// The records decoder, for its fuzz target.
#[doc(hidden)]
pub use format::{records as decode_records, Record, RecordKind};
pub use format::{Header, Kind, SnapRef, Trailer, VERSION};
pub use keys::{
    describe as describe_slot, volume_slot_check, ChunkCipher, ExportKey, Identity, RecipientKey,
};
pub use read::{open_key, restore_stream, roll_back_to_newest, Stream};
pub use write::{export, Holders, Summary, READERS, READERS_MOUNTED};

use crate::error::Class;
use crate::volume::VolumeError;

pub type Result<T, E = ExportError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    NotAnExport(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Incomplete(String),
    #[error("{0}")]
    Chain(String),
    #[error("{0}")]
    WrongKey(String),
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl ExportError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> ExportError {
        ExportError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn class(&self) -> Class {
        match self {
            ExportError::NotAnExport(_) => Class::NotAnExport,
            ExportError::Corrupt(_) => Class::Corrupt,
            ExportError::Incomplete(_) => Class::Incomplete,
            ExportError::Chain(_) => Class::Chain,
            ExportError::WrongKey(_) => Class::WrongKey,
            ExportError::Usage(_) => Class::Usage,
            ExportError::Io { source, .. } => Class::of_io(source),
            ExportError::Volume(e) => e.class(),
        }
    }

    /// The same error, its message prefixed with what it is about.
    pub fn about(self, what: &str) -> ExportError {
        match self {
            ExportError::NotAnExport(m) => ExportError::NotAnExport(format!("{what}: {m}")),
            ExportError::Corrupt(m) => ExportError::Corrupt(format!("{what}: {m}")),
            ExportError::Incomplete(m) => ExportError::Incomplete(format!("{what}: {m}")),
            ExportError::Chain(m) => ExportError::Chain(format!("{what}: {m}")),
            ExportError::WrongKey(m) => ExportError::WrongKey(format!("{what}: {m}")),
            ExportError::Usage(m) => ExportError::Usage(format!("{what}: {m}")),
            ExportError::Io { context, source } => ExportError::Io {
                context: format!("{what}: {context}"),
                source,
            },
            e @ ExportError::Volume(_) => e,
        }
    }
}
