//! The sensitivity-separated allocator: which data frame holds what.
//!
//! Pure bookkeeping, no page tables: [`Asi`](crate::Asi) maps and unmaps the
//! page runs this allocator reports as newly used or released.
//!
//! - Objects up to 2 KiB come from slab pages of one size class (16 B …
//!   2 KiB) **and one [`Sensitivity`]**: a page is dedicated to the
//!   sensitivity of its first object, so sensitive, globally non-sensitive
//!   and locally non-sensitive data never share a page, and two owners'
//!   local data never do either (an owner is part of the sensitivity).
//! - Larger objects take whole contiguous frames.
//! - Per-sensitivity free lists (the 2024 ASI design): a page that empties
//!   may be kept, still mapped where its sensitivity allows, for the next
//!   allocation of the same sensitivity, up to a configured number per
//!   sensitivity; reusing it costs no map, no unmap and no TLB flush.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use memvisor_types::{Address, Hpa, Hva};

use crate::space::direct_map_va;
use crate::{Error, OwnerId, Result};

const FRAME: u64 = 4096;
/// Smallest slab object (size class 0).
const MIN_OBJECT: u64 = 16;
/// Largest slab object (size class 7); larger allocations take whole frames.
const MAX_SLAB_OBJECT: u64 = 2048;
const SIZE_CLASSES: u8 = 8;

/// How sensitive an allocation's data is, which decides where it is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sensitivity {
    /// Must never leak to any untrusted context: mapped only in the full space
    /// (the default for memory nobody classified).
    Sensitive,
    /// Harmless if leaked to any context: mapped in every restricted space.
    GlobalNonSensitive,
    /// Harmless if leaked to its owner only (guest memory, vCPU register
    /// state): mapped in the restricted spaces of that owner's instances.
    LocalNonSensitive(OwnerId),
}

impl Sensitivity {
    /// Whether data of this sensitivity may be mapped in a restricted space of `owner`.
    pub fn visible_to(self, owner: OwnerId) -> bool {
        match self {
            Sensitivity::Sensitive => false,
            Sensitivity::GlobalNonSensitive => true,
            Sensitivity::LocalNonSensitive(o) => o == owner,
        }
    }
}

impl fmt::Display for Sensitivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sensitivity::Sensitive => f.write_str("sensitive"),
            Sensitivity::GlobalNonSensitive => f.write_str("globally non-sensitive"),
            Sensitivity::LocalNonSensitive(o) => write!(f, "locally non-sensitive ({o})"),
        }
    }
}

/// A live allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Allocation {
    /// Its address in the direct map ([`DIRECT_MAP_BASE`](crate::DIRECT_MAP_BASE) + `pa`).
    pub va: Hva,
    /// Its physical address.
    pub pa: Hpa,
    /// Bytes usable (the size class or the whole frames, ≥ the size asked for).
    pub len: u64,
    /// Its sensitivity (shared by every object of its page).
    pub sensitivity: Sensitivity,
}

/// Frames `first..first + count` (indices into the data frames) that one
/// sensitivity started or stopped using.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRun {
    pub first: u32,
    pub count: u32,
    pub sensitivity: Sensitivity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    Free,
    /// A slab page: objects of one size class and one sensitivity.
    Slab {
        sensitivity: Sensitivity,
        class: u8,
        used: [u64; 4],
        live: u16,
    },
    /// Part of a whole-frame allocation starting at frame `head`.
    Pages {
        sensitivity: Sensitivity,
        head: u32,
        count: u32,
    },
    /// Empty, kept on its sensitivity's free list, still mapped for it.
    Cached {
        sensitivity: Sensitivity,
    },
}

/// Counters of the allocator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AllocStats {
    pub cache_hits: u64,
    pub cache_keeps: u64,
}

