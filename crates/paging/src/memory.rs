//! Where page tables live: the table-memory trait, frame allocation, and an
//! arena of host frames for tables that memvisor owns (and for tests).

use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

use memvisor_types::Address;

/// Why an entry could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// No memory backs this address (outside guest RAM, outside the arena, or MMIO).
    #[error("no memory backs table address {0:#x}")]
    Unbacked(u64),
    /// Entries are 8-byte aligned; the address is not.
    #[error("table address {0:#x} is not 8-byte aligned")]
    Misaligned(u64),
}

/// Memory holding page-table entries, addressed in the table's own physical
/// address space (`Addr`: guest-physical for a guest's tables, host-physical
/// for tables memvisor builds).
///
/// All methods take `&self`: table memory is shared with whoever else edits
/// the tables (a guest vCPU, another walker), so implementations use atomic
/// 8-byte accesses. The walker sets accessed and dirty flags only through
/// [`compare_exchange_entry`](Self::compare_exchange_entry), so a concurrent
/// change is never overwritten.
pub trait TableMemory {
    /// The physical address space the tables are addressed in.
    type Addr: Address;

    /// Reads the 8-byte entry at `addr`.
    fn read_entry(&self, addr: Self::Addr) -> Result<u64, MemoryError>;

    /// Writes the 8-byte entry at `addr`.
    fn write_entry(&self, addr: Self::Addr, value: u64) -> Result<(), MemoryError>;

    /// Atomically replaces the entry at `addr` with `new` if it still holds
    /// `current`. `Ok(Ok(current))` on success, `Ok(Err(actual))` when the
    /// entry held another value.
    fn compare_exchange_entry(
        &self,
        addr: Self::Addr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError>;
}

impl<T: TableMemory + ?Sized> TableMemory for &T {
    type Addr = T::Addr;
    #[inline]
    fn read_entry(&self, addr: Self::Addr) -> Result<u64, MemoryError> {
        (**self).read_entry(addr)
    }
    #[inline]
    fn write_entry(&self, addr: Self::Addr, value: u64) -> Result<(), MemoryError> {
        (**self).write_entry(addr, value)
    }
    #[inline]
    fn compare_exchange_entry(
        &self,
        addr: Self::Addr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        (**self).compare_exchange_entry(addr, current, new)
    }
}

/// A source of 4 KiB frames for new page tables.
///
/// The mapper zeroes every frame it receives before use, so an allocator need
/// not. Frames the mapper frees are returned in
/// [`Changes::freed_tables`](crate::Changes::freed_tables) rather than given
/// back directly: a freed table may still be cached by a TLB or
/// paging-structure cache until the caller has invalidated.
pub trait FrameAllocator<A: Address> {
    /// A free, 4 KiB-aligned frame, or `None` when out of frames.
    fn allocate_frame(&mut self) -> Option<A>;

    /// Returns a frame for reuse.
    fn free_frame(&mut self, frame: A);
}

impl<A: Address, T: FrameAllocator<A> + ?Sized> FrameAllocator<A> for &mut T {
    fn allocate_frame(&mut self) -> Option<A> {
        (**self).allocate_frame()
    }

    fn free_frame(&mut self, frame: A) {
        (**self).free_frame(frame);
    }
}

/// A contiguous run of host frames holding page tables, addressed from `base`.
///
/// Used for tables that memvisor builds itself (stage-2 tables, IO page
/// tables, restricted address spaces) and as the test arena. Entries are
/// `AtomicU64`, so walkers and mappers on several threads share it safely.
pub struct Arena<A: Address> {
    base: A,
    words: Vec<AtomicU64>,
}

impl<A: Address> fmt::Debug for Arena<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena").field("base", &self.base).field("frames", &self.frames()).finish()
    }
}

const WORDS_PER_FRAME: usize = 512;

impl<A: Address> Arena<A> {
    /// An arena of `frames` zeroed frames whose first frame is at `base`
    /// (rounded down to 4 KiB).
    pub fn new(base: A, frames: usize) -> Self {
        let mut words = Vec::with_capacity(frames * WORDS_PER_FRAME);
        words.resize_with(frames * WORDS_PER_FRAME, || AtomicU64::new(0));
        Self { base: A::from_raw(base.raw() & !0xfff), words }
    }

