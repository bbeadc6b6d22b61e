//! The error the `lsvfs` command reports: any layer's error, or one of its
//! own. Its exit code comes from the error's [`Class`].

use std::io;

use crate::crypto::CryptoError;
use crate::device::DeviceError;
use crate::error::Class;
use crate::export::ExportError;
use crate::fs::FsError;
use crate::keys::KeysError;
use crate::volume::VolumeError;

/// The CLI's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the `lsvfs` command reports: any layer's error, or one of its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backing file or device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A cryptographic operation failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The volume refused or failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The file system refused or failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Key files, the sealed store or the key server refused or failed.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// An export stream or a restore refused or failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A file the command reads or writes, or a program it runs, failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The command line is wrong, or an argument invalid.
    #[error("{0}")]
    Usage(String),
    /// The mount is busy, or another process holds what it needs.
    #[error("{0}")]
    Busy(String),
    /// The mount daemon or the mount's control socket failed, in the class
    /// it reported (its exit code or errno).
    #[error("{message}")]
    Reported { class: Class, message: String },
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn class(&self) -> Class {
        match self {
            Error::Device(e) => e.class(),
            Error::Crypto(e) => e.class(),
            Error::Volume(e) => e.class(),
            Error::Fs(e) => e.class(),
            Error::Keys(e) => e.class(),
            Error::Export(e) => e.class(),
            Error::Io { source, .. } => Class::of_io(source),
            Error::Usage(_) => Class::Usage,
            Error::Busy(_) => Class::Busy,
            Error::Reported { class, .. } => *class,
        }
    }

    pub fn errno(&self) -> i32 {
        self.class().errno()
    }

    pub fn exit_code(&self) -> i32 {
        self.class().exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Posix;

    #[test]
    fn each_layer_classifies_its_errors() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        let cases: Vec<(Error, Class)> = vec![
            (DeviceError::new("w", full).into(), Class::NoSpace),
            (
                DeviceError::new("w", io::Error::from_raw_os_error(libc::EIO)).into(),
                Class::Io(libc::EIO),
            ),
            (CryptoError::Integrity.into(), Class::Corrupt),
            (VolumeError::Integrity("x".into()).into(), Class::Corrupt),
            (VolumeError::Corrupted("x".into()).into(), Class::Corrupt),
            (VolumeError::PreviousIo.into(), Class::PreviousIo),
            (VolumeError::NoSpace("x".into()).into(), Class::NoSpace),
            (VolumeError::ReadOnly.into(), Class::ReadOnly),
            (VolumeError::WrongKey("x".into()).into(), Class::WrongKey),
            (
                VolumeError::OutOfRange {
                    start: 0,
                    end: 1,
                    limit: 0,
                }
                .into(),
                Class::Usage,
            ),
            (
                FsError::from(VolumeError::Integrity("x".into())).into(),
                Class::Corrupt,
            ),
            (
                Posix::NotEmpty.at("d").into(),
                Class::Posix(Posix::NotEmpty),
            ),
            (KeysError::Refused("x".into()).into(), Class::Refused),
            (KeysError::KeyServer("x".into()).into(), Class::KeyServer),
            (
                KeysError::SealedStore("x".into()).into(),
                Class::SealedStore,
            ),
        ];
        for (e, c) in cases {
            assert_eq!(e.class(), c, "{e}");
        }
    }
}
