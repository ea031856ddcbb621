//! Interrupt remapping through `Vtd`: remappable MSIs and IOAPIC entries,
//! source-id verification, faults, the interrupt entry cache, compatibility
//! format.

#[path = "support/mmio.rs"]
mod mmio;

use mmio::Mmio;

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::regs::off::{FRCD, GCMD, GSTS, IQA, IQT, IRTA};
use memvisor_vtd::{Config, Msi, RecordingSink, SourceId, TestMemory};

const QIE: u32 = 1 << 26;
const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;
const CFI: u32 = 1 << 23;
const TABLE: u64 = 0x6000;
const QUEUE: u64 = 0x10000;
const EDU: SourceId = SourceId::new(0, 3, 0);

struct Rig {
    vtd: Vtd,
    mem: TestMemory,
    irq: RecordingSink,
}

/// Fields of a remapped-format IRTE.
#[derive(Clone, Copy)]
struct Entry {
    vector: u8,
    dst: u32,
    sid: u16,
    sq: u64,
    svt: u64,
    tm: bool,
    fpd: bool,
    present: bool,
}

impl Default for Entry {
    fn default() -> Self {
        Self { vector: 0xee, dst: 0, sid: EDU.0, sq: 0, svt: 1, tm: false, fpd: false, present: true }
    }
}

impl Entry {
    fn raw(self) -> [u64; 2] {
        let lo = u64::from(self.present)
            | (u64::from(self.fpd) << 1)
            | (u64::from(self.tm) << 4)
            | (u64::from(self.vector) << 16)
            | (u64::from(self.dst) << 32);
        let hi = u64::from(self.sid) | (self.sq << 16) | (self.svt << 18);
        [lo, hi]
    }
}

impl Mmio for Rig {
    fn parts(&mut self) -> (&mut Vtd, &TestMemory, &mut RecordingSink) {
        (&mut self.vtd, &self.mem, &mut self.irq)
    }
}

impl Rig {
    /// IR table of 256 entries at TABLE (EIME if `x2apic`), IR enabled the
    /// kvm-unit-tests way, QI enabled with its queue at QUEUE.
    fn new(x2apic: bool) -> Self {
        let mut rig = Self {
            vtd: Vtd::new(Config::default()).unwrap(),
            mem: TestMemory::new(Gpa::new(0), 64),
            irq: RecordingSink::default(),
        };
        rig.w64(IQA, QUEUE);
        rig.gcmd_or(QIE);
        let eime = if x2apic { 1 << 11 } else { 0 };
        rig.w64(IRTA, TABLE | eime | 7);
        rig.gcmd_or(SIRTP);
        rig.gcmd_or(IRE);
        rig
    }
    fn gcmd_or(&mut self, cmd: u32) {
        let status = self.r32(GSTS);
        self.w32(GCMD, status | cmd);
    }
    fn set_irte(&self, index: u64, e: Entry) {
        let [lo, hi] = e.raw();
        self.mem.write_u64(Gpa::new(TABLE + 16 * index), lo).unwrap();
        self.mem.write_u64(Gpa::new(TABLE + 16 * index + 8), hi).unwrap();
    }
    fn msi(&mut self, sid: SourceId, msi: Msi) -> Option<Msi> {
        self.vtd.remap_msi(&self.mem, &mut self.irq, sid, msi)
    }
    /// Queues one descriptor and submits it.
    fn queue(&mut self, lo: u64, hi: u64) {
        let tail = self.r64(IQT) >> 4;
        self.mem.write_u64(Gpa::new(QUEUE + 16 * tail), lo).unwrap();
        self.mem.write_u64(Gpa::new(QUEUE + 16 * tail + 8), hi).unwrap();
        self.w64(IQT, (tail + 1) << 4);
    }
    fn fault_reason(&mut self) -> Option<u8> {
        let hi = self.r64(FRCD + 8);
        (hi >> 63 == 1).then_some(((hi >> 32) & 0xff) as u8)
    }
}

/// kvm-unit-tests' `vtd_setup_msi` address for IRTE `index` (SHV = 0).
fn remappable(index: u64) -> Msi {
    Msi { addr: 0xfee0_0000 | ((index & 0x7fff) << 5) | (1 << 4) | ((index >> 15) << 2), data: 0 }
}

/// kvm-unit-tests' `vtd_setup_ioapic_irq` entry for IRTE `index`.
fn ioapic_rte(index: u64, vector: u64, level: bool) -> u64 {
    vector | (u64::from(level) << 15) | ((index >> 15) << 11) | (1 << 48) | ((index & 0x7fff) << 49)
}

