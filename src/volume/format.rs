//! On-disk structures of a volume, encoded and decoded explicitly (little
//! endian). docs/FORMAT.md is the byte-by-byte specification; the offset
//! constants here follow it, each derived from the one before.
//!
//! ```text
//! block 0, 1      header copies A and B           (plaintext, checksummed)
//! block 2, 3      checkpoint slots 0 and 1        (plaintext, keyed MAC)
//! block 4..256    reserved, zero
//! block 256..     segments of `segment_blocks` blocks, the log
//! ```
//!
//! Decoding never panics: every input is a fixed 4096-byte array and every
//! field is range-checked before use.

use crate::crypto::{Mac, WrappedKey, MAC_LEN, WRAPPED_LEN};
use crate::BLOCK_SIZE;

/// The format version of the header (and of checkpoints before snapshots).
pub const FORMAT_VERSION: u32 = 1;
/// The checkpoint version this code writes: version 1 plus the snapshot
/// metadata pointer. Version 1 checkpoints are read as "no snapshots".
pub const CHECKPOINT_VERSION: u32 = 2;

pub const HEADER_MAGIC: [u8; 8] = *b"LSVFS\0VH";
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"LSVFS\0CP";
pub const SUMMARY_MAGIC: [u8; 8] = *b"LSVFS\0LG";

/// Block addresses of the fixed region.
pub const HEADER_BLOCKS: [u64; 2] = [0, 1];
pub const CHECKPOINT_BLOCKS: [u64; 2] = [2, 3];
/// First block of segment 0 (1 MiB into the device).
pub const DATA_START: u64 = 256;

pub const MIN_SEGMENT_BLOCKS: u32 = 16;
pub const MAX_SEGMENT_BLOCKS: u32 = 16384;
pub const DEFAULT_SEGMENT_BLOCKS: u32 = 1024;
/// Largest logical size: 2^40 blocks (4 PiB).
pub const MAX_LOGICAL_BLOCKS: u64 = 1 << 40;
/// Largest physical block address a map entry can hold (48 bits).
pub const MAX_PBA: u64 = (1 << 48) - 1;
pub const KEY_SLOTS: usize = 4;

pub type Block = [u8; BLOCK_SIZE];

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}
fn arr16(b: &[u8], off: usize) -> [u8; 16] {
    b[off..off + 16].try_into().expect("16 bytes")
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Why a structure failed to decode. The caller adds where it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic (this is not an lsvfs {0})")]
    Magic(&'static str),
    #[error("unsupported format version: want={want} have={have}")]
    Version { want: u32, have: u32 },
    #[error("checksum mismatch")]
    Checksum,
    #[error("MAC mismatch")]
    Mac,
    #[error("field {field} is out of range ({value})")]
    Range { field: &'static str, value: u64 },
    #[error("the header's geometry does not match the authenticated checkpoint (the header was altered)")]
    Geometry,
}

fn range(field: &'static str, value: u64, ok: bool) -> Result<(), DecodeError> {
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Range { field, value })
    }
}

// ---------------------------------------------------------------- header
//
// | off  | len | field          |
// |------|-----|----------------|
// | 0    | 8   | magic          |
// | 8    | 4   | version        |
// | 12   | 4   | flags (0)      |
// | 16   | 8   | header_seq     |
// | 24   | 16  | volume_id      |
// | 40   | 8   | logical_blocks |
// | 48   | 4   | segment_blocks |
// | 52   | 4   | reserved       |
// | 56   | 8   | max_segments   |
// | 64   | 16  | key_check      |
// | 80   | 8   | created (unix s)|
// | 88   | 40  | reserved       |
// | 128  | 512 | 4 key slots of 128 bytes |
// | 640  | ..  | reserved (zero) |
// | 4080 | 16  | BLAKE3(bytes 0..4080)[..16] |

