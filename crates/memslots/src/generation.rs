//! An immutable, published set of memslots (KVM's `struct kvm_memslots`
//! generation) and its read-side indexes:
//!
//! - per address space, the slots in gfn order with a bucket table over the
//!   gfn span (bucket `b` holds the index of the slot at or before its first
//!   gfn), so gfn → slot is one bucket read plus a search among the few slots
//!   of one bucket — O(1) for evenly spread slots, O(log n) at worst;
//! - a VM-wide last-hit index (KVM's `slots->last_used_slot`) and a
//!   per-reader one, [`LookupCache`] (KVM's `vcpu->last_used_slot`);
//! - over all address spaces, slots sorted by host-virtual start with an
//!   implicit interval tree (each subtree's largest end stored at its root),
//!   for hva range → (slot, gfn range) in O(log n + k).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use memvisor_types::{Address, Gfn, Gpa, Hva, PageSize};

use crate::slot::{FileId, GfnRange, Memslot, SlotGfnRange, SlotKey};

const PAGE_SHIFT: u32 = PageSize::Size4K.shift();
const PAGE_MASK: u64 = PageSize::Size4K.offset_mask();
/// Most buckets per address space (4 MiB of bucket table).
const MAX_BUCKETS: usize = 1 << 20;

/// Process-wide generation identities, so a [`LookupCache`] filled from one
/// VM's generation never answers for another's. 0 is never used.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The result of a gfn → slot lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'g> {
    /// A valid slot maps the gfn.
    Slot(&'g Memslot),
    /// The slot mapping the gfn is being deleted or moved: the access must
    /// retry once the update has been published.
    Invalid(&'g Memslot),
    /// No slot maps the gfn (an MMIO access, for a fault).
    None,
}

impl<'g> Lookup<'g> {
    /// The slot, valid or not.
    pub fn slot(self) -> Option<&'g Memslot> {
        match self {
            Lookup::Slot(s) | Lookup::Invalid(s) => Some(s),
            Lookup::None => None,
        }
    }
}

/// Why a translation found no usable slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Miss {
    /// No slot maps the address.
    NoSlot,
    /// The slot is being deleted or moved: retry.
    Invalid,
    /// The slot has no (open) guest_memfd binding for a private access.
    NoGuestMemfd,
}

/// A reader's own last-hit slot: what KVM keeps per vCPU
/// (`vcpu->last_used_slot`). It remembers the slot of the previous
/// [`Generation::gpa_to_hva_cached`] and answers the next lookup in that
/// slot without searching. Tagged with the generation it came from, so it
/// is simply ignored (and refilled) after an update. Never shared, so it
/// costs no atomic operation and no cache-line traffic between vCPUs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LookupCache {
    /// `generation id << 16 | address space` (0: empty; ids start at 1).
    tag: u64,
    base: u64,
    npages: u64,
    /// `hva - gpa` of the slot (modulo 2^64).
    delta: u64,
}

/// Hot data of one slot in gfn order (32 bytes: two per cache line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) base: u64,
    pub(crate) end: u64,
    /// `userspace_addr - base_gpa`, modulo 2^64: `hva = gpa + delta` for
    /// every gpa of the slot, and that sum is exact (it is an address of the
    /// slot's host range, which was checked to fit).
    delta: u64,
    /// Slot id (the address space is the index's).
    pub(crate) id: u16,
    invalid: bool,
}

impl Entry {
    pub(crate) fn of(slot: &Memslot) -> Self {
        let gfns = slot.gfns();
        let base = gfns.start().as_u64();
        Self {
            base,
            end: gfns.end().as_u64(),
            delta: slot.userspace_addr().raw().wrapping_sub(base << PAGE_SHIFT),
            id: slot.id(),
            invalid: slot.is_invalid(),
        }
    }

    #[inline]
    fn contains(&self, gfn: u64) -> bool {
        self.base <= gfn && gfn < self.end
    }
}

/// A slot's host-virtual range, in the hva index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Span {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) key: SlotKey,
}

impl Span {
    pub(crate) fn of(slot: &Memslot) -> Self {
        let (start, end) = slot.hva_range();
        Self { start: start.raw(), end: end.raw(), key: slot.key() }
    }
}

