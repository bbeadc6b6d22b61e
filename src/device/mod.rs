//! Device layer: the backing file or block device behind a trait, so tests
//! can record every write and cut the power at any of them.
//!
//! Offsets and lengths are in bytes. The volume layer only issues whole,
//! 4 KiB-aligned blocks.

mod file;
mod mem;

pub use file::{sync_file_range, FileDevice};
pub use mem::{MemDevice, RecordedOp};

use std::io;

use crate::error::Class;

/// A failed operation on the backing file or device: what was being done,
/// and the system's error.
#[derive(Debug)]
pub struct DeviceError {
    pub context: String,
    pub source: io::Error,
}

impl DeviceError {
    pub fn new(context: impl Into<String>, source: io::Error) -> DeviceError {
        DeviceError {
            context: context.into(),
            source,
        }
    }

    /// Out of space, busy (the volume is locked by another process), or I/O.
    pub fn class(&self) -> Class {
        Class::of_io(&self.source)
    }
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.class() {
            Class::NoSpace => write!(
                f,
                "no space left: {}: the backing device is full; free space on it",
                self.context
            ),
            // The lock's own message says who holds the volume.
            Class::Busy => write!(f, "{}", self.source),
            _ => write!(f, "{}: {}", self.context, self.source),
        }
    }
}

impl std::error::Error for DeviceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

pub trait Device: Send + Sync {
    /// Reads into `buf` from `offset`. Returns the number of bytes read,
    /// which is short only at the end of the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `offset`. Not durable until [`Device::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;

    /// Current size in bytes (a regular file's length, a block device's size).
    fn len(&self) -> io::Result<u64>;

    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reserves backing space for a range so that later writes into it cannot
    /// fail with ENOSPC. Devices that cannot reserve return Ok.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Tells the device a range holds nothing of value (punch hole / discard).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// True if the device cannot grow (a block device); its `len` is its capacity.
    fn fixed_size(&self) -> bool;

    /// A hint that `len` bytes at `offset` will be read soon: the device
    /// may start reading them now. Advisory; the default does nothing.
    fn will_need(&self, _offset: u64, _len: u64) {}

    /// A hint to start writing back what was written so far, without
    /// waiting for it: so that a later flush (another process's fsync) does
    /// not find a mountain of dirty data. Advisory; the default does nothing.
    fn write_behind(&self) {}

    /// How many flushes that synced something this device has done.
    fn flushes(&self) -> u64;

    /// The byte ranges the host holds data for, in order, where it can
    /// tell: a file's written extents (a range allocated and never
    /// written reads as zeros, and the host counts it as a hole). `None`
    /// for a block device, or a host file system that cannot say.
    fn data_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        None
    }

    /// Writes zeros over a range that holds nothing of value and that the
    /// caller will fill with small writes, each followed by a flush. On a
    /// file, a flush after writing into a hole or a preallocated
    /// (unwritten) range also commits the host file system's journal, to
    /// record the allocation; a flush after overwriting written blocks
    /// does not, and costs about half as much on ext4. The default writes
    /// the zeros with [`Device::write_at`]; a block device needs nothing.
    fn prepare(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
}

/// Writes `len` zero bytes at `offset`, a piece at a time.
fn write_zeros<D: Device + ?Sized>(dev: &D, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        dev.write_at(&ZEROS[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes, or fails with `UnexpectedEof` naming the offset.
pub fn read_exact_at(dev: &dyn Device, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let n = dev.read_at(buf, offset)?;
    if n < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "backing store ends at byte {}, needed {} bytes at offset {offset}",
                offset + n as u64,
                buf.len()
            ),
        ));
    }
    Ok(())
}
