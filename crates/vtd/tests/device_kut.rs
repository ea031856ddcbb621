//! kvm-unit-tests `x86/intel-iommu.c` replayed against `Vtd`: the same
//! register sequence (`GCMD = GSTS | cmd`), the same legacy tables (39-bit,
//! 3-level second stage, FPD set), the same IRTEs (full SID verification)
//! and interrupt formats; each of its 11 checks as an assertion.

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::regs::off::{CAP, FSTS, GCMD, GSTS, IRTA, RTADDR};
use memvisor_vtd::translate::DmaRequest;
use memvisor_vtd::{Config, Msi, RecordingSink, SourceId, TestMemory};

const TE: u32 = 1 << 31;
const SRTP: u32 = 1 << 30;
const QIE: u32 = 1 << 26;
const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;

const ROOT: u64 = 0x1000;
const IRT: u64 = 0x2000;
const CONTEXT: u64 = 0x3000;
const SL3: u64 = 0x4000;
const SL2: u64 = 0x5000;
const SL1: u64 = 0x6000;
const PAGE: u64 = 0x7000;
const EDU: SourceId = SourceId::new(0, 3, 0);

struct Guest {
    vtd: Vtd,
    mem: TestMemory,
    irq: RecordingSink,
}

impl Guest {
    fn new() -> Self {
        Self {
            vtd: Vtd::new(Config::default()).unwrap(),
            mem: TestMemory::new(Gpa::new(0), 16),
            irq: RecordingSink::default(),
        }
    }
    fn readl(&mut self, off: u64) -> u32 {
        let mut b = [0; 4];
        self.vtd.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn readq(&mut self, off: u64) -> u64 {
        let mut b = [0; 8];
        self.vtd.mmio_read(off, &mut b);
        u64::from_le_bytes(b)
    }
    fn writel(&mut self, off: u64, v: u32) {
        self.vtd.mmio_write(&self.mem, &mut self.irq, off, &v.to_le_bytes());
    }
    fn writeq(&mut self, off: u64, v: u64) {
        self.vtd.mmio_write(&self.mem, &mut self.irq, off, &v.to_le_bytes());
    }
    fn gcmd_or(&mut self, cmd: u32) {
        let status = self.readl(GSTS);
        self.writel(GCMD, status | cmd);
    }
    fn put(&self, gpa: u64, v: u64) {
        self.mem.write_u64(Gpa::new(gpa), v).unwrap();
    }

    /// `vtd_init()`.
    fn init(&mut self) {
        assert!(((self.readl(0) >> 4) & 0xf) >= 1, "major version >= 1");
        self.gcmd_or(QIE);
        self.writeq(RTADDR, ROOT);
        self.gcmd_or(SRTP);
        self.writeq(IRTA, IRT | 0xf);
        self.gcmd_or(SIRTP);
        self.gcmd_or(TE);
        self.gcmd_or(IRE);
    }

    /// `vtd_map_range(sid, 0, PAGE, 4K)`.
    fn map(&self) {
        self.put(ROOT + 16 * u64::from(EDU.bus()), CONTEXT | 1);
        let ce = CONTEXT + 16 * u64::from(EDU.devfn());
        self.put(ce, SL3 | 1 | 2); // P, FPD, TT = 0
        self.put(ce + 8, 1 | (u64::from(EDU.0) << 8)); // AW 39-bit, DID = SID
        self.put(SL3, SL2 | 3);
        self.put(SL2, SL1 | 3);
        self.put(SL1, PAGE | 3);
    }

    /// `vtd_setup_irte()`: FPD, physical, fixed, remapped, SVT 1, SQ 0.
    fn irte(&self, index: u64, vector: u64, level: bool) {
        let lo = 1 | 2 | (u64::from(level) << 4) | (vector << 16);
        let hi = u64::from(EDU.0) | (1 << 18);
        self.put(IRT + 16 * index, lo);
        self.put(IRT + 16 * index + 8, hi);
    }
}

#[test]
fn init_checks_pass() {
    // Arrange
    let mut g = Guest::new();
    // Act
    g.init();
    // Assert: the six "vtd_init" checks.
    let gsts = g.readl(GSTS);
    assert_eq!(g.readl(FSTS), 0, "fault status check");
    assert_ne!(gsts & QIE, 0, "QI enablement");
    assert_ne!(gsts & SRTP, 0, "DMAR table setup");
    assert_ne!(gsts & SIRTP, 0, "IR table setup");
    assert_ne!(gsts & TE, 0, "DMAR enablement");
    assert_ne!(gsts & IRE, 0, "IR enablement");
    let cap = g.readq(CAP);
    assert_ne!(cap & (0x2 << 8), 0, "DMAR support 39 bits address width");
    assert_ne!(cap & ((1 << 34) | (1 << 35)), 0, "DMAR support huge pages");
}

#[test]
fn dma_through_the_mapped_page_reaches_the_page() {
    // Arrange
    let mut g = Guest::new();
    g.init();
    g.map();
    // Act: the edu device writes 4 bytes at IOVA 4.
    let r = g.vtd.translate(&g.mem, &mut g.irq, &DmaRequest::write(EDU, 4));
    // Assert: "DMAR 4B memcpy test".
    let t = r.unwrap();
    assert_eq!(t.output, PAGE + 4);
    assert!(t.write);
    assert_eq!(g.readl(FSTS), 0);
}

#[test]
fn ioapic_interrupt_is_remapped_to_its_vector() {
    // Arrange
    let mut g = Guest::new();
    g.init();
    g.irte(1, 0xed, false);
    let rte = 0xed | (1 << 48) | (1 << 49);
    // Act: the IOAPIC's request carries no verified requester id (as QEMU's).
    let out = g.vtd.remap_ioapic(&g.mem, &mut g.irq, None, rte);
    // Assert: "IR IOAPIC".
    assert_eq!(out, Some(Msi { addr: 0xfee0_0000, data: 0xed }));
}

#[test]
fn msi_is_remapped_to_its_vector() {
    // Arrange
    let mut g = Guest::new();
    g.init();
    g.irte(2, 0xee, false);
    let msi = Msi { addr: 0xfee0_0000 | (2 << 5) | (1 << 4), data: 0 };
    // Act
    let out = g.vtd.remap_msi(&g.mem, &mut g.irq, EDU, msi);
    // Assert: "IR MSI".
    assert_eq!(out, Some(Msi { addr: 0xfee0_0000, data: 0xee }));
    assert_eq!(g.readl(FSTS), 0);
}
