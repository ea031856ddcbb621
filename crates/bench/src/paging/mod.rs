//! Suite `paging`: `memvisor-paging` against the `x86_64` crate (0.15.5) on
//! identical tables.
//!
//! | case | memvisor | peer |
//! |---|---|---|
//! | `walk/4level-random-4k/lookup` | `Walker::lookup` | `OffsetPageTable::translate` |
//! | `walk/4level-random-4k/translate-read` | `Walker::translate` of a read (A bits already set, so no writes) | `OffsetPageTable::translate` |
//! | `walk/4level-random-4k/cached` | `TranslationCache::translate` of a read (TLB hits) | `OffsetPageTable::translate` |
//! | `walk/4level-random-4k/cached-vs-uncached` | `TranslationCache::translate` (hits) | memvisor's own `Walker::translate` |
//! | `walk/4level-dense-16MiB-4k/{lookup,translate-read}` | as above, all pages of one 16 MiB region | `OffsetPageTable::translate` |
//! | `walk/nested-4over4` | `Nested::translate`, 4-level x86 over 4-level second stage | the crate's `MappedPageTable` whose frame mapping walks stage 2 with an `OffsetPageTable` |
//! | `walk/nested-4over4/refs` | entry reads per nested walk (`translate_counted`) | the bound `n·(m+1) + m` = 24 |
//! | `map-unmap/1GiB-4k` | `Mapper::map` of 1 GiB with 4K pages, then `Mapper::unmap` | `Mapper<Size4KiB>::map_to` per page, then `unmap` per page |
//!
//! Walk cases: 4096 distinct random 4K pages — anywhere in the lower
//! canonical half (`random`: ~8,400 tables, walks served by the outer
//! caches), or every page of one 16 MiB region (`dense`: 11 tables, the
//! walker's own cost) — each mapped to a random frame, built once by
//! memvisor's `Mapper` in an `Arena` and copied into the peer's memory at
//! the same physical addresses (see [`peer`]). Both sides translate the same
//! inputs (each page plus a random offset, in one random order unrelated to
//! the mapping order), and every output is checked to be identical on both
//! sides before timing. Times are per walk: a round's time divided by its
//! number of walks. memvisor's paging mode is a run-time value (it follows
//! guest registers), so the bench hides it from the optimiser
//! (`black_box`); the crate's mode is fixed at compile time. The TLB of
//! `walk/cached` has 64 slots per page of the working set; its hit rate is
//! printed on stderr (~98%: the rest are direct-mapped collisions, which
//! walk and count in memvisor's time).
//!
//! `walk/nested-4over4/refs` has no in-process peer: `ours_ns` holds the
//! measured mean number of entry reads, `peer_ns` the analytical bound (24)
//! and `peer` says `"bound: 24 memory references"`. The timed nested case
//! has a real peer: the same two tables walked by the crate's code, making
//! the same 24 reads (without permission checks or accessed/dirty handling,
//! like the crate's one-dimensional `translate`).
//!
//! `map-unmap`: each round starts from zeroed table memory on both sides
//! (outside the timed region); both sides end with every leaf cleared (the
//! crate leaves its empty tables linked, memvisor frees them). The time is
//! per 4K page mapped and unmapped. `--quick` uses 64 MiB and says so in the
//! case name.

mod peer;

use std::collections::HashSet;
use std::hint::black_box;

use anyhow::{Context, Result, ensure};
use memvisor_paging::{
    Access, Arena, ArenaFrames, Mapper, Nested, OffsetMemory, SecondStage, SecondStageAttrs, TableMemory,
    TranslationCache, Walker, X86Attrs, X86Paging,
};
use memvisor_types::{AddrRange, Address, Gpa, Gva, Hpa, PageSize};
use x86_64::VirtAddr;
use x86_64::structures::paging::Translate;

use self::peer::{PeerMemory, output};
use crate::Config;
use crate::harness::{Plan, Stopwatch, compare};
use crate::report::{Record, Reporter, Unit};
use crate::rng::SplitMix64;

const SUITE: &str = "paging";
const PEER_TRANSLATE: &str = "x86_64 0.15.5 OffsetPageTable::translate";
/// Physical address of the first frame of every arena (and of the peer's copy).
const ARENA_BASE: u64 = 0x10_0000;
const FRAME: u64 = 4096;
/// Distinct random pages of the walk cases.
const WALK_PAGES: usize = 4096;
/// Stage-2 table frames of the nested case (before guest RAM in host memory).
const STAGE2_FRAMES: usize = 64;

