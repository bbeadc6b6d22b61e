//! The library's error type. [`Error::errno`] is the only translation to errno.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backing store failed an operation.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
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
    /// No key slot opens with the given key.
    #[error("wrong key: {0}")]
    WrongKey(String),
    /// The volume (or the device under it) has no space left.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// A request addressed blocks outside the volume.
    #[error("blocks {start}..{end} are outside the volume ({limit} blocks)")]
    OutOfRange { start: u64, end: u64, limit: u64 },
    /// A caller-supplied value is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The volume is open read-only.
    #[error("the volume is open read-only")]
    ReadOnly,
    /// An earlier write failed; the volume refuses further work until reopened.
    #[error("an earlier write to the backing store failed; unmount and reopen the volume")]
    PreviousIo,
    /// Another process holds the volume.
    #[error("{0}")]
    Busy(String),
    /// The key server could not be reached, or its certificate is not the pinned one.
    #[error("{0}")]
    KeyServer(String),
    /// The key server refused to release a key (revoked, not authorized, ...).
    #[error("{0}")]
    Refused(String),
    /// The host's sealed store is missing, damaged, or from another host.
    #[error("sealed store: {0}")]
    SealedStore(String),
    /// A file-system operation was refused for a POSIX reason.
    #[error("{what}: {kind}")]
    Fs { kind: FsError, what: String },
}

/// Why a file-system operation was refused; each maps to one errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long")]
    NameTooLong,
    #[error("invalid argument")]
    Invalid,
    #[error("too many links")]
    TooManyLinks,
    #[error("no such attribute")]
    NoAttr,
    #[error("value too large")]
    TooBig,
    #[error("operation not permitted")]
    NotPermitted,
    /// A valid request this file system does not implement (programs fall
    /// back on EOPNOTSUPP, not on EINVAL).
    #[error("operation not supported")]
    NotSupported,
}

impl FsError {
    pub fn errno(self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid => libc::EINVAL,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoAttr => libc::ENODATA,
            FsError::TooBig => libc::E2BIG,
            FsError::NotPermitted => libc::EPERM,
            FsError::NotSupported => libc::EOPNOTSUPP,
        }
    }

    /// The error, with what it was about.
    pub fn at(self, what: impl Into<String>) -> Error {
        Error::Fs {
            kind: self,
            what: what.into(),
        }
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace(format!(
                "{}: the backing device is full; free space on it",
                context.into()
            ));
        }
        if source.kind() == io::ErrorKind::WouldBlock {
            return Error::Busy(source.to_string());
        }
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a POSIX caller should see.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::NotAVolume(_) | Error::UnsupportedVersion { .. } => libc::EINVAL,
            Error::Corrupted(_) | Error::Integrity(_) | Error::PreviousIo => libc::EIO,
            Error::WrongKey(_) => libc::EACCES,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            Error::Busy(_) => libc::EBUSY,
            Error::KeyServer(_) => libc::EHOSTUNREACH,
            Error::Refused(_) | Error::SealedStore(_) => libc::EACCES,
            Error::Fs { kind, .. } => kind.errno(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let cases = [
            (Error::Integrity("x".into()), libc::EIO),
            (Error::Corrupted("x".into()), libc::EIO),
            (Error::PreviousIo, libc::EIO),
            (Error::NoSpace("x".into()), libc::ENOSPC),
            (Error::ReadOnly, libc::EROFS),
            (Error::WrongKey("x".into()), libc::EACCES),
            (
                Error::OutOfRange {
                    start: 0,
                    end: 1,
                    limit: 0,
                },
                libc::EINVAL,
            ),
            (
                Error::io("w", io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
            ),
            (
                Error::io("w", io::Error::from_raw_os_error(libc::EIO)),
                libc::EIO,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.errno(), want, "{e}");
        }
    }
}
