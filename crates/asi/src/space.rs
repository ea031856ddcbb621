//! The page tables of every address space, in one frame arena: the full
//! space and one restricted space per instance, all edited with
//! `memvisor-paging`'s [`Mapper`] and read with its walker.

use alloc::vec::Vec;

use memvisor_paging::format::{entry_span, x86};
use memvisor_paging::{
    Arena, ArenaFrames, Fault, FrameAllocator, Mapper, Prepared, TableMemory, Translation, Walker, X86Attrs,
    X86Paging,
};
use memvisor_types::{AddrRange, Address, Hpa, Hva, PageSize};

use crate::{Error, Result};

/// Where the full and restricted spaces map data frame `pa`: `DIRECT_MAP_BASE + pa`
/// (a direct map in the upper canonical half, 64 TiB long).
pub const DIRECT_MAP_BASE: u64 = 0xffff_c000_0000_0000;

/// Physical addresses the direct map can hold (64 TiB).
pub(crate) const DIRECT_MAP_SPAN: u64 = 1 << 46;

/// The direct-map address of `pa`.
pub(crate) fn direct_map_va(pa: Hpa) -> Result<Hva> {
    if pa.raw() >= DIRECT_MAP_SPAN {
        return Err(Error::Config("physical address beyond the 64 TiB direct map"));
    }
    Ok(Hva::new(DIRECT_MAP_BASE + pa.raw()))
}

/// Accessed and dirty: hardware-managed state, ignored when comparing leaves.
pub(crate) const AD_BITS: u64 = x86::A | x86::D;

/// One leaf of an address space, as [`Asi::check`](crate::Asi::check) sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// First address the leaf maps.
    pub va: Hva,
    /// Page size.
    pub size: PageSize,
    /// The raw entry.
    pub entry: u64,
}

/// A table entry the leaf enumeration could not follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadEntry {
    pub va: Hva,
    pub level: u8,
    pub entry: u64,
}

/// The table arena and its frame allocator, shared by every space.
#[derive(Debug)]
pub(crate) struct Tables {
    pub(crate) format: X86Paging,
    pub(crate) walker: Prepared<X86Paging>,
    pub(crate) arena: Arena<Hpa>,
    frames: ArenaFrames<Hpa>,
}

impl Tables {
    pub(crate) fn new(format: X86Paging, base: Hpa, frames: usize) -> Self {
        let arena = Arena::new(base, frames);
        let alloc = arena.frame_allocator();
        Self { format, walker: format.prepare(), arena, frames: alloc }
    }

    fn mapper(&mut self, root: Hpa) -> Mapper<X86Paging, &Arena<Hpa>, &mut ArenaFrames<Hpa>> {
        Mapper::from_root(self.format, &self.arena, &mut self.frames, root)
    }

    /// A new, empty top-level table.
    pub(crate) fn new_root(&mut self) -> Result<Hpa> {
        Ok(Mapper::new(self.format, &self.arena, &mut self.frames)?.root())
    }

    /// Unmaps everything below `root` and frees all its tables, root included.
    /// The caller has invalidated every cache that may hold them.
    pub(crate) fn destroy_root(&mut self, root: Hpa) -> Result<()> {
        self.mapper(root).clear()?;
        self.frames.free_frame(root);
        Ok(())
    }

    pub(crate) fn map(
        &mut self,
        root: Hpa,
        range: AddrRange<Hva>,
        pa: Hpa,
        attrs: X86Attrs,
        max: PageSize,
    ) -> Result<()> {
        self.mapper(root).map(range, pa, attrs, max)?;
        Ok(())
    }

    /// Unmaps `range`; returns the range to flush and the tables to release
    /// once no cache can reach them.
    pub(crate) fn unmap(
        &mut self,
        root: Hpa,
        range: AddrRange<Hva>,
    ) -> Result<(Option<AddrRange<Hva>>, Vec<Hpa>)> {
        let changes = self.mapper(root).unmap(range)?;
        Ok((changes.flush, changes.freed_tables))
    }

    pub(crate) fn release(&mut self, tables: Vec<Hpa>) {
        for t in tables {
            self.frames.free_frame(t);
        }
    }