/// Runs the suite.
pub(crate) fn run(config: &Config, out: &mut Reporter) -> Result<()> {
    let plan = if config.quick { Plan::new(1, 5) } else { Plan::new(2, 31) };
    // Walks per round: WALK_PAGES × passes (a few milliseconds).
    let passes: u64 = if config.quick { 16 } else { 64 };
    walks(&plan, passes, Spread::Sparse, true, out)?;
    walks(&plan, passes, Spread::Dense, false, out)?;
    nested(&plan, passes / 4, out)?;
    map_unmap(config, &plan, out)?;
    Ok(())
}

/// Where the random pages of a walk case lie.
#[derive(Debug, Clone, Copy)]
enum Spread {
    /// Anywhere in the lower canonical half (128 TiB): nearly every page has
    /// its own level-3, level-2 and level-1 tables, so the tables (~33 MiB
    /// for 4096 pages) come from the outer caches.
    Sparse,
    /// Every page of a 16 MiB region: 8 level-1 tables plus 3 above them,
    /// which stay in the inner caches — the walker's own cost.
    Dense,
}

/// `n` distinct random 4K pages of the lower canonical half, in random order.
fn random_pages(rng: &mut SplitMix64, n: usize, spread: Spread) -> Vec<u64> {
    if let Spread::Dense = spread {
        // A 16 MiB-aligned region somewhere in the lower half, all of whose pages are used.
        let base = rng.below(1 << 23) << 24;
        let mut pages: Vec<u64> = (0..).map(|i| base + i * FRAME).take(n).collect();
        rng.shuffle(&mut pages);
        return pages;
    }
    let mut seen = HashSet::with_capacity(n);
    let mut pages = Vec::with_capacity(n);
    while pages.len() < n {
        let page = rng.below(1 << 35) << 12;
        if seen.insert(page) {
            pages.push(page);
        }
    }
    pages
}

/// A table of random 4K mappings and the inputs to translate through it.
struct WalkTables {
    arena: Arena<Hpa>,
    root: Hpa,
    /// Frames the table uses (the first ones of the arena).
    frames: usize,
    /// Addresses to translate, in random order, each with a random page offset.
    inputs: Vec<u64>,
    /// The output address of each input.
    expected: Vec<u64>,
}

fn random_4k_tables(n: usize, spread: Spread, seed: u64) -> Result<WalkTables> {
    let mut rng = SplitMix64::new(seed);
    let pages = random_pages(&mut rng, n, spread);
    let arena = Arena::new(Hpa::new(ARENA_BASE), 1 + 3 * n);
    let (root, frames, outputs) = {
        let mut mapper = Mapper::new(X86Paging::four_level(), &arena, arena.frame_allocator())?;
        let mut outputs = Vec::with_capacity(n);
        for &page in &pages {
            // A random frame below 1 TiB.
            let frame = rng.below(1 << 28) << 12;
            let range = AddrRange::from_len(Gva::new(page), FRAME)?;
            mapper.map(range, Hpa::new(frame), X86Attrs::user_rwx(), PageSize::Size4K)?;
            outputs.push(frame);
        }
        (mapper.root(), usize::try_from(mapper.allocator_mut().in_use())?, outputs)
    };
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let (mut inputs, mut expected) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in order {
        let offset = rng.below(FRAME);
        inputs.push(pages[i] | offset);
        expected.push(outputs[i] | offset);
    }
    Ok(WalkTables { arena, root, frames, inputs, expected })
}

