//! The process's allocator: a general-purpose allocator (mimalloc in the binary) for ordinary
//! blocks, and an address-ordered first-fit arena for the large blocks that hold tensors.
//!
//! Why by hand: one CFG step of an SD 1.5 U-Net at 512×512 allocates and frees ~19 GB in blocks
//! of 1–130 MB, with at most ~170 MB live at once (measured with a counting allocator). Freed
//! memory must be held inside the denoising loop — returned to the OS, every block is faulted
//! in and zeroed again, 10–23% of a step — and mimalloc, holding it, needed ~290 MB for those
//! 170 MB: its pages are carved per size, so a freed 31 MB block does not serve two 10 MB ones.
//! Replaying the same trace, address-ordered free blocks that split and merge keep the footprint
//! at ~172 MB with first fit (the lowest block that fits), ~177 MB with best fit (the smallest);
//! on a later step's trace (139 MB live) first fit needed 139 MB, best fit 151 MB. General
//! allocators (mimalloc, glibc) and the TLSF crates do not let the program choose when free
//! pages go back to the OS per phase; this does, in ~200 lines: [`TensorArena::hold`] keeps
//! freed blocks resident, [`TensorArena::release`] returns every free page (`MADV_DONTNEED`),
//! and outside a hold a freed block's pages go back at once.
//!
//! The arena is one reserved range of address space (`PROT_NONE`, so it costs nothing until
//! used) made writable as it grows. Anything it cannot serve — an alignment above a page, a
//! reservation that failed or is full, a platform other than Linux — goes to the general
//! allocator.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks of this size and more go to the arena: tensors' data and kernels' scratch, not
/// their bookkeeping. (Measured at 1 MB, 256 KB, 64 KB and 16 KB: the denoising loop's
/// private memory 270, 231, 196 and 189 MB; below 64 KB mimalloc does as well.)
pub const LARGE_BLOCK_BYTES: usize = 64 << 10;

/// Address space reserved at the first large allocation (not memory: pages are backed only
/// once written).
const DEFAULT_RESERVATION_BYTES: usize = 256 << 30;

/// The writable part grows by this much at a time (one `mprotect` per step).
const GROWTH_BYTES: usize = 64 << 20;

/// Block sizes and addresses are multiples of this, so blocks never share a page and a free
/// block's pages can be returned on their own. Where the OS page is larger (some ARM
/// kernels), the arena is not used.
const GRANULE_BYTES: usize = 4 << 10;

/// Counters for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes from the start of the arena ever handed out (its high-water mark).
    pub top_bytes: usize,
    /// Bytes in free blocks below `top_bytes`.
    pub free_bytes: usize,
    /// Number of free blocks (after merging neighbours).
    pub free_blocks: usize,
}

/// A [`GlobalAlloc`] that serves large blocks from a first-fit arena and the rest from `A`.
pub struct TensorArena<A> {
    general: A,
    reservation_bytes: usize,
    /// Start address of the reserved range; 0 until reserved (read without the lock by
    /// `dealloc` to tell the arena's blocks from the general allocator's).
    start: AtomicUsize,
    /// While set, freed blocks keep their pages.
    holding: AtomicBool,
    free: Mutex<FreeBlocks>,
}

/// The arena's free blocks by offset (merged with their neighbours: a few dozen at most),
/// plus its extent.
struct FreeBlocks {
    reserve_failed: bool,
    writable: usize,
    top: usize,
    by_offset: BTreeMap<usize, usize>,
}

fn round_up(bytes: usize) -> usize {
    bytes.div_ceil(GRANULE_BYTES) * GRANULE_BYTES
}

fn is_large(layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= LARGE_BLOCK_BYTES && layout.align() <= GRANULE_BYTES
}

impl<A> TensorArena<A> {
    pub const fn new(general: A) -> Self {
        Self::with_reservation(general, DEFAULT_RESERVATION_BYTES)
    }

    /// An arena over at most `reservation_bytes` of address space (tests use small ones to
    /// reach the fallback).
    pub const fn with_reservation(general: A, reservation_bytes: usize) -> Self {
        Self {
            general,
            reservation_bytes: reservation_bytes / GRANULE_BYTES * GRANULE_BYTES,
            start: AtomicUsize::new(0),
            holding: AtomicBool::new(false),
            free: Mutex::new(FreeBlocks { reserve_failed: false, writable: 0, top: 0, by_offset: BTreeMap::new() }),
        }
    }