const H_MAGIC: usize = 0;
const H_VERSION: usize = H_MAGIC + 8;
const H_FLAGS: usize = H_VERSION + 4;
const H_SEQ: usize = H_FLAGS + 4;
const H_VOLUME_ID: usize = H_SEQ + 8;
const H_LOGICAL: usize = H_VOLUME_ID + 16;
const H_SEGMENT_BLOCKS: usize = H_LOGICAL + 8;
const H_MAX_SEGMENTS: usize = H_SEGMENT_BLOCKS + 4 + 4;
const H_KCV: usize = H_MAX_SEGMENTS + 8;
const H_CREATED: usize = H_KCV + 16;
const H_SLOTS: usize = 128;
const SLOT_LEN: usize = 128;
const H_CHECKSUM: usize = BLOCK_SIZE - 16;

// Key slot: | 0 kind u8 | 1 reserved[7] | 8 kek fingerprint[16] | 24 wrapped key[72] | 96 reserved[32] |
const S_KIND: usize = 0;
const S_FINGERPRINT: usize = 8;
const S_WRAPPED: usize = S_FINGERPRINT + 16;

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
        put_u32(&mut b[..], H_FLAGS, 0);
        put_u64(&mut b[..], H_SEQ, self.seq);
        b[H_VOLUME_ID..H_VOLUME_ID + 16].copy_from_slice(&self.volume_id);
        put_u64(&mut b[..], H_LOGICAL, self.logical_blocks);
        put_u32(&mut b[..], H_SEGMENT_BLOCKS, self.segment_blocks);
        put_u64(&mut b[..], H_MAX_SEGMENTS, self.max_segments);
        b[H_KCV..H_KCV + 16].copy_from_slice(&self.key_check);
        put_u64(&mut b[..], H_CREATED, self.created);
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
        range("flags", flags as u64, flags == 0)?;
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
        Ok(Header {
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

// ---------------------------------------------------------------- tree pointer
//
// | 0 pba u64 | 8 gen u64 | 16 mac [16] |   (32 bytes; pba 0 = absent, an all-zero page)

pub const TREE_PTR_LEN: usize = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreePtr {
    pub pba: u64,
    pub gen: u64,
    pub mac: Mac,
}

impl TreePtr {
    pub const ABSENT: TreePtr = TreePtr {
        pba: 0,
        gen: 0,
        mac: Mac([0; MAC_LEN]),
    };

    pub fn is_absent(&self) -> bool {
        self.pba == 0
    }

    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, self.pba);
        put_u64(out, 8, self.gen);
        out[16..32].copy_from_slice(&self.mac.0);
    }

    pub fn decode(b: &[u8]) -> TreePtr {
        TreePtr {
            pba: u64_at(b, 0),
            gen: u64_at(b, 8),
            mac: Mac(arr16(b, 16)),
        }
    }
}

// ---------------------------------------------------------------- map entry
//
// | 0 loc u64: pba (bits 0..48) | key generation (bits 48..64) | 8 gen u64 | 16 mac [16] |
// loc 0 = unmapped (reads as zeros).

pub const MAP_ENTRY_LEN: usize = 32;
pub const MAP_ENTRIES_PER_PAGE: usize = BLOCK_SIZE / MAP_ENTRY_LEN;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapEntry {
    pub pba: u64,
    pub key_gen: u16,
    pub gen: u64,
    pub mac: Mac,
}

impl MapEntry {
    pub fn is_mapped(&self) -> bool {
        self.pba != 0
    }

    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, (self.pba & MAX_PBA) | ((self.key_gen as u64) << 48));
        put_u64(out, 8, self.gen);
        out[16..32].copy_from_slice(&self.mac.0);
    }

    pub fn decode(b: &[u8]) -> MapEntry {
        let loc = u64_at(b, 0);
        MapEntry {
            pba: loc & MAX_PBA,
            key_gen: (loc >> 48) as u16,
            gen: u64_at(b, 8),
            mac: Mac(arr16(b, 16)),
        }
    }
}

