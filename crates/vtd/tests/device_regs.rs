//! The register file through `Vtd`: access sizes and halves, CAP/ECAP per
//! configuration, the GCMD/GSTS protocol (kvm-unit-tests' init sequence),
//! register-based invalidation.

#[path = "support/mmio.rs"]
mod mmio;

use mmio::Mmio;

use std::sync::{Arc, Mutex};

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::regs::off::{CAP, CCMD, ECAP, FECTL, FSTS, GCMD, GSTS, IOTLB, IQA, IRTA, IVA, RTADDR};
use memvisor_vtd::{
    Config, ContextInval, Error, GuestTables, Invalidation, IotlbInval, Mode, Observer, RecordingSink,
    SourceId, StateChange, TestMemory,
};

const TE: u32 = 1 << 31;
const SRTP: u32 = 1 << 30;
const QIE: u32 = 1 << 26;
const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Inv(Invalidation),
    Change(StateChange),
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Observer for Log {
    fn invalidated(&mut self, inv: &Invalidation, _: &dyn GuestTables) {
        self.0.lock().unwrap().push(Seen::Inv(*inv));
    }
    fn state_changed(&mut self, change: StateChange, _: &dyn GuestTables) {
        self.0.lock().unwrap().push(Seen::Change(change));
    }
}

impl Log {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

struct Rig {
    vtd: Vtd,
    mem: TestMemory,
    irq: RecordingSink,
    log: Log,
}

impl Mmio for Rig {
    fn parts(&mut self) -> (&mut Vtd, &TestMemory, &mut RecordingSink) {
        (&mut self.vtd, &self.mem, &mut self.irq)
    }
}

impl Rig {
    fn new(config: Config) -> Self {
        let mut vtd = Vtd::new(config).unwrap();
        let log = Log::default();
        vtd.set_observer(Some(Box::new(log.clone())));
        Self { vtd, mem: TestMemory::new(Gpa::new(0), 64), irq: RecordingSink::default(), log }
    }
    /// kvm-unit-tests' `vtd_gcmd_or`: GCMD = GSTS | cmd.
    fn gcmd_or(&mut self, cmd: u32) {
        let status = self.r32(GSTS);
        self.w32(GCMD, status | cmd);
    }
}

fn cap(config: Config) -> (u64, u64) {
    let mut rig = Rig::new(config);
    (rig.r64(CAP), rig.r64(ECAP))
}

#[test]
fn version_reads_1_0() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    let ver = rig.r32(0);
    // Assert
    assert_eq!(ver, 0x10);
}

#[test]
fn low_and_high_dword_writes_compose_a_64_bit_register() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w32(IQA, 0x0012_3003);
    rig.w32(IQA + 4, 0x0000_0004);
    // Assert
    assert_eq!(rig.r64(IQA), 0x4_0012_3003);
    assert_eq!(rig.r32(IQA + 4), 4);
    assert_eq!(rig.r32(IQA), 0x0012_3003);
}

#[test]
fn read_only_registers_ignore_writes() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    let before = rig.r64(CAP);
    // Act
    rig.w64(CAP, !0);
    rig.w32(GSTS, !0);
    // Assert
    assert_eq!(rig.r64(CAP), before);
    assert_eq!(rig.r32(GSTS), 0);
}

#[test]
fn unsupported_sizes_and_misaligned_accesses_read_zero_and_do_nothing() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    let mut two = [0xffu8; 2];
    let mut odd = [0xffu8; 4];
    // Act
    rig.vtd.mmio_read(0, &mut two);
    rig.vtd.mmio_read(0x9, &mut odd);
    rig.vtd.mmio_write(&rig.mem, &mut rig.irq, GCMD, &[0, 0, 0, 4, 0, 0, 0]);
    rig.vtd.mmio_write(&rig.mem, &mut rig.irq, 0x1_0000_0000, &[1, 2, 3, 4]);
    // Assert
    assert_eq!(two, [0, 0]);
    assert_eq!(odd, [0; 4]);
    assert_eq!(rig.r32(GSTS), 0);
}

#[test]
fn gcmd_reads_zero_and_an_8_byte_read_at_gcmd_sees_gsts_above() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w32(GCMD, QIE);
    // Assert
    assert_eq!(rig.r32(GCMD), 0);
    assert_eq!(rig.r64(GCMD), u64::from(QIE) << 32);
}

#[test]
fn legacy_48_bit_cap_advertises_39_and_48_bit_sagaw_mgaw_and_large_pages() {
    // Arrange
    let config = Config::default();
    // Act
    let (cap, ecap) = cap(config);
    // Assert
    assert_eq!((cap >> 8) & 0x1f, 0b00110);
    assert_eq!((cap >> 16) & 0x3f, 47);
    assert_eq!(cap & (3 << 34), 3 << 34, "SLLPS");
    assert_ne!(cap & (1 << 39), 0, "PSI");
    assert_eq!((cap >> 24) & 0x3ff, 0x22, "FRO");
    assert_eq!((cap >> 40) & 0xff, 0, "NFR");
    assert_eq!((ecap >> 8) & 0x3ff, 0xf, "IRO");
    assert_eq!(ecap & 0b101_1010, 0b101_1010, "QI IR EIM PT");
    assert_eq!(ecap & (1 << 43), 0, "no SMTS");
}

