//! `lsvfs check` for the file system: walks every metadata item and
//! cross-checks them, read-only.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::btree::MAX_VALUE;
use super::btree::{Node, NodeStore};
use super::data::{XATTR_LIST_MAX, XATTR_SIZE_MAX};
use super::filesystem::Fs;
use super::format::{
    kind, parse_xattr_piece, Dirent, Ino, Inode, CHUNK_BLOCKS, FS_VERSION_PIECES, ORPHANS, ROOT_INO,
};
use crate::fs::{FsError, Result};

/// What the file-system check found.
#[derive(Clone, Debug, Default)]
pub struct FsReport {
    pub inodes: u64,
    pub entries: u64,
    pub data_blocks: u64,
    /// Unlinked inodes not yet freed (the next mount frees them).
    pub orphans: u64,
    pub problems: Vec<String>,
}

/// An inode's xattr, by name.
type XattrOf = (Ino, Vec<u8>);

/// The file system's metadata items, sorted by what they are.
#[derive(Default)]
struct Items {
    inodes: BTreeMap<Ino, Inode>,
    /// (directory, name, entry)
    dirents: Vec<(Ino, Vec<u8>, Dirent)>,
    cookies: HashMap<(Ino, u64), Vec<u8>>,
    /// Data block -> the inode whose chunk names it.
    owners: HashMap<u64, Ino>,
    /// Inode -> the data blocks its chunks name.
    held: BTreeMap<Ino, u64>,
    orphans: BTreeSet<Ino>,
    /// Files whose truncation is still freeing blocks past their size.
    truncating: BTreeSet<Ino>,
    data_blocks: u64,
    /// (inode, xattr name) -> the length of its item's value.
    xattrs: HashMap<XattrOf, usize>,
    /// (inode, xattr name) -> its pieces' numbers and lengths, in order.
    pieces: BTreeMap<XattrOf, Vec<(u8, usize)>>,
    /// Inodes whose item did not decode (reported once, as that).
    undecodable: BTreeSet<Ino>,
}

impl Items {
    /// Sorts every item; what does not decode is a problem.
    fn collect(items: &[(Vec<u8>, Vec<u8>)], problems: &mut Vec<String>) -> Items {
        let mut it = Items::default();
        for (k, v) in items {
            if k.len() < 9 {
                problems.push(format!("a metadata key of {} bytes", k.len()));
                continue;
            }
            let ino = Ino(u64::from_be_bytes(k[..8].try_into().expect("8 bytes")));
            let rest = &k[9..];
            let u64_of = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
            match k[8] {
                kind::INODE => match Inode::decode(v, ino) {
                    Ok(i) => {
                        it.inodes.insert(ino, i);
                    }
                    Err(e) => {
                        it.undecodable.insert(ino);
                        problems.push(e.to_string());
                    }
                },
                kind::DIRENT => match Dirent::decode(v) {
                    Ok(d) => it.dirents.push((ino, rest.to_vec(), d)),
                    Err(e) => problems.push(format!("directory {ino}: {e}")),
                },
                kind::COOKIE => match u64_of(rest) {
                    Some(c) => {
                        it.cookies.insert((ino, c), v.to_vec());
                    }
                    None => problems.push(format!("directory {ino}: a malformed cookie key")),
                },
                kind::CHUNK => {
                    let Some(index) = u64_of(rest) else {
                        problems.push(format!("inode {ino}: a malformed chunk key"));
                        continue;
                    };
                    for (j, b) in v.chunks_exact(8).enumerate() {
                        let lba = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                        if lba == 0 {
                            continue;
                        }
                        it.data_blocks += 1;
                        *it.held.entry(ino).or_default() += 1;
                        if let Some(other) = it.owners.insert(lba, ino) {
                            problems.push(format!(
                                    "block {lba} belongs to inode {other} and to inode {ino} (file block {})",
                                    index * CHUNK_BLOCKS + j as u64
                                ));
                        }
                    }
                }
                kind::ORPHAN if ino == ORPHANS => {
                    if let Some(o) = u64_of(rest) {
                        it.orphans.insert(Ino(o));
                    }
                }
                kind::TRUNCATING if ino == ORPHANS => match u64_of(rest) {
                    Some(t) => {
                        it.truncating.insert(Ino(t));
                    }
                    None => problems.push("a malformed truncation record".into()),
                },
                kind::XATTR => {
                    it.xattrs.insert((ino, rest.to_vec()), v.len());
                }
                kind::XATTR_PIECE => match parse_xattr_piece(rest) {
                    Some((name, piece)) => it
                        .pieces
                        .entry((ino, name.to_vec()))
                        .or_default()
                        .push((piece, v.len())),
                    None => problems.push(format!("inode {ino}: a malformed xattr piece key")),
                },
                kind::SYMLINK => {}
                other => problems.push(format!("inode {ino}: unknown item kind {other}")),
            }
        }
        it
    }