    /// From now on freed blocks keep their pages, for the next allocations to reuse.
    pub fn hold(&self) {
        self.holding.store(true, Ordering::SeqCst);
    }

    /// Returns the pages of every free block to the OS; from now on freed blocks return theirs
    /// at once.
    pub fn release(&self) {
        let free = self.lock();
        self.holding.store(false, Ordering::SeqCst);
        let start = self.start.load(Ordering::Acquire);
        if start != 0 {
            // Under the lock: no free block can be handed out while its pages are dropped.
            for (&offset, &len) in &free.by_offset {
                discard_pages(start + offset, len);
            }
        }
    }

    pub fn stats(&self) -> ArenaStats {
        let free = self.lock();
        ArenaStats { top_bytes: free.top, free_bytes: free.by_offset.values().sum(), free_blocks: free.by_offset.len() }
    }

    /// Whether `ptr` is one of the arena's blocks.
    pub fn owns(&self, ptr: *const u8) -> bool {
        let start = self.start.load(Ordering::Acquire);
        start != 0 && (ptr as usize).wrapping_sub(start) < self.reservation_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeBlocks> {
        // Nothing panics while the lock is held; should it, the block lists are still whole.
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A block of `len` (rounded) bytes, or null when the arena cannot serve it.
    fn alloc_large(&self, len: usize) -> *mut u8 {
        let len = round_up(len);
        let mut free = self.lock();
        let Some(start) = self.reserved_start(&mut free) else { return std::ptr::null_mut() };
        // First fit: the lowest free block that is large enough.
        let fit = free.by_offset.iter().find(|&(_, &block_len)| block_len >= len).map(|(&o, &l)| (o, l));
        if let Some((offset, block_len)) = fit {
            free.by_offset.remove(&offset);
            if block_len > len {
                free.by_offset.insert(offset + len, block_len - len);
            }
            return (start + offset) as *mut u8;
        }
        // None fits: grow at the top, starting inside a free block that ends there.
        let top = free.top;
        let free_at_top = free.by_offset.last_key_value().filter(|&(&o, &l)| o + l == top).map(|(&o, _)| o);
        if let Some(free_offset) = free_at_top {
            free.by_offset.remove(&free_offset);
        }
        let offset = free_at_top.unwrap_or(top);
        let end = offset + len;
        if end > free.writable && !self.make_writable(&mut free, start, end) {
            if let Some(free_offset) = free_at_top {
                free.by_offset.insert(free_offset, top - free_offset);
            }
            return std::ptr::null_mut();
        }
        free.top = end;
        (start + offset) as *mut u8
    }

    fn dealloc_large(&self, ptr: *mut u8, len: usize) {
        let mut len = round_up(len);
        if !self.holding.load(Ordering::SeqCst) {
            // Still this caller's block, so no one else touches it meanwhile.
            discard_pages(ptr as usize, len);
        }
        let mut free = self.lock();
        let mut offset = ptr as usize - self.start.load(Ordering::Acquire);
        let before = free.by_offset.range(..offset).next_back().map(|(&o, &l)| (o, l));
        if let Some((before_offset, before_len)) = before.filter(|&(o, l)| o + l == offset) {
            free.by_offset.remove(&before_offset);
            offset = before_offset;
            len += before_len;
        }
        if let Some(after_len) = free.by_offset.remove(&(offset + len)) {
            len += after_len;
        }
        free.by_offset.insert(offset, len);
    }

    /// The arena's start address, reserving its address space on first use.
    fn reserved_start(&self, free: &mut FreeBlocks) -> Option<usize> {
        let start = self.start.load(Ordering::Acquire);
        if start != 0 {
            return Some(start);
        }
        if free.reserve_failed || self.reservation_bytes == 0 {
            return None;
        }
        match reserve_address_space(self.reservation_bytes) {
            Some(start) => {
                self.start.store(start, Ordering::Release);
                Some(start)
            }
            None => {
                free.reserve_failed = true;
                None
            }
        }
    }

    fn make_writable(&self, free: &mut FreeBlocks, start: usize, end: usize) -> bool {
        if end > self.reservation_bytes {
            return false;
        }
        let new_writable = (end.div_ceil(GROWTH_BYTES) * GROWTH_BYTES).min(self.reservation_bytes);
        if !protect_read_write(start + free.writable, new_writable - free.writable) {
            return false;
        }
        free.writable = new_writable;
        true
    }
}

// SAFETY: large blocks are disjoint granule-aligned ranges of the reserved space handed out
// once until freed (the free lists are only changed under the lock); all other requests,
// and those the arena declines, go to `A`, and `dealloc`/`realloc` route by address.
unsafe impl<A: GlobalAlloc> GlobalAlloc for TensorArena<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            let ptr = self.alloc_large(layout.size());
            if !ptr.is_null() {
                return ptr;
            }
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { self.general.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            let ptr = self.alloc_large(layout.size());
            if !ptr.is_null() {
                // SAFETY: the block is at least `layout.size()` bytes and this caller's.
                unsafe { ptr.write_bytes(0, layout.size()) };
                return ptr;
            }
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { self.general.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.owns(ptr) {
            self.dealloc_large(ptr, layout.size());
        } else {
            // SAFETY: not the arena's, so `A` allocated it with this layout.
            unsafe { self.general.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `realloc`'s contract makes this a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let owned = self.owns(ptr);
        if !owned && !is_large(new_layout) {
            // SAFETY: `A`'s block, staying with `A`.
            return unsafe { self.general.realloc(ptr, layout, new_size) };
        }
        if owned && round_up(new_size) == round_up(layout.size()) {
            return ptr;
        }
        // SAFETY: the caller's contract; the old block is valid for `layout.size()` bytes and
        // the new one for `new_size`.
        unsafe {
            let new_ptr = self.alloc(new_layout);
            if !new_ptr.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new_ptr
        }
    }
}

#[cfg(target_os = "linux")]
fn reserve_address_space(bytes: usize) -> Option<usize> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page <= 0 || !GRANULE_BYTES.is_multiple_of(page as usize) {
        return None;
    }
    // SAFETY: a fresh private mapping that nothing else refers to.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    // Page-aligned, hence granule-aligned.
    (ptr != libc::MAP_FAILED).then_some(ptr as usize)
}

#[cfg(target_os = "linux")]
fn protect_read_write(addr: usize, bytes: usize) -> bool {
    // SAFETY: a range inside the arena's own reservation that holds no block yet.
    unsafe { libc::mprotect(addr as *mut libc::c_void, bytes, libc::PROT_READ | libc::PROT_WRITE) == 0 }
}

#[cfg(target_os = "linux")]
fn discard_pages(addr: usize, bytes: usize) {
    // SAFETY: whole pages of a free (or just freed) block; they read back as zeros.
    unsafe { libc::madvise(addr as *mut libc::c_void, bytes, libc::MADV_DONTNEED) };
}

#[cfg(not(target_os = "linux"))]
fn reserve_address_space(_bytes: usize) -> Option<usize> {
    None
}

#[cfg(not(target_os = "linux"))]
fn protect_read_write(_addr: usize, _bytes: usize) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
fn discard_pages(_addr: usize, _bytes: usize) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::alloc::System;

    use super::*;

    const MB: usize = 1 << 20;

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, 64).unwrap()
    }