#[test]
fn kvm_unit_tests_cap_checks_pass_for_every_width() {
    for aw in [39, 48, 57] {
        // Arrange
        let config = Config { address_width: aw, ..Config::default() };
        // Act
        let (cap, _) = cap(config);
        // Assert
        assert_ne!(cap & (0x2 << 8), 0, "SAGAW 39-bit at aw {aw}");
        assert_ne!(cap & ((1 << 34) | (1 << 35)), 0, "SLLPS at aw {aw}");
    }
}

#[test]
fn address_width_57_adds_5_level_sagaw_and_first_stage_5_level() {
    // Arrange
    let config = Config { address_width: 57, mode: Mode::ScalableFirstStage, ..Config::default() };
    // Act
    let (cap, _) = cap(config);
    // Assert
    assert_eq!((cap >> 8) & 0x1f, 0b01110);
    assert_eq!((cap >> 16) & 0x3f, 56);
    assert_ne!(cap & (1 << 60), 0, "FS5LP");
    assert_ne!(cap & (1 << 56), 0, "FS1GP");
}

#[test]
fn scalable_modes_advertise_their_stages() {
    // Arrange
    let modes = [
        (Mode::ScalableSecondStage, true, false, false),
        (Mode::ScalableFirstStage, false, true, false),
        (Mode::ScalableNested, true, true, true),
    ];
    for (mode, ss, fs, nest) in modes {
        // Act
        let (_, ecap) = cap(Config { mode, pasid_bits: 20, ..Config::default() });
        // Assert
        assert_ne!(ecap & (1 << 43), 0, "SMTS {mode:?}");
        assert_ne!(ecap & (1 << 40), 0, "PASID {mode:?}");
        assert_eq!((ecap >> 35) & 0x1f, 19, "PSS {mode:?}");
        assert_eq!(ecap & (1 << 46) != 0, ss, "SSTS {mode:?}");
        assert_eq!(ecap & (1 << 47) != 0, fs, "FSTS {mode:?}");
        assert_eq!(ecap & (1 << 26) != 0, nest, "NEST {mode:?}");
    }
}

#[test]
fn caching_mode_and_fault_records_show_in_cap() {
    // Arrange
    let config = Config { caching_mode: true, fault_records: 8, ..Config::default() };
    // Act
    let (cap, _) = cap(config);
    // Assert
    assert_ne!(cap & (1 << 7), 0);
    assert_eq!((cap >> 40) & 0xff, 7);
}

#[test]
fn without_interrupt_remapping_ecap_has_neither_ir_nor_eim() {
    // Arrange
    let config = Config { interrupt_remapping: false, ..Config::default() };
    // Act
    let (_, ecap) = cap(config);
    // Assert
    assert_eq!(ecap & 0b11000, 0);
}

#[test]
fn out_of_range_configuration_is_refused() {
    // Arrange
    let bad = [
        Config { address_width: 40, ..Config::default() },
        Config { host_address_width: 60, ..Config::default() },
        Config { fault_records: 0, ..Config::default() },
        Config { fault_records: 257, ..Config::default() },
        Config { mode: Mode::ScalableNested, pasid_bits: 0, ..Config::default() },
    ];
    for config in bad {
        // Act
        let r = Vtd::new(config);
        // Assert
        assert!(matches!(r, Err(Error::Config(_))), "{config:?}");
    }
}

#[test]
fn many_fault_records_grow_the_mmio_window() {
    // Arrange
    let config = Config { fault_records: 256, ..Config::default() };
    // Act
    let vtd = Vtd::new(config).unwrap();
    // Assert
    assert_eq!(vtd.mmio_size(), 0x2000);
    assert_eq!(Vtd::new(Config::default()).unwrap().mmio_size(), 0x1000);
}

#[test]
fn kvm_unit_tests_init_sequence_ends_with_clean_fsts_and_all_status_bits() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act: vtd_init()
    rig.gcmd_or(QIE);
    rig.w64(RTADDR, 0x5000);
    rig.gcmd_or(SRTP);
    rig.w64(IRTA, 0x6000 | 0xf);
    rig.gcmd_or(SIRTP);
    rig.gcmd_or(TE);
    rig.gcmd_or(IRE);
    // Assert
    let gsts = rig.r32(GSTS);
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(gsts & (QIE | SRTP | SIRTP | TE | IRE), QIE | SRTP | SIRTP | TE | IRE);
    assert_eq!(rig.r64(RTADDR) & !0xfff, 0x5000);
    assert_eq!(rig.r64(IRTA), 0x600f);
    let root = rig.vtd.root_state();
    assert_eq!((root.rtaddr, root.scalable, root.enabled), (0x5000, false, true));
    assert_eq!(rig.vtd.registers().ir_table().entries, 65536);
    assert!(rig.irq.sent.is_empty());
}

