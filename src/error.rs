//! What every layer's error shares. Each layer has its own error type
//! (`DeviceError`, `CryptoError`, `VolumeError`, `FsError`, `KeysError`),
//! converted upward with `From`; the CLI reports a `cli::Error`, which
//! wraps any of them.
//!
//! Every error belongs to a [`Class`]: what a caller can do about it.
//! [`Class::errno`] is the only translation to errno and
//! [`Class::exit_code`] the only translation to the CLI's exit codes.

use std::io;

/// Why a file-system operation was refused; each maps to one errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Posix {
    /// No such name or inode (ENOENT).
    #[error("no such file or directory")]
    NotFound,
    /// The name is taken (EEXIST).
    #[error("file exists")]
    Exists,
    /// A directory was needed (ENOTDIR).
    #[error("not a directory")]
    NotDir,
    /// A directory where one is not allowed (EISDIR).
    #[error("is a directory")]
    IsDir,
    /// The directory still has entries (ENOTEMPTY).
    #[error("directory not empty")]
    NotEmpty,
    /// A name over 255 bytes, or a symlink target over 4095 (ENAMETOOLONG).
    #[error("file name too long")]
    NameTooLong,
    /// A malformed request: a bad name, flag or range (EINVAL).
    #[error("invalid argument")]
    Invalid,
    /// The link count limit is reached (EMLINK).
    #[error("too many links")]
    TooManyLinks,
    /// No such extended attribute (ENODATA).
    #[error("no such attribute")]
    NoAttr,
    /// An extended attribute value over the limit (E2BIG).
    #[error("value too large")]
    TooBig,
    /// A file size, or a write or fallocate ending, past the largest file
    /// (EFBIG).
    #[error("file too large")]
    FileTooBig,
    /// Not allowed for this caller (EPERM).
    #[error("operation not permitted")]
    NotPermitted,
    /// A valid request this file system does not implement (programs fall
    /// back on EOPNOTSUPP, not on EINVAL).
    #[error("operation not supported")]
    NotSupported,
}

impl Posix {
    pub fn errno(self) -> i32 {
        match self {
            Posix::NotFound => libc::ENOENT,
            Posix::Exists => libc::EEXIST,
            Posix::NotDir => libc::ENOTDIR,
            Posix::IsDir => libc::EISDIR,
            Posix::NotEmpty => libc::ENOTEMPTY,
            Posix::NameTooLong => libc::ENAMETOOLONG,
            Posix::Invalid => libc::EINVAL,
            Posix::TooManyLinks => libc::EMLINK,
            Posix::NoAttr => libc::ENODATA,
            Posix::TooBig => libc::E2BIG,
            Posix::FileTooBig => libc::EFBIG,
            Posix::NotPermitted => libc::EPERM,
            Posix::NotSupported => libc::EOPNOTSUPP,
        }
    }
}

/// What kind of failure an error is, whichever layer raised it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The command line was wrong, or an argument invalid.
    Usage,
    /// Not an lsvfs volume, or a format version this build cannot read.
    NotAVolume,
    /// Damaged structures, or data that failed authentication.
    Corrupt,
    /// The key does not open the volume.
    WrongKey,
    /// No space left on the volume or the device under it.
    NoSpace,
    /// Another process holds the volume, or the mount is busy.
    Busy,
    /// An I/O failure, with the system's errno (EIO if none).
    Io(i32),
    /// The volume refuses work after a failed write, until reopened.
    PreviousIo,
    /// The volume or file system is read-only.
    ReadOnly,
    /// The key server is unreachable or not the pinned one.
    KeyServer,
    /// The key server refused to release a key.
    Refused,
    /// The sealed store is missing, damaged or from another host.
    SealedStore,
    /// The volume is older than a state this host has seen (a copy put back).
    Rollback,
    /// The volume's keys were destroyed (`lsvfs erase`).
    Erased,
    /// Not an export stream, or an export format version this build
    /// cannot read.
    NotAnExport,
    /// A chain of exports with a missing, reordered or foreign link, or an
    /// increment whose base is not what the target volume holds.
    Chain,
    /// Incomplete: an export stream cut short, or a volume whose restore
    /// did not finish.
    Incomplete,
    /// A POSIX refusal (ENOENT, EEXIST, ENOTEMPTY, ...).
    Posix(Posix),
    /// A failure another process reported with an errno (the mount's
    /// control socket).
    Errno(i32),
    /// A failure the mount daemon reported with its exit code.
    Exit(i32),
}

