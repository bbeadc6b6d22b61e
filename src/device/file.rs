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
        }
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
        let r = self.file.write_all_at(buf, offset);
        self.unflushed.store(true, Ordering::Release);
        r
    }

    fn flush(&self) -> io::Result<()> {
        // Cleared before the fdatasync: a write that lands during it sets
        // the flag again, so the next flush covers it.
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.unflushed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.file.sync_data().inspect_err(|_| {
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
            Ok(self.file.metadata()?.len())
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
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
}
