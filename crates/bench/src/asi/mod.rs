//! Suite `asi`: what address space isolation adds to memvisor's page-table
//! work, against memvisor-paging doing the same work without it.
//!
//! No other Rust crate implements restricted address spaces, so the peer of
//! every case is a **reference** built from memvisor-paging itself, named as
//! such in the `peer` column:
//!
//! | case | memvisor | reference (peer) |
//! |---|---|---|
//! | `alloc-free/4k-global-4spaces` | `Asi::alloc` of globally non-sensitive 4 KiB pages (each mapped in the full space and in 4 restricted spaces), then `Asi::free` of each (unmapped from all 5, flushes logged per address space) | `Mapper::map` + `Mapper::unmap` of the same pages at the same addresses in the full table only |
//! | `alloc-free/4k-local-1space` | as above, locally non-sensitive pages of one owner (full + its 1 restricted space) | same reference |
//! | `alloc-free/4k-sensitive` | as above, sensitive pages (full space only): the allocator's and bookkeeping's own cost | same reference |
//! | `enter-exit/pcid` | `Asi::enter` (restricted), a read through the CPU's TLB, `Asi::exit`, a read in the full space — the bookkeeping of one VM exit handled with an exit to the full space and back | the same two reads through a `TranslationCache` that, lacking address-space ids, drops the outgoing space's entries on every switch (a CR3 write without PCID) and walks again |
//!
//! Times are per page (allocation and free) or per enter/exit round trip.
//! Both sides start each round from the same state (every page freed, no
//! table left but the roots) and end there; freed tables are released on
//! both. The `alloc-free` ratios therefore read as "the cost of ASI's extra
//! mappings and bookkeeping relative to mapping the full table alone": a
//! speedup below 1 is expected and its size is the finding. The
//! `enter-exit` reference is not a peer implementation of ASI either: it is
//! what the same switches cost without PCID-tagged bookkeeping.

use std::hint::black_box;

use anyhow::{Context, Result, ensure};
use memvisor_asi::{
    Allocation, Asi, AsiConfig, ClassConfig, CpuId, DIRECT_MAP_BASE, ExitReason, InstanceId, NoMitigations,
    OwnerId, Sensitivity, SpaceId,
};
use memvisor_paging::{Access, Arena, Mapper, TranslationCache, Walker, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Hpa, PageSize};

use crate::Config;
use crate::harness::{Plan, Stopwatch, compare};
use crate::report::{Record, Reporter};

const SUITE: &str = "asi";
const FRAME: u64 = 4096;
const REFERENCE_MAPPER: &str = "reference: memvisor-paging Mapper map+unmap, full table only";
const REFERENCE_NO_PCID: &str =
    "reference: memvisor-paging TranslationCache, flush on every switch (no PCID)";

/// What ASI maps for a page: the same leaf the full space gets.
const DATA_ATTRS: X86Attrs = X86Attrs { write: true, execute: false, ..X86Attrs::kernel_rwx() };

/// Runs the suite.
pub(crate) fn run(config: &Config, out: &mut Reporter) -> Result<()> {
    let plan = if config.quick { Plan::new(1, 5) } else { Plan::new(2, 15) };
    let pages: u32 = if config.quick { 512 } else { 4096 };
    alloc_free(&plan, pages, Kind::Global, out)?;
    alloc_free(&plan, pages, Kind::Local, out)?;
    alloc_free(&plan, pages, Kind::Sensitive, out)?;
    enter_exit(&plan, if config.quick { 20_000 } else { 200_000 }, out)?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Global,
    Local,
    Sensitive,
}

/// An `Asi` with a KVM class and four VMs (owners 1–4).
fn four_vms(data_frames: u32) -> Result<Asi> {
    let mut asi = Asi::new(AsiConfig { data_frames, table_frames: 512, cpus: 2, ..AsiConfig::default() })?;
    let kvm = asi.register_class(ClassConfig::kvm(Box::new(NoMitigations)))?;
    for owner in 1..=4 {
        asi.create_instance(kvm, OwnerId(owner))?;
    }
    Ok(asi)
}

