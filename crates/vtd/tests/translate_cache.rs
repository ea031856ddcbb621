//! The caches behave as hardware's: a guest that invalidates correctly
//! always sees fresh translations; one that does not keeps seeing stale
//! ones; each invalidation drops exactly its scope.

mod translate_support;

use memvisor_paging::format::x86;
use memvisor_paging::{Walker, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gva, Iova, PageSize};
use memvisor_vtd::tables::reason;
use memvisor_vtd::translate::{DmaRequest, Dmar};
use memvisor_vtd::{
    Config, ContextInval, Invalidation, IotlbInval, Mode, PasidCacheInval, PiotlbInval, SourceId, TestMemory,
};
use translate_support::*;

const DEV2: SourceId = SourceId::new(0, 4, 0);

fn legacy() -> Dmar {
    Dmar::new(&Config::default())
}

fn page_inval(did: u16, addr: u64, am: u8) -> Invalidation {
    Invalidation::Iotlb(IotlbInval::Page { did, addr, am, ih: false })
}

/// DEV (DID 1) and DEV2 (DID 2) share one second-stage table mapping 0x1000 and 0x2000.
fn two_domains(mem: &TestMemory) -> SsMapper<'_> {
    let mut m = ss_mapper(mem, 4);
    map_ss(&mut m, 0x1000, 0x2000, 0x8000, rw(), PageSize::Size4K);
    set_legacy_context(mem, DEV, legacy_ctx(m.root().raw(), 0, 2, 1));
    set_legacy_context(mem, DEV2, legacy_ctx(m.root().raw(), 0, 2, 2));
    m
}

#[test]
fn second_translation_of_a_page_is_served_by_the_iotlb_without_memory_reads() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = legacy();
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    // Act
    let t = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1ff0)).unwrap();
    // Assert
    assert_eq!(t.output, 0x8ff0);
    assert_eq!((d.stats().iotlb_hits, d.stats().context_cache_hits, d.last_table_reads()), (1, 1, 0));
}

#[test]
fn unmapped_page_stays_visible_until_the_guest_invalidates_it() {
    // Arrange
    let mem = memory();
    let mut m = two_domains(&mem);
    let mut d = legacy();
    let req = DmaRequest::read(DEV, 0x1000);
    d.translate(&mem, &legacy_root(), &req).unwrap();
    m.unmap(AddrRange::from_len(Iova::new(0x1000), 0x1000).unwrap()).unwrap();
    // Act
    let stale = d.translate(&mem, &legacy_root(), &req);
    d.invalidate(&page_inval(1, 0x1000, 0));
    let fresh = d.translate(&mem, &legacy_root(), &req);
    // Assert
    assert_eq!(stale.unwrap().output, 0x8000);
    assert_eq!(fresh.unwrap_err().info.reason, reason::READ);
}

#[test]
fn guest_that_invalidates_after_every_remap_always_sees_the_new_target() {
    // Arrange
    let mem = memory();
    let mut m = two_domains(&mem);
    let mut d = legacy();
    let page = AddrRange::from_len(Iova::new(0x1000), 0x1000).unwrap();
    let mut seen = Vec::new();
    // Act
    for target in [0x10_0000u64, 0x20_0000, 0x30_0000, 0x40_0000] {
        m.unmap(page).unwrap();
        map_ss(&mut m, 0x1000, 0x1000, 0x1_0000_0000 + target, rw(), PageSize::Size4K);
        d.invalidate(&page_inval(1, 0x1000, 0));
        seen.push(d.translate(&mem, &legacy_root(), &DmaRequest::write(DEV, 0x1000)).unwrap().output);
    }
    // Assert
    assert_eq!(seen, vec![0x1_0010_0000, 0x1_0020_0000, 0x1_0030_0000, 0x1_0040_0000]);
}

#[test]
fn domain_invalidation_drops_only_that_domain() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = legacy();
    for sid in [DEV, DEV2] {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(sid, 0x1000)).unwrap();
    }
    // Act
    d.invalidate(&Invalidation::Iotlb(IotlbInval::Domain(1)));
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV2, 0x1000)).unwrap();
    let hits_after_other_domain = d.stats().iotlb_hits;
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    // Assert
    assert_eq!(hits_after_other_domain, 1);
    assert_eq!(d.stats().iotlb_hits, 1);
    assert_eq!(d.stats().iotlb_misses, 3);
}

#[test]
fn page_invalidation_drops_only_the_pages_it_covers() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = legacy();
    for addr in [0x1000, 0x2000] {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, addr)).unwrap();
    }
    // Act
    d.invalidate(&page_inval(1, 0x1000, 0));
    let cached_after_one_page = d.cached_translations();
    d.invalidate(&page_inval(1, 0x2000, 1)); // 2 pages at 0x2000 → 0x2000..0x4000
    // Assert
    assert_eq!(cached_after_one_page, 1);
    assert_eq!(d.cached_translations(), 0);
}