#[test]
fn remappable_msi_gets_the_irte_vector_and_xapic_destination() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(1, Entry { vector: 0xee, dst: 5 << 8, ..Entry::default() });
    // Act
    let out = rig.msi(EDU, remappable(1));
    // Assert
    assert_eq!(out, Some(Msi { addr: 0xfee0_5000, data: 0xee }));
    assert_eq!(rig.vtd.stats().interrupts_remapped, 1);
}

#[test]
fn x2apic_mode_uses_the_32_bit_destination() {
    // Arrange
    let mut rig = Rig::new(true);
    rig.set_irte(2, Entry { vector: 0x31, dst: 0x0001_2345, tm: true, ..Entry::default() });
    // Act
    let out = rig.msi(EDU, remappable(2));
    // Assert
    assert_eq!(out, Some(Msi { addr: (0x0001_2300 << 32) | 0xfee4_5000, data: 0x31 | (1 << 15) }));
}

#[test]
fn ioapic_remappable_entry_is_delivered_without_source_verification_like_qemu() {
    // Arrange: kvm-unit-tests programs the IOAPIC's IRTE with the PCI device's SID.
    let mut rig = Rig::new(false);
    rig.set_irte(3, Entry { vector: 0xed, tm: true, ..Entry::default() });
    // Act
    let out = rig.vtd.remap_ioapic(&rig.mem, &mut rig.irq, None, ioapic_rte(3, 0xed, false));
    // Assert: the entry's trigger mode is the RTE's (edge).
    assert_eq!(out, Some(Msi { addr: 0xfee0_0000, data: 0xed }));
}

#[test]
fn ioapic_entry_from_a_wrong_source_is_blocked_when_verified() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(3, Entry { vector: 0xed, ..Entry::default() });
    // Act
    let ioapic = SourceId(0xf0f8);
    let out = rig.vtd.remap_ioapic(&rig.mem, &mut rig.irq, Some(ioapic), ioapic_rte(3, 0xed, true));
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), Some(0x26));
}

#[test]
fn index_15_of_the_handle_selects_the_upper_half_of_a_large_table() {
    // Arrange
    let mut rig = Rig::new(false);
    // Act: 0x8001 ≥ 256 entries.
    let out = rig.msi(EDU, remappable(0x8001));
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), Some(0x21));
    assert_eq!(rig.r64(FRCD), 0x8001 << 48);
}

#[test]
fn source_id_mismatch_records_fault_0x26_and_blocks() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(1, Entry::default());
    // Act
    let out = rig.msi(SourceId::new(0, 4, 0), remappable(1));
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), Some(0x26));
    assert_eq!(rig.r64(FRCD + 8) & 0xffff, u64::from(SourceId::new(0, 4, 0).0));
    assert_eq!(rig.vtd.stats().interrupts_blocked, 1);
}

#[test]
fn source_qualifier_ignores_the_function_bits_it_names() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(1, Entry { sq: 3, ..Entry::default() });
    // Act
    let out = rig.msi(SourceId::new(0, 3, 7), remappable(1));
    // Assert
    assert!(out.is_some());
}

#[test]
fn bus_range_verification_accepts_buses_in_range_only() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(1, Entry { svt: 2, sid: (2 << 8) | 5, ..Entry::default() });
    // Act
    let inside = rig.msi(SourceId::new(4, 0, 0), remappable(1));
    let outside = rig.msi(SourceId::new(6, 0, 0), remappable(1));
    // Assert: start bus 2 in SID 15:8, end bus 5 in 7:0.
    assert!(inside.is_some());
    assert_eq!(outside, None);
}

#[test]
fn not_present_irte_records_fault_0x22() {
    // Arrange
    let mut rig = Rig::new(false);
    // Act
    let out = rig.msi(EDU, remappable(9));
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), Some(0x22));
}

#[test]
fn fpd_suppresses_the_not_present_fault_but_still_blocks() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(9, Entry { present: false, fpd: true, ..Entry::default() });
    // Act
    let out = rig.msi(EDU, remappable(9));
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), None);
    assert_eq!(rig.vtd.stats().faults_suppressed, 1);
}

#[test]
fn reserved_or_posted_irte_records_fault_0x24() {
    for [lo, hi] in [[1 | (1 << 12), 0], [1 | (1 << 15), 0], [1, 1 << 40], [1, 3 << 18], [1 | (1 << 32), 0]] {
        // Arrange
        let mut rig = Rig::new(false);
        rig.mem.write_u64(Gpa::new(TABLE + 16), lo).unwrap();
        rig.mem.write_u64(Gpa::new(TABLE + 24), hi).unwrap();
        // Act
        let out = rig.msi(EDU, remappable(1));
        // Assert
        assert_eq!(out, None, "{lo:#x} {hi:#x}");
        assert_eq!(rig.fault_reason(), Some(0x24), "{lo:#x} {hi:#x}");
    }
}