/// The walk cases on one table: `lookup` and `translate-read` against the
/// crate's `translate`, and (with `cached`) the translation-cache cases.
fn walks(plan: &Plan, passes: u64, spread: Spread, cached: bool, out: &mut Reporter) -> Result<()> {
    let prefix = match spread {
        Spread::Sparse => "walk/4level-random-4k",
        Spread::Dense => "walk/4level-dense-16MiB-4k",
    };
    // The paging mode is a run-time value for memvisor (it follows a guest's
    // CR0/CR4/EFER or a VT-d PASID entry), so the compiler must not fold it
    // into constants here either; the crate's mode is fixed at compile time.
    let fmt = black_box(X86Paging::four_level());
    // Compiled once, like the peer's `OffsetPageTable` is built once.
    let walker = fmt.prepare();
    let t = random_4k_tables(WALK_PAGES, spread, 0x6d65_6d76_6973_6f72)?;
    let (arena, root, inputs) = (&t.arena, t.root, &t.inputs);
    // Set the accessed flags (and check memvisor's answers) before copying, so
    // both sides walk identical tables and the timed translations write nothing.
    for (&a, &want) in inputs.iter().zip(&t.expected) {
        let got = walker.translate(arena, root, Gva::new(a), Access::read())?.addr.raw();
        ensure!(got == want, "memvisor translated {a:#x} to {got:#x}, expected {want:#x}");
        let got = walker.lookup(arena, root, Gva::new(a))?.addr.raw();
        ensure!(got == want, "memvisor looked up {a:#x} as {got:#x}, expected {want:#x}");
    }
    let mut memory = PeerMemory::new(ARENA_BASE, t.frames)?;
    memory.load(arena, t.frames)?;
    let table = memory.offset_page_table(root.raw())?;
    let vas = inputs.iter().map(|&a| VirtAddr::try_new(a)).collect::<Result<Vec<_>, _>>();
    let vas = vas.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (va, &want) in vas.iter().zip(&t.expected) {
        let got = output(table.translate(*va));
        ensure!(got == Some(want), "x86_64 translated {va:?} to {got:x?}, memvisor to {want:#x}");
    }

    let peer_walks = |sw: &mut Stopwatch| {
        sw.time_passes(passes, &vas, |va| output(table.translate(*va)).unwrap_or(0));
        Ok(())
    };

    let m = compare(
        plan,
        |sw| {
            sw.time_passes(passes, inputs, |&a| {
                walker.lookup(arena, root, Gva::new(a)).map_or(0, |t| t.addr.raw())
            });
            Ok(())
        },
        peer_walks,
    )?;
    out.emit(Record::timed(SUITE, format!("{prefix}/lookup"), PEER_TRANSLATE, m))?;

    let translate_walks = |sw: &mut Stopwatch| {
        sw.time_passes(passes, inputs, |&a| {
            walker.translate(arena, root, Gva::new(a), Access::read()).map_or(0, |t| t.addr.raw())
        });
        Ok(())
    };
    let m = compare(plan, translate_walks, peer_walks)?;
    out.emit(Record::timed(SUITE, format!("{prefix}/translate-read"), PEER_TRANSLATE, m))?;
    if !cached {
        return Ok(());
    }

    // The TLB: 64 slots per page, so nearly every translation of the working
    // set hits (the rest of a direct-mapped cache's collisions are walks,
    // counted in ours).
    let mut tlb = TranslationCache::new(fmt, 64 * inputs.len(), 1024);
    for (&a, &want) in inputs.iter().zip(&t.expected).chain(inputs.iter().zip(&t.expected)) {
        let got = tlb.translate(arena, root, Gva::new(a), Access::read())?.addr.raw();
        ensure!(got == want, "the translation cache gave {got:#x} for {a:#x}, expected {want:#x}");
    }
    let before = tlb.stats();
    let mut cached_walks = |sw: &mut Stopwatch| {
        sw.time_passes(passes, inputs, |&a| {
            tlb.translate(arena, root, Gva::new(a), Access::read()).map_or(0, |t| t.addr.raw())
        });
        Ok(())
    };
    let m = compare(plan, &mut cached_walks, peer_walks)?;
    out.emit(Record::timed(SUITE, format!("{prefix}/cached"), PEER_TRANSLATE, m))?;
    let m = compare(plan, &mut cached_walks, translate_walks)?;
    out.emit(Record::timed(
        SUITE,
        format!("{prefix}/cached-vs-uncached"),
        "memvisor Walker::translate (no cache)",
        m,
    ))?;
    let after = tlb.stats();
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    eprintln!(
        "{SUITE}: walk/cached — TLB hit rate {:.2}% ({hits} hits, {misses} misses; {} pages)",
        100.0 * hits as f64 / (hits + misses).max(1) as f64,
        inputs.len()
    );
    Ok(())
}

/// Guest tables (4-level x86) in guest RAM, over a 4-level second stage mapping guest RAM with 4K pages.
struct NestedTables {
    host: Arena<Hpa>,
    stage2_root: Hpa,
    stage1_root: Gpa,
    /// Host-physical range of guest RAM (GPA 0 is its start).
    guest_ram: std::ops::Range<u64>,
    inputs: Vec<u64>,
    expected: Vec<u64>,
}

