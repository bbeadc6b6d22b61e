//! Checkpoints: the authenticated roots of the volume, in two slots.

use super::{arr16, put_u32, put_u64, range, u32_at, u64_at, Block, DecodeError, Header, TreePtr};
use super::{
    CHECKPOINT_MAGIC, CHECKPOINT_REKEY_POLICY, CHECKPOINT_SNAPSHOTS, CHECKPOINT_VERSION,
    DATA_START, FORMAT_VERSION, TREE_PTR_LEN,
};
use crate::crypto::{Mac, MAC_LEN};
use crate::volume::{Generation, SegmentId};
use crate::BLOCK_SIZE;

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
// | 340  | 8   | rekey after this many seconds of a key generation (0: the default, 120 days; 2^64-1: never) (version 4) |
// | 348  | 8   | rekey after this many bytes sealed under a key generation (0: no limit) (version 4) |
// | 356  | 8   | blocks sealed under the current key generation (version 4) |
// | 364  | ..  | reserved (zero) |
// | 4080 | 16  | MAC over bytes 0..4080 |

pub(super) const C_MAGIC: usize = 0;
pub(super) const C_VERSION: usize = C_MAGIC + 8;
pub(super) const C_VOLUME_ID: usize = C_VERSION + 4 + 4;
pub(super) const C_SEQ: usize = C_VOLUME_ID + 16;
pub(super) const C_NEXT_RECORD: usize = C_SEQ + 8;
pub(super) const C_HEAD_SEGMENT: usize = C_NEXT_RECORD + 8;
pub(super) const C_HEAD_OFFSET: usize = C_HEAD_SEGMENT + 8;
pub(super) const C_NEXT_SEGMENT: usize = C_HEAD_OFFSET + 4 + 4;
pub(super) const C_ANCHOR: usize = C_NEXT_SEGMENT + 8;
pub(super) const C_GEN_LIMIT: usize = C_ANCHOR + 16;
pub(super) const C_EXTENT: usize = C_GEN_LIMIT + 8;
pub(super) const C_ALLOCATED: usize = C_EXTENT + 8;
pub(super) const C_CHANGED_SINCE: usize = C_ALLOCATED + 8;
pub(super) const C_KEY_GEN: usize = C_CHANGED_SINCE + 8;
pub(super) const C_ROOTS: usize = C_KEY_GEN + 4 + 4;
pub(super) const C_GEOMETRY: usize = C_ROOTS + 5 * TREE_PTR_LEN;
pub(super) const C_SNAP_META: usize = C_GEOMETRY + 16;
pub(super) const C_SNAP_PAGES: usize = C_SNAP_META + TREE_PTR_LEN;
pub(super) const C_REKEY_AFTER_SECS: usize = C_SNAP_PAGES + 4;
pub(super) const C_REKEY_AFTER_BYTES: usize = C_REKEY_AFTER_SECS + 8;
pub(super) const C_SEALED_BLOCKS: usize = C_REKEY_AFTER_BYTES + 8;
pub const CHECKPOINT_MAC_AT: usize = BLOCK_SIZE - MAC_LEN;

/// Position of the log head: where the next record goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPos {
    pub seq: u64,
    pub segment: SegmentId,
    pub offset: u32,
    pub next_segment: SegmentId,
    pub anchor: Mac,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub log: LogPos,
    pub gen_limit: Generation,
    pub extent: u64,
    pub allocated: u64,
    pub changed_since: u64,
    pub key_gen: u32,
    pub roots: [TreePtr; 5],
    /// First page of the snapshot metadata chain (absent: no snapshots and
    /// no blocks held for them).
    pub snap_meta: TreePtr,
    pub snap_pages: u32,
    /// Rekey after this many seconds of a key generation (0: the default;
    /// `u64::MAX`: never).
    pub rekey_after_secs: u64,
    /// Rekey after this many bytes sealed under a key generation (0: no limit).
    pub rekey_after_bytes: u64,
    /// Blocks sealed under the current key generation.
    pub sealed_blocks: u64,
}

