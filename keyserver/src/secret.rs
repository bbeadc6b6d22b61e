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
/// stack frames that built them. Then zeroes the thread's vector registers
/// (see `clear_vector_registers`), as [`scrub_stack_small`] does.
#[inline(never)]
pub fn scrub_stack() {
    scrub::<{ 64 * 1024 }>();
}

/// Overwrites 16 KiB of stack below the caller: after a keyed hash, whose
/// state (the key, as chaining value) lives in the frames below, or a
/// batch of blocks through the cipher (whose frames hold a 4 KiB array of
/// tweaks above the cipher's copies of the key schedule). Then zeroes the
/// thread's vector registers.
#[inline(never)]
pub fn scrub_stack_small() {
    scrub::<{ 16 * 1024 }>();
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
    clear_vector_registers();
}

/// Zeroes the calling thread's SIMD registers. AES-NI and VAES keep round
/// keys in them (AES-256's first two are the two halves of its key), and
/// BLAKE3 its keyed chaining value; nothing overwrites them while the
/// thread sleeps, and a core dump records every thread's registers (found
/// by `tests/key_hygiene.rs`: a half of the XTS key was in the saved
/// registers of every thread that had sealed or opened a block).
fn clear_vector_registers() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            unsafe { clear_zmm() }
        } else if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX, checked just above.
            unsafe { clear_ymm() }
        } else {
            clear_xmm()
        }
    }
}

/// ZMM0-15 (which VZEROALL zeroes whole) and ZMM16-31.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn clear_zmm() {
    // SAFETY: writes registers only, every one of them declared clobbered
    // (`clobber_abi("C")`: all vector registers are caller-saved).
    unsafe {
        std::arch::asm!(
            "vzeroall",
            "vpxord zmm16, zmm16, zmm16",
            "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18",
            "vpxord zmm19, zmm19, zmm19",
            "vpxord zmm20, zmm20, zmm20",
            "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22",
            "vpxord zmm23, zmm23, zmm23",
            "vpxord zmm24, zmm24, zmm24",
            "vpxord zmm25, zmm25, zmm25",
            "vpxord zmm26, zmm26, zmm26",
            "vpxord zmm27, zmm27, zmm27",
            "vpxord zmm28, zmm28, zmm28",
            "vpxord zmm29, zmm29, zmm29",
            "vpxord zmm30, zmm30, zmm30",
            "vpxord zmm31, zmm31, zmm31",
            clobber_abi("C"),
            options(nomem, nostack, preserves_flags),
        )
    }
}

/// YMM0-15, whole.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn clear_ymm() {
    // SAFETY: as in `clear_zmm`.
    unsafe {
        std::arch::asm!(
            "vzeroall",
            clobber_abi("C"),
            options(nomem, nostack, preserves_flags)
        )
    }
}

/// XMM0-15 (SSE2 is part of x86-64).
#[cfg(target_arch = "x86_64")]
fn clear_xmm() {
    // SAFETY: as in `clear_zmm`.
    unsafe {
        std::arch::asm!(
            "pxor xmm0, xmm0",
            "pxor xmm1, xmm1",
            "pxor xmm2, xmm2",
            "pxor xmm3, xmm3",
            "pxor xmm4, xmm4",
            "pxor xmm5, xmm5",
            "pxor xmm6, xmm6",
            "pxor xmm7, xmm7",
            "pxor xmm8, xmm8",
            "pxor xmm9, xmm9",
            "pxor xmm10, xmm10",
            "pxor xmm11, xmm11",
            "pxor xmm12, xmm12",
            "pxor xmm13, xmm13",
            "pxor xmm14, xmm14",
            "pxor xmm15, xmm15",
            clobber_abi("C"),
            options(nomem, nostack, preserves_flags),
        )
    }
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
