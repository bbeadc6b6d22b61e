//! What the parts of an open volume's state borrow from the volume: the
//! device, the keys, the header and the crypto engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use super::format::{self, Block, Entry, Header, MapEntry, TreeId, TreePtr, DATA_START};
use super::tree::{PageKey, PageSource};
use crate::crypto::{BlockKind, CryptoEngine, Mac, Tag, VolumeKeys};
use crate::device::{read_exact_at, Device};
use crate::volume::{Generation, Lba, Result, VolumeError};
use crate::BLOCK_SIZE;

/// What the layers under a volume's state need, borrowed from the volume.
pub(crate) struct Ctx<'a> {
    pub dev: &'a dyn Device,
    pub keys: &'a VolumeKeys,
    pub header: &'a Header,
    pub engine: &'a CryptoEngine,
    pub reuse: &'a RwLock<()>,
    /// Set by a failed device write: the volume refuses further work until
    /// it is reopened (a half-failed device is never trusted again).
    pub poisoned: &'a AtomicBool,
}

/// What binds a data block's seal: its logical address and generation
/// (and which key generation seals it).
pub fn data_tag(lba: Lba, gen: Generation, key_gen: u16) -> Tag {
    Tag::new(BlockKind::Data, lba.0, gen.0, key_gen)
}

/// What binds a tree page's seal: its place in its tree and its generation
/// (and which key generation seals it).
pub fn page_tag(tree: TreeId, level: u8, index: u64, gen: Generation, key_gen: u16) -> Tag {
    Tag::new(
        BlockKind::TreePage,
        format::page_addr(tree, level, index),
        gen.0,
        key_gen,
    )
}

/// How a payload entry's block is sealed: its tag and MAC (None for
/// entries without payload).
pub fn payload_seal(e: &Entry) -> Option<(Tag, Mac)> {
    match *e {
        Entry::Write {
            lba,
            gen,
            key_gen,
            mac,
        }
        | Entry::Relocate {
            lba,
            gen,
            key_gen,
            mac,
        } => Some((data_tag(lba, gen, key_gen), mac)),
        Entry::TreePage {
            tree,
            level,
            index,
            gen,
            key_gen,
            mac,
        } => Some((page_tag(tree, level, index, gen, key_gen), mac)),
        Entry::Trim { .. } | Entry::Zero { .. } => None,
    }
}

/// A payload entry whose block is now sealed under `key_gen` with `mac`.
pub fn with_seal(e: Entry, new_key_gen: u16, new_mac: Mac) -> Entry {
    match e {
        Entry::Write { lba, gen, .. } => Entry::Write {
            lba,
            gen,
            key_gen: new_key_gen,
            mac: new_mac,
        },
        Entry::Relocate { lba, gen, .. } => Entry::Relocate {
            lba,
            gen,
            key_gen: new_key_gen,
            mac: new_mac,
        },
        Entry::TreePage {
            tree,
            level,
            index,
            gen,
            ..
        } => Entry::TreePage {
            tree,
            level,
            index,
            gen,
            key_gen: new_key_gen,
            mac: new_mac,
        },
        other => other,
    }
}

impl Ctx<'_> {
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::SeqCst);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// Whether the data block `e` names for `lba` reads back into `buf` and
    /// authenticates.
    pub fn data_block_authentic(&self, buf: &mut [u8], lba: Lba, e: &MapEntry) -> bool {
        read_exact_at(self.dev, buf, e.pba * BLOCK_SIZE as u64).is_ok()
            && self
                .keys
                .verify(data_tag(lba, e.gen, e.key_gen), buf, &e.mac)
    }
}

impl PageSource for Ctx<'_> {
    fn load_page(&self, key: PageKey, ptr: &TreePtr) -> Result<Box<Block>> {
        let what = || {
            format!(
                "{:?} tree page (level {}, index {}) at block {}",
                key.tree, key.level, key.index, ptr.pba
            )
        };
        if ptr.pba < DATA_START || ptr.pba >= self.header.end_block() {
            return Err(VolumeError::Corrupted(format!(
                "{} is outside the volume",
                what()
            )));
        }
        let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
        read_exact_at(self.dev, &mut b[..], ptr.pba * BLOCK_SIZE as u64).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                VolumeError::Corrupted(format!(
                    "backing store is truncated: {} is past its end",
                    what()
                ))
            } else {
                VolumeError::io(format!("reading {}", what()), e)
            }
        })?;
        let tag = page_tag(key.tree, key.level, key.index, ptr.gen, ptr.key_gen);
        self.keys
            .open(tag, &mut b[..], &ptr.mac)
            .map_err(|_| VolumeError::Integrity(what()))?;
        Ok(b)
    }
}
