//! Timing of the IOTLB-hit path (ignored: run by hand with `--ignored
//! --nocapture`; no assertion on wall-clock time).

mod translate_support;

use std::time::Instant;

use memvisor_types::{Address, PageSize};
use memvisor_vtd::Config;
use memvisor_vtd::translate::{DmaRequest, Dmar};
use translate_support::*;

#[test]
#[ignore = "timing, run by hand"]
fn iotlb_hit_path_timing() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0, 0x100_0000, 0x1_0000_0000, rw(), PageSize::Size4K);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().raw(), 0, 2, 1));
    let mut d = Dmar::new(&Config::default());
    for page in 0..4096u64 {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, page << 12)).unwrap();
    }
    let n = 10_000_000u64;
    // Act
    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..n {
        let addr = ((i * 7919) & 0xfff) << 12;
        sum =
            sum.wrapping_add(d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, addr)).unwrap().output);
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    let start = Instant::now();
    for i in 0..n {
        let addr = (i & 0x7) << 12;
        sum =
            sum.wrapping_add(d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, addr)).unwrap().output);
    }
    let hot = start.elapsed().as_nanos() as f64 / n as f64;
    // Assert
    println!(
        "IOTLB hit: {ns:.1} ns/translation over 4096 pages, {hot:.1} over 8 pages (sum {sum:#x}), stats {:?}",
        d.stats()
    );
    assert!(sum != 0);
}

#[cfg(feature = "iommu")]
#[test]
#[ignore = "timing, run by hand"]
fn vm_memory_iotlb_lookup_timing() {
    use vm_memory::iommu::Iotlb;
    use vm_memory::{GuestAddress, Permissions};
    for scattered in [false, true] {
        // Arrange
        let mut tlb = Iotlb::new();
        for page in 0..4096u64 {
            let out = if scattered { (page * 7 % 4096) << 12 } else { page << 12 };
            tlb.set_mapping(
                GuestAddress(page << 12),
                GuestAddress(0x1_0000_0000 + out),
                4096,
                Permissions::ReadWrite,
            )
            .unwrap();
        }
        let n = 2_000_000u64;
        // Act
        let start = Instant::now();
        let mut sum = 0u64;
        for i in 0..n {
            let addr = ((i * 7919) & 0xfff) << 12;
            let mut it = Iotlb::lookup(&tlb, GuestAddress(addr), 8, Permissions::Read).unwrap();
            sum = sum.wrapping_add(it.next().unwrap().base.0);
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        // Assert
        println!("vm-memory Iotlb (scattered {scattered}): {ns:.1} ns/lookup (sum {sum:#x})");
        assert!(sum != 0);
    }
}

#[test]
#[ignore = "timing, run by hand"]
fn first_stage_iotlb_hit_path_timing() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0, 0x100_0000, 0x1_0000_0000, memvisor_paging::X86Attrs::user_rwx(), PageSize::Size4K);
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 5, Pe { pgtt: 1, fsptptr: m.root().raw(), ..Pe::default() }.raw());
    let mut d = Dmar::new(&Config { mode: memvisor_vtd::Mode::ScalableNested, ..Config::default() });
    for page in 0..4096u64 {
        d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, page << 12).with_pasid(5)).unwrap();
    }
    let n = 10_000_000u64;
    // Act
    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..n {
        let addr = ((i * 7919) & 0xfff) << 12;
        let req = DmaRequest::read(DEV, addr).with_pasid(5);
        sum = sum.wrapping_add(d.translate(&mem, &scalable_root(), &req).unwrap().output);
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    // Assert
    println!("first-stage IOTLB hit: {ns:.1} ns/translation (sum {sum:#x}), hits {}", d.stats().iotlb_hits);
    assert!(sum != 0);
}
