//! The volume header: plaintext, checksummed, two copies at blocks 0 and 1.

use super::{arr16, put_u32, put_u64, range, u32_at, u64_at, Block, DecodeError};
use super::{
    DATA_START, FORMAT_VERSION, HEADER_MAGIC, KEY_SLOTS, MAX_LOGICAL_BLOCKS, MAX_PBA,
    MAX_SEGMENT_BLOCKS, MIN_SEGMENT_BLOCKS,
};
use crate::crypto::{WrappedKey, WRAPPED_LEN};
use crate::BLOCK_SIZE;

// ---------------------------------------------------------------- header
//
// | off  | len | field          |
// |------|-----|----------------|
// | 0    | 8   | magic          |
// | 8    | 4   | version        |
// | 12   | 4   | flags (bit 0: erased; bit 1: restore in progress) |
// | 16   | 8   | header_seq     |
// | 24   | 16  | volume_id      |
// | 40   | 8   | logical_blocks |
// | 48   | 4   | segment_blocks |
// | 52   | 4   | reserved       |
// | 56   | 8   | max_segments   |
// | 64   | 16  | key_check      |
// | 80   | 8   | created (unix s)|
// | 88   | 8   | erased (unix s; 0 unless flag) |
// | 96   | 2   | retired below: key generations under it open nothing (version 2) |
// | 98   | 30  | reserved       |
// | 128  | 512 | 4 key slots of 128 bytes |
// | 640  | 768 | 8 key generation entries of 96 bytes (version 2) |
// | 1408 | 16  | restored from: the source volume's id (zero: not restored) |
// | 1424 | 32  | restored from: the source's export signing key |
// | 1456 | ..  | reserved (zero) |
// | 4080 | 16  | BLAKE3(bytes 0..4080)[..16] |
//
// Key generation entry: | 0 generation u16 (0 = empty) | 2 reserved[6] |
// 8 started (unix s) u64 | 16 wrapped secret[72] | 88 reserved[8] |
//
// A header is written as version 1 while it has no key generation entry
// and retires nothing (so releases before key generations still open it),
// as version 2 otherwise.

pub(super) const H_MAGIC: usize = 0;
pub(super) const H_VERSION: usize = H_MAGIC + 8;
pub(super) const H_FLAGS: usize = H_VERSION + 4;
pub(super) const H_SEQ: usize = H_FLAGS + 4;
pub(super) const H_VOLUME_ID: usize = H_SEQ + 8;
pub(super) const H_LOGICAL: usize = H_VOLUME_ID + 16;
pub(super) const H_SEGMENT_BLOCKS: usize = H_LOGICAL + 8;
pub(super) const H_MAX_SEGMENTS: usize = H_SEGMENT_BLOCKS + 4 + 4;
pub(super) const H_KCV: usize = H_MAX_SEGMENTS + 8;
pub(super) const H_CREATED: usize = H_KCV + 16;
pub(super) const H_ERASED: usize = H_CREATED + 8;
pub(super) const H_RETIRED_BELOW: usize = H_ERASED + 8;
/// Header flag: the volume was crypto-erased (`lsvfs erase`): no key slot,
/// no key-check value; nothing opens it.
pub const FLAG_ERASED: u32 = 1;
/// Header flag: `lsvfs restore` is writing this volume and has not
/// finished; nothing mounts it until it has (releases that predate the flag
/// refuse it as an unknown flag).
pub const FLAG_RESTORING: u32 = 2;
pub(super) const H_SLOTS: usize = 128;
pub(super) const SLOT_LEN: usize = 128;
pub(super) const H_KEY_GENS: usize = H_SLOTS + KEY_SLOTS * SLOT_LEN;
pub(super) const KEY_GEN_LEN: usize = 96;
/// Key generations the header can hold at once (besides generation 0).
pub const MAX_KEY_GENS: usize = 8;
/// The header version with key generations.
pub const HEADER_VERSION_KEY_GENS: u32 = 2;
/// Where a restored volume came from (`lsvfs restore`): 16 bytes of the
/// source volume's id, then its 32-byte export signing key.
pub(super) const H_RESTORED_FROM: usize = H_KEY_GENS + MAX_KEY_GENS * KEY_GEN_LEN;
pub(super) const H_CHECKSUM: usize = BLOCK_SIZE - 16;

