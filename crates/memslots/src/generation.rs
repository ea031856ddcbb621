//! An immutable, published set of memslots (KVM's `struct kvm_memslots`
//! generation) and its read-side indexes:
//!
//! - per address space, the slots in gfn order, stored in chunks (see
//!   [`Chunked`]) that each carry a bucket table over their gfn span, plus a
//!   bucket table over the chunks' spans: gfn → slot is two bucket reads
//!   (one with a single chunk) plus a search among the few slots of a
//!   bucket — O(1) for evenly spread slots, O(log n) at worst;
//! - a VM-wide last-hit index (KVM's `slots->last_used_slot`) and a
//!   per-reader one, [`LookupCache`] (KVM's `vcpu->last_used_slot`);
//! - over all address spaces, slots sorted by host-virtual start in chunks
//!   that record their largest end, for hva range → (slot, gfn range).
//!
//! Consecutive generations share every chunk an update did not touch, so
//! publishing costs O(chunk size + number of chunks), not O(n).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use memvisor_types::{Address, Gfn, Gpa, Hva, PageSize};

use crate::chunked::{Chunked, Item};
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

/// A gfn range `base..end` that a bucket table can index.
pub(crate) trait Ranged {
    fn base(&self) -> u64;
    fn end(&self) -> u64;
}

impl Ranged for Entry {
    #[inline]
    fn base(&self) -> u64 {
        self.base
    }

    #[inline]
    fn end(&self) -> u64 {
        self.end
    }
}

/// The gfns a chunk of entries spans (its first base to its last end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Extent {
    base: u64,
    end: u64,
}

impl Ranged for Extent {
    #[inline]
    fn base(&self) -> u64 {
        self.base
    }

    #[inline]
    fn end(&self) -> u64 {
        self.end
    }
}

/// Entries are kept by base gfn; each chunk carries its read-side copy
/// with its own bucket table, rebuilt only when that chunk changes.
impl Item for Entry {
    type Key = u64;
    type Aux = Hot;

    fn key(&self) -> u64 {
        self.base
    }

    fn aux(items: &[Self]) -> Hot {
        Hot { buckets: Buckets::new(items), entries: items.into() }
    }

    /// Same bases and ends: the bucket table still holds.
    fn refresh(aux: &mut Hot, items: &[Self]) {
        aux.entries = items.into();
    }
}

/// A chunk of entries as lookups read it: the entries and their bucket
/// table as shared slices, each one pointer away.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hot {
    buckets: Buckets,
    entries: Arc<[Entry]>,
}

impl Hot {
    #[inline]
    fn search(&self, gfn: u64) -> Option<usize> {
        self.buckets.search(&self.entries, gfn)
    }
}

/// A bucket table over disjoint ranges sorted by base: bucket `b` covers
/// gfns `min + (b << shift) ..`, and `table[b]` is the index of the last
/// range whose base is at or below the bucket's first gfn (0 if none); one
/// more than the bucket count, so `table[b]..=table[b + 1]` holds every
/// candidate of bucket `b`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Buckets {
    /// First gfn of bucket 0 (the lowest base).
    min: u64,
    shift: u32,
    table: Arc<[u32]>,
}

