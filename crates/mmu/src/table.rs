//! One address space's stage-2 table: memvisor-paging's VT-d second-stage
//! format, edited with its [`Mapper`] in an [`Arena`] of table frames, plus
//! the leaf-level edits the MMU needs (young/dirty/write-protect) that the
//! mapper does not offer.
//!
//! Entry layout (VT-d second-stage leaf): R/W/X, EMT, PS, A (bit 8) and D
//! (bit 9) as the format defines them; the output field holds the host
//! address of the backing page (an HVA for a userspace VMM). Two software
//! bits live in the leaf's ignored bits 52–61: [`HOST_WRITABLE`] (the page
//! may be made writable without asking the host: set on write-protected
//! entries of dirty-logged slots) and [`PRIVATE`] (the entry maps the
//! slot's guest_memfd).
//!
//! Large pages are never split here: a zap whose edge cuts a large leaf
//! widens to the whole leaf (as KVM zaps whole huge SPTEs), so the software
//! bits, which a split would not copy, are never lost.

use memvisor_paging::format::second_stage::{A, D, W};
use memvisor_paging::format::{entry_span, index};
use memvisor_paging::{Arena, ArenaFrames, Format, Mapper, SecondStage, SecondStageAttrs, TableMemory};
use memvisor_types::{AddrRange, Address, Gpa, Hpa, PageSize};

use crate::Error;

/// Software bit: the host page is writable (restore W on the first write).
pub(crate) const HOST_WRITABLE: u64 = 1 << 52;
/// Software bit: the entry maps private (guest_memfd) memory.
pub(crate) const PRIVATE: u64 = 1 << 53;

/// Where the table frames of an address space live (an arbitrary,
/// page-aligned base: table addresses are private to the arena).
const ARENA_BASE: u64 = 0x1000;

/// A leaf entry found by [`Table::leaf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leaf {
    /// Address of the entry in the arena.
    pub ea: Hpa,
    /// 1 (4K), 2 (2M) or 3 (1G).
    pub level: u8,
    /// The entry.
    pub entry: u64,
    /// First guest-physical address the leaf maps.
    pub base: u64,
}

impl Leaf {
    pub fn size(&self) -> PageSize {
        PageSize::from_level(self.level).unwrap_or(PageSize::Size4K)
    }
}

/// The stage-2 table of one address space.
#[derive(Debug)]
pub(crate) struct Table {
    mapper: Mapper<SecondStage, Arena<Hpa>, ArenaFrames<Hpa>>,
    format: SecondStage,
}

impl Table {
    pub fn new(frames: usize) -> Result<Self, Error> {
        let format = SecondStage::four_level();
        let arena = Arena::new(Hpa::new(ARENA_BASE), frames);
        let alloc = arena.frame_allocator();
        let mapper = Mapper::new(format, arena, alloc)?;
        Ok(Self { mapper, format })
    }

    /// The input width (GPAs at or above `1 << width` cannot be mapped).
    pub fn input_limit(&self) -> u64 {
        1u64 << self.format.input_width()
    }

    fn read(&self, ea: u64) -> Result<u64, Error> {
        Ok(self.mapper.memory().read_entry(Hpa::new(ea))?)
    }

    pub fn write(&self, ea: Hpa, value: u64) -> Result<(), Error> {
        Ok(self.mapper.memory().write_entry(ea, value)?)
    }

    /// The leaf mapping `gpa`, if any.
    pub fn leaf(&self, gpa: u64) -> Result<Option<Leaf>, Error> {
        if gpa >= self.input_limit() {
            return Ok(None);
        }
        let mut table = self.mapper.root().raw();
        for level in (1..=self.format.levels()).rev() {
            let ea = table | index(gpa, level) << 3;
            let e = self.read(ea)?;
            if !self.format.is_present(e) {
                return Ok(None);
            }
            if self.format.is_leaf(e, level) {
                let base = gpa & !(entry_span(level) - 1);
                return Ok(Some(Leaf { ea: Hpa::new(ea), level, entry: e, base }));
            }
            table = self.format.address(e);
        }
        Ok(None)
    }