    /// Address of the first frame.
    pub fn base(&self) -> A {
        self.base
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.words.len() / WORDS_PER_FRAME
    }

    /// A bump-and-free-list allocator over this arena's frames.
    pub fn frame_allocator(&self) -> ArenaFrames<A> {
        ArenaFrames { base: self.base.raw(), next: 0, limit: self.frames() as u64, free: Vec::new() }
    }

    /// Zeroes every frame.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }

    #[inline]
    fn word(&self, addr: A) -> Result<&AtomicU64, MemoryError> {
        let raw = addr.raw();
        if raw & 7 != 0 {
            return Err(MemoryError::Misaligned(raw));
        }
        let offset = raw.checked_sub(self.base.raw()).ok_or(MemoryError::Unbacked(raw))?;
        usize::try_from(offset >> 3).ok().and_then(|i| self.words.get(i)).ok_or(MemoryError::Unbacked(raw))
    }
}

impl<A: Address> TableMemory for Arena<A> {
    type Addr = A;

    #[inline]
    fn read_entry(&self, addr: A) -> Result<u64, MemoryError> {
        Ok(self.word(addr)?.load(Ordering::Acquire))
    }

    #[inline]
    fn write_entry(&self, addr: A, value: u64) -> Result<(), MemoryError> {
        self.word(addr)?.store(value, Ordering::Release);
        Ok(())
    }

    #[inline]
    fn compare_exchange_entry(
        &self,
        addr: A,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        Ok(self.word(addr)?.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire))
    }
}

/// Frame allocator for an [`Arena`]: bump allocation, then reuse of freed frames.
#[derive(Debug, Clone)]
pub struct ArenaFrames<A: Address> {
    base: u64,
    next: u64,
    limit: u64,
    free: Vec<A>,
}

impl<A: Address> ArenaFrames<A> {
    /// An allocator handing out the frames of `start..end` (both rounded down
    /// to 4 KiB) — e.g. a region of guest RAM set aside for tables.
    pub fn range(start: u64, end: u64) -> Self {
        let base = start & !0xfff;
        Self { base, next: 0, limit: (end & !0xfff).saturating_sub(base) >> 12, free: Vec::new() }
    }

    /// Frames handed out and not freed.
    pub fn in_use(&self) -> u64 {
        self.next - self.free.len() as u64
    }
}

impl<A: Address> FrameAllocator<A> for ArenaFrames<A> {
    fn allocate_frame(&mut self) -> Option<A> {
        if let Some(frame) = self.free.pop() {
            return Some(frame);
        }
        if self.next >= self.limit {
            return None;
        }
        let frame = self.base.checked_add(self.next.checked_mul(4096)?)?;
        self.next += 1;
        Some(A::from_raw(frame))
    }

    fn free_frame(&mut self, frame: A) {
        self.free.push(frame);
    }
}

/// A view of another table memory in a different address space, shifted by a
/// fixed offset: address `a` of this view is `a + offset` of the inner memory.
///
/// Models guest RAM that is one contiguous block of host memory, so a test can
/// build a guest's own page tables (guest-physical) inside host frames.
#[derive(Debug, Clone, Copy)]
pub struct OffsetMemory<M, A> {
    inner: M,
    offset: u64,
    _addr: PhantomData<A>,
}

impl<M: TableMemory, A: Address> OffsetMemory<M, A> {
    /// Address `a` of the view maps to `a + offset` in `inner`.
    pub fn new(inner: M, offset: u64) -> Self {
        Self { inner, offset, _addr: PhantomData }
    }

    #[inline]
    fn inner_addr(&self, addr: A) -> Result<M::Addr, MemoryError> {
        addr.raw().checked_add(self.offset).map(M::Addr::from_raw).ok_or(MemoryError::Unbacked(addr.raw()))
    }
}

impl<M: TableMemory, A: Address> TableMemory for OffsetMemory<M, A> {
    type Addr = A;

    #[inline]
    fn read_entry(&self, addr: A) -> Result<u64, MemoryError> {
        self.inner.read_entry(self.inner_addr(addr)?).map_err(|_| MemoryError::Unbacked(addr.raw()))
    }