/// The slots of one address space in gfn order, with the bucket table.
#[derive(Debug)]
struct GfnIndex {
    entries: Box<[Entry]>,
    /// First gfn of bucket 0 (the lowest base).
    min: u64,
    /// Bucket `b` covers gfns `min + (b << shift) ..`.
    shift: u32,
    /// `buckets[b]`: index of the last entry whose base is at or below the
    /// first gfn of bucket `b` (0 if none); one more than the bucket count,
    /// so `buckets[b]..=buckets[b + 1]` holds every candidate of bucket `b`.
    buckets: Box<[u32]>,
    /// Index of the entry that answered the last shared lookup (a hint; any value is safe).
    last_hit: AtomicUsize,
}

impl GfnIndex {
    /// `entries` sorted by base, disjoint.
    fn new(entries: Box<[Entry]>) -> Self {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Self { entries, min: 0, shift: 0, buckets: Box::new([]), last_hit: AtomicUsize::new(0) };
        };
        let (min, span) = (first.base, last.end - first.base);
        let count = (entries.len() * 2).next_power_of_two().min(MAX_BUCKETS);
        // The smallest shift with `count << shift >= span`.
        let mut shift = 0;
        while (span - 1) >> shift >= count as u64 {
            shift += 1;
        }
        // Entry `j` answers for the buckets whose first gfn lies in
        // `base_j..base_(j+1)`: from `ceil((base_j - min) / width)` on.
        let mut buckets: Vec<u32> = Vec::with_capacity(count + 1);
        let first_bucket =
            |base: u64| usize::try_from((base - min).div_ceil(1 << shift)).unwrap_or(usize::MAX);
        for (j, pair) in entries.windows(2).enumerate() {
            let next = pair.get(1).map_or(count + 1, |e| first_bucket(e.base)).min(count + 1);
            // At most 32767 entries per address space.
            buckets.resize(next.max(buckets.len()), u32::try_from(j).unwrap_or(u32::MAX));
        }
        let last = u32::try_from(entries.len() - 1).unwrap_or(u32::MAX);
        buckets.resize(count + 1, last);
        Self { entries, min, shift, buckets: buckets.into_boxed_slice(), last_hit: AtomicUsize::new(0) }
    }

    /// Index of the entry mapping `gfn`, by the bucket table.
    #[inline]
    fn search(&self, gfn: u64) -> Option<usize> {
        // Below `min`, the difference wraps to a bucket far past the table.
        let b = usize::try_from(gfn.wrapping_sub(self.min) >> self.shift).ok()?;
        let lo = usize::try_from(*self.buckets.get(b)?).ok()?;
        let hi = usize::try_from(*self.buckets.get(b.wrapping_add(1))?).ok()?;
        let i = if lo == hi {
            // The common case: one candidate for the whole bucket.
            lo
        } else {
            lo + floor_index(self.entries.get(lo..=hi)?, gfn)?
        };
        self.entries.get(i).filter(|e| e.contains(gfn)).map(|_| i)
    }

    /// The entry mapping `gfn`, trying the VM-wide last hit first.
    #[inline]
    fn find(&self, gfn: u64) -> Option<&Entry> {
        let hint = self.last_hit.load(Ordering::Relaxed);
        if let Some(e) = self.entries.get(hint)
            && e.contains(gfn)
        {
            return Some(e);
        }
        let i = self.search(gfn)?;
        self.last_hit.store(i, Ordering::Relaxed);
        self.entries.get(i)
    }

    /// Entries overlapping `range`, in gfn order.
    fn overlapping(&self, range: GfnRange) -> impl Iterator<Item = &Entry> {
        let (start, end) = (range.start().as_u64(), range.end().as_u64());
        let first = match floor_index(&self.entries, start) {
            Some(i) if self.entries.get(i).is_some_and(|e| e.end > start) => i,
            Some(i) => i + 1,
            None => 0,
        };
        self.entries.get(first..).unwrap_or(&[]).iter().take_while(move |e| e.base < end)
    }
}

