//! On-disk encoding of file-system metadata: the superblock, the metadata
//! keys, and inode and directory-entry values. docs/FORMAT.md has the tables.
//!
//! Keys start with the inode number in big-endian, then a kind byte, so an
//! inode's items sort together and in a useful order.

use crate::fs::{FsError, Result};
use crate::BLOCK_SIZE;

pub const FS_MAGIC: [u8; 8] = *b"LSVFSFS\0";
/// The newest file-system format version this build reads and writes.
/// Version 2 adds xattr values longer than one metadata item (kind
/// [`kind::XATTR_PIECE`]); a file system is written as version 1, which
/// older builds read, until it stores the first such value.
pub const FS_VERSION: u32 = 2;
/// The version a new file system is written with (see [`FS_VERSION`]).
pub const FS_VERSION_BASE: u32 = 1;
/// The version that added [`kind::XATTR_PIECE`].
pub const FS_VERSION_PIECES: u32 = 2;
/// An inode number. The root is 1; 0 holds the orphan list; every number
/// stays below [`crate::fs::MAX_INO`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

impl std::fmt::Display for Ino {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The root directory's inode number.
pub const ROOT_INO: Ino = Ino(1);
/// The pseudo-inode whose items list the orphans.
pub const ORPHANS: Ino = Ino(0);
/// Longest file name, in bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, in bytes (Linux's PATH_MAX minus the NUL).
pub const SYMLINK_MAX: usize = 4095;

/// Kinds of metadata items: the byte after the inode number in a key.
pub mod kind {
    /// The inode itself. Key: ino, kind.
    pub const INODE: u8 = 1;
    /// A directory entry. Key: dir ino, kind, name. Value: [`super::Dirent`].
    pub const DIRENT: u8 = 2;
    /// Readdir position of an entry. Key: dir ino, kind, cookie (BE u64). Value: name.
    pub const COOKIE: u8 = 3;
    /// An extended attribute. Key: ino, kind, name. Value: the attribute's
    /// bytes, or the first [`crate::fs::btree::MAX_VALUE`] of them when
    /// [`XATTR_PIECE`] items hold the rest.
    pub const XATTR: u8 = 4;
    /// Where 128 consecutive file blocks live. Key: ino, kind, chunk
    /// index (BE u64). Value: 128 block addresses (LE u64, 0 = hole).
    pub const CHUNK: u8 = 5;
    /// A piece of a symlink target. Key: ino, kind, piece (u8). Value: bytes.
    pub const SYMLINK: u8 = 6;
    /// An unlinked inode still open when it lost its last name. Key: inode
    /// 0, kind, ino (BE u64). Value: empty. Reclaimed at the last close or
    /// at the next mount.
    pub const ORPHAN: u8 = 7;
    /// A file whose truncation is still freeing blocks past its size (a
    /// large truncate frees in steps). Key: inode 0, kind, ino (BE u64).
    /// Value: empty. Removed by the last step; finished at the next mount
    /// after a crash.
    pub const TRUNCATING: u8 = 8;
    /// The rest of an xattr value longer than
    /// [`crate::fs::btree::MAX_VALUE`] bytes (file-system version 2). Key:
    /// ino, kind, name, NUL, piece (u8, from 1). Value: the value's bytes
    /// from piece × MAX_VALUE, at most MAX_VALUE of them. A reader follows
    /// an xattr item of exactly MAX_VALUE bytes with its pieces, in turn,
    /// while each is full.
    pub const XATTR_PIECE: u8 = 9;
}

/// File blocks per chunk item.
pub const CHUNK_BLOCKS: u64 = 128;

pub fn key(ino: Ino, kind: u8, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + suffix.len());
    k.extend_from_slice(&ino.0.to_be_bytes());
    k.push(kind);
    k.extend_from_slice(suffix);
    k
}

/// The u64 that follows a key's inode and kind (a chunk index, a cookie, an
/// orphan's inode); None for a key too short to hold one (a damaged tree).
pub fn key_suffix_u64(k: &[u8]) -> Option<u64> {
    k.get(9..17)?.try_into().ok().map(u64::from_be_bytes)
}

/// The block addresses in a chunk item's value (CHUNK_BLOCKS little-endian
/// u64s, 0 for a hole); None if the value has the wrong size.
pub fn decode_chunk(v: &[u8]) -> Option<Vec<u64>> {
    (v.len() == CHUNK_BLOCKS as usize * 8).then(|| {
        v.chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect()
    })
}

/// The orphan list's item for `ino`.
pub fn orphan_key(ino: Ino) -> Vec<u8> {
    key(ORPHANS, kind::ORPHAN, &ino.0.to_be_bytes())
}

/// The truncation record of `ino` (see [`kind::TRUNCATING`]).
pub fn truncating_key(ino: Ino) -> Vec<u8> {
    key(ORPHANS, kind::TRUNCATING, &ino.0.to_be_bytes())
}

