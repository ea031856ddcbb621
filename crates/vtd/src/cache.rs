//! The unit's caches: context cache, PASID cache and IOTLB (VT-d ch. 6),
//! plus the fast hasher they use.
//!
//! - **Context cache**: decoded context entries by source id (legacy
//!   entries tagged with their DID).
//! - **PASID cache**: decoded PASID entries by (source id, PASID), tagged
//!   with their DID.
//! - **IOTLB**: a direct-mapped array of translations tagged by DID, PASID
//!   and page (one probe per page size), bounded by
//!   [`Config::iotlb_entries`](crate::Config::iotlb_entries) (0 = no caching).
//!   A hit is one multiply-shift hash, one compare and a permission check:
//!   no allocation, no tree walk. Up to `entries` consecutive pages of one
//!   tag never collide (the page number's low bits pick the slot).
//! - **Paging-structure caches** ([`WalkCaches`]): memvisor-paging
//!   [`TranslationCache`]s for first-stage walks and for both stages of
//!   nested walks, so an IOTLB miss next to a cached page walks only the
//!   levels below the deepest cached table (a nested miss: 2 entry reads
//!   instead of 24 in the common case).
//!
//! Entries are created only by successful lookups (or, with caching mode,
//! by not-present results) and dropped only by the guest's invalidations
//! (or by replacement when a slot is reused): a guest that changes an
//! entry without invalidating keeps seeing the old one, as on hardware.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use memvisor_paging::{CacheStats, SecondStage, TranslationCache, X86Paging};

use crate::tables::{Context, PasidEntry, TableFault};

/// A small multiply-rotate hasher (FxHash-like) for the cache maps: the
/// keys are a few integers, so SipHash's DoS resistance buys nothing
/// (the maps are bounded) and costs most of a hit.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastHasher(u64);

const K: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(K);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// A `HashMap` with [`FastHasher`].
pub type FastMap<Key, V> = HashMap<Key, V, BuildHasherDefault<FastHasher>>;

/// Most entries the context and PASID caches hold; when full they are
/// emptied (keeps a guest that issues requests for many PASIDs from growing
/// the VMM's memory without bound).
pub const MAX_MAP_ENTRIES: usize = 1 << 16;

/// What the context cache holds for a source id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedContext {
    /// A valid entry.
    Valid(Context),
    /// A not-present or invalid entry (only with caching mode).
    Fault(TableFault),
}

/// What the PASID cache holds for a (source id, PASID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedPasid {
    /// A valid entry.
    Valid(PasidEntry),
    /// A not-present or invalid entry (only with caching mode).
    Fault(TableFault),
}

/// The context cache.
#[derive(Debug, Default)]
pub struct ContextCache {
    map: FastMap<u16, CachedContext>,
}

impl ContextCache {
    /// The cached entry of `sid`.
    #[inline]
    pub fn get(&self, sid: u16) -> Option<&CachedContext> {
        self.map.get(&sid)
    }

    /// Caches `entry` for `sid`.
    pub fn insert(&mut self, sid: u16, entry: CachedContext) {
        if self.map.len() >= MAX_MAP_ENTRIES {
            self.map.clear();
        }
        self.map.insert(sid, entry);
    }

    /// Drops every entry for which `f` holds; returns how many.
    pub fn retain(&mut self, mut f: impl FnMut(u16, &CachedContext) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|&sid, e| f(sid, e));
        before - self.map.len()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The PASID cache.
#[derive(Debug, Default)]
pub struct PasidCache {
    map: FastMap<(u16, u32), CachedPasid>,
}

impl PasidCache {
    /// The cached entry of `sid`/`pasid`.
    #[inline]
    pub fn get(&self, sid: u16, pasid: u32) -> Option<&CachedPasid> {
        self.map.get(&(sid, pasid))
    }

