//! Memory for key material, shared by every lsvfs process that holds keys
//! (the mount daemon, the CLI, the key server).
//!
//! [`Locked`] keeps a value in its own anonymous mapping that is locked in
//! RAM (never written to swap), excluded from core dumps
//! (`MADV_DONTDUMP`), and zeroed before it is unmapped. [`harden_process`]
//! makes the whole process non-dumpable (no core file, no ptrace or
//! /proc/PID/mem by other processes of the same user) and sets its core
//! limit to zero. [`scrub_stack`] overwrites the stack below the caller,
//! where key schedules and KDF state were built before being moved into
//! locked memory.

use std::mem::{size_of, MaybeUninit};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once an mlock failed (a low RLIMIT_MEMLOCK): reported once.
static LOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// A `T` in locked, dump-excluded memory, zeroed on drop.
pub struct Locked<T> {
    ptr: NonNull<T>,
    map_len: usize,
}

// SAFETY: `Locked<T>` owns its mapping exclusively, like a `Box<T>`.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T`, like a `Box<T>`.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    /// Builds the value in place: `init` receives zeroed memory and must
    /// leave a valid `T` in it. Fails only if the system refuses the
    /// mapping (out of memory).
    pub fn new_with(init: impl FnOnce(&mut MaybeUninit<T>)) -> std::io::Result<Locked<T>> {
        let page = page_size();
        let map_len = size_of::<T>().max(1).div_ceil(page) * page;
        // SAFETY: an anonymous private mapping; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `p` is a fresh mapping of `map_len` bytes owned here.
        unsafe {
            // Excluded from core dumps whatever happens to the lock.
            libc::madvise(p, map_len, libc::MADV_DONTDUMP);
            // Not inherited by a child of fork (it would be copied unlocked).
            libc::madvise(p, map_len, libc::MADV_DONTFORK);
            if libc::mlock(p, map_len) != 0 && !LOCK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "could not lock key memory in RAM ({}); keys could reach swap. \
                     Raise the memlock limit (ulimit -l) or run as root.",
                    std::io::Error::last_os_error()
                );
            }
        }
        let ptr = NonNull::new(p.cast::<T>()).expect("mmap returned a non-null address");
        // SAFETY: page-aligned (so aligned for any T up to a page), zeroed
        // by the kernel, and large enough for a T.
        init(unsafe { &mut *ptr.as_ptr().cast::<MaybeUninit<T>>() });
        Ok(Locked { ptr, map_len })
    }

    /// Moves `value` into locked memory. The moved-from copy is the
    /// caller's to scrub (see [`scrub_stack`]).
    pub fn new(value: T) -> std::io::Result<Locked<T>> {
        Locked::new_with(|slot| {
            slot.write(value);
        })
    }
}

impl<T: Copy + Default> Locked<T> {
    /// A zero-initialized value (`T::default()`), to be filled in place.
    pub fn zeroed() -> std::io::Result<Locked<T>> {
        Locked::new_with(|slot| {
            slot.write(T::default());
        })
    }
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: initialized in `new_with`, alive until drop.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: initialized in `new_with`; `&mut self` is unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let p = self.ptr.as_ptr();
        // SAFETY: the value is initialized and dropped exactly once here;
        // then the whole mapping is overwritten with zeros (volatile, so
        // the writes are not optimized away), unlocked and unmapped.
        unsafe {
            std::ptr::drop_in_place(p);
            let bytes = p.cast::<u8>();
            for i in 0..self.map_len {
                std::ptr::write_volatile(bytes.add(i), 0);
            }
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            #[cfg(test)]
            tests::before_unmap(std::slice::from_raw_parts(bytes, self.map_len));
            libc::munlock(p.cast(), self.map_len);
            libc::munmap(p.cast(), self.map_len);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Makes this process non-dumpable (no core file; other processes of the
/// same user may not ptrace it or read its memory through /proc) and sets
/// its core-size limit to zero. Call before any key is loaded.
pub fn harden_process() {
    // SAFETY: prctl and setrlimit with plain integer arguments and a valid
    // rlimit struct; neither touches this process's memory otherwise.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
    }
}

/// Whether this process is dumpable (for tests and `lsvfs` diagnostics).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

/// Overwrites 64 KiB of stack below the caller with zeros: key schedules,
/// KDF state and key bytes moved into [`Locked`] memory leave copies in the
/// stack frames that built them.
#[inline(never)]
pub fn scrub_stack() {
    scrub::<{ 64 * 1024 }>();
}

/// Overwrites 8 KiB of stack below the caller: after a keyed hash, whose
/// state (the key, as chaining value) lives in the frames below.
#[inline(never)]
pub fn scrub_stack_small() {
    scrub::<{ 8 * 1024 }>();
}

#[inline(never)]
fn scrub<const BYTES: usize>() {
    let mut area = std::mem::MaybeUninit::<[u8; BYTES]>::uninit();
    // SAFETY: writes BYTES zeros into a local of exactly that size (a
    // memset, vectorized); `black_box` keeps the stores from being removed
    // as dead, and the fence from being moved.
    unsafe { std::ptr::write_bytes(area.as_mut_ptr(), 0, 1) };
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    std::hint::black_box(&area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// What `Drop` left in the mapping just before unmapping it.
        static LAST_UNMAPPED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    }

    pub(super) fn before_unmap(bytes: &[u8]) {
        LAST_UNMAPPED.with(|l| *l.borrow_mut() = Some(bytes.to_vec()));
    }

    #[test]
    fn dropping_locked_memory_zeroes_the_whole_mapping_before_unmapping_it() {
        let mut k = Locked::new([0u8; 48]).unwrap();
        k.copy_from_slice(&[0xA5u8; 48]);
        drop(k);
        // The whole mapping (a page) is checked, not only the value's bytes.
        let seen = LAST_UNMAPPED
            .with(|l| l.borrow_mut().take())
            .expect("drop ran");
        assert!(seen.len() >= 4096, "the mapping is at least a page");
        assert!(
            seen.iter().all(|b| *b == 0),
            "key bytes survived until munmap"
        );
    }

    #[test]
    fn locked_memory_holds_its_value_and_is_excluded_from_dumps() {
        let mut k = Locked::<[u8; 32]>::zeroed().unwrap();
        k.copy_from_slice(&[7u8; 32]);
        assert_eq!(*k, [7u8; 32]);
        let addr = k.as_ptr() as usize;
        // The mapping carries the "dd" (do not dump) flag in smaps.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_ours = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        in_ours = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if in_ours && line.starts_with("VmFlags:") {
                flags = Some(line.to_string());
            }
        }
        let flags = flags.expect("the mapping is listed in smaps");
        assert!(flags.contains(" dd"), "{flags}");
    }

    #[test]
    fn harden_process_makes_it_not_dumpable() {
        // In a child, so the test process itself stays as it was.
        // SAFETY: the child only calls async-signal-safe functions
        // (prctl, _exit) before exiting.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            harden_process();
            // SAFETY: see above.
            unsafe { libc::_exit(if is_dumpable() { 1 } else { 0 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
