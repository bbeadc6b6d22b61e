//! The volume layer's error.

use crate::device::DeviceError;
use crate::error::Class;

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The backing store failed an operation.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The file is not an lsvfs volume (no magic where a header must be).
    #[error("{0} is not an lsvfs volume (no lsvfs header found); check the path")]
    NotAVolume(String),
    /// The volume was written by a format version this build cannot read.
    #[error("unsupported volume format: want={want} have={have}; use an lsvfs release that supports version {have}")]
    UnsupportedVersion { want: u32, have: u32 },
    /// On-disk structures are damaged; the string says which and where.
    #[error("volume is corrupted: {0}; run `lsvfs check` and restore from a snapshot or backup")]
    Corrupted(String),
    /// A block failed authentication: it was changed, moved or replaced.
    #[error("integrity check failed for {0}; the data on disk was modified or damaged")]
    Integrity(String),
    /// The key does not open this volume.
    #[error("wrong key: {0}")]
    WrongKey(String),
    /// The volume has no space left for the request.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// A request addressed blocks outside the volume.
    #[error("blocks {start}..{end} are outside the volume ({limit} blocks)")]
    OutOfRange { start: u64, end: u64, limit: u64 },
    /// A caller-supplied value is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The volume, or this snapshot view of it, is read-only.
    #[error("the volume is open read-only")]
    ReadOnly,
    /// An earlier write failed; the volume refuses further work until reopened.
    #[error("an earlier write to the backing store failed; unmount and reopen the volume")]
    PreviousIo,
    /// No snapshot has this name or id (it may have been deleted).
    #[error("no such snapshot: {0}")]
    NoSuchSnapshot(String),
    /// The newest checkpoint is older than one this host has seen: an older
    /// copy of the backing file was put back.
    #[error(
        "rollback refused: the volume's newest checkpoint is {have}, but this host has seen \
         checkpoint {seen}, so this is an older copy of the volume put back in place of the \
         newer one; put the newest copy back, or mount with --allow-rollback (-o allow_rollback) \
         to accept this state and reset the record"
    )]
    Rollback { have: u64, seen: u64 },
    /// The volume's keys were destroyed by `lsvfs erase`.
    #[error(
        "{0} was crypto-erased: its keys are destroyed and its data cannot be recovered by \
         anyone; reuse the file with `lsvfs create` or delete it"
    )]
    Erased(String),
    /// `lsvfs restore` was writing the volume and did not finish.
    #[error(
        "{0} is an unfinished restore (the restore was interrupted or failed): its contents are \
         incomplete; restore again into a new file, or, if an increment was being applied, apply \
         it again with `lsvfs restore --incremental --rollback`, which first puts the volume \
         back to its newest snapshot"
    )]
    IncompleteRestore(String),
    /// A snapshot with this name exists already.
    #[error("snapshot {0} exists")]
    SnapshotExists(String),
}

impl VolumeError {
    /// A device failure; running out of space on it is [`VolumeError::NoSpace`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> VolumeError {
        let e = DeviceError::new(context, source);
        if e.class() == Class::NoSpace {
            return VolumeError::NoSpace(format!(
                "{}: the backing device is full; free space on it",
                e.context
            ));
        }
        VolumeError::Device(e)
    }

    pub fn class(&self) -> Class {
        match self {
            VolumeError::Device(e) => e.class(),
            VolumeError::NotAVolume(_) | VolumeError::UnsupportedVersion { .. } => {
                Class::NotAVolume
            }
            VolumeError::Corrupted(_) | VolumeError::Integrity(_) => Class::Corrupt,
            VolumeError::WrongKey(_) => Class::WrongKey,
            VolumeError::Rollback { .. } => Class::Rollback,
            VolumeError::Erased(_) => Class::Erased,
            VolumeError::IncompleteRestore(_) => Class::Incomplete,
            VolumeError::NoSpace(_) => Class::NoSpace,
            VolumeError::OutOfRange { .. } | VolumeError::InvalidArgument(_) => Class::Usage,
            VolumeError::ReadOnly => Class::ReadOnly,
            VolumeError::PreviousIo => Class::PreviousIo,
            VolumeError::NoSuchSnapshot(_) => Class::Posix(crate::error::Posix::NotFound),
            VolumeError::SnapshotExists(_) => Class::Posix(crate::error::Posix::Exists),
        }
    }

    /// The errno a POSIX caller sees.
    pub fn errno(&self) -> i32 {
        self.class().errno()
    }

    /// Out of space on the volume or the device under it.
    pub fn is_no_space(&self) -> bool {
        self.class() == Class::NoSpace
    }
}