impl Class {
    /// The errno a POSIX caller sees.
    pub fn errno(self) -> i32 {
        match self {
            Class::Usage | Class::NotAVolume | Class::NotAnExport | Class::Chain => libc::EINVAL,
            Class::Incomplete => libc::EIO,
            Class::Corrupt | Class::PreviousIo => libc::EIO,
            Class::WrongKey | Class::Refused | Class::SealedStore | Class::Erased => libc::EACCES,
            Class::Rollback => libc::ESTALE,
            Class::NoSpace => libc::ENOSPC,
            Class::Busy => libc::EBUSY,
            Class::Io(n) | Class::Errno(n) => n,
            Class::Exit(_) => libc::EIO,
            Class::ReadOnly => libc::EROFS,
            Class::KeyServer => libc::EHOSTUNREACH,
            Class::Posix(p) => p.errno(),
        }
    }

    /// The CLI's stable exit code (the table in README.md and `cli`).
    pub fn exit_code(self) -> i32 {
        match self {
            Class::Usage => 2,
            Class::NotAVolume => 3,
            Class::Corrupt => 4,
            Class::WrongKey => 5,
            Class::NoSpace => 6,
            Class::Busy => 7,
            Class::Io(_) | Class::PreviousIo => 8,
            Class::KeyServer => 9,
            Class::Refused => 10,
            Class::SealedStore => 11,
            Class::Rollback => 12,
            Class::Erased => 13,
            Class::NotAnExport => 14,
            Class::Chain => 15,
            Class::Incomplete => 16,
            Class::Errno(n) => match n {
                libc::EINVAL => 2,
                libc::ENOSPC => 6,
                libc::EBUSY => 7,
                libc::EIO => 8,
                _ => 1,
            },
            Class::Exit(code) => code,
            Class::ReadOnly | Class::Posix(_) => 1,
        }
    }

    /// The class of an I/O error from the system.
    pub fn of_io(e: &io::Error) -> Class {
        match (e.raw_os_error(), e.kind()) {
            (Some(libc::ENOSPC), _) => Class::NoSpace,
            (_, io::ErrorKind::WouldBlock) => Class::Busy,
            (n, _) => Class::Io(n.unwrap_or(libc::EIO)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_one_errno_and_one_exit_code() {
        let cases = [
            (Class::Usage, libc::EINVAL, 2),
            (Class::NotAVolume, libc::EINVAL, 3),
            (Class::Corrupt, libc::EIO, 4),
            (Class::WrongKey, libc::EACCES, 5),
            (Class::NoSpace, libc::ENOSPC, 6),
            (Class::Busy, libc::EBUSY, 7),
            (Class::Io(libc::EIO), libc::EIO, 8),
            (Class::PreviousIo, libc::EIO, 8),
            (Class::KeyServer, libc::EHOSTUNREACH, 9),
            (Class::Refused, libc::EACCES, 10),
            (Class::SealedStore, libc::EACCES, 11),
            (Class::Rollback, libc::ESTALE, 12),
            (Class::Erased, libc::EACCES, 13),
            (Class::NotAnExport, libc::EINVAL, 14),
            (Class::Chain, libc::EINVAL, 15),
            (Class::Incomplete, libc::EIO, 16),
            (Class::ReadOnly, libc::EROFS, 1),
            (Class::Posix(Posix::NotFound), libc::ENOENT, 1),
            (Class::Posix(Posix::NotSupported), libc::EOPNOTSUPP, 1),
            (Class::Errno(libc::ENOSPC), libc::ENOSPC, 6),
            (Class::Errno(libc::EEXIST), libc::EEXIST, 1),
            (Class::Exit(9), libc::EIO, 9),
        ];
        for (c, errno, code) in cases {
            assert_eq!((c.errno(), c.exit_code()), (errno, code), "{c:?}");
        }
    }
}
