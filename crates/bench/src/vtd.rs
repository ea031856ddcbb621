//! Suite `vtd`: memvisor's VT-d model (`memvisor-vtd`) against vm-memory
//! 0.18's IOMMU support (the rust-vmm peer) and against the nested-walk bound.
//!
//! | case | memvisor | peer or bound |
//! |---|---|---|
//! | `iotlb-hit/legacy-N` | `Dmar::translate` of a 4 KiB read at N mapped IOVAs (legacy context, 3-level second stage), all served by the context cache + IOTLB | vm-memory 0.18 `Iotlb::lookup` of the same page over the same N mappings |
//! | `iotlb-miss/nested-4over4/refs-no-psc` | guest-memory references of one nested (first over second stage, both 4-level) translation with the IOTLB and paging-structure caches off | bound: 24 memory references |
//! | `iotlb-miss/nested-4over4/refs-psc` | the same with memvisor's paging-structure caches on (IOTLB still off) | bound: 24 |
//! | `qi/page-invalidations` | queued invalidation: a page-selective IOTLB descriptor per page, read from the guest's queue, decoded and applied to a warm IOTLB, 255 per IQT write | vm-memory 0.18 `Iotlb::invalidate_mapping` of the same page on a warm `Iotlb` |
//!
//! Every case checks its results before timing: both IOTLBs answer the
//! same output address for every IOVA; the nested translation equals the
//! composed mapping; after the queued invalidations memvisor's IOTLB is
//! empty (the next warm-up misses on every page). `--quick` uses fewer pages and says so in the case names.

use anyhow::{Context, Result, anyhow, ensure};
use memvisor_paging::{ArenaFrames, Mapper, SecondStage, SecondStageAttrs, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Iova, PageSize};
use memvisor_vtd::device::Vtd;
use memvisor_vtd::encode::{self, LegacyTt, PasidEntryFields, PasidTt};
use memvisor_vtd::translate::{DmaRequest, Dmar};
use memvisor_vtd::{Config, Mode, RecordingSink, RootState, SourceId, TestMemory};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::Config as BenchConfig;
use crate::harness::{Plan, compare};
use crate::report::{Record, Reporter, Unit};
use crate::rng::SplitMix64;

const SUITE: &str = "vtd";
const PAGE: u64 = 4096;
/// One page, as vm-memory's lengths count it.
const PAGE_LEN: usize = 4096;
const DEV: SourceId = SourceId::new(0, 3, 0);
const ROOT: u64 = 0x1000;
const CONTEXTS: u64 = 0x2000;
const PASID_DIR: u64 = 0x3000;
const PASID_TABLE: u64 = 0x4000;
/// The invalidation queue (one page: 256 descriptors of 128 bits).
const QUEUE: u64 = 0x8000;
/// Second-stage tables are built from frames here.
const SS_FRAMES: u64 = 0x80_0000;
/// First-stage tables are built from frames here.
const FS_FRAMES: u64 = 0xc0_0000;
/// Guest memory: 16 MiB.
const MEM_FRAMES: usize = 4096;
/// IOVAs start here.
const IOVA_BASE: u64 = 0x4000_0000;

/// Runs the suite.
pub(crate) fn run(config: &BenchConfig, out: &mut Reporter) -> Result<()> {
    let plan = if config.quick { Plan::new(1, 5) } else { Plan::new(2, 11) };
    let pages: u64 = if config.quick { 1024 } else { 4096 };
    iotlb_hit(&plan, pages, if config.quick { 20 } else { 100 }, out)?;
    nested_refs(pages.min(512), out)?;
    queued_invalidation(&plan, pages, out)?;
    Ok(())
}

fn guest_memory() -> TestMemory {
    TestMemory::new(Gpa::new(0), MEM_FRAMES)
}