#[test]
fn invalidating_one_4k_page_drops_the_2m_translation_containing_it() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x20_0000, 0x20_0000, 0x4000_0000, rw(), PageSize::Size2M);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().raw(), 0, 2, 1));
    let mut d = legacy();
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x20_0000)).unwrap();
    // Act
    d.invalidate(&page_inval(1, 0x3f_f000, 0));
    // Assert
    assert_eq!(d.cached_translations(), 0);
}

#[test]
fn page_invalidation_of_another_domain_keeps_the_translation() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = legacy();
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    // Act
    d.invalidate(&page_inval(2, 0x1000, 0));
    // Assert
    assert_eq!(d.cached_translations(), 1);
}

#[test]
fn changed_context_entry_is_used_only_after_a_device_selective_invalidation() {
    // Arrange
    let mem = memory();
    let m = two_domains(&mem);
    let mut d = legacy();
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().raw(), 0, 2, 7));
    // Act
    let stale = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    d.invalidate(&Invalidation::Context(ContextInval::Device { did: 1, sid: DEV, fm: 0 }));
    let fresh = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    // Assert
    assert_eq!((stale.did, fresh.did), (1, 7));
}

#[test]
fn function_mask_extends_a_device_invalidation_to_sibling_functions() {
    // Arrange
    let mem = memory();
    let sibling = SourceId::new(0, 3, 5);
    set_legacy_context(&mem, sibling, legacy_ctx(0, 2, 2, 1));
    set_legacy_context(&mem, DEV2, legacy_ctx(0, 2, 2, 2));
    let mut d = legacy();
    for sid in [sibling, DEV2] {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(sid, 0)).unwrap();
    }
    // Act
    d.invalidate(&Invalidation::Context(ContextInval::Device { did: 1, sid: DEV, fm: 0 }));
    let after_exact = d.cached_contexts();
    d.invalidate(&Invalidation::Context(ContextInval::Device { did: 1, sid: DEV, fm: 3 }));
    // Assert
    assert_eq!(after_exact, 2);
    assert_eq!(d.cached_contexts(), 1);
}

#[test]
fn domain_selective_context_invalidation_keeps_other_domains() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = legacy();
    for sid in [DEV, DEV2] {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(sid, 0x1000)).unwrap();
    }
    // Act
    d.invalidate(&Invalidation::Context(ContextInval::Domain(2)));
    // Assert
    assert_eq!(d.cached_contexts(), 1);
    assert_eq!(d.cached_translations(), 2);
}

#[test]
fn without_caching_mode_a_context_made_present_works_without_invalidation() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, (0, 0));
    let mut d = legacy();
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap_err();
    set_legacy_context(&mem, DEV, legacy_ctx(0, 2, 2, 1));
    // Act
    let t = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0));
    // Assert
    assert!(t.is_ok());
}

#[test]
fn with_caching_mode_a_not_present_context_stays_cached_until_invalidated() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, (0, 0));
    let mut d = Dmar::new(&Config { caching_mode: true, ..Config::default() });
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap_err();
    set_legacy_context(&mem, DEV, legacy_ctx(0, 2, 2, 1));
    // Act
    let cached = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0));
    d.invalidate(&Invalidation::Context(ContextInval::Device { did: 1, sid: DEV, fm: 0 }));
    let fresh = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0));
    // Assert
    assert_eq!(cached.unwrap_err().info.reason, reason::CONTEXT_ENTRY_P);
    assert!(fresh.is_ok());
}

#[test]
fn faulting_translations_are_never_cached() {
    // Arrange
    let mem = memory();
    let mut m = two_domains(&mem);
    let mut d = Dmar::new(&Config { caching_mode: true, ..Config::default() });
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x5000)).unwrap_err();
    map_ss(&mut m, 0x5000, 0x1000, 0x9000, rw(), PageSize::Size4K);
    // Act
    let t = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x5000));
    // Assert
    assert_eq!(t.unwrap().output, 0x9000);
}

#[test]
fn zero_iotlb_entries_walk_on_every_translation() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = Dmar::new(&Config { iotlb_entries: 0, ..Config::default() });
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    // Act
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    // Assert
    assert_eq!((d.stats().iotlb_hits, d.stats().iotlb_misses), (0, 2));
    assert_eq!(d.last_table_reads(), 4);
}

#[test]
fn global_iotlb_invalidation_drops_every_translation() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = legacy();
    for sid in [DEV, DEV2] {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(sid, 0x1000)).unwrap();
    }
    // Act
    d.invalidate(&Invalidation::Iotlb(IotlbInval::Global));
    // Assert
    assert_eq!(d.cached_translations(), 0);
    assert_eq!(d.cached_contexts(), 2);
}

