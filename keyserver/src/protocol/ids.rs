//! Newtypes for the identifiers on the wire, with their hex encodings.

use super::ProtocolError;

/// Decodes exactly `N` bytes from `2 * N` hex digits (either case).
pub(crate) fn decode_hex<const N: usize>(
    field: &'static str,
    s: &str,
) -> Result<[u8; N], ProtocolError> {
    let mut out = [0u8; N];
    if s.len() != 2 * N {
        return Err(ProtocolError::Hex {
            field,
            expected: 2 * N,
        });
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| ProtocolError::Hex {
        field,
        expected: 2 * N,
    })?;
    Ok(out)
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $field:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Parses the lowercase or uppercase hex form.
            pub fn from_hex(s: &str) -> Result<Self, ProtocolError> {
                decode_hex::<$len>($field, s).map($name)
            }

            /// Lowercase hex, the canonical form.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

hex_id!(
    /// A host's identity: its Ed25519 public key.
    HostId,
    32,
    "host"
);
hex_id!(
    /// A volume's 16-byte id, as stored in its superblock.
    VolumeId,
    16,
    "volume"
);
hex_id!(
    /// A single-use challenge issued by the server.
    Challenge,
    32,
    "challenge"
);

/// A KEK version. Versions start at 1 and only grow; 0 is never a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KekVersion(pub u32);

impl KekVersion {
    /// The version `register` and `create-volume` create.
    pub const FIRST: KekVersion = KekVersion(1);

    /// The version after this one, or `None` at `u32::MAX`.
    pub fn next(self) -> Option<KekVersion> {
        self.0.checked_add(1).map(KekVersion)
    }
}

impl std::fmt::Display for KekVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let v = VolumeId([0xab; 16]);
        assert_eq!(VolumeId::from_hex(&v.to_hex()), Ok(v));
        assert_eq!(VolumeId::from_hex(&v.to_hex().to_uppercase()), Ok(v));
        for bad in ["", "ab", &"a".repeat(31), &"a".repeat(33), &"g".repeat(32)] {
            assert_eq!(
                VolumeId::from_hex(bad),
                Err(ProtocolError::Hex {
                    field: "volume",
                    expected: 32
                })
            );
        }
        // A multi-byte character must be rejected, not split.
        let s = format!("é{}", "a".repeat(30));
        assert_eq!(s.len(), 32);
        assert!(VolumeId::from_hex(&s).is_err());
    }
}