/// Legacy tables: `DEV` → 3-level second stage mapping `pages` IOVAs to
/// shuffled output pages. Returns (IOVA, output) pairs in a shuffled order.
fn legacy_tables(mem: &TestMemory, pages: u64, seed: u64) -> Result<Vec<(u64, u64)>> {
    let format = SecondStage { large_1g: false, host_width: 46, ..SecondStage::four_level().with_levels(3) };
    let frames = ArenaFrames::range(SS_FRAMES, FS_FRAMES);
    let mut mapper = Mapper::new(format, mem.arena(), frames).map_err(|e| anyhow!("{e:?}"))?;
    let mut rng = SplitMix64::new(seed);
    let mut outputs: Vec<u64> = (0..pages).map(|i| 0x1_0000_0000 + i * PAGE).collect();
    rng.shuffle(&mut outputs);
    let mut pairs = Vec::with_capacity(outputs.len());
    for (i, &o) in outputs.iter().enumerate() {
        let iova = IOVA_BASE + i as u64 * PAGE;
        let range = AddrRange::from_len(Iova::new(iova), PAGE).map_err(|e| anyhow!("{e:?}"))?;
        mapper
            .map(range, Gpa::new(o), SecondStageAttrs::rwx(), PageSize::Size4K)
            .map_err(|e| anyhow!("{e:?}"))?;
        pairs.push((iova, o));
    }
    let entry = encode::legacy_context_entry(mapper.root().raw(), LegacyTt::MultiLevel, 3, 1);
    encode::install_legacy_context(mem, ROOT, CONTEXTS, DEV, entry).map_err(|e| anyhow!("{e}"))?;
    rng.shuffle(&mut pairs);
    Ok(pairs)
}

fn legacy_config(iotlb_entries: usize) -> Config {
    Config { mode: Mode::Legacy, address_width: 39, iotlb_entries, ..Config::default() }
}

fn iotlb_hit(plan: &Plan, pages: u64, passes: u64, out: &mut Reporter) -> Result<()> {
    let mem = guest_memory();
    let pairs = legacy_tables(&mem, pages, 0x766d_6d75)?;
    let root = RootState { rtaddr: ROOT, scalable: false, enabled: true };
    let mut dmar = Dmar::new(&legacy_config(8192));
    let mut peer = Iotlb::new();
    for &(iova, o) in &pairs {
        peer.set_mapping(GuestAddress(iova), GuestAddress(o), PAGE_LEN, Permissions::ReadWrite)
            .map_err(|e| anyhow!("vm-memory set_mapping: {e}"))?;
        let t = dmar
            .translate(&mem, &root, &DmaRequest::read(DEV, iova))
            .map_err(|f| anyhow!("memvisor translation of {iova:#x} faulted: {f:?}"))?;
        ensure!(t.output == o, "memvisor translated {iova:#x} to {:#x}, expected {o:#x}", t.output);
    }
    for &(iova, o) in &pairs {
        let hit = dmar.translate(&mem, &root, &DmaRequest::read(DEV, iova)).map_err(|f| anyhow!("{f:?}"))?;
        let mut it = Iotlb::lookup(&peer, GuestAddress(iova), PAGE_LEN, Permissions::Read)
            .map_err(|_| anyhow!("vm-memory IOTLB missed {iova:#x}"))?;
        let p = it.next().context("vm-memory returned no range")?.base.0;
        ensure!(hit.output == o && p == o, "IOTLBs disagree at {iova:#x}: {:#x} vs {p:#x}", hit.output);
    }
    let hits_before = dmar.stats().iotlb_hits;
    let m = compare(
        plan,
        |sw| {
            sw.time_passes(passes, &pairs, |&(iova, _)| {
                dmar.translate(&mem, &root, &DmaRequest::read(DEV, iova)).map_or(0, |t| t.output)
            });
            Ok(())
        },
        |sw| {
            sw.time_passes(passes, &pairs, |&(iova, _)| {
                Iotlb::lookup(&peer, GuestAddress(iova), PAGE_LEN, Permissions::Read)
                    .ok()
                    .and_then(|mut it| it.next())
                    .map_or(0, |r| r.base.0)
            });
            Ok(())
        },
    )?;
    ensure!(dmar.stats().iotlb_hits > hits_before, "the timed translations were not IOTLB hits");
    out.emit(Record::timed(SUITE, format!("iotlb-hit/legacy-{pages}"), "vm-memory 0.18 Iotlb::lookup", m))
}

