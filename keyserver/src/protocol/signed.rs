//! The signed requests (`register`, `unlock`, `rewrapped`) and the exact
//! byte string a host signs for them.
//!
//! Signed message (docs/PROTOCOL.md, "Signed message"):
//!
//! | offset  | len | field                                  |
//! |---------|-----|----------------------------------------|
//! | 0       | 12  | `"lsvfs-ks v1 "` (ASCII)               |
//! | 12      | n   | op name (ASCII, e.g. `unlock`)         |
//! | 12+n    | 1   | 0x00                                   |
//! | 13+n    | 32  | challenge                              |
//! | 45+n    | 32  | host id (Ed25519 public key)           |
//! | 77+n    | 16  | volume id                              |
//! | 93+n    | 4   | KEK version, u32 big-endian            |
//! | 97+n    | 32  | client one-time X25519 public key      |
//!
//! Total `129 + n` bytes. The op name is followed by a NUL so no op name can
//! be a prefix of another's message.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::ids::decode_hex;
use super::{Challenge, HostId, KekVersion, ProtocolError, SignedRequestBody, VolumeId};

/// Domain-separation prefix of every signed message; names the protocol
/// version.
pub const SIGNED_PREFIX: &[u8; 12] = b"lsvfs-ks v1 ";

const OP_OFFSET: usize = SIGNED_PREFIX.len();
const FIXED_TAIL: usize = 1 + Challenge::LEN + HostId::LEN + VolumeId::LEN + 4 + 32;

/// A signed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Create a volume with KEK v1 and authorize the caller for it.
    Register,
    /// Release a KEK version (and the newest one, if newer).
    Unlock,
    /// Report that the caller's copy is now wrapped under a version.
    Rewrapped,
    /// Destroy every KEK of the volume (crypto-erase); releases nothing.
    Erase,
    /// Report that the volume's data was sealed again under a new data key
    /// (after a compromise); releases nothing.
    Rekeyed,
}

impl Op {
    /// Every op.
    pub const ALL: [Op; 5] = [
        Op::Register,
        Op::Unlock,
        Op::Rewrapped,
        Op::Erase,
        Op::Rekeyed,
    ];

    /// The name used in the signed message and the URL path.
    pub fn name(self) -> &'static str {
        match self {
            Op::Register => "register",
            Op::Unlock => "unlock",
            Op::Rewrapped => "rewrapped",
            Op::Erase => "erase",
            Op::Rekeyed => "rekeyed",
        }
    }

    /// Whether the op releases a KEK (sealed to the request's one-time
    /// `client_key`); the others carry an all-zero `client_key`.
    pub fn releases_key(self) -> bool {
        matches!(self, Op::Register | Op::Unlock)
    }

    /// The URL path of the op.
    pub fn path(self) -> &'static str {
        match self {
            Op::Register => "/v1/register",
            Op::Unlock => "/v1/unlock",
            Op::Rewrapped => "/v1/rewrapped",
            Op::Erase => "/v1/erase",
            Op::Rekeyed => "/v1/rekeyed",
        }
    }
}

/// A validated signed request. The signature is carried, not yet checked:
/// [`SignedRequest::verify`] checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// Which operation.
    pub op: Op,
    /// The requesting host.
    pub host: HostId,
    /// The volume.
    pub volume: VolumeId,
    /// The KEK version asked for (`register`: always 1).
    pub version: KekVersion,
    /// The challenge from `POST /v1/challenge`.
    pub challenge: Challenge,
    /// The client's one-time X25519 public key; all zero for `rewrapped`,
    /// which releases nothing.
    pub client_key: [u8; 32],
    /// Ed25519 signature over [`SignedRequest::message`].
    pub signature: [u8; 64],
}

impl SignedRequest {
    /// Builds and signs a request. `key` must be the host's signing key; the
    /// host id is derived from it.
    pub fn sign(
        op: Op,
        key: &SigningKey,
        volume: VolumeId,
        version: KekVersion,
        challenge: Challenge,
        client_key: [u8; 32],
    ) -> SignedRequest {
        let host = HostId(key.verifying_key().to_bytes());
        let mut req = SignedRequest {
            op,
            host,
            volume,
            version,
            challenge,
            client_key,
            signature: [0; 64],
        };
        req.signature = key.sign(&req.message()).to_bytes();
        req
    }

    /// The exact bytes that are signed (layout in the module comment).
    pub fn message(&self) -> Vec<u8> {
        let name = self.op.name().as_bytes();
        let mut m = Vec::with_capacity(OP_OFFSET + name.len() + FIXED_TAIL);
        m.extend_from_slice(SIGNED_PREFIX);
        m.extend_from_slice(name);
        m.push(0);
        m.extend_from_slice(&self.challenge.0);
        m.extend_from_slice(&self.host.0);
        m.extend_from_slice(&self.volume.0);
        m.extend_from_slice(&self.version.0.to_be_bytes());
        m.extend_from_slice(&self.client_key);
        debug_assert_eq!(m.len(), OP_OFFSET + name.len() + FIXED_TAIL);
        m
    }