/// The allocator over `frames` data frames starting at `base`.
#[derive(Debug, Clone)]
pub(crate) struct SensitiveAllocator {
    base: Hpa,
    frames: Vec<FrameState>,
    free: BTreeSet<u32>,
    /// Slab pages with a free object, by sensitivity and size class.
    partial: BTreeMap<(Sensitivity, u8), BTreeSet<u32>>,
    /// Per-sensitivity free lists of empty, still-mapped pages.
    cached: BTreeMap<Sensitivity, Vec<u32>>,
    cache_capacity: usize,
    pub(crate) stats: AllocStats,
}

fn size_class(size: u64) -> u8 {
    let rounded = size.max(MIN_OBJECT).next_power_of_two();
    // 16 → 0, …, 2048 → 7: the shift fits in a u8.
    u8::try_from(rounded.trailing_zeros() - MIN_OBJECT.trailing_zeros()).unwrap_or(SIZE_CLASSES - 1)
}

fn class_size(class: u8) -> u64 {
    MIN_OBJECT << class
}

impl SensitiveAllocator {
    /// An allocator of `frames` frames at `base` (4K-aligned), keeping up to
    /// `cache_capacity` empty pages per sensitivity.
    pub(crate) fn new(base: Hpa, frames: u32, cache_capacity: usize) -> Self {
        Self {
            base,
            frames: vec![FrameState::Free; frames as usize],
            free: (0..frames).collect(),
            partial: BTreeMap::new(),
            cached: BTreeMap::new(),
            cache_capacity,
            stats: AllocStats::default(),
        }
    }

    /// The physical address of frame `index`.
    pub(crate) fn frame_pa(&self, index: u32) -> Hpa {
        // `base + frames·4K` was checked to fit when the allocator was configured.
        Hpa::new(self.base.raw() + u64::from(index) * FRAME)
    }

    /// Number of data frames.
    pub(crate) fn frame_count(&self) -> u32 {
        u32::try_from(self.frames.len()).unwrap_or(u32::MAX)
    }

    fn index_of(&self, pa: Hpa) -> Option<u32> {
        let offset = pa.offset_from(self.base)?;
        let index = u32::try_from(offset / FRAME).ok()?;
        (usize::try_from(index).ok()? < self.frames.len()).then_some(index)
    }

    /// Whether `pa` lies in the data frames.
    pub(crate) fn contains(&self, pa: Hpa) -> bool {
        self.index_of(pa).is_some()
    }

    /// The sensitivity of the data frame holding `pa`: `None` for a free
    /// frame or an address outside the data frames.
    pub(crate) fn sensitivity_of(&self, pa: Hpa) -> Option<Sensitivity> {
        let index = self.index_of(pa)?;
        self.sensitivity_at(index)
    }

    /// The sensitivity of frame `index` (`None` when free).
    pub(crate) fn sensitivity_at(&self, index: u32) -> Option<Sensitivity> {
        match self.frames.get(index as usize)? {
            FrameState::Free => None,
            FrameState::Slab { sensitivity, .. }
            | FrameState::Pages { sensitivity, .. }
            | FrameState::Cached { sensitivity } => Some(*sensitivity),
        }
    }

