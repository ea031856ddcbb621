//! Legacy-mode DMA translation: root → context → second stage or pass-through,
//! and every legacy fault reason.

mod translate_support;

use memvisor_types::PageSize;
use memvisor_vtd::tables::reason;
use memvisor_vtd::translate::{DmaRequest, Dmar};
use memvisor_vtd::{Config, RootState, SourceId};
use translate_support::*;

fn dmar() -> Dmar {
    Dmar::new(&Config::default())
}

#[test]
fn four_level_second_stage_translates_a_4k_page() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x7000_0000, 0x1000, 0x8000_0000, rw(), PageSize::Size4K);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 2, 5));
    // Act
    let t = dmar().translate(&mem, &legacy_root(), &DmaRequest::write(DEV, 0x7000_0123)).unwrap();
    // Assert
    assert_eq!((t.output, t.page_size, t.read, t.write, t.did), (0x8000_0123, 4096, true, true, 5));
}

#[test]
fn three_level_second_stage_translates_a_2m_leaf() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 3);
    map_ss(&mut m, 0x4000_0000, 0x20_0000, 0x1_0000_0000, rw(), PageSize::Size2M);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 1, 1));
    // Act
    let t = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x401f_fff8)).unwrap();
    // Assert
    assert_eq!((t.output, t.page_size), (0x1_001f_fff8, 0x20_0000));
}

#[test]
fn five_level_second_stage_translates_a_1g_leaf() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 5);
    map_ss(&mut m, 0x1_0000_0000_0000, 0x4000_0000, 0x40_0000_0000, rw(), PageSize::Size1G);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 3, 1));
    let mut d = Dmar::new(&Config { address_width: 57, ..Config::default() });
    // Act
    let t = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1_0000_1234_5678)).unwrap();
    // Assert
    assert_eq!((t.output, t.page_size), (0x40_1234_5678, 0x4000_0000));
}

#[test]
fn pass_through_context_maps_every_address_to_itself() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, legacy_ctx(0, 2, 2, 9));
    // Act
    let t = dmar().translate(&mem, &legacy_root(), &DmaRequest::write(DEV, 0xdead_b000)).unwrap();
    // Assert
    assert_eq!((t.output, t.write, t.did), (0xdead_b000, true, 9));
}

#[test]
fn pass_through_without_ecap_pt_is_an_invalid_context() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, legacy_ctx(0, 2, 2, 9));
    let mut d = Dmar::new(&Config { pass_through: false, ..Config::default() });
    // Act
    let f = d.translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::CONTEXT_ENTRY_INV);
}

#[test]
fn disabled_translation_leaves_dma_untranslated() {
    // Arrange
    let mem = memory();
    let root = RootState { enabled: false, ..legacy_root() };
    // Act
    let t = dmar().translate(&mem, &root, &DmaRequest::write(DEV, 0x1234_5678)).unwrap();
    // Assert
    assert_eq!((t.output, t.did), (0x1234_5678, 0));
}

#[test]
fn missing_root_entry_faults_with_reason_1_regardless_of_fpd() {
    // Arrange
    let mem = memory();
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!((f.info.reason, f.fpd, f.info.sid, f.info.addr), (reason::ROOT_ENTRY_P, false, DEV, 0x1000));
}

#[test]
fn missing_context_entry_faults_with_reason_2() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, (0, 0));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!((f.info.reason, f.fpd), (reason::CONTEXT_ENTRY_P, false));
}

#[test]
fn fpd_in_a_not_present_context_entry_suppresses_the_fault() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, (2, 0));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!((f.info.reason, f.fpd), (reason::CONTEXT_ENTRY_P, true));
}

#[test]
fn fpd_suppresses_permission_faults_of_the_context() {
    // Arrange
    let mem = memory();
    let m = ss_mapper(&mem, 4);
    let (lo, hi) = legacy_ctx(m.root().as_u64(), 0, 2, 1);
    set_legacy_context(&mem, DEV, (lo | 2, hi));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::write(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!((f.info.reason, f.fpd), (reason::WRITE, true));
}

#[test]
fn reserved_bits_in_the_root_entry_fault_with_reason_a() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, legacy_ctx(0, 2, 2, 1));
    w(&mem, ROOT, CONTEXTS | 1 | 0x10);
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::ROOT_ENTRY_RSVD);
}

