//! `Vtd::dma`: a device transfer split at page boundaries, each piece
//! translated with the device's source id; the first fault stops it and is
//! recorded.

use memvisor_paging::{ArenaFrames, Mapper, SecondStage, SecondStageAttrs};
use memvisor_types::{AddrRange, Address, Gpa, Iova, PageSize};
use memvisor_vtd::device::{DmaStop, Vtd};
use memvisor_vtd::encode::{self, LegacyTt};
use memvisor_vtd::regs::off;
use memvisor_vtd::{Config, Mode, RecordingSink, SourceId, TestMemory};

const DEV: SourceId = SourceId::new(0, 3, 0);

/// A legacy unit with translation on: IOVA 0x1000 → GPA 0x9000, 0x2000 →
/// 0x5000, nothing at 0x3000.
fn unit() -> (Vtd, TestMemory) {
    let mem = TestMemory::new(Gpa::new(0), 64);
    let format = SecondStage { host_width: 46, ..SecondStage::four_level().with_levels(3) };
    let mut m = Mapper::new(format, mem.arena(), ArenaFrames::range(0x20000, 0x40000)).unwrap();
    for (iova, gpa) in [(0x1000, 0x9000), (0x2000, 0x5000)] {
        let r = AddrRange::from_len(Iova::new(iova), 0x1000).unwrap();
        m.map(r, Gpa::new(gpa), SecondStageAttrs::rwx(), PageSize::Size4K).unwrap();
    }
    let entry = encode::legacy_context_entry(m.root().raw(), LegacyTt::MultiLevel, 3, 1);
    encode::install_legacy_context(&mem, 0x1000, 0x3000, DEV, entry).unwrap();
    let mut vtd = Vtd::new(Config { mode: Mode::Legacy, address_width: 39, ..Config::default() }).unwrap();
    let mut irq = RecordingSink::default();
    vtd.mmio_write(&mem, &mut irq, off::RTADDR, &0x1000u64.to_le_bytes());
    vtd.mmio_write(&mem, &mut irq, off::GCMD, &(1u32 << 30).to_le_bytes());
    vtd.mmio_write(&mem, &mut irq, off::GCMD, &(1u32 << 31).to_le_bytes());
    (vtd, mem)
}

#[test]
fn transfer_across_a_page_boundary_is_split_into_translated_pieces() {
    // Arrange
    let (mut vtd, mem) = unit();
    let mut pieces = Vec::new();
    // Act
    let r = vtd.dma(&mem, &mut RecordingSink::default(), DEV, None, 0x1ff0, 0x20, false, |gpa, range| {
        pieces.push((gpa, range));
        true
    });
    // Assert
    assert_eq!(r, Ok(()));
    assert_eq!(pieces, vec![(0x9ff0, 0..0x10), (0x5000, 0x10..0x20)]);
}

#[test]
fn unmapped_page_stops_the_transfer_there_and_records_the_fault() {
    // Arrange
    let (mut vtd, mem) = unit();
    let mut pieces = 0;
    // Act
    let r = vtd.dma(&mem, &mut RecordingSink::default(), DEV, None, 0x2800, 0x1000, true, |_, _| {
        pieces += 1;
        true
    });
    // Assert
    let stop = r.unwrap_err();
    assert_eq!(stop.iova, 0x3000);
    assert!(stop.fault.is_some_and(|f| f.write && f.sid == DEV));
    assert_eq!(pieces, 1);
    assert_eq!(vtd.stats().faults_recorded, 1);
}

#[test]
fn a_failed_copy_stops_the_transfer_without_a_fault() {
    // Arrange
    let (mut vtd, mem) = unit();
    // Act
    let r = vtd.dma(&mem, &mut RecordingSink::default(), DEV, None, 0x1000, 0x2000, false, |_, _| false);
    // Assert
    assert_eq!(r, Err(DmaStop { iova: 0x1000, fault: None }));
}