    /// The pieces of an xattr value follow a full item, are numbered from
    /// 1 without a gap, are full but for the last, and hold no more than
    /// the longest value: else a reader would stop early, or refuse it.
    /// The file system's `version` must say it has pieces (else an older
    /// build would read such values cut short), every xattr and piece
    /// belongs to an inode there is, and one inode's names fit what
    /// listxattr(2) can return (builds before that limit did not keep to
    /// it).
    fn check_xattrs(&self, version: u32, r: &mut FsReport) {
        if !self.pieces.is_empty() && version < FS_VERSION_PIECES {
            r.problems.push(format!(
                "xattr values are stored in pieces, but the superblock says file-system \
                 version {version}"
            ));
        }
        let strays: BTreeSet<Ino> = (self.xattrs.keys())
            .chain(self.pieces.keys())
            .map(|(ino, _)| *ino)
            .filter(|ino| !self.inodes.contains_key(ino) && !self.undecodable.contains(ino))
            .collect();
        for ino in strays {
            r.problems
                .push(format!("xattrs of inode {ino}, which does not exist"));
        }
        let mut listed: BTreeMap<Ino, usize> = BTreeMap::new();
        for (ino, name) in self.xattrs.keys() {
            *listed.entry(*ino).or_default() += name.len() + 1;
        }
        for (ino, bytes) in listed.into_iter().filter(|(_, b)| *b > XATTR_LIST_MAX) {
            r.problems.push(format!(
                "inode {ino}: its xattr names take {bytes} bytes, more than the \
                 {XATTR_LIST_MAX} listxattr can return, so cp -a and rsync -X fail on it; \
                 remove some of them (setfattr -x)"
            ));
        }
        for ((ino, name), pieces) in &self.pieces {
            let n = String::from_utf8_lossy(name);
            let Some(&first) = self.xattrs.get(&(*ino, name.clone())) else {
                r.problems.push(format!(
                    "inode {ino}: pieces of xattr {n:?}, which it does not have"
                ));
                continue;
            };
            let numbered = pieces
                .iter()
                .enumerate()
                .all(|(i, (p, _))| *p as usize == i + 1);
            let full = std::iter::once(first)
                .chain(pieces.iter().map(|(_, len)| *len))
                .take(pieces.len())
                .all(|len| len == MAX_VALUE);
            let total = first + pieces.iter().map(|(_, len)| len).sum::<usize>();
            if !numbered || !full || total > XATTR_SIZE_MAX {
                r.problems.push(format!(
                    "inode {ino}: xattr {n:?} has {} pieces that do not read back whole \
                     ({total} bytes)",
                    pieces.len()
                ));
            }
        }
    }

    /// Entries name live inodes of their type, directories name their
    /// parent back, and every entry has its readdir cookie. Returns the
    /// links found per inode and the subdirectories per directory.
    fn check_entries(&self, r: &mut FsReport) -> (HashMap<Ino, u32>, HashMap<Ino, u32>) {
        let Items {
            inodes,
            dirents,
            cookies,
            ..
        } = self;
        let mut links: HashMap<Ino, u32> = HashMap::new();
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        for (dir, name, d) in dirents {
            let n = String::from_utf8_lossy(name);
            match inodes.get(&d.ino) {
                None => r.problems.push(format!(
                    "directory {dir}: entry {n:?} names missing inode {}",
                    d.ino
                )),
                Some(i) if super::format::file_type(i.mode) != d.mode => r.problems.push(format!(
                    "directory {dir}: entry {n:?} has the wrong file type"
                )),
                Some(i) => {
                    *links.entry(d.ino).or_insert(0) += 1;
                    if i.is_dir() {
                        *subdirs.entry(*dir).or_insert(0) += 1;
                        if i.parent != *dir {
                            r.problems.push(format!(
                                "directory {}: its parent says {}, found in {dir}",
                                d.ino, i.parent
                            ));
                        }
                    }
                }
            }
            if cookies.get(&(*dir, d.cookie)) != Some(name) {
                r.problems.push(format!(
                    "directory {dir}: entry {n:?} has no matching readdir cookie"
                ));
            }
        }
        if cookies.len() != dirents.len() {
            r.problems.push(format!(
                "{} readdir cookies for {} entries",
                cookies.len(),
                dirents.len()
            ));
        }
        (links, subdirs)
    }

