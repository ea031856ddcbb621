//! The mapper: map, unmap and change protection over address ranges, with
//! 4K/2M/1G pages, splitting a large page when part of it changes, freeing
//! tables that become empty, and reporting what changed so the caller can
//! invalidate TLBs and caches before reusing freed tables.
//!
//! Cost is proportional to the entries touched: a range operation visits each
//! table on its path once instead of walking from the root per page.

use alloc::vec::Vec;

use memvisor_types::{AddrRange, Address, PageSize, RangeError};

use crate::Error;
use crate::format::{FaultKind, Format, entry_span, index};
use crate::memory::{FrameAllocator, TableMemory};

/// What an operation changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes<I: Address, A> {
    /// The smallest range covering every translation that was present before
    /// and is now gone or different — what TLBs and translation caches must
    /// drop. `None` when only new translations appeared.
    pub flush: Option<AddrRange<I>>,
    /// Tables unlinked because they became empty. Paging-structure caches may
    /// still point at them: return them to the allocator (with
    /// [`Mapper::release`]) only after invalidating.
    pub freed_tables: Vec<A>,
    /// Leaf entries written or cleared.
    pub leaves: u64,
    /// Large pages split into smaller ones.
    pub splits: u64,
}

impl<I: Address, A> Changes<I, A> {
    fn new() -> Self {
        Self { flush: None, freed_tables: Vec::new(), leaves: 0, splits: 0 }
    }

    fn note_flush(&mut self, start: u64, end: u64) {
        let (s, e) = match self.flush {
            Some(r) => (r.start().raw().min(start), r.end().raw().max(end)),
            None => (start, end),
        };
        self.flush = AddrRange::new(I::from_raw(s), I::from_raw(e)).ok();
    }
}

/// What a recursive step does to the leaves it covers.
#[derive(Clone, Copy)]
enum Op<T> {
    Unmap,
    Protect(T),
}

/// Edits one page table of format `F` in memory `M`, taking frames from `A`.
///
/// The mapper assumes it is the only writer of the table (the type takes
/// `&mut self`); walkers may run concurrently, and see every change as a
/// single 8-byte store of a fully initialised entry.
#[derive(Debug)]
pub struct Mapper<F: Format, M: TableMemory, A: FrameAllocator<M::Addr>> {
    format: F,
    mem: M,
    alloc: A,
    root: M::Addr,
}

impl<F: Format, M: TableMemory, A: FrameAllocator<M::Addr>> Mapper<F, M, A> {
    /// A mapper over a new, empty table whose root comes from `alloc`.
    pub fn new(format: F, mem: M, mut alloc: A) -> Result<Self, Error> {
        let root = alloc.allocate_frame().ok_or(Error::OutOfFrames)?;
        let mapper = Self { format, mem, alloc, root };
        mapper.zero_table(root.raw())?;
        Ok(mapper)
    }

    /// A mapper adopting the existing table at `root`.
    pub fn from_root(format: F, mem: M, alloc: A, root: M::Addr) -> Self {
        Self { format, mem, alloc, root: M::Addr::from_raw(root.raw() & !0xfff) }
    }

    /// The table's root address.
    pub fn root(&self) -> M::Addr {
        self.root
    }

    /// The table's format.
    pub fn format(&self) -> &F {
        &self.format
    }

    /// The memory holding the table.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The frame allocator.
    pub fn allocator_mut(&mut self) -> &mut A {
        &mut self.alloc
    }

    /// Returns tables freed by earlier operations to the allocator (call after
    /// invalidating the caches that may point at them).
    pub fn release(&mut self, tables: impl IntoIterator<Item = M::Addr>) {
        for t in tables {
            self.alloc.free_frame(t);
        }
    }

