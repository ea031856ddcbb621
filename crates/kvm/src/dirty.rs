//! Dirty logging: the per-slot bitmap and the per-vCPU dirty ring.
//!
//! Ring protocol (Linux `Documentation/virt/kvm/api.rst`, "KVM_CAP_DIRTY_LOG_RING";
//! `virt/kvm/dirty_ring.c`): each vCPU has an array of `struct kvm_dirty_gfn
//! { u32 flags; u32 slot; u64 offset; }` (16 bytes) mapped from the vCPU fd at
//! `KVM_DIRTY_LOG_PAGE_OFFSET` pages. An entry goes
//! `0 (invalid) → DIRTY (set by KVM) → RESET (set by userspace) → 0 (KVM_RESET_DIRTY_RINGS)`.
//! Userspace keeps its own fetch index, reads `flags` with load-acquire (so
//! `slot`/`offset` are seen as KVM wrote them), collects the entry, and
//! stores `RESET` with store-release; `KVM_RESET_DIRTY_RINGS` then
//! write-protects the collected pages again so the next write is logged anew.
//! With the ring enabled KVM does not use the bitmap (`kvm_use_dirty_bitmap`),
//! unless `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (not on x86).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET;
use kvm_ioctls::VcpuFd;
use memvisor_hostmem::{MappedRegion, Mapping, page_size};
use memvisor_types::{Address, Gpa};
use vm_memory::{Bytes, VolatileMemory, VolatileSlice};

use crate::{Error, Result, sys};

