//! AES-256-XTS (IEEE 1619) over whole blocks, with the block cipher's
//! parallel path.
//!
//! xts-mode encrypts a sector one 16-byte piece at a time: each AES call
//! waits for the one before, and with the CPU's AES instructions found at
//! run time (a portable binary) every call also goes through the `aes`
//! crate's dispatch. Here the tweaks of all pieces of a block are computed
//! first (the tweak of piece j+1 is the tweak of piece j times x in
//! GF(2^128), as in the standard), the pieces are masked with them, and one
//! `encrypt_blocks` call lets the `aes` crate run 8 or more pieces at once
//! (AES-NI or VAES, chosen at run time). The result is the same XTS, byte
//! for byte: the tests compare every output with xts-mode's, on random keys,
//! tweaks and data, and with the IEEE 1619 test vectors.
//!
//! Block lengths here are always a multiple of 16 (lsvfs blocks are 4 KiB),
//! so ciphertext stealing never applies; other lengths panic.
//!
//! xts-mode also runs in production, as the reference: once per process
//! the fast path is checked against it on a fixed key and block, and if
//! they ever differ (a miscompiled or misdetected AES path) every key uses
//! xts-mode instead, slower but right, and the log says so.

use std::sync::OnceLock;

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::Aes256;
use lsvfs_keyserver::secret::scrub_stack_small;
use xts_mode::Xts128;

/// Pieces (16 bytes each) processed per batch: 256 make one 4 KiB block.
const BATCH: usize = 256;

/// One AES-256-XTS key pair, expanded: the data key and the tweak key,
/// and the same pair for the reference implementation.
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
    reference: Xts128<Aes256>,
    fast: bool,
}

/// Whether the fast path computes what xts-mode computes (checked once per
/// process, on a fixed key and block, in both directions).
pub fn fast_path_agrees() -> bool {
    static AGREES: OnceLock<bool> = OnceLock::new();
    *AGREES.get_or_init(|| {
        let k = |b: u8| Aes256::new_from_slice(&[b; 32]).expect("32-byte key");
        let fast = Xts {
            data: k(0x5a),
            tweak: k(0xa5),
            reference: Xts128::new(k(0x5a), k(0xa5)),
            fast: true,
        };
        let plain: Vec<u8> = (0..crate::BLOCK_SIZE)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let tweak = [0x3c; 16];
        let (mut a, mut b) = (plain.clone(), plain.clone());
        fast.run(&mut a, tweak, true);
        fast.reference.encrypt_sector(&mut b, Array::from(tweak));
        let mut back = a.clone();
        fast.run(&mut back, tweak, false);
        let agrees = a == b && back == plain;
        if !agrees {
            tracing::error!(
                "the fast AES-XTS path disagrees with the reference implementation on this \
                 machine; using the reference (slower) for every key"
            );
        }
        agrees
    })
}

