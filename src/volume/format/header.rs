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
// | 96   | 32  | reserved       |
// | 128  | 512 | 4 key slots of 128 bytes |
// | 640  | ..  | reserved (zero) |
// | 4080 | 16  | BLAKE3(bytes 0..4080)[..16] |

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
/// Header flag: the volume was crypto-erased (`lsvfs erase`): no key slot,
/// no key-check value; nothing opens it.
pub const FLAG_ERASED: u32 = 1;
/// Header flag: `lsvfs restore` is writing this volume and has not
/// finished; nothing mounts it until it has (releases that predate the flag
/// refuse it as an unknown flag).
pub const FLAG_RESTORING: u32 = 2;
pub(super) const H_SLOTS: usize = 128;
pub(super) const SLOT_LEN: usize = 128;
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
            .finish_non_exhaustive()
    }
}

impl Header {
    pub fn encode(&self) -> Box<Block> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        b[H_MAGIC..H_MAGIC + 8].copy_from_slice(&HEADER_MAGIC);
        put_u32(&mut b[..], H_VERSION, FORMAT_VERSION);
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
        let sum = blake3::hash(&b[..H_CHECKSUM]);
        b[H_CHECKSUM..].copy_from_slice(&sum.as_bytes()[..16]);
        b
    }

    pub fn decode(b: &Block) -> Result<Header, DecodeError> {
        if b[H_MAGIC..H_MAGIC + 8] != HEADER_MAGIC {
            return Err(DecodeError::Magic("volume"));
        }
        let version = u32_at(b, H_VERSION);
        if version != FORMAT_VERSION {
            return Err(DecodeError::Version {
                want: FORMAT_VERSION,
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
        let erased = (flags & FLAG_ERASED != 0).then(|| u64_at(b, H_ERASED));
        if erased.is_some() {
            // An erased header carries no key material at all.
            let keyless =
                b[H_KCV..H_KCV + 16] == [0; 16] && slots.iter().all(|s| *s == KeySlot::EMPTY);
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