    /// Maps `gpa..gpa + size` (aligned) to `output` with `write` permission and
    /// the software bits `sw`; `dirty` sets A and D, else only A.
    pub fn map(
        &mut self,
        gpa: u64,
        size: PageSize,
        output: u64,
        write: bool,
        sw: u64,
    ) -> Result<Leaf, Error> {
        let range = AddrRange::new_aligned(Gpa::new(gpa), size.bytes(), size)?;
        let attrs = SecondStageAttrs { write, ..SecondStageAttrs::read_only() };
        self.mapper.map(range, Hpa::new(output), attrs, size)?;
        let leaf = self.leaf(gpa)?.ok_or(Error::Table(memvisor_paging::Error::AlreadyMapped(gpa)))?;
        let entry = leaf.entry | sw | A | if write { D } else { 0 };
        self.write(leaf.ea, entry)?;
        Ok(Leaf { entry, ..leaf })
    }

    /// Unmaps every leaf overlapping `start..end` (4K-aligned), whole large
    /// leaves included. Returns the range actually unmapped if anything was
    /// (what to flush).
    pub fn zap(&mut self, start: u64, end: u64) -> Result<Option<(u64, u64)>, Error> {
        let limit = self.input_limit();
        let (mut s, mut e) = (start.min(limit), end.min(limit));
        if s >= e {
            return Ok(None);
        }
        if let Some(l) = self.leaf(s)? {
            s = l.base;
        }
        if let Some(l) = self.leaf(e - 1)? {
            e = l.base + l.size().bytes();
        }
        let changes = self.mapper.unmap(AddrRange::new(Gpa::new(s), Gpa::new(e))?)?;
        // The caller flushes under the same lock before anyone can reuse a
        // freed table: no walker holds a cached pointer past that flush.
        self.mapper.release(changes.freed_tables);
        Ok(changes.flush.map(|r| (r.start().raw(), r.end().raw())))
    }

    /// Unmaps everything.
    pub fn clear(&mut self) -> Result<(), Error> {
        Ok(self.mapper.clear()?)
    }

    /// Calls `f` for every leaf overlapping `start..end`; a returned value
    /// replaces the entry.
    pub fn for_each_leaf(
        &mut self,
        start: u64,
        end: u64,
        f: &mut impl FnMut(&Leaf) -> Option<u64>,
    ) -> Result<(), Error> {
        let end = end.min(self.input_limit());
        if start >= end {
            return Ok(());
        }
        self.visit(self.mapper.root().raw(), self.format.levels(), start, end, f)
    }

    fn visit(
        &self,
        table: u64,
        level: u8,
        start: u64,
        end: u64,
        f: &mut impl FnMut(&Leaf) -> Option<u64>,
    ) -> Result<(), Error> {
        let span = entry_span(level);
        let mut at = start;
        while at < end {
            let base = at & !(span - 1);
            let next = base.saturating_add(span).min(end);
            let ea = table | index(at, level) << 3;
            let e = self.read(ea)?;
            if self.format.is_present(e) {
                if self.format.is_leaf(e, level) {
                    let leaf = Leaf { ea: Hpa::new(ea), level, entry: e, base };
                    if let Some(new) = f(&leaf) {
                        self.write(leaf.ea, new)?;
                    }
                } else {
                    self.visit(self.format.address(e), level - 1, at, next, f)?;
                }
            }
            at = next;
        }
        Ok(())
    }

    /// The host address in a leaf.
    pub fn output(&self, leaf: &Leaf) -> u64 {
        self.format.address(leaf.entry) & !leaf.size().offset_mask()
    }
}

/// Whether a leaf grants write access.
pub(crate) fn writable(entry: u64) -> bool {
    entry & W != 0
}

pub(crate) use memvisor_paging::format::second_stage::{A as YOUNG, D as DIRTY, W as WRITE};
