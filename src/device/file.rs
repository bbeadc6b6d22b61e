//! A regular file (sparse, grows with data) or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::Device;

pub struct FileDevice {
    file: File,
    path: PathBuf,
    block_device: bool,
    /// Something was written since the last flush; an idle flush is free.
    unflushed: AtomicBool,
    /// Held across a flush, so that a flush that finds nothing new to sync
    /// still waits for one in progress (which may cover its caller's data).
    flushing: Mutex<()>,
    /// Flushes that synced something.
    flushes: AtomicU64,
    /// Small writes not yet handed to the host (see [`Tail`]).
    tail: Mutex<Tail>,
}

/// Small writes that each continue the one before, held in memory and
/// handed to the host as one write: the log appends a record (a summary
/// block, then its payload) per transaction, and each metadata operation
/// (a create, an unlink) commits a small one. Each pwrite costs a system
/// call and the host file system's own work per write whatever its size;
/// gathering them saved 5-10 µs of a 30-55 µs operation (`cargo bench
/// --bench fs_ops`, docs/PERFORMANCE.md).
///
/// Nothing is promised before a flush, and every path that could observe
/// the file writes the tail out first: a flush, a write elsewhere (so
/// writes reach the host in the order they were made), a read that
/// overlaps it, an allocation, a discard, the data ranges, write-behind,
/// and drop.
#[derive(Default)]
struct Tail {
    offset: u64,
    data: Vec<u8>,
}

/// A write at least this long goes to the host at once.
const TAIL_DIRECT: usize = 64 * 1024;
/// The most the tail holds.
const TAIL_CAP: usize = 256 * 1024;

impl Tail {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }

    fn overlaps(&self, offset: u64, len: usize) -> bool {
        !self.data.is_empty() && offset < self.end() && self.offset < offset + len as u64
    }
}

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);

impl FileDevice {
    /// Creates a new regular file (mode 0600). Fails if it exists. The
    /// directory entry is made durable too.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        Self::lock(&file, path, libc::LOCK_EX)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
        Ok(Self::with(file, path, false))
    }

    /// Opens an existing file or block device. A writable open takes an
    /// exclusive lock and a read-only open a shared one, so a second writer,
    /// or a reader while a writer runs, is refused instead of seeing (or
    /// making) a half-written volume.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let block_device = file.metadata()?.file_type().is_block_device();
        Self::lock(
            &file,
            path,
            if writable {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            },
        )?;
        Ok(Self::with(file, path, block_device))
    }

    /// Opens read-only without any lock, to read a header while another
    /// process may hold the volume. Nothing beyond the header is consistent.
    pub fn open_unlocked(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Self::with(file, path, block_device))
    }

    /// Whether some process holds the volume at `path` open (a mount,
    /// read-write or read-only, or another command): its lock is taken.
    pub fn is_held(path: &Path) -> io::Result<bool> {
        let file = File::open(path)?;
        match Self::lock(&file, path, libc::LOCK_EX) {
            Ok(()) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Opens a block device (or file) for `create`, with the lock held.
    pub fn open_for_create(path: &Path) -> io::Result<Self> {
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => Self::open(path, true),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} already exists; remove it first or pick another path",
                    path.display()
                ),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(e),
        }
    }

    fn lock(file: &File, path: &Path, how: libc::c_int) -> io::Result<()> {
        // SAFETY: flock on a valid, owned descriptor has no memory effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another lsvfs process (it is locked)",
                        path.display()
                    ),
                ));
            }
            return Err(e);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with(file: File, path: &Path, block_device: bool) -> Self {
        FileDevice {
            file,
            path: path.to_owned(),
            block_device,
            unflushed: AtomicBool::new(true),
            flushing: Mutex::new(()),
            flushes: AtomicU64::new(0),
            tail: Mutex::new(Tail::default()),
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the tail to the host. On failure it stays, so that a later
    /// flush retries it rather than reporting success without it.
    fn write_out(&self, tail: &mut Tail) -> io::Result<()> {
        if tail.data.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&tail.data, tail.offset)?;
        tail.data.clear();
        Ok(())
    }
}