// ---- scalable mode ----

fn nested_unit() -> Dmar {
    Dmar::new(&Config { mode: Mode::ScalableNested, ..Config::default() })
}

#[test]
fn pasid_selective_pasid_cache_invalidation_drops_only_that_pasid() {
    // Arrange
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 1, Pe { did: 1, ..Pe::default() }.raw());
    set_pasid_entry(&mem, 2, Pe { did: 1, ..Pe::default() }.raw());
    let mut d = nested_unit();
    let root = scalable_root();
    for p in [1, 2] {
        d.translate(&mem, &root, &DmaRequest::read(DEV, 0).with_pasid(p)).unwrap();
    }
    set_pasid_entry(&mem, 1, Pe { did: 5, ..Pe::default() }.raw());
    set_pasid_entry(&mem, 2, Pe { did: 5, ..Pe::default() }.raw());
    // Act
    d.invalidate(&Invalidation::PasidCache(PasidCacheInval::Pasid { did: 1, pasid: 1 }));
    let one = d.translate(&mem, &root, &DmaRequest::read(DEV, 0).with_pasid(1)).unwrap();
    let two = d.translate(&mem, &root, &DmaRequest::read(DEV, 0).with_pasid(2)).unwrap();
    // Assert
    assert_eq!((one.did, two.did), (5, 1));
}

#[test]
fn domain_selective_pasid_cache_invalidation_drops_the_domain_entries() {
    // Arrange
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 1, Pe { did: 1, ..Pe::default() }.raw());
    set_pasid_entry(&mem, 2, Pe { did: 2, ..Pe::default() }.raw());
    let mut d = nested_unit();
    for p in [1, 2] {
        d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(p)).unwrap();
    }
    // Act
    d.invalidate(&Invalidation::PasidCache(PasidCacheInval::Domain(1)));
    // Assert
    assert_eq!(d.cached_pasids(), 1);
}

#[test]
fn context_invalidation_also_drops_the_device_pasid_entries() {
    // Arrange
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 1, Pe::default().raw());
    let mut d = nested_unit();
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(1)).unwrap();
    // Act
    d.invalidate(&Invalidation::Context(ContextInval::Device { did: 0, sid: DEV, fm: 0 }));
    // Assert
    assert_eq!((d.cached_contexts(), d.cached_pasids()), (0, 0));
}

#[test]
fn with_caching_mode_a_not_present_pasid_entry_stays_cached_until_pasid_invalidation() {
    // Arrange
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 1, [0; 8]);
    let mut d = Dmar::new(&Config { mode: Mode::ScalableNested, caching_mode: true, ..Config::default() });
    let req = DmaRequest::read(DEV, 0).with_pasid(1);
    d.translate(&mem, &scalable_root(), &req).unwrap_err();
    set_pasid_entry(&mem, 1, Pe::default().raw());
    // Act
    let cached = d.translate(&mem, &scalable_root(), &req);
    d.invalidate(&Invalidation::PasidCache(PasidCacheInval::Pasid { did: 1, pasid: 1 }));
    let fresh = d.translate(&mem, &scalable_root(), &req);
    // Assert
    assert_eq!(cached.unwrap_err().info.reason, reason::PASID_ENTRY_P);
    assert!(fresh.is_ok());
}

fn first_stage_setup(mem: &TestMemory) -> FsMapper<'_> {
    let mut m = fs_mapper(mem, false);
    map_fs(&mut m, 0x1000, 0x2000, 0x5000, X86Attrs::user_rwx(), PageSize::Size4K);
    set_scalable_context(mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(mem, 3, Pe { pgtt: 1, did: 1, fsptptr: m.root().raw(), ..Pe::default() }.raw());
    m
}

#[test]
fn pasid_based_page_invalidation_drops_a_stale_first_stage_translation() {
    // Arrange
    let mem = memory();
    let mut m = first_stage_setup(&mem);
    let mut d = nested_unit();
    let req = DmaRequest::read(DEV, 0x1000).with_pasid(3);
    d.translate(&mem, &scalable_root(), &req).unwrap();
    m.unmap(AddrRange::from_len(Gva::new(0x1000), 0x1000).unwrap()).unwrap();
    // Act
    let stale = d.translate(&mem, &scalable_root(), &req);
    d.invalidate(&Invalidation::Piotlb(PiotlbInval::Page {
        did: 1,
        pasid: 3,
        addr: 0x1000,
        am: 0,
        ih: false,
    }));
    let fresh = d.translate(&mem, &scalable_root(), &req);
    // Assert
    assert!(stale.is_ok());
    assert_eq!(fresh.unwrap_err().info.reason, reason::FS_PAGING_ENTRY_P);
}