// Key slot: | 0 kind u8 | 1 reserved[7] | 8 kek fingerprint[16] | 24 wrapped key[72] | 96 reserved[32] |
pub(super) const S_KIND: usize = 0;
pub(super) const S_FINGERPRINT: usize = 8;
pub(super) const S_WRAPPED: usize = S_FINGERPRINT + 16;

/// What unlocks a key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotKind {
    Empty = 0,
    /// A KEK held in a key file (the recovery path).
    KeyFile = 1,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    pub kind: SlotKind,
    pub fingerprint: [u8; 16],
    pub wrapped: WrappedKey,
}

impl KeySlot {
    pub const EMPTY: KeySlot = KeySlot {
        kind: SlotKind::Empty,
        fingerprint: [0; 16],
        wrapped: WrappedKey([0; WRAPPED_LEN]),
    };
}

/// A key generation after the first: its number, when it began, and its
/// secret wrapped under the volume's generation wrap key
/// ([`crate::crypto::generation_wrap_key`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyGenEntry {
    pub key_gen: u16,
    pub started: u64,
    pub wrapped: WrappedKey,
}

/// `Debug` shows the geometry and slot kinds; wrapped keys are left out.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub volume_id: [u8; 16],
    pub logical_blocks: u64,
    pub segment_blocks: u32,
    pub max_segments: u64,
    pub key_check: [u8; 16],
    pub created: u64,
    pub slots: [KeySlot; KEY_SLOTS],
    /// When the volume was crypto-erased (Unix seconds), if it was.
    pub erased: Option<u64>,
    /// `lsvfs restore` has not finished writing the volume.
    pub restoring: bool,
    /// Key generations 1 and up, ascending.
    pub key_gens: Vec<KeyGenEntry>,
    /// Key generations below it are retired: nothing they sealed opens.
    pub retired_below: u16,
    /// The volume whose exports `lsvfs restore` made this one from: an
    /// increment is applied only if that volume wrote and signed it.
    pub restored_from: Option<RestoredFrom>,
}

/// The source of a restored volume: the volume id and the export signing
/// key (Ed25519, public) its exports carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoredFrom {
    pub volume_id: [u8; 16],
    pub source_key: [u8; 32],
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("seq", &self.seq)
            .field("logical_blocks", &self.logical_blocks)
            .field("segment_blocks", &self.segment_blocks)
            .field("max_segments", &self.max_segments)
            .field(
                "slots",
                &self.slots.iter().map(|s| s.kind).collect::<Vec<_>>(),
            )
            .field(
                "key_gens",
                &self.key_gens.iter().map(|g| g.key_gen).collect::<Vec<_>>(),
            )
            .field("retired_below", &self.retired_below)
            .finish_non_exhaustive()
    }
}

/// The "restored from" record, if the bytes are not all zero.
fn restored_from(b: &Block) -> Option<RestoredFrom> {
    let r = &b[H_RESTORED_FROM..H_RESTORED_FROM + 48];
    (r != [0u8; 48]).then(|| {
        let mut source_key = [0u8; 32];
        source_key.copy_from_slice(&r[16..]);
        RestoredFrom {
            volume_id: arr16(b, H_RESTORED_FROM),
            source_key,
        }
    })
}

