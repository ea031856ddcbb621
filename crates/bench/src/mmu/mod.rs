//! Suite `mmu`: memvisor's secondary MMU (`memvisor-mmu`) against the
//! running kernel's KVM on the same host memory, and against a flat-scan
//! bound where the kernel has no userspace trigger.
//!
//! | case | memvisor | peer |
//! |---|---|---|
//! | `fault/slow/4K` | `Mmu::fault` (write) of every page of a 64 MiB slot whose stage 2 is empty: resolve through the memslots, sample the sequence, install under the lock | a KVM guest storing one qword to each page of the same memory, after the slot was deleted and re-created (KVM's mappings gone, host pages resident): one KVM fault per page, guest loop included |
//! | `fault/fast/4K` | `Mmu::fault` (write) of every page again: present, young and dirty — the fast path | the same guest run again: every page already mapped by KVM, no fault at all (the guest's own stores) |
//! | `invalidate/256MiB/{4K,2M}` | `invalidate_range_start` + `end` over a 256 MiB slot fully mapped with 4K (65,536 leaves) or 2M (128 leaves) stage-2 pages: in-progress range, zap, flush, sequence bump | `madvise(MADV_DONTNEED)` of the same 256 MiB after a KVM guest touched every page: KVM's MMU-notifier zap **plus the kernel unmapping and freeing the host pages** (2M: the memory is THP-backed, `MADV_HUGEPAGE`) |
//! | `discard/256MiB/4K` | `NotifiedMapping::discard`: the MMU's zap (as a registered sink) around the same `madvise(MADV_DONTNEED)` of host-resident pages — the same work as the peer | as `invalidate/256MiB/4K` |
//! | `young/test/1GiB`, `young/clear/1GiB` | `Mmu::test_young` / `Mmu::clear_young` of a 1 GiB host range fully mapped with 4K pages (262,144 young leaves): hva → gfn through the memslots, then a walk of the leaves | bound: a flat scan of 262,144 `u64` entries testing (or clearing) the same bit — no table walk, no range mapping |
//!
//! The invalidate and discard cases run one 256 MiB operation per round
//! (times are per operation). Each round prepares its side untimed: the
//! MMU faults the whole slot in (and, for `discard`, the host pages are
//! touched so `madvise` frees the same amount); the KVM guest touches every
//! page (so KVM maps them and the host allocates them). KVM's figure in
//! `invalidate/*` therefore includes freeing 256 MiB of pages, which
//! memvisor's pure zap does not do — `discard/256MiB/4K` is the
//! like-for-like comparison. The kernel here is the PVM software KVM
//! (shadow paging), so its costs are not those of hardware-assisted KVM.
//!
//! Young cases: Linux offers userspace no way to call KVM's
//! `test_young`/`clear_young` (idle page tracking is not built into this
//! kernel), hence the bound. Without `/dev/kvm` the KVM-peered cases are
//! skipped with a note on stderr. `--quick` runs the same sizes with fewer
//! rounds.

mod kvm_peer;

use std::hint::black_box;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use memvisor_hostmem::{MappedRegion, Mapping, NotifiedMapping, Notifier};
use memvisor_memslots::{MemslotRequest, Memslots, NoFiles, VmId};
use memvisor_mmu::{Config as MmuConfig, FaultAccess, FaultOutcome, InvalidationSink, Mmu};
use memvisor_types::{AddrRange, Address, Gpa, Hva, PageSize};

use self::kvm_peer::{Toucher, anon_huge_kib, want_thp};
use crate::Config;
use crate::harness::{Plan, Stopwatch, compare};
use crate::report::{Record, Reporter};