    /// Runs of consecutive frames that are in use (or cached) with a
    /// sensitivity satisfying `want`, in address order.
    pub(crate) fn runs(&self, mut want: impl FnMut(Sensitivity) -> bool) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for index in 0..self.frame_count() {
            let Some(s) = self.sensitivity_at(index).filter(|&s| want(s)) else { continue };
            match runs.last_mut() {
                Some(run) if run.sensitivity == s && run.first + run.count == index => run.count += 1,
                _ => runs.push(PageRun { first: index, count: 1, sensitivity: s }),
            }
        }
        runs
    }

    /// Allocates `size` bytes of `sensitivity`. Returns the allocation and,
    /// when it needed frames no mapping exists for, those frames.
    pub(crate) fn alloc(
        &mut self,
        sensitivity: Sensitivity,
        size: u64,
    ) -> Result<(Allocation, Option<PageRun>)> {
        if size == 0 || size > u64::from(self.frame_count()) * FRAME {
            return Err(Error::InvalidSize(size));
        }
        if size > MAX_SLAB_OBJECT {
            return self.alloc_pages(sensitivity, size.div_ceil(FRAME));
        }
        let class = size_class(size);
        let (index, new_run) = match self.partial.get(&(sensitivity, class)).and_then(|s| s.first()) {
            Some(&index) => (index, None),
            None => {
                let (index, new_run) = self.take_page(sensitivity)?;
                self.frames[index as usize] = FrameState::Slab { sensitivity, class, used: [0; 4], live: 0 };
                self.partial.entry((sensitivity, class)).or_default().insert(index);
                (index, new_run)
            }
        };
        let per_page = FRAME / class_size(class);
        let FrameState::Slab { used, live, .. } = &mut self.frames[index as usize] else {
            unreachable!("partial lists hold slab pages only");
        };
        let slot = (0..per_page).find(|&i| used[(i / 64) as usize] & (1 << (i % 64)) == 0);
        let Some(slot) = slot else { unreachable!("a partial page has a free object") };
        used[(slot / 64) as usize] |= 1 << (slot % 64);
        *live += 1;
        if u64::from(*live) == per_page
            && let Some(set) = self.partial.get_mut(&(sensitivity, class))
        {
            set.remove(&index);
        }
        let pa = Hpa::new(self.frame_pa(index).raw() + slot * class_size(class));
        let va = direct_map_va(pa)?;
        Ok((Allocation { va, pa, len: class_size(class), sensitivity }, new_run))
    }

    /// A page for a new slab: from the sensitivity's free list (already
    /// mapped) or the free frames (a new run to map).
    fn take_page(&mut self, sensitivity: Sensitivity) -> Result<(u32, Option<PageRun>)> {
        if let Some(index) = self.cached.get_mut(&sensitivity).and_then(Vec::pop) {
            self.stats.cache_hits += 1;
            return Ok((index, None));
        }
        let index = self.free.pop_first().ok_or(Error::OutOfMemory { pages: 1 })?;
        Ok((index, Some(PageRun { first: index, count: 1, sensitivity })))
    }

    fn alloc_pages(&mut self, sensitivity: Sensitivity, pages: u64) -> Result<(Allocation, Option<PageRun>)> {
        let count = u32::try_from(pages).map_err(|_| Error::OutOfMemory { pages })?;
        if count == 1
            && let Some(index) = self.cached.get_mut(&sensitivity).and_then(Vec::pop)
        {
            self.stats.cache_hits += 1;
            self.frames[index as usize] = FrameState::Pages { sensitivity, head: index, count: 1 };
            let pa = self.frame_pa(index);
            return Ok((Allocation { va: direct_map_va(pa)?, pa, len: FRAME, sensitivity }, None));
        }
        let head = self.find_run(count).ok_or(Error::OutOfMemory { pages })?;
        for index in head..head + count {
            self.free.remove(&index);
            self.frames[index as usize] = FrameState::Pages { sensitivity, head, count };
        }
        let pa = self.frame_pa(head);
        let allocation = Allocation { va: direct_map_va(pa)?, pa, len: pages * FRAME, sensitivity };
        Ok((allocation, Some(PageRun { first: head, count, sensitivity })))
    }

    /// The first run of `count` consecutive free frames.
    fn find_run(&self, count: u32) -> Option<u32> {
        let (mut start, mut len) = (0u32, 0u32);
        for &index in &self.free {
            if len > 0 && index == start + len {
                len += 1;
            } else {
                (start, len) = (index, 1);
            }
            if len == count {
                return Some(start);
            }
        }
        None
    }

    /// Frees the allocation starting at `va`. Returns the frames that went
    /// back to the free frames (to unmap), if any; pages kept on a
    /// sensitivity's free list stay mapped. With `keep = false` nothing is
    /// kept (used to undo an allocation whose mapping failed).
    pub(crate) fn free(&mut self, va: Hva, keep: bool) -> Result<Option<PageRun>> {
        let bad = Error::InvalidFree(va.raw());
        let pa = va.raw().checked_sub(crate::DIRECT_MAP_BASE).map(Hpa::new).ok_or(bad.clone())?;
        let index = self.index_of(pa).ok_or(bad.clone())?;
        match self.frames[index as usize] {
            FrameState::Slab { sensitivity, class, mut used, mut live } => {
                let offset = pa.page_offset(memvisor_types::PageSize::Size4K);
                let size = class_size(class);
                let slot = offset / size;
                let (word, bit) = ((slot / 64) as usize, 1u64 << (slot % 64));
                if offset % size != 0 || used[word] & bit == 0 {
                    return Err(bad);
                }
                let was_full = u64::from(live) == FRAME / size;
                used[word] &= !bit;
                live -= 1;
                self.frames[index as usize] = FrameState::Slab { sensitivity, class, used, live };
                if live == 0 {
                    if let Some(set) = self.partial.get_mut(&(sensitivity, class)) {
                        set.remove(&index);
                    }
                    return Ok(self.release(index, 1, sensitivity, keep));
                }
                if was_full {
                    self.partial.entry((sensitivity, class)).or_default().insert(index);
                }
                Ok(None)
            }
            FrameState::Pages { sensitivity, head, count } if head == index && offset_is_zero(pa) => {
                Ok(self.release(head, count, sensitivity, keep))
            }
            _ => Err(bad),
        }
    }

    /// Empties frames `first..first + count`: the first ones go to the
    /// sensitivity's free list while it has room, the rest to the free frames.
    fn release(&mut self, first: u32, count: u32, sensitivity: Sensitivity, keep: bool) -> Option<PageRun> {
        let mut kept = 0;
        if keep {
            let list = self.cached.entry(sensitivity).or_default();
            while kept < count && list.len() < self.cache_capacity {
                list.push(first + kept);
                self.frames[(first + kept) as usize] = FrameState::Cached { sensitivity };
                kept += 1;
            }
            self.stats.cache_keeps += u64::from(kept);
        }
        for index in first + kept..first + count {
            self.frames[index as usize] = FrameState::Free;
            self.free.insert(index);
        }
        (kept < count).then_some(PageRun { first: first + kept, count: count - kept, sensitivity })
    }
}

