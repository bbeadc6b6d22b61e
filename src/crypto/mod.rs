//! Crypto layer: key types, AES-256-XTS per block, the per-block MAC, HKDF,
//! key wrapping, and the parallel chunk engine.
//!
//! Every block written to the volume is sealed under a [`Tag`]: what it is
//! (`kind`), where it belongs (`addr`) and the unique write generation
//! (`gen`). The XTS tweak is derived from the tag, so no two writes ever
//! share a (key, tweak) pair; the MAC binds the volume id, the tag and the
//! ciphertext, so a flipped bit, a block moved to another address, or an
//! older copy of a block fails to verify.

mod engine;
mod keys;
mod wiped;
mod wrap;
pub(crate) mod xts;

pub use engine::{CryptoEngine, DEFAULT_CHUNK_BYTES};
pub use keys::{
    derived_key_bytes, generation_binding, generation_wrap_key, random_bytes, GenKeys, MasterKey,
    VolumeKeys, KEY_LEN,
};
pub use wiped::{Wiped, WipedPool};
pub use wrap::{unwrap_key, wrap_key, Kek, WrappedKey, WRAPPED_LEN};
/// The block cipher mode, for its benchmark (benches/xts.rs).
#[doc(hidden)]
pub use xts::Xts;

/// Length of a block MAC in bytes (128 bits).
pub const MAC_LEN: usize = 16;

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A MAC did not match: the data was changed, moved or replaced.
    #[error("integrity check failed")]
    Integrity,
    /// An AEAD-wrapped key did not open under the given key.
    #[error("wrong key")]
    WrongKey,
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// No memory could be mapped for a key.
    #[error("out of memory for key material")]
    Memory,
}

impl CryptoError {
    pub fn class(&self) -> crate::error::Class {
        use crate::error::Class;
        match self {
            CryptoError::Integrity => Class::Corrupt,
            CryptoError::WrongKey => Class::WrongKey,
            CryptoError::Random | CryptoError::Memory => Class::Io(libc::EIO),
        }
    }
}

/// A 128-bit block MAC (truncated keyed BLAKE3).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Mac(pub [u8; MAC_LEN]);

impl Mac {
    /// Constant-time comparison.
    pub fn ct_eq(&self, other: &Mac) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…")
    }
}

/// What a sealed block is. The values are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockKind {
    /// A logical data block; `addr` is its LBA.
    Data = 1,
    /// A page of one of the metadata trees; `addr` encodes tree, level and index.
    TreePage = 2,
    /// The encrypted body of a log record summary; `addr` is the record sequence number.
    Summary = 3,
    /// A checkpoint block (authenticated only, not encrypted); `addr` is its slot.
    Checkpoint = 4,
}

/// The identity a block is sealed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub kind: BlockKind,
    pub addr: u64,
    pub gen: u64,
    /// The key generation whose keys seal the block. It selects the keys
    /// and is in neither the tweak nor the MAC input: each generation's
    /// keys are independent.
    pub key: u16,
}

impl Tag {
    pub fn new(kind: BlockKind, addr: u64, gen: u64, key: u16) -> Tag {
        Tag {
            kind,
            addr,
            gen,
            key,
        }
    }

