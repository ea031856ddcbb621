//! A translation cache (TLB) and paging-structure caches, as Intel SDM 4.10
//! and VT-d ch. 6 describe them, in front of the walker.
//!
//! - **TLB**: one direct-mapped array per page size, each slot holding a
//!   completed walk (leaf entry and the permission bits combined along it),
//!   tagged by table root and page number. A hit re-checks the access against
//!   the cached bits exactly as the walker would; a hit that would fault, or a
//!   write to a page cached without its dirty flag, drops the slot and walks
//!   (hardware re-walks then, too).
//! - **Paging-structure caches**: for each non-leaf level, the table pointer
//!   found for a region and the bits combined above it, so a TLB miss walks
//!   only the levels below the deepest cached entry.
//!
//! Entries are only created by successful walks (so their accessed flags are
//! set) and are only dropped by invalidation — by address range, by root, or
//! all — as on hardware: changing a table without invalidating leaves stale
//! translations visible, which is what a vIOMMU must model. Capacity is fixed
//! at construction, so every operation is bounded independently of the size
//! of the address space: a range invalidation probes the slots of the pages
//! it covers, or scans the arrays when that is cheaper.

use alloc::vec;
use alloc::vec::Vec;

use memvisor_types::{AddrRange, Address};

use crate::format::{Access, Format, Walked};
use crate::memory::TableMemory;
use crate::walk::{Direct, Fault, Path, Start, Translation, WalkPlan, finish, translate_path};

/// Hit and miss counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Translations answered from the TLB.
    pub hits: u64,
    /// Translations that needed a walk.
    pub misses: u64,
    /// Walks shortened by a paging-structure cache.
    pub psc_hits: u64,
    /// Slots dropped by invalidations.
    pub invalidated: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct TlbSlot {
    valid: bool,
    root: u64,
    /// Input address >> page shift.
    page: u64,
    leaf: u64,
    and_bits: u64,
    or_bits: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct PscSlot {
    valid: bool,
    root: u64,
    /// Input address >> the span shift of the cached entry's level.
    region: u64,
    table: u64,
    and_bits: u64,
    or_bits: u64,
}

/// A TLB plus paging-structure caches for tables of format `F`.
///
/// ```
/// use memvisor_paging::{Access, Arena, Mapper, TranslationCache, Walker, X86Attrs, X86Paging};
/// use memvisor_types::{AddrRange, Gva, Hpa, PageSize};
///
/// let arena = Arena::new(Hpa::new(0), 64);
/// let mut mapper = Mapper::new(X86Paging::four_level(), &arena, arena.frame_allocator())?;
/// let page = AddrRange::from_len(Gva::new(0x1000), 0x1000)?;
/// mapper.map(page, Hpa::new(0x5000), X86Attrs::kernel_rwx(), PageSize::Size4K)?;
/// let mut tlb = TranslationCache::new(X86Paging::four_level(), 64, 16);
///
/// let root = mapper.root();
/// assert_eq!(tlb.translate(&arena, root, Gva::new(0x1008), Access::read())?.addr, Hpa::new(0x5008));
/// assert_eq!(tlb.translate(&arena, root, Gva::new(0x1010), Access::read())?.addr, Hpa::new(0x5010));
/// assert_eq!(tlb.stats().hits, 1);
///
/// // Unmapping without invalidating leaves the stale translation cached ...
/// let changes = mapper.unmap(page)?;
/// assert!(tlb.translate(&arena, root, Gva::new(0x1000), Access::read()).is_ok());
/// // ... until the changed range is invalidated.
/// tlb.invalidate_range(root, changes.flush.unwrap());
/// assert!(tlb.translate(&arena, root, Gva::new(0x1000), Access::read()).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct TranslationCache<F: Format> {
    format: F,
    plan: WalkPlan,
    /// One array per page size: 4K, 2M, 1G.
    tlb: [Vec<TlbSlot>; 3],
    /// One array per non-leaf level 2..=5 (index `level - 2`).
    psc: [Vec<PscSlot>; 4],
    stats: CacheStats,
}

