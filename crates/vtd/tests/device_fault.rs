//! Primary fault logging through `Vtd`: fault-recording registers, FSTS
//! PPF/PFO/FRI, masked and unmasked fault events.

#[path = "support/mmio.rs"]
mod mmio;

use mmio::Mmio;

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::regs::off::{FEADDR, FECTL, FEDATA, FRCD, FSTS, GCMD, RTADDR};
use memvisor_vtd::translate::DmaRequest;
use memvisor_vtd::{Config, FaultInfo, FaultSource, Msi, RecordingSink, SourceId, TestMemory};

const PFO: u32 = 1;
const PPF: u32 = 2;
const F: u64 = 1 << 63;
const EVENT: Msi = Msi { addr: 0xfee0_0000, data: 0x61 };

struct Rig {
    vtd: Vtd,
    mem: TestMemory,
    irq: RecordingSink,
}

impl Mmio for Rig {
    fn parts(&mut self) -> (&mut Vtd, &TestMemory, &mut RecordingSink) {
        (&mut self.vtd, &self.mem, &mut self.irq)
    }
}

impl Rig {
    fn new(records: u16, unmask: bool) -> Self {
        let config = Config { fault_records: records, ..Config::default() };
        let mut rig = Self {
            vtd: Vtd::new(config).unwrap(),
            mem: TestMemory::new(Gpa::new(0), 64),
            irq: RecordingSink::default(),
        };
        rig.w32(FEDATA, EVENT.data);
        rig.w32(FEADDR, 0xfee0_0000);
        if unmask {
            rig.w32(FECTL, 0);
        }
        rig
    }
    fn fault(&mut self, addr: u64) {
        let info = dma(addr);
        self.vtd.record_fault(&mut self.irq, &info);
    }
    fn frcd(&mut self, i: u64) -> (u64, u64) {
        (self.r64(FRCD + 16 * i), self.r64(FRCD + 16 * i + 8))
    }
}

fn dma(addr: u64) -> FaultInfo {
    FaultInfo {
        source: FaultSource::Dma,
        sid: SourceId::new(1, 2, 3),
        pasid: None,
        addr,
        reason: 6,
        write: false,
        exec: false,
        privileged: false,
    }
}

#[test]
fn dma_fault_from_translate_is_recorded_and_raises_the_fault_event() {
    // Arrange: translation on, root table of zeros (root entry not present).
    let mut rig = Rig::new(1, true);
    rig.w64(RTADDR, 0x5000);
    rig.w32(GCMD, 1 << 30);
    rig.w32(GCMD, (1 << 31) | (1 << 30));
    let req =
        DmaRequest { sid: SourceId::new(0, 3, 0), addr: 0x1234_5678, write: true, ..Default::default() };
    // Act
    let r = rig.vtd.translate(&rig.mem, &mut rig.irq, &req);
    // Assert
    let info = r.unwrap_err();
    assert_eq!(info.reason, 1);
    let (lo, hi) = rig.frcd(0);
    assert_eq!(lo, 0x1234_5000);
    assert_eq!(hi, F | (1 << 32) | 0x18, "F, reason 1, write (T = 0), SID 00:03.0");
    assert_eq!(rig.r32(FSTS), PPF);
    assert_eq!(rig.irq.sent, [EVENT]);
    assert_eq!(rig.vtd.stats().faults_recorded, 1);
}

#[test]
fn fault_record_carries_pasid_privilege_exec_and_read_type() {
    // Arrange
    let mut rig = Rig::new(1, false);
    let info = FaultInfo { pasid: Some(0xabcde), privileged: true, exec: true, ..dma(0x7000) };
    // Act
    rig.vtd.record_fault(&mut rig.irq, &info);
    // Assert
    let (_, hi) = rig.frcd(0);
    assert_eq!(hi, F | (1 << 62) | (0xabcde << 40) | (6 << 32) | (7 << 29) | 0x0113);
}