fn nested_refs(pages: u64, out: &mut Reporter) -> Result<()> {
    let mem = guest_memory();
    // Second stage: identity over the first 8 MiB in 4K pages (so every
    // stage-2 walk has four levels), built from frames above it.
    let ss = SecondStage { host_width: 46, large_2m: false, large_1g: false, ..SecondStage::four_level() };
    let mut s2 = Mapper::new(ss, mem.arena(), ArenaFrames::range(SS_FRAMES, FS_FRAMES))
        .map_err(|e| anyhow!("{e:?}"))?;
    let low = AddrRange::from_len(Gpa::new(0), FS_FRAMES + 0x40_0000).map_err(|e| anyhow!("{e:?}"))?;
    s2.map(low, Gpa::new(0), SecondStageAttrs::rwx(), PageSize::Size4K).map_err(|e| anyhow!("{e:?}"))?;
    // First stage: `pages` IOVAs spread over distinct 1 GiB regions' tables
    // to shuffled data pages in 1..8 MiB.
    let fs = X86Paging { phys_width: 46, ..X86Paging::four_level() };
    let mut s1 = Mapper::new(fs, mem.arena(), ArenaFrames::range(FS_FRAMES, FS_FRAMES + 0x40_0000))
        .map_err(|e| anyhow!("{e:?}"))?;
    let mut rng = SplitMix64::new(0x6e65_7374);
    let mut data: Vec<u64> = (0..pages).map(|i| 0x10_0000 + (i % 1792) * PAGE).collect();
    rng.shuffle(&mut data);
    let mut pairs = Vec::new();
    for (i, &gpa) in data.iter().enumerate() {
        let iova = IOVA_BASE + (i as u64) * (2 << 20);
        let range = AddrRange::from_len(Iova::new(iova), PAGE).map_err(|e| anyhow!("{e:?}"))?;
        s1.map(range, Gpa::new(gpa), X86Attrs::user_rwx(), PageSize::Size4K).map_err(|e| anyhow!("{e:?}"))?;
        pairs.push((iova, gpa));
    }
    encode::install_scalable_context(
        &mem,
        ROOT,
        CONTEXTS,
        DEV,
        encode::scalable_context_entry(PASID_DIR, 0, 0),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let fields = PasidEntryFields {
        pgtt: PasidTt::Nested,
        ssptptr: s2.root().raw(),
        ..PasidEntryFields::first_stage(1, s1.root().raw())
    };
    encode::install_pasid_entry(&mem, PASID_DIR, PASID_TABLE, 0, fields.encode())
        .map_err(|e| anyhow!("{e}"))?;
    let root = RootState { rtaddr: ROOT, scalable: true, enabled: true };
    let config = Config { mode: Mode::ScalableNested, iotlb_entries: 0, ..Config::default() };
    for (psc, case, expect_bound) in [(false, "refs-no-psc", true), (true, "refs-psc", false)] {
        let mut dmar = Dmar::new(&config);
        dmar.set_paging_structure_caches(psc);
        // The first pass sets accessed flags and fills the context/PASID
        // caches; the second counts a steady-state miss.
        let mut refs = 0u64;
        for pass in 0..2 {
            for &(iova, gpa) in &pairs {
                let t = dmar
                    .translate(&mem, &root, &DmaRequest::read(DEV, iova))
                    .map_err(|f| anyhow!("nested translation of {iova:#x} faulted: {f:?}"))?;
                ensure!(
                    t.output == gpa,
                    "nested translation of {iova:#x} gave {:#x}, expected {gpa:#x}",
                    t.output
                );
                if pass == 1 {
                    refs += u64::from(dmar.last_table_reads());
                }
            }
        }
        let mean = refs as f64 / pairs.len() as f64;
        if expect_bound {
            ensure!(mean <= 24.0, "a nested miss without caches read {mean} entries, above the bound of 24");
        }
        out.emit(Record::bound(
            SUITE,
            format!("iotlb-miss/nested-4over4/{case}"),
            "bound: 24 memory references",
            mean,
            24.0,
            Unit::References,
        ))?;
    }
    Ok(())
}

const GCMD: u64 = 0x18;
const IQT: u64 = 0x88;
const IQA: u64 = 0x90;
const GCMD_QIE: u32 = 1 << 26;
/// Descriptors per IQT write: the queue holds 256, one slot stays empty.
const BATCH: usize = 255;

fn queued_invalidation(plan: &Plan, pages: u64, out: &mut Reporter) -> Result<()> {
    let mem = guest_memory();
    let pairs = legacy_tables(&mem, pages, 0x7169)?;
    let mut vtd =
        Vtd::new(Config { iotlb_entries: 8192, ..legacy_config(8192) }).map_err(|e| anyhow!("{e}"))?;
    let mut irq = RecordingSink::default();
    vtd.mmio_write(&mem, &mut irq, 0x20, &ROOT.to_le_bytes());
    vtd.mmio_write(&mem, &mut irq, GCMD, &(1u32 << 30).to_le_bytes()); // SRTP
    vtd.mmio_write(&mem, &mut irq, IQA, &QUEUE.to_le_bytes()); // QS 0: 256 descriptors
    vtd.mmio_write(&mem, &mut irq, GCMD, &GCMD_QIE.to_le_bytes());
    vtd.mmio_write(&mem, &mut irq, GCMD, &(GCMD_QIE | (1 << 31)).to_le_bytes()); // + TE
    let mut tail = 0u64;
    let mut peer = Iotlb::new();
    let mut order: Vec<u64> = pairs.iter().map(|p| p.0).collect();
    order.sort_unstable();
    // One round: warm both IOTLBs (untimed), then invalidate every page.
    // Every warm-up translation must miss: the previous round's queued
    // invalidations (or the empty start) left nothing cached.
    let warm = |vtd: &mut Vtd, irq: &mut RecordingSink| -> Result<()> {
        let misses = vtd.stats().dmar.iotlb_misses;
        for &(iova, o) in &pairs {
            let t = vtd.translate(&mem, irq, &DmaRequest::read(DEV, iova)).map_err(|f| anyhow!("{f:?}"))?;
            ensure!(t.output == o, "translation of {iova:#x} wrong before invalidation");
        }
        let missed = vtd.stats().dmar.iotlb_misses - misses;
        ensure!(
            missed == pairs.len() as u64,
            "{missed} of {} translations missed: invalidations left entries",
            pairs.len()
        );
        Ok(())
    };
    let m = compare(
        plan,
        |sw| {
            warm(&mut vtd, &mut irq)?;
            for chunk in order.chunks(BATCH) {
                for (k, &iova) in chunk.iter().enumerate() {
                    let slot = (tail + k as u64) % 256;
                    encode::write_words(
                        &mem,
                        Gpa::new(QUEUE + slot * 16),
                        &encode::qi_iotlb_page(1, iova, 0),
                    )
                    .map_err(|e| anyhow!("{e}"))?;
                }
                tail = (tail + chunk.len() as u64) % 256;
                sw.time(chunk.len() as u64, || {
                    vtd.mmio_write(&mem, &mut irq, IQT, &(tail * 16).to_le_bytes())
                });
            }
            Ok(())
        },
        |sw| {
            for &(iova, o) in &pairs {
                peer.set_mapping(GuestAddress(iova), GuestAddress(o), PAGE_LEN, Permissions::ReadWrite)
                    .map_err(|e| anyhow!("{e}"))?;
            }
            sw.time(order.len() as u64, || {
                for &iova in &order {
                    peer.invalidate_mapping(GuestAddress(iova), PAGE_LEN);
                }
            });
            Ok(())
        },
    )?;
    out.emit(Record::timed(
        SUITE,
        format!("qi/page-invalidations-{pages}"),
        "vm-memory 0.18 Iotlb::invalidate_mapping",
        m,
    ))
}