const SUITE: &str = "mmu";
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Guest-physical base of every benchmarked slot (2 MiB-aligned, below the
/// test guest's 4 GiB identity map).
const GPA: Gpa = Gpa::new(0x4000_0000);
const INVALIDATE_BYTES: u64 = 256 * MIB;
const FAULT_BYTES: u64 = 64 * MIB;
const YOUNG_BYTES: u64 = 1 << 30;
/// A host-virtual range nothing maps: the young cases' slot (the MMU never
/// dereferences what it maps to).
const YOUNG_HVA: Hva = Hva::new(0x7e00_0000_0000);
const YOUNG: u64 = 1 << 8;

/// Runs the suite.
pub(crate) fn run(config: &Config, out: &mut Reporter) -> Result<()> {
    let plan = if config.quick { Plan::new(1, 5) } else { Plan::new(1, 11) };
    let heavy = if config.quick { Plan::new(0, 5) } else { Plan::new(1, 7) };
    match KvmSetup::new(INVALIDATE_BYTES, false)? {
        Some(mut setup) => {
            faults(&plan, &mut setup, out)?;
            invalidate(&heavy, &mut setup, PageSize::Size4K, out)?;
            discard(&heavy, &mut setup, out)?;
        }
        None => eprintln!("{SUITE}: fault/*, invalidate/*/4K, discard/* skipped: /dev/kvm is absent"),
    }
    match KvmSetup::new(INVALIDATE_BYTES, true)? {
        Some(mut setup) => invalidate(&heavy, &mut setup, PageSize::Size2M, out)?,
        None => eprintln!("{SUITE}: invalidate/*/2M skipped: /dev/kvm is absent"),
    }
    young(&plan, out)
}

fn size_name(bytes: u64) -> String {
    if bytes >= 1 << 30 { format!("{}GiB", bytes >> 30) } else { format!("{}MiB", bytes / MIB) }
}

/// One MMU over one slot of `len` bytes at [`GPA`] backed by `hva`.
fn mmu_over(hva: Hva, len: u64, max_page: PageSize) -> Result<Arc<Mmu>> {
    let config = MmuConfig { max_page, ..MmuConfig::default() };
    let mmu = Mmu::new(Memslots::new(VmId(1)), config).context("creating the MMU")?;
    mmu.set_memory_region(&MemslotRequest::new(0, GPA, len, hva), &NoFiles)
        .context("adding the MMU's slot")?;
    Ok(Arc::new(mmu))
}

/// Faults (writes) every `step` of the first `len` bytes; returns how many
/// faults the fast path served, and checks every fault mapped `size` pages.
fn fault_all(mmu: &Mmu, len: u64, step: PageSize) -> Result<u64> {
    let mut fast = 0;
    for off in (0..len).step_by(usize::try_from(step.bytes())?) {
        let gpa = GPA.try_add(off)?;
        match mmu.fault(gpa, FaultAccess::write())? {
            FaultOutcome::Mapped(m) => {
                ensure!(m.size == step, "{gpa}: mapped a {} page, expected {step}", m.size);
                fast += u64::from(m.fast);
            }
            other => anyhow::bail!("{gpa}: fault ended in {other:?}"),
        }
    }
    Ok(fast)
}

fn hva_range(hva: Hva, len: u64) -> Result<AddrRange<Hva>> {
    Ok(AddrRange::from_len(hva, len)?)
}

/// The host memory of the KVM-peered cases, a KVM VM over it, and the
/// notifier its [`NotifiedMapping`] reports to.
struct KvmSetup {
    notifier: Arc<Notifier>,
    memory: Arc<NotifiedMapping>,
    toucher: Toucher,
    len: u64,
    thp: bool,
}

impl KvmSetup {
    fn new(len: u64, thp: bool) -> Result<Option<Self>> {
        let notifier = Arc::new(Notifier::new());
        let mapping = Mapping::anonymous(len)?;
        // Large stage-2 pages need a 2 MiB-aligned host address; Linux
        // aligns anonymous mappings of whole 2 MiB multiples (6.7+).
        ensure!(
            mapping.hva().is_aligned(PageSize::Size2M),
            "the host placed the {len:#x}-byte mapping at {} (not 2 MiB-aligned)",
            mapping.hva()
        );
        let memory = Arc::new(NotifiedMapping::new(mapping, Arc::clone(&notifier))?);
        if thp {
            want_thp(&*memory)?;
        }
        let region: Arc<dyn MappedRegion> = Arc::clone(&memory) as _;
        let Some(toucher) = Toucher::new(region, GPA)? else { return Ok(None) };
        Ok(Some(Self { notifier, memory, toucher, len, thp }))
    }
}

/// Touches the first `len` bytes of `memory` page by page from the host
/// (allocating the pages), without KVM.
fn populate(memory: &NotifiedMapping, len: u64) -> Result<()> {
    for off in (0..len).step_by(usize::try_from(PAGE)?) {
        memory.write_at(off, &[1])?;
    }
    Ok(())
}

fn faults(plan: &Plan, setup: &mut KvmSetup, out: &mut Reporter) -> Result<()> {
    let pages = FAULT_BYTES / PAGE;
    let mmu = mmu_over(setup.memory.hva(), FAULT_BYTES, PageSize::Size4K)?;
    let whole = hva_range(setup.memory.hva(), FAULT_BYTES)?;
    populate(&setup.memory, FAULT_BYTES)?;
    let name = size_name(FAULT_BYTES);

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            mmu.invalidate_range_start(whole);
            mmu.invalidate_range_end(whole);
            let fast = sw.time(pages, || fault_all(&mmu, FAULT_BYTES, PageSize::Size4K))?;
            ensure!(fast == 0, "{fast} faults took the fast path on an empty table");
            Ok(())
        },
        |sw: &mut Stopwatch| {
            setup.toucher.zap_by_slot_toggle()?;
            sw.time(pages, || setup.toucher.touch(pages))
        },
    )?;
    let peer = format!("KVM guest first touch of host-resident pages ({name}, PVM shadow fault per page)");
    out.emit(Record::timed(SUITE, "fault/slow/4K", peer, m))?;

    fault_all(&mmu, FAULT_BYTES, PageSize::Size4K)?;
    setup.toucher.touch(pages)?;
    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            let fast = sw.time(pages, || fault_all(&mmu, FAULT_BYTES, PageSize::Size4K))?;
            ensure!(fast == pages, "{} of {pages} faults missed the fast path", pages - fast);
            Ok(())
        },
        |sw: &mut Stopwatch| sw.time(pages, || setup.toucher.touch(pages)),
    )?;
    let peer = format!("KVM guest re-touch of mapped pages ({name}, no fault: the guest's stores)");
    out.emit(Record::timed(SUITE, "fault/fast/4K", peer, m))
}