impl Drop for FileDevice {
    fn drop(&mut self) {
        // Best effort: what was never flushed was never promised, but a
        // closing volume flushes first, and this only keeps a reader that
        // opens the file next from seeing less than was written.
        let mut tail = std::mem::take(self.tail.get_mut().unwrap_or_else(|p| p.into_inner()));
        let _ = self.write_out(&mut tail);
    }
}

/// sync_file_range(2) over `len` bytes at `offset` of `file` (0: to the
/// end), with `flags` (`libc::SYNC_FILE_RANGE_*`). A hint: a failure (a
/// pipe, a file system without it) only means no early write-back, and a
/// later fsync reports any write error.
pub fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) {
    // SAFETY: sync_file_range on a valid descriptor that `file` holds; it
    // reads and writes no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            flags,
        );
    }
}

impl Device for FileDevice {
    fn write_behind(&self) {
        if self.write_out(&mut self.tail()).is_err() {
            // The next flush retries and reports it.
            return;
        }
        sync_file_range(&self.file, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }

    fn will_need(&self, offset: u64, len: u64) {
        // SAFETY: posix_fadvise on a valid, owned descriptor has no memory
        // effects; a failure only means no read-ahead.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut tail = self.tail();
        if tail.overlaps(offset, buf.len()) {
            // Rare (the volume keeps what it just wrote in its caches):
            // write the tail out and read with the lock held, so that no
            // new tail over this range appears meanwhile.
            self.write_out(&mut tail)?;
        } else {
            drop(tail);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut tail = self.tail();
        // Before the write: a flush that clears the flag after this point
        // writes the tail out, so it covers this write too.
        self.unflushed.store(true, Ordering::Release);
        if !tail.data.is_empty()
            && offset == tail.end()
            && buf.len() < TAIL_DIRECT
            && tail.data.len() + buf.len() <= TAIL_CAP
        {
            tail.data.extend_from_slice(buf);
            return Ok(());
        }
        self.write_out(&mut tail)?;
        if buf.len() < TAIL_DIRECT {
            tail.offset = offset;
            tail.data.extend_from_slice(buf);
            return Ok(());
        }
        // Not held across a large write: other writers and readers go on.
        drop(tail);
        #[cfg(test)]
        tests::DURING_DIRECT_WRITE.with(|h| h.borrow().as_ref().map(|h| h(self)));
        self.file.write_all_at(buf, offset)?;
        // Again once the data is in: a flush that began during the write
        // cleared the flag, and its fdatasync may have missed the data.
        self.unflushed.store(true, Ordering::Release);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // Cleared before the fdatasync: a write that lands during it sets
        // the flag again, so the next flush covers it.
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.unflushed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // Its own statement: the tail's lock is not held across the
        // fdatasync, which would stall every reader and writer.
        let written = self.write_out(&mut self.tail());
        written
            .and_then(|_| self.file.sync_data())
            .inspect_err(|_| {
                self.unflushed.store(true, Ordering::Release);
            })?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn prepare(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        super::write_zeros(self, offset, len)?;
        self.write_out(&mut self.tail())?;
        // Start writing the zeros back now, so that the next flush finds
        // them on their way instead of waiting for all of them.
        sync_file_range(&self.file, offset, len, libc::SYNC_FILE_RANGE_WRITE);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 through the valid pointer.
            unsafe { blk_getsize64(self.file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
            Ok(size)
        } else {
            // A tail past the end grows the file when it is written out.
            let tail_end = {
                let t = self.tail();
                if t.data.is_empty() {
                    0
                } else {
                    t.end()
                }
            };
            Ok(self.file.metadata()?.len().max(tail_end))
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_out(&mut self.tail())?;
        self.unflushed.store(true, Ordering::Release);
        if self.block_device {
            return Ok(());
        }
        // SAFETY: fallocate on a valid descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        // Again once done, as after a large write.
        self.unflushed.store(true, Ordering::Release);
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // In order: a hole punched over a write still held would otherwise
        // be filled again when the tail is written out.
        self.write_out(&mut self.tail())?;
        self.unflushed.store(true, Ordering::Release);
        let rc = if self.block_device {
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 through the valid pointer.
            unsafe { blk_discard(self.file.as_raw_fd(), &range) }.map_or(-1, |_| 0)
        } else {
            // SAFETY: fallocate on a valid descriptor; no memory is passed.
            unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            }
        };
        // Again once done, as after a large write.
        self.unflushed.store(true, Ordering::Release);
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Discard is advisory: devices and filesystems without it keep the data.
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
            ) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    fn fixed_size(&self) -> bool {
        self.block_device
    }

    fn data_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        use nix::unistd::{lseek, Whence};
        if self.block_device {
            return None;
        }
        self.write_out(&mut self.tail()).ok()?;
        // A host file system without holes calls the whole file data: the
        // caller then only does more work than needed (discards of free
        // segments that are already holes cost little).
        let mut ranges = Vec::new();
        let mut at = 0;
        loop {
            let start = match lseek(&self.file, at, Whence::SeekData) {
                Ok(start) => start,
                // No data at or after `at`.
                Err(nix::errno::Errno::ENXIO) => return Some(ranges),
                Err(_) => return None,
            };
            let end = lseek(&self.file, start, Whence::SeekHole).ok()?;
            if end <= start {
                return None;
            }
            ranges.push(start as u64..end as u64);
            at = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Runs inside a large write, after the unflushed flag is set and
        /// before the data reaches the host.
        pub(super) static DURING_DIRECT_WRITE: std::cell::RefCell<Option<fn(&FileDevice)>> =
            const { std::cell::RefCell::new(None) };
    }

    /// A flush that runs while a large write is on its way (it clears the
    /// flag, and its fdatasync may miss the data) leaves the write for the
    /// next flush to sync, not for it to skip as already synced.
    #[test]
    fn a_flush_during_a_large_write_leaves_it_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create(&dir.path().join("v")).unwrap();
        dev.flush().unwrap();
        DURING_DIRECT_WRITE.with(|h| *h.borrow_mut() = Some(|dev| dev.flush().unwrap()));
        dev.write_at(&vec![7u8; TAIL_DIRECT], 0).unwrap();
        DURING_DIRECT_WRITE.with(|h| *h.borrow_mut() = None);
        let before = dev.flushes();
        dev.flush().unwrap();
        assert_eq!(
            dev.flushes(),
            before + 1,
            "the flush after a large write skipped it as synced by one that ran during it"
        );
    }

    /// Written ranges are data; holes, whether never written or punched,
    /// are not.
    #[test]
    fn data_ranges_are_what_the_host_holds() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create(&dir.path().join("v")).unwrap();
        let spans = |dev: &FileDevice| -> Vec<(u64, u64)> {
            let ranges = dev.data_ranges().expect("a file's data ranges");
            ranges.iter().map(|r| (r.start, r.end)).collect()
        };
        assert_eq!(spans(&dev), vec![]);
        let mib = 1 << 20;
        dev.write_at(&vec![7u8; mib as usize], 0).unwrap();
        dev.write_at(&vec![7u8; mib as usize], 4 * mib).unwrap();
        dev.write_at(&[7u8; 4096], 6 * mib).unwrap();
        // Unflushed: the small write is still in the tail, in memory.
        assert_eq!(
            spans(&dev),
            vec![(0, mib), (4 * mib, 5 * mib), (6 * mib, 6 * mib + 4096)]
        );
        dev.discard(0, mib).unwrap();
        assert_eq!(
            spans(&dev),
            vec![(4 * mib, 5 * mib), (6 * mib, 6 * mib + 4096)]
        );
    }

    fn on_host(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    fn read(dev: &FileDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let n = dev.read_at(&mut b, offset).unwrap();
        b.truncate(n);
        b
    }

    /// Writers that interleave (each breaking the others' runs), readers
    /// of what was just written and a flusher, at once: every read sees
    /// the last write, and the file holds every write at the end.
    #[test]
    fn gathered_writes_stay_consistent_under_concurrent_writers_and_flushes() {
        const THREADS: u64 = 4;
        const BLOCKS: u64 = 300;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let dev = std::sync::Arc::new(FileDevice::create(&path).unwrap());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flusher = {
            let (dev, stop) = (dev.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    dev.flush().unwrap();
                }
            })
        };
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    for round in 0..3u8 {
                        for b in 0..BLOCKS {
                            let at = (b * THREADS + t) * 4096;
                            let fill = (t as u8) * 16 + round + 1;
                            dev.write_at(&[fill; 4096], at).unwrap();
                            assert_eq!(read(&dev, at, 4096), vec![fill; 4096]);
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        flusher.join().unwrap();
        dev.flush().unwrap();
        let host = on_host(&path);
        for b in 0..BLOCKS * THREADS {
            let fill = ((b % THREADS) as u8) * 16 + 3;
            let at = b as usize * 4096;
            assert!(host[at..at + 4096].iter().all(|x| *x == fill), "block {b}");
        }
    }

    /// Small writes that continue each other reach the host as one, and
    /// everything that can observe the file first sees them written.
    #[test]
    fn small_writes_in_a_row_are_gathered_and_never_lost_to_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let dev = FileDevice::create(&path).unwrap();
        dev.write_at(&[1; 4096], 0).unwrap();
        dev.write_at(&[2; 8192], 4096).unwrap();
        dev.write_at(&[], 12288).unwrap();
        // Held: not on the host yet, but counted in the length and read back.
        assert_eq!(on_host(&path).len(), 0);
        assert_eq!(dev.len().unwrap(), 12288);
        assert_eq!(read(&dev, 4096, 4096), vec![2; 4096]);
        // The read that overlapped wrote the tail out.
        assert_eq!(on_host(&path).len(), 12288);

        // A write elsewhere writes the tail out first, so an older write
        // never lands after a newer one over the same bytes.
        dev.write_at(&[3; 4096], 12288).unwrap();
        dev.write_at(&[4; 4096], 0).unwrap();
        let host = on_host(&path);
        assert_eq!(&host[12288..], &[3; 4096][..]);
        dev.write_at(&[5; 4096], 12288).unwrap();
        assert_eq!(read(&dev, 0, 16384)[..4096], [4; 4096]);
        assert_eq!(read(&dev, 12288, 8192), vec![5; 4096]);

        // A hole punched over a held write stays a hole.
        dev.write_at(&[6; 4096], 16384).unwrap();
        dev.discard(16384, 4096).unwrap();
        assert_eq!(read(&dev, 16384, 4096), vec![0; 4096]);

        // A flush puts the tail on the host; a large write goes at once.
        dev.write_at(&[7; 4096], 20480).unwrap();
        dev.flush().unwrap();
        assert_eq!(&on_host(&path)[20480..], &[7; 4096][..]);
        dev.write_at(&vec![8; TAIL_DIRECT], 24576).unwrap();
        assert_eq!(on_host(&path).len(), 24576 + TAIL_DIRECT);

        // The tail stops at TAIL_CAP and starts again after it.
        let end = 24576 + TAIL_DIRECT as u64;
        let piece = vec![9u8; 60 * 1024];
        for i in 0..6 {
            dev.write_at(&piece, end + i * piece.len() as u64).unwrap();
        }
        let written = on_host(&path).len() as u64 - end;
        assert!(
            written > 0 && written <= TAIL_CAP as u64 && written < 6 * 60 * 1024,
            "{written} bytes written out"
        );
        // Dropped without a flush: what it held still reaches the file.
        drop(dev);
        assert_eq!(on_host(&path).len() as u64, end + 6 * 60 * 1024);
        assert!(on_host(&path)[end as usize..].iter().all(|b| *b == 9));
    }
}