    /// An inode's block count (what `stat` reports as st_blocks, and what
    /// decides whether its data can be freed in one transaction) is the
    /// number of blocks its chunks name, and chunks belong to an inode
    /// there is.
    fn check_block_counts(&self, r: &mut FsReport) {
        for (ino, i) in &self.inodes {
            let held = self.held.get(ino).copied().unwrap_or(0);
            if i.blocks != held {
                r.problems.push(format!(
                    "inode {ino}: its block count says {} blocks, its chunks name {held}: \
                     stat and du misreport its space, its data is unaffected (a copy of \
                     the file counts right)",
                    i.blocks
                ));
            }
        }
        for (ino, held) in &self.held {
            if !self.inodes.contains_key(ino) && !self.undecodable.contains(ino) {
                r.problems.push(format!(
                    "chunks of inode {ino}, which does not exist, name {held} blocks"
                ));
            }
        }
    }

    /// Link counts agree with the entries found, and an inode in no
    /// directory is an orphan.
    fn check_links(
        &self,
        links: &HashMap<Ino, u32>,
        subdirs: &HashMap<Ino, u32>,
        r: &mut FsReport,
    ) {
        let Items {
            inodes, orphans, ..
        } = self;
        for (ino, i) in inodes {
            let want = if i.is_dir() {
                2 + subdirs.get(ino).copied().unwrap_or(0)
            } else {
                links.get(ino).copied().unwrap_or(0)
            };
            if i.nlink != want && !(i.nlink == 0 && orphans.contains(ino)) {
                r.problems.push(format!(
                    "inode {ino}: link count {} but {want} found",
                    i.nlink
                ));
            }
            if *ino != ROOT_INO && !i.is_dir() && want == 0 && !orphans.contains(ino) {
                r.problems
                    .push(format!("inode {ino} is in no directory and not an orphan"));
            }
        }
    }
}

impl Fs {
    /// Checks the file system's structure: entries point at live inodes of
    /// the right type, cookies and entries agree, link counts and block
    /// counts are right, no block is used twice, and every allocated block
    /// is accounted for.
    pub fn check(&self) -> Result<FsReport> {
        // The volume's allocated blocks are compared with what the tree
        // names: both as of one commit.
        self.commit_pending()?;
        let mut r = FsReport::default();
        let (items, nodes, version) = self.read_op(|op| {
            let all = op
                .tree
                .range(&mut op.store, &[0], &[0xff; 10], usize::MAX)?;
            let mut nodes = BTreeSet::new();
            let mut stack = vec![op.tree.root];
            while let Some(lba) = stack.pop() {
                if !nodes.insert(lba) {
                    return Err(FsError::Corrupted(format!(
                        "metadata node {lba} is reachable twice"
                    )));
                }
                if let Node::Branch { children, .. } = &*op.store.read(lba)? {
                    stack.extend(children);
                }
            }
            Ok((all, nodes, op.version()))
        })?;
        let items = Items::collect(&items, &mut r.problems);
        r.data_blocks = items.data_blocks;
        r.inodes = items.inodes.len() as u64;
        r.orphans = items.orphans.len() as u64;
        r.entries = items.dirents.len() as u64;
        if !items.inodes.get(&ROOT_INO).is_some_and(|i| i.is_dir()) {
            r.problems.push("the root directory is missing".into());
        }
        for t in &items.truncating {
            if !items.inodes.contains_key(t) {
                r.problems
                    .push(format!("a truncation record names missing inode {t}"));
            }
        }
        items.check_xattrs(version, &mut r);
        let (links, subdirs) = items.check_entries(&mut r);
        items.check_links(&links, &subdirs, &mut r);
        items.check_block_counts(&mut r);
        self.check_blocks(nodes, &items.owners, &mut r)?;
        Ok(r)
    }