fn invalidate(plan: &Plan, setup: &mut KvmSetup, page: PageSize, out: &mut Reporter) -> Result<()> {
    let len = setup.len;
    let mmu = mmu_over(setup.memory.hva(), len, page)?;
    let whole = hva_range(setup.memory.hva(), len)?;
    let pages = len / PAGE;
    let mut huge_kib = 0;

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            fault_all(&mmu, len, page)?;
            sw.time(1, || {
                mmu.invalidate_range_start(whole);
                mmu.invalidate_range_end(whole);
            });
            ensure!(mmu.lookup(0, GPA).is_none(), "the zap left {GPA} mapped");
            Ok(())
        },
        |sw: &mut Stopwatch| {
            setup.toucher.touch(pages)?;
            huge_kib = huge_kib.max(anon_huge_kib());
            sw.time(1, || setup.memory.mapping().discard(0, len))?;
            Ok(())
        },
    )?;
    let backing =
        if setup.thp { format!("THP-backed, {} MiB in huge pages", huge_kib / 1024) } else { "4K".into() };
    let peer = format!(
        "KVM: madvise(DONTNEED) of {} guest-touched ({backing}) = MMU-notifier zap + freeing the pages",
        size_name(len)
    );
    out.emit(Record::timed(SUITE, format!("invalidate/{}/{page}", size_name(len)), peer, m))
}

fn discard(plan: &Plan, setup: &mut KvmSetup, out: &mut Reporter) -> Result<()> {
    let len = setup.len;
    let mmu = mmu_over(setup.memory.hva(), len, PageSize::Size4K)?;
    setup.notifier.register(Arc::downgrade(&mmu) as _);
    let pages = len / PAGE;

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            populate(&setup.memory, len)?;
            fault_all(&mmu, len, PageSize::Size4K)?;
            sw.time(1, || setup.memory.discard(0, len))?;
            ensure!(mmu.lookup(0, GPA).is_none(), "the discard left {GPA} mapped");
            Ok(())
        },
        |sw: &mut Stopwatch| {
            setup.toucher.touch(pages)?;
            sw.time(1, || setup.memory.mapping().discard(0, len))?;
            Ok(())
        },
    )?;
    let peer = format!(
        "KVM: madvise(DONTNEED) of {} guest-touched = MMU-notifier zap + freeing the pages",
        size_name(len)
    );
    out.emit(Record::timed(SUITE, format!("discard/{}/4K", size_name(len)), peer, m))
}

fn young(plan: &Plan, out: &mut Reporter) -> Result<()> {
    let len = YOUNG_BYTES;
    let leaves = usize::try_from(len / PAGE)?;
    let mmu = mmu_over(YOUNG_HVA, len, PageSize::Size4K)?;
    let range = hva_range(YOUNG_HVA, len)?;
    fault_all(&mmu, len, PageSize::Size4K)?;
    ensure!(mmu.test_young(range), "freshly faulted entries are not young");
    let mut flat: Vec<u64> = (0..len / PAGE).map(|i| (i << 12) | YOUNG | 0x3).collect();
    let peer = format!("bound: flat scan of {leaves} u64 leaves (no walk, no hva->gfn)");

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            let young = sw.time(1, || mmu.test_young(black_box(range)));
            ensure!(young, "test_young found nothing young");
            Ok(())
        },
        |sw: &mut Stopwatch| {
            let young = sw.time(1, || black_box(&flat).iter().fold(0, |acc, e| acc | (e & YOUNG)) != 0);
            ensure!(young, "the flat scan found nothing young");
            Ok(())
        },
    )?;
    out.emit(Record::timed(SUITE, format!("young/test/{}", size_name(len)), peer.clone(), m))?;

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            // Accessing every page again makes it young (fast path).
            fault_all(&mmu, len, PageSize::Size4K)?;
            let young = sw.time(1, || mmu.clear_young(black_box(range)));
            ensure!(young && !mmu.test_young(range), "clear_young left young entries");
            Ok(())
        },
        |sw: &mut Stopwatch| {
            flat.iter_mut().for_each(|e| *e |= YOUNG);
            let young = sw.time(1, || {
                let mut any = 0;
                for e in black_box(&mut flat).iter_mut() {
                    any |= *e & YOUNG;
                    *e &= !YOUNG;
                }
                any != 0
            });
            ensure!(young, "the flat scan found nothing young");
            Ok(())
        },
    )?;
    out.emit(Record::timed(SUITE, format!("young/clear/{}", size_name(len)), peer, m))
}