    /// True if the signature verifies under the host id (strict Ed25519:
    /// small-order keys and non-canonical signatures are rejected).
    pub fn verify(&self) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.host.0) else {
            return false;
        };
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&self.message(), &sig).is_ok()
    }

    /// The JSON body for this request.
    pub fn to_body(&self) -> SignedRequestBody {
        SignedRequestBody {
            host: self.host.to_hex(),
            volume: self.volume.to_hex(),
            version: self.version.0,
            challenge: self.challenge.to_hex(),
            client_key: hex::encode(self.client_key),
            signature: hex::encode(self.signature),
        }
    }

    /// Validates a parsed body for `op`.
    pub fn from_body(op: Op, body: &SignedRequestBody) -> Result<SignedRequest, ProtocolError> {
        let host = HostId::from_hex(&body.host)?;
        let volume = VolumeId::from_hex(&body.volume)?;
        let challenge = Challenge::from_hex(&body.challenge)?;
        let client_key = decode_hex::<32>("client_key", &body.client_key)?;
        let signature = decode_hex::<64>("signature", &body.signature)?;
        if body.version == 0 {
            return Err(ProtocolError::Invalid {
                field: "version",
                reason: "versions start at 1",
            });
        }
        let version = KekVersion(body.version);
        match op {
            Op::Register if version != KekVersion::FIRST => {
                return Err(ProtocolError::Invalid {
                    field: "version",
                    reason: "register creates version 1",
                })
            }
            _ if !op.releases_key() && client_key != [0; 32] => {
                return Err(ProtocolError::Invalid {
                    field: "client_key",
                    reason: "must be all zero for rewrapped and erase",
                })
            }
            Op::Register | Op::Unlock if client_key == [0; 32] => {
                return Err(ProtocolError::Invalid {
                    field: "client_key",
                    reason: "must be a fresh X25519 public key",
                })
            }
            _ => {}
        }
        Ok(SignedRequest {
            op,
            host,
            volume,
            version,
            challenge,
            client_key,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn request(op: Op) -> SignedRequest {
        let ck = if op.releases_key() { [9; 32] } else { [0; 32] };
        SignedRequest::sign(
            op,
            &key(),
            VolumeId([1; 16]),
            KekVersion(1),
            Challenge([2; 32]),
            ck,
        )
    }

    #[test]
    fn message_layout_is_exact() {
        let r = SignedRequest::sign(
            Op::Unlock,
            &key(),
            VolumeId([0x11; 16]),
            KekVersion(0x0102_0304),
            Challenge([0x22; 32]),
            [0x33; 32],
        );
        let m = r.message();
        assert_eq!(m.len(), 129 + "unlock".len());
        assert_eq!(&m[..18], b"lsvfs-ks v1 unlock");
        assert_eq!(m[18], 0);
        assert_eq!(&m[19..51], &[0x22; 32]);
        assert_eq!(&m[51..83], &key().verifying_key().to_bytes());
        assert_eq!(&m[83..99], &[0x11; 16]);
        assert_eq!(&m[99..103], &[1, 2, 3, 4]);
        assert_eq!(&m[103..135], &[0x33; 32]);
    }

    #[test]
    fn signature_binds_every_field() {
        let good = request(Op::Unlock);
        assert!(good.verify());
        let mut tampered = vec![];
        let mut r = good.clone();
        r.op = Op::Register;
        tampered.push(r);
        let mut r = good.clone();
        r.volume.0[0] ^= 1;
        tampered.push(r);
        let mut r = good.clone();
        r.version = KekVersion(2);
        tampered.push(r);
        let mut r = good.clone();
        r.challenge.0[31] ^= 1;
        tampered.push(r);
        let mut r = good.clone();
        r.client_key[0] ^= 1;
        tampered.push(r);
        let mut r = good.clone();
        r.signature[5] ^= 1;
        tampered.push(r);
        let mut r = good.clone();
        r.host = HostId(SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes());
        tampered.push(r);
        let mut r = good;
        r.host = HostId([0xff; 32]); // not a curve point
        tampered.push(r);
        for r in tampered {
            assert!(!r.verify(), "{r:?} verified");
        }
    }

    #[test]
    fn body_validation() {
        for op in Op::ALL {
            let r = request(op);
            assert_eq!(SignedRequest::from_body(op, &r.to_body()), Ok(r));
        }
        let mut b = request(Op::Unlock).to_body();
        b.version = 0;
        assert!(matches!(
            SignedRequest::from_body(Op::Unlock, &b),
            Err(ProtocolError::Invalid {
                field: "version",
                ..
            })
        ));
        let mut b = request(Op::Register).to_body();
        b.version = 2;
        assert!(SignedRequest::from_body(Op::Register, &b).is_err());
        let b = request(Op::Unlock).to_body();
        assert!(SignedRequest::from_body(Op::Rewrapped, &b).is_err());
        let b = request(Op::Rewrapped).to_body();
        assert!(SignedRequest::from_body(Op::Unlock, &b).is_err());
        let mut b = request(Op::Unlock).to_body();
        b.signature.pop();
        assert_eq!(
            SignedRequest::from_body(Op::Unlock, &b),
            Err(ProtocolError::Hex {
                field: "signature",
                expected: 128
            })
        );
    }
}