#[test]
fn subhandle_is_added_to_the_handle_when_shv_is_set() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(7, Entry { vector: 0x77, ..Entry::default() });
    let msi = Msi { addr: remappable(4).addr | (1 << 3), data: 3 };
    // Act
    let out = rig.msi(EDU, msi);
    // Assert
    assert_eq!(out.map(|m| m.data), Some(0x77));
}

#[test]
fn reserved_data_bits_with_shv_record_fault_0x20() {
    // Arrange
    let mut rig = Rig::new(false);
    let msi = Msi { addr: remappable(4).addr | (1 << 3), data: 1 << 16 };
    // Act
    let out = rig.msi(EDU, msi);
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), Some(0x20));
}

#[test]
fn cached_irte_is_used_until_an_iec_invalidation() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(1, Entry { vector: 0x40, ..Entry::default() });
    rig.msi(EDU, remappable(1));
    rig.set_irte(1, Entry { vector: 0x41, ..Entry::default() });
    // Act
    let stale = rig.msi(EDU, remappable(1));
    rig.queue(0x4 | (1 << 4) | (1 << 32), 0);
    let fresh = rig.msi(EDU, remappable(1));
    // Assert
    assert_eq!(stale.map(|m| m.data), Some(0x40));
    assert_eq!(fresh.map(|m| m.data), Some(0x41));
    assert_eq!(rig.vtd.stats().iec_hits, 1);
}

#[test]
fn index_selective_iec_invalidation_keeps_other_entries() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.set_irte(1, Entry { vector: 0x40, ..Entry::default() });
    rig.set_irte(8, Entry { vector: 0x50, ..Entry::default() });
    rig.msi(EDU, remappable(1));
    rig.msi(EDU, remappable(8));
    rig.set_irte(1, Entry { vector: 0x41, ..Entry::default() });
    rig.set_irte(8, Entry { vector: 0x51, ..Entry::default() });
    // Act: indices 0..=3 (index 2, mask 2).
    rig.queue(0x4 | (1 << 4) | (2 << 27) | (2 << 32), 0);
    // Assert
    assert_eq!(rig.msi(EDU, remappable(1)).map(|m| m.data), Some(0x41));
    assert_eq!(rig.msi(EDU, remappable(8)).map(|m| m.data), Some(0x50));
}

#[test]
fn compatibility_format_is_blocked_without_cfi() {
    // Arrange
    let mut rig = Rig::new(false);
    let msi = Msi { addr: 0xfee0_1000, data: 0x30 };
    // Act
    let out = rig.msi(EDU, msi);
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), Some(0x25));
}

#[test]
fn compatibility_format_passes_with_cfi() {
    // Arrange
    let mut rig = Rig::new(false);
    rig.gcmd_or(CFI);
    let msi = Msi { addr: 0xfee0_1000, data: 0x30 };
    // Act
    let out = rig.msi(EDU, msi);
    // Assert
    assert_eq!(out, Some(msi));
    assert_eq!(rig.r32(GSTS) & CFI, CFI);
}

#[test]
fn compatibility_format_is_blocked_in_x2apic_mode_even_with_cfi() {
    // Arrange
    let mut rig = Rig::new(true);
    rig.gcmd_or(CFI);
    // Act
    let out = rig.msi(EDU, Msi { addr: 0xfee0_1000, data: 0x30 });
    // Assert
    assert_eq!(out, None);
}

#[test]
fn with_remapping_off_msis_pass_unchanged() {
    // Arrange
    let mut vtd = Vtd::new(Config::default()).unwrap();
    let mem = TestMemory::new(Gpa::new(0), 1);
    let mut irq = RecordingSink::default();
    let msi = remappable(1);
    // Act
    let out = vtd.remap_msi(&mem, &mut irq, EDU, msi);
    // Assert
    assert_eq!(out, Some(msi));
}

#[test]
fn compatibility_ioapic_entry_becomes_the_xapic_msi_while_remapping_is_off() {
    // Arrange
    let mut vtd = Vtd::new(Config::default()).unwrap();
    let mem = TestMemory::new(Gpa::new(0), 1);
    let mut irq = RecordingSink::default();
    let rte = 0x31 | (1 << 8) | (1 << 11) | (1 << 15) | (0x0f << 56);
    // Act
    let out = vtd.remap_ioapic(&mem, &mut irq, Some(SourceId(0xf0f8)), rte);
    // Assert
    assert_eq!(out, Some(Msi { addr: 0xfee0_f004, data: 0x31 | (1 << 8) | (1 << 15) }));
}

#[test]
fn msi_outside_the_interrupt_window_records_fault_0x20() {
    // Arrange
    let mut rig = Rig::new(false);
    // Act
    let out = rig.msi(EDU, Msi { addr: 0xfed0_0010, data: 0 });
    // Assert
    assert_eq!(out, None);
    assert_eq!(rig.fault_reason(), Some(0x20));
}