    /// Every allocated logical block is the superblock, a metadata node or
    /// a file's data, and every one of those is allocated.
    fn check_blocks(
        &self,
        nodes: BTreeSet<u64>,
        owners: &HashMap<u64, Ino>,
        r: &mut FsReport,
    ) -> Result<()> {
        let mut used: BTreeSet<u64> = BTreeSet::new();
        for (s, n) in self.volume().allocated_runs()? {
            used.extend(s..s + n);
        }
        let mut known: BTreeSet<u64> = nodes;
        known.insert(0);
        known.extend(owners.keys().copied());
        for b in used.difference(&known).take(20) {
            r.problems.push(format!(
                "block {b} is allocated but belongs to nothing (leaked)"
            ));
        }
        for b in known.difference(&used).take(20) {
            r.problems
                .push(format!("block {b} is in use but not allocated"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::format::{key, xattr_piece_key, FS_VERSION_BASE};

    type Item = (Vec<u8>, Vec<u8>);

    /// What `check` reports for inode 5, a file that says it holds
    /// `blocks` blocks, with `items`.
    fn problems_of(
        blocks: u64,
        items: &[Item],
        check: impl Fn(&Items, &mut FsReport),
    ) -> Vec<String> {
        let mut inode = Inode::new(libc::S_IFREG | 0o644, 0, 0, 0);
        inode.blocks = blocks;
        let mut all = vec![(key(Ino(5), kind::INODE, &[]), inode.encode())];
        all.extend_from_slice(items);
        let mut problems = Vec::new();
        let it = Items::collect(&all, &mut problems);
        let mut r = FsReport {
            problems,
            ..FsReport::default()
        };
        check(&it, &mut r);
        r.problems
    }

    /// What the piece check reports for inode 5 holding `items`, on a file
    /// system of `version`.
    fn piece_problems(items: &[Item], version: u32) -> Vec<String> {
        problems_of(0, items, |it, r| it.check_xattrs(version, r))
    }

    #[test]
    fn a_block_count_that_differs_from_the_chunks_is_reported() {
        let chunk = |ino: u64, lbas: &[u64]| {
            let mut v = vec![0u8; CHUNK_BLOCKS as usize * 8];
            for (j, lba) in lbas.iter().enumerate() {
                v[j * 8..j * 8 + 8].copy_from_slice(&lba.to_le_bytes());
            }
            (key(Ino(ino), kind::CHUNK, &0u64.to_be_bytes()), v)
        };
        let problems = |blocks: u64, items: &[Item]| {
            problems_of(blocks, items, |it, r| it.check_block_counts(r))
        };
        // Holes (block 0) count for nothing.
        assert!(problems(2, &[chunk(5, &[7, 0, 9])]).is_empty());
        assert!(problems(0, &[]).is_empty());
        let short = problems(1, &[chunk(5, &[7, 0, 9])]);
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(
            short[0].contains("says 1 blocks, its chunks name 2"),
            "{short:?}"
        );
        assert_eq!(problems(3, &[chunk(5, &[7, 9])]).len(), 1);
        let stray = problems(0, &[chunk(6, &[7])]);
        assert_eq!(stray.len(), 1, "{stray:?}");
        assert!(
            stray[0].contains("inode 6, which does not exist"),
            "{stray:?}"
        );
    }

    #[test]
    fn xattrs_that_would_not_read_back_or_list_whole_are_reported() {
        let of = |ino: u64, len: usize| (key(Ino(ino), kind::XATTR, b"user.x"), vec![1u8; len]);
        let item = |len: usize| of(5, len);
        let piece = |p: u8, len: usize| (xattr_piece_key(Ino(5), b"user.x", p), vec![2u8; len]);
        let whole = [item(MAX_VALUE), piece(1, MAX_VALUE), piece(2, 10)];
        assert_eq!(
            piece_problems(&whole, FS_VERSION_PIECES),
            Vec::<String>::new()
        );
        let cases: [(&str, Vec<Item>, u32); 7] = [
            ("no xattr item", vec![piece(1, 10)], FS_VERSION_PIECES),
            (
                "a short item",
                vec![item(10), piece(1, 10)],
                FS_VERSION_PIECES,
            ),
            (
                "a gap",
                vec![item(MAX_VALUE), piece(2, 10)],
                FS_VERSION_PIECES,
            ),
            (
                "a short piece before the last",
                vec![item(MAX_VALUE), piece(1, 10), piece(2, 10)],
                FS_VERSION_PIECES,
            ),
            (
                "a malformed key",
                vec![(key(Ino(5), kind::XATTR_PIECE, b"user.x"), vec![0u8; 3])],
                FS_VERSION_PIECES,
            ),
            (
                "pieces in a version 1 file system",
                whole.to_vec(),
                FS_VERSION_BASE,
            ),
            (
                "an xattr of a missing inode",
                vec![of(6, 10)],
                FS_VERSION_PIECES,
            ),
        ];
        for (what, items, version) in cases {
            assert_eq!(piece_problems(&items, version).len(), 1, "{what}");
        }
        // 4,096 names of 16 bytes with their NULs: 65,536, the most; one
        // more is past what listxattr returns.
        let names = |n: u32| -> Vec<Item> {
            (0..n)
                .map(|i| {
                    (
                        key(Ino(5), kind::XATTR, format!("user.n{i:09}").as_bytes()),
                        vec![],
                    )
                })
                .collect()
        };
        assert!(piece_problems(&names(4096), FS_VERSION_PIECES).is_empty());
        assert_eq!(
            piece_problems(&names(4097), FS_VERSION_PIECES).len(),
            1,
            "names"
        );
        let mut long = vec![item(MAX_VALUE)];
        long.extend((1..=39).map(|p| piece(p, MAX_VALUE)));
        assert_eq!(
            piece_problems(&long, FS_VERSION_PIECES).len(),
            1,
            "past 64 KiB"
        );
    }
}
