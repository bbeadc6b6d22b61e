//! Transactions: groups of block writes and trims applied all-or-nothing.

use crate::volume::Lba;

/// Largest number of blocks one transaction may write (64 MiB).
pub const MAX_TXN_BLOCKS: u64 = 16384;

/// Blocks [`Volume::trim`] unmaps per transaction: 128 MiB, whose map
/// entries fill 256 leaf pages.
pub const TRIM_CHUNK_BLOCKS: u64 = 128 * 256;

/// A group of block writes and trims, applied all-or-nothing, in order.
#[derive(Default, Clone)]
pub struct Transaction {
    pub(super) ops: Vec<Op>,
}

#[derive(Clone)]
pub(super) enum Op {
    Write { lba: Lba, data: Vec<u8> },
    Trim { lba: Lba, count: u64 },
    Zero { lba: Lba, count: u64 },
}

impl Transaction {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `data` (a whole number of blocks) starting at `lba`.
    pub fn write(&mut self, lba: Lba, data: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Write { lba, data });
        self
    }

    /// Unmaps `count` blocks from `lba`; they read as zeros afterwards.
    pub fn trim(&mut self, lba: Lba, count: u64) -> &mut Self {
        self.ops.push(Op::Trim { lba, count });
        self
    }

    /// Makes `count` blocks from `lba` read as zeros while staying
    /// allocated, without writing or encrypting anything: they take no log
    /// space until written (a preallocated or zeroed range).
    pub fn zero(&mut self, lba: Lba, count: u64) -> &mut Self {
        self.ops.push(Op::Zero { lba, count });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Adds `other`'s writes and trims after this one's.
    pub fn append(&mut self, mut other: Transaction) {
        self.ops.append(&mut other.ops);
    }

    /// The writes, as (first block, data), if the transaction holds
    /// nothing else; else the transaction itself, unchanged.
    pub fn into_writes(self) -> std::result::Result<Vec<(Lba, Vec<u8>)>, Transaction> {
        if !self.ops.iter().all(|o| matches!(o, Op::Write { .. })) {
            return Err(self);
        }
        Ok(self
            .ops
            .into_iter()
            .filter_map(|o| match o {
                Op::Write { lba, data } => Some((lba, data)),
                _ => None,
            })
            .collect())
    }
}
