//! The peer of the paging suite: the `x86_64` crate (0.15.5) walking and
//! editing tables in memory laid out exactly like memvisor's.
//!
//! The crate's mappers reach the table at physical address `P` by
//! dereferencing the virtual address `phys_offset + P`, as a kernel that maps
//! all physical memory does. Here "physical memory" is a [`PeerMemory`]: one
//! allocation of 4 KiB-aligned `PageTable` frames standing for the physical
//! range `phys_base..phys_base + 4096·frames`, so `phys_offset` is the
//! buffer's address minus `phys_base`. memvisor's tables are copied in
//! entry by entry ([`PeerMemory::load`]), so both sides walk identical
//! tables at identical physical addresses.
//!
//! Soundness rests on one check: before the crate gets a table, every table
//! address reachable from its root is verified to be a frame of the buffer
//! ([`PeerMemory::tree`]), and the nested peer's frame mapping checks each
//! frame it hands out.

#![expect(
    unsafe_code,
    reason = "the x86_64 crate's page-table mappers take raw frame pointers; this module gives them a buffer \
              of real PageTable frames and checks every table address they can reach"
)]

use std::alloc::{self, Layout};
use std::marker::PhantomData;
use std::ops::Range;
use std::ptr::NonNull;

use anyhow::{Context, Result, anyhow, bail, ensure};
use memvisor_paging::{Arena, TableMemory};
use memvisor_types::{Address, Hpa};
use x86_64::structures::paging::mapper::{MappedPageTable, PageTableFrameMapping, TranslateResult};
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

const FRAME: u64 = 4096;
const ENTRIES: u64 = 512;
/// Bits 51:12 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bit 7: PS in a level-2/3 entry.
const PS: u64 = 1 << 7;

/// The raw 64-bit value of an entry.
fn raw(entry: &PageTableEntry) -> u64 {
    entry.addr().as_u64() | entry.flags().bits()
}

/// Where the buffer is and which physical range it stands for (plain data,
/// copied into the mappers that borrow the [`PeerMemory`]).
#[derive(Debug, Clone, Copy)]
struct Buffer {
    base: NonNull<PageTable>,
    frames: usize,
    phys_base: u64,
}

impl Buffer {
    /// Index of the frame at physical address `phys` (a frame start in the buffer).
    fn index(&self, phys: u64) -> Option<usize> {
        if !phys.is_multiple_of(FRAME) {
            return None;
        }
        let i = usize::try_from(phys.checked_sub(self.phys_base)? / FRAME).ok()?;
        (i < self.frames).then_some(i)
    }

    /// Pointer to the frame at physical address `phys`, if it is one of the buffer.
    fn frame(&self, phys: u64) -> Option<NonNull<PageTable>> {
        let i = self.index(phys)?;
        // SAFETY: `i < frames`, so the offset stays inside the allocation of
        // `frames` PageTables that `base` points to.
        Some(unsafe { self.base.add(i) })
    }
}

/// "Physical memory" for the `x86_64` crate: zeroed `PageTable` frames in one
/// allocation, standing for `phys_base..`.
#[derive(Debug)]
pub(crate) struct PeerMemory {
    buf: Buffer,
    layout: Layout,
    /// `buffer address - phys_base`, canonical.
    phys_offset: VirtAddr,
}

impl Drop for PeerMemory {
    fn drop(&mut self) {
        // SAFETY: `base` was returned by `alloc_zeroed(self.layout)` in `new`
        // and is freed only here.
        unsafe { alloc::dealloc(self.buf.base.as_ptr().cast(), self.layout) };
    }
}

