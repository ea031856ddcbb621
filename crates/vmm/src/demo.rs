//! The built-in demo of the translation engine.
//!
//! A guest's 4-level page tables live in its own RAM; its RAM is host memory
//! reached through a 4-level VT-d second-stage table. The demo maps guest
//! pages, translates every one through both stages (counting memory
//! references against the 24-reference bound), then changes the second stage
//! the way a host does — discard a region, write-protect another — and checks
//! that a translation cache invalidated with the mapper's reported changes
//! never returns a stale translation.

use anyhow::{Context, Result, ensure};
use memvisor_paging::{
    Access, Arena, ArenaFrames, FaultKind, Mapper, Nested, OffsetMemory, SecondStage, SecondStageAttrs,
    StageId, TranslationCache, Walker, X86Attrs, X86Paging,
};
use memvisor_types::{AddrRange, Gpa, Gva, Hpa, PageSize};

/// Guest RAM size.
const GUEST_RAM: u64 = 64 << 20;
/// Host frames set aside for stage-2 tables, in front of guest RAM (2 MiB, so
/// guest RAM is 2M-aligned in the host and stage 2 can use 2M pages).
const S2_TABLE_FRAMES: u64 = 512;
/// Guest-physical region the guest uses for its own page tables.
const GUEST_TABLES: (u64, u64) = (0x10_0000, 0x40_0000);
/// Guest-physical region the demo's pages map to.
const GUEST_DATA: u64 = 0x40_0000;
/// Guest-virtual base of the demo's pages.
const GVA_BASE: u64 = 0x7f00_0000_0000;