/// The largest `i` with `entries[i].base <= x` (`entries` sorted by base),
/// by a binary search whose only data-dependent step is a conditional move.
#[inline]
fn floor_index(entries: &[Entry], x: u64) -> Option<usize> {
    let mut base = 0usize;
    let mut size = entries.len();
    if size == 0 {
        return None;
    }
    while size > 1 {
        let half = size / 2;
        let mid = base + half;
        // `mid < base + size <= entries.len()`.
        let below = entries.get(mid).is_some_and(|e| e.base <= x);
        base = if below { mid } else { base };
        size -= half;
    }
    entries.get(base).is_some_and(|e| e.base <= x).then_some(base)
}

/// All slots by host-virtual start, as an implicit interval tree over the
/// sorted array: node `i` sits at level `k` = the number of trailing one
/// bits of `i`; its children are `i ∓ 2^(k-1)`, and its subtree covers
/// `i - (2^k - 1) ..= i + (2^k - 1)`. The array is padded to `2^(K+1) - 1`
/// nodes with empty spans so every node exists; `sub_max[i]` is the largest
/// end in node `i`'s subtree. Built bottom-up in O(n); a query visits
/// O(log n + k) nodes.
#[derive(Debug, Default)]
struct HvaIndex {
    spans: Box<[Span]>,
    sub_max: Box<[u64]>,
    /// The root's level `K` (the root is node `2^K - 1`).
    levels: u32,
}

/// Padding: starts after everything, ends before everything.
const NO_SPAN: Span = Span { start: u64::MAX, end: 0, key: SlotKey { as_id: u16::MAX, id: u16::MAX } };

impl HvaIndex {
    /// `spans` sorted by start.
    fn new(spans: Box<[Span]>) -> Self {
        let n = spans.len();
        if n == 0 {
            return Self::default();
        }
        let levels = n.ilog2();
        let size = (2usize << levels) - 1;
        let mut padded = spans.into_vec();
        padded.resize(size, NO_SPAN);
        let mut sub_max: Vec<u64> = padded.iter().map(|s| s.end).collect();
        for k in 1..=levels {
            let half = 1usize << (k - 1);
            for i in ((2 * half - 1)..size).step_by(4 * half) {
                let children = sub_max
                    .get(i - half)
                    .copied()
                    .unwrap_or(0)
                    .max(sub_max.get(i + half).copied().unwrap_or(0));
                if let Some(m) = sub_max.get_mut(i) {
                    *m = (*m).max(children);
                }
            }
        }
        Self { spans: padded.into_boxed_slice(), sub_max: sub_max.into_boxed_slice(), levels }
    }

    /// The real spans (without padding).
    fn real_spans(&self) -> impl Iterator<Item = &Span> {
        self.spans.iter().take_while(|s| **s != NO_SPAN)
    }

    /// Calls `f(key)` for every span overlapping `start..end`, in start order.
    fn for_each_overlap(&self, start: u64, end: u64, f: &mut impl FnMut(SlotKey)) {
        if !self.spans.is_empty() {
            self.visit((1 << self.levels) - 1, self.levels, start, end, f);
        }
    }

    fn visit(&self, i: usize, k: u32, start: u64, end: u64, f: &mut impl FnMut(SlotKey)) {
        // Nothing in this subtree ends after `start`.
        if self.sub_max.get(i).is_none_or(|&m| m <= start) {
            return;
        }
        let half = if k > 0 { 1usize << (k - 1) } else { 0 };
        if k > 0 {
            self.visit(i - half, k - 1, start, end, f);
        }
        let Some(span) = self.spans.get(i) else { return };
        // This node and its right subtree start at or after `end`.
        if span.start >= end {
            return;
        }
        if span.end > start {
            f(span.key);
        }
        if k > 0 {
            self.visit(i + half, k - 1, start, end, f);
        }
    }
}

/// One published set of memslots. Immutable: an update publishes a new
/// generation, and readers holding this one keep a consistent view.
#[derive(Debug)]
pub struct Generation {
    /// Process-wide identity (for [`LookupCache`]).
    id: u64,
    number: u64,
    /// Every slot, by key.
    slots: Box<[Memslot]>,
    spaces: Box<[GfnIndex]>,
    hva: HvaIndex,
}

