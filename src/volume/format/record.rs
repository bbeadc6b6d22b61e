//! Log records: a summary block (plaintext head, encrypted entries) and
//! its payload blocks.

use super::{
    arr16, put_u16, put_u32, put_u64, range, u16_at, u32_at, u64_at, Block, DecodeError, Header,
};
use super::{page_addr, TreeId, SUMMARY_MAGIC};
use crate::crypto::{Mac, MAC_LEN};
use crate::volume::{Generation, Lba, SegmentId};
use crate::BLOCK_SIZE;

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
// | 52   | 2    | key generation sealing this summary |
// | 54   | 2    | reserved |
// | 56   | 16   | MAC of the previous record's summary (hash chain) |
// | 72   | 8    | reserved |
// | 80   | 4000 | body: 100 entries of 40 bytes, encrypted (XTS, tweak from gen) |
// | 4080 | 16   | MAC over bytes 0..4080 (body as ciphertext) |
//
// Entry: | 0 kind u8 | 1 tree u8 | 2 key generation u16 (payload entries) | 4 count u32 | 8 addr u64 | 16 gen u64 | 24 mac [16] |

pub(super) const R_MAGIC: usize = 0;
pub(super) const R_SEQ: usize = R_MAGIC + 8;
pub(super) const R_GEN: usize = R_SEQ + 8;
pub(super) const R_SEGMENT: usize = R_GEN + 8;
pub(super) const R_NEXT_SEGMENT: usize = R_SEGMENT + 8;
pub(super) const R_OFFSET: usize = R_NEXT_SEGMENT + 8;
pub(super) const R_N_PAYLOAD: usize = R_OFFSET + 4;
pub(super) const R_N_OTHER: usize = R_N_PAYLOAD + 2;
pub(super) const R_FLAGS: usize = R_N_OTHER + 2;
pub(super) const R_KEY_GEN: usize = R_FLAGS + 4;
pub(super) const R_PREV: usize = R_KEY_GEN + 2 + 2;
pub const SUMMARY_BODY_AT: usize = R_PREV + 16 + 8;
pub const SUMMARY_MAC_AT: usize = BLOCK_SIZE - MAC_LEN;
pub const ENTRY_LEN: usize = 40;
pub const ENTRIES_PER_RECORD: usize = (SUMMARY_MAC_AT - SUMMARY_BODY_AT) / ENTRY_LEN;

pub const FLAG_COMMIT: u32 = 1;

/// What a record entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A new version of logical block `lba`, in the payload, sealed under
    /// key generation `key_gen`.
    Write {
        lba: Lba,
        gen: Generation,
        key_gen: u16,
        mac: Mac,
    },
    /// A copy of the version `gen` of `lba`, in the payload: moved by the
    /// cleaner (same key generation, same MAC), or sealed again under a
    /// newer key generation by a rekey.
    Relocate {
        lba: Lba,
        gen: Generation,
        key_gen: u16,
        mac: Mac,
    },
    /// A page of a metadata tree, in the payload (written by a checkpoint).
    TreePage {
        tree: TreeId,
        level: u8,
        index: u64,
        gen: Generation,
        key_gen: u16,
        mac: Mac,
    },
    /// `count` logical blocks from `lba` are unmapped. No payload.
    Trim { lba: Lba, count: u32 },
    /// `count` logical blocks from `lba` become zeroed: allocated, reading
    /// as zeros, stored nowhere (checkpoint version 3). No payload.
    Zero { lba: Lba, count: u32 },
}

impl Entry {
    pub fn has_payload(&self) -> bool {
        !matches!(self, Entry::Trim { .. } | Entry::Zero { .. })
    }

    fn encode(&self, out: &mut [u8]) {
        let (kind, tree, key_gen, count, addr, gen, mac) = match *self {
            Entry::Write {
                lba,
                gen,
                key_gen,
                mac,
            } => (1u8, 0u8, key_gen, 0u32, lba.0, gen.0, mac),
            Entry::Trim { lba, count } => (2, 0, 0, count, lba.0, 0, Mac::default()),
            Entry::Zero { lba, count } => (5, 0, 0, count, lba.0, 0, Mac::default()),
            Entry::TreePage {
                tree,
                level,
                index,
                gen,
                key_gen,
                mac,
            } => (
                3,
                tree as u8,
                key_gen,
                0,
                page_addr(tree, level, index),
                gen.0,
                mac,
            ),
            Entry::Relocate {
                lba,
                gen,
                key_gen,
                mac,
            } => (4, 0, key_gen, 0, lba.0, gen.0, mac),
        };
        out[0] = kind;
        out[1] = tree;
        put_u16(out, 2, key_gen);
        put_u32(out, 4, count);
        put_u64(out, 8, addr);
        put_u64(out, 16, gen);
        out[24..40].copy_from_slice(&mac.0);
    }

    fn decode(b: &[u8], logical_blocks: u64) -> Result<Entry, DecodeError> {
        let key_gen = u16_at(b, 2);
        let count = u32_at(b, 4);
        let addr = u64_at(b, 8);
        let gen = Generation(u64_at(b, 16));
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
                    lba: Lba(addr),
                    gen,
                    key_gen,
                    mac,
                }
            }
            2 => {
                lba_ok(addr, count as u64)?;
                Entry::Trim {
                    lba: Lba(addr),
                    count,
                }
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
                    key_gen,
                    mac,
                }
            }
            4 => {
                lba_ok(addr, 1)?;
                Entry::Relocate {
                    lba: Lba(addr),
                    gen,
                    key_gen,
                    mac,
                }
            }
            5 => {
                lba_ok(addr, count as u64)?;
                Entry::Zero {
                    lba: Lba(addr),
                    count,
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

/// The plaintext head of a summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryHead {
    pub seq: u64,
    pub gen: Generation,
    pub segment: SegmentId,
    pub next_segment: SegmentId,
    pub offset: u32,
    pub n_payload: u16,
    pub n_other: u16,
    pub flags: u32,
    /// The key generation sealing the summary.
    pub key_gen: u16,
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
        put_u64(b, R_GEN, self.gen.0);
        put_u64(b, R_SEGMENT, self.segment.0);
        put_u64(b, R_NEXT_SEGMENT, self.next_segment.0);
        put_u32(b, R_OFFSET, self.offset);
        put_u16(b, R_N_PAYLOAD, self.n_payload);
        put_u16(b, R_N_OTHER, self.n_other);
        put_u32(b, R_FLAGS, self.flags);
        put_u16(b, R_KEY_GEN, self.key_gen);
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
            gen: Generation(u64_at(b, R_GEN)),
            segment: SegmentId(u64_at(b, R_SEGMENT)),
            next_segment: SegmentId(u64_at(b, R_NEXT_SEGMENT)),
            offset: u32_at(b, R_OFFSET),
            n_payload: u16_at(b, R_N_PAYLOAD),
            n_other: u16_at(b, R_N_OTHER),
            flags: u32_at(b, R_FLAGS),
            key_gen: u16_at(b, R_KEY_GEN),
            prev: Mac(arr16(b, R_PREV)),
        };
        let seg = header.segment_blocks as u64;
        range(
            "record segment",
            h.segment.0,
            h.segment.0 < header.max_segments,
        )?;
        range(
            "record next segment",
            h.next_segment.0,
            h.next_segment.0 < header.max_segments,
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
