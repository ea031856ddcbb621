//! Specification checks of the translation half against the VT-d specification
//! and QEMU `hw/i386/intel_iommu.c`: hand-built tables, one rule each.

mod translate_support;

use memvisor_vtd::tables::reason;
use memvisor_vtd::translate::{DmaRequest, Dmar};
use memvisor_vtd::{
    Config, ContextInval, Invalidation, IotlbInval, Mode, PasidCacheInval, PiotlbInval, SourceId,
};
use translate_support::*;

/// Hand-built 3-level second-stage tables at 0x30_0000..: level-3 table,
/// level-2 table, level-1 table; returns the root.
const SS_L3: u64 = 0x30_0000;
const SS_L2: u64 = 0x30_1000;
const SS_L1: u64 = 0x30_2000;
const RW: u64 = 3;

fn ss_tables(mem: &memvisor_vtd::TestMemory, l2_entry0: u64, l1_entry0: u64) -> u64 {
    w(mem, SS_L3, SS_L2 | RW);
    w(mem, SS_L2, l2_entry0);
    w(mem, SS_L1, l1_entry0);
    SS_L3
}

fn legacy(config: Config) -> Dmar {
    Dmar::new(&config)
}

#[test]
fn legacy_snoop_bit_in_a_leaf_is_reserved_without_ecap_sc() {
    // Arrange: the unit does not advertise ECAP.SC; QEMU reserves SNP in
    // legacy-mode leaves (VTD_SPTE_SNP in vtd_spte_rsvd[1] unless scalable
    // mode or snoop control).
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW | (1 << 11));
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    // Act
    let f =
        legacy(Config::default()).translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x10)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PAGING_ENTRY_RSVD);
}

#[test]
fn legacy_snoop_bit_in_a_2m_leaf_is_reserved_without_ecap_sc() {
    // Arrange
    let mem = memory();
    let root = ss_tables(&mem, 0x40_0000 | RW | (1 << 7) | (1 << 11), 0);
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    // Act
    let f =
        legacy(Config::default()).translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x10)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PAGING_ENTRY_RSVD);
}

#[test]
fn scalable_second_stage_accepts_the_snoop_bit() {
    // Arrange: scalable mode ignores SNP (QEMU clears it from the masks).
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW | (1 << 11));
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 0, Pe { pgtt: 2, aw: 1, ssptptr: root, ..Pe::default() }.raw());
    let mut d = Dmar::new(&Config { mode: Mode::ScalableSecondStage, ..Config::default() });
    // Act
    let t = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x10)).unwrap();
    // Assert
    assert_eq!(t.output, 0x5010);
}

#[test]
fn large_second_stage_leaf_is_reserved_without_sllps() {
    // Arrange
    let mem = memory();
    let root = ss_tables(&mem, 0x40_0000 | RW | (1 << 7), 0);
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    let mut d = legacy(Config { large_pages: false, ..Config::default() });
    // Act
    let f = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x10)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PAGING_ENTRY_RSVD);
}

#[test]
fn legacy_input_beyond_the_context_aw_faults_0x4_even_below_mgaw() {
    // Arrange: AW 1 (39-bit) on a 48-bit unit.
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW);
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    // Act
    let f = legacy(Config::default())
        .translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 1 << 39))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::ADDR_BEYOND_MGAW);
}

#[test]
fn legacy_aw_the_unit_does_not_support_is_invalid_context() {
    for (width, aw) in [(39u8, 2u64), (48, 3), (48, 0), (57, 4)] {
        // Arrange
        let mem = memory();
        let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW);
        set_legacy_context(&mem, DEV, legacy_ctx(root, 0, aw, 1));
        let mut d = legacy(Config { address_width: width, ..Config::default() });
        // Act
        let f = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x10)).unwrap_err();
        // Assert
        assert_eq!(f.info.reason, reason::CONTEXT_ENTRY_INV, "width {width} aw {aw}");
    }
}

#[test]
fn legacy_read_and_write_permission_faults_are_0x6_and_0x5() {
    // Arrange: read-only page and write-only page.
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | 1);
    w(&mem, SS_L1 + 8, 0x6000 | 2);
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    let mut d = legacy(Config::default());
    // Act
    let wf = d.translate(&mem, &legacy_root(), &DmaRequest::write(DEV, 0x10)).unwrap_err();
    let rf = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1010)).unwrap_err();
    // Assert
    assert_eq!((wf.info.reason, rf.info.reason), (reason::WRITE, reason::READ));
}