// ---------------------------------------------------------------- checkpoint
//
// | off  | len | field |
// |------|-----|-------|
// | 0    | 8   | magic |
// | 8    | 4   | version |
// | 12   | 4   | reserved |
// | 16   | 16  | volume_id |
// | 32   | 8   | checkpoint seq |
// | 40   | 8   | log: next record seq |
// | 48   | 8   | log: head segment |
// | 56   | 4   | log: head block offset in segment |
// | 60   | 4   | reserved |
// | 64   | 8   | log: next segment (pre-chosen) |
// | 72   | 16  | log: MAC of the last record summary (chain anchor) |
// | 88   | 8   | gen_limit: every generation in use is below it |
// | 96   | 8   | extent: segments ever written (the file's used length) |
// | 104  | 8   | allocated logical blocks |
// | 112  | 8   | changed_since: checkpoint seq when the changed bitmap was reset |
// | 120  | 4   | current key generation |
// | 124  | 4   | reserved |
// | 128  | 160 | tree roots: map, allocated, changed, key-gen, segment usage (5 x 32) |
// | 288  | 16  | geometry digest: binds the header's geometry to this MAC'd block |
// | 304  | 32  | snapshot metadata: first page of the chain (version 2; absent if none) |
// | 336  | 4   | snapshot metadata: pages in the chain |
// | 340  | ..  | reserved (zero) |
// | 4080 | 16  | MAC over bytes 0..4080 |

const C_MAGIC: usize = 0;
const C_VERSION: usize = C_MAGIC + 8;
const C_VOLUME_ID: usize = C_VERSION + 4 + 4;
const C_SEQ: usize = C_VOLUME_ID + 16;
const C_NEXT_RECORD: usize = C_SEQ + 8;
const C_HEAD_SEGMENT: usize = C_NEXT_RECORD + 8;
const C_HEAD_OFFSET: usize = C_HEAD_SEGMENT + 8;
const C_NEXT_SEGMENT: usize = C_HEAD_OFFSET + 4 + 4;
const C_ANCHOR: usize = C_NEXT_SEGMENT + 8;
const C_GEN_LIMIT: usize = C_ANCHOR + 16;
const C_EXTENT: usize = C_GEN_LIMIT + 8;
const C_ALLOCATED: usize = C_EXTENT + 8;
const C_CHANGED_SINCE: usize = C_ALLOCATED + 8;
const C_KEY_GEN: usize = C_CHANGED_SINCE + 8;
const C_ROOTS: usize = C_KEY_GEN + 4 + 4;
const C_GEOMETRY: usize = C_ROOTS + 5 * TREE_PTR_LEN;
const C_SNAP_META: usize = C_GEOMETRY + 16;
const C_SNAP_PAGES: usize = C_SNAP_META + TREE_PTR_LEN;
pub const CHECKPOINT_MAC_AT: usize = BLOCK_SIZE - MAC_LEN;

/// The metadata trees. The discriminant is the on-disk tree id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TreeId {
    /// Logical block -> (location, generation, MAC).
    Map = 0,
    /// One bit per logical block: mapped.
    Allocated = 1,
    /// One bit per logical block: written or trimmed since `changed_since`.
    Changed = 2,
    /// One bit per logical block: the low bit of the key generation that sealed it.
    KeyGen = 3,
    /// Live block count per segment (u32 each).
    SegmentUsage = 4,
    /// Not a tree: the chain of snapshot metadata pages (see `snapshot.rs`).
    /// Its pages are sealed and logged like tree pages.
    SnapMeta = 5,
}

pub const TREES: [TreeId; 5] = [
    TreeId::Map,
    TreeId::Allocated,
    TreeId::Changed,
    TreeId::KeyGen,
    TreeId::SegmentUsage,
];

impl TreeId {
    pub fn from_u8(v: u8) -> Option<TreeId> {
        if v == TreeId::SnapMeta as u8 {
            return Some(TreeId::SnapMeta);
        }
        TREES.get(v as usize).copied()
    }
}

/// Position of the log head: where the next record goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPos {
    pub seq: u64,
    pub segment: u64,
    pub offset: u32,
    pub next_segment: u64,
    pub anchor: Mac,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub log: LogPos,
    pub gen_limit: u64,
    pub extent: u64,
    pub allocated: u64,
    pub changed_since: u64,
    pub key_gen: u32,
    pub roots: [TreePtr; 5],
    /// First page of the snapshot metadata chain (absent: no snapshots and
    /// no blocks held for them).
    pub snap_meta: TreePtr,
    pub snap_pages: u32,
}