#[test]
fn iotlb_page_invalidation_does_not_drop_first_stage_translations() {
    // Arrange
    let mem = memory();
    let _m = first_stage_setup(&mem);
    let mut d = nested_unit();
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(3)).unwrap();
    // Act
    d.invalidate(&page_inval(1, 0x1000, 0));
    let kept = d.cached_translations();
    d.invalidate(&Invalidation::Piotlb(PiotlbInval::Pasid { did: 1, pasid: 3 }));
    // Assert
    assert_eq!((kept, d.cached_translations()), (1, 0));
}

#[test]
fn pasid_based_invalidation_of_another_pasid_keeps_the_translation() {
    // Arrange
    let mem = memory();
    let _m = first_stage_setup(&mem);
    let mut d = nested_unit();
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(3)).unwrap();
    // Act
    d.invalidate(&Invalidation::Piotlb(PiotlbInval::Pasid { did: 1, pasid: 4 }));
    d.invalidate(&Invalidation::Piotlb(PiotlbInval::Page {
        did: 1,
        pasid: 3,
        addr: 0x2000,
        am: 0,
        ih: true,
    }));
    // Assert
    assert_eq!(d.cached_translations(), 1);
}

#[test]
fn write_after_a_cached_read_rewalks_and_sets_the_dirty_flag() {
    // Arrange
    let mem = memory();
    let m = first_stage_setup(&mem);
    let mut d = nested_unit();
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(3)).unwrap();
    // Act
    d.translate(&mem, &scalable_root(), &DmaRequest::write(DEV, 0x1000).with_pasid(3)).unwrap();
    // Assert
    let f = X86Paging { phys_width: 46, ..X86Paging::four_level() };
    let t = f.lookup(mem.arena(), m.root(), Gva::new(0x1000)).unwrap();
    assert_eq!(t.leaf & x86::D, x86::D);
    assert_eq!(d.stats().iotlb_misses, 2);
}

#[test]
fn address_mask_beyond_the_address_space_invalidates_the_whole_domain() {
    // Arrange
    let mem = memory();
    let _m = two_domains(&mem);
    let mut d = legacy();
    for sid in [DEV, DEV2] {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(sid, 0x1000)).unwrap();
    }
    // Act
    d.invalidate(&page_inval(1, 0xffff_ffff_ffff_f000, 63));
    // Assert
    assert_eq!(d.cached_translations(), 1);
}

#[test]
fn iotlb_page_invalidation_drops_every_nested_translation_of_the_domain() {
    // Arrange: stage 2 maps guest table memory 1:1 and GPA 0x4000_0000 onwards.
    let mem = memory();
    let mut s2 = ss_mapper(&mem, 4);
    map_ss(&mut s2, 0, MEM_SIZE, 0, rw(), PageSize::Size4K);
    map_ss(&mut s2, 0x4000_0000, 0x2000, 0x9000_0000, rw(), PageSize::Size4K);
    let mut s1 = fs_mapper(&mem, false);
    map_fs(&mut s1, 0x1000, 0x2000, 0x4000_0000, X86Attrs::user_rwx(), PageSize::Size4K);
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    let pe = Pe { pgtt: 3, did: 1, ssptptr: s2.root().raw(), fsptptr: s1.root().raw(), ..Pe::default() };
    set_pasid_entry(&mem, 3, pe.raw());
    let mut d = nested_unit();
    for addr in [0x1000, 0x2000] {
        d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, addr).with_pasid(3)).unwrap();
    }
    // Act: the guest remaps GPA 0x4000_0000 in stage 2 and invalidates that GPA.
    s2.unmap(AddrRange::from_len(Iova::new(0x4000_0000), 0x1000).unwrap()).unwrap();
    d.invalidate(&page_inval(1, 0x4000_0000, 0));
    let after = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(3));
    // Assert
    assert_eq!(after.unwrap_err().info.reason, reason::SM_READ);
    assert_eq!(d.cached_translations(), 0);
}

#[test]
fn invalidate_all_empties_every_cache() {
    // Arrange
    let mem = memory();
    let _m = first_stage_setup(&mem);
    let mut d = nested_unit();
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(3)).unwrap();
    // Act
    d.invalidate_all();
    // Assert
    assert_eq!((d.cached_contexts(), d.cached_pasids(), d.cached_translations()), (0, 0, 0));
}

#[test]
fn cached_translation_does_not_let_a_privileged_request_bypass_sre() {
    // Arrange: user reads warm every cache for PASID 3 (SRE clear).
    let mem = memory();
    let _m = first_stage_setup(&mem);
    let mut d = nested_unit();
    for _ in 0..3 {
        d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(3)).unwrap();
    }
    // Act
    let f = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(3).privileged());
    // Assert
    assert_eq!(f.unwrap_err().info.reason, reason::PASID_ENTRY_SRE);
    assert_eq!(d.stats().iotlb_hits, 2);
}