impl PeerMemory {
    /// `frames` zeroed frames standing for the physical range from `phys_base`.
    pub(crate) fn new(phys_base: u64, frames: usize) -> Result<Self> {
        ensure!(frames > 0, "peer memory needs at least one frame");
        ensure!(phys_base.is_multiple_of(FRAME), "peer memory base {phys_base:#x} is not 4 KiB-aligned");
        let layout = Layout::array::<PageTable>(frames)?;
        // SAFETY: the layout is not zero-sized (at least one 4 KiB PageTable).
        let ptr = unsafe { alloc::alloc_zeroed(layout) }.cast::<PageTable>();
        let Some(base) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        // Owned from here on: an early return below frees the buffer.
        let mut memory =
            Self { buf: Buffer { base, frames, phys_base }, layout, phys_offset: VirtAddr::zero() };
        // The crate turns `phys_offset + P` back into a pointer with an
        // integer-to-pointer cast: expose the allocation's provenance for it.
        let addr = u64::try_from(base.as_ptr().expose_provenance())?;
        let end = addr.checked_add(u64::try_from(layout.size())?).context("buffer end overflows")?;
        let offset = addr
            .checked_sub(phys_base)
            .with_context(|| format!("buffer at {addr:#x} lies below physical base {phys_base:#x}"))?;
        ensure!(VirtAddr::try_new(end).is_ok(), "buffer end {end:#x} is not canonical");
        memory.phys_offset = VirtAddr::try_new(offset).map_err(|e| anyhow!("physical offset: {e:?}"))?;
        Ok(memory)
    }

    fn tables(&self) -> &[PageTable] {
        // SAFETY: `base` points to `frames` PageTables, initialised (zeroed
        // plain integers) at allocation and owned by `self`; `&self` excludes
        // writers for the borrow.
        unsafe { std::slice::from_raw_parts(self.buf.base.as_ptr(), self.buf.frames) }
    }

    fn tables_mut(&mut self) -> &mut [PageTable] {
        // SAFETY: as in `tables`; `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.buf.base.as_ptr(), self.buf.frames) }
    }

    /// The physical range the buffer stands for.
    pub(crate) fn phys_range(&self) -> Range<u64> {
        let len = u64::try_from(self.buf.frames).unwrap_or(u64::MAX / FRAME) * FRAME;
        self.buf.phys_base..self.buf.phys_base.saturating_add(len)
    }

    /// The 8-byte entry at physical address `phys`.
    pub(crate) fn entry(&self, phys: u64) -> Option<u64> {
        let table = self.tables().get(self.buf.index(phys & !(FRAME - 1))?)?;
        let i = usize::try_from((phys % FRAME) / 8).ok()?;
        phys.is_multiple_of(8).then(|| raw(&table[i]))
    }

    /// Zeroes every frame.
    pub(crate) fn zero(&mut self) {
        self.tables_mut().iter_mut().for_each(PageTable::zero);
    }

    /// Copies the first `frames` frames of `arena` (which must start at this
    /// memory's physical base) entry by entry, and checks the copy.
    pub(crate) fn load(&mut self, arena: &Arena<Hpa>, frames: usize) -> Result<()> {
        ensure!(
            arena.base().raw() == self.buf.phys_base,
            "arena and peer memory start at different addresses"
        );
        ensure!(frames <= self.buf.frames && frames <= arena.frames(), "{frames} frames do not fit");
        self.zero();
        let base = self.buf.phys_base;
        for (f, table) in (0u64..).zip(self.tables_mut().iter_mut().take(frames)) {
            for (i, entry) in (0u64..).zip(table.iter_mut()) {
                let value = arena.read_entry(Hpa::new(base + f * FRAME + i * 8))?;
                entry.set_addr(
                    PhysAddr::new(value & ADDR_MASK),
                    PageTableFlags::from_bits_retain(value & !ADDR_MASK),
                );
                ensure!(raw(entry) == value, "entry {value:#x} did not survive the copy");
            }
        }
        Ok(())
    }