fn nested_tables(n: usize, seed: u64) -> Result<NestedTables> {
    let mut rng = SplitMix64::new(seed);
    let guest_frames = 1 + 3 * n;
    let guest_len = u64::try_from(guest_frames)? * FRAME;
    let guest_base = ARENA_BASE + u64::try_from(STAGE2_FRAMES)? * FRAME;
    let host = Arena::new(Hpa::new(ARENA_BASE), STAGE2_FRAMES + guest_frames);
    let pages = random_pages(&mut rng, n, Spread::Sparse);
    let (stage2_root, stage1_root, outputs) = {
        let mut s2 =
            Mapper::new(SecondStage::four_level(), &host, ArenaFrames::<Hpa>::range(ARENA_BASE, guest_base))?;
        let ram = AddrRange::from_len(Gpa::new(0), guest_len)?;
        s2.map(ram, Hpa::new(guest_base), SecondStageAttrs::rwx(), PageSize::Size4K)?;
        let guest = OffsetMemory::<_, Gpa>::new(&host, guest_base);
        let mut s1 = Mapper::new(X86Paging::four_level(), &guest, ArenaFrames::<Gpa>::range(0, guest_len))?;
        let mut outputs = Vec::with_capacity(n);
        for &page in &pages {
            // A random guest frame (in guest RAM, so stage 2 maps it).
            let gpa = rng.below(u64::try_from(guest_frames)?) * FRAME;
            let range = AddrRange::from_len(Gva::new(page), FRAME)?;
            s1.map(range, Gpa::new(gpa), X86Attrs::user_rwx(), PageSize::Size4K)?;
            outputs.push(guest_base + gpa);
        }
        (s2.root(), s1.root(), outputs)
    };
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let (mut inputs, mut expected) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in order {
        let offset = rng.below(FRAME);
        inputs.push(pages[i] | offset);
        expected.push(outputs[i] | offset);
    }
    Ok(NestedTables {
        host,
        stage2_root,
        stage1_root,
        guest_ram: guest_base..guest_base + guest_len,
        inputs,
        expected,
    })
}

fn nested(plan: &Plan, passes: u64, out: &mut Reporter) -> Result<()> {
    // Run-time formats, as in `walks`.
    let walker = black_box(Nested { stage1: X86Paging::four_level(), stage2: SecondStage::four_level() });
    // Compiled once for the timed loop, as the peer's tables are set up once.
    let prepared = walker.prepare();
    let t = nested_tables(WALK_PAGES, 0x6e65_7374_6564)?;
    let (host, s2, s1, inputs) = (&t.host, t.stage2_root, t.stage1_root, &t.inputs);
    // First walk of each input sets the accessed flags of both stages; the
    // second counts the reads of a steady-state walk.
    let mut refs = 0u64;
    for (&a, &want) in inputs.iter().zip(&t.expected) {
        let got = walker.translate(host, s2, s1, Gva::new(a), Access::read())?.addr.raw();
        ensure!(got == want, "memvisor's nested walk gave {got:#x} for {a:#x}, expected {want:#x}");
        let (r, n) = walker.translate_counted(host, s2, s1, Gva::new(a), Access::read());
        ensure!(r?.addr.raw() == want, "memvisor's counted nested walk disagrees for {a:#x}");
        refs += u64::from(n);
    }
    let bound = walker.max_references();
    let mean_refs = refs as f64 / inputs.len() as f64;
    out.emit(Record::bound(
        SUITE,
        "walk/nested-4over4/refs",
        format!("bound: {bound} memory references"),
        mean_refs,
        f64::from(bound),
        Unit::References,
    ))?;

    let mut memory = PeerMemory::new(ARENA_BASE, host.frames())?;
    memory.load(host, host.frames())?;
    let peer = memory.nested(s2.raw(), s1.raw(), t.guest_ram.clone())?;
    let vas = inputs.iter().map(|&a| VirtAddr::try_new(a)).collect::<Result<Vec<_>, _>>();
    let vas = vas.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (va, &want) in vas.iter().zip(&t.expected) {
        let got = peer.translate(*va);
        ensure!(got == Some(want), "the x86_64 nested peer gave {got:x?} for {va:?}, memvisor {want:#x}");
    }

    let m = compare(
        plan,
        |sw| {
            sw.time_passes(passes, inputs, |&a| {
                prepared.translate(host, s2, s1, Gva::new(a), Access::read()).map_or(0, |t| t.addr.raw())
            });
            Ok(())
        },
        |sw| {
            sw.time_passes(passes, &vas, |va| peer.translate(*va).unwrap_or(0));
            Ok(())
        },
    )?;
    out.emit(Record::timed(
        SUITE,
        "walk/nested-4over4",
        "x86_64 0.15.5 MappedPageTable through a stage-2 OffsetPageTable (24 refs)",
        m,
    ))?;
    Ok(())
}

