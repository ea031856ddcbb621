//! Specification checks of the register/command half (regs, qi, fault, ir, device) against
//! the VT-d specification, Linux's driver and QEMU's model: one test per
//! behaviour a guest driver relies on.

#[path = "support/mmio.rs"]
mod mmio;

use mmio::Mmio;

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::regs::off::{
    CCMD, FEADDR, FECTL, FEDATA, FRCD, FSTS, GCMD, GSTS, ICS, IEADDR, IECTL, IEDATA, IOTLB, IQA, IQH, IQT,
    IRTA, IVA,
};
use memvisor_vtd::{Config, FaultInfo, FaultSource, Msi, RecordingSink, SourceId, TestMemory};

const QIE: u32 = 1 << 26;
const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;
const IM: u32 = 1 << 31;
const IP: u32 = 1 << 30;
const PPF: u32 = 1 << 1;
const PFO: u32 = 1;
const IQE: u32 = 1 << 4;

const QUEUE: u64 = 0x10000;
const TABLE: u64 = 0x6000;
const FAULT_EVENT: Msi = Msi { addr: 0xfee0_0000, data: 0x41 };
const DONE_EVENT: Msi = Msi { addr: 0xfee0_1000, data: 0x42 };

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
    fn new(config: Config) -> Self {
        let mut rig = Self {
            vtd: Vtd::new(config).unwrap(),
            mem: TestMemory::new(Gpa::new(0), 64),
            irq: RecordingSink::default(),
        };
        rig.w32(FEDATA, FAULT_EVENT.data);
        rig.w32(FEADDR, 0xfee0_0000);
        rig.w32(IEDATA, DONE_EVENT.data);
        rig.w32(IEADDR, 0xfee0_1000);
        rig
    }
    /// QI on with a one-page 128-bit queue at QUEUE.
    fn enable_qi(&mut self) {
        self.w64(IQA, QUEUE);
        self.w32(GCMD, QIE);
    }
    fn submit(&mut self, descs: &[[u64; 2]]) {
        let mut tail = self.r64(IQT) >> 4;
        for [lo, hi] in descs {
            self.mem.write_u64(Gpa::new(QUEUE + 16 * tail), *lo).unwrap();
            self.mem.write_u64(Gpa::new(QUEUE + 16 * tail + 8), *hi).unwrap();
            tail = (tail + 1) % 256;
        }
        self.w64(IQT, tail << 4);
    }
    fn fault(&mut self, addr: u64) {
        let info = FaultInfo {
            source: FaultSource::Dma,
            sid: SourceId::new(1, 2, 3),
            pasid: None,
            addr,
            reason: 6,
            write: false,
            exec: false,
            privileged: false,
        };
        self.vtd.record_fault(&mut self.irq, &info);
    }
}

#[test]
fn gcmd_is_write_only_and_reads_zero() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w32(GCMD, QIE);
    // Assert
    assert_eq!(rig.r32(GCMD), 0);
    assert_eq!(rig.r32(GSTS) & QIE, QIE);
}

#[test]
fn ccmd_high_dword_write_triggers_the_invalidation() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.w32(CCMD, 0x0000_0007);
    // Act: ICC | CIRG = domain.
    rig.w32(CCMD + 4, (1 << 31) | (2 << 29));
    // Assert: ICC clear, CAIG = domain, DID kept.
    let v = rig.r64(CCMD);
    assert_eq!(v >> 63, 0);
    assert_eq!((v >> 59) & 3, 2);
    assert_eq!(v & 0xffff, 7);
    assert_eq!(rig.vtd.stats().invalidations.context, 1);
}

#[test]
fn ccmd_low_dword_write_alone_does_nothing() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w32(CCMD, 0x0000_0007);
    // Assert
    assert_eq!(rig.vtd.stats().invalidations.context, 0);
}

#[test]
fn iotlb_high_dword_write_triggers_a_page_selective_invalidation() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.w64(IVA, 0x1234_5000 | 2);
    rig.w32(IOTLB, 0);
    // Act: IVT | IIRG = page | DID 9.
    rig.w32(IOTLB + 4, (1 << 31) | (3 << 28) | 9);
    // Assert
    let v = rig.r64(IOTLB);
    assert_eq!(v >> 63, 0);
    assert_eq!((v >> 57) & 3, 3);
    assert_eq!(rig.vtd.stats().invalidations.iotlb, 1);
}

#[test]
fn frcd_f_bit_clears_by_writing_one_to_the_top_dword() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.fault(0x5000);
    assert_eq!(rig.r32(FSTS) & PPF, PPF);
    assert_eq!(rig.r32(FECTL) & IP, IP, "masked event stays pending");
    // Act
    rig.w32(FRCD + 12, 1 << 31);
    // Assert
    assert_eq!(rig.r64(FRCD + 8) >> 63, 0);
    assert_eq!(rig.r32(FSTS) & PPF, 0);
    assert_eq!(rig.r32(FECTL) & IP, 0, "IP clears once every status is serviced");
    assert!(rig.irq.sent.is_empty());
}

