//! POSIX ACLs as the kernel passes them (system.posix_acl_access and
//! system.posix_acl_default xattrs), and the three rules a file system
//! applies to them: an access ACL sets the mode's permission bits, a chmod
//! rewrites the access ACL, and a new inode inherits its directory's
//! default ACL instead of the umask.
//!
//! Xattr format: version (LE u32, 2), then entries of tag (LE u16), perm
//! (LE u16), id (LE u32).

use crate::fs::{Posix, Result};

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl(Vec<(u16, u16, u32)>);

impl Acl {
    pub fn decode(b: &[u8]) -> Result<Acl> {
        let bad = || Posix::Invalid.at("a POSIX ACL xattr");
        if b.len() < 4
            || (b.len() - 4) % 8 != 0
            || u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != VERSION
        {
            return Err(bad());
        }
        let mut es = Vec::new();
        for e in b[4..].chunks_exact(8) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u16::from_le_bytes([e[2], e[3]]);
            if ![USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&tag) || perm > 7 {
                return Err(bad());
            }
            es.push((tag, perm, u32::from_le_bytes([e[4], e[5], e[6], e[7]])));
        }
        let count = |t: u16| es.iter().filter(|e| e.0 == t).count();
        let named = count(USER) + count(GROUP);
        if count(USER_OBJ) != 1
            || count(GROUP_OBJ) != 1
            || count(OTHER) != 1
            || count(MASK) > 1
            || (named > 0 && count(MASK) != 1)
        {
            return Err(bad());
        }
        Ok(Acl(es))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = VERSION.to_le_bytes().to_vec();
        for (t, p, id) in &self.0 {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
            b.extend_from_slice(&id.to_le_bytes());
        }
        b
    }

    /// An ACL of only the owner, group and other entries says no more than
    /// the mode does; it is not stored.
    pub fn is_minimal(&self) -> bool {
        self.0.len() == 3
    }

    fn perm(&self, tag: u16) -> Option<u16> {
        self.0.iter().find(|e| e.0 == tag).map(|e| e.1)
    }

    /// The permission bits this ACL implies (group bits come from the mask
    /// when there is one).
    pub fn mode_bits(&self) -> u32 {
        let u = self.perm(USER_OBJ).unwrap_or(0) as u32;
        let g = self.perm(MASK).or(self.perm(GROUP_OBJ)).unwrap_or(0) as u32;
        let o = self.perm(OTHER).unwrap_or(0) as u32;
        (u << 6) | (g << 3) | o
    }

    /// Rewrites the owner, group-or-mask and other entries from `mode`
    /// (chmod on a file with an ACL).
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.perm(MASK).is_some();
        for e in &mut self.0 {
            match e.0 {
                USER_OBJ => e.1 = ((mode >> 6) & 7) as u16,
                MASK => e.1 = ((mode >> 3) & 7) as u16,
                GROUP_OBJ if !has_mask => e.1 = ((mode >> 3) & 7) as u16,
                OTHER => e.1 = (mode & 7) as u16,
                _ => {}
            }
        }
    }

    /// The access ACL of a new inode created with `mode` under a directory
    /// whose default ACL is `self`, and the resulting permission bits.
    pub fn create(&self, mode: u32) -> (Acl, u32) {
        let has_mask = self.perm(MASK).is_some();
        let mut a = self.clone();
        for e in &mut a.0 {
            match e.0 {
                USER_OBJ => e.1 &= ((mode >> 6) & 7) as u16,
                MASK => e.1 &= ((mode >> 3) & 7) as u16,
                GROUP_OBJ if !has_mask => e.1 &= ((mode >> 3) & 7) as u16,
                OTHER => e.1 &= (mode & 7) as u16,
                _ => {}
            }
        }
        let bits = a.mode_bits();
        (a, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(es: &[(u16, u16, u32)]) -> Acl {
        Acl(es.to_vec())
    }

    #[test]
    fn mode_chmod_create_and_garbage() {
        let minimal = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (GROUP_OBJ, 5, u32::MAX),
            (OTHER, 5, u32::MAX),
        ]);
        assert_eq!(Acl::decode(&minimal.encode()).unwrap(), minimal);
        assert!(minimal.is_minimal());
        assert_eq!(minimal.mode_bits(), 0o755);
        let mut ext = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 6, 1234),
            (GROUP_OBJ, 4, 0),
            (MASK, 6, 0),
            (OTHER, 4, 0),
        ]);
        assert_eq!(ext.mode_bits(), 0o664, "the group bits show the mask");
        ext.chmod(0o640);
        assert_eq!(ext.mode_bits(), 0o640);
        assert_eq!(
            ext.perm(GROUP_OBJ),
            Some(4),
            "chmod leaves the group entry alone when there is a mask"
        );
        let (a, bits) = ext.create(0o600);
        assert_eq!(
            (bits, a.perm(USER), a.perm(MASK)),
            (0o600, Some(6), Some(0))
        );
        for bad in [
            &b""[..],
            &[2, 0, 0, 0, 1, 0][..],
            &[3, 0, 0, 0][..],
            &acl(&[(USER, 6, 1)]).encode()[..],
        ] {
            assert!(Acl::decode(bad).is_err());
        }
    }
}