#[inline]
fn slot_index(root: u64, key: u64, len: usize) -> usize {
    let h = (key ^ root.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // `len` is a power of two no larger than 2^20: the top bits fit any
    // usize. One slot takes no bits (a shift by 64 would overflow).
    let bits = len.trailing_zeros();
    if bits == 0 {
        return 0;
    }
    usize::try_from(h >> (64 - bits)).unwrap_or(0) & (len - 1)
}

#[inline]
fn shift_of(level: u8) -> u32 {
    12 + 9 * (u32::from(level) - 1)
}

impl<F: Format> TranslationCache<F> {
    /// A cache with `tlb_entries` slots per page size and `psc_entries` slots
    /// per paging-structure level (each rounded up to a power of two, between 1 and 2^20).
    pub fn new(format: F, tlb_entries: usize, psc_entries: usize) -> Self {
        let t = tlb_entries.clamp(1, 1 << 20).next_power_of_two();
        let p = psc_entries.clamp(1, 1 << 20).next_power_of_two();
        Self {
            format,
            plan: WalkPlan::new(&format),
            tlb: [vec![TlbSlot::default(); t], vec![TlbSlot::default(); t], vec![TlbSlot::default(); t]],
            psc: [
                vec![PscSlot::default(); p],
                vec![PscSlot::default(); p],
                vec![PscSlot::default(); p],
                vec![PscSlot::default(); p],
            ],
            stats: CacheStats::default(),
        }
    }

    /// The format the cache walks.
    pub fn format(&self) -> &F {
        &self.format
    }

    /// Counters since creation.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Translates like [`Walker::translate`](crate::Walker::translate), from
    /// the caches when they hold the answer.
    #[inline]
    pub fn translate<M: TableMemory, I: Address>(
        &mut self,
        mem: &M,
        root: M::Addr,
        input: I,
        access: Access,
    ) -> Result<Translation<M::Addr>, Fault> {
        let (root, input) = (root.raw() & !0xfff, input.raw());
        if let Some(t) = self.tlb_hit(root, input, access) {
            self.stats.hits += 1;
            return Ok(t);
        }
        self.stats.misses += 1;
        let start = self.psc_start(root, input);
        let mut path = Path::default();
        let walked = translate_path(&self.format, &self.plan, &Direct(mem), start, input, access, &mut path)?;
        let t = finish(&self.format, &walked, input, access)?;
        // Fill the paging-structure caches from the entries this walk read.
        let (mut and_bits, mut or_bits) = (start.and_bits, start.or_bits);
        let mut level = start.level;
        for &value in path.value.iter().take(path.len.saturating_sub(1)) {
            and_bits &= value;
            or_bits |= value;
            if level >= 2 {
                let region = input >> shift_of(level);
                let array = &mut self.psc[usize::from(level - 2)];
                let idx = slot_index(root, region, array.len());
                array[idx] = PscSlot {
                    valid: true,
                    root,
                    region,
                    table: self.format.address(value),
                    and_bits,
                    or_bits,
                };
            }
            level -= 1;
        }
        let page = input >> shift_of(walked.level);
        let array = &mut self.tlb[usize::from(walked.level - 1)];
        let idx = slot_index(root, page, array.len());
        array[idx] = TlbSlot {
            valid: true,
            root,
            page,
            leaf: walked.leaf,
            and_bits: walked.and_bits,
            or_bits: walked.or_bits,
        };
        Ok(t)
    }

    #[inline]
    fn tlb_hit<A: Address>(&mut self, root: u64, input: u64, access: Access) -> Option<Translation<A>> {
        for level in 1..=3u8 {
            let page = input >> shift_of(level);
            let array = &mut self.tlb[usize::from(level - 1)];
            let idx = slot_index(root, page, array.len());
            let slot = array[idx];
            if !(slot.valid && slot.root == root && slot.page == page) {
                continue;
            }
            let walked = Walked { leaf: slot.leaf, level, and_bits: slot.and_bits, or_bits: slot.or_bits };
            // Only a successful walk fills a slot, and its tag holds every
            // input bit above the page offset: an invalid input cannot match.
            let ok = self.format.check_access(&walked, access).is_ok()
                && (!access.is_write() || self.format.is_dirty(slot.leaf));
            if !ok {
                // Re-walk for the authoritative answer (and the D update).
                array[idx].valid = false;
                return None;
            }
            return finish(&self.format, &walked, input, access).ok();
        }
        None
    }

    #[inline]
    fn psc_start(&mut self, root: u64, input: u64) -> Start {
        for level in 2..=self.format.levels() {
            let region = input >> shift_of(level);
            let array = &self.psc[usize::from(level - 2)];
            let slot = array[slot_index(root, region, array.len())];
            if slot.valid && slot.root == root && slot.region == region {
                self.stats.psc_hits += 1;
                return Start {
                    table: slot.table,
                    level: level - 1,
                    and_bits: slot.and_bits,
                    or_bits: slot.or_bits,
                };
            }
        }
        Start::root(&self.plan, root)
    }

    /// Drops every cached translation and table pointer of `root` whose
    /// region overlaps `range` (INVLPG / page-selective IOTLB invalidation).
    pub fn invalidate_range<R: Address, I: Address>(&mut self, root: R, range: AddrRange<I>) {
        if range.is_empty() {
            return;
        }
        let root = root.raw() & !0xfff;
        let (first, last) = (range.start().raw(), range.end().raw() - 1);
        let mut dropped = 0;
        for level in 1..=3u8 {
            let shift = shift_of(level);
            let array = &mut self.tlb[usize::from(level - 1)];
            dropped += drop_overlapping(
                array,
                root,
                first >> shift,
                last >> shift,
                |s| (s.valid, s.root, s.page),
                |s| s.valid = false,
            );
        }
        for level in 2..=5u8 {
            let shift = shift_of(level);
            let array = &mut self.psc[usize::from(level - 2)];
            dropped += drop_overlapping(
                array,
                root,
                first >> shift,
                last >> shift,
                |s| (s.valid, s.root, s.region),
                |s| s.valid = false,
            );
        }
        self.stats.invalidated += dropped;
    }

    /// Drops everything cached for `root` (a CR3 write without PCID reuse;
    /// a domain- or PASID-selective invalidation).
    pub fn invalidate_root<R: Address>(&mut self, root: R) {
        let root = root.raw() & !0xfff;
        let mut dropped = 0;
        for array in &mut self.tlb {
            for s in array.iter_mut().filter(|s| s.valid && s.root == root) {
                s.valid = false;
                dropped += 1;
            }
        }
        for array in &mut self.psc {
            for s in array.iter_mut().filter(|s| s.valid && s.root == root) {
                s.valid = false;
                dropped += 1;
            }
        }
        self.stats.invalidated += dropped;
    }

    /// Drops everything (global invalidation).
    pub fn invalidate_all(&mut self) {
        for array in &mut self.tlb {
            array.iter_mut().for_each(|s| s.valid = false);
        }
        for array in &mut self.psc {
            array.iter_mut().for_each(|s| s.valid = false);
        }
    }

    /// Number of valid TLB slots (all sizes).
    pub fn cached_translations(&self) -> usize {
        self.tlb.iter().flatten().filter(|s| s.valid).count()
    }
}

/// Invalidates the slots of `root` whose key lies in `first..=last`: by probing
/// each key when there are fewer keys than slots, else by scanning.
fn drop_overlapping<S>(
    array: &mut [S],
    root: u64,
    first: u64,
    last: u64,
    key: impl Fn(&S) -> (bool, u64, u64),
    clear: impl Fn(&mut S),
) -> u64 {
    let mut dropped = 0;
    let keys = last - first;
    if keys < array.len() as u64 {
        for k in first..=last {
            let idx = slot_index(root, k, array.len());
            let (valid, r, kk) = key(&array[idx]);
            if valid && r == root && kk == k {
                clear(&mut array[idx]);
                dropped += 1;
            }
        }
    } else {
        for s in array.iter_mut() {
            let (valid, r, k) = key(s);
            if valid && r == root && (first..=last).contains(&k) {
                clear(s);
                dropped += 1;
            }
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arena, Mapper, SecondStage, SecondStageAttrs};
    use memvisor_types::{Gpa, Hpa, PageSize};

    #[test]
    fn second_lookup_of_a_2m_page_hits_the_tlb() {
        // Arrange
        let arena = Arena::new(Hpa::new(0), 16);
        let mut m = Mapper::new(SecondStage::four_level(), &arena, arena.frame_allocator()).unwrap();
        let r = AddrRange::from_len(Gpa::new(0x20_0000), 0x20_0000).unwrap();
        m.map(r, Hpa::new(0x4000_0000), SecondStageAttrs::rwx(), PageSize::Size2M).unwrap();
        let mut tlb = TranslationCache::new(SecondStage::four_level(), 64, 16);
        tlb.translate(&arena, m.root(), Gpa::new(0x20_1000), Access::read()).unwrap();

        // Act
        let t = tlb.translate(&arena, m.root(), Gpa::new(0x30_0000), Access::read()).unwrap();

        // Assert
        assert_eq!(t.addr, Hpa::new(0x4010_0000));
        assert_eq!(tlb.stats().hits, 1);
    }

    #[test]
    fn single_slot_cache_translates_and_hits() {
        // Arrange: one slot per page size and level (a shift by 64 once overflowed here).
        let arena = Arena::new(Hpa::new(0), 16);
        let mut m = Mapper::new(SecondStage::four_level(), &arena, arena.frame_allocator()).unwrap();
        let r = AddrRange::from_len(Gpa::new(0x1000), 0x2000).unwrap();
        m.map(r, Hpa::new(0x8000), SecondStageAttrs::rwx(), PageSize::Size4K).unwrap();
        let mut tlb = TranslationCache::new(SecondStage::four_level(), 1, 1);
        tlb.translate(&arena, m.root(), Gpa::new(0x1000), Access::read()).unwrap();

        // Act
        let again = tlb.translate(&arena, m.root(), Gpa::new(0x1008), Access::read()).unwrap();
        let other = tlb.translate(&arena, m.root(), Gpa::new(0x2000), Access::read()).unwrap();

        // Assert
        assert_eq!(again.addr, Hpa::new(0x8008));
        assert_eq!(other.addr, Hpa::new(0x9000));
        assert_eq!(tlb.stats().hits, 1);
    }
}