impl Checkpoint {
    /// Encodes everything but the MAC, which the caller fills in at
    /// [`CHECKPOINT_MAC_AT`] over the bytes before it.
    pub fn encode_body(&self, header: &Header) -> Box<Block> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        b[C_MAGIC..C_MAGIC + 8].copy_from_slice(&CHECKPOINT_MAGIC);
        put_u32(&mut b[..], C_VERSION, CHECKPOINT_VERSION);
        b[C_VOLUME_ID..C_VOLUME_ID + 16].copy_from_slice(&header.volume_id);
        b[C_GEOMETRY..C_GEOMETRY + 16].copy_from_slice(&header.geometry_digest());
        put_u64(&mut b[..], C_SEQ, self.seq);
        put_u64(&mut b[..], C_NEXT_RECORD, self.log.seq);
        put_u64(&mut b[..], C_HEAD_SEGMENT, self.log.segment);
        put_u32(&mut b[..], C_HEAD_OFFSET, self.log.offset);
        put_u64(&mut b[..], C_NEXT_SEGMENT, self.log.next_segment);
        b[C_ANCHOR..C_ANCHOR + 16].copy_from_slice(&self.log.anchor.0);
        put_u64(&mut b[..], C_GEN_LIMIT, self.gen_limit);
        put_u64(&mut b[..], C_EXTENT, self.extent);
        put_u64(&mut b[..], C_ALLOCATED, self.allocated);
        put_u64(&mut b[..], C_CHANGED_SINCE, self.changed_since);
        put_u32(&mut b[..], C_KEY_GEN, self.key_gen);
        for (i, r) in self.roots.iter().enumerate() {
            r.encode(&mut b[C_ROOTS + i * TREE_PTR_LEN..]);
        }
        self.snap_meta.encode(&mut b[C_SNAP_META..]);
        put_u32(&mut b[..], C_SNAP_PAGES, self.snap_pages);
        b
    }

    /// Decodes a checkpoint whose MAC the caller has verified, and checks
    /// every field against the header's geometry.
    pub fn decode(b: &Block, header: &Header) -> Result<Checkpoint, DecodeError> {
        if b[C_MAGIC..C_MAGIC + 8] != CHECKPOINT_MAGIC {
            return Err(DecodeError::Magic("checkpoint"));
        }
        let version = u32_at(b, C_VERSION);
        if version != FORMAT_VERSION && version != CHECKPOINT_VERSION {
            return Err(DecodeError::Version {
                want: CHECKPOINT_VERSION,
                have: version,
            });
        }
        if arr16(b, C_VOLUME_ID) != header.volume_id
            || arr16(b, C_GEOMETRY) != header.geometry_digest()
        {
            return Err(DecodeError::Geometry);
        }
        let seg = header.segment_blocks as u64;
        let log = LogPos {
            seq: u64_at(b, C_NEXT_RECORD),
            segment: u64_at(b, C_HEAD_SEGMENT),
            offset: u32_at(b, C_HEAD_OFFSET),
            next_segment: u64_at(b, C_NEXT_SEGMENT),
            anchor: Mac(arr16(b, C_ANCHOR)),
        };
        range(
            "head segment",
            log.segment,
            log.segment < header.max_segments,
        )?;
        range("head offset", log.offset as u64, (log.offset as u64) <= seg)?;
        range(
            "next segment",
            log.next_segment,
            log.next_segment < header.max_segments && log.next_segment != log.segment,
        )?;
        let extent = u64_at(b, C_EXTENT);
        range("extent", extent, extent <= header.max_segments)?;
        let allocated = u64_at(b, C_ALLOCATED);
        range("allocated", allocated, allocated <= header.logical_blocks)?;
        let mut roots = [TreePtr::ABSENT; 5];
        for (i, r) in roots.iter_mut().enumerate() {
            *r = TreePtr::decode(&b[C_ROOTS + i * TREE_PTR_LEN..]);
            range(
                "tree root",
                r.pba,
                r.is_absent() || (r.pba >= DATA_START && r.pba < header.end_block()),
            )?;
        }
        // Version 1 checkpoints predate snapshots: those bytes were reserved.
        let (snap_meta, snap_pages) = if version == CHECKPOINT_VERSION {
            (TreePtr::decode(&b[C_SNAP_META..]), u32_at(b, C_SNAP_PAGES))
        } else {
            (TreePtr::ABSENT, 0)
        };
        range(
            "snapshot metadata",
            snap_meta.pba,
            (snap_meta.is_absent() && snap_pages == 0)
                || (!snap_meta.is_absent()
                    && snap_pages > 0
                    && (snap_pages as u64) < header.end_block()
                    && snap_meta.pba >= DATA_START
                    && snap_meta.pba < header.end_block()),
        )?;
        Ok(Checkpoint {
            snap_meta,
            snap_pages,
            seq: u64_at(b, C_SEQ),
            log,
            gen_limit: u64_at(b, C_GEN_LIMIT),
            extent,
            allocated,
            changed_since: u64_at(b, C_CHANGED_SINCE),
            key_gen: u32_at(b, C_KEY_GEN),
            roots,
        })
    }
}

