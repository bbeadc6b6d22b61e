//! Key wrapping: a master key sealed under a key-encryption key with an AEAD
//! (XChaCha20-Poly1305, random 192-bit nonce), the volume id as associated data.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use lsvfs_keyserver::secret::{scrub_stack, Locked};

use super::keys::locked_key;
use super::{random_bytes, CryptoError, MasterKey, KEY_LEN};

/// Bytes of a wrapped key: nonce (24) + ciphertext (32) + tag (16).
pub const WRAPPED_LEN: usize = 24 + KEY_LEN + 16;

/// A key-encryption key: from a key file, or released by a key server. It
/// lives in locked, dump-excluded memory.
pub struct Kek(Locked<[u8; KEY_LEN]>);

impl Kek {
    /// A KEK from bytes held elsewhere; `bytes` is zeroized by its owner.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let mut k = locked_key().expect("locked memory for one key");
        k.copy_from_slice(&bytes[..]);
        Kek(k)
    }

    /// A KEK filled in place by `fill`, which may refuse.
    pub fn fill<E>(
        fill: impl FnOnce(&mut [u8; KEY_LEN]) -> Result<(), E>,
    ) -> Result<Result<Self, E>, CryptoError> {
        let mut k = locked_key()?;
        Ok(fill(&mut k).map(|()| Kek(k)))
    }

    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = locked_key()?;
        getrandom::fill(k.as_mut_slice()).map_err(|_| CryptoError::Random)?;
        Ok(Kek(k))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A public fingerprint of the KEK (keyed hash of nothing), stored in a
    /// key slot so that the right slot is found without trial decryption.
    pub fn fingerprint(&self) -> [u8; 16] {
        let h = blake3::keyed_hash(&self.0, b"lsvfs v1 kek fingerprint");
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        out
    }
}

/// A master key wrapped under a KEK.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WrappedKey(pub [u8; WRAPPED_LEN]);

pub fn wrap_key(
    kek: &Kek,
    master: &MasterKey,
    associated: &[u8],
) -> Result<WrappedKey, CryptoError> {
    let cipher = XChaCha20Poly1305::new(kek.0.as_slice().into());
    let nonce = random_bytes::<24>()?;
    let ct = cipher
        .encrypt(
            XNonce::from_slice(nonce.as_slice()),
            Payload {
                msg: master.expose(),
                aad: associated,
            },
        )
        .map_err(|_| CryptoError::Random)?;
    let mut out = [0u8; WRAPPED_LEN];
    out[..24].copy_from_slice(nonce.as_slice());
    out[24..].copy_from_slice(&ct);
    Ok(WrappedKey(out))
}

pub fn unwrap_key(
    kek: &Kek,
    wrapped: &WrappedKey,
    associated: &[u8],
) -> Result<MasterKey, CryptoError> {
    let master = unwrap_below(kek, wrapped, associated);
    // The cipher's key schedule and the plaintext's copies were on the
    // stack, in the frames below this one (the scrub clears only below its
    // caller).
    scrub_stack();
    master
}

#[inline(never)]
fn unwrap_below(
    kek: &Kek,
    wrapped: &WrappedKey,
    associated: &[u8],
) -> Result<MasterKey, CryptoError> {
    let cipher = XChaCha20Poly1305::new(kek.0.as_slice().into());
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                XNonce::from_slice(&wrapped.0[..24]),
                Payload {
                    msg: &wrapped.0[24..],
                    aad: associated,
                },
            )
            .map_err(|_| CryptoError::WrongKey)?,
    );
    if plain.len() != KEY_LEN {
        return Err(CryptoError::WrongKey);
    }
    MasterKey::from_slice(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_wrong_key() {
        let kek = Kek::generate().unwrap();
        let mk = MasterKey::generate().unwrap();
        let w = wrap_key(&kek, &mk, b"vol-a").unwrap();
        let back = unwrap_key(&kek, &w, b"vol-a").unwrap();
        assert_eq!(back.expose(), mk.expose());
        let other = Kek::generate().unwrap();
        assert!(matches!(
            unwrap_key(&other, &w, b"vol-a"),
            Err(CryptoError::WrongKey)
        ));
        assert!(matches!(
            unwrap_key(&kek, &w, b"vol-b"),
            Err(CryptoError::WrongKey)
        ));
    }
}
