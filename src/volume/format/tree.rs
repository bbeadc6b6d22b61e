//! Pointers into the metadata trees, block-map entries, and tree ids.

use super::{arr16, put_u64, u64_at, MAX_PBA};
use crate::crypto::{Mac, MAC_LEN};
use crate::volume::Generation;
use crate::BLOCK_SIZE;

// ---------------------------------------------------------------- tree pointer
//
// | 0 loc u64: pba (bits 0..48) | key generation (bits 48..64) | 8 gen u64 | 16 mac [16] |
// (32 bytes; pba 0 = absent, an all-zero page)

pub const TREE_PTR_LEN: usize = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreePtr {
    pub pba: u64,
    /// The key generation the page is sealed under.
    pub key_gen: u16,
    pub gen: Generation,
    pub mac: Mac,
}

impl TreePtr {
    pub const ABSENT: TreePtr = TreePtr {
        pba: 0,
        key_gen: 0,
        gen: Generation(0),
        mac: Mac([0; MAC_LEN]),
    };

    pub fn is_absent(&self) -> bool {
        self.pba == 0
    }

    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, (self.pba & MAX_PBA) | ((self.key_gen as u64) << 48));
        put_u64(out, 8, self.gen.0);
        out[16..32].copy_from_slice(&self.mac.0);
    }

    pub fn decode(b: &[u8]) -> TreePtr {
        let loc = u64_at(b, 0);
        TreePtr {
            pba: loc & MAX_PBA,
            key_gen: (loc >> 48) as u16,
            gen: Generation(u64_at(b, 8)),
            mac: Mac(arr16(b, 16)),
        }
    }
}

// ---------------------------------------------------------------- map entry
//
// | 0 loc u64: pba (bits 0..48) | key generation (bits 48..64) | 8 gen u64 | 16 mac [16] |
// loc 0 = unmapped (reads as zeros). pba ZERO_PBA = allocated but stored
// nowhere: reads as zeros, counts as allocated, holds no log space
// (checkpoint version 3).

/// The location of a block that is allocated and reads as zeros without
/// being stored (a zeroed, or preallocated, block).
pub const ZERO_PBA: u64 = MAX_PBA;

pub const MAP_ENTRY_LEN: usize = 32;
pub const MAP_ENTRIES_PER_PAGE: usize = BLOCK_SIZE / MAP_ENTRY_LEN;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapEntry {
    pub pba: u64,
    pub key_gen: u16,
    pub gen: Generation,
    pub mac: Mac,
}

impl MapEntry {
    /// A zeroed block: allocated, stored nowhere.
    pub const ZEROED: MapEntry = MapEntry {
        pba: ZERO_PBA,
        key_gen: 0,
        gen: Generation(0),
        mac: Mac([0; MAC_LEN]),
    };

    /// Allocated: stored, or zeroed.
    pub fn is_mapped(&self) -> bool {
        self.pba != 0
    }

    /// Zeroed: allocated, reading as zeros, stored nowhere.
    pub fn is_zeroed(&self) -> bool {
        self.pba == ZERO_PBA
    }

    /// Stored in the log: a block with a location, generation and MAC.
    pub fn is_stored(&self) -> bool {
        self.pba != 0 && self.pba != ZERO_PBA
    }

    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, (self.pba & MAX_PBA) | ((self.key_gen as u64) << 48));
        put_u64(out, 8, self.gen.0);
        out[16..32].copy_from_slice(&self.mac.0);
    }

    pub fn decode(b: &[u8]) -> MapEntry {
        let loc = u64_at(b, 0);
        MapEntry {
            pba: loc & MAX_PBA,
            key_gen: (loc >> 48) as u16,
            gen: Generation(u64_at(b, 8)),
            mac: Mac(arr16(b, 16)),
        }
    }
}

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

/// The address a tree page is sealed under: tree (8 bits), level (8), index (48).
pub fn page_addr(tree: TreeId, level: u8, index: u64) -> u64 {
    ((tree as u64) << 56) | ((level as u64) << 48) | (index & ((1 << 48) - 1))
}