impl Checkpoint {
    /// The key generation a checkpoint block names (which keys its MAC is
    /// checked with), read before the MAC is.
    pub fn peek_key_gen(b: &Block) -> u16 {
        u32_at(b, C_KEY_GEN).min(u16::MAX as u32) as u16
    }

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
        put_u64(&mut b[..], C_HEAD_SEGMENT, self.log.segment.0);
        put_u32(&mut b[..], C_HEAD_OFFSET, self.log.offset);
        put_u64(&mut b[..], C_NEXT_SEGMENT, self.log.next_segment.0);
        b[C_ANCHOR..C_ANCHOR + 16].copy_from_slice(&self.log.anchor.0);
        put_u64(&mut b[..], C_GEN_LIMIT, self.gen_limit.0);
        put_u64(&mut b[..], C_EXTENT, self.extent);
        put_u64(&mut b[..], C_ALLOCATED, self.allocated);
        put_u64(&mut b[..], C_CHANGED_SINCE, self.changed_since);
        put_u32(&mut b[..], C_KEY_GEN, self.key_gen);
        for (i, r) in self.roots.iter().enumerate() {
            r.encode(&mut b[C_ROOTS + i * TREE_PTR_LEN..]);
        }
        self.snap_meta.encode(&mut b[C_SNAP_META..]);
        put_u32(&mut b[..], C_SNAP_PAGES, self.snap_pages);
        put_u64(&mut b[..], C_REKEY_AFTER_SECS, self.rekey_after_secs);
        put_u64(&mut b[..], C_REKEY_AFTER_BYTES, self.rekey_after_bytes);
        put_u64(&mut b[..], C_SEALED_BLOCKS, self.sealed_blocks);
        b
    }

    /// Decodes a checkpoint whose MAC the caller has verified, and checks
    /// every field against the header's geometry.
    pub fn decode(b: &Block, header: &Header) -> Result<Checkpoint, DecodeError> {
        if b[C_MAGIC..C_MAGIC + 8] != CHECKPOINT_MAGIC {
            return Err(DecodeError::Magic("checkpoint"));
        }
        let version = u32_at(b, C_VERSION);
        if !(FORMAT_VERSION..=CHECKPOINT_VERSION).contains(&version) {
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
            segment: SegmentId(u64_at(b, C_HEAD_SEGMENT)),
            offset: u32_at(b, C_HEAD_OFFSET),
            next_segment: SegmentId(u64_at(b, C_NEXT_SEGMENT)),
            anchor: Mac(arr16(b, C_ANCHOR)),
        };
        range(
            "head segment",
            log.segment.0,
            log.segment.0 < header.max_segments,
        )?;
        range("head offset", log.offset as u64, (log.offset as u64) <= seg)?;
        range(
            "next segment",
            log.next_segment.0,
            log.next_segment.0 < header.max_segments && log.next_segment != log.segment,
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
        let (snap_meta, snap_pages) = if version >= CHECKPOINT_SNAPSHOTS {
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
        let (rekey_after_secs, rekey_after_bytes, sealed_blocks) =
            if version >= CHECKPOINT_REKEY_POLICY {
                (
                    u64_at(b, C_REKEY_AFTER_SECS),
                    u64_at(b, C_REKEY_AFTER_BYTES),
                    u64_at(b, C_SEALED_BLOCKS),
                )
            } else {
                (0, 0, 0)
            };
        Ok(Checkpoint {
            rekey_after_secs,
            rekey_after_bytes,
            sealed_blocks,
            snap_meta,
            snap_pages,
            seq: u64_at(b, C_SEQ),
            log,
            gen_limit: Generation(u64_at(b, C_GEN_LIMIT)),
            extent,
            allocated,
            changed_since: u64_at(b, C_CHANGED_SINCE),
            key_gen: u32_at(b, C_KEY_GEN),
            roots,
        })
    }
}