    /// Maps `range` to `output..` with `attrs`, using the largest pages up to
    /// `max` that the alignment of both sides allows.
    ///
    /// Fails with [`Error::AlreadyMapped`] (changing nothing) if any address
    /// of the range is mapped. If frames run out part-way, what was mapped is
    /// undone before [`Error::OutOfFrames`] is returned.
    pub fn map<I: Address>(
        &mut self,
        range: AddrRange<I>,
        output: M::Addr,
        attrs: F::Attrs,
        max: PageSize,
    ) -> Result<Changes<I, M::Addr>, Error> {
        let mut changes = Changes::new();
        let Some((start, end)) = self.check_range(range)? else { return Ok(changes) };
        if !output.is_aligned(PageSize::Size4K) {
            return Err(RangeError::Unaligned { value: output.raw(), align: 0x1000 }.into());
        }
        let last = output.try_add(range.len() - 1)?.raw();
        // The output must fit the entries' address field and the physical
        // address width: a wider one would be truncated, or would make leaves
        // with reserved bits that no later unmap could remove.
        let last_leaf = self.format.make_leaf(last & !0xfff, 1, attrs);
        if self.format.address(last_leaf) != last & !0xfff || self.format.reserved_bits(last_leaf, 1) != 0 {
            return Err(Error::OutputWidth(last));
        }
        if !self.format.is_present(self.format.make_leaf(0, 1, attrs)) {
            return Err(Error::NotPresentAttrs);
        }
        let top = self.format.levels();
        if let Some(at) = self.find_mapped(self.root.raw(), top, start, end)? {
            return Err(Error::AlreadyMapped(at));
        }
        let result =
            self.map_table(self.root.raw(), top, start, end, output.raw(), attrs, max.level(), &mut changes);
        if let Err(e) = result {
            // Nothing was mapped in the range before, so unmapping all of it
            // removes exactly what this call added, tables included.
            let mut undo = Changes::<I, M::Addr>::new();
            self.edit_table(self.root.raw(), top, start, end, Op::Unmap, &mut undo)?;
            self.release(undo.freed_tables);
            return Err(e);
        }
        Ok(changes)
    }

    /// Unmaps every page of `range` (a 4K-aligned range); large pages that
    /// straddle its ends are split so that only the range goes.
    ///
    /// Fails with [`Error::OutOfFrames`] or [`Error::SplitUnsupported`],
    /// changing nothing, if a large page that must be split cannot be.
    pub fn unmap<I: Address>(&mut self, range: AddrRange<I>) -> Result<Changes<I, M::Addr>, Error> {
        let mut changes = Changes::new();
        if let Some((start, end)) = self.check_range(range)? {
            self.prepare_splits(start, end)?;
            self.edit_table(self.root.raw(), self.format.levels(), start, end, Op::Unmap, &mut changes)?;
        }
        Ok(changes)
    }

    /// Sets the attributes of every mapped page in `range` to `attrs` (keeping
    /// output addresses and accessed/dirty flags); unmapped parts are skipped.
    ///
    /// Like [`unmap`](Self::unmap), changes nothing when a split is impossible.
    pub fn protect<I: Address>(
        &mut self,
        range: AddrRange<I>,
        attrs: F::Attrs,
    ) -> Result<Changes<I, M::Addr>, Error> {
        let mut changes = Changes::new();
        if !self.format.is_present(self.format.make_leaf(0, 1, attrs)) {
            return Err(Error::NotPresentAttrs);
        }
        if let Some((start, end)) = self.check_range(range)? {
            self.prepare_splits(start, end)?;
            self.edit_table(
                self.root.raw(),
                self.format.levels(),
                start,
                end,
                Op::Protect(attrs),
                &mut changes,
            )?;
        }
        Ok(changes)
    }

    /// Unmaps everything and frees every table except the root.
    pub fn clear(&mut self) -> Result<(), Error> {
        let top = self.format.levels();
        // The root's 512 slots, addressed by the low half of the input space
        // (for x86 the upper canonical half indexes the same slots).
        let end = entry_span(top).saturating_mul(512);
        let mut changes = Changes::<memvisor_types::Hpa, M::Addr>::new();
        self.edit_table(self.root.raw(), top, 0, end, Op::Unmap, &mut changes)?;
        self.release(changes.freed_tables);
        Ok(())
    }

    fn check_range<I: Address>(&self, range: AddrRange<I>) -> Result<Option<(u64, u64)>, Error> {
        if !range.is_aligned(PageSize::Size4K) {
            let bad = if range.start().is_aligned(PageSize::Size4K) { range.end() } else { range.start() };
            return Err(RangeError::Unaligned { value: bad.raw(), align: 0x1000 }.into());
        }
        if range.is_empty() {
            return Ok(None);
        }
        let (start, end) = (range.start().raw(), range.end().raw());
        self.format.check_input_range(start, end - 1).map_err(|kind| match kind {
            FaultKind::NonCanonical => Error::NonCanonical(start),
            _ => Error::InputWidth(end - 1),
        })?;
        Ok(Some((start, end)))
    }