#[test]
fn masked_fault_event_is_delivered_on_unmask() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.fault(0x5000);
    assert!(rig.irq.sent.is_empty());
    // Act
    rig.w32(FECTL, 0);
    // Assert
    assert_eq!(rig.irq.sent, [FAULT_EVENT]);
    assert_eq!(rig.r32(FECTL) & IP, 0);
}

#[test]
fn overflow_with_one_record_sets_pfo_without_a_second_event() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.w32(FECTL, 0);
    rig.fault(0x5000);
    // Act
    rig.fault(0x6000);
    // Assert
    assert_eq!(rig.r32(FSTS) & (PFO | PPF), PFO | PPF);
    assert_eq!(rig.irq.sent, [FAULT_EVENT]);
}

#[test]
fn queue_error_event_is_delivered_on_unmask_and_clearing_iqe_resumes() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.enable_qi();
    // Act: type 0 is invalid.
    rig.submit(&[[0x10, 0]]);
    // Assert
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
    assert_eq!(rig.r64(IQH), 0);
    assert_eq!(rig.r32(FECTL), IM | IP);
    rig.w32(FECTL, 0);
    assert_eq!(rig.irq.sent, [FAULT_EVENT]);
    // Fix the descriptor (wait, status write) and clear IQE.
    rig.mem.write_u64(Gpa::new(QUEUE), 0x5 | (1 << 5) | (0xabcd << 32)).unwrap();
    rig.mem.write_u64(Gpa::new(QUEUE + 8), 0x3000).unwrap();
    rig.w32(FSTS, IQE);
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(rig.r64(IQH), 0x10);
    assert_eq!(rig.mem.read_u64(Gpa::new(0x3000)).unwrap() & 0xffff_ffff, 0xabcd);
}

#[test]
fn wait_with_status_write_and_interrupt_does_both() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.enable_qi();
    rig.w32(IECTL, 0);
    // Act
    rig.submit(&[[0x5 | (1 << 4) | (1 << 5) | (7 << 32), 0x3000]]);
    // Assert
    assert_eq!(rig.mem.read_u64(Gpa::new(0x3000)).unwrap() & 0xffff_ffff, 7);
    assert_eq!(rig.r32(ICS), 1);
    assert_eq!(rig.irq.sent, [DONE_EVENT]);
}

#[test]
fn queue_of_eight_pages_wraps_at_2048_descriptors() {
    // Arrange: QS = 3.
    let mut rig = Rig::new(Config::default());
    rig.w64(IQA, QUEUE | 3);
    rig.w32(GCMD, QIE);
    // Act: a tail at the last slot is valid, one past it is not.
    rig.w64(IQT, 2047 << 4);
    // Assert: descriptors of zeros (type 0) set IQE at slot 0, not a tail error.
    assert_eq!(rig.r64(IQH), 0);
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
}

#[test]
fn disabling_qi_resets_iqh_and_reenabling_starts_at_zero() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.enable_qi();
    rig.submit(&[[0x5 | (1 << 5), 0x3000], [0x5 | (1 << 5), 0x3000]]);
    assert_eq!(rig.r64(IQH), 0x20);
    // Act
    rig.w32(GCMD, 0);
    // Assert
    assert_eq!(rig.r32(GSTS) & QIE, 0);
    assert_eq!(rig.r64(IQH), 0);
}

#[test]
fn irta_written_as_two_dwords_is_latched_by_sirtp() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w32(IRTA, 0x6000 | 7);
    rig.w32(IRTA + 4, 0x1);
    rig.w32(GCMD, SIRTP);
    // Assert
    let t = rig.vtd.registers().ir_table();
    assert_eq!(t.base, 0x1_0000_6000);
    assert_eq!(t.entries, 256);
    assert_eq!(rig.r32(GSTS) & SIRTP, SIRTP);
}

#[test]
fn gsts_or_command_pattern_keeps_persistent_state() {
    // Arrange: kvm-unit-tests / "GCMD = GSTS | cmd".
    let mut rig = Rig::new(Config::default());
    rig.enable_qi();
    rig.w64(IRTA, TABLE | 7);
    let s = rig.r32(GSTS);
    rig.w32(GCMD, s | SIRTP);
    let s = rig.r32(GSTS);
    // Act
    rig.w32(GCMD, s | IRE);
    // Assert
    assert_eq!(rig.r32(GSTS) & (QIE | IRE | SIRTP), QIE | IRE | SIRTP);
}

