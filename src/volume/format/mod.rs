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

use crate::BLOCK_SIZE;

mod checkpoint;
mod header;
mod record;
mod snapmeta;
mod tree;

pub use checkpoint::{Checkpoint, LogPos, CHECKPOINT_MAC_AT};
pub use header::{Header, KeyGenEntry, KeySlot, RestoredFrom, SlotKind, MAX_KEY_GENS};
pub use record::{
    decode_entries, encode_entries, Entry, SummaryHead, ENTRIES_PER_RECORD, ENTRY_LEN, FLAG_COMMIT,
    SUMMARY_BODY_AT, SUMMARY_MAC_AT,
};
pub use snapmeta::{
    check_snapshot_name, SnapMeta, SnapRecord, LEAF_PAYLOAD, MAX_SNAPSHOTS, MAX_SNAPSHOT_ID,
    SNAPSHOT_NAME_MAX,
};
pub use tree::{
    page_addr, MapEntry, TreeId, TreePtr, MAP_ENTRIES_PER_PAGE, MAP_ENTRY_LEN, TREES, TREE_PTR_LEN,
    ZERO_PBA,
};

/// The format version of the header (and of checkpoints before snapshots).
pub const FORMAT_VERSION: u32 = 1;
/// The checkpoint version this code writes. Version 2 added the snapshot
/// metadata pointer (version 1 checkpoints are read as "no snapshots");
/// version 3 adds zeroed blocks (map entries at [`ZERO_PBA`], log entry
/// kind 5), which earlier code cannot read; version 4 the rekey policy and
/// the count of blocks sealed under the current key generation (read as the
/// default policy and 0 from older ones). All four are read.
pub const CHECKPOINT_VERSION: u32 = 4;
/// The first checkpoint version with the rekey policy.
pub const CHECKPOINT_REKEY_POLICY: u32 = 4;
/// The first checkpoint version with the snapshot metadata pointer.
pub const CHECKPOINT_SNAPSHOTS: u32 = 2;

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

