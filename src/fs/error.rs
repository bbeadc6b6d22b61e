//! The file-system layer's error.

use crate::error::{Class, Posix};
use crate::volume::VolumeError;

pub type Result<T, E = FsError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A POSIX refusal: why, and what it was about.
    #[error("{what}: {why}")]
    Refused { why: Posix, what: String },
    /// The volume underneath refused or failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// File-system metadata is damaged; the string says which and where.
    #[error(
        "file system is corrupted: {0}; run `lsvfs check` and restore from a snapshot or backup"
    )]
    Corrupted(String),
    /// The file system was written by a format version this build cannot read.
    #[error("unsupported file-system format: want={want} have={have}; use an lsvfs release that supports version {have}")]
    UnsupportedVersion { want: u32, have: u32 },
    /// The file system has no room for the request (inode numbers, blocks).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// A thread failed while changing the file system's state in memory; it
    /// refuses further work until remounted.
    #[error("an earlier operation failed part way; unmount and mount again")]
    PreviousIo,
    /// A system call the file system needed failed (the mount's syncfs
    /// before a snapshot).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The file system is being unmounted.
    #[error("the file system is being unmounted")]
    Unmounting,
}

impl FsError {
    pub fn class(&self) -> Class {
        match self {
            FsError::Refused { why, .. } => Class::Posix(*why),
            FsError::Volume(e) => e.class(),
            FsError::Corrupted(_) => Class::Corrupt,
            FsError::UnsupportedVersion { .. } => Class::NotAVolume,
            FsError::NoSpace(_) => Class::NoSpace,
            FsError::PreviousIo => Class::PreviousIo,
            FsError::Io { source, .. } => Class::of_io(source),
            FsError::Unmounting => Class::Busy,
        }
    }

    /// The errno a POSIX caller sees.
    pub fn errno(&self) -> i32 {
        self.class().errno()
    }

    /// Whether this is the POSIX refusal `why`, from this layer or below.
    pub fn is(&self, why: Posix) -> bool {
        self.class() == Class::Posix(why)
    }
}

impl Posix {
    /// The refusal, with what it was about.
    pub fn at(self, what: impl Into<String>) -> FsError {
        FsError::Refused {
            why: self,
            what: what.into(),
        }
    }
}