    /// Caches `entry`.
    pub fn insert(&mut self, sid: u16, pasid: u32, entry: CachedPasid) {
        if self.map.len() >= MAX_MAP_ENTRIES {
            self.map.clear();
        }
        self.map.insert((sid, pasid), entry);
    }

    /// Keeps the entries for which `f` holds; returns how many were dropped.
    pub fn retain(&mut self, mut f: impl FnMut(u16, u32, &CachedPasid) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|&(sid, pasid), e| f(sid, pasid, e));
        before - self.map.len()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How an IOTLB entry was derived: decides which invalidations drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EntryKind {
    /// Second-stage only or pass-through (IOTLB invalidation, type 2).
    #[default]
    SecondStage,
    /// First-stage only (PASID-based IOTLB invalidation, type 6).
    FirstStage,
    /// Nested (both).
    Nested,
}

/// The PASID tag of entries for legacy-mode requests.
pub const NO_PASID: u32 = u32::MAX;

/// One cached translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IotlbEntry {
    /// Domain id.
    pub did: u16,
    /// PASID ([`NO_PASID`] in legacy mode).
    pub pasid: u32,
    /// Privileged (supervisor) request: first-stage rights depend on it.
    pub privileged: bool,
    /// Page-size level: 1 = 4K, 2 = 2M, 3 = 1G.
    pub level: u8,
    /// Input page number (input >> page shift).
    pub page: u64,
    /// Output page base.
    pub output: u64,
    /// Reads allowed for this request type.
    pub read: bool,
    /// Writes allowed for this request type.
    pub write: bool,
    /// Execute allowed for this request type.
    pub exec: bool,
    /// The leaf's dirty flag is set (or the format has none): a write
    /// needs no walk to set it.
    pub dirty: bool,
    /// How the entry was derived.
    pub kind: EntryKind,
}

impl IotlbEntry {
    /// Bytes mapped by the entry.
    pub const fn size(&self) -> u64 {
        1u64 << shift(self.level)
    }