fn alloc_free(plan: &Plan, pages: u32, kind: Kind, out: &mut Reporter) -> Result<()> {
    let (case, sensitivity, restricted) = match kind {
        Kind::Global => ("alloc-free/4k-global-4spaces", Sensitivity::GlobalNonSensitive, 4),
        Kind::Local => ("alloc-free/4k-local-1space", Sensitivity::LocalNonSensitive(OwnerId(1)), 1),
        Kind::Sensitive => ("alloc-free/4k-sensitive", Sensitivity::Sensitive, 0),
    };
    let mut asi = four_vms(pages)?;
    let n = u64::from(pages);

    // The pages the allocator hands out, in order (checked identical every round).
    let mut vas = Vec::with_capacity(pages as usize);
    for _ in 0..pages {
        vas.push(asi.alloc(sensitivity, FRAME)?.va);
    }
    let restricted_maps = asi.stats().restricted_maps;
    ensure!(
        restricted_maps == restricted * n,
        "expected {} restricted mappings, made {restricted_maps}",
        restricted * n
    );
    let fmt = X86Paging::four_level();
    let reference = Arena::new(Hpa::new(0x10_0000), 64);
    {
        let mut mapper = Mapper::new(fmt, &reference, reference.frame_allocator())?;
        for &va in &vas {
            let pa = Hpa::new(va.raw() - DIRECT_MAP_BASE);
            mapper.map(AddrRange::from_len(va, FRAME)?, pa, DATA_ATTRS, PageSize::Size4K)?;
            let ours = asi.lookup(SpaceId::Full, va)?.context("memvisor-asi maps the page")?;
            let theirs = fmt.lookup(&reference, mapper.root(), va)?;
            ensure!(
                ours.leaf == theirs.leaf,
                "leaves differ at {va}: {:#x} vs {:#x}",
                ours.leaf,
                theirs.leaf
            );
        }
        for &va in &vas {
            mapper.unmap(AddrRange::from_len(va, FRAME)?)?;
        }
    }
    for &va in &vas {
        asi.free(va)?;
    }
    ensure!(asi.check().is_ok(), "the isolation invariants hold after the check round");

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            sw.time(n, || -> Result<()> {
                let mut got = Vec::with_capacity(vas.len());
                for _ in 0..pages {
                    got.push(asi.alloc(sensitivity, FRAME)?.va);
                }
                for &va in &got {
                    asi.free(va)?;
                }
                ensure!(got == vas, "the allocator handed out other pages");
                Ok(())
            })?;
            Ok(())
        },
        |sw: &mut Stopwatch| {
            reference.clear();
            let mut mapper = Mapper::new(fmt, &reference, reference.frame_allocator())?;
            sw.time(n, || -> Result<u64> {
                let mut leaves = 0;
                for &va in &vas {
                    let pa = Hpa::new(va.raw() - DIRECT_MAP_BASE);
                    leaves +=
                        mapper.map(AddrRange::from_len(va, FRAME)?, pa, DATA_ATTRS, PageSize::Size4K)?.leaves;
                }
                for &va in &vas {
                    let changes = mapper.unmap(AddrRange::from_len(va, FRAME)?)?;
                    leaves += changes.leaves;
                    mapper.release(changes.freed_tables);
                }
                Ok(leaves)
            })?;
            Ok(())
        },
    )?;
    out.emit(Record::timed(SUITE, case, REFERENCE_MAPPER, m))?;
    Ok(())
}

/// A system with four VMs, one globally non-sensitive page and one secret.
fn enter_exit_system() -> Result<(Asi, InstanceId, Allocation, Allocation)> {
    let mut asi = four_vms(16)?;
    let vm = asi.instances().next().context("an instance")?;
    let shared = asi.alloc(Sensitivity::GlobalNonSensitive, FRAME)?;
    let secret = asi.alloc(Sensitivity::Sensitive, FRAME)?;
    Ok((asi, vm, shared, secret))
}

fn enter_exit(plan: &Plan, rounds: u64, out: &mut Reporter) -> Result<()> {
    let cpu = CpuId(0);
    let (mut ours, vm, shared, secret) = enter_exit_system()?;
    // Warm both spaces' TLB entries and check the round trip reads the right pages without exiting by fault.
    for _ in 0..2 {
        ours.enter(cpu, vm)?;
        let a = ours.access(cpu, shared.va, Access::read())?;
        ensure!(!a.exited && a.pa == shared.pa, "the shared page is mapped in the restricted space");
        ours.exit(cpu, ExitReason::Explicit)?;
        ensure!(ours.access(cpu, secret.va, Access::read())?.pa == secret.pa, "the secret is mapped in full");
    }
    let warm = ours.cpu_stats(cpu)?;

    // The reference walks an identical system's tables (built the same way).
    let (reference, rvm, rshared, rsecret) = enter_exit_system()?;
    ensure!((rshared, rsecret) == (shared, secret), "identical systems allocate identically");
    let (full, restricted) = (reference.full_root(), reference.restricted_root(rvm)?);
    let tables = reference.table_memory();
    let mut tlb = TranslationCache::new(X86Paging::four_level(), 64, 16);
    let mut reference_round = || -> Result<u64> {
        tlb.invalidate_root(full);
        let a = tlb.translate(tables, restricted, shared.va, Access::read())?.addr;
        tlb.invalidate_root(restricted);
        let b = tlb.translate(tables, full, secret.va, Access::read())?.addr;
        Ok(a.raw() ^ b.raw())
    };
    ensure!(reference_round()? == shared.pa.raw() ^ secret.pa.raw(), "the reference reads the same pages");

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            sw.time(rounds, || -> Result<u64> {
                let mut acc = 0;
                for _ in 0..rounds {
                    ours.enter(cpu, vm)?;
                    acc ^= ours.access(cpu, shared.va, Access::read())?.pa.raw();
                    ours.exit(cpu, ExitReason::Explicit)?;
                    acc ^= ours.access(cpu, secret.va, Access::read())?.pa.raw();
                }
                Ok(acc)
            })?;
            Ok(())
        },
        |sw: &mut Stopwatch| {
            sw.time(rounds, || -> Result<u64> {
                let mut acc = 0;
                for _ in 0..rounds {
                    acc ^= reference_round()?;
                }
                Ok(black_box(acc))
            })?;
            Ok(())
        },
    )?;
    let after = ours.cpu_stats(cpu)?;
    ensure!(after.lazy_range_flushes == 0 && after.lazy_full_flushes == 0, "no flush was needed");
    ensure!(after.total_exits() > warm.total_exits(), "memvisor's side ran");
    eprintln!(
        "{SUITE}: enter-exit/pcid — {} switches without a flush (the reference drops a space and walks twice per round)",
        after.clean_switches
    );
    out.emit(Record::timed(SUITE, "enter-exit/pcid", REFERENCE_NO_PCID, m))?;
    Ok(())
}