impl Header {
    pub fn encode(&self) -> Box<Block> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        b[H_MAGIC..H_MAGIC + 8].copy_from_slice(&HEADER_MAGIC);
        let version = if self.key_gens.is_empty() && self.retired_below == 0 {
            FORMAT_VERSION
        } else {
            HEADER_VERSION_KEY_GENS
        };
        put_u32(&mut b[..], H_VERSION, version);
        put_u32(
            &mut b[..],
            H_FLAGS,
            if self.erased.is_some() {
                FLAG_ERASED
            } else {
                0
            } | if self.restoring { FLAG_RESTORING } else { 0 },
        );
        put_u64(&mut b[..], H_SEQ, self.seq);
        b[H_VOLUME_ID..H_VOLUME_ID + 16].copy_from_slice(&self.volume_id);
        put_u64(&mut b[..], H_LOGICAL, self.logical_blocks);
        put_u32(&mut b[..], H_SEGMENT_BLOCKS, self.segment_blocks);
        put_u64(&mut b[..], H_MAX_SEGMENTS, self.max_segments);
        b[H_KCV..H_KCV + 16].copy_from_slice(&self.key_check);
        put_u64(&mut b[..], H_CREATED, self.created);
        put_u64(&mut b[..], H_ERASED, self.erased.unwrap_or(0));
        for (i, s) in self.slots.iter().enumerate() {
            let o = H_SLOTS + i * SLOT_LEN;
            b[o + S_KIND] = s.kind as u8;
            b[o + S_FINGERPRINT..o + S_FINGERPRINT + 16].copy_from_slice(&s.fingerprint);
            b[o + S_WRAPPED..o + S_WRAPPED + WRAPPED_LEN].copy_from_slice(&s.wrapped.0);
        }
        b[H_RETIRED_BELOW..H_RETIRED_BELOW + 2].copy_from_slice(&self.retired_below.to_le_bytes());
        for (i, g) in self.key_gens.iter().take(MAX_KEY_GENS).enumerate() {
            let o = H_KEY_GENS + i * KEY_GEN_LEN;
            b[o..o + 2].copy_from_slice(&g.key_gen.to_le_bytes());
            put_u64(&mut b[..], o + 8, g.started);
            b[o + 16..o + 16 + WRAPPED_LEN].copy_from_slice(&g.wrapped.0);
        }
        if let Some(r) = &self.restored_from {
            b[H_RESTORED_FROM..H_RESTORED_FROM + 16].copy_from_slice(&r.volume_id);
            b[H_RESTORED_FROM + 16..H_RESTORED_FROM + 48].copy_from_slice(&r.source_key);
        }
        let sum = blake3::hash(&b[..H_CHECKSUM]);
        b[H_CHECKSUM..].copy_from_slice(&sum.as_bytes()[..16]);
        b
    }

    pub fn decode(b: &Block) -> Result<Header, DecodeError> {
        if b[H_MAGIC..H_MAGIC + 8] != HEADER_MAGIC {
            return Err(DecodeError::Magic("volume"));
        }
        let version = u32_at(b, H_VERSION);
        if !(FORMAT_VERSION..=HEADER_VERSION_KEY_GENS).contains(&version) {
            return Err(DecodeError::Version {
                want: HEADER_VERSION_KEY_GENS,
                have: version,
            });
        }
        if blake3::hash(&b[..H_CHECKSUM]).as_bytes()[..16] != b[H_CHECKSUM..] {
            return Err(DecodeError::Checksum);
        }
        let flags = u32_at(b, H_FLAGS);
        range(
            "flags",
            flags as u64,
            flags & !(FLAG_ERASED | FLAG_RESTORING) == 0,
        )?;
        let logical_blocks = u64_at(b, H_LOGICAL);
        range(
            "logical_blocks",
            logical_blocks,
            logical_blocks > 0 && logical_blocks <= MAX_LOGICAL_BLOCKS,
        )?;
        let segment_blocks = u32_at(b, H_SEGMENT_BLOCKS);
        range(
            "segment_blocks",
            segment_blocks as u64,
            segment_blocks.is_power_of_two()
                && (MIN_SEGMENT_BLOCKS..=MAX_SEGMENT_BLOCKS).contains(&segment_blocks),
        )?;
        let max_segments = u64_at(b, H_MAX_SEGMENTS);
        range(
            "max_segments",
            max_segments,
            max_segments >= 4
                && max_segments
                    .checked_mul(segment_blocks as u64)
                    .and_then(|n| n.checked_add(DATA_START))
                    .is_some_and(|end| end <= MAX_PBA),
        )?;
        let mut slots = [KeySlot::EMPTY; KEY_SLOTS];
        for (i, slot) in slots.iter_mut().enumerate() {
            let o = H_SLOTS + i * SLOT_LEN;
            let kind = match b[o + S_KIND] {
                0 => SlotKind::Empty,
                1 => SlotKind::KeyFile,
                k => {
                    return Err(DecodeError::Range {
                        field: "key slot kind",
                        value: k as u64,
                    })
                }
            };
            let mut wrapped = [0u8; WRAPPED_LEN];
            wrapped.copy_from_slice(&b[o + S_WRAPPED..o + S_WRAPPED + WRAPPED_LEN]);
            *slot = KeySlot {
                kind,
                fingerprint: arr16(b, o + S_FINGERPRINT),
                wrapped: WrappedKey(wrapped),
            };
        }
        let mut key_gens: Vec<KeyGenEntry> = Vec::new();
        let mut retired_below = 0;
        if version >= HEADER_VERSION_KEY_GENS {
            retired_below = u16::from_le_bytes([b[H_RETIRED_BELOW], b[H_RETIRED_BELOW + 1]]);
            for i in 0..MAX_KEY_GENS {
                let o = H_KEY_GENS + i * KEY_GEN_LEN;
                let key_gen = u16::from_le_bytes([b[o], b[o + 1]]);
                if key_gen == 0 {
                    continue;
                }
                range(
                    "key generation order",
                    key_gen as u64,
                    key_gens.last().is_none_or(|l| l.key_gen < key_gen),
                )?;
                let mut wrapped = [0u8; WRAPPED_LEN];
                wrapped.copy_from_slice(&b[o + 16..o + 16 + WRAPPED_LEN]);
                key_gens.push(KeyGenEntry {
                    key_gen,
                    started: u64_at(b, o + 8),
                    wrapped: WrappedKey(wrapped),
                });
            }
            // Generation 0 derives from the master key: it can be retired,
            // never listed. Every listed one at or above the retirement.
            let newest = key_gens.last().map_or(0, |g| g.key_gen);
            range(
                "retired key generations",
                retired_below as u64,
                retired_below <= newest && key_gens.iter().all(|g| g.key_gen >= retired_below),
            )?;
        }
        let erased = (flags & FLAG_ERASED != 0).then(|| u64_at(b, H_ERASED));
        if erased.is_some() {
            // An erased header carries no key material at all.
            let keyless = b[H_KCV..H_KCV + 16] == [0; 16]
                && slots.iter().all(|s| *s == KeySlot::EMPTY)
                && key_gens.is_empty();
            range("erased header key material", 1, keyless)?;
        }
        Ok(Header {
            erased,
            restoring: flags & FLAG_RESTORING != 0,
            seq: u64_at(b, H_SEQ),
            volume_id: arr16(b, H_VOLUME_ID),
            logical_blocks,
            segment_blocks,
            max_segments,
            key_check: arr16(b, H_KCV),
            created: u64_at(b, H_CREATED),
            slots,
            key_gens,
            retired_below,
            restored_from: restored_from(b),
        })
    }

    /// BLAKE3 of the fields that fix the volume's layout. The checkpoint,
    /// which is MAC'd, carries it: the header itself has only a checksum.
    pub fn geometry_digest(&self) -> [u8; 16] {
        let mut h = blake3::Hasher::new();
        h.update(b"lsvfs v1 geometry");
        h.update(&self.volume_id);
        h.update(&self.logical_blocks.to_le_bytes());
        h.update(&self.segment_blocks.to_le_bytes());
        h.update(&self.max_segments.to_le_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    /// One past the last block the volume may ever use.
    pub fn end_block(&self) -> u64 {
        DATA_START + self.max_segments * self.segment_blocks as u64
    }
}