impl Buckets {
    /// `ranges` sorted by base, disjoint, none empty.
    fn new<R: Ranged>(ranges: &[R]) -> Self {
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
            return Self::default();
        };
        let (min, span) = (first.base(), last.end() - first.base());
        let count = (ranges.len() * 2).next_power_of_two().min(MAX_BUCKETS);
        // The smallest shift with `count << shift >= span`.
        let mut shift = 0;
        while (span - 1) >> shift >= count as u64 {
            shift += 1;
        }
        // Range `j` answers for the buckets whose first gfn lies in
        // `base_j..base_(j+1)`: from `ceil((base_j - min) / width)` on.
        let mut table: Vec<u32> = Vec::with_capacity(count + 1);
        let first_bucket =
            |base: u64| usize::try_from((base - min).div_ceil(1 << shift)).unwrap_or(usize::MAX);
        for (j, pair) in ranges.windows(2).enumerate() {
            let next = pair.get(1).map_or(count + 1, |e| first_bucket(e.base())).min(count + 1);
            table.resize(next.max(table.len()), u32::try_from(j).unwrap_or(u32::MAX));
        }
        let last = u32::try_from(ranges.len() - 1).unwrap_or(u32::MAX);
        table.resize(count + 1, last);
        Self { min, shift, table: table.into() }
    }

    /// Index of the range of `ranges` (what the table was built from)
    /// holding `gfn`.
    #[inline]
    fn search<R: Ranged>(&self, ranges: &[R], gfn: u64) -> Option<usize> {
        // Below `min`, the difference wraps to a bucket far past the table.
        let b = usize::try_from(gfn.wrapping_sub(self.min) >> self.shift).ok()?;
        let lo = usize::try_from(*self.table.get(b)?).ok()?;
        let hi = usize::try_from(*self.table.get(b.wrapping_add(1))?).ok()?;
        let i = if lo == hi {
            // The common case: one candidate for the whole bucket.
            lo
        } else {
            lo + floor_index(ranges.get(lo..=hi)?, gfn)?
        };
        let r = ranges.get(i)?;
        (r.base() <= gfn && gfn < r.end()).then_some(i)
    }
}

/// The slots of one address space in gfn order: chunks of entries, each
/// with its bucket table, and a bucket table over the chunks' extents. A
/// lookup reads two bucket tables (one when there is a single chunk).
#[derive(Debug)]
#[repr(C)]
struct GfnIndex {
    /// Chunk 0's read side, held inline: with a single chunk (up to
    /// [`MAX_CHUNK`](crate::chunked::MAX_CHUNK) slots) a lookup goes
    /// straight to its bucket table.
    first: Hot,
    /// Whether there are several chunks (the top table is used).
    multi: bool,
    entries: Chunked<Entry>,
    /// `extents[c]`: the gfns chunk `c` spans.
    extents: Box<[Extent]>,
    top: Buckets,
    /// Position (`chunk << 16 | index`) of the entry that answered the last
    /// shared lookup (a hint; any value is safe).
    last_hit: AtomicUsize,
}

impl GfnIndex {
    /// O(number of chunks).
    fn new(entries: Chunked<Entry>) -> Self {
        let first = entries.chunks.first().map(|c| c.aux.clone()).unwrap_or_default();
        if entries.chunks.len() <= 1 {
            let (extents, top) = (Box::default(), Buckets::default());
            return Self { first, multi: false, entries, extents, top, last_hit: AtomicUsize::new(0) };
        }
        let extents: Box<[Extent]> = entries
            .chunks
            .iter()
            .map(|c| Extent {
                base: c.items.first().map_or(0, |e| e.base),
                end: c.items.last().map_or(0, |e| e.end),
            })
            .collect();
        let top = Buckets::new(&extents);
        Self { first, multi: true, entries, extents, top, last_hit: AtomicUsize::new(0) }
    }

    /// Position (`chunk << 16 | index`) and entry mapping `gfn`, by the
    /// bucket tables.
    #[inline]
    fn search(&self, gfn: u64) -> Option<(usize, &Entry)> {
        if !self.multi {
            let i = self.first.search(gfn)?;
            return Some((i, self.first.entries.get(i)?));
        }
        let c = self.top.search(&self.extents, gfn)?;
        let hot = &self.entries.chunks.get(c)?.aux;
        let i = hot.search(gfn)?;
        Some(((c << 16) | i, hot.entries.get(i)?))
    }

    /// The entry at position `pos` (see [`search`](Self::search)).
    #[inline]
    fn at(&self, pos: usize) -> Option<&Entry> {
        if !self.multi {
            self.first.entries.get(pos)
        } else {
            self.entries.chunks.get(pos >> 16)?.aux.entries.get(pos & 0xffff)
        }
    }

    /// The entry mapping `gfn`, trying the VM-wide last hit first.
    #[inline]
    fn find(&self, gfn: u64) -> Option<&Entry> {
        let hint = self.last_hit.load(Ordering::Relaxed);
        if let Some(e) = self.at(hint)
            && e.contains(gfn)
        {
            return Some(e);
        }
        let (pos, e) = self.search(gfn)?;
        self.last_hit.store(pos, Ordering::Relaxed);
        Some(e)
    }