    #[inline]
    fn write_entry(&self, addr: A, value: u64) -> Result<(), MemoryError> {
        self.inner.write_entry(self.inner_addr(addr)?, value).map_err(|_| MemoryError::Unbacked(addr.raw()))
    }

    #[inline]
    fn compare_exchange_entry(
        &self,
        addr: A,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        self.inner
            .compare_exchange_entry(self.inner_addr(addr)?, current, new)
            .map_err(|_| MemoryError::Unbacked(addr.raw()))
    }
}

/// Wraps a [`TableMemory`] and counts the entry reads made through it — how
/// the nested walk reports its memory references.
#[derive(Debug)]
pub struct CountingMemory<M> {
    inner: M,
    reads: Cell<u32>,
    writes: Cell<u32>,
}

impl<M: TableMemory> CountingMemory<M> {
    /// Starts counting from zero.
    pub fn new(inner: M) -> Self {
        Self { inner, reads: Cell::new(0), writes: Cell::new(0) }
    }

    /// Entry reads so far.
    pub fn reads(&self) -> u32 {
        self.reads.get()
    }

    /// Entry writes and successful compare-exchanges so far.
    pub fn writes(&self) -> u32 {
        self.writes.get()
    }

    /// The wrapped memory.
    pub fn into_inner(self) -> M {
        self.inner
    }
}

impl<M: TableMemory> TableMemory for CountingMemory<M> {
    type Addr = M::Addr;

    fn read_entry(&self, addr: Self::Addr) -> Result<u64, MemoryError> {
        self.reads.set(self.reads.get().saturating_add(1));
        self.inner.read_entry(addr)
    }

    fn write_entry(&self, addr: Self::Addr, value: u64) -> Result<(), MemoryError> {
        self.writes.set(self.writes.get().saturating_add(1));
        self.inner.write_entry(addr, value)
    }

    fn compare_exchange_entry(
        &self,
        addr: Self::Addr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        let r = self.inner.compare_exchange_entry(addr, current, new)?;
        if r.is_ok() {
            self.writes.set(self.writes.get().saturating_add(1));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_types::Hpa;

    #[test]
    fn arena_read_outside_is_unbacked() {
        let arena = Arena::new(Hpa::new(0x10_0000), 2);
        assert_eq!(arena.read_entry(Hpa::new(0xf_fff8)), Err(MemoryError::Unbacked(0xf_fff8)));
        assert_eq!(arena.read_entry(Hpa::new(0x10_2000)), Err(MemoryError::Unbacked(0x10_2000)));
        assert_eq!(arena.read_entry(Hpa::new(0x10_1ff8)), Ok(0));
    }

    #[test]
    fn arena_misaligned_entry_is_rejected() {
        let arena = Arena::new(Hpa::new(0), 1);
        assert_eq!(arena.write_entry(Hpa::new(4), 1), Err(MemoryError::Misaligned(4)));
    }

    #[test]
    fn compare_exchange_reports_actual_value_on_mismatch() {
        let arena = Arena::new(Hpa::new(0), 1);
        arena.write_entry(Hpa::new(8), 5).unwrap();
        assert_eq!(arena.compare_exchange_entry(Hpa::new(8), 4, 6), Ok(Err(5)));
        assert_eq!(arena.compare_exchange_entry(Hpa::new(8), 5, 6), Ok(Ok(5)));
        assert_eq!(arena.read_entry(Hpa::new(8)), Ok(6));
    }

    #[test]
    fn arena_allocator_reuses_freed_frames_and_stops_at_limit() {
        let arena = Arena::new(Hpa::new(0x1000), 2);
        let mut frames = arena.frame_allocator();
        let a = frames.allocate_frame().unwrap();
        let b = frames.allocate_frame().unwrap();
        assert_eq!((a, b), (Hpa::new(0x1000), Hpa::new(0x2000)));
        assert_eq!(frames.allocate_frame(), None);
        frames.free_frame(a);
        assert_eq!(frames.allocate_frame(), Some(a));
        assert_eq!(frames.in_use(), 2);
    }
}