    /// The physical addresses of every table of the 4-level tree at `root`
    /// (root included), checking that each is a frame of the buffer and lies
    /// inside `allowed`. Entries are present when bit 0 is set (true of both
    /// x86 entries and the R|W|X second-stage entries memvisor builds);
    /// large pages end a branch.
    pub(crate) fn tree(&self, root: u64, allowed: &Range<u64>) -> Result<Vec<u64>> {
        let mut tables = Vec::new();
        let mut pending = vec![(root, 4u8)];
        while let Some((table, level)) = pending.pop() {
            ensure!(
                self.buf.index(table).is_some() && allowed.contains(&table),
                "level-{level} table at {table:#x} is outside the peer's memory"
            );
            tables.push(table);
            if level == 1 {
                continue;
            }
            for i in 0..ENTRIES {
                let e = self.entry(table + i * 8).context("table entry")?;
                if e & 1 != 0 && (level == 4 || e & PS == 0) {
                    pending.push((e & ADDR_MASK, level - 1));
                }
            }
        }
        Ok(tables)
    }

    /// The `x86_64` crate's `OffsetPageTable` over the 4-level table at `root`.
    pub(crate) fn offset_page_table(&mut self, root: u64) -> Result<OffsetPageTable<'_>> {
        self.tree(root, &self.phys_range())?;
        let root = self.buf.frame(root).context("root outside the peer's memory")?;
        // SAFETY: `root` is a frame of the buffer, borrowed mutably from
        // `self` for the table's lifetime, and the crate reaches every other
        // table of the tree at `phys_offset + P`, which `tree` checked to be
        // a frame of this buffer (the tree cannot change while `self` is
        // borrowed, except through the returned mapper itself).
        Ok(unsafe { OffsetPageTable::new(&mut *root.as_ptr(), self.phys_offset) })
    }

    /// An empty table at the first frame (the whole memory zeroed first), and
    /// the crate's mapper over it taking new tables from the other frames.
    pub(crate) fn fresh_mapper(&mut self) -> Result<PeerMapper<'_>> {
        self.zero();
        let start = self.buf.phys_base + FRAME;
        let end = self.phys_range().end;
        let table = self.offset_page_table(self.buf.phys_base)?;
        Ok(PeerMapper { table, frames: PoolFrames { next: start, end, _memory: PhantomData } })
    }

    /// The crate's mapper over the existing table at `root`, without frames
    /// for new tables (for checking and unmapping what a mapper built).
    pub(crate) fn reopen(&mut self, root: u64) -> Result<PeerMapper<'_>> {
        let table = self.offset_page_table(root)?;
        Ok(PeerMapper { table, frames: PoolFrames { next: 0, end: 0, _memory: PhantomData } })
    }

    /// The nested peer: stage 1 at guest-physical `stage1_root`, with guest
    /// RAM at host `guest_ram`, over the second-stage table at host
    /// `stage2_root`. Checks that the stage-2 tables lie outside guest RAM
    /// and that the stage-1 tree, seen through stage 2, lies inside it
    /// without any entry pointing back at its root.
    pub(crate) fn nested(
        &mut self,
        stage2_root: u64,
        stage1_root: u64,
        guest_ram: Range<u64>,
    ) -> Result<PeerNested<'_>> {
        let all = self.phys_range();
        ensure!(
            all.start <= guest_ram.start && guest_ram.end <= all.end,
            "guest RAM outside the peer's memory"
        );
        let stage2_tables = self.tree(stage2_root, &all)?;
        ensure!(stage2_tables.iter().all(|t| !guest_ram.contains(t)), "a stage-2 table lies in guest RAM");
        self.check_stage1(stage2_root, stage1_root, &guest_ram)?;
        let buf = self.buf;
        let stage2 = self.offset_page_table(stage2_root)?;
        Ok(PeerNested { stage2, buf, guest_ram, stage1_root })
    }

    /// A plain software walk (4 levels, 4 KiB leaves only) used to validate trees.
    fn walk(&self, root: u64, input: u64) -> Option<u64> {
        let mut table = root;
        for level in (1..=4u32).rev() {
            let index = (input >> (12 + 9 * (level - 1))) & 0x1ff;
            let e = self.entry(table + index * 8)?;
            if e & 1 == 0 || (level > 1 && e & PS != 0) {
                return None;
            }
            table = e & ADDR_MASK;
        }
        Some(table | (input & (FRAME - 1)))
    }

    fn check_stage1(&self, stage2_root: u64, stage1_root: u64, guest_ram: &Range<u64>) -> Result<()> {
        let host = |gpa: u64| {
            self.walk(stage2_root, gpa)
                .filter(|h| guest_ram.contains(h) && self.buf.index(*h).is_some())
                .with_context(|| format!("stage-1 table at GPA {gpa:#x} is not in guest RAM through stage 2"))
        };
        let mut pending = vec![(stage1_root, 4u8)];
        while let Some((gpa, level)) = pending.pop() {
            let table = host(gpa)?;
            if level == 1 {
                continue;
            }
            for i in 0..ENTRIES {
                let e = self.entry(table + i * 8).context("stage-1 entry")?;
                if e & 1 == 0 {
                    continue;
                }
                if e & PS != 0 {
                    bail!("the nested peer handles 4 KiB stage-1 pages only");
                }
                ensure!(e & ADDR_MASK != stage1_root, "a stage-1 entry points back at the root");
                pending.push((e & ADDR_MASK, level - 1));
            }
        }
        Ok(())
    }
}