pub fn run(pages: u64) -> Result<()> {
    let max_pages = (GUEST_RAM - GUEST_DATA) >> 12;
    ensure!(pages > 0 && pages <= max_pages, "--pages must be between 1 and {max_pages}");

    let host_frames = usize::try_from(S2_TABLE_FRAMES + (GUEST_RAM >> 12))?;
    let host = Arena::new(Hpa::new(0), host_frames);
    let ram_base = S2_TABLE_FRAMES << 12;
    println!(
        "host: {} frames; guest RAM {} MiB at host {:#x}; stage 2: VT-d second-stage, 4 levels",
        host.frames(),
        GUEST_RAM >> 20,
        ram_base
    );

    // Stage 2: all of guest RAM, 2M pages, in the frames in front of RAM.
    let s2_format = SecondStage::four_level();
    let mut s2 = Mapper::new(s2_format, &host, ArenaFrames::<Hpa>::range(0, ram_base))?;
    let ram = AddrRange::from_len(Gpa::new(0), GUEST_RAM)?;
    s2.map(ram, Hpa::new(ram_base), SecondStageAttrs::rwx(), PageSize::Size2M)?;

    // Stage 1: the guest's own tables, built inside guest RAM.
    let guest = OffsetMemory::<_, Gpa>::new(&host, ram_base);
    let s1_format = X86Paging::four_level();
    let mut s1 = Mapper::new(s1_format, &guest, ArenaFrames::<Gpa>::range(GUEST_TABLES.0, GUEST_TABLES.1))?;
    for i in 0..pages {
        // Scatter the pages: guest page i maps to data frame (i * 7919) mod pages.
        let gva = AddrRange::from_len(Gva::new(GVA_BASE + (i << 12)), 0x1000)?;
        let gpa = Gpa::new(GUEST_DATA + (((i * 7919) % pages) << 12));
        s1.map(gva, gpa, X86Attrs::user_rwx(), PageSize::Size4K)?;
    }
    println!(
        "guest: {pages} scattered 4K pages at GVA {GVA_BASE:#x}, tables in GPA {:#x}..{:#x}",
        GUEST_TABLES.0, GUEST_TABLES.1
    );

    // Every page through both stages.
    let nested = Nested { stage1: s1_format, stage2: s2_format };
    let (mut refs_total, mut refs_max) = (0u64, 0u32);
    for i in 0..pages {
        let gva = Gva::new(GVA_BASE + (i << 12) + 0x18);
        let (t, refs) = nested.translate_counted(&host, s2.root(), s1.root(), gva, Access::write().user());
        let t = t.with_context(|| format!("nested translation of {gva} failed"))?;
        let expect = ram_base + GUEST_DATA + (((i * 7919) % pages) << 12) + 0x18;
        ensure!(t.addr == Hpa::new(expect), "{gva} translated to {} instead of {expect:#x}", t.addr);
        refs_total += u64::from(refs);
        refs_max = refs_max.max(refs);
    }
    println!(
        "nested walk: {pages} translations correct; memory references per walk: mean {:.1}, max {refs_max} (bound {})",
        refs_total as f64 / pages as f64,
        nested.max_references()
    );
    ensure!(refs_max <= nested.max_references(), "a walk exceeded the reference bound");

    // A stage-2 TLB in front of the host table.
    let mut tlb = TranslationCache::new(s2_format, 1024, 64);
    let data = AddrRange::from_len(Gpa::new(GUEST_DATA), pages << 12)?;
    for gpa in data.pages(PageSize::Size4K)? {
        tlb.translate(&host, s2.root(), gpa, Access::read())?;
    }
    for gpa in data.pages(PageSize::Size4K)? {
        tlb.translate(&host, s2.root(), gpa, Access::read())?;
    }
    let stats = tlb.stats();
    println!("stage-2 TLB: {} hits, {} misses over two passes", stats.hits, stats.misses);

    // The host discards 2 MiB of guest RAM: unmap it from stage 2, invalidate what changed.
    let discard = AddrRange::from_len(Gpa::new(GUEST_DATA + 0x20_0000), 0x20_0000)?;
    let changes = s2.unmap(discard)?;
    let flush = changes.flush.context("unmapping a mapped region reported no change")?;
    tlb.invalidate_range(s2.root(), flush);
    let mut faults = 0u64;
    for gpa in data.pages(PageSize::Size4K)? {
        let r = tlb.translate(&host, s2.root(), gpa, Access::read());
        let direct = s2_format.translate(&host, s2.root(), gpa, Access::read());
        ensure!(r == direct, "cache and table disagree at {gpa} after discard: {r:?} vs {direct:?}");
        if discard.contains(gpa) {
            ensure!(
                matches!(r, Err(f) if f.kind == FaultKind::NotPresent),
                "stale translation of discarded {gpa}"
            );
            faults += 1;
        }
    }
    println!("discard {discard}: flushed {flush}, {faults} discarded pages fault, the rest still translate");

    // The host write-protects 2 MiB (e.g. to start dirty logging): guest writes there fault in stage 2.
    let protect = AddrRange::from_len(Gpa::new(GUEST_DATA), 0x20_0000)?;
    let changes = s2.protect(protect, SecondStageAttrs::read_only())?;
    if let Some(flush) = changes.flush {
        tlb.invalidate_range(s2.root(), flush);
    }
    let victim = (0..pages)
        .find(|i| protect.contains(Gpa::new(GUEST_DATA + (((i * 7919) % pages) << 12))))
        .context("no guest page maps into the protected region")?;
    let gva = Gva::new(GVA_BASE + (victim << 12));
    let write = nested.translate(&host, s2.root(), s1.root(), gva, Access::write().user());
    ensure!(
        matches!(write, Err(f) if f.stage == StageId::Second && f.kind == FaultKind::Protection),
        "a write to write-protected guest memory was not stopped: {write:?}"
    );
    let read = nested.translate(&host, s2.root(), s1.root(), gva, Access::read().user());
    ensure!(read.is_ok(), "a read of write-protected guest memory failed: {read:?}");
    println!("write-protect {protect}: guest write to {gva} faults in stage 2, reads still translate");
    println!("demo: all checks passed");
    Ok(())
}
