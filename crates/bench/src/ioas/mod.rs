//! Suite `ioas`: `memvisor-ioas` (iommufd semantics) against rust-vmm peers
//! where one does the same work in-process, and against named references
//! where none does.
//!
//! | case | memvisor | peer or reference |
//! |---|---|---|
//! | `map-unmap/1GiB-4k` | `Iommufd::ioas_map` (fixed IOVA) of 1 GiB then `ioas_unmap`, one device attached (pin + VT-d second-stage table in 4K pages) | reference: memvisor-paging `Mapper<SecondStage>` map + unmap of the same range alone (the table work without the IOAS) |
//! | `map-unmap/65536-areas-16k` | 65,536 `ioas_map` of 16 KiB each then 65,536 `ioas_unmap`, one device attached | reference: the same 65,536 `Mapper<SecondStage>` map + unmap calls alone |
//! | `pin-unpin/1GiB` | `access_pin_pages` + `access_unpin_pages` of 1 GiB through an access | reference: the kernel's `mlock` + `munlock` of the same 1 GiB (page pinning in the real kernel; no in-process peer pins IOAS pages) |
//! | `iova-alloc/10000-areas` | 10,000 `ioas_map` with automatic IOVA (Linux alignment rules) on an IOAS without devices | rust-vmm `vm-allocator` 0.1.4 `AddressAllocator::allocate` (first match) with the same sizes and alignments |
//! | `iotlb-hit/translate-64B` | `Iommufd::translate` of 64 bytes in a mapped page, IOTLB hit | vm-memory 0.18 `Iotlb::lookup` of the same range over the same mappings |
//!
//! Times are per page (map-unmap 1 GiB, pin), per area (65,536 areas), per
//! allocation, and per translation. Every case checks its results before
//! timing: memvisor's DMA translations through the device equal the host
//! addresses mapped, the reference table translates alike, both allocators
//! return aligned, non-overlapping ranges inside the same span (whether they
//! pick the same IOVAs is printed on stderr), and both IOTLBs answer the same
//! host address. The map-unmap cases map host memory at an address 4 KiB
//! past a 2 MiB boundary onto a 2 MiB-aligned IOVA, so both sides build 4K
//! leaves. `--quick` uses 64 MiB, 4,096 areas, 2,000 allocations and says so
//! in the case names.

mod peer;

use std::hint::black_box;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, ensure};
use memvisor_hostmem::{MappedRegion, Mapping};
use memvisor_ioas::{AccessOps, Backing, DmaAccess, Id, Iommufd, MapFlags};
use memvisor_paging::{Arena, ArenaFrames, Mapper, SecondStage, SecondStageAttrs, Walker};
use memvisor_types::{AddrRange, Address, Hpa, Hva, Iova, PageSize};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::Config;
use crate::harness::{Plan, Stopwatch, compare};
use crate::report::{Record, Reporter};
use crate::rng::SplitMix64;

const SUITE: &str = "ioas";
const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
/// IOVA of the map-unmap and pin cases (2 MiB aligned).
const IOVA_BASE: u64 = 0x4000_0000;
/// Physical base of the reference table's frames (any address: only the arena reads it).
const ARENA_BASE: u64 = 0x10_0000;
const REF_TABLE: &str = "reference: memvisor-paging Mapper<SecondStage> map + unmap alone";

/// Runs the suite.
pub(crate) fn run(config: &Config, out: &mut Reporter) -> Result<()> {
    let heavy = Plan::new(1, 5);
    let plan = if config.quick { Plan::new(1, 5) } else { Plan::new(2, 11) };
    let (label, bytes) = if config.quick { ("64MiB", 64 << 20) } else { ("1GiB", 1 << 30) };
    map_unmap_big(&heavy, label, bytes, out)?;
    let areas: u64 = if config.quick { 4096 } else { 65_536 };
    map_unmap_areas(&heavy, areas, out)?;
    pin_unpin(&heavy, label, bytes, out)?;
    let allocs = if config.quick { 2_000 } else { 10_000 };
    iova_alloc(&heavy, allocs, out)?;
    iotlb_hit(&plan, if config.quick { 16 } else { 64 }, out)?;
    Ok(())
}