#[test]
fn interrupt_fault_records_the_index_in_bits_63_48() {
    // Arrange
    let mut rig = Rig::new(1, false);
    let info =
        FaultInfo { source: FaultSource::Interrupt, addr: 0x1234 << 48, write: true, reason: 0x22, ..dma(0) };
    // Act
    rig.vtd.record_fault(&mut rig.irq, &info);
    // Assert
    assert_eq!(rig.frcd(0), (0x1234 << 48, F | (0x22 << 32) | 0x0113));
}

#[test]
fn masked_fault_event_sets_ip_and_is_sent_when_unmasked() {
    // Arrange
    let mut rig = Rig::new(1, false);
    rig.fault(0x1000);
    let pending = rig.r32(FECTL);
    // Act
    rig.w32(FECTL, 0);
    // Assert
    assert_eq!(pending, (1 << 31) | (1 << 30));
    assert_eq!(rig.r32(FECTL), 0);
    assert_eq!(rig.irq.sent, [EVENT]);
}

#[test]
fn faults_while_ppf_is_set_are_recorded_without_another_event() {
    // Arrange
    let mut rig = Rig::new(4, true);
    rig.fault(0x1000);
    // Act
    rig.fault(0x2000);
    rig.fault(0x3000);
    // Assert
    assert_eq!(rig.irq.sent, [EVENT]);
    assert_eq!(rig.frcd(1).0, 0x2000);
    assert_eq!(rig.frcd(2).0, 0x3000);
    assert_eq!(rig.r32(FSTS), PPF, "FRI stays at the first record");
}

#[test]
fn full_records_overflow_into_pfo_and_drop_the_fault() {
    // Arrange
    let mut rig = Rig::new(2, true);
    rig.fault(0x1000);
    rig.fault(0x2000);
    // Act
    rig.fault(0x3000);
    rig.fault(0x4000);
    // Assert
    assert_eq!(rig.r32(FSTS), PPF | PFO);
    assert_eq!((rig.frcd(0).0, rig.frcd(1).0), (0x1000, 0x2000));
    let stats = rig.vtd.stats();
    assert_eq!((stats.faults_recorded, stats.faults_overflowed), (2, 2));
}

#[test]
fn clearing_f_bits_and_pfo_clears_fsts_and_frees_the_records() {
    // Arrange
    let mut rig = Rig::new(2, true);
    rig.fault(0x1000);
    rig.fault(0x2000);
    rig.fault(0x3000);
    // Act
    rig.w32(FRCD + 12, 1 << 31);
    rig.w64(FRCD + 16 + 8, F);
    rig.w32(FSTS, PFO);
    rig.fault(0x4000);
    // Assert
    assert_eq!(rig.frcd(0), (0x4000, F | (1 << 62) | (6 << 32) | 0x0113));
    assert_eq!(rig.r32(FSTS), PPF);
    assert_eq!(rig.irq.sent, [EVENT, EVENT]);
}

#[test]
fn fri_points_at_the_first_record_of_a_new_batch() {
    // Arrange
    let mut rig = Rig::new(4, false);
    rig.fault(0x1000);
    rig.w64(FRCD + 8, F);
    // Act
    rig.fault(0x2000);
    // Assert
    assert_eq!(rig.r32(FSTS), PPF | (1 << 8));
}

#[test]
fn identical_pending_fault_is_collapsed() {
    // Arrange
    let mut rig = Rig::new(4, true);
    rig.fault(0x1000);
    // Act
    rig.fault(0x1000);
    // Assert
    assert_eq!(rig.frcd(1), (0, 0));
    assert_eq!(rig.vtd.stats().faults_collapsed, 1);
}

#[test]
fn software_cannot_set_ppf_or_f_bits() {
    // Arrange
    let mut rig = Rig::new(1, true);
    // Act
    rig.w32(FSTS, !0);
    rig.w64(FRCD + 8, !0);
    rig.w64(FRCD, !0);
    // Assert
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(rig.frcd(0), (0, 0));
}
