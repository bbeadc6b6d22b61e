//! The key layer's error.

use crate::crypto::CryptoError;
use crate::error::Class;
use crate::volume::VolumeError;

pub type Result<T, E = KeysError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Reading or writing a key file or the sealed store failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The key server could not be reached, or its certificate is not the
    /// pinned one.
    #[error("{0}")]
    KeyServer(String),
    /// The key server refused to release a key (revoked, not enrolled, not
    /// authorized).
    #[error("{0}")]
    Refused(String),
    /// The host's sealed store is missing, damaged, or from another host.
    #[error("sealed store: {0}")]
    SealedStore(String),
    /// No key slot of the volume opens with the key given.
    #[error("wrong key: {0}")]
    WrongKey(String),
    /// A key file is malformed, or an argument invalid.
    #[error("{0}")]
    Invalid(String),
    /// A cryptographic operation failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The volume header could not be read or written.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl KeysError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> KeysError {
        KeysError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn class(&self) -> Class {
        match self {
            KeysError::Io { source, .. } => Class::of_io(source),
            KeysError::KeyServer(_) => Class::KeyServer,
            KeysError::Refused(_) => Class::Refused,
            KeysError::SealedStore(_) => Class::SealedStore,
            KeysError::WrongKey(_) => Class::WrongKey,
            KeysError::Invalid(_) => Class::Usage,
            KeysError::Crypto(e) => e.class(),
            KeysError::Volume(e) => e.class(),
        }
    }
}