/// Anonymous host memory of `bytes`, and the offset in it of an address 4 KiB
/// past a 2 MiB boundary (so that nothing maps it with large pages onto a
/// 2 MiB-aligned IOVA). The memory is never touched by the map cases.
fn host_memory(bytes: u64) -> Result<(Arc<dyn MappedRegion>, u64)> {
    let mapping = Mapping::anonymous(bytes + 2 * HUGE).context("host memory for the ioas suite")?;
    let hva = mapping.hva().raw();
    let offset = hva.next_multiple_of(HUGE) - hva + PAGE;
    Ok((Arc::new(mapping), offset))
}

/// A context with one IOAS and one device attached to it: (context, IOAS, device).
fn attached_context() -> Result<(Iommufd, Id, Id)> {
    let ictx = Iommufd::new();
    let ioas = ictx.ioas_alloc();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 0, ioas).context("attach the bench device")?;
    Ok((ictx, ioas, dev))
}

/// The table a HWPT paging keeps, alone: a 4-level second stage in an arena.
struct RefTable {
    arena: Arena<Hpa>,
}

impl RefTable {
    /// Room for the tables of `bytes` of 4K mappings.
    fn new(bytes: u64) -> Result<Self> {
        let frames = 8 + usize::try_from(bytes.div_ceil(HUGE))?;
        Ok(Self { arena: Arena::new(Hpa::new(ARENA_BASE), frames) })
    }

    fn mapper(&self) -> Result<Mapper<SecondStage, &Arena<Hpa>, ArenaFrames<Hpa>>> {
        self.arena.clear();
        Ok(Mapper::new(SecondStage::four_level(), &self.arena, self.arena.frame_allocator())?)
    }
}

fn map_ref(
    mapper: &mut Mapper<SecondStage, &Arena<Hpa>, ArenaFrames<Hpa>>,
    iova: u64,
    hva: u64,
    len: u64,
) -> Result<()> {
    let range = AddrRange::from_len(Iova::new(iova), len)?;
    mapper.map(range, Hpa::new(hva), SecondStageAttrs::rwx(), PageSize::Size1G)?;
    Ok(())
}

fn unmap_ref(
    mapper: &mut Mapper<SecondStage, &Arena<Hpa>, ArenaFrames<Hpa>>,
    iova: u64,
    len: u64,
) -> Result<()> {
    let range = AddrRange::from_len(Iova::new(iova), len)?;
    let changes = mapper.unmap(range)?;
    mapper.release(changes.freed_tables);
    Ok(())
}

/// Checks that the device's DMA at `iova` reaches `hva` (one 8-byte read).
fn check_dma(ictx: &Iommufd, dev: Id, iova: u64, hva: u64) -> Result<()> {
    let segs =
        ictx.translate(dev, 0, iova, 8, DmaAccess::Read).map_err(|f| anyhow!("DMA at {iova:#x}: {f:?}"))?;
    let got = segs.first().map(|s| s.hva.raw());
    ensure!(got == Some(hva), "DMA at {iova:#x} reaches {got:x?}, expected {hva:#x}");
    Ok(())
}

fn map_unmap_big(plan: &Plan, label: &str, bytes: u64, out: &mut Reporter) -> Result<()> {
    let pages = bytes / PAGE;
    let (region, offset) = host_memory(bytes)?;
    let hva = region.hva().raw() + offset;
    let backing = Backing::Region { region: region.clone(), offset };
    let (ictx, ioas, dev) = attached_context()?;
    let reference = RefTable::new(bytes)?;

    // Verify once: every 257th page (and the last) translates to its host page on both sides.
    ictx.ioas_map(ioas, MapFlags::rw().fixed(), IOVA_BASE, backing.clone(), bytes)?;
    let mut mapper = reference.mapper()?;
    map_ref(&mut mapper, IOVA_BASE, hva, bytes)?;
    for page in (0..pages).step_by(257).chain([pages - 1]) {
        check_dma(&ictx, dev, IOVA_BASE + page * PAGE, hva + page * PAGE)?;
        let walked = SecondStage::four_level()
            .lookup(&reference.arena, mapper.root(), Iova::new(IOVA_BASE + page * PAGE))?
            .addr
            .raw();
        ensure!(walked == hva + page * PAGE, "the reference table maps page {page} to {walked:#x}");
    }
    ensure!(ictx.ioas_unmap(ioas, IOVA_BASE, bytes)? == bytes, "memvisor unmapped less than it mapped");
    drop(mapper);

    let m = compare(
        plan,
        |sw| {
            sw.time(pages, || -> Result<u64> {
                ictx.ioas_map(ioas, MapFlags::rw().fixed(), IOVA_BASE, backing.clone(), bytes)?;
                Ok(ictx.ioas_unmap(ioas, IOVA_BASE, bytes)?)
            })?;
            Ok(())
        },
        |sw| {
            let mut mapper = reference.mapper()?;
            sw.time(pages, || -> Result<()> {
                map_ref(&mut mapper, IOVA_BASE, hva, bytes)?;
                unmap_ref(&mut mapper, IOVA_BASE, bytes)
            })?;
            Ok(())
        },
    )?;
    out.emit(Record::timed(SUITE, format!("map-unmap/{label}-4k"), REF_TABLE, m))?;
    Ok(())
}