#[test]
fn page_selective_invalidation_drops_a_2m_entry_overlapping_the_range() {
    // Arrange
    let mem = memory();
    let root = ss_tables(&mem, 0x40_0000 | RW | (1 << 7), 0);
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    let mut d = legacy(Config::default());
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x10)).unwrap();
    w(&mem, SS_L2, 0x60_0000 | RW | (1 << 7));
    // Act: one 4K page in the middle of the 2M page.
    d.invalidate(&Invalidation::Iotlb(IotlbInval::Page { did: 1, addr: 0x1_3000, am: 0, ih: false }));
    let t = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x10)).unwrap();
    // Assert
    assert_eq!(t.output, 0x60_0010);
}

#[test]
fn page_selective_invalidation_with_am_drops_every_page_of_the_aligned_range() {
    // Arrange: 4 pages 0..4 cached, AM 2 at address 0x2000 (aligned down to 0).
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0);
    for i in 0..5u64 {
        w(&mem, SS_L1 + 8 * i, (0x5000 + i * 0x1000) | RW);
    }
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    let mut d = legacy(Config::default());
    for i in 0..5u64 {
        d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, i << 12)).unwrap();
    }
    // Act
    d.invalidate(&Invalidation::Iotlb(IotlbInval::Page { did: 1, addr: 0x2000, am: 2, ih: false }));
    // Assert: page 4 stays.
    assert_eq!(d.cached_translations(), 1);
}

#[test]
fn domain_selective_invalidation_keeps_other_domains() {
    // Arrange
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW);
    let other = SourceId::new(0, 4, 0);
    set_legacy_context(&mem, DEV, legacy_ctx(root, 0, 1, 1));
    set_legacy_context(&mem, other, legacy_ctx(root, 0, 1, 2));
    let mut d = legacy(Config::default());
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap();
    d.translate(&mem, &legacy_root(), &DmaRequest::read(other, 0)).unwrap();
    // Act
    d.invalidate(&Invalidation::Iotlb(IotlbInval::Domain(1)));
    // Assert
    assert_eq!(d.cached_translations(), 1);
}

#[test]
fn without_caching_mode_a_not_present_context_is_never_cached() {
    // Arrange
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW);
    let (lo, hi) = legacy_ctx(root, 0, 1, 1);
    set_legacy_context(&mem, DEV, (lo & !1, hi));
    let mut d = legacy(Config::default());
    let f = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap_err();
    assert_eq!(f.info.reason, reason::CONTEXT_ENTRY_P);
    // Act: made present without any invalidation.
    set_legacy_context(&mem, DEV, (lo, hi));
    let t = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap();
    // Assert
    assert_eq!(t.output, 0x5000);
}

#[test]
fn with_caching_mode_a_not_present_context_may_be_cached_until_invalidated() {
    // Arrange
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW);
    let (lo, hi) = legacy_ctx(root, 0, 1, 1);
    set_legacy_context(&mem, DEV, (lo & !1, hi));
    let mut d = legacy(Config { caching_mode: true, ..Config::default() });
    d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap_err();
    set_legacy_context(&mem, DEV, (lo, hi));
    // Act
    d.invalidate(&Invalidation::Context(ContextInval::Device { did: 1, sid: DEV, fm: 0 }));
    let t = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap();
    // Assert
    assert_eq!(t.output, 0x5000);
}

#[test]
fn scalable_pasid_beyond_the_pdts_directory_faults() {
    // Arrange: PDTS 0 covers PASIDs below 2^13.
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    let mut d = Dmar::new(&Config { mode: Mode::ScalableFirstStage, ..Config::default() });
    // Act
    let f = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(1 << 13)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::SM_PASID_TOO_LARGE);
}

/// First-stage tables at 0x31_0000.. mapping IOVA 0 → 0x7000 with the
/// given U/S at each level (PML4, PDPT, PD, PT).
fn fs_tables(mem: &memvisor_vtd::TestMemory, us: [bool; 4]) -> u64 {
    let tables = [0x31_0000u64, 0x31_1000, 0x31_2000, 0x31_3000];
    for (i, t) in tables.iter().enumerate() {
        let next = tables.get(i + 1).copied().unwrap_or(0x7000);
        w(mem, *t, next | 0x3 | (u64::from(us[i]) << 2));
    }
    tables[0]
}

fn fs_unit(mem: &memvisor_vtd::TestMemory, us: [bool; 4]) -> Dmar {
    let root = fs_tables(mem, us);
    set_scalable_context(mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(mem, 5, Pe { pgtt: 1, fsptptr: root, sre: true, ..Pe::default() }.raw());
    Dmar::new(&Config { mode: Mode::ScalableFirstStage, ..Config::default() })
}

#[test]
fn user_request_needs_us_at_every_first_stage_level() {
    for level in 0..4 {
        // Arrange
        let mem = memory();
        let mut us = [true; 4];
        us[level] = false;
        let mut d = fs_unit(&mem, us);
        // Act
        let f = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(5)).unwrap_err();
        // Assert
        assert_eq!(f.info.reason, reason::FS_PAGING_ENTRY_US, "U/S clear at level {level}");
    }
}

