//! Who holds an inode besides its names: open handles, and the kernel's
//! lookup references.
//!
//! FUSE's contract is that an inode number stays valid until the kernel
//! has forgotten every lookup of it (FORGET, BATCH_FORGET): after an
//! unlink the kernel may still write back times or pages of the inode, for
//! instance during syncfs. So an inode that loses its last name while held
//! lives on as an orphan (on disk, in the orphan list) until nothing holds
//! it; its data goes at its last close, the inode at the last forget.

use super::format::Ino;
use rustc_hash::FxHashMap;
use std::collections::HashSet;

#[derive(Clone, Copy, Debug, Default)]
struct Hold {
    open: u32,
    lookups: u64,
}

/// The holds on a file system's inodes.
#[derive(Debug, Default)]
pub(super) struct Holds {
    by_ino: FxHashMap<Ino, Hold>,
    /// Whether lookups are counted: only a kernel mount forgets them.
    count_lookups: bool,
    /// Orphans made since mount that may still need reclaiming: a hint,
    /// so that a forget does not search the tree for every inode the
    /// kernel evicts (reclaim checks the tree itself).
    orphans: HashSet<Ino>,
    /// Orphans nothing holds any more, to be freed together (see
    /// [`Holds::take_unheld`]).
    unheld: Vec<Ino>,
}

/// Unheld orphans freed in one transaction once this many have gathered.
const UNHELD_BATCH: usize = 64;

impl Holds {
    /// From now on every lookup the file system answers is a reference
    /// until [`Holds::forget`].
    pub fn count_lookups(&mut self) {
        self.count_lookups = true;
    }

    pub fn open(&mut self, ino: Ino) {
        self.by_ino.entry(ino).or_default().open += 1;
    }

    /// Drops one open handle. None while others are open; at the last one,
    /// whether `ino` is an orphan (whose data can go now).
    pub fn release(&mut self, ino: Ino) -> Option<bool> {
        let h = self.by_ino.get_mut(&ino)?;
        h.open = h.open.saturating_sub(1);
        if h.open > 0 {
            return None;
        }
        if h.lookups == 0 {
            self.by_ino.remove(&ino);
        }
        Some(self.orphans.contains(&ino))
    }

    /// Counts a lookup the kernel will hold (when lookups are counted).
    pub fn remember(&mut self, ino: Ino) {
        if self.count_lookups {
            self.by_ino.entry(ino).or_default().lookups += 1;
        }
    }

    /// The kernel forgot `n` lookups of `ino`. Returns whether a batch of
    /// orphans that nothing holds has gathered (see `take_unheld`).
    pub fn forget(&mut self, ino: Ino, n: u64) -> bool {
        let Some(h) = self.by_ino.get_mut(&ino) else {
            return false;
        };
        h.lookups = h.lookups.saturating_sub(n);
        if h.lookups > 0 || h.open > 0 {
            return false;
        }
        self.by_ino.remove(&ino);
        if self.orphans.contains(&ino) {
            self.unheld.push(ino);
        }
        self.unheld.len() >= UNHELD_BATCH
    }

    /// Orphans that nothing holds any more. Their data went at their last
    /// close; what is left (the inode) is freed in batches, at the latest
    /// at the next sync, unmount or mount.
    pub fn take_unheld(&mut self) -> Vec<Ino> {
        std::mem::take(&mut self.unheld)
    }

    pub fn is_open(&self, ino: Ino) -> bool {
        self.by_ino.get(&ino).is_some_and(|h| h.open > 0)
    }

    /// Whether anything (a handle or a kernel lookup) holds `ino`.
    pub fn is_held(&self, ino: Ino) -> bool {
        self.by_ino.contains_key(&ino)
    }

    pub fn add_orphan(&mut self, ino: Ino) {
        self.orphans.insert(ino);
    }

    pub fn reclaimed(&mut self, ino: Ino) {
        self.orphans.remove(&ino);
    }

    /// Drops every hold (the kernel is gone: at unmount).
    pub fn clear(&mut self) {
        self.by_ino.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_orphan_is_free_only_when_no_handle_and_no_lookup_holds_it() {
        let mut h = Holds::default();
        h.count_lookups();
        h.remember(Ino(7));
        h.remember(Ino(7));
        h.open(Ino(7));
        h.add_orphan(Ino(7));
        h.open(Ino(7));
        assert_eq!(h.release(Ino(7)), None, "another handle is open");
        assert_eq!(h.release(Ino(7)), Some(true), "last close of an orphan");
        assert!(h.is_held(Ino(7)) && !h.is_open(Ino(7)));
        h.forget(Ino(7), 1);
        assert!(h.take_unheld().is_empty(), "one lookup is still held");
        h.forget(Ino(7), 1);
        assert_eq!(h.take_unheld(), [Ino(7)], "the last forget frees it");
        assert!(!h.is_held(Ino(7)));
        // A forget of more than is held never wraps.
        h.remember(Ino(8));
        h.add_orphan(Ino(8));
        h.forget(Ino(8), 5);
        h.forget(Ino(8), 1);
        assert_eq!(h.take_unheld(), [Ino(8)], "forgotten once, freed once");
    }

    #[test]
    fn unheld_orphans_gather_into_batches() {
        let mut h = Holds::default();
        h.count_lookups();
        let full: Vec<bool> = (1..=UNHELD_BATCH as u64)
            .map(Ino)
            .map(|ino| {
                h.remember(ino);
                h.add_orphan(ino);
                h.forget(ino, 1)
            })
            .collect();
        assert_eq!(full.iter().filter(|f| **f).count(), 1);
        assert!(full[UNHELD_BATCH - 1], "the last one fills the batch");
        assert_eq!(h.take_unheld().len(), UNHELD_BATCH);
    }

    #[test]
    fn without_counting_only_handles_hold() {
        let mut h = Holds::default();
        h.remember(Ino(3));
        assert!(!h.is_held(Ino(3)));
        h.open(Ino(3));
        assert!(h.is_held(Ino(3)));
        assert_eq!(h.release(Ino(3)), Some(false), "not an orphan");
        assert!(!h.is_held(Ino(3)));
    }
}