/// `KVM_DIRTY_GFN_F_DIRTY` (`include/uapi/linux/kvm.h`: `_BITUL(0)`).
const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET` (`include/uapi/linux/kvm.h`: `_BITUL(1)`).
const DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// `sizeof(struct kvm_dirty_gfn)`.
const ENTRY_BYTES: u64 = 16;

/// A slot's dirty bitmap as `KVM_GET_DIRTY_LOG` returned it: bit `i` is page
/// `i` of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    slot: u32,
    gpa: Gpa,
    pages: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    pub(crate) fn new(slot: u32, gpa: Gpa, pages: u64, words: Vec<u64>) -> Self {
        Self { slot, gpa, pages, words }
    }

    /// The slot id.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The slot's first guest-physical address (when the log was read).
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }

    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The raw words, 64 pages each.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether page `page` of the slot is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        let word = usize::try_from(page / 64).ok().and_then(|i| self.words.get(i)).copied().unwrap_or(0);
        page < self.pages && word & (1 << (page % 64)) != 0
    }

    /// Indexes of the dirty pages, ascending.
    pub fn dirty_pages(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.pages;
        self.words
            .iter()
            .zip(0u64..)
            .flat_map(|(&w, i)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| i * 64 + b))
            .take_while(move |&p| p < pages)
    }

    /// Guest-physical addresses of the dirty pages.
    pub fn dirty_gpas(&self) -> impl Iterator<Item = Gpa> + '_ {
        let gpa = self.gpa;
        self.dirty_pages().filter_map(move |p| gpa.checked_add(p.checked_mul(page_size())?))
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.dirty_pages().count() as u64
    }
}

/// One dirty-ring entry: page `offset` of memslot `slot` was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirtyGfn {
    /// Raw slot id (address space in bits 31:16).
    pub slot: u32,
    /// Page index inside the slot.
    pub offset: u64,
}

/// A vCPU's dirty ring, mapped from its fd, and the userspace fetch index.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    map: Mapping,
    entries: u64,
    next: u64,
    overflowed: bool,
}

/// An entry's flags word, as an atomic in the shared mapping.
fn flags_at(map: &Mapping, at: u64) -> Result<FlagsRef<'_>> {
    Ok(FlagsRef { slice: map.volatile_slice(at, ENTRY_BYTES)?, at })
}

struct FlagsRef<'a> {
    slice: VolatileSlice<'a>,
    at: u64,
}

impl FlagsRef<'_> {
    fn flags(&self) -> Result<&AtomicU32> {
        self.slice.get_atomic_ref::<AtomicU32>(0).map_err(|e| ring_error(self.at, &e))
    }

    fn gfn(&self) -> Result<DirtyGfn> {
        let slot = self.slice.read_obj::<u32>(4).map_err(|e| ring_error(self.at, &e))?;
        let offset = self.slice.read_obj::<u64>(8).map_err(|e| ring_error(self.at, &e))?;
        Ok(DirtyGfn { slot, offset })
    }
}

impl DirtyRing {
    /// Maps the ring of `vcpu` (`bytes` as given to `KVM_ENABLE_CAP`).
    pub(crate) fn map(vcpu: &VcpuFd, bytes: u32) -> Result<Self> {
        let fd = sys::dup(vcpu)?;
        let offset = u64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page_size();
        Self::over(Mapping::from_fd(Arc::new(fd), offset, u64::from(bytes))?)
    }

    /// A ring over `map` (its whole size).
    fn over(map: Mapping) -> Result<Self> {
        let entries = map.size() / ENTRY_BYTES;
        if entries == 0 || !entries.is_power_of_two() {
            return Err(Error::DirtyRing {
                offset: 0,
                reason: format!("{} bytes is not a ring", map.size()),
            });
        }
        Ok(Self { map, entries, next: 0, overflowed: false })
    }

    fn position(&self, index: u64) -> u64 {
        (index % self.entries) * ENTRY_BYTES
    }

    /// Collects every entry KVM has published since the last harvest into
    /// `out` and marks them RESET; returns how many.
    ///
    /// KVM publishes entries in index order and stops the vCPU at the ring's
    /// soft limit, so the ring never fills. A KVM that ignores the soft limit
    /// (the PVM software KVM does) overwrites unharvested entries and, after
    /// a reset, leaves published-but-reset entries ahead of the fetch index,
    /// which would wedge the ring (the vCPU exits "ring full" forever). Both
    /// are detected — a completely full ring, or DIRTY entries beyond a run of
    /// cleared ones — and recovered from by marking the cleared run RESET and
    /// continuing after it; [`overflowed`](Self::take_overflowed) then
    /// reports that entries may have been lost.
    pub(crate) fn harvest(&mut self, out: &mut Vec<DirtyGfn>) -> Result<usize> {
        let mut n = 0;
        // Each step consumes at least one position; bounding the loop by the
        // ring size keeps a misbehaving ring from spinning us forever.
        let mut budget = self.entries;
        while budget > 0 {
            let entry = flags_at(&self.map, self.position(self.next))?;
            let flags = entry.flags()?;
            if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY != 0 {
                out.push(entry.gfn()?);
                flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
                self.next = self.next.wrapping_add(1);
                n += 1;
                budget -= 1;
                continue;
            }
            let Some(gap) = self.lapped_gap(budget)? else { break };
            // Mark the cleared run RESET so KVM's reset walks past it. The
            // compare-exchange makes this safe against a vCPU publishing
            // concurrently: an entry that became DIRTY meanwhile ends the
            // run and is collected by the loop instead.
            let mut skipped = 0;
            while skipped < gap {
                let entry = flags_at(&self.map, self.position(self.next))?;
                let cleared = entry.flags()?.compare_exchange(
                    0,
                    DIRTY_GFN_F_RESET,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if cleared.is_err() {
                    break;
                }
                self.next = self.next.wrapping_add(1);
                skipped += 1;
            }
            self.overflowed |= skipped > 0;
            budget -= skipped.max(1).min(budget);
        }
        if u64::try_from(n).is_ok_and(|n| n >= self.entries) {
            self.overflowed = true;
        }
        Ok(n)
    }

    /// If the entries from the fetch index on are a run of cleared (0)
    /// entries followed by a DIRTY one — impossible unless KVM lapped the
    /// ring — the length of that run.
    fn lapped_gap(&self, budget: u64) -> Result<Option<u64>> {
        for gap in 1..budget {
            let flags = flags_at(&self.map, self.position(self.next.wrapping_add(gap)))?
                .flags()?
                .load(Ordering::Acquire);
            if flags & DIRTY_GFN_F_DIRTY != 0 {
                return Ok(Some(gap));
            }
            if flags != 0 {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Whether KVM overfilled the ring since the last call (entries may have
    /// been lost: treat all logged memory as dirty); clears the flag.
    pub(crate) fn take_overflowed(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }
}

fn ring_error(at: u64, e: &dyn std::fmt::Display) -> Error {
    Error::DirtyRing { offset: at, reason: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_hostmem::{HugePages, Memfd};

    /// The kernel's side of the protocol (`virt/kvm/dirty_ring.c`) over a
    /// second mapping of the ring's memory. `push` does not check for room,
    /// to model a KVM that ignores the soft limit.
    struct FakeKvm {
        view: Mapping,
        entries: u64,
        dirty_index: u64,
        reset_index: u64,
    }

    impl FakeKvm {
        fn with_ring(entries: u64) -> (Self, DirtyRing) {
            // One page holds 256 entries; a smaller ring uses its start.
            assert!(entries <= 256 && entries.is_power_of_two());
            let memfd = Memfd::create("ring", 4096, HugePages::None).unwrap();
            let mut ring = DirtyRing::over(memfd.map(0, 4096).unwrap()).unwrap();
            ring.entries = entries;
            (Self { view: memfd.map(0, 4096).unwrap(), entries, dirty_index: 0, reset_index: 0 }, ring)
        }

        fn at(&self, index: u64) -> u64 {
            (index % self.entries) * ENTRY_BYTES
        }

        fn push(&mut self, slot: u32, offset: u64) {
            let at = self.at(self.dirty_index);
            self.view.write_at(at + 4, &slot.to_le_bytes()).unwrap();
            self.view.write_at(at + 8, &offset.to_le_bytes()).unwrap();
            flags_at(&self.view, at).unwrap().flags().unwrap().store(DIRTY_GFN_F_DIRTY, Ordering::Release);
            self.dirty_index += 1;
        }

        fn reset(&mut self) -> u64 {
            let mut n = 0;
            while self.reset_index != self.dirty_index {
                let entry = flags_at(&self.view, self.at(self.reset_index)).unwrap();
                let flags = entry.flags().unwrap();
                if flags.load(Ordering::Acquire) & DIRTY_GFN_F_RESET == 0 {
                    break;
                }
                flags.store(0, Ordering::Relaxed);
                self.reset_index += 1;
                n += 1;
            }
            n
        }
    }

    fn offsets(gfns: &[DirtyGfn]) -> Vec<u64> {
        gfns.iter().map(|g| g.offset).collect()
    }

    #[test]
    fn harvest_collects_published_entries_in_order_across_the_wrap() {
        // Arrange
        let (mut kvm, mut ring) = FakeKvm::with_ring(8);
        (0..6).for_each(|i| kvm.push(1, i));
        let mut first = Vec::new();
        ring.harvest(&mut first).unwrap();
        let reset = kvm.reset();
        (6..11).for_each(|i| kvm.push(2, i));

        // Act
        let mut second = Vec::new();
        let n = ring.harvest(&mut second).unwrap();

        // Assert
        assert_eq!(offsets(&first), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(reset, 6);
        assert_eq!(n, 5);
        assert_eq!(offsets(&second), vec![6, 7, 8, 9, 10]);
        assert!(second.iter().all(|g| g.slot == 2));
        assert!(!ring.take_overflowed());
        assert_eq!(kvm.reset(), 5);
    }

    #[test]
    fn harvest_stops_at_the_first_unpublished_entry_and_takes_nothing_twice() {
        let (mut kvm, mut ring) = FakeKvm::with_ring(8);
        (0..3).for_each(|i| kvm.push(1, i));
        let mut out = Vec::new();

        let first = ring.harvest(&mut out).unwrap();
        let second = ring.harvest(&mut out).unwrap();

        assert_eq!((first, second), (3, 0));
        assert_eq!(offsets(&out), vec![0, 1, 2]);
    }

    #[test]
    fn lapped_ring_is_resynchronised_and_reported_as_overflowed() {
        // Arrange: KVM pushes 10 entries into 8 slots (entries 0 and 1 are
        // overwritten by 8 and 9), userspace harvests and KVM resets 8; then
        // KVM pushes 3 more after the 2 it still thinks are unharvested.
        let (mut kvm, mut ring) = FakeKvm::with_ring(8);
        (0..10).for_each(|i| kvm.push(1, i));
        let mut lap = Vec::new();
        ring.harvest(&mut lap).unwrap();
        let full = ring.take_overflowed();
        kvm.reset();
        (10..13).for_each(|i| kvm.push(1, i));

        // Act
        let mut after = Vec::new();
        let n = ring.harvest(&mut after).unwrap();

        // Assert: the lapped ring is not wedged, and the loss is reported.
        assert_eq!(offsets(&lap), vec![8, 9, 2, 3, 4, 5, 6, 7]);
        assert!(full, "a completely full ring may have lost entries");
        assert_eq!(n, 3);
        assert_eq!(offsets(&after), vec![10, 11, 12]);
        assert!(ring.take_overflowed());
        assert_eq!(kvm.reset(), 5);
        assert_eq!(kvm.reset_index, kvm.dirty_index);
        kvm.push(1, 13);
        let mut next = Vec::new();
        ring.harvest(&mut next).unwrap();
        assert_eq!(offsets(&next), vec![13]);
    }

    #[test]
    fn bitmap_lists_dirty_pages_in_order_and_ignores_bits_past_the_slot() {
        let bitmap = DirtyBitmap::new(3, Gpa::new(0x10_0000), 66, vec![(1 << 0) | (1 << 63), 0b111]);

        let pages: Vec<u64> = bitmap.dirty_pages().collect();

        assert_eq!(pages, vec![0, 63, 64, 65]);
        assert_eq!(bitmap.count(), 4);
        assert!(bitmap.is_dirty(65));
        assert!(!bitmap.is_dirty(66));
        assert_eq!(bitmap.dirty_gpas().nth(1), Some(Gpa::new(0x10_0000 + 63 * 4096)));
    }
}