// ---------------------------------------------------------------- log record summary
//
// A record is one summary block followed by `n_payload` payload blocks,
// all inside one segment. The summary's plaintext head says where it is
// and links it to its predecessor; its body (the entries) is encrypted.
//
// | off  | len  | field |
// |------|------|-------|
// | 0    | 8    | magic |
// | 8    | 8    | record seq |
// | 16   | 8    | gen (tweak of the body) |
// | 24   | 8    | segment of this record |
// | 32   | 8    | next segment (pre-chosen) |
// | 40   | 4    | block offset of this record in its segment |
// | 44   | 2    | n_payload |
// | 46   | 2    | n_other (entries without payload) |
// | 48   | 4    | flags (bit 0: COMMIT, ends a transaction) |
// | 52   | 4    | reserved |
// | 56   | 16   | MAC of the previous record's summary (hash chain) |
// | 72   | 8    | reserved |
// | 80   | 4000 | body: 100 entries of 40 bytes, encrypted (XTS, tweak from gen) |
// | 4080 | 16   | MAC over bytes 0..4080 (body as ciphertext) |
//
// Entry: | 0 kind u8 | 1 tree u8 | 2 reserved u16 | 4 count u32 | 8 addr u64 | 16 gen u64 | 24 mac [16] |

const R_MAGIC: usize = 0;
const R_SEQ: usize = R_MAGIC + 8;
const R_GEN: usize = R_SEQ + 8;
const R_SEGMENT: usize = R_GEN + 8;
const R_NEXT_SEGMENT: usize = R_SEGMENT + 8;
const R_OFFSET: usize = R_NEXT_SEGMENT + 8;
const R_N_PAYLOAD: usize = R_OFFSET + 4;
const R_N_OTHER: usize = R_N_PAYLOAD + 2;
const R_FLAGS: usize = R_N_OTHER + 2;
const R_PREV: usize = R_FLAGS + 4 + 4;
pub const SUMMARY_BODY_AT: usize = R_PREV + 16 + 8;
pub const SUMMARY_MAC_AT: usize = BLOCK_SIZE - MAC_LEN;
pub const ENTRY_LEN: usize = 40;
pub const ENTRIES_PER_RECORD: usize = (SUMMARY_MAC_AT - SUMMARY_BODY_AT) / ENTRY_LEN;

pub const FLAG_COMMIT: u32 = 1;

/// What a record entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A new version of logical block `lba`, in the payload.
    Write { lba: u64, gen: u64, mac: Mac },
    /// A copy, made by the cleaner, of the version `gen` of `lba`, in the payload.
    Relocate { lba: u64, gen: u64, mac: Mac },
    /// A page of a metadata tree, in the payload (written by a checkpoint).
    TreePage {
        tree: TreeId,
        level: u8,
        index: u64,
        gen: u64,
        mac: Mac,
    },
    /// `count` logical blocks from `lba` are unmapped. No payload.
    Trim { lba: u64, count: u32 },
}

impl Entry {
    pub fn has_payload(&self) -> bool {
        !matches!(self, Entry::Trim { .. })
    }

