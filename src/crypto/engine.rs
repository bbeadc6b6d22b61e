//! The parallel chunk engine: seals and opens batches of 4 KiB blocks in
//! chunks (default 512 KiB) spread over a rayon pool.

use rayon::prelude::*;

use std::sync::Arc;

use lsvfs_keyserver::secret::scrub_stack_small;

use super::{GenKeys, Mac, Tag, VolumeKeys};
use crate::BLOCK_SIZE;

/// Default chunk size in bytes.
pub const DEFAULT_CHUNK_BYTES: usize = 512 * 1024;

pub struct CryptoEngine {
    /// None with one thread: the caller's thread does the work.
    pool: Option<rayon::ThreadPool>,
    chunk_blocks: usize,
    threads: usize,
}

impl CryptoEngine {
    /// `threads == 0` means one per CPU. `chunk_bytes` is rounded down to
    /// whole blocks (at least one).
    pub fn new(threads: usize, chunk_bytes: usize) -> std::io::Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("lsvfs-crypto-{i}"))
                    .build()
                    .map_err(std::io::Error::other)?,
            )
        } else {
            None
        };
        Ok(CryptoEngine {
            pool,
            chunk_blocks: (chunk_bytes / BLOCK_SIZE).max(1),
            threads,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Encrypts every block of `buf` in place under its tag and writes its
    /// MAC, with the keys of one key generation (the tags name it).
    pub fn seal(&self, keys: &GenKeys, buf: &mut [u8], tags: &[Tag], macs: &mut [Mac]) {
        debug_assert!(tags.iter().all(|t| t.key == keys.key_gen()));
        assert_eq!(buf.len(), tags.len() * BLOCK_SIZE);
        assert_eq!(tags.len(), macs.len());
        let work = |(b, (t, m)): (&mut [u8], (&[Tag], &mut [Mac]))| {
            for ((blk, tag), mac) in b.chunks_exact_mut(BLOCK_SIZE).zip(t).zip(m.iter_mut()) {
                *mac = keys.seal_in_batch(*tag, blk);
            }
            // The cipher's and the hasher's frames were below this one.
            scrub_stack_small();
        };
        let cb = self.chunk_blocks;
        let Some(pool) = self.pool.as_ref().filter(|_| tags.len() > cb) else {
            work((buf, (tags, macs)));
            return;
        };
        pool.install(|| {
            buf.par_chunks_mut(cb * BLOCK_SIZE)
                .zip(tags.par_chunks(cb).zip(macs.par_chunks_mut(cb)))
                .for_each(work)
        });
    }

    /// Verifies and decrypts every block of `buf` in place. Returns the index
    /// of the first block whose MAC does not match, if any; then the buffer
    /// holds a mix of ciphertext and plaintext and must not be used.
    pub fn open(
        &self,
        keys: &VolumeKeys,
        buf: &mut [u8],
        tags: &[Tag],
        macs: &[Mac],
    ) -> Result<(), usize> {
        assert_eq!(buf.len(), tags.len() * BLOCK_SIZE);
        assert_eq!(tags.len(), macs.len());
        let cb = self.chunk_blocks;
        let work = |ci: usize, b: &mut [u8], t: &[Tag], m: &[Mac]| -> Result<(), usize> {
            // Each block is authenticated, under the key generation its tag
            // names, and then decrypted while it is still in the cache.
            let mut gk: Option<Arc<GenKeys>> = None;
            let mut bad = None;
            for (i, ((blk, tag), mac)) in b.chunks_exact_mut(BLOCK_SIZE).zip(t).zip(m).enumerate() {
                if gk.as_ref().is_none_or(|g| g.key_gen() != tag.key) {
                    gk = keys.get(tag.key);
                }
                if !gk.as_ref().is_some_and(|g| g.open_in_batch(*tag, blk, mac)) {
                    bad = Some(ci * cb + i);
                    break;
                }
            }
            // The cipher's and the hasher's frames were below this one.
            scrub_stack_small();
            bad.map_or(Ok(()), Err)
        };
        let Some(pool) = self.pool.as_ref().filter(|_| tags.len() > cb) else {
            return work(0, buf, tags, macs);
        };
        let errs: Vec<usize> = pool.install(|| {
            buf.par_chunks_mut(cb * BLOCK_SIZE)
                .zip(tags.par_chunks(cb).zip(macs.par_chunks(cb)))
                .enumerate()
                .filter_map(|(ci, (b, (t, m)))| work(ci, b, t, m).err())
                .collect()
        });
        match errs.into_iter().min() {
            Some(i) => Err(i),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{BlockKind, MasterKey};

    #[test]
    fn parallel_matches_serial_and_reports_first_bad_block() {
        let mk = MasterKey::generate().unwrap();
        let keys = VolumeKeys::derive(&mk, &[9; 16]);
        let n = 300;
        let tags: Vec<Tag> = (0..n)
            .map(|i| Tag::new(BlockKind::Data, i, 1000 + i, 0))
            .collect();
        let plain: Vec<u8> = (0..n as usize * BLOCK_SIZE)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let par = CryptoEngine::new(2, 64 * 1024).unwrap();
        let ser = CryptoEngine::new(1, 64 * 1024).unwrap();
        let (mut a, mut b) = (plain.clone(), plain.clone());
        let mut ma = vec![Mac::default(); n as usize];
        let mut mb = ma.clone();
        par.seal(&keys.current(), &mut a, &tags, &mut ma);
        ser.seal(&keys.current(), &mut b, &tags, &mut mb);
        assert_eq!(a, b);
        assert_eq!(ma, mb);
        let mut bad = a.clone();
        bad[200 * BLOCK_SIZE + 5] ^= 0x80;
        bad[250 * BLOCK_SIZE + 5] ^= 0x80;
        assert_eq!(par.open(&keys, &mut bad, &tags, &ma), Err(200));
        par.open(&keys, &mut a, &tags, &ma).unwrap();
        assert_eq!(a, plain);
    }
}