/// The output address of a crate translation (`None` when not mapped).
#[inline]
pub(crate) fn output(result: TranslateResult) -> Option<u64> {
    match result {
        TranslateResult::Mapped { frame, offset, .. } => Some(frame.start_address().as_u64() + offset),
        TranslateResult::NotMapped | TranslateResult::InvalidFrameAddress(_) => None,
    }
}

/// Frames `next..end` of a [`PeerMemory`], for the crate's mapper.
#[derive(Debug)]
pub(crate) struct PoolFrames<'a> {
    next: u64,
    end: u64,
    _memory: PhantomData<&'a mut PeerMemory>,
}

// SAFETY: an allocator with frames is created only by
// `PeerMemory::fresh_mapper`, after zeroing the memory and while it is
// mutably borrowed (the one from `reopen` has none), and hands out each of
// its frames once: no two tables share a frame, and nothing else uses them.
unsafe impl FrameAllocator<Size4KiB> for PoolFrames<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        if self.next >= self.end {
            return None;
        }
        let frame = PhysFrame::from_start_address(PhysAddr::new(self.next)).ok()?;
        self.next += FRAME;
        Some(frame)
    }
}

/// The crate's `OffsetPageTable` mapper on an empty table in a [`PeerMemory`].
#[derive(Debug)]
pub(crate) struct PeerMapper<'a> {
    table: OffsetPageTable<'a>,
    frames: PoolFrames<'a>,
}

impl PeerMapper<'_> {
    /// Maps `pages` 4 KiB pages from `va` to `pa..`, one `map_to` per page,
    /// ignoring the TLB flushes (the table is never loaded on a CPU).
    pub(crate) fn map_4k(&mut self, va: u64, pa: u64, pages: u64) -> Result<()> {
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::USER_ACCESSIBLE;
        let (pages, frames) = ranges(va, pa, pages)?;
        for (page, frame) in pages.zip(frames) {
            // SAFETY: the table is not the active one on any CPU and the
            // mapped frames are numbers nothing dereferences; the only memory
            // written is the table's own frames, all inside the PeerMemory.
            unsafe { self.table.map_to(page, frame, flags, &mut self.frames) }
                .map_err(|e| anyhow!("x86_64 map_to {page:?}: {e:?}"))?
                .ignore();
        }
        Ok(())
    }

    /// Unmaps `pages` 4 KiB pages from `va`, one `unmap` per page.
    pub(crate) fn unmap_4k(&mut self, va: u64, pages: u64) -> Result<()> {
        let (pages, _) = ranges(va, 0, pages)?;
        for page in pages {
            let (_, flush) = Mapper::<Size4KiB>::unmap(&mut self.table, page)
                .map_err(|e| anyhow!("x86_64 unmap {page:?}: {e:?}"))?;
            flush.ignore();
        }
        Ok(())
    }

    /// The crate's translation of `va`.
    pub(crate) fn translate(&self, va: u64) -> Option<u64> {
        output(self.table.translate(VirtAddr::try_new(va).ok()?))
    }
}