#[test]
fn supervisor_request_with_sre_reads_a_supervisor_page() {
    // Arrange
    let mem = memory();
    let mut d = fs_unit(&mem, [false; 4]);
    // Act
    let t =
        d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x8).with_pasid(5).privileged()).unwrap();
    // Assert
    assert_eq!(t.output, 0x7008);
}

#[test]
fn pasid_cache_invalidation_of_one_pasid_keeps_the_others() {
    // Arrange
    let mem = memory();
    let mut d = fs_unit(&mem, [true; 4]);
    set_pasid_entry(&mem, 6, Pe { pgtt: 1, fsptptr: 0x31_0000, ..Pe::default() }.raw());
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(5)).unwrap();
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(6)).unwrap();
    // Act
    d.invalidate(&Invalidation::PasidCache(PasidCacheInval::Pasid { did: 1, pasid: 5 }));
    // Assert
    assert_eq!(d.cached_pasids(), 1);
}

#[test]
fn piotlb_page_invalidation_with_huge_am_does_not_panic_and_drops_all() {
    // Arrange
    let mem = memory();
    let mut d = fs_unit(&mem, [true; 4]);
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(5)).unwrap();
    // Act
    for am in [52u8, 63, 255] {
        d.invalidate(&Invalidation::Piotlb(PiotlbInval::Page {
            did: 1,
            pasid: 5,
            addr: !0xfffu64,
            am,
            ih: false,
        }));
    }
    d.invalidate(&Invalidation::Iotlb(IotlbInval::Page { did: 1, addr: !0xfffu64, am: 255, ih: true }));
    d.invalidate(&Invalidation::Piotlb(PiotlbInval::Page { did: 1, pasid: 5, addr: 0, am: 63, ih: false }));
    // Assert
    assert_eq!(d.cached_translations(), 0);
}

#[test]
fn piotlb_invalidation_still_reaches_the_paging_structure_caches_after_many_pasids() {
    // Arrange: PASID 5 (DID 0) walks its first-stage table once; then
    // enough other (DID, PASID) pairs walk the same table for the unit's
    // (DID, PASID) → root map to overflow and be emptied.
    let mem = memory();
    let mut d = fs_unit(&mem, [true; 4]);
    let root = 0x31_0000;
    let pe = |did: u16, pasid_fs: u64| Pe { pgtt: 1, did, fsptptr: pasid_fs, ..Pe::default() }.raw();
    set_pasid_entry(&mem, 5, pe(0, root));
    let req = DmaRequest::read(DEV, 0).with_pasid(5);
    assert_eq!(d.translate(&mem, &scalable_root(), &req).unwrap().output, 0x7000);
    for did in 1..=u16::MAX {
        set_pasid_entry(&mem, 5, pe(did, root));
        d.invalidate(&Invalidation::PasidCache(PasidCacheInval::Global));
        d.translate(&mem, &scalable_root(), &req).unwrap();
    }
    // PASID 6 has tables of its own (PML4 → PDPT → PD → PT at 0x32_x000).
    for (i, t) in [0x32_0000u64, 0x32_1000, 0x32_2000, 0x32_3000].iter().enumerate() {
        let next = if i == 3 { 0x8000 } else { t + 0x1000 };
        w(&mem, *t, next | 0x7);
    }
    set_pasid_entry(&mem, 6, pe(7, 0x32_0000));
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(6)).unwrap();
    // The guest points the PD entry at a new page table, restores DID 0 and
    // invalidates the PASID cache and that PASID's IOTLB.
    w(&mem, 0x31_4000, 0x9000 | 0x7);
    w(&mem, 0x31_2000, 0x31_4000 | 0x7);
    set_pasid_entry(&mem, 5, pe(0, root));
    d.invalidate(&Invalidation::PasidCache(PasidCacheInval::Global));
    d.invalidate(&Invalidation::Piotlb(PiotlbInval::Pasid { did: 0, pasid: 5 }));
    // Act
    let t = d.translate(&mem, &scalable_root(), &req).unwrap();
    // Assert
    assert_eq!(t.output, 0x9000);
}

#[test]
fn pass_through_context_with_an_unsupported_aw_is_invalid() {
    // Arrange: QEMU checks the AW of every legacy context entry before its TT.
    let mem = memory();
    set_legacy_context(&mem, DEV, legacy_ctx(0, 2, 0, 9));
    // Act
    let f = legacy(Config::default())
        .translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::CONTEXT_ENTRY_INV);
}