    /// 17 bytes: kind, addr (LE), gen (LE). The MAC binds them (after the
    /// ciphertext, before the volume id).
    fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[0] = self.kind as u8;
        out[1..9].copy_from_slice(&self.addr.to_le_bytes());
        out[9..17].copy_from_slice(&self.gen.to_le_bytes());
        out
    }

    /// The XTS tweak: gen (LE) then addr (LE) with the kind in its top byte.
    /// `gen` is unique per write within a volume, which alone makes the
    /// tweak unique; the address is included for defence in depth.
    fn tweak(&self) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&self.gen.to_le_bytes());
        let addr = (self.addr & 0x00ff_ffff_ffff_ffff) | ((self.kind as u64) << 56);
        t[8..].copy_from_slice(&addr.to_le_bytes());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> VolumeKeys {
        let mk = MasterKey::from_bytes(zeroize::Zeroizing::new([7u8; KEY_LEN]));
        VolumeKeys::derive(&mk, &[1u8; 16])
    }

    #[test]
    fn seal_open_round_trip() {
        let k = keys();
        let tag = Tag::new(BlockKind::Data, 42, 9, 0);
        let plain = vec![0xabu8; 4096];
        let mut b = plain.clone();
        let mac = k.current().seal(tag, &mut b);
        assert_ne!(b, plain, "ciphertext equals plaintext");
        k.open(tag, &mut b, &mac).unwrap();
        assert_eq!(b, plain);
    }

    #[test]
    fn tampering_is_detected() {
        let k = keys();
        let tag = Tag::new(BlockKind::Data, 42, 9, 0);
        let mut b = vec![1u8; 4096];
        let mac = k.current().seal(tag, &mut b);
        let mut flipped = b.clone();
        flipped[100] ^= 1;
        assert!(k.open(tag, &mut flipped, &mac).is_err());
        let mut moved = b.clone();
        assert!(k
            .open(Tag::new(BlockKind::Data, 43, 9, 0), &mut moved, &mac)
            .is_err());
        let mut stale = b.clone();
        assert!(k
            .open(Tag::new(BlockKind::Data, 42, 8, 0), &mut stale, &mac)
            .is_err());
        let mut other_kind = b.clone();
        assert!(k
            .open(
                Tag::new(BlockKind::TreePage, 42, 9, 0),
                &mut other_kind,
                &mac
            )
            .is_err());
    }

    #[test]
    fn distinct_generations_give_distinct_ciphertexts() {
        let k = keys();
        let mut a = vec![5u8; 4096];
        let mut b = a.clone();
        k.current().seal(Tag::new(BlockKind::Data, 1, 1, 0), &mut a);
        k.current().seal(Tag::new(BlockKind::Data, 1, 2, 0), &mut b);
        assert_ne!(a, b);
    }

    /// Each key generation has its own keys: a block sealed under one does
    /// not open under another, a tag naming a generation the ring lacks
    /// fails like a wrong MAC, and retiring a generation drops its keys.
    #[test]
    fn key_generations_are_independent_and_retire() {
        let k = keys();
        let secret = MasterKey::from_bytes(zeroize::Zeroizing::new([9u8; KEY_LEN]));
        k.add_generation(1, &secret).unwrap();
        assert_eq!(k.current().key_gen(), 1);
        assert!(k.add_generation(1, &secret).is_err(), "a generation twice");
        let plain = vec![0x42u8; 4096];
        let tag1 = Tag::new(BlockKind::Data, 5, 6, 1);
        let mut b = plain.clone();
        let mac = k.current().seal(tag1, &mut b);
        let mut as0 = b.clone();
        assert!(k.open(Tag { key: 0, ..tag1 }, &mut as0, &mac).is_err());
        assert!(!k.verify(Tag { key: 7, ..tag1 }, &b, &mac));
        let mut old = plain.clone();
        let mac0 = k.get(0).unwrap().seal(Tag { key: 0, ..tag1 }, &mut old);
        assert_ne!(old, b, "two generations gave one ciphertext");
        k.retire_below(1);
        assert_eq!(k.generations(), vec![1]);
        assert!(k.open(Tag { key: 0, ..tag1 }, &mut old, &mac0).is_err());
        k.open(tag1, &mut b, &mac).unwrap();
        assert_eq!(b, plain);
    }

    #[test]
    fn other_volume_id_does_not_verify() {
        let mk = MasterKey::from_bytes(zeroize::Zeroizing::new([7u8; KEY_LEN]));
        let k1 = VolumeKeys::derive(&mk, &[1u8; 16]);
        let k2 = VolumeKeys::derive(&mk, &[2u8; 16]);
        let tag = Tag::new(BlockKind::Data, 0, 1, 0);
        let mut b = vec![3u8; 4096];
        let mac = k1.current().seal(tag, &mut b);
        assert!(k2.open(tag, &mut b, &mac).is_err());
    }

    /// However the MAC hands its input to the hasher, the MAC is BLAKE3
    /// keyed by the MAC key over ciphertext, encoded tag and volume id,
    /// as one input: checked against the one-shot function for
    /// ciphertexts that end on, and inside, a 1 KiB chunk (a summary's
    /// body is 4,080 bytes).
    #[test]
    fn mac_is_keyed_blake3_of_the_whole_input() {
        let mk = MasterKey::from_bytes(zeroize::Zeroizing::new([7u8; KEY_LEN]));
        let vid = [1u8; 16];
        let k = VolumeKeys::derive(&mk, &vid);
        let derived = keys::derived_key_bytes(&mk, &vid);
        let mac_key: [u8; 32] = derived[64..].try_into().unwrap();
        let tag = Tag::new(BlockKind::Summary, 77, 12_345, 0);
        let ct: Vec<u8> = (0..crate::BLOCK_SIZE + 100)
            .map(|i| (i * 13 % 256) as u8)
            .collect();
        for n in [
            0, 1, 31, 1000, 1023, 1024, 1025, 2048, 3000, 4080, 4095, 4096, 4097, 4196,
        ] {
            let mut input = ct[..n].to_vec();
            input.extend_from_slice(&tag.encode());
            input.extend_from_slice(&vid);
            let want = blake3::keyed_hash(&mac_key, &input);
            assert_eq!(
                k.current().mac(tag, &ct[..n]).0,
                want.as_bytes()[..MAC_LEN],
                "the MAC of {n} bytes of ciphertext"
            );
        }
    }

    /// Sealing an all-zero block must give the values that scripts/kat.py
    /// computes with an independent implementation (Python `cryptography`
    /// and `blake3`): this pins HKDF labels, the tweak layout, XTS and the
    /// MAC input, so neither a refactor nor a dependency upgrade can
    /// silently change the on-disk format.
    #[test]
    fn known_answer() {
        let k = keys();
        let mut b = vec![0u8; 4096];
        let mac = k.current().seal(Tag::new(BlockKind::Data, 0, 1, 0), &mut b);
        let head: String = b[..8].iter().map(|x| format!("{x:02x}")).collect();
        let mac_hex: String = mac.0.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            (head.as_str(), mac_hex.as_str()),
            (KAT_CT_HEAD, KAT_MAC),
            "sealing a known block changed: the on-disk format would break"
        );
    }
    const KAT_CT_HEAD: &str = "ced5095ef83a6c68";
    const KAT_MAC: &str = "0ae7532cd3f378a08e0a98fe1d2ba953";
}