#[test]
fn reserved_bits_in_the_context_entry_fault_with_reason_b() {
    // Arrange
    let mem = memory();
    let (lo, hi) = legacy_ctx(0, 2, 2, 1);
    set_legacy_context(&mem, DEV, (lo, hi | 0x80));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::CONTEXT_ENTRY_RSVD);
}

#[test]
fn unsupported_address_width_is_an_invalid_context() {
    // Arrange: AW 3 (57-bit) on a 48-bit unit.
    let mem = memory();
    let m = ss_mapper(&mem, 4);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 3, 1));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::CONTEXT_ENTRY_INV);
}

#[test]
fn address_beyond_the_context_width_faults_with_reason_4() {
    // Arrange
    let mem = memory();
    let m = ss_mapper(&mem, 3);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 1, 1));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 1 << 39)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::ADDR_BEYOND_MGAW);
}

#[test]
fn write_to_a_read_only_page_faults_with_reason_5() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x1000, 0x1000, 0x9000, ro(), PageSize::Size4K);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 2, 1));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::write(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!((f.info.reason, f.info.write), (reason::WRITE, true));
}

#[test]
fn read_of_an_unmapped_page_faults_with_reason_6() {
    // Arrange
    let mem = memory();
    let m = ss_mapper(&mem, 4);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 2, 1));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x5000)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::READ);
}

#[test]
fn reserved_bits_in_a_second_stage_entry_fault_with_reason_c() {
    // Arrange: a leaf with output bits above the 46-bit host width.
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x1000, 0x1000, 0x9000, rw(), PageSize::Size4K);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 2, 1));
    let leaf = find_leaf(&mem, m.root().as_u64(), 4, 0x1000);
    w(&mem, leaf, r(&mem, leaf) | (1 << 50));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PAGING_ENTRY_RSVD);
}

/// Address of the 4K leaf entry of `iova` in a second-stage table.
fn find_leaf(mem: &memvisor_vtd::TestMemory, root: u64, levels: u8, iova: u64) -> u64 {
    let mut table = root;
    for level in (2..=levels).rev() {
        let idx = (iova >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        table = r(mem, table + idx * 8) & 0x000f_ffff_ffff_f000;
    }
    table + ((iova >> 12) & 0x1ff) * 8
}

#[test]
fn unreadable_second_stage_table_faults_with_reason_7() {
    // Arrange: SSPTPTR beyond guest memory.
    let mem = memory();
    set_legacy_context(&mem, DEV, legacy_ctx(0x10_0000_0000, 0, 2, 1));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PAGING_ENTRY_INV);
}

#[test]
fn unreadable_root_table_faults_with_reason_8() {
    // Arrange
    let mem = memory();
    let root = RootState { rtaddr: 0x10_0000_0000, ..legacy_root() };
    // Act
    let f = dmar().translate(&mem, &root, &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::ROOT_TABLE_INV);
}

#[test]
fn unreadable_context_table_faults_with_reason_9() {
    // Arrange
    let mem = memory();
    w(&mem, ROOT, 0x10_0000_0000 | 1);
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(SourceId::new(0, 0, 0), 0)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::CONTEXT_TABLE_INV);
}

#[test]
fn request_with_pasid_is_blocked_by_legacy_tables() {
    // Arrange
    let mem = memory();
    set_legacy_context(&mem, DEV, legacy_ctx(0, 2, 2, 1));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(DEV, 0).with_pasid(7)).unwrap_err();
    // Assert
    assert_eq!((f.info.reason, f.info.pasid), (reason::RTADDR_INV_TTM, Some(7)));
}

#[test]
fn translation_into_the_interrupt_range_faults_with_reason_e() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x1000, 0x1000, 0xfee0_0000, rw(), PageSize::Size4K);
    set_legacy_context(&mem, DEV, legacy_ctx(m.root().as_u64(), 0, 2, 1));
    // Act
    let f = dmar().translate(&mem, &legacy_root(), &DmaRequest::write(DEV, 0x1000)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::INTERRUPT_ADDR);
}

#[test]
fn devices_on_the_upper_half_of_a_bus_use_their_own_context_entry() {
    // Arrange
    let mem = memory();
    let sid = SourceId::new(2, 31, 7);
    set_legacy_context(&mem, sid, legacy_ctx(0, 2, 2, 42));
    // Act
    let t = dmar().translate(&mem, &legacy_root(), &DmaRequest::read(sid, 0x3000)).unwrap();
    // Assert
    assert_eq!(t.did, 42);
}