#[test]
fn devfn_128_and_above_use_the_upper_half_of_the_scalable_root_entry() {
    // Arrange: only the upper half is present.
    let mem = memory();
    let hi = SourceId::new(0, 16, 0);
    set_scalable_context(&mem, hi, scalable_ctx(PASID_DIR, 0));
    w(&mem, ROOT, 0);
    set_pasid_entry(&mem, 0, Pe { did: 3, ..Pe::default() }.raw());
    let mut d = Dmar::new(&Config { mode: Mode::ScalableFirstStage, ..Config::default() });
    // Act
    let t = d.translate(&mem, &scalable_root(), &DmaRequest::read(hi, 0x1234)).unwrap();
    let f = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1234)).unwrap_err();
    // Assert
    assert_eq!((t.output, t.did), (0x1234, 3));
    assert_eq!(f.info.reason, reason::SM_ROOT_ENTRY_P);
}

#[test]
fn request_without_pasid_uses_rid_pasid_and_its_did() {
    // Arrange
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 70));
    set_pasid_entry(&mem, 70, Pe { did: 12, ..Pe::default() }.raw());
    let mut d = Dmar::new(&Config { mode: Mode::ScalableFirstStage, ..Config::default() });
    // Act
    let t = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000)).unwrap();
    // Assert
    assert_eq!(t.did, 12);
}

#[test]
fn five_level_first_stage_needs_fs5lp() {
    // Arrange: a 48-bit unit does not advertise FS5LP.
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 1, Pe { pgtt: 1, fspm: 1, fsptptr: 0x31_0000, ..Pe::default() }.raw());
    let mut d = Dmar::new(&Config { mode: Mode::ScalableFirstStage, ..Config::default() });
    // Act
    let f = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(1)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PASID_TABLE_ENTRY_INV);
}

#[test]
fn without_caching_mode_a_not_present_pasid_entry_is_never_cached() {
    // Arrange
    let mem = memory();
    let mut d = fs_unit(&mem, [true; 4]);
    let raw = Pe { pgtt: 1, fsptptr: 0x31_0000, ..Pe::default() }.raw();
    let mut absent = raw;
    absent[0] &= !1;
    set_pasid_entry(&mem, 9, absent);
    let req = DmaRequest::read(DEV, 0).with_pasid(9);
    assert_eq!(d.translate(&mem, &scalable_root(), &req).unwrap_err().info.reason, reason::PASID_ENTRY_P);
    // Act
    set_pasid_entry(&mem, 9, raw);
    let t = d.translate(&mem, &scalable_root(), &req).unwrap();
    // Assert
    assert_eq!(t.output, 0x7000);
}

#[test]
fn piotlb_page_invalidation_drops_a_first_stage_2m_entry_overlapping_the_range() {
    // Arrange: PD entry 0 is a 2M page at 0x40_0000.
    let mem = memory();
    let mut d = fs_unit(&mem, [true; 4]);
    w(&mem, 0x31_2000, 0x40_0000 | 0x7 | (1 << 7));
    let req = DmaRequest::read(DEV, 0x1234).with_pasid(5);
    assert_eq!(d.translate(&mem, &scalable_root(), &req).unwrap().output, 0x40_1234);
    w(&mem, 0x31_2000, 0x60_0000 | 0x7 | (1 << 7));
    // Act: 4 pages at 0x10_0000, inside the 2M page.
    d.invalidate(&Invalidation::Piotlb(PiotlbInval::Page {
        did: 1,
        pasid: 5,
        addr: 0x10_0000,
        am: 2,
        ih: true,
    }));
    let t = d.translate(&mem, &scalable_root(), &req).unwrap();
    // Assert
    assert_eq!(t.output, 0x60_1234);
}

#[test]
fn second_stage_scalable_input_beyond_pasid_aw_faults() {
    // Arrange: PASID-entry AW 1 (39-bit) on a 48-bit unit.
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW);
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(&mem, 0, Pe { pgtt: 2, aw: 1, ssptptr: root, ..Pe::default() }.raw());
    let mut d = Dmar::new(&Config { mode: Mode::ScalableSecondStage, ..Config::default() });
    // Act
    let f = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 1 << 39)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::SM_ADDR_BEYOND);
}

#[test]
fn device_tlb_translation_type_without_ecap_dt_is_an_invalid_context() {
    // Arrange
    let mem = memory();
    let root = ss_tables(&mem, SS_L1 | RW, 0x5000 | RW);
    set_legacy_context(&mem, DEV, legacy_ctx(root, 1, 1, 1));
    // Act
    let f =
        legacy(Config::default()).translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x10)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::CONTEXT_ENTRY_INV);
}
