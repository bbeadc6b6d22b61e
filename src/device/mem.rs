//! An in-memory device that can record every write, flush and discard, for
//! crash tests, and can be given a capacity to simulate a full disk.

use std::io;
use std::sync::Mutex;

use super::Device;

/// One recorded operation, in issue order.
#[derive(Clone, Debug)]
pub enum RecordedOp {
    Write { offset: u64, data: Vec<u8> },
    Discard { offset: u64, len: u64 },
    Flush,
}

struct Inner {
    data: Vec<u8>,
    ops: Option<Vec<RecordedOp>>,
    capacity: Option<u64>,
    /// Flushes that had something to sync, and whether something has
    /// been written since the last one.
    flushes: u64,
    unflushed: bool,
    /// Calls to [`Device::allocate`].
    allocations: u64,
}

pub struct MemDevice {
    inner: Mutex<Inner>,
}

impl MemDevice {
    pub fn new() -> Self {
        Self::from_image(Vec::new())
    }

    pub fn from_image(data: Vec<u8>) -> Self {
        MemDevice {
            inner: Mutex::new(Inner {
                data,
                ops: None,
                capacity: None,
                flushes: 0,
                unflushed: false,
                allocations: 0,
            }),
        }
    }

    /// Starts recording every write, discard and flush.
    pub fn record(&self) {
        self.lock().ops = Some(Vec::new());
    }

    /// How many operations have been recorded so far.
    pub fn recorded_len(&self) -> usize {
        self.lock().ops.as_ref().map_or(0, |o| o.len())
    }

    /// Returns and clears the recorded operations.
    pub fn take_ops(&self) -> Vec<RecordedOp> {
        self.lock().ops.replace(Vec::new()).unwrap_or_default()
    }

    /// Limits the device to `bytes`: growing past it fails with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// How many times [`Device::allocate`] was called.
    pub fn allocations(&self) -> u64 {
        self.lock().allocations
    }

    pub fn image(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for MemDevice {
    fn default() -> Self {
        Self::new()
    }
}

fn grow(inner: &mut Inner, end: u64) -> io::Result<()> {
    if end as usize > inner.data.len() {
        if inner.capacity.is_some_and(|c| end > c) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        inner.data.resize(end as usize, 0);
    }
    Ok(())
}

impl Device for MemDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let inner = self.lock();
        let len = inner.data.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let n = ((len - offset) as usize).min(buf.len());
        buf[..n].copy_from_slice(&inner.data[offset as usize..offset as usize + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut inner = self.lock();
        grow(&mut inner, offset + buf.len() as u64)?;
        inner.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        inner.unflushed = true;
        if let Some(ops) = inner.ops.as_mut() {
            ops.push(RecordedOp::Write {
                offset,
                data: buf.to_vec(),
            });
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        // Counted like a file's: only a flush that had something to sync.
        if std::mem::take(&mut inner.unflushed) {
            inner.flushes += 1;
        }
        if let Some(ops) = inner.ops.as_mut() {
            ops.push(RecordedOp::Flush);
        }
        Ok(())
    }

    fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        inner.unflushed = true;
        inner.allocations += 1;
        grow(&mut inner, offset + len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let end = ((offset + len) as usize).min(inner.data.len());
        if (offset as usize) < end {
            inner.data[offset as usize..end].fill(0);
        }
        inner.unflushed = true;
        if let Some(ops) = inner.ops.as_mut() {
            ops.push(RecordedOp::Discard { offset, len });
        }
        Ok(())
    }

    fn fixed_size(&self) -> bool {
        false
    }
}