    /// First input address of the entry.
    pub const fn input_base(&self) -> u64 {
        self.page << shift(self.level)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    valid: bool,
    entry: IotlbEntry,
}

#[inline]
const fn shift(level: u8) -> u32 {
    // Levels are 1..=3 (4K, 2M, 1G); others are clamped into that range.
    let l = match level {
        0 | 1 => 0,
        2 => 1,
        _ => 2,
    };
    12 + 9 * l
}

/// Slot of a translation: the page number's low bits pick the slot
/// directly (so up to `mask + 1` consecutive pages of one tag never
/// collide), offset by a hash of the tag and of the page's high bits.
#[inline]
fn slot_index(did: u16, pasid: u32, privileged: bool, level: u8, page: u64, mask: usize) -> usize {
    // `mask` is 2^k - 1 (k <= 20): `high` is the page-number bits it does not select.
    let high = page >> (usize::BITS - mask.leading_zeros());
    let tag =
        (u64::from(did) << 40) ^ (u64::from(pasid) << 8) ^ (u64::from(level) << 1) ^ u64::from(privileged);
    let h = (tag ^ high.rotate_left(23)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // Only the low bits survive the mask, so the truncation is intended.
    #[allow(clippy::cast_possible_truncation)]
    let idx = page.wrapping_add(h >> 32) as usize;
    idx & mask
}

/// The IOTLB: a direct-mapped array, one probe per page size.
#[derive(Debug, Clone)]
pub struct Iotlb {
    slots: Vec<Slot>,
    mask: usize,
    /// Levels with at least one valid entry (bit per level): misses skip
    /// probing sizes nothing was cached at.
    levels_used: u8,
}

impl Iotlb {
    /// An IOTLB with `entries` slots (rounded up to a power of two, at most
    /// 2^20); 0 disables caching.
    pub fn new(entries: usize) -> Self {
        let n = if entries == 0 { 0 } else { entries.min(1 << 20).next_power_of_two() };
        Iotlb { slots: vec![Slot::default(); n], mask: n.saturating_sub(1), levels_used: 0 }
    }

    /// Whether translations are cached at all.
    pub fn enabled(&self) -> bool {
        !self.slots.is_empty()
    }

    /// The entry covering `addr` for `did`/`pasid`/privilege.
    #[inline]
    pub fn lookup(&self, did: u16, pasid: u32, privileged: bool, addr: u64) -> Option<(usize, IotlbEntry)> {
        if self.slots.is_empty() {
            return None;
        }
        for level in 1..=3u8 {
            if self.levels_used & (1 << level) == 0 {
                continue;
            }
            let page = addr >> shift(level);
            let idx = slot_index(did, pasid, privileged, level, page, self.mask);
            if let Some(s) = self.slots.get(idx) {
                let e = &s.entry;
                if s.valid
                    && e.page == page
                    && e.level == level
                    && e.did == did
                    && e.pasid == pasid
                    && e.privileged == privileged
                {
                    return Some((idx, *e));
                }
            }
        }
        None
    }

    /// Drops the slot `idx` (a hit that needs a re-walk).
    pub fn drop_slot(&mut self, idx: usize) {
        if let Some(s) = self.slots.get_mut(idx) {
            s.valid = false;
        }
    }

    /// Caches `entry` (replacing whatever shares its slot).
    pub fn insert(&mut self, entry: IotlbEntry) {
        if self.slots.is_empty() || !(1..=3).contains(&entry.level) {
            return;
        }
        let idx = slot_index(entry.did, entry.pasid, entry.privileged, entry.level, entry.page, self.mask);
        if let Some(s) = self.slots.get_mut(idx) {
            *s = Slot { valid: true, entry };
            self.levels_used |= 1 << entry.level;
        }
    }

    /// Drops every entry for which `f` holds; returns how many.
    pub fn drop_where(&mut self, mut f: impl FnMut(&IotlbEntry) -> bool) -> usize {
        let mut n = 0;
        for s in self.slots.iter_mut().filter(|s| s.valid) {
            if f(&s.entry) {
                s.valid = false;
                n += 1;
            }
        }
        n
    }

    /// Drops the entries matching `f` whose page overlaps `first..=last`
    /// (any tag: a scan, bounded by the IOTLB size).
    pub fn drop_range(&mut self, first: u64, last: u64, mut f: impl FnMut(&IotlbEntry) -> bool) -> usize {
        self.drop_where(|e| {
            let end = e.input_base().saturating_add(e.size() - 1);
            e.input_base() <= last && end >= first && f(e)
        })
    }

    /// Drops the entries of `did`/`pasid` (with either privilege) covering
    /// any page of `first..=last`, by probing when the range is small.
    pub fn drop_tagged_range(
        &mut self,
        did: u16,
        pasid: u32,
        first: u64,
        last: u64,
        mut f: impl FnMut(&IotlbEntry) -> bool,
    ) -> usize {
        let pages_4k = (last >> 12).saturating_sub(first >> 12);
        let overlaps = |e: &IotlbEntry| {
            let end = e.input_base().saturating_add(e.size() - 1);
            e.input_base() <= last && end >= first
        };
        if pages_4k.saturating_mul(6) >= self.slots.len() as u64 {
            return self.drop_where(|e| e.did == did && e.pasid == pasid && overlaps(e) && f(e));
        }
        let mut n = 0;
        for level in 1..=3u8 {
            if self.levels_used & (1 << level) == 0 {
                continue;
            }
            for page in (first >> shift(level))..=(last >> shift(level)) {
                for privileged in [false, true] {
                    let idx = slot_index(did, pasid, privileged, level, page, self.mask);
                    if let Some(s) = self.slots.get_mut(idx) {
                        let e = &s.entry;
                        if s.valid
                            && e.did == did
                            && e.pasid == pasid
                            && e.level == level
                            && e.page == page
                            && e.privileged == privileged
                            && f(e)
                        {
                            s.valid = false;
                            n += 1;
                        }
                    }
                }
            }
        }
        n
    }

    /// Drops everything.
    pub fn clear(&mut self) -> usize {
        self.drop_where(|_| true)
    }

    /// Number of valid entries.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.valid).count()
    }

    /// Whether no entry is valid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most walk caches (distinct table formats, and for nested walks
/// distinct second-stage tables) kept at once; the oldest goes first.
pub const MAX_WALK_CACHES: usize = 16;

/// Paging-structure caches for first-stage and nested walks (memvisor-paging
/// [`TranslationCache`]s, one per format): on an IOTLB miss the walk starts
/// from the deepest cached table instead of the root, and a nested walk
/// finds the second-stage translations of first-stage table addresses in
/// a second-stage TLB.
///
/// First-stage caches are keyed by table root (FSPTPTR) and format; the
/// first-stage caches of nested walks also by SSPTPTR (their tables are
/// read through it); the nested second-stage caches by SSPTPTR and format.
#[derive(Debug)]
pub struct WalkCaches {
    psc_entries: usize,
    s2_tlb_entries: usize,
    fs: Vec<(X86Paging, TranslationCache<X86Paging>)>,
    nested_s1: Vec<((X86Paging, SecondStage, u64), TranslationCache<X86Paging>)>,
    nested_s2: Vec<(SecondStage, TranslationCache<SecondStage>)>,
}

impl WalkCaches {
    /// Caches with `psc_entries` slots per paging-structure level and
    /// `s2_tlb_entries` second-stage TLB slots per page size for nested walks.
    pub fn new(psc_entries: usize, s2_tlb_entries: usize) -> Self {
        WalkCaches {
            psc_entries,
            s2_tlb_entries,
            fs: Vec::new(),
            nested_s1: Vec::new(),
            nested_s2: Vec::new(),
        }
    }

    fn first_stage_cache(&self, f: X86Paging) -> TranslationCache<X86Paging> {
        // The IOTLB is the TLB: the cache's own TLB is minimal. (Two slots,
        // not one: memvisor-paging's slot hash shifts by 64 for a
        // one-slot array, which overflows in debug builds.)
        TranslationCache::new(f, 2, self.psc_entries.max(2))
    }

    /// The cache for first-stage-only walks with format `f`.
    pub fn first_stage(&mut self, f: X86Paging) -> &mut TranslationCache<X86Paging> {
        let pos = match self.fs.iter().position(|(k, _)| *k == f) {
            Some(p) => p,
            None => {
                if self.fs.len() >= MAX_WALK_CACHES {
                    self.fs.remove(0);
                }
                let c = self.first_stage_cache(f);
                self.fs.push((f, c));
                self.fs.len() - 1
            }
        };
        &mut self.fs[pos].1
    }

    /// The caches for nested walks: stage 1 with `s1` read through the
    /// second stage `s2` at `s2_root`, and stage 2.
    pub fn nested(
        &mut self,
        s1: X86Paging,
        s2: SecondStage,
        s2_root: u64,
    ) -> (&mut TranslationCache<X86Paging>, &mut TranslationCache<SecondStage>) {
        let key = (s1, s2, s2_root);
        let p1 = match self.nested_s1.iter().position(|(k, _)| *k == key) {
            Some(p) => p,
            None => {
                if self.nested_s1.len() >= MAX_WALK_CACHES {
                    self.nested_s1.remove(0);
                }
                let c = self.first_stage_cache(s1);
                self.nested_s1.push((key, c));
                self.nested_s1.len() - 1
            }
        };
        let p2 = match self.nested_s2.iter().position(|(k, _)| *k == s2) {
            Some(p) => p,
            None => {
                if self.nested_s2.len() >= MAX_WALK_CACHES {
                    self.nested_s2.remove(0);
                }
                let c = TranslationCache::new(s2, self.s2_tlb_entries.max(2), self.psc_entries.max(2));
                self.nested_s2.push((s2, c));
                self.nested_s2.len() - 1
            }
        };
        (&mut self.nested_s1[p1].1, &mut self.nested_s2[p2].1)
    }

    /// Drops everything cached for the first-stage table at `root`.
    pub fn invalidate_first_stage_root(&mut self, root: u64) {
        let root = memvisor_types::Gpa::new(root);
        for (_, c) in &mut self.fs {
            c.invalidate_root(root);
        }
        for (_, c) in &mut self.nested_s1 {
            c.invalidate_root(root);
        }
    }

    /// Drops what is cached for `first..=last` of the first-stage table at `root`.
    pub fn invalidate_first_stage_range(&mut self, root: u64, first: u64, last: u64) {
        let Ok(range) = memvisor_types::AddrRange::new(
            memvisor_types::Iova::new(first),
            memvisor_types::Iova::new(last.saturating_add(1)),
        ) else {
            return self.invalidate_first_stage_root(root);
        };
        let root = memvisor_types::Gpa::new(root);
        for (_, c) in &mut self.fs {
            c.invalidate_range(root, range);
        }
        for (_, c) in &mut self.nested_s1 {
            c.invalidate_range(root, range);
        }
    }

    /// Drops the second-stage caches of nested walks (their second stage changed).
    pub fn invalidate_second_stage(&mut self) {
        for (_, c) in &mut self.nested_s2 {
            c.invalidate_all();
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.fs.clear();
        self.nested_s1.clear();
        self.nested_s2.clear();
    }

    /// Counters summed over every cache.
    pub fn stats(&self) -> CacheStats {
        let mut total = CacheStats::default();
        let all = self.fs.iter().map(|(_, c)| c.stats());
        let all = all.chain(self.nested_s1.iter().map(|(_, c)| c.stats()));
        for s in all.chain(self.nested_s2.iter().map(|(_, c)| c.stats())) {
            total.hits += s.hits;
            total.misses += s.misses;
            total.psc_hits += s.psc_hits;
            total.invalidated += s.invalidated;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(did: u16, pasid: u32, level: u8, addr: u64) -> IotlbEntry {
        IotlbEntry {
            did,
            pasid,
            privileged: false,
            level,
            page: addr >> shift(level),
            output: 0x8000_0000,
            read: true,
            write: true,
            exec: false,
            dirty: true,
            kind: EntryKind::SecondStage,
        }
    }

    #[test]
    fn lookup_finds_a_2m_entry_from_any_address_inside_it() {
        // Arrange
        let mut tlb = Iotlb::new(64);
        tlb.insert(entry(1, NO_PASID, 2, 0x20_0000));
        // Act
        let hit = tlb.lookup(1, NO_PASID, false, 0x3f_f123);
        // Assert
        assert_eq!(hit.map(|(_, e)| e.output), Some(0x8000_0000));
        assert!(tlb.lookup(2, NO_PASID, false, 0x3f_f123).is_none());
    }

    #[test]
    fn zero_entries_caches_nothing() {
        // Arrange
        let mut tlb = Iotlb::new(0);
        // Act
        tlb.insert(entry(1, NO_PASID, 1, 0x1000));
        // Assert
        assert!(tlb.lookup(1, NO_PASID, false, 0x1000).is_none());
    }

    #[test]
    fn tagged_range_drop_removes_a_large_page_overlapping_one_4k_page() {
        // Arrange
        let mut tlb = Iotlb::new(64);
        tlb.insert(entry(1, NO_PASID, 2, 0x20_0000));
        tlb.insert(entry(1, NO_PASID, 1, 0x40_0000));
        // Act
        let n = tlb.drop_tagged_range(1, NO_PASID, 0x20_1000, 0x20_1fff, |_| true);
        // Assert
        assert_eq!(n, 1);
        assert!(tlb.lookup(1, NO_PASID, false, 0x20_0000).is_none());
        assert!(tlb.lookup(1, NO_PASID, false, 0x40_0000).is_some());
    }
}