/// The range of keys of one kind for one inode: `[start, end)`.
pub fn kind_range(ino: Ino, kind: u8) -> (Vec<u8>, Vec<u8>) {
    (key(ino, kind, &[]), key(ino, kind + 1, &[]))
}

/// The key of piece `piece` (1 or more) of xattr `name`'s value.
pub fn xattr_piece_key(ino: Ino, name: &[u8], piece: u8) -> Vec<u8> {
    let mut k = key(ino, kind::XATTR_PIECE, name);
    k.push(0);
    k.push(piece);
    k
}

/// Every piece key of xattr `name` (names hold no NUL, so no other name's
/// pieces fall in it).
pub fn xattr_pieces_range(ino: Ino, name: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut s = key(ino, kind::XATTR_PIECE, name);
    let mut e = s.clone();
    s.push(0);
    e.push(1);
    (s, e)
}

/// The name and piece number in a piece key's part after ino and kind;
/// None if malformed.
pub fn parse_xattr_piece(rest: &[u8]) -> Option<(&[u8], u8)> {
    match rest {
        [name @ .., 0, piece] if !name.is_empty() && !name.contains(&0) && *piece > 0 => {
            Some((name, *piece))
        }
        _ => None,
    }
}

/// Every key of one inode.
pub fn inode_range(ino: Ino) -> (Vec<u8>, Vec<u8>) {
    (key(ino, 0, &[]), key(Ino(ino.0 + 1), 0, &[]))
}

/// File types, as stored (the S_IFMT bits of the mode).
pub fn file_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// An inode. Value layout (little endian, 104 bytes):
/// | 0 mode u32 | 4 uid u32 | 8 gid u32 | 12 nlink u32 | 16 size u64 |
/// | 24 atime (i64 s, u32 ns) | 36 mtime | 48 ctime | 60 crtime |
/// | 72 rdev u32 | 76 flags u32 | 80 next_cookie u64 | 88 blocks u64 |
/// | 96 parent u64 (directories; 0 otherwise) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Time,
    pub rdev: u32,
    pub flags: u32,
    /// Directories: the next readdir cookie to hand out (cookies 0..2 are
    /// "." and "..", so it starts at 3).
    pub next_cookie: u64,
    /// 4 KiB blocks of data held.
    pub blocks: u64,
    /// Directories: the directory that holds this one (for ".." and for
    /// refusing to move a directory into itself).
    pub parent: Ino,
}

pub const INODE_LEN: usize = 104;

impl Inode {
    pub fn new(mode: u32, uid: u32, gid: u32, rdev: u32) -> Inode {
        let now = Time::now();
        Inode {
            mode,
            uid,
            gid,
            nlink: 1,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev,
            flags: 0,
            next_cookie: 3,
            blocks: 0,
            parent: ORPHANS,
        }
    }

    pub fn is_dir(&self) -> bool {
        file_type(self.mode) == libc::S_IFDIR
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(INODE_LEN);
        for v in [self.mode, self.uid, self.gid, self.nlink] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.size.to_le_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            b.extend_from_slice(&t.sec.to_le_bytes());
            b.extend_from_slice(&t.nsec.to_le_bytes());
        }
        b.extend_from_slice(&self.rdev.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.next_cookie.to_le_bytes());
        b.extend_from_slice(&self.blocks.to_le_bytes());
        b.extend_from_slice(&self.parent.0.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8], ino: Ino) -> Result<Inode> {
        if b.len() != INODE_LEN {
            return Err(FsError::Corrupted(format!(
                "inode {ino} has {} bytes, want {INODE_LEN}",
                b.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let t_at = |o: usize| Time {
            sec: u64_at(o) as i64,
            nsec: u32_at(o + 8),
        };
        let i = Inode {
            mode: u32_at(0),
            uid: u32_at(4),
            gid: u32_at(8),
            nlink: u32_at(12),
            size: u64_at(16),
            atime: t_at(24),
            mtime: t_at(36),
            ctime: t_at(48),
            crtime: t_at(60),
            rdev: u32_at(72),
            flags: u32_at(76),
            next_cookie: u64_at(80),
            blocks: u64_at(88),
            parent: Ino(u64_at(96)),
        };
        let ok_type = matches!(
            file_type(i.mode),
            libc::S_IFREG
                | libc::S_IFDIR
                | libc::S_IFLNK
                | libc::S_IFIFO
                | libc::S_IFSOCK
                | libc::S_IFCHR
                | libc::S_IFBLK
        );
        if !ok_type
            || i.atime.nsec >= 1_000_000_000
            || i.mtime.nsec >= 1_000_000_000
            || i.ctime.nsec >= 1_000_000_000
        {
            return Err(FsError::Corrupted(format!(
                "inode {ino} has an invalid mode or timestamp"
            )));
        }
        Ok(i)
    }
}

/// A directory entry's value: | 0 ino u64 | 8 cookie u64 | 16 mode u32 (type bits) |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dirent {
    pub ino: Ino,
    pub cookie: u64,
    pub mode: u32,
}

impl Dirent {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&self.ino.0.to_le_bytes());
        b.extend_from_slice(&self.cookie.to_le_bytes());
        b.extend_from_slice(&self.mode.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Dirent> {
        if b.len() != 20 {
            return Err(FsError::Corrupted(
                "a directory entry has the wrong size".into(),
            ));
        }
        Ok(Dirent {
            ino: Ino(u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))),
            cookie: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            mode: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
        })
    }
}