impl Generation {
    /// Builds a generation from the writer's indexes: `slots` sorted by
    /// key, per address space the entries sorted by base, and the spans
    /// sorted by start. Linear: two passes over the data (bucket tables and
    /// the interval tree) besides the copies.
    pub(crate) fn build(
        number: u64,
        slots: Box<[Memslot]>,
        spaces: Vec<Box<[Entry]>>,
        spans: Box<[Span]>,
    ) -> Self {
        let spaces = spaces.into_iter().map(GfnIndex::new).collect();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Self { id, number, slots, spaces, hva: HvaIndex::new(spans) }
    }

    /// A copy numbered `number` in which the slots `keys` (sorted) are replaced by
    /// their invalid copies (KVM's `KVM_MEMSLOT_INVALID`).
    pub(crate) fn with_invalid(&self, number: u64, keys: &[SlotKey]) -> Self {
        let hit = |key: SlotKey| keys.binary_search(&key).is_ok();
        let slots =
            self.slots.iter().map(|s| Memslot { invalid: s.invalid || hit(s.key()), ..s.clone() }).collect();
        let spaces = self
            .spaces
            .iter()
            .enumerate()
            .map(|(as_id, space)| {
                let as_id = u16::try_from(as_id).unwrap_or(u16::MAX);
                space
                    .entries
                    .iter()
                    .map(|e| Entry { invalid: e.invalid || hit(SlotKey { as_id, id: e.id }), ..*e })
                    .collect()
            })
            .collect();
        Self::build(number, slots, spaces, self.hva.real_spans().copied().collect())
    }

    /// The generation number (every publication increments it).
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Number of slots in all address spaces.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is no slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every slot, ordered by (address space, id).
    pub fn slots(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter()
    }

    /// The slot with `key`.
    pub fn slot(&self, key: SlotKey) -> Option<&Memslot> {
        let i = self.slots.binary_search_by_key(&key, |s| s.key()).ok()?;
        self.slots.get(i)
    }

    fn slot_of(&self, as_id: u16, e: &Entry) -> Option<&Memslot> {
        self.slot(SlotKey { as_id, id: e.id })
    }