    /// Whether the page holding `ptr` is resident (`mincore`).
    fn resident(ptr: *const u8) -> bool {
        let page = 4096;
        let mut vec = [0u8; 1];
        let addr = (ptr as usize) / page * page;
        // SAFETY: querying residency of a mapped page writes one byte into `vec`.
        let rc = unsafe { libc::mincore(addr as *mut libc::c_void, page, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec[0] & 1 == 1
    }

    #[test]
    fn large_blocks_come_from_the_arena_and_small_ones_do_not() {
        let arena = TensorArena::new(System);
        unsafe {
            let small = arena.alloc(layout(1000));
            let large = arena.alloc(layout(3 * MB));
            let unaligned = arena.alloc(Layout::from_size_align(2 * MB, 1 << 20).unwrap());
            assert!(!arena.owns(small));
            assert!(arena.owns(large));
            assert!(!arena.owns(unaligned), "alignments above a granule go to the general allocator");
            assert_eq!(arena.stats().top_bytes, 3 * MB);
            large.write_bytes(7, 3 * MB);
            arena.dealloc(small, layout(1000));
            arena.dealloc(large, layout(3 * MB));
            arena.dealloc(unaligned, Layout::from_size_align(2 * MB, 1 << 20).unwrap());
        }
        assert_eq!(arena.stats(), ArenaStats { top_bytes: 3 * MB, free_bytes: 3 * MB, free_blocks: 1 });
    }

    #[test]
    fn freed_neighbours_merge_and_serve_a_larger_block_without_growing() {
        let arena = TensorArena::new(System);
        unsafe {
            let a = arena.alloc(layout(2 * MB));
            let b = arena.alloc(layout(3 * MB));
            let c = arena.alloc(layout(MB));
            arena.dealloc(a, layout(2 * MB));
            arena.dealloc(b, layout(3 * MB));
            assert_eq!(arena.stats().free_blocks, 1);
            let merged = arena.alloc(layout(5 * MB));
            assert_eq!(merged, a);
            assert_eq!(arena.stats(), ArenaStats { top_bytes: 6 * MB, free_bytes: 0, free_blocks: 0 });
            arena.dealloc(c, layout(MB));
            arena.dealloc(merged, layout(5 * MB));
        }
        assert_eq!(arena.stats(), ArenaStats { top_bytes: 6 * MB, free_bytes: 6 * MB, free_blocks: 1 });
    }

    #[test]
    fn the_lowest_free_block_that_fits_is_chosen_and_split() {
        let arena = TensorArena::new(System);
        unsafe {
            let small = arena.alloc(layout(MB));
            let keep1 = arena.alloc(layout(MB));
            let big = arena.alloc(layout(4 * MB));
            let keep2 = arena.alloc(layout(MB));
            arena.dealloc(small, layout(MB));
            arena.dealloc(big, layout(4 * MB));
            // 1 MB free at 0 is too small; the 4 MB block above it is split.
            let first = arena.alloc(layout(2 * MB - 100));
            assert_eq!(first, big);
            let rest = arena.alloc(layout(2 * MB));
            assert_eq!(rest, big.add(2 * MB), "sizes are rounded to whole pages, the rest stays free");
            let low = arena.alloc(layout(MB));
            assert_eq!(low, small);
            // Nothing free fits 5 MB: growing at the top starts in the free block that ends there.
            arena.dealloc(keep2, layout(MB));
            let grown = arena.alloc(layout(5 * MB));
            assert_eq!(grown, keep2);
            assert_eq!(arena.stats().top_bytes, MB + MB + 4 * MB + 5 * MB);
            for (ptr, bytes) in [(keep1, MB), (first, 2 * MB - 100), (rest, 2 * MB), (low, MB), (grown, 5 * MB)] {
                arena.dealloc(ptr, layout(bytes));
            }
        }
        assert_eq!(arena.stats(), ArenaStats { top_bytes: 11 * MB, free_bytes: 11 * MB, free_blocks: 1 });
    }

    #[test]
    fn held_pages_stay_resident_until_release() {
        let arena = TensorArena::new(System);
        arena.hold();
        unsafe {
            let block = arena.alloc(layout(4 * MB));
            block.write_bytes(1, 4 * MB);
            arena.dealloc(block, layout(4 * MB));
            assert!(resident(block) && resident(block.add(4 * MB - 1)), "held pages were returned");
            arena.release();
            assert!(!resident(block) && !resident(block.add(4 * MB - 1)), "release kept pages");
            // Outside a hold a freed block's pages go back at once.
            let again = arena.alloc_zeroed(layout(4 * MB));
            assert_eq!(again, block);
            assert!(std::slice::from_raw_parts(again, 4 * MB).iter().all(|&b| b == 0));
            again.write_bytes(2, 4 * MB);
            arena.dealloc(again, layout(4 * MB));
            assert!(!resident(again));
        }
    }

    #[test]
    fn alloc_zeroed_clears_a_reused_block() {
        let arena = TensorArena::new(System);
        arena.hold();
        unsafe {
            let block = arena.alloc(layout(2 * MB));
            block.write_bytes(0xAB, 2 * MB);
            arena.dealloc(block, layout(2 * MB));
            let zeroed = arena.alloc_zeroed(layout(2 * MB));
            assert_eq!(zeroed, block);
            assert!(std::slice::from_raw_parts(zeroed, 2 * MB).iter().all(|&b| b == 0));
            arena.dealloc(zeroed, layout(2 * MB));
        }
    }

    #[test]
    fn realloc_keeps_contents_across_the_size_threshold() {
        let arena = TensorArena::new(System);
        unsafe {
            let mut ptr = arena.alloc(layout(1000));
            let pattern = |i: usize| (i * 31 % 251) as u8;
            for i in 0..1000 {
                *ptr.add(i) = pattern(i);
            }
            let mut len = 1000;
            for new_len in [3 * MB, 3 * MB + 100, 5 * MB, 2000, 500] {
                ptr = arena.realloc(ptr, layout(len), new_len);
                assert!(!ptr.is_null());
                assert_eq!(arena.owns(ptr), new_len >= LARGE_BLOCK_BYTES, "{len} -> {new_len}");
                for i in 0..len.min(new_len).min(1000) {
                    assert_eq!(*ptr.add(i), pattern(i), "{len} -> {new_len} at {i}");
                }
                len = new_len;
            }
            arena.dealloc(ptr, layout(len));
        }
        assert_eq!(arena.stats().free_bytes, arena.stats().top_bytes);
    }

    #[test]
    fn a_full_reservation_falls_back_to_the_general_allocator() {
        let arena = TensorArena::with_reservation(System, 8 * MB);
        unsafe {
            let a = arena.alloc(layout(6 * MB));
            let b = arena.alloc(layout(6 * MB));
            assert!(arena.owns(a) && !arena.owns(b));
            b.write_bytes(3, 6 * MB);
            arena.dealloc(a, layout(6 * MB));
            arena.dealloc(b, layout(6 * MB));
            // Growing from the free block at the top fails, and gives that block back.
            let d = arena.alloc(layout(12 * MB));
            assert!(!d.is_null() && !arena.owns(d));
            arena.dealloc(d, layout(12 * MB));
            assert_eq!(arena.stats(), ArenaStats { top_bytes: 6 * MB, free_bytes: 6 * MB, free_blocks: 1 });
            let c = arena.alloc(layout(8 * MB));
            assert_eq!(c, a);
            arena.dealloc(c, layout(8 * MB));
        }
    }

    /// Threads allocate, fill and free random sizes; every block must keep its own contents
    /// (no two live blocks overlap) and the free lists must add up at the end.
    #[test]
    fn concurrent_random_use_keeps_blocks_disjoint() {
        let arena = TensorArena::new(System);
        arena.hold();
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let arena = &arena;
                scope.spawn(move || {
                    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ thread;
                    let mut next = move || {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state
                    };
                    let mut live: Vec<(*mut u8, usize, u8)> = Vec::new();
                    for round in 0..400 {
                        if live.len() < 12 && next() % 3 != 0 {
                            let len = MB + (next() as usize % (6 * MB));
                            let tag = (round % 250) as u8 + 1;
                            let ptr = unsafe { arena.alloc(layout(len)) };
                            assert!(!ptr.is_null());
                            unsafe { ptr.write_bytes(tag, len) };
                            live.push((ptr, len, tag));
                        } else if !live.is_empty() {
                            let (ptr, len, tag) = live.swap_remove(next() as usize % live.len());
                            let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
                            assert!(bytes.iter().all(|&b| b == tag), "a block was overwritten");
                            unsafe { arena.dealloc(ptr, layout(len)) };
                        }
                    }
                    for (ptr, len, _) in live {
                        unsafe { arena.dealloc(ptr, layout(len)) };
                    }
                });
            }
        });
        let stats = arena.stats();
        assert_eq!(stats.free_bytes, stats.top_bytes);
        assert_eq!(stats.free_blocks, 1, "all free space merged back into one block");
        arena.release();
    }
}