fn map_unmap_areas(plan: &Plan, areas: u64, out: &mut Reporter) -> Result<()> {
    let len = 4 * PAGE;
    let bytes = areas * len;
    let (region, offset) = host_memory(bytes)?;
    let hva = region.hva().raw() + offset;
    let backings: Vec<Backing> =
        (0..areas).map(|i| Backing::Region { region: region.clone(), offset: offset + i * len }).collect();
    let (ictx, ioas, dev) = attached_context()?;
    let reference = RefTable::new(bytes)?;

    // Verify once: the first page of every 61st area.
    for (i, b) in (0..areas).zip(&backings) {
        ictx.ioas_map(ioas, MapFlags::rw().fixed(), IOVA_BASE + i * len, b.clone(), len)?;
    }
    let mut mapper = reference.mapper()?;
    for i in 0..areas {
        map_ref(&mut mapper, IOVA_BASE + i * len, hva + i * len, len)?;
    }
    for i in (0..areas).step_by(61) {
        check_dma(&ictx, dev, IOVA_BASE + i * len, hva + i * len)?;
        let walked = SecondStage::four_level()
            .lookup(&reference.arena, mapper.root(), Iova::new(IOVA_BASE + i * len))?
            .addr
            .raw();
        ensure!(walked == hva + i * len, "the reference table maps area {i} to {walked:#x}");
    }
    ensure!(ictx.ioas_unmap(ioas, 0, u64::MAX)? == bytes, "memvisor unmapped less than it mapped");
    drop(mapper);

    let label = if areas == 65_536 { "65536".to_string() } else { format!("{areas}") };
    let m = compare(
        plan,
        |sw| {
            sw.time(areas, || -> Result<()> {
                for (i, b) in (0..areas).zip(&backings) {
                    ictx.ioas_map(ioas, MapFlags::rw().fixed(), IOVA_BASE + i * len, b.clone(), len)?;
                }
                for i in 0..areas {
                    ictx.ioas_unmap(ioas, IOVA_BASE + i * len, len)?;
                }
                Ok(())
            })?;
            Ok(())
        },
        |sw| {
            let mut mapper = reference.mapper()?;
            sw.time(areas, || -> Result<()> {
                for i in 0..areas {
                    map_ref(&mut mapper, IOVA_BASE + i * len, hva + i * len, len)?;
                }
                for i in 0..areas {
                    unmap_ref(&mut mapper, IOVA_BASE + i * len, len)?;
                }
                Ok(())
            })?;
            Ok(())
        },
    )?;
    out.emit(Record::timed(SUITE, format!("map-unmap/{label}-areas-16k"), REF_TABLE, m))?;
    Ok(())
}

/// An access whose pins the bench releases itself (no unmap happens while pinned).
#[derive(Debug)]
struct BenchAccess;

impl AccessOps for BenchAccess {
    fn unmap(&self, _ictx: &Iommufd, _access: Id, _iova: u64, _length: u64) {}
}