fn map_unmap(config: &Config, plan: &Plan, out: &mut Reporter) -> Result<()> {
    let (label, bytes): (&str, u64) = if config.quick { ("64MiB", 64 << 20) } else { ("1GiB", 1 << 30) };
    let pages = bytes / FRAME;
    let (va, pa) = (0x4000_0000u64, 0x2_0000_0000u64);
    let range = AddrRange::from_len(Gva::new(va), bytes)?;
    // Root, level-3 and level-2 tables, and one level-1 table per 2 MiB.
    let frames = 3 + usize::try_from(pages.div_ceil(512))?;
    let fmt = black_box(X86Paging::four_level());
    let arena = Arena::new(Hpa::new(ARENA_BASE), frames);
    let mut memory = PeerMemory::new(ARENA_BASE, frames)?;
    verify_map_unmap(&arena, &mut memory, range, pa)?;

    let m = compare(
        plan,
        |sw| {
            arena.clear();
            let mut mapper = Mapper::new(fmt, &arena, arena.frame_allocator())?;
            sw.time(pages, || -> Result<u64> {
                let mapped = mapper.map(range, Hpa::new(pa), X86Attrs::user_rwx(), PageSize::Size4K)?;
                let unmapped = mapper.unmap(range)?;
                Ok(mapped.leaves + unmapped.leaves)
            })?;
            Ok(())
        },
        |sw| {
            let mut mapper = memory.fresh_mapper()?;
            sw.time(pages, || -> Result<()> {
                mapper.map_4k(va, pa, pages)?;
                mapper.unmap_4k(va, pages)
            })?;
            Ok(())
        },
    )?;
    out.emit(Record::timed(
        SUITE,
        format!("map-unmap/{label}-4k"),
        "x86_64 0.15.5 OffsetPageTable map_to + unmap per page",
        m,
    ))?;
    Ok(())
}

/// Maps and unmaps `range` once on each side and checks that both build
/// the very same table, translate every page alike, and unmap everything.
fn verify_map_unmap(
    arena: &Arena<Hpa>,
    memory: &mut PeerMemory,
    range: AddrRange<Gva>,
    pa: u64,
) -> Result<()> {
    let fmt = X86Paging::four_level();
    let (va, pages) = (range.start().raw(), range.len() / FRAME);
    arena.clear();
    let mut mapper = Mapper::new(fmt, arena, arena.frame_allocator())?;
    mapper.map(range, Hpa::new(pa), X86Attrs::user_rwx(), PageSize::Size4K)?;
    let root = mapper.root();
    {
        let mut peer = memory.fresh_mapper()?;
        peer.map_4k(va, pa, pages)?;
        for (i, page) in range.pages(PageSize::Size4K)?.enumerate() {
            let want = pa + u64::try_from(i)? * FRAME;
            let ours = fmt.lookup(arena, root, page)?.addr.raw();
            let theirs = peer.translate(page.raw());
            ensure!(
                ours == want && theirs == Some(want),
                "page {page} maps to {ours:#x} and {theirs:x?}, not {want:#x}"
            );
        }
    }
    for phys in memory.phys_range().step_by(8) {
        let ours = arena.read_entry(Hpa::new(phys))?;
        let theirs = memory.entry(phys).context("peer entry")?;
        ensure!(ours == theirs, "the tables differ at {phys:#x}: memvisor {ours:#x}, x86_64 {theirs:#x}");
    }
    mapper.unmap(range)?;
    let mut peer = memory.reopen(root.raw())?;
    peer.unmap_4k(va, pages)?;
    for page in range.pages(PageSize::Size4K)? {
        ensure!(fmt.lookup(arena, root, page).is_err(), "memvisor still maps {page} after unmap");
        ensure!(peer.translate(page.raw()).is_none(), "x86_64 still maps {page} after unmap");
    }
    Ok(())
}