/// Multiplies a tweak by x in GF(2^128), little-endian as XTS defines it.
#[inline(always)]
fn times_x(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

impl Xts {
    pub fn new(data: Aes256, tweak: Aes256) -> Xts {
        Xts {
            reference: Xts128::new(data.clone(), tweak.clone()),
            data,
            tweak,
            fast: fast_path_agrees(),
        }
    }

    fn mask(buf: &mut [u8], tweaks: &[u128]) {
        for (piece, t) in buf.chunks_exact_mut(16).zip(tweaks) {
            let v = u128::from_le_bytes(piece.try_into().expect("16 bytes")) ^ t;
            piece.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Runs the data key over `buf` (whole 16-byte pieces) between two
    /// maskings with the tweaks of its pieces; the first is `tweak`
    /// encrypted under the tweak key.
    ///
    /// It leaves the cipher's stack to its caller to clear. With VAES
    /// (AVX-512 or AVX2) the `aes` crate copies the whole key schedule into
    /// its own frame for every call (each round key broadcast to every
    /// lane; the first two round keys of AES-256 are the key itself) and
    /// leaves it there, for a core dump or a later stack or heap reuse to
    /// find. The cipher runs in frames of its own, below the caller's, so
    /// one [`scrub_stack_small`] by the caller after its last block clears
    /// what every call left.
    fn run(&self, buf: &mut [u8], tweak: [u8; 16], encrypt: bool) {
        assert!(
            buf.len() % 16 == 0 && !buf.is_empty(),
            "XTS here takes whole 16-byte pieces, not {} bytes",
            buf.len()
        );
        let mut t = self.first_tweak(tweak);
        let mut tweaks = [0u128; BATCH];
        for chunk in buf.chunks_mut(BATCH * 16) {
            let n = chunk.len() / 16;
            for slot in tweaks[..n].iter_mut() {
                *slot = t;
                t = times_x(t);
            }
            Self::mask(chunk, &tweaks[..n]);
            self.cipher(chunk, encrypt);
            Self::mask(chunk, &tweaks[..n]);
        }
    }

    /// The tweak of a data unit's first piece: `tweak` under the tweak key.
    #[inline(never)]
    fn first_tweak(&self, tweak: [u8; 16]) -> u128 {
        let mut t = Array::from(tweak);
        self.tweak.encrypt_block(&mut t);
        u128::from_le_bytes(t.into())
    }

    /// The data key over whole pieces, 8 or more at once.
    #[inline(never)]
    fn cipher(&self, chunk: &mut [u8], encrypt: bool) {
        let (pieces, _) = Array::slice_as_chunks_mut(chunk);
        if encrypt {
            self.data.encrypt_blocks(pieces);
        } else {
            self.data.decrypt_blocks(pieces);
        }
    }

    /// Encrypts `buf` in place as one XTS data unit with `tweak` (the data
    /// unit's number, before encryption under the tweak key).
    pub fn encrypt(&self, buf: &mut [u8], tweak: [u8; 16]) {
        self.encrypt_in_batch(buf, tweak);
        scrub_stack_small();
    }

    /// Decrypts `buf` in place; the inverse of [`Xts::encrypt`].
    pub fn decrypt(&self, buf: &mut [u8], tweak: [u8; 16]) {
        self.decrypt_in_batch(buf, tweak);
        scrub_stack_small();
    }

    /// [`Xts::encrypt`] without clearing the stack after: for one block
    /// of a batch, whose caller calls [`scrub_stack_small`] once after the
    /// last (clearing the stack after every 4 KiB block took 5-8% of a
    /// seal's time).
    pub fn encrypt_in_batch(&self, buf: &mut [u8], tweak: [u8; 16]) {
        if self.fast {
            self.run(buf, tweak, true);
        } else {
            self.reference.encrypt_sector(buf, Array::from(tweak));
        }
    }

    /// [`Xts::decrypt`] without clearing the stack after (see
    /// [`Xts::encrypt_in_batch`]).
    pub fn decrypt_in_batch(&self, buf: &mut [u8], tweak: [u8; 16]) {
        if self.fast {
            self.run(buf, tweak, false);
        } else {
            self.reference.decrypt_sector(buf, Array::from(tweak));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fast_path_agrees_with_the_reference_here() {
        assert!(fast_path_agrees());
        let k = Aes256::new_from_slice(&[1; 32]).unwrap();
        assert!(Xts::new(k.clone(), k).fast);
    }

    fn pair(key: &[u8; 64]) -> (Xts, xts_mode::Xts128<Aes256>) {
        let k = |r: std::ops::Range<usize>| Aes256::new_from_slice(&key[r]).unwrap();
        (
            Xts::new(k(0..32), k(32..64)),
            xts_mode::Xts128::new(k(0..32), k(32..64)),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Byte for byte what xts-mode computes, for 4 KiB blocks and for
        /// any whole number of pieces, in both directions.
        #[test]
        fn same_as_xts_mode(
            key in prop::array::uniform32(any::<u8>()).prop_flat_map(|a| {
                prop::array::uniform32(any::<u8>()).prop_map(move |b| {
                    let mut k = [0u8; 64];
                    k[..32].copy_from_slice(&a);
                    k[32..].copy_from_slice(&b);
                    k
                })
            }),
            tweak in prop::array::uniform16(any::<u8>()),
            pieces in prop_oneof![Just(256usize), 1usize..600],
            seed in any::<u64>(),
        ) {
            let (ours, reference) = pair(&key);
            let mut rng = seed;
            let plain: Vec<u8> = (0..pieces * 16)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let mut a = plain.clone();
            let mut b = plain.clone();
            ours.encrypt(&mut a, tweak);
            reference.encrypt_sector(&mut b, Array::from(tweak));
            prop_assert_eq!(&a, &b);
            ours.decrypt(&mut a, tweak);
            prop_assert_eq!(&a, &plain);
        }
    }

    /// IEEE 1619-2007 Annex B, vector 10: AES-256 keys, data unit 0xff, 512
    /// bytes 00..ff twice. The first 16 bytes of ciphertext are the
    /// standard's; the last 16 were computed with Python's `cryptography`
    /// (OpenSSL), an implementation independent of both Rust crates.
    #[test]
    fn ieee_1619_vector_10() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&hex(
            "2718281828459045235360287471352662497757247093699959574966967627",
        ));
        key[32..].copy_from_slice(&hex(
            "3141592653589793238462643383279502884197169399375105820974944592",
        ));
        let (ours, _) = pair(&key);
        let mut tweak = [0u8; 16];
        tweak[0] = 0xff;
        let mut data: Vec<u8> = (0..512).map(|i| i as u8).collect();
        ours.encrypt(&mut data, tweak);
        assert_eq!(data[..16], hex("1c3b3a102f770386e4836c99e370cf9b")[..]);
        assert_eq!(data[496..], hex("c4f36ffda9fcea70b9c6e693e148c151")[..]);
    }

    #[test]
    #[should_panic(expected = "whole 16-byte pieces")]
    fn partial_pieces_are_refused() {
        let (ours, _) = pair(&[7u8; 64]);
        ours.encrypt(&mut [0u8; 20], [0; 16]);
    }
}
