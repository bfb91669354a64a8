//! A global allocator that counts allocations over the whole process (for tests that show
//! a path allocates nothing per message). A test crate installs it with
//! `#[global_allocator] static GLOBAL: Counting = Counting;` and reads [`allocations`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// A size whose allocations are also counted apart (0: none).
static WATCHED_SIZE: AtomicUsize = AtomicUsize::new(0);
static WATCHED: AtomicU64 = AtomicU64::new(0);

/// Allocations (and reallocations) so far, on every thread.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Counts, from now on, allocations of exactly `size` bytes apart too (for one buffer
/// among a path's other allocations); returns how many were counted so far.
#[allow(dead_code)]
pub fn watch_size(size: usize) -> u64 {
    WATCHED_SIZE.store(size, Ordering::Relaxed);
    WATCHED.load(Ordering::Relaxed)
}

/// Allocations of the size given to [`watch_size`] so far.
#[allow(dead_code)]
pub fn watched_allocations() -> u64 {
    WATCHED.load(Ordering::Relaxed)
}

fn count(size: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    if size == WATCHED_SIZE.load(Ordering::Relaxed) {
        WATCHED.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}