/// An IRTE verifying the requester's bus against a range (SVT = 10b).
fn bus_range_irte(rig: &Rig, index: u64, sid_field: u16) {
    let lo = 1 | (0xee << 16);
    let hi = u64::from(sid_field) | (2 << 18);
    rig.mem.write_u64(Gpa::new(TABLE + 16 * index), lo).unwrap();
    rig.mem.write_u64(Gpa::new(TABLE + 16 * index + 8), hi).unwrap();
}

fn remappable(index: u64) -> Msi {
    Msi { addr: 0xfee0_0000 | ((index & 0x7fff) << 5) | (1 << 4), data: 0 }
}

#[test]
fn bus_range_verification_takes_start_bus_from_the_upper_byte() {
    // Arrange: Linux's set_irte_verify_bus(start 2, end 5) writes
    // (start << 8) | end; the spec: "StartBus# and EndBus# in the upper and
    // lower 8 bits of the SID field respectively".
    let mut rig = Rig::new(Config::default());
    rig.enable_qi();
    rig.w64(IRTA, TABLE | 7);
    rig.w32(GCMD, QIE | SIRTP);
    rig.w32(GCMD, QIE | IRE);
    bus_range_irte(&rig, 1, (2 << 8) | 5);
    // Act
    let inside = [2u8, 3, 5]
        .map(|bus| rig.vtd.remap_msi(&rig.mem, &mut rig.irq, SourceId::new(bus, 0, 0), remappable(1)));
    let below = rig.vtd.remap_msi(&rig.mem, &mut rig.irq, SourceId::new(1, 0, 0), remappable(1));
    let above = rig.vtd.remap_msi(&rig.mem, &mut rig.irq, SourceId::new(6, 0, 0), remappable(1));
    // Assert
    assert!(inside.iter().all(Option::is_some), "{inside:?}");
    assert_eq!(below, None);
    assert_eq!(above, None);
}

#[test]
fn eight_byte_write_at_0x30_clears_iqe_and_resumes_the_queue() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.enable_qi();
    rig.submit(&[[0x10, 0]]);
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
    rig.mem.write_u64(Gpa::new(QUEUE), 0x5 | (1 << 5) | (0x77 << 32)).unwrap();
    rig.mem.write_u64(Gpa::new(QUEUE + 8), 0x3000).unwrap();
    // Act: FSTS is the upper dword of the quadword at 0x30.
    rig.w64(0x30, u64::from(IQE) << 32);
    // Assert
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(rig.r64(IQH), 0x10);
    assert_eq!(rig.mem.read_u64(Gpa::new(0x3000)).unwrap() & 0xffff_ffff, 0x77);
}

#[test]
fn eight_byte_write_to_the_frcd_high_quadword_clears_f() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.fault(0x5000);
    // Act
    rig.w64(FRCD + 8, 1 << 63);
    // Assert
    assert_eq!(rig.r64(FRCD + 8) >> 63, 0);
    assert_eq!(rig.r32(FSTS), 0);
}

#[test]
fn eight_byte_fectl_write_unmasks_with_the_new_data() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.fault(0x5000);
    // Act: FECTL = 0 and FEDATA = 0x55 in one access.
    rig.w64(FECTL, 0x55 << 32);
    // Assert
    assert_eq!(rig.irq.sent, [Msi { addr: 0xfee0_0000, data: 0x55 }]);
}

#[test]
fn wide_queue_error_leaves_iqh_in_32_byte_units() {
    // Arrange
    let config = Config { mode: memvisor_vtd::Mode::ScalableNested, ..Config::default() };
    let mut rig = Rig::new(config);
    rig.w64(IQA, QUEUE | (1 << 11));
    rig.w32(GCMD, QIE);
    let wait = 0x5 | (1 << 5);
    for (i, q) in [wait, 0x3000, 0, 0, 0x10, 0, 0, 0].iter().enumerate() {
        rig.mem.write_u64(Gpa::new(QUEUE + 8 * i as u64), *q).unwrap();
    }
    // Act
    rig.w64(IQT, 2 << 5);
    // Assert
    assert_eq!(rig.r64(IQH), 1 << 5);
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
}

#[test]
fn x2apic_compatibility_format_is_blocked_even_with_cfi() {
    // Arrange
    let config = Config { x2apic: true, ..Config::default() };
    let mut rig = Rig::new(config);
    rig.enable_qi();
    rig.w64(IRTA, TABLE | (1 << 11) | 7);
    rig.w32(GCMD, QIE | SIRTP);
    rig.w32(GCMD, QIE | IRE | (1 << 23));
    // Act
    let out = rig.vtd.remap_msi(
        &rig.mem,
        &mut rig.irq,
        SourceId::new(0, 3, 0),
        Msi { addr: 0xfee0_0000, data: 0x30 },
    );
    // Assert
    assert_eq!(out, None);
    assert_eq!((rig.r64(FRCD + 8) >> 32) & 0xff, 0x25);
}