    fn encode(&self, out: &mut [u8]) {
        let (kind, tree, count, addr, gen, mac) = match *self {
            Entry::Write { lba, gen, mac } => (1u8, 0u8, 0u32, lba, gen, mac),
            Entry::Trim { lba, count } => (2, 0, count, lba, 0, Mac::default()),
            Entry::TreePage {
                tree,
                level,
                index,
                gen,
                mac,
            } => (3, tree as u8, 0, page_addr(tree, level, index), gen, mac),
            Entry::Relocate { lba, gen, mac } => (4, 0, 0, lba, gen, mac),
        };
        out[0] = kind;
        out[1] = tree;
        put_u32(out, 4, count);
        put_u64(out, 8, addr);
        put_u64(out, 16, gen);
        out[24..40].copy_from_slice(&mac.0);
    }

    fn decode(b: &[u8], logical_blocks: u64) -> Result<Entry, DecodeError> {
        let count = u32_at(b, 4);
        let addr = u64_at(b, 8);
        let gen = u64_at(b, 16);
        let mac = Mac(arr16(b, 24));
        let lba_ok = |lba: u64, n: u64| {
            range(
                "entry lba",
                lba,
                lba.checked_add(n).is_some_and(|e| e <= logical_blocks),
            )
        };
        Ok(match b[0] {
            1 => {
                lba_ok(addr, 1)?;
                Entry::Write {
                    lba: addr,
                    gen,
                    mac,
                }
            }
            2 => {
                lba_ok(addr, count as u64)?;
                Entry::Trim { lba: addr, count }
            }
            3 => {
                let tree = TreeId::from_u8(b[1]).ok_or(DecodeError::Range {
                    field: "entry tree",
                    value: b[1] as u64,
                })?;
                Entry::TreePage {
                    tree,
                    level: (addr >> 48) as u8,
                    index: addr & ((1 << 48) - 1),
                    gen,
                    mac,
                }
            }
            4 => {
                lba_ok(addr, 1)?;
                Entry::Relocate {
                    lba: addr,
                    gen,
                    mac,
                }
            }
            k => {
                return Err(DecodeError::Range {
                    field: "entry kind",
                    value: k as u64,
                })
            }
        })
    }
}

/// The address a tree page is sealed under: tree (8 bits), level (8), index (48).
pub fn page_addr(tree: TreeId, level: u8, index: u64) -> u64 {
    ((tree as u64) << 56) | ((level as u64) << 48) | (index & ((1 << 48) - 1))
}

/// The plaintext head of a summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryHead {
    pub seq: u64,
    pub gen: u64,
    pub segment: u64,
    pub next_segment: u64,
    pub offset: u32,
    pub n_payload: u16,
    pub n_other: u16,
    pub flags: u32,
    pub prev: Mac,
}

impl SummaryHead {
    pub fn commit(&self) -> bool {
        self.flags & FLAG_COMMIT != 0
    }

    /// Writes the head into `b` (body and MAC are the caller's).
    pub fn encode(&self, b: &mut Block) {
        b[R_MAGIC..R_MAGIC + 8].copy_from_slice(&SUMMARY_MAGIC);
        put_u64(b, R_SEQ, self.seq);
        put_u64(b, R_GEN, self.gen);
        put_u64(b, R_SEGMENT, self.segment);
        put_u64(b, R_NEXT_SEGMENT, self.next_segment);
        put_u32(b, R_OFFSET, self.offset);
        put_u16(b, R_N_PAYLOAD, self.n_payload);
        put_u16(b, R_N_OTHER, self.n_other);
        put_u32(b, R_FLAGS, self.flags);
        b[R_PREV..R_PREV + 16].copy_from_slice(&self.prev.0);
    }

    /// Decodes the head and checks it fits `header`'s geometry. The MAC is
    /// checked by the caller.
    pub fn decode(b: &Block, header: &Header) -> Result<SummaryHead, DecodeError> {
        if b[R_MAGIC..R_MAGIC + 8] != SUMMARY_MAGIC {
            return Err(DecodeError::Magic("log record"));
        }
        let h = SummaryHead {
            seq: u64_at(b, R_SEQ),
            gen: u64_at(b, R_GEN),
            segment: u64_at(b, R_SEGMENT),
            next_segment: u64_at(b, R_NEXT_SEGMENT),
            offset: u32_at(b, R_OFFSET),
            n_payload: u16_at(b, R_N_PAYLOAD),
            n_other: u16_at(b, R_N_OTHER),
            flags: u32_at(b, R_FLAGS),
            prev: Mac(arr16(b, R_PREV)),
        };
        let seg = header.segment_blocks as u64;
        range("record segment", h.segment, h.segment < header.max_segments)?;
        range(
            "record next segment",
            h.next_segment,
            h.next_segment < header.max_segments,
        )?;
        range(
            "record size",
            h.n_payload as u64,
            (h.n_payload as usize + h.n_other as usize) <= ENTRIES_PER_RECORD
                && h.offset as u64 + 1 + h.n_payload as u64 <= seg,
        )?;
        range("record flags", h.flags as u64, h.flags & !FLAG_COMMIT == 0)?;
        Ok(h)
    }
}