fn pin_unpin(plan: &Plan, label: &str, bytes: u64, out: &mut Reporter) -> Result<()> {
    let pages = bytes / PAGE;
    let (region, offset) = host_memory(bytes)?;
    let hva = region.hva().raw() + offset;
    let ictx = Iommufd::new();
    let ioas = ictx.ioas_alloc();
    ictx.ioas_map(
        ioas,
        MapFlags::rw().fixed(),
        IOVA_BASE,
        Backing::Region { region: region.clone(), offset },
        bytes,
    )?;
    let access = ictx.access_create(ioas, Arc::new(BenchAccess))?;

    // Verify once: the pin returns every host page in order, and accounts them.
    let hvas = ictx.access_pin_pages(access, IOVA_BASE, bytes, true)?;
    ensure!(hvas.len() == usize::try_from(pages)?, "pinned {} pages, expected {pages}", hvas.len());
    for (i, h) in (0..pages).zip(&hvas) {
        ensure!(h.raw() == hva + i * PAGE, "pinned page {i} is {h}, expected {:#x}", hva + i * PAGE);
    }
    ensure!(ictx.locked_pages() == pages, "{} pages locked, expected {pages}", ictx.locked_pages());
    ictx.access_unpin_pages(access, IOVA_BASE, bytes);
    ensure!(ictx.locked_pages() == 0, "pages still locked after unpin");
    let host = peer::Lockable::new(Hva::new(hva), bytes)?;

    let m = compare(
        plan,
        |sw| {
            sw.time(pages, || -> Result<usize> {
                let n = ictx.access_pin_pages(access, IOVA_BASE, bytes, true)?.len();
                ictx.access_unpin_pages(access, IOVA_BASE, bytes);
                Ok(n)
            })?;
            Ok(())
        },
        |sw| {
            sw.time(pages, || -> Result<()> {
                host.lock()?;
                host.unlock()
            })?;
            Ok(())
        },
    )?;
    out.emit(Record::timed(
        SUITE,
        format!("pin-unpin/{label}"),
        "reference: Linux mlock + munlock of the same memory (kernel page pinning)",
        m,
    ))?;
    Ok(())
}

/// Linux's automatic IOVA alignment for a map of `length` bytes at `addr`.
fn linux_alignment(addr: u64, length: u64) -> u64 {
    let pow = length.next_power_of_two();
    let align = if addr == 0 { pow } else { pow.min(1 << addr.trailing_zeros()) };
    align.min(HUGE)
}

fn iova_alloc(plan: &Plan, allocs: usize, out: &mut Reporter) -> Result<()> {
    let mut rng = SplitMix64::new(0x696f_7661);
    // Sizes of 1..=16 pages; the host address is 2 MiB aligned, so the
    // alignment is the size rounded up to a power of two.
    let addr = 0x7f00_0000_0000u64;
    let sizes: Vec<(u64, u64)> = (0..allocs)
        .map(|_| {
            let len = (1 + rng.below(16)) * PAGE;
            (len, linux_alignment(addr, len))
        })
        .collect();
    // The span iommufd allocates from without allowed ranges.
    let (span_start, span_last) = (PAGE, u64::MAX - PAGE);
    let ictx = Iommufd::new();
    let ioas = ictx.ioas_alloc();
    let ours_once = alloc_ours(&ictx, ioas, addr, &sizes)?;
    ictx.ioas_unmap(ioas, 0, u64::MAX)?;
    let peer_once = alloc_peer(span_start, span_last, &sizes)?;
    for (name, iovas) in [("memvisor", &ours_once), ("vm-allocator", &peer_once)] {
        let mut spans: Vec<(u64, u64)> =
            iovas.iter().zip(&sizes).map(|(&i, &(len, _))| (i, i + len - 1)).collect();
        for (&(s, _), &(_, align)) in spans.iter().zip(&sizes) {
            ensure!(
                s % align == 0 && s >= span_start,
                "{name} allocated {s:#x}, not aligned to {align:#x} in the span"
            );
        }
        spans.sort_unstable();
        ensure!(spans.windows(2).all(|w| w[0].1 < w[1].0), "{name} allocated overlapping ranges");
    }
    let same = ours_once.iter().zip(&peer_once).filter(|(a, b)| a == b).count();
    eprintln!("{SUITE}: iova-alloc — {same} of {allocs} IOVAs identical on both sides (both first-fit)");

    let n = u64::try_from(allocs)?;
    let m = compare(
        plan,
        |sw| {
            sw.time(n, || alloc_ours(&ictx, ioas, addr, &sizes))?;
            ictx.ioas_unmap(ioas, 0, u64::MAX)?;
            Ok(())
        },
        |sw| {
            let mut allocator = AddressAllocator::new(span_start, span_last - span_start + 1)
                .map_err(|e| anyhow!("vm-allocator: {e}"))?;
            sw.time(n, || -> Result<u64> {
                let mut acc = 0;
                for &(len, align) in &sizes {
                    let r = allocator.allocate(len, align, AllocPolicy::FirstMatch);
                    acc ^= r.map_err(|e| anyhow!("vm-allocator: {e}"))?.start();
                }
                Ok(acc)
            })?;
            Ok(())
        },
    )?;
    out.emit(Record::timed(
        SUITE,
        format!("iova-alloc/{allocs}-areas"),
        "vm-allocator 0.1.4 AddressAllocator::allocate (FirstMatch)",
        m,
    ))?;
    Ok(())
}