    /// Entries overlapping `range`, in gfn order.
    fn overlapping(&self, range: GfnRange) -> impl Iterator<Item = &Entry> {
        let (start, end) = (range.start().as_u64(), range.end().as_u64());
        self.entries
            .chunks
            .iter()
            .filter(move |c| {
                c.items.first().is_some_and(|e| e.base < end) && c.items.last().is_some_and(|e| e.end > start)
            })
            .flat_map(move |c| c.items.iter().filter(move |e| e.end > start && e.base < end))
    }
}

/// The largest `i` with `ranges[i].base() <= x` (`ranges` sorted by base),
/// by a binary search whose only data-dependent step is a conditional move.
#[inline]
fn floor_index<R: Ranged>(ranges: &[R], x: u64) -> Option<usize> {
    let mut base = 0usize;
    let mut size = ranges.len();
    if size == 0 {
        return None;
    }
    while size > 1 {
        let half = size / 2;
        let mid = base + half;
        // `mid < base + size <= ranges.len()`.
        let below = ranges.get(mid).is_some_and(|e| e.base() <= x);
        base = if below { mid } else { base };
        size -= half;
    }
    ranges.get(base).is_some_and(|e| e.base() <= x).then_some(base)
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

/// Spans are kept sorted; each chunk records the largest end among its
/// spans, so a query skips chunks that end before it.
impl Item for Span {
    type Key = Span;
    type Aux = u64;

    fn key(&self) -> Span {
        *self
    }

    fn aux(items: &[Self]) -> u64 {
        items.iter().map(|s| s.end).max().unwrap_or(0)
    }
}

/// Slots are kept by key.
impl Item for Memslot {
    type Key = SlotKey;
    type Aux = ();

    fn key(&self) -> SlotKey {
        self.key
    }

    fn aux(_: &[Self]) {}
}

/// All slots by host-virtual start, in chunks that know their largest end.
/// A query scans the chunk directory (O(n / chunk)) and the spans of the
/// chunks that may overlap.
#[derive(Debug, Default)]
struct HvaIndex {
    spans: Chunked<Span>,
}

impl HvaIndex {
    /// Calls `f(key)` for every span overlapping `start..end`, in start order.
    fn for_each_overlap(&self, start: u64, end: u64, f: &mut impl FnMut(SlotKey)) {
        for chunk in &self.spans.chunks {
            let Some(first) = chunk.items.first() else { continue };
            if first.start >= end {
                return;
            }
            if chunk.aux <= start {
                continue;
            }
            for span in &chunk.items {
                if span.start >= end {
                    return;
                }
                if span.end > start {
                    f(span.key);
                }
            }
        }
    }
}

/// One published set of memslots. Immutable: an update publishes a new
/// generation, and readers holding this one keep a consistent view.
/// Generations share the chunks nothing changed between them.
#[derive(Debug)]
pub struct Generation {
    /// Process-wide identity (for [`LookupCache`]).
    id: u64,
    number: u64,
    /// Every slot, by key.
    slots: Chunked<Memslot>,
    spaces: Box<[GfnIndex]>,
    hva: HvaIndex,
}

impl Generation {
    /// Builds a generation from (copies of) the writer's chunked tables:
    /// the slots by key, per address space the entries by base, and the
    /// spans. O(number of chunks): only the chunk bucket tables are built.
    pub(crate) fn build(
        number: u64,
        slots: Chunked<Memslot>,
        spaces: Vec<Chunked<Entry>>,
        spans: Chunked<Span>,
    ) -> Self {
        let spaces = spaces.into_iter().map(GfnIndex::new).collect();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Self { id, number, slots, spaces, hva: HvaIndex { spans } }
    }

    /// A copy numbered `number` in which the slots `keys` are replaced by
    /// their invalid copies (KVM's `KVM_MEMSLOT_INVALID`). Clones only the
    /// chunks holding those slots.
    pub(crate) fn with_invalid(&self, number: u64, keys: &[SlotKey]) -> Self {
        let mut slots = self.slots.clone();
        let mut spaces: Vec<Chunked<Entry>> = self.spaces.iter().map(|s| s.entries.clone()).collect();
        for key in keys {
            let Some(base) = slots.update(key, |s| {
                s.invalid = true;
                s.base_gfn().as_u64()
            }) else {
                continue;
            };
            if let Some(space) = spaces.get_mut(usize::from(key.as_id)) {
                space.update(&base, |e| e.invalid = true);
            }
        }
        Self::build(number, slots, spaces, self.hva.spans.clone())
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
        self.slots.len() == 0
    }

    /// Every slot, ordered by (address space, id).
    pub fn slots(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter()
    }

    /// The slot with `key`.
    pub fn slot(&self, key: SlotKey) -> Option<&Memslot> {
        self.slots.get(&key)
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
    /// the VM-wide last-hit slot, then the bucket tables).
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
        let (_, e) = space.search(gfn).ok_or(Miss::NoSlot)?;
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
        assert_eq!(floor_index::<Entry>(&[], 7), None);
    }

    #[test]
    fn bucket_search_handles_clustered_slots_and_far_outliers() {
        // Arrange: 100 one-page slots at gfns 0..200 step 2, and one at 2^39.
        let mut spans: Vec<(u64, u64)> = (0..100).map(|i| (2 * i, 2 * i + 1)).collect();
        spans.push((1 << 39, (1 << 39) + 4));
        let e = entries(&spans);
        let buckets = Buckets::new(&e);

        // Act
        let hits: Vec<Option<usize>> = [0, 1, 198, 199, 200, 1 << 39, (1 << 39) + 3, (1 << 39) + 4, u64::MAX]
            .iter()
            .map(|&g| buckets.search(&e, g))
            .collect();

        // Assert
        assert_eq!(hits, vec![Some(0), None, Some(99), None, None, Some(100), Some(100), None, None]);
    }

    #[test]
    fn hva_index_reports_nested_and_disjoint_spans() {
        // Arrange: one long span covering two short ones, and a disjoint one.
        let span = |start, end, id| Span { start, end, key: SlotKey { as_id: 0, id } };
        let index = HvaIndex {
            spans: [span(0, 100, 0), span(10, 20, 1), span(30, 40, 2), span(200, 300, 3)]
                .into_iter()
                .collect(),
        };
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
    fn chunked_gfn_index_matches_a_scan_for_thousands_of_uneven_slots() {
        // Arrange: 3000 disjoint slots with gaps from 0 to ~2^20 pages
        // (several chunks), inserted in random order.
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
        let mut shuffled = entries(&spans);
        for i in (1..shuffled.len()).rev() {
            let j = usize::try_from(lcg(&mut state)).unwrap_or(0) % (i + 1);
            shuffled.swap(i, j);
        }
        let index = GfnIndex::new(shuffled.into_iter().collect());
        assert!(index.entries.chunks.len() > 4);

        // Act + Assert
        for _ in 0..20_000 {
            let gfn = lcg(&mut state) % (next + 10);
            let naive = spans.iter().find(|&&(b, e)| b <= gfn && gfn < e).map(|&(b, _)| b);
            assert_eq!(index.search(gfn).map(|(_, e)| e.base), naive, "gfn {gfn:#x}");
            assert_eq!(index.find(gfn).map(|e| e.base), naive, "gfn {gfn:#x}");
            let end = gfn + lcg(&mut state) % 100_000;
            let Some(range) = GfnRange::new(Gfn::new(gfn), Gfn::new(end)) else { continue };
            let got: Vec<u64> = index.overlapping(range).map(|e| e.base).collect();
            let want: Vec<u64> =
                spans.iter().filter(|&&(b, e)| b < end && gfn < e).map(|&(b, _)| b).collect();
            assert_eq!(got, want, "{gfn:#x}..{end:#x}");
        }
    }

    #[test]
    fn hva_index_matches_a_scan_for_thousands_of_aliasing_spans() {
        // Arrange: 3000 spans, often overlapping, some very long.
        let mut state = 11;
        let mut spans: Vec<Span> = (0..3000u16)
            .map(|id| {
                let start = lcg(&mut state) % 100_000;
                let len = if id % 97 == 0 { 50_000 } else { 1 + lcg(&mut state) % 300 };
                Span { start, end: start + len, key: SlotKey { as_id: 0, id } }
            })
            .collect();
        let index = HvaIndex { spans: spans.iter().copied().collect() };
        spans.sort_unstable();

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