#[test]
fn gsts_or_cmd_pattern_reports_each_persistent_change_once() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.gcmd_or(TE);
    rig.gcmd_or(IRE);
    rig.gcmd_or(QIE);
    // Assert
    let changes: Vec<_> = rig
        .log
        .seen()
        .into_iter()
        .filter(|s| matches!(s, Seen::Change(StateChange::TranslationEnable(_) | StateChange::IrEnable(_))))
        .collect();
    assert_eq!(
        changes,
        [Seen::Change(StateChange::TranslationEnable(true)), Seen::Change(StateChange::IrEnable(true))]
    );
}

#[test]
fn clearing_te_disables_translation_and_reports_it() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.gcmd_or(TE);
    // Act
    rig.w32(GCMD, 0);
    // Assert
    assert_eq!(rig.r32(GSTS) & TE, 0);
    assert!(!rig.vtd.root_state().enabled);
    assert_eq!(rig.log.seen().last(), Some(&Seen::Change(StateChange::TranslationEnable(false))));
}

#[test]
fn legacy_unit_ignores_the_scalable_ttm_bit() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w64(RTADDR, 0x7000 | (1 << 10));
    rig.w32(GCMD, SRTP);
    // Assert
    assert_eq!(rig.r64(RTADDR), 0x7000);
    assert!(!rig.vtd.root_state().scalable);
}

#[test]
fn scalable_unit_latches_ttm_on_srtp_only() {
    // Arrange
    let mut rig = Rig::new(Config { mode: Mode::ScalableSecondStage, ..Config::default() });
    rig.w64(RTADDR, 0x7000 | (1 << 10));
    let before = rig.vtd.root_state();
    // Act
    rig.w32(GCMD, SRTP);
    // Assert
    assert_eq!(before.rtaddr, 0);
    assert_eq!(rig.vtd.root_state().rtaddr, 0x7000);
    assert!(rig.vtd.root_state().scalable);
    assert_eq!(rig.log.seen(), [Seen::Change(StateChange::RootTable)]);
}

#[test]
fn ccmd_global_invalidation_reaches_the_observer_and_clears_icc() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w64(CCMD, (1 << 63) | (1 << 61));
    // Assert
    let ccmd = rig.r64(CCMD);
    assert_eq!(ccmd >> 63, 0, "ICC clears");
    assert_eq!((ccmd >> 59) & 3, 1, "CAIG global");
    assert_eq!(rig.log.seen(), [Seen::Inv(Invalidation::Context(ContextInval::Global))]);
    assert_eq!(rig.vtd.stats().invalidations.context, 1);
}

#[test]
fn ccmd_written_as_two_dwords_fires_on_the_high_half() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.w32(CCMD, (0x0310 << 16) | 7);
    assert!(rig.log.seen().is_empty());
    // Act
    rig.w32(CCMD + 4, (1 << 31) | (3 << 29) | 2);
    // Assert
    let want = ContextInval::Device { did: 7, sid: SourceId(0x0310), fm: 2 };
    assert_eq!(rig.log.seen(), [Seen::Inv(Invalidation::Context(want))]);
    assert_eq!((rig.r64(CCMD) >> 59) & 3, 3);
}

#[test]
fn iotlb_page_invalidation_uses_iva_and_reports_iaig() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.w64(IVA, 0x1234_5000 | (1 << 6) | 3);
    // Act
    rig.w64(IOTLB, (1 << 63) | (3 << 60) | (9 << 32));
    // Assert
    let want = IotlbInval::Page { did: 9, addr: 0x1234_5000, am: 3, ih: true };
    assert_eq!(rig.log.seen(), [Seen::Inv(Invalidation::Iotlb(want))]);
    let reg = rig.r64(IOTLB);
    assert_eq!((reg >> 63, (reg >> 57) & 3), (0, 3));
}

#[test]
fn iotlb_domain_invalidation_through_the_high_dword() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    rig.w32(IOTLB + 4, (1 << 31) | (2 << 28) | 5);
    // Assert
    assert_eq!(rig.log.seen(), [Seen::Inv(Invalidation::Iotlb(IotlbInval::Domain(5)))]);
}

#[test]
fn register_invalidation_is_not_performed_while_qi_is_enabled() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    rig.w32(GCMD, QIE);
    // Act
    rig.w64(CCMD, (1 << 63) | (1 << 61));
    rig.w64(IOTLB, (1 << 63) | (1 << 60));
    // Assert
    assert!(rig.log.seen().is_empty());
    let (ccmd, iotlb) = (rig.r64(CCMD), rig.r64(IOTLB));
    assert_eq!((ccmd >> 63, (ccmd >> 59) & 3), (0, 0), "ICC clear, CAIG 0");
    assert_eq!((iotlb >> 63, (iotlb >> 57) & 3), (0, 0), "IVT clear, IAIG 0");
}

#[test]
fn fectl_resets_masked() {
    // Arrange
    let mut rig = Rig::new(Config::default());
    // Act
    let fectl = rig.r32(FECTL);
    // Assert
    assert_eq!(fectl, 1 << 31);
}