fn alloc_ours(ictx: &Iommufd, ioas: Id, addr: u64, sizes: &[(u64, u64)]) -> Result<Vec<u64>> {
    sizes
        .iter()
        .map(|&(len, _)| Ok(ictx.ioas_map(ioas, MapFlags::rw(), 0, Backing::User(Hva::new(addr)), len)?))
        .collect()
}

fn alloc_peer(start: u64, last: u64, sizes: &[(u64, u64)]) -> Result<Vec<u64>> {
    let mut allocator =
        AddressAllocator::new(start, last - start + 1).map_err(|e| anyhow!("vm-allocator: {e}"))?;
    sizes
        .iter()
        .map(|&(len, align)| {
            let r = allocator.allocate(len, align, AllocPolicy::FirstMatch);
            Ok(r.map_err(|e| anyhow!("vm-allocator: {e}"))?.start())
        })
        .collect()
}

fn iotlb_hit(plan: &Plan, passes: u64, out: &mut Reporter) -> Result<()> {
    // 1024 random pages of a 64 MiB host range, at random page-aligned IOVAs.
    const PAGES: u64 = 1024;
    const LEN: u64 = 64;
    let host_bytes = 64 << 20;
    let (region, offset) = host_memory(host_bytes)?;
    let hva = region.hva().raw() + offset;
    let (ictx, ioas, dev) = attached_context()?;
    let mut iotlb = Iotlb::new();
    let mut rng = SplitMix64::new(0x0069_6f74_6c62);
    let mut host_pages: Vec<u64> = (0..host_bytes / PAGE - 1).collect();
    rng.shuffle(&mut host_pages);
    let mut iova_pages: Vec<u64> = (0..1 << 20).collect();
    rng.shuffle(&mut iova_pages);
    let (mut inputs, mut expected) = (Vec::new(), Vec::new());
    for (&hp, &ip) in host_pages.iter().zip(&iova_pages).take(usize::try_from(PAGES)?) {
        let (iova, off) = (IOVA_BASE + ip * PAGE, offset + hp * PAGE);
        ictx.ioas_map(
            ioas,
            MapFlags::rw().fixed(),
            iova,
            Backing::Region { region: region.clone(), offset: off },
            PAGE,
        )?;
        let target = hva - offset + off;
        iotlb
            .set_mapping(GuestAddress(iova), GuestAddress(target), 4096, Permissions::ReadWrite)
            .map_err(|e| anyhow!("vm-memory Iotlb: {e}"))?;
        let within = rng.below(PAGE - LEN);
        inputs.push(iova + within);
        expected.push(target + within);
    }
    // Warm memvisor's IOTLB and check both sides.
    for (&a, &want) in inputs.iter().zip(&expected) {
        check_dma(&ictx, dev, a, want)?;
        let got = Iotlb::lookup(&iotlb, GuestAddress(a), 64, Permissions::Read)
            .map_err(|e| anyhow!("Iotlb miss at {a:#x}: {e:?}"))?
            .next()
            .map(|r| r.base.0);
        ensure!(got == Some(want), "Iotlb translated {a:#x} to {got:x?}, expected {want:#x}");
    }
    ensure!(ictx.iotlb_entries() >= inputs.len(), "memvisor's IOTLB holds fewer entries than pages");

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            sw.time_passes(passes, &inputs, |&a| {
                let r = ictx.translate(dev, 0, black_box(a), LEN, DmaAccess::Read);
                r.ok().and_then(|s| s.first().map(|s| s.hva.raw())).unwrap_or(0)
            });
            Ok(())
        },
        |sw: &mut Stopwatch| {
            sw.time_passes(passes, &inputs, |&a| {
                let r = Iotlb::lookup(&iotlb, GuestAddress(black_box(a)), 64, Permissions::Read);
                r.ok().and_then(|mut it| it.next()).map_or(0, |m| m.base.0)
            });
            Ok(())
        },
    )?;
    out.emit(Record::timed(
        SUITE,
        "iotlb-hit/translate-64B",
        "vm-memory 0.18 Iotlb::lookup (feature iommu)",
        m,
    ))?;
    Ok(())
}
