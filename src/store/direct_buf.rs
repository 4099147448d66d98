//! Buffers for O_DIRECT reads: 2 MiB-aligned, asked to be backed by a
//! transparent huge page, and reused by each thread.
//!
//! An O_DIRECT read goes from the device straight into the caller's memory,
//! and the block layer turns it into one device request per run of
//! physically contiguous memory it can fit (`max_segments` pieces each). In
//! ordinary 4 KiB pages a 1 MiB read became about four requests of 270 KiB
//! on the project's virtio disk; in one huge page it is one request, and the
//! same disk then served about twice the bandwidth (1.0 against 2.0 GB/s for
//! 1 MiB O_DIRECT reads of a 1 GiB file, docs/PERFORMANCE.md). Where huge
//! pages are not available (`transparent_hugepage` set to `never`, no
//! contiguous memory, another system) the buffer is ordinary memory and reads
//! work as before.
//!
//! Each thread keeps one buffer of [`HUGE`] bytes once it has made a direct
//! read (a mount's request threads: one each, counted in
//! `kmsfs::cli::memory_bound`); a larger read, or a nested one, takes a
//! buffer of its own for the call. The bytes are sealed records read from the
//! backing store (ciphertext), never plaintext.

use std::cell::RefCell;
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

/// Size and alignment of a huge page on x86-64 and arm64 (4 KiB base pages).
pub(super) const HUGE: usize = 2 << 20;

/// [`HUGE`]-aligned anonymous memory of its own mapping (zeroed by the
/// kernel, and untouched until first used, so that the first touch can take
/// a huge page). Also the FUSE layer's reply buffer for reads: the kernel
/// pins a reply's pages one by one to copy them, which costs less in a huge
/// page. `wipe`: zeroed before it is unmapped (it held plaintext).
pub struct AlignedBuf {
    ptr: NonNull<c_void>,
    size: usize,
    wipe: bool,
}

// SAFETY: the buffer owns its mapping; nothing else points into it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// At least `len` bytes (a multiple of [`HUGE`]), wiped on drop when
    /// `wipe`.
    pub fn new(len: usize, wipe: bool) -> Self {
        let size = len.max(1).next_multiple_of(HUGE);
        let map_len = size + HUGE;
        let failed = || -> ! {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(size, HUGE).expect("a valid layout"),
            )
        };
        let Some(n) = NonZeroUsize::new(map_len) else {
            failed()
        };
        // SAFETY: a new private anonymous mapping, at an address of the
        // kernel's choosing; it aliases nothing.
        let Ok(base) = (unsafe {
            mmap_anonymous(
                None,
                n,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }) else {
            failed()
        };
        // Keep the aligned middle; give back the head and the tail.
        let addr = base.as_ptr() as usize;
        let head = addr.next_multiple_of(HUGE) - addr;
        let tail = map_len - head - size;
        let ptr = base.map_addr(|a| a.saturating_add(head));
        // SAFETY: both ranges lie inside the mapping made above and outside
        // the part kept; failing to unmap them only wastes address space.
        unsafe {
            if head > 0 {
                let _ = munmap(base, head);
            }
            if tail > 0 {
                let _ = munmap(ptr.map_addr(|a| a.saturating_add(size)), tail);
            }
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use nix::sys::mman::{MmapAdvise, madvise};
            // A hint, before the first touch: refused or not, reads work.
            // SAFETY: the range is the kept part of the mapping.
            let _ = unsafe { madvise(ptr, size, MmapAdvise::MADV_HUGEPAGE) };
        }
        AlignedBuf { ptr, size, wipe }
    }

    pub fn len(&self) -> usize {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `size` bytes of a mapping owned by `self`
        // (zero-filled by the kernel, so initialised), borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.size) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.wipe {
            zeroize::Zeroize::zeroize(self.as_mut_slice());
        }
        // SAFETY: the kept part of the mapping made in `new`; nothing
        // borrows it any more.
        let _ = unsafe { munmap(self.ptr, self.size) };
    }
}

thread_local! {
    static BUF: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Runs `f` with a [`HUGE`]-aligned buffer of exactly `len` bytes (contents
/// unspecified): the thread's reused one when `len` fits in it, a fresh one
/// otherwise.
pub(super) fn with_buf<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut f = Some(f);
    if len <= HUGE {
        let r = BUF
            .try_with(|cell| {
                let mut slot = cell.try_borrow_mut().ok()?;
                let buf = slot.get_or_insert_with(|| AlignedBuf::new(HUGE, false));
                let f = f.take()?;
                Some(f(&mut buf.as_mut_slice()[..len]))
            })
            .ok()
            .flatten();
        if let Some(r) = r {
            return r;
        }
    }
    let f = f.take().expect("the closure runs once");
    f(&mut AlignedBuf::new(len, false).as_mut_slice()[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_sized_and_reused_per_thread() {
        let a = with_buf(4096, |b| {
            assert_eq!(b.len(), 4096);
            assert_eq!(b.as_ptr() as usize % HUGE, 0);
            b[0] = 7;
            b.as_ptr() as usize
        });
        // The same thread gets the same buffer back (contents unspecified).
        let again = with_buf(HUGE, |b| {
            assert_eq!(b.len(), HUGE);
            b.as_ptr() as usize
        });
        assert_eq!(a, again);
        // A nested call and a larger request get buffers of their own.
        with_buf(100, |outer| {
            let inner = with_buf(100, |b| b.as_ptr() as usize);
            assert_ne!(inner, outer.as_ptr() as usize);
            assert_eq!(inner % HUGE, 0);
        });
        let big = with_buf(HUGE + 1, |b| {
            assert_eq!(b.len(), HUGE + 1);
            b[HUGE] = 1;
            b.as_ptr() as usize
        });
        assert_ne!(big, a);
        assert_eq!(big % HUGE, 0);
    }
}