    /// Table frames handed out and not freed.
    pub(crate) fn frames_in_use(&self) -> u64 {
        self.frames.in_use()
    }

    /// The mapping of `va` below `root`, without access checks or A/D updates.
    pub(crate) fn lookup(&self, root: Hpa, va: Hva) -> core::result::Result<Translation<Hpa>, Fault> {
        self.walker.lookup(&self.arena, root, va)
    }

    /// Every leaf below `root`, in address order, and the entries that could
    /// not be followed (reserved bits set, or a table outside the arena).
    pub(crate) fn leaves(&self, root: Hpa) -> (Vec<Leaf>, Vec<BadEntry>) {
        let mut leaves = Vec::new();
        let mut bad = Vec::new();
        let top = memvisor_paging::Format::levels(&self.format);
        self.collect(root.raw(), top, 0, &mut leaves, &mut bad);
        (leaves, bad)
    }

    fn collect(&self, table: u64, level: u8, prefix: u64, leaves: &mut Vec<Leaf>, bad: &mut Vec<BadEntry>) {
        use memvisor_paging::Format;
        let f = &self.format;
        for i in 0..512u64 {
            let raw_va = prefix | (i << (12 + 9 * (u32::from(level) - 1)));
            let va = Hva::new(self.canonical(raw_va));
            let e = match self.arena.read_entry(Hpa::new(table + i * 8)) {
                Ok(e) => e,
                Err(_) => {
                    bad.push(BadEntry { va, level, entry: 0 });
                    return;
                }
            };
            if !f.is_present(e) {
                continue;
            }
            if f.reserved_bits(e, level) != 0 {
                bad.push(BadEntry { va, level, entry: e });
                continue;
            }
            if f.is_leaf(e, level) {
                let Some(size) = PageSize::from_level(level) else {
                    bad.push(BadEntry { va, level, entry: e });
                    continue;
                };
                leaves.push(Leaf { va, size, entry: e });
            } else {
                self.collect(f.address(e), level - 1, raw_va, leaves, bad);
            }
        }
    }

    /// Sign-extends an address built from table indices.
    fn canonical(&self, raw: u64) -> u64 {
        let width = self.format.input_width();
        if raw >> (width - 1) & 1 == 1 { raw | !((1u64 << width) - 1) } else { raw }
    }
}

/// The span of a leaf at `size` (bytes).
pub(crate) fn leaf_span(size: PageSize) -> u64 {
    entry_span(size.level())
}

/// The attributes data mappings get: supervisor, writable, not executable,
/// not global (a global entry would survive a PCID switch into every space).
pub(crate) const DATA_ATTRS: X86Attrs = X86Attrs {
    write: true,
    user: false,
    execute: false,
    global: false,
    write_through: false,
    cache_disable: false,
    pat: false,
    pkey: 0,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_of_an_upper_half_mapping_have_canonical_addresses() {
        // Arrange
        let mut t = Tables::new(X86Paging::four_level(), Hpa::new(0x10_0000), 16);
        let root = t.new_root().unwrap();
        let va = Hva::new(DIRECT_MAP_BASE + 0x1234_5000);
        let range = AddrRange::from_len(va, 0x2000).unwrap();
        t.map(root, range, Hpa::new(0x1234_5000), DATA_ATTRS, PageSize::Size4K).unwrap();

        // Act
        let (leaves, bad) = t.leaves(root);

        // Assert
        assert!(bad.is_empty());
        let vas: Vec<Hva> = leaves.iter().map(|l| l.va).collect();
        assert_eq!(vas, [va, Hva::new(va.raw() + 0x1000)]);
        assert_eq!(t.format.address(leaves[1].entry), 0x1234_6000);
    }

    #[test]
    fn direct_map_beyond_64_tib_is_rejected() {
        assert!(direct_map_va(Hpa::new(DIRECT_MAP_SPAN)).is_err());
        assert_eq!(direct_map_va(Hpa::new(0x1000)).unwrap(), Hva::new(DIRECT_MAP_BASE + 0x1000));
    }

    use memvisor_paging::Format;
}