pub(super) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(super) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
pub(super) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}
pub(super) fn arr16(b: &[u8], off: usize) -> [u8; 16] {
    b[off..off + 16].try_into().expect("16 bytes")
}
pub(super) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(super) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
pub(super) fn put_u16(b: &mut [u8], off: usize, v: u16) {
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

pub(super) fn range(field: &'static str, value: u64, ok: bool) -> Result<(), DecodeError> {
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Range { field, value })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::checkpoint::{C_ANCHOR, C_GEN_LIMIT, C_GEOMETRY, C_ROOTS};
    use super::header::{H_CREATED, H_ERASED, H_FLAGS, H_KCV, H_SLOTS};
    use super::record::R_PREV;
    use super::*;
    use crate::crypto::Mac;
    use crate::volume::{Generation, Lba, SegmentId};

    /// A header for tests of what reads one.
    pub(crate) fn header() -> Header {
        Header {
            seq: 1,
            volume_id: [3; 16],
            logical_blocks: 1 << 20,
            segment_blocks: 1024,
            max_segments: 2000,
            key_check: [4; 16],
            created: 5,
            slots: [KeySlot::EMPTY; KEY_SLOTS],
            erased: None,
            restoring: false,
            key_gens: Vec::new(),
            retired_below: 0,
            restored_from: None,
        }
    }

    /// A restored volume's source round-trips at bytes 1408..1456 and
    /// leaves the version at 1 (releases before it ignore those bytes).
    #[test]
    fn the_restored_from_record_round_trips_in_a_version_1_header() {
        let r = RestoredFrom {
            volume_id: [7; 16],
            source_key: [9; 32],
        };
        let h = Header {
            restored_from: Some(r),
            ..header()
        };
        let b = h.encode();
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1);
        assert_eq!(&b[1408..1424], &[7; 16]);
        assert_eq!(&b[1424..1456], &[9; 32]);
        assert!(Header::decode(&b).unwrap() == h);
        assert_eq!(
            Header::decode(&header().encode()).unwrap().restored_from,
            None
        );
    }

    /// Key generations make a version 2 header that round-trips; a header
    /// without them stays version 1; disorder and retiring more than exists
    /// are refused.
    #[test]
    fn key_generations_round_trip_in_a_version_2_header() {
        let b = header().encode();
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1);
        let entry = |k: u16| KeyGenEntry {
            key_gen: k,
            started: 1_800_000_000 + k as u64,
            wrapped: crate::crypto::WrappedKey([k as u8; crate::crypto::WRAPPED_LEN]),
        };
        let h = Header {
            key_gens: vec![entry(1), entry(2)],
            retired_below: 1,
            ..header()
        };
        let b = h.encode();
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 2);
        assert!(Header::decode(&b).unwrap() == h);
        let bad = Header {
            key_gens: vec![entry(2), entry(1)],
            ..header()
        };
        assert!(Header::decode(&bad.encode()).is_err(), "out of order");
        let bad = Header {
            key_gens: vec![entry(1)],
            retired_below: 2,
            ..header()
        };
        assert!(Header::decode(&bad.encode()).is_err(), "retires the newest");
        let erased = Header {
            key_check: [0; 16],
            erased: Some(1),
            key_gens: vec![entry(1)],
            ..header()
        };
        assert!(
            Header::decode(&erased.encode()).is_err(),
            "an erased header keeps a generation's secret"
        );
    }

    #[test]
    fn an_erased_header_round_trips_and_carries_no_key_material() {
        let erased = Header {
            key_check: [0; 16],
            erased: Some(1_800_000_000),
            restoring: false,
            ..header()
        };
        let b = erased.encode();
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 1);
        assert!(Header::decode(&b).unwrap() == erased);
        // The flag with a key-check value or a slot left is refused.
        let mut leaky = erased.clone();
        leaky.key_check = [4; 16];
        assert!(Header::decode(&leaky.encode()).is_err());
        let mut leaky = erased;
        leaky.slots[2].kind = SlotKind::KeyFile;
        assert!(Header::decode(&leaky.encode()).is_err());
        // The restoring flag round-trips; any other flag is refused.
        let restoring = Header {
            restoring: true,
            ..header()
        };
        let b = restoring.encode();
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 2);
        assert!(Header::decode(&b).unwrap() == restoring);
        let mut b = header().encode();
        b[H_FLAGS] = 4;
        let sum = blake3::hash(&b[..BLOCK_SIZE - 16]);
        b[BLOCK_SIZE - 16..].copy_from_slice(&sum.as_bytes()[..16]);
        assert!(matches!(
            Header::decode(&b),
            Err(DecodeError::Range { field: "flags", .. })
        ));
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
            Err(DecodeError::Version { want: 2, have: 9 })
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
        assert_eq!(
            (H_FLAGS, H_KCV, H_CREATED, H_ERASED, H_SLOTS),
            (12, 64, 80, 88, 128)
        );
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
                lba: Lba(7),
                gen: Generation(8),
                key_gen: 0,
                mac: Mac([1; 16]),
            },
            Entry::Relocate {
                lba: Lba(9),
                gen: Generation(10),
                key_gen: 3,
                mac: Mac([2; 16]),
            },
            Entry::TreePage {
                tree: TreeId::Changed,
                level: 2,
                index: 77,
                gen: Generation(3),
                key_gen: 65535,
                mac: Mac([5; 16]),
            },
            Entry::Trim {
                lba: Lba(100),
                count: 50,
            },
        ];
        let mut b = [0u8; BLOCK_SIZE];
        encode_entries(&es, &mut b);
        let head = SummaryHead {
            seq: 1,
            gen: Generation(1),
            segment: SegmentId(0),
            next_segment: SegmentId(1),
            offset: 0,
            n_payload: 3,
            n_other: 1,
            flags: 0,
            key_gen: 1,
            prev: Mac::default(),
        };
        assert_eq!(decode_entries(&b, &head, 1 << 20).unwrap(), es);
        // A trim running past the end of the volume is rejected.
        assert!(decode_entries(&b, &head, 120).is_err());
    }
}