/// Writes the entries into a summary body (plaintext, before encryption).
pub fn encode_entries(entries: &[Entry], b: &mut Block) {
    for (i, e) in entries.iter().enumerate() {
        let o = SUMMARY_BODY_AT + i * ENTRY_LEN;
        e.encode(&mut b[o..o + ENTRY_LEN]);
    }
}

/// Reads `n` entries from a decrypted summary body. Payload entries must
/// come first, exactly `n_payload` of them.
pub fn decode_entries(
    b: &Block,
    head: &SummaryHead,
    logical_blocks: u64,
) -> Result<Vec<Entry>, DecodeError> {
    let n = head.n_payload as usize + head.n_other as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let o = SUMMARY_BODY_AT + i * ENTRY_LEN;
        let e = Entry::decode(&b[o..o + ENTRY_LEN], logical_blocks)?;
        if e.has_payload() != (i < head.n_payload as usize) {
            return Err(DecodeError::Range {
                field: "entry order",
                value: i as u64,
            });
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            seq: 1,
            volume_id: [3; 16],
            logical_blocks: 1 << 20,
            segment_blocks: 1024,
            max_segments: 2000,
            key_check: [4; 16],
            created: 5,
            slots: [KeySlot::EMPTY; KEY_SLOTS],
        }
    }

    #[test]
    fn header_round_trip_and_checksum() {
        let h = header();
        let mut b = h.encode();
        assert!(Header::decode(&b).unwrap() == h);
        b[100] ^= 1;
        assert_eq!(Header::decode(&b).err(), Some(DecodeError::Checksum));
    }

    #[test]
    fn header_rejects_foreign_and_future() {
        let mut b = header().encode();
        b[8] = 9;
        assert!(matches!(
            Header::decode(&b),
            Err(DecodeError::Version { want: 1, have: 9 })
        ));
        let zero = [0u8; BLOCK_SIZE];
        assert_eq!(
            Header::decode(&zero).err(),
            Some(DecodeError::Magic("volume"))
        );
    }

    #[test]
    fn offsets_match_the_spec() {
        // These numbers are the tables in docs/FORMAT.md.
        assert_eq!((H_KCV, H_CREATED, H_SLOTS), (64, 80, 128));
        assert_eq!(
            (C_ANCHOR, C_GEN_LIMIT, C_ROOTS, C_GEOMETRY),
            (72, 88, 128, 288)
        );
        assert_eq!((R_PREV, SUMMARY_BODY_AT, ENTRIES_PER_RECORD), (56, 80, 100));
    }

    #[test]
    fn entries_round_trip() {
        let es = [
            Entry::Write {
                lba: 7,
                gen: 8,
                mac: Mac([1; 16]),
            },
            Entry::Relocate {
                lba: 9,
                gen: 10,
                mac: Mac([2; 16]),
            },
            Entry::TreePage {
                tree: TreeId::Changed,
                level: 2,
                index: 77,
                gen: 3,
                mac: Mac([5; 16]),
            },
            Entry::Trim {
                lba: 100,
                count: 50,
            },
        ];
        let mut b = [0u8; BLOCK_SIZE];
        encode_entries(&es, &mut b);
        let head = SummaryHead {
            seq: 1,
            gen: 1,
            segment: 0,
            next_segment: 1,
            offset: 0,
            n_payload: 3,
            n_other: 1,
            flags: 0,
            prev: Mac::default(),
        };
        assert_eq!(decode_entries(&b, &head, 1 << 20).unwrap(), es);
        // A trim running past the end of the volume is rejected.
        assert!(decode_entries(&b, &head, 120).is_err());
    }
}
