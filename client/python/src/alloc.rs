//! The allocator of the core's Rust code inside a Python process: the
//! system's, except that blocks of 1 MiB or more are mapped from the kernel
//! and unmapped when freed.
//!
//! A round allocates a few model-sized buffers (the model as received, the
//! update, the upload's encoding) on whichever thread gets there, and frees
//! them. glibc serves them from each thread's own arena once its adaptive
//! mmap threshold has risen past their size, and keeps what they free: the
//! core's RSS then grew a model each round a new thread allocated one, to
//! 3.5× the model above its start with a `fit` that does nothing
//! (BENCHMARKS.md, issue 18), against 1.6× when those buffers are mapped.
//! Setting glibc's threshold (`mallopt`) would do the same for the whole
//! process, torch included; this changes nothing outside the core's own
//! allocations. Unix only; elsewhere the system's allocator serves all.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large are mapped: model-sized buffers and upload
/// chunks, not the many small allocations a round makes.
const MAPPED: usize = 1 << 20;

pub struct LargeMapped;

fn mapped(layout: &Layout) -> bool {
    // mmap's pages are aligned to 4 KiB; larger alignments go to the system.
    layout.size() >= MAPPED && layout.align() <= 4096
}

// SAFETY: every block is either the system allocator's, allocated and freed
// there, or one whole mapping of `layout.size()` bytes, made and unmapped
// here; `mapped` decides which from the layout, which the caller passes
// unchanged to `dealloc` (GlobalAlloc's contract), so both agree.
unsafe impl GlobalAlloc for LargeMapped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !mapped(&layout) {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { System.alloc(layout) };
        }
        // SAFETY: an anonymous private mapping asks nothing of memory that
        // exists; failure is MAP_FAILED, reported as null.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p.cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            // SAFETY: as `alloc`; fresh anonymous mappings are zero-filled.
            unsafe { self.alloc(layout) }
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract: `new_size` is non-zero and, with
        // `layout.align()`, a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !mapped(&layout) && !mapped(&new) {
            // Small to small: the system may grow the block in place.
            // SAFETY: the system allocated `ptr` with `layout`.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Into, out of or between mappings: a new block, copied.
        // SAFETY: `new` is valid (above); `ptr` is live for `layout.size()`
        // bytes and freed with its own layout once copied.
        unsafe {
            let fresh = self.alloc(new);
            if !fresh.is_null() {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            fresh
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped(&layout) {
            // SAFETY: `ptr` is the start of a mapping of exactly this size,
            // made by `alloc` for the same layout.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        } else {
            // SAFETY: the system allocated it with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}

#[global_allocator]
static ALLOCATOR: LargeMapped = LargeMapped;

#[cfg(test)]
mod tests {
    #[test]
    fn large_and_small_blocks_hold_and_free_their_values() {
        for len in [10usize, (1 << 20) / 4 - 1, (1 << 20) / 4, 3 << 20] {
            let mut v = vec![0f32; len];
            assert!(v.iter().all(|x| *x == 0.0), "zeroed");
            v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            // Growth moves small blocks into mappings and mappings into larger ones.
            v.extend(std::iter::repeat_n(1.5, len));
            assert_eq!(v[len - 1], (len - 1) as f32);
            assert_eq!(v[2 * len - 1], 1.5);
            let shrunk: Vec<f32> = v.into_iter().take(5).collect();
            assert_eq!(shrunk, [0.0, 1.0, 2.0, 3.0, 4.0]);
        }
    }
}