    fn read(&self, addr: u64) -> Result<u64, Error> {
        Ok(self.mem.read_entry(M::Addr::from_raw(addr))?)
    }

    fn write(&self, addr: u64, value: u64) -> Result<(), Error> {
        Ok(self.mem.write_entry(M::Addr::from_raw(addr), value)?)
    }

    fn zero_table(&self, table: u64) -> Result<(), Error> {
        for i in 0..512 {
            self.write(table + i * 8, 0)?;
        }
        Ok(())
    }

    fn new_table(&mut self) -> Result<u64, Error> {
        let t = self.alloc.allocate_frame().ok_or(Error::OutOfFrames)?;
        self.zero_table(t.raw())?;
        Ok(t.raw())
    }

    fn table_is_empty(&self, table: u64) -> Result<bool, Error> {
        for i in 0..512 {
            if self.format.is_present(self.read(table + i * 8)?) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads a present entry and classifies it, rejecting reserved bits.
    fn entry(&self, ea: u64, level: u8) -> Result<Option<(u64, bool)>, Error> {
        let e = self.read(ea)?;
        if !self.format.is_present(e) {
            return Ok(None);
        }
        if self.format.reserved_bits(e, level) != 0 {
            return Err(Error::Malformed { entry: e, level });
        }
        Ok(Some((e, level == 1 || self.format.is_leaf(e, level))))
    }

    /// The first mapped address in `start..end`, if any.
    fn find_mapped(&self, table: u64, level: u8, start: u64, end: u64) -> Result<Option<u64>, Error> {
        for slot in Slots::new(start, end, level) {
            match self.entry(table | index(slot.start, level) << 3, level)? {
                None => {}
                Some((_, true)) => return Ok(Some(slot.start)),
                Some((e, false)) => {
                    if let Some(at) =
                        self.find_mapped(self.format.address(e), level - 1, slot.start, slot.end)?
                    {
                        return Ok(Some(at));
                    }
                }
            }
        }
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    fn map_table<I: Address>(
        &mut self,
        table: u64,
        level: u8,
        start: u64,
        end: u64,
        output: u64,
        attrs: F::Attrs,
        max_level: u8,
        changes: &mut Changes<I, M::Addr>,
    ) -> Result<(), Error> {
        let span = entry_span(level);
        for slot in Slots::new(start, end, level) {
            let ea = table | index(slot.start, level) << 3;
            let out = output + (slot.start - start);
            let existing = self.entry(ea, level)?;
            let large_ok = slot.is_whole() && level <= max_level && self.format.supports_leaf(level);
            // A leaf only where the entry is empty: an existing (empty) table
            // is reused rather than dropped.
            if existing.is_none() && (level == 1 || (large_ok && out.is_multiple_of(span))) {
                self.write(ea, self.format.make_leaf(out, level, attrs))?;
                changes.leaves += 1;
                continue;
            }
            let next = match existing {
                None => {
                    let t = self.new_table()?;
                    self.write(ea, self.format.make_table(t))?;
                    t
                }
                Some((_, true)) => return Err(Error::AlreadyMapped(slot.start)),
                Some((e, false)) => self.format.address(e),
            };
            self.map_table(next, level - 1, slot.start, slot.end, out, attrs, max_level, changes)?;
        }
        Ok(())
    }

    /// Unmap or protect `start..end` below `table`.
    fn edit_table<I: Address>(
        &mut self,
        table: u64,
        level: u8,
        start: u64,
        end: u64,
        op: Op<F::Attrs>,
        changes: &mut Changes<I, M::Addr>,
    ) -> Result<(), Error> {
        for slot in Slots::new(start, end, level) {
            let ea = table | index(slot.start, level) << 3;
            let Some((e, leaf)) = self.entry(ea, level)? else { continue };
            let whole = slot.is_whole();
            let slot_end = slot.slot_end();
            if leaf && whole {
                let new = match op {
                    Op::Unmap => 0,
                    Op::Protect(attrs) => {
                        let addr = self.format.address(e) & !(entry_span(level) - 1);
                        self.format.make_leaf(addr, level, attrs) | (e & self.format.preserved_bits())
                    }
                };
                if new != e {
                    self.write(ea, new)?;
                    changes.leaves += 1;
                    changes.note_flush(slot.slot_start(), slot_end);
                }
                continue;
            }
            let child = if leaf {
                // Part of a large page changes: split it, and flush all of it.
                changes.note_flush(slot.slot_start(), slot_end);
                changes.splits += 1;
                self.split(ea, e, level)?
            } else {
                self.format.address(e)
            };
            self.edit_table(child, level - 1, slot.start, slot.end, op, changes)?;
            if matches!(op, Op::Unmap) && (whole || self.table_is_empty(child)?) {
                self.write(ea, 0)?;
                changes.freed_tables.push(M::Addr::from_raw(child));
            }
        }
        Ok(())
    }

    /// Checks, before an unmap or protect of `start..end` changes anything,
    /// that it cannot fail half-way (which would lose the flush range and the
    /// freed tables of what it had already done): each large page straddling
    /// an edge of the range, and each smaller page that would straddle it
    /// after the split, must be splittable, with a frame for every split.
    fn prepare_splits(&mut self, start: u64, end: u64) -> Result<(), Error> {
        let mut splits: Vec<(u8, u64)> = Vec::new();
        for edge in [start, end] {
            // Leaves are at most 1G: an edge aligned to 1G cuts no page.
            if edge & (entry_span(3) - 1) == 0 {
                continue;
            }
            let (mut table, mut level) = (self.root.raw(), self.format.levels());
            while let Some((e, leaf)) = self.entry(table | index(edge, level) << 3, level)? {
                if !leaf {
                    table = self.format.address(e);
                    level -= 1;
                    continue;
                }
                while level > 1 && edge & (entry_span(level) - 1) != 0 {
                    if !self.format.supports_leaf(level - 1) {
                        return Err(Error::SplitUnsupported { level });
                    }
                    let page = (level, edge & !(entry_span(level) - 1));
                    if !splits.contains(&page) {
                        splits.push(page);
                    }
                    level -= 1;
                }
                break;
            }
        }
        // The allocator is this mapper's alone: frames taken and given back
        // stay available for the splits.
        let mut frames = Vec::with_capacity(splits.len());
        while frames.len() < splits.len() {
            let Some(frame) = self.alloc.allocate_frame() else { break };
            frames.push(frame);
        }
        let enough = frames.len() == splits.len();
        for frame in frames.into_iter().rev() {
            self.alloc.free_frame(frame);
        }
        if enough { Ok(()) } else { Err(Error::OutOfFrames) }
    }

    /// Replaces the large leaf `e` at `ea` with a table of 512 smaller leaves
    /// mapping the same memory with the same attributes.
    fn split(&mut self, ea: u64, e: u64, level: u8) -> Result<u64, Error> {
        let lower = level - 1;
        if !self.format.supports_leaf(lower) {
            return Err(Error::SplitUnsupported { level });
        }
        let attrs = self.format.leaf_attrs(e, level);
        let base = self.format.address(e) & !(entry_span(level) - 1);
        let keep = e & self.format.preserved_bits();
        let table = self.new_table()?;
        let step = entry_span(lower);
        for i in 0..512 {
            self.write(table + i * 8, self.format.make_leaf(base + i * step, lower, attrs) | keep)?;
        }
        // The table is complete before it becomes visible.
        self.write(ea, self.format.make_table(table))?;
        Ok(table)
    }
}

/// One entry's share of a range: `start..end` within the entry's slot.
#[derive(Debug, Clone, Copy)]
struct Slot {
    start: u64,
    end: u64,
    span: u64,
}

impl Slot {
    fn slot_start(&self) -> u64 {
        self.start & !(self.span - 1)
    }

    /// End of the entry's whole slot (saturating at the top of the 64-bit space).
    fn slot_end(&self) -> u64 {
        self.slot_start().saturating_add(self.span)
    }

    fn is_whole(&self) -> bool {
        self.start == self.slot_start() && self.end == self.slot_end()
    }
}

/// The slots of `start..end` at `level`, in address order.
struct Slots {
    next: u64,
    end: u64,
    span: u64,
}

impl Slots {
    fn new(start: u64, end: u64, level: u8) -> Self {
        Self { next: start, end, span: entry_span(level) }
    }
}

impl Iterator for Slots {
    type Item = Slot;

    #[inline]
    fn next(&mut self) -> Option<Slot> {
        if self.next >= self.end {
            return None;
        }
        let start = self.next;
        let slot_end = (start & !(self.span - 1)).saturating_add(self.span);
        let end = slot_end.min(self.end);
        self.next = end;
        Some(Slot { start, end, span: self.span })
    }
}