/// The superblock, logical block 0.
/// | 0 magic [8] | 8 version u32 | 12 reserved u32 | 16 tree root u64 | 24 next ino u64 |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// [`FS_VERSION_BASE`] or [`FS_VERSION_PIECES`] (see [`FS_VERSION`]).
    pub version: u32,
    pub root: u64,
    pub next_ino: u64,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        b[..8].copy_from_slice(&FS_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[16..24].copy_from_slice(&self.root.to_le_bytes());
        b[24..32].copy_from_slice(&self.next_ino.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock> {
        if b.len() < 32 || b[..8] != FS_MAGIC {
            return Err(FsError::Corrupted(
                "the volume holds no lsvfs file system (no superblock in block 0)".into(),
            ));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if !(FS_VERSION_BASE..=FS_VERSION).contains(&version) {
            return Err(FsError::UnsupportedVersion {
                want: FS_VERSION,
                have: version,
            });
        }
        Ok(Superblock {
            version,
            root: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            next_ino: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_and_dirent_round_trip_and_reject_garbage() {
        let i = Inode::new(libc::S_IFDIR | 0o755, 1, 2, 0);
        assert_eq!(Inode::decode(&i.encode(), Ino(5)).unwrap(), i);
        assert!(
            Inode::decode(&[0u8; INODE_LEN], Ino(5)).is_err(),
            "mode 0 is no file type"
        );
        assert!(Inode::decode(&[0u8; 10], Ino(5)).is_err());
        let d = Dirent {
            ino: Ino(9),
            cookie: 4,
            mode: libc::S_IFREG,
        };
        assert_eq!(Dirent::decode(&d.encode()).unwrap(), d);
        for version in [FS_VERSION_BASE, FS_VERSION_PIECES] {
            let s = Superblock {
                version,
                root: 7,
                next_ino: 12,
            };
            assert_eq!(Superblock::decode(&s.encode()).unwrap(), s);
        }
        assert!(Superblock::decode(&[0u8; BLOCK_SIZE]).is_err());
        for bad in [0, FS_VERSION + 1] {
            let mut b = Superblock {
                version: FS_VERSION,
                root: 7,
                next_ino: 12,
            }
            .encode();
            b[8..12].copy_from_slice(&bad.to_le_bytes());
            assert!(
                matches!(
                    Superblock::decode(&b),
                    Err(FsError::UnsupportedVersion { have, .. }) if have == bad
                ),
                "version {bad}"
            );
        }
    }

    #[test]
    fn xattr_piece_keys_sort_by_name_then_piece_and_parse_back() {
        let (s, e) = xattr_pieces_range(Ino(3), b"user.a");
        for piece in [1, 2, 200] {
            let k = xattr_piece_key(Ino(3), b"user.a", piece);
            assert!(s <= k && k < e);
            assert_eq!(parse_xattr_piece(&k[9..]), Some((&b"user.a"[..], piece)));
        }
        // Another name, even one that starts with this one, is outside.
        for other in [&b"user.ab"[..], b"user.", b"user.b"] {
            let k = xattr_piece_key(Ino(3), other, 1);
            assert!(!(s <= k && k < e), "{other:?}");
        }
        assert!(xattr_piece_key(Ino(3), b"user.a", 1) < xattr_piece_key(Ino(3), b"user.a", 2));
        for bad in [
            &b""[..],
            b"\0\x01",
            b"a\0",
            b"a\0\0",
            b"a\x01",
            b"a\0b\0\x01",
        ] {
            assert_eq!(parse_xattr_piece(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_sort_by_inode_then_kind() {
        assert!(key(Ino(1), kind::INODE, &[]) < key(Ino(1), kind::DIRENT, b"a"));
        assert!(key(Ino(1), kind::DIRENT, b"zzz") < key(Ino(2), kind::INODE, &[]));
        assert!(key(Ino(255), kind::INODE, &[]) < key(Ino(256), kind::INODE, &[]));
        let (s, e) = kind_range(Ino(3), kind::DIRENT);
        assert!(s <= key(Ino(3), kind::DIRENT, b"x") && key(Ino(3), kind::DIRENT, b"x") < e);
    }
}