type PageRange = x86_64::structures::paging::page::PageRange<Size4KiB>;
type FrameRange = x86_64::structures::paging::frame::PhysFrameRange<Size4KiB>;

fn ranges(va: u64, pa: u64, pages: u64) -> Result<(PageRange, FrameRange)> {
    let len = pages.checked_mul(FRAME).context("range length overflows")?;
    let page = |a: u64| {
        Page::from_start_address(VirtAddr::try_new(a).map_err(|e| anyhow!("{e:?}"))?)
            .map_err(|e| anyhow!("{e:?}"))
    };
    let frame = |a: u64| {
        PhysFrame::from_start_address(PhysAddr::try_new(a).map_err(|e| anyhow!("{e:?}"))?)
            .map_err(|e| anyhow!("{e:?}"))
    };
    let va_end = va.checked_add(len).context("virtual range overflows")?;
    let pa_end = pa.checked_add(len).context("physical range overflows")?;
    Ok((Page::range(page(va)?, page(va_end)?), PhysFrame::range(frame(pa)?, frame(pa_end)?)))
}

/// A nested walk built from the crate's pieces: the stage-1 table is a
/// `MappedPageTable` whose frame mapping translates each table's
/// guest-physical address through the stage-2 `OffsetPageTable`; the stage-1
/// output is then translated through stage 2 too. Per walk: the root's GPA
/// (4 reads), each of the 3 lower stage-1 tables' GPAs (4 reads each), the
/// 4 stage-1 entries and the final GPA (4 reads) — the same 24 references as
/// memvisor's nested walk.
#[derive(Debug)]
pub(crate) struct PeerNested<'a> {
    stage2: OffsetPageTable<'a>,
    buf: Buffer,
    guest_ram: Range<u64>,
    stage1_root: u64,
}

impl PeerNested<'_> {
    /// The host address of a stage-1 table given its host address from stage 2.
    fn guest_table(&self, hpa: u64) -> Option<NonNull<PageTable>> {
        self.guest_ram.contains(&hpa).then(|| self.buf.frame(hpa)).flatten()
    }

    fn stage2(&self, gpa: u64) -> Option<u64> {
        output(self.stage2.translate(VirtAddr::try_new(gpa).ok()?))
    }

    /// Translates `gva` through both stages.
    #[inline]
    pub(crate) fn translate(&self, gva: VirtAddr) -> Option<u64> {
        let root = self.guest_table(self.stage2(self.stage1_root)?)?;
        // SAFETY: `root` is a frame of the buffer inside guest RAM. While
        // `stage1` lives nothing else references it: the stage-2 mapper only
        // touches stage-2 tables, which lie outside guest RAM; the stage-1
        // walk takes shared references to the other stage-1 tables, and no
        // stage-1 entry points back at the root (both checked in
        // `PeerMemory::nested`); `PeerNested` is neither `Sync` nor
        // re-entered. The frame mapping hands out checked buffer frames only.
        let stage1 = unsafe { MappedPageTable::new(&mut *root.as_ptr(), ThroughStage2 { nested: self }) };
        let gpa = output(stage1.translate(gva))?;
        self.stage2(gpa)
    }
}

/// Frame mapping of the nested peer's stage 1: GPA → stage-2 walk → buffer frame.
#[derive(Debug)]
struct ThroughStage2<'n, 'a> {
    nested: &'n PeerNested<'a>,
}

// SAFETY: every pointer returned is a PageTable frame of the buffer inside
// guest RAM (`guest_table` checks it); a frame that does not translate to one
// panics instead of returning a pointer.
unsafe impl PageTableFrameMapping for ThroughStage2<'_, '_> {
    fn frame_to_pointer(&self, frame: PhysFrame) -> *mut PageTable {
        let gpa = frame.start_address().as_u64();
        match self.nested.stage2(gpa).and_then(|hpa| self.nested.guest_table(hpa)) {
            Some(table) => table.as_ptr(),
            None => panic!("stage-1 table at GPA {gpa:#x} is not in guest RAM through stage 2"),
        }
    }
}