fn offset_is_zero(pa: Hpa) -> bool {
    pa.is_aligned(memvisor_types::PageSize::Size4K)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x1_0000_0000;

    fn allocator(frames: u32, cache: usize) -> SensitiveAllocator {
        SensitiveAllocator::new(Hpa::new(BASE), frames, cache)
    }

    #[test]
    fn size_classes_round_up_to_powers_of_two_from_16_bytes() {
        assert_eq!([1, 16, 17, 64, 2048].map(size_class), [0, 0, 1, 2, 7]);
    }

    #[test]
    fn two_small_objects_of_one_sensitivity_share_a_page_and_only_the_first_maps_it() {
        // Arrange
        let mut a = allocator(8, 0);

        // Act
        let (first, run1) = a.alloc(Sensitivity::GlobalNonSensitive, 100).unwrap();
        let (second, run2) = a.alloc(Sensitivity::GlobalNonSensitive, 100).unwrap();

        // Assert
        assert_eq!(first.pa.pfn(), second.pa.pfn());
        assert_eq!(run1, Some(PageRun { first: 0, count: 1, sensitivity: Sensitivity::GlobalNonSensitive }));
        assert_eq!(run2, None);
        assert_eq!(second.pa.raw() - first.pa.raw(), 128);
    }

    #[test]
    fn objects_of_different_sensitivities_never_share_a_page() {
        // Arrange
        let mut a = allocator(8, 0);
        let kinds = [
            Sensitivity::Sensitive,
            Sensitivity::GlobalNonSensitive,
            Sensitivity::LocalNonSensitive(OwnerId(1)),
            Sensitivity::LocalNonSensitive(OwnerId(2)),
        ];

        // Act
        let pages = kinds.map(|s| a.alloc(s, 32).unwrap().0.pa.pfn());

        // Assert
        let distinct: BTreeSet<_> = pages.iter().collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn freeing_the_last_object_of_a_page_releases_the_page() {
        // Arrange
        let mut a = allocator(8, 0);
        let (x, _) = a.alloc(Sensitivity::Sensitive, 64).unwrap();
        let (y, _) = a.alloc(Sensitivity::Sensitive, 64).unwrap();

        // Act
        let after_x = a.free(x.va, true).unwrap();
        let after_y = a.free(y.va, true).unwrap();

        // Assert
        assert_eq!(after_x, None);
        assert_eq!(after_y, Some(PageRun { first: 0, count: 1, sensitivity: Sensitivity::Sensitive }));
        assert_eq!(a.sensitivity_of(x.pa), None);
    }

    #[test]
    fn double_free_is_rejected() {
        // Arrange
        let mut a = allocator(8, 0);
        let (x, _) = a.alloc(Sensitivity::Sensitive, 64).unwrap();
        let (_keep_page_alive, _) = a.alloc(Sensitivity::Sensitive, 64).unwrap();
        a.free(x.va, true).unwrap();

        // Act
        let again = a.free(x.va, true);

        // Assert
        assert_eq!(again, Err(Error::InvalidFree(x.va.raw())));
    }

    #[test]
    fn freeing_inside_an_object_or_a_multi_page_allocation_is_rejected() {
        // Arrange
        let mut a = allocator(8, 0);
        let (small, _) = a.alloc(Sensitivity::Sensitive, 64).unwrap();
        let (big, _) = a.alloc(Sensitivity::Sensitive, 3 * FRAME).unwrap();

        // Act
        let inside_small = a.free(Hva::new(small.va.raw() + 8), true);
        let inside_big = a.free(Hva::new(big.va.raw() + FRAME), true);

        // Assert
        assert_eq!(inside_small, Err(Error::InvalidFree(small.va.raw() + 8)));
        assert_eq!(inside_big, Err(Error::InvalidFree(big.va.raw() + FRAME)));
    }

    #[test]
    fn multi_page_allocation_takes_contiguous_frames_and_reports_one_run() {
        // Arrange
        let mut a = allocator(8, 0);
        a.alloc(Sensitivity::Sensitive, 64).unwrap();

        // Act
        let (big, run) = a.alloc(Sensitivity::GlobalNonSensitive, 3 * FRAME).unwrap();

        // Assert
        assert_eq!(big.len, 3 * FRAME);
        assert_eq!(run, Some(PageRun { first: 1, count: 3, sensitivity: Sensitivity::GlobalNonSensitive }));
    }

    #[test]
    fn exhausted_frames_are_out_of_memory() {
        // Arrange
        let mut a = allocator(2, 0);
        a.alloc(Sensitivity::Sensitive, FRAME).unwrap();

        // Act
        let r = a.alloc(Sensitivity::Sensitive, 2 * FRAME);

        // Assert
        assert_eq!(r.map(|_| ()), Err(Error::OutOfMemory { pages: 2 }));
    }

    #[test]
    fn a_cached_page_is_reused_by_its_sensitivity_without_a_new_mapping() {
        // Arrange
        let mut a = allocator(8, 1);
        let owner = Sensitivity::LocalNonSensitive(OwnerId(3));
        let (x, _) = a.alloc(owner, 4096).unwrap();
        let released = a.free(x.va, true).unwrap();

        // Act
        let (other, other_run) = a.alloc(Sensitivity::Sensitive, 4096).unwrap();
        let (again, again_run) = a.alloc(owner, 4096).unwrap();

        // Assert
        assert_eq!(released, None, "kept on the owner's free list, still mapped");
        assert_ne!(other.pa, x.pa, "another sensitivity never gets the cached page");
        assert!(other_run.is_some());
        assert_eq!((again.pa, again_run), (x.pa, None));
        assert_eq!(a.stats.cache_hits, 1);
    }
}