    /// The slot of address space `as_id` mapping `gfn` — O(1) when it is the
    /// slot of the previous lookup, else O(log n).
    pub fn lookup(&self, as_id: u16, gfn: Gfn) -> Lookup<'_> {
        let Some(e) = self.spaces.get(usize::from(as_id)).and_then(|s| s.find(gfn.as_u64())) else {
            return Lookup::None;
        };
        match self.slot_of(as_id, e) {
            Some(s) if e.invalid => Lookup::Invalid(s),
            Some(s) => Lookup::Slot(s),
            None => Lookup::None,
        }
    }

    /// The host-virtual address of `gpa` in address space `as_id` (using
    /// the VM-wide last-hit slot, then the bucket table).
    #[inline]
    pub fn gpa_to_hva(&self, as_id: u16, gpa: Gpa) -> Result<Hva, Miss> {
        let space = self.spaces.get(usize::from(as_id)).ok_or(Miss::NoSlot)?;
        let e = space.find(gpa.raw() >> PAGE_SHIFT).ok_or(Miss::NoSlot)?;
        if e.invalid {
            return Err(Miss::Invalid);
        }
        // Exact: see `Entry::delta`.
        Ok(Hva::new(gpa.raw().wrapping_add(e.delta)))
    }

    /// [`gpa_to_hva`](Self::gpa_to_hva) through a reader's own last-hit
    /// cache (a vCPU's): a hit costs two comparisons and an addition, and
    /// nothing is written to memory shared with other readers.
    #[inline]
    pub fn gpa_to_hva_cached(&self, cache: &mut LookupCache, as_id: u16, gpa: Gpa) -> Result<Hva, Miss> {
        let gfn = gpa.raw() >> PAGE_SHIFT;
        let tag = (self.id << 16) | u64::from(as_id);
        if cache.tag == tag && gfn.wrapping_sub(cache.base) < cache.npages {
            return Ok(Hva::new(gpa.raw().wrapping_add(cache.delta)));
        }
        let space = self.spaces.get(usize::from(as_id)).ok_or(Miss::NoSlot)?;
        let e = space.search(gfn).and_then(|i| space.entries.get(i)).ok_or(Miss::NoSlot)?;
        if e.invalid {
            return Err(Miss::Invalid);
        }
        *cache = LookupCache { tag, base: e.base, npages: e.end - e.base, delta: e.delta };
        Ok(Hva::new(gpa.raw().wrapping_add(e.delta)))
    }

    /// The host-virtual address of `gfn`'s first byte in address space `as_id`.
    pub fn gfn_to_hva(&self, as_id: u16, gfn: Gfn) -> Result<Hva, Miss> {
        let gpa = gfn.checked_addr().ok_or(Miss::NoSlot)?;
        self.gpa_to_hva(as_id, gpa)
    }

    /// The guest_memfd file and byte offset backing `gfn`'s private half.
    pub fn gfn_to_gmem(&self, as_id: u16, gfn: Gfn) -> Result<(FileId, u64), Miss> {
        match self.lookup(as_id, gfn) {
            Lookup::Slot(s) => s.gfn_to_gmem(gfn).ok_or(Miss::NoGuestMemfd),
            Lookup::Invalid(_) => Err(Miss::Invalid),
            Lookup::None => Err(Miss::NoSlot),
        }
    }

    /// Calls `f` for every slot (of any address space, invalid ones
    /// included) mapping part of the host-virtual range `start..end`, with the
    /// gfns of that part — partial pages rounded out, as KVM's
    /// `__kvm_handle_hva_range` does. O(log n + k).
    pub fn for_each_hva_overlap(&self, start: Hva, end: Hva, mut f: impl FnMut(SlotGfnRange)) {
        let (start, end) = (start.raw(), end.raw());
        if start >= end {
            return;
        }
        self.hva.for_each_overlap(start, end, &mut |key| {
            let Some(s) = self.slot(key) else { return };
            let (lo, hi) = s.hva_range();
            let first = start.max(lo.raw());
            let last = end.min(hi.raw());
            let base = s.base_gfn().as_u64();
            let gfn_start = base + ((first - lo.raw()) >> PAGE_SHIFT);
            // Round the end up to the page holding `last - 1`.
            let gfn_end = base + ((last - lo.raw() + PAGE_MASK) >> PAGE_SHIFT);
            if let Some(gfns) = GfnRange::new(Gfn::new(gfn_start), Gfn::new(gfn_end)) {
                f(SlotGfnRange { slot: s.key(), gfns, invalid: s.is_invalid() });
            }
        });
    }

    /// Every (slot, gfn range) the host-virtual range `start..end` maps:
    /// what an MMU notifier must zap.
    pub fn hva_to_gfn_ranges(&self, start: Hva, end: Hva) -> Vec<SlotGfnRange> {
        let mut out = Vec::new();
        self.for_each_hva_overlap(start, end, |r| out.push(r));
        out
    }

    /// The parts of `gfns` mapped by slots, in every address space, invalid
    /// slots included.
    pub fn gfn_range_slots(&self, gfns: GfnRange) -> Vec<SlotGfnRange> {
        let mut out = Vec::new();
        for (as_id, space) in self.spaces.iter().enumerate() {
            let as_id = u16::try_from(as_id).unwrap_or(u16::MAX);
            for e in space.overlapping(gfns) {
                let Some(s) = self.slot_of(as_id, e) else { continue };
                if let Some(part) = s.gfns().intersection(&gfns) {
                    out.push(SlotGfnRange { slot: s.key(), gfns: part, invalid: e.invalid });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(bases: &[(u64, u64)]) -> Vec<Entry> {
        bases.iter().map(|&(base, end)| Entry { base, end, delta: 0, id: 0, invalid: false }).collect()
    }

    #[test]
    fn floor_index_finds_last_base_not_above() {
        let e = entries(&[(10, 11), (20, 21), (30, 31), (40, 41)]);

        let found: Vec<Option<usize>> = [5, 10, 15, 40, 99].iter().map(|&x| floor_index(&e, x)).collect();

        assert_eq!(found, vec![None, Some(0), Some(0), Some(3), Some(3)]);
    }

    #[test]
    fn floor_index_of_no_entries_is_none() {
        assert_eq!(floor_index(&[], 7), None);
    }

    #[test]
    fn bucket_search_handles_clustered_slots_and_far_outliers() {
        // Arrange: 100 one-page slots at gfns 0..200 step 2, and one at 2^39.
        let mut spans: Vec<(u64, u64)> = (0..100).map(|i| (2 * i, 2 * i + 1)).collect();
        spans.push((1 << 39, (1 << 39) + 4));
        let index = GfnIndex::new(entries(&spans).into_boxed_slice());

        // Act
        let hits: Vec<Option<usize>> = [0, 1, 198, 199, 200, 1 << 39, (1 << 39) + 3, (1 << 39) + 4, u64::MAX]
            .iter()
            .map(|&g| index.search(g))
            .collect();

        // Assert
        assert_eq!(hits, vec![Some(0), None, Some(99), None, None, Some(100), Some(100), None, None]);
    }

    #[test]
    fn hva_tree_reports_nested_and_disjoint_spans() {
        // Arrange: one long span covering two short ones, and a disjoint one.
        let span = |start, end, id| Span { start, end, key: SlotKey { as_id: 0, id } };
        let index =
            HvaIndex::new(Box::new([span(0, 100, 0), span(10, 20, 1), span(30, 40, 2), span(200, 300, 3)]));
        let mut hits = Vec::new();

        // Act
        index.for_each_overlap(35, 250, &mut |k| hits.push(k.id));

        // Assert
        assert_eq!(hits, vec![0, 2, 3]);
    }

    /// A small deterministic generator for the larger layouts below.
    fn lcg(state: &mut u64) -> u64 {
        *state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        *state >> 33
    }

    #[test]
    fn bucket_search_matches_a_scan_for_thousands_of_uneven_slots() {
        // Arrange: 3000 disjoint slots with gaps from 0 to ~2^20 pages.
        let mut state = 7;
        let mut spans = Vec::new();
        let mut next = 0u64;
        for _ in 0..3000 {
            let gap = match lcg(&mut state) % 4 {
                0 => 0,
                1 => lcg(&mut state) % 8,
                2 => lcg(&mut state) % 4096,
                _ => lcg(&mut state) % (1 << 20),
            };
            let len = 1 + lcg(&mut state) % 64;
            spans.push((next + gap, next + gap + len));
            next += gap + len;
        }
        let index = GfnIndex::new(entries(&spans).into_boxed_slice());

        // Act + Assert
        for _ in 0..20_000 {
            let gfn = lcg(&mut state) % (next + 10);
            let naive = spans.iter().position(|&(b, e)| b <= gfn && gfn < e);
            assert_eq!(index.search(gfn), naive, "gfn {gfn:#x}");
        }
    }

    #[test]
    fn hva_tree_matches_a_scan_for_a_thousand_aliasing_spans() {
        // Arrange: 1000 spans, often overlapping, some very long.
        let mut state = 11;
        let mut spans: Vec<Span> = (0..1000u16)
            .map(|id| {
                let start = lcg(&mut state) % 100_000;
                let len = if id % 97 == 0 { 50_000 } else { 1 + lcg(&mut state) % 300 };
                Span { start, end: start + len, key: SlotKey { as_id: 0, id } }
            })
            .collect();
        spans.sort_unstable();
        let index = HvaIndex::new(spans.clone().into_boxed_slice());

        // Act + Assert
        for _ in 0..2000 {
            let start = lcg(&mut state) % 110_000;
            let end = start + lcg(&mut state) % 2000;
            let mut got = Vec::new();
            index.for_each_overlap(start, end, &mut |k| got.push(k));
            let naive: Vec<SlotKey> =
                spans.iter().filter(|s| s.start < end && start < s.end).map(|s| s.key).collect();
            assert_eq!(got, naive, "{start:#x}..{end:#x}");
        }
    }
}
