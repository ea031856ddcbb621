//! Queued invalidation through `Vtd`: descriptor decoding, IQE, wait
//! descriptors, 256-bit mode, wrap-around.

#[path = "support/mmio.rs"]
mod mmio;

use mmio::Mmio;

use std::sync::{Arc, Mutex};

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::regs::off::{FEADDR, FECTL, FEDATA, FSTS, GCMD, ICS, IEADDR, IECTL, IEDATA, IQA, IQH, IQT};
use memvisor_vtd::{
    Config, ContextInval, GuestMemory, GuestTables, IecInval, Invalidation, IotlbInval, Mode, Msi, Observer,
    PasidCacheInval, PiotlbInval, RecordingSink, SourceId, StateChange, TestMemory,
};

const QIE: u32 = 1 << 26;
const IQE: u32 = 1 << 4;
const QUEUE: u64 = 0x10000;
const STATUS: u64 = 0x20000;

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Invalidation>>>);

impl Observer for Log {
    fn invalidated(&mut self, inv: &Invalidation, _: &dyn GuestTables) {
        self.0.lock().unwrap().push(*inv);
    }
    fn state_changed(&mut self, _: StateChange, _: &dyn GuestTables) {}
}

struct Rig {
    vtd: Vtd,
    mem: TestMemory,
    irq: RecordingSink,
    log: Log,
    wide: bool,
}

impl Mmio for Rig {
    fn parts(&mut self) -> (&mut Vtd, &TestMemory, &mut RecordingSink) {
        (&mut self.vtd, &self.mem, &mut self.irq)
    }
}

impl Rig {
    /// QI enabled, queue of one page at QUEUE (256-bit descriptors if `wide`).
    fn new(config: Config, wide: bool) -> Self {
        let mut vtd = Vtd::new(config).unwrap();
        let log = Log::default();
        vtd.set_observer(Some(Box::new(log.clone())));
        let mut rig =
            Self { vtd, mem: TestMemory::new(Gpa::new(0), 64), irq: RecordingSink::default(), log, wide };
        let dw = if wide { 1 << 11 } else { 0 };
        rig.w64(IQA, QUEUE | dw);
        rig.w32(GCMD, QIE);
        rig
    }
    fn size(&self) -> u64 {
        if self.wide { 32 } else { 16 }
    }
    fn put(&self, index: u64, desc: [u64; 4]) {
        let at = QUEUE + index * self.size();
        let n = if self.wide { 4 } else { 2 };
        for (i, q) in desc.iter().take(n).enumerate() {
            self.mem.write_u64(Gpa::new(at + 8 * i as u64), *q).unwrap();
        }
    }
    /// Writes descriptors from the current tail and moves IQT past them.
    fn submit(&mut self, descs: &[[u64; 4]]) {
        let shift = if self.wide { 5 } else { 4 };
        let entries = 4096 / self.size();
        let mut tail = self.r64(IQT) >> shift;
        for d in descs {
            self.put(tail, *d);
            tail = (tail + 1) % entries;
        }
        self.w64(IQT, tail << shift);
    }
    fn seen(&self) -> Vec<Invalidation> {
        self.log.0.lock().unwrap().clone()
    }
}

fn d(lo: u64, hi: u64) -> [u64; 4] {
    [lo, hi, 0, 0]
}

fn scalable() -> Config {
    Config { mode: Mode::ScalableNested, ..Config::default() }
}

#[test]
fn legacy_descriptor_types_decode_into_their_invalidations() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    let descs = [
        d(0x1 | (1 << 4), 0),
        d(0x1 | (2 << 4) | (7 << 16), 0),
        d(0x1 | (3 << 4) | (7 << 16) | (0x0308 << 32) | (1 << 48), 0),
        d(0x2 | (1 << 4), 0),
        d(0x2 | (2 << 4) | (9 << 16), 0),
        d(0x2 | (3 << 4) | (9 << 16) | (3 << 6), 0xabc_d000 | (1 << 6) | 2),
        d(0x3 | (0x0308 << 32), 0x5000),
        d(0x4, 0),
        d(0x4 | (1 << 4) | (3 << 27) | (40 << 32), 0),
    ];
    // Act
    rig.submit(&descs);
    // Assert
    assert_eq!(
        rig.seen(),
        [
            Invalidation::Context(ContextInval::Global),
            Invalidation::Context(ContextInval::Domain(7)),
            Invalidation::Context(ContextInval::Device { did: 7, sid: SourceId(0x0308), fm: 1 }),
            Invalidation::Iotlb(IotlbInval::Global),
            Invalidation::Iotlb(IotlbInval::Domain(9)),
            Invalidation::Iotlb(IotlbInval::Page { did: 9, addr: 0xabc_d000, am: 2, ih: true }),
            Invalidation::DeviceTlb,
            Invalidation::Iec(IecInval::Global),
            Invalidation::Iec(IecInval::Index { index: 40, im: 3 }),
        ]
    );
    assert_eq!(rig.r64(IQH), rig.r64(IQT));
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(rig.vtd.stats().descriptors, 9);
}

#[test]
fn scalable_descriptor_types_decode_into_their_invalidations() {
    // Arrange
    let mut rig = Rig::new(scalable(), false);
    let pasid = 0x1_2345u64;
    let descs = [
        d(0x6 | (2 << 4) | (3 << 16) | (pasid << 32), 0),
        d(0x6 | (3 << 4) | (3 << 16) | (pasid << 32), 0x7000 | 1),
        d(0x7 | (3 << 16), 0),
        d(0x7 | (1 << 4) | (3 << 16) | (pasid << 32), 0),
        d(0x7 | (3 << 4), 0),
        d(0x8 | (0x0308 << 16) | (pasid << 32), 0x9000),
        d(0x9 | (1 << 4) | (0x0308 << 16), 5 << 3),
    ];
    // Act
    rig.submit(&descs);
    // Assert
    let pasid = 0x1_2345;
    assert_eq!(
        rig.seen(),
        [
            Invalidation::Piotlb(PiotlbInval::Pasid { did: 3, pasid }),
            Invalidation::Piotlb(PiotlbInval::Page { did: 3, pasid, addr: 0x7000, am: 1, ih: false }),
            Invalidation::PasidCache(PasidCacheInval::Domain(3)),
            Invalidation::PasidCache(PasidCacheInval::Pasid { did: 3, pasid }),
            Invalidation::PasidCache(PasidCacheInval::Global),
            Invalidation::DeviceTlb,
        ]
    );
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(rig.vtd.stats().descriptors, 7);
}

#[test]
fn reserved_bit_stops_the_queue_at_the_bad_descriptor_with_iqe_and_a_fault_event() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    rig.w32(FEDATA, 0x41);
    rig.w32(FEADDR, 0xfee0_0000);
    rig.w32(FECTL, 0);
    // Act
    rig.submit(&[d(0x1 | (1 << 4), 0), d(0x2 | (1 << 4) | (1 << 8), 0), d(0x4, 0)]);
    // Assert
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
    assert_eq!(rig.r64(IQH), 1 << 4);
    assert_eq!(rig.seen(), [Invalidation::Context(ContextInval::Global)]);
    assert_eq!(rig.irq.sent, [Msi { addr: 0xfee0_0000, data: 0x41 }]);
}

#[test]
fn fixing_the_descriptor_and_clearing_iqe_resumes_at_iqh() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    rig.submit(&[d(0x2 | (1 << 4), 1), d(0x4, 0)]);
    rig.put(0, d(0x2 | (1 << 4), 0));
    // Act
    rig.w32(FSTS, IQE);
    // Assert
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(rig.seen(), [Invalidation::Iotlb(IotlbInval::Global), Invalidation::Iec(IecInval::Global)]);
    assert_eq!(rig.r64(IQH), 2 << 4);
}

#[test]
fn iqt_writes_are_ignored_while_iqe_is_set() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    rig.submit(&[d(0, 0)]);
    // Act
    rig.submit(&[d(0x4, 0)]);
    // Assert
    assert!(rig.seen().is_empty());
    assert_eq!(rig.r64(IQH), 0);
}

#[test]
fn unknown_types_and_bad_granularities_set_iqe() {
    let bad = [d(0xa, 0), d(0xf, 0), d(0x1, 0), d(0x2, 0), d(0x2 | (3 << 4), 19), d(0x1 | (1 << 4), 1)];
    for desc in bad {
        // Arrange
        let mut rig = Rig::new(Config::default(), false);
        // Act
        rig.submit(&[desc]);
        // Assert
        assert_eq!(rig.r32(FSTS) & IQE, IQE, "{desc:x?}");
        assert_eq!(rig.r64(IQH), 0);
    }
}

#[test]
fn scalable_only_types_set_iqe_on_a_legacy_unit() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    // Act
    rig.submit(&[d(0x7 | (3 << 4), 0)]);
    // Assert
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
}

#[test]
fn wait_descriptor_writes_its_status_data() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    // Act
    rig.submit(&[d(0x5 | (1 << 5) | (1 << 6) | (0xcafe_f00d << 32), STATUS + 4)]);
    // Assert
    assert_eq!(rig.mem.read_u64(Gpa::new(STATUS)).unwrap(), 0xcafe_f00d_0000_0000);
    assert!(rig.irq.sent.is_empty());
    assert_eq!(rig.vtd.stats().waits, 1);
}

#[test]
fn wait_status_write_outside_guest_memory_sets_iqe() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    // Act
    rig.submit(&[d(0x5 | (1 << 5) | (1 << 32), 0x4000_0000)]);
    // Assert
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
}

#[test]
fn wait_with_interrupt_flag_sets_iwc_and_sends_the_completion_event() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    rig.w32(IEDATA, 0x51);
    rig.w32(IEADDR, 0xfee0_1000);
    rig.w32(IECTL, 0);
    // Act
    rig.submit(&[d(0x5 | (1 << 4), 0)]);
    rig.submit(&[d(0x5 | (1 << 4), 0)]);
    // Assert
    assert_eq!(rig.r32(ICS), 1);
    assert_eq!(rig.irq.sent, [Msi { addr: 0xfee0_1000, data: 0x51 }], "IWC still set: one event");
}

#[test]
fn masked_completion_event_stays_pending_until_unmasked() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    rig.w32(IEDATA, 0x52);
    rig.w32(IEADDR, 0xfee0_0000);
    rig.submit(&[d(0x5 | (1 << 4), 0)]);
    let pending = rig.r32(IECTL);
    // Act
    rig.w32(IECTL, 0);
    // Assert
    assert_eq!(pending, (1 << 31) | (1 << 30));
    assert_eq!(rig.r32(IECTL), 0);
    assert_eq!(rig.irq.sent, [Msi { addr: 0xfee0_0000, data: 0x52 }]);
}

#[test]
fn clearing_iwc_clears_a_masked_pending_completion_event() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    rig.submit(&[d(0x5 | (1 << 4), 0)]);
    // Act
    rig.w32(ICS, 1);
    rig.w32(IECTL, 0);
    // Assert
    assert_eq!(rig.r32(ICS), 0);
    assert!(rig.irq.sent.is_empty());
}

#[test]
fn wide_descriptors_are_32_bytes_apart() {
    // Arrange
    let mut rig = Rig::new(scalable(), true);
    // Act
    rig.submit(&[d(0x1 | (1 << 4), 0), d(0x7 | (3 << 4), 0), d(0x5 | (1 << 5) | (7 << 32), STATUS)]);
    // Assert
    assert_eq!(
        rig.seen(),
        [Invalidation::Context(ContextInval::Global), Invalidation::PasidCache(PasidCacheInval::Global)]
    );
    assert_eq!(rig.r64(IQH), 3 << 5);
    assert_eq!(rig.mem.read_u64(Gpa::new(STATUS)).unwrap(), 7);
}

#[test]
fn wide_descriptor_with_a_non_zero_upper_half_sets_iqe() {
    // Arrange
    let mut rig = Rig::new(scalable(), true);
    // Act
    rig.submit(&[[0x1 | (1 << 4), 0, 0, 1]]);
    // Assert
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
    assert!(rig.seen().is_empty());
}

#[test]
fn wide_mode_tail_with_bit_4_set_sets_iqe() {
    // Arrange
    let mut rig = Rig::new(scalable(), true);
    rig.put(0, d(0x4, 0));
    // Act
    rig.w64(IQT, 0x10);
    // Assert
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
    assert!(rig.seen().is_empty());
}

#[test]
fn legacy_unit_ignores_the_dw_bit() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    // Act
    rig.w64(IQA, QUEUE | (1 << 11));
    // Assert
    assert_eq!(rig.r64(IQA), QUEUE);
}

#[test]
fn tail_beyond_the_queue_sets_iqe() {
    // Arrange: one page = 256 descriptors; IQT names the 300th.
    let mut rig = Rig::new(Config::default(), false);
    // Act
    rig.w64(IQT, 300 << 4);
    // Assert
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
}

#[test]
fn queue_wraps_around_from_the_last_slot_to_the_first() {
    // Arrange: advance the queue to slot 254 with no-op waits.
    let mut rig = Rig::new(Config::default(), false);
    for i in 0..254 {
        rig.put(i, d(0x5 | (1 << 6), 0));
    }
    rig.w64(IQT, 254 << 4);
    // Act
    rig.submit(&[d(0x4, 0), d(0x2 | (1 << 4), 0), d(0x1 | (1 << 4), 0)]);
    // Assert
    assert_eq!(
        rig.seen(),
        [
            Invalidation::Iec(IecInval::Global),
            Invalidation::Iotlb(IotlbInval::Global),
            Invalidation::Context(ContextInval::Global)
        ]
    );
    assert_eq!(rig.r64(IQH), 1 << 4);
    assert_eq!(rig.vtd.stats().descriptors, 257);
}

#[test]
fn larger_queue_size_addresses_more_pages() {
    // Arrange: QS = 1 → 2 pages, 512 descriptors; slot 300 is in the second page.
    let mut rig = Rig::new(Config::default(), false);
    rig.w32(GCMD, 0);
    rig.w64(IQA, QUEUE | 1);
    for i in 0..300 {
        rig.put(i, d(0x5 | (1 << 6), 0));
    }
    rig.put(300, d(0x4, 0));
    rig.w32(GCMD, QIE);
    // Act
    rig.w64(IQT, 301 << 4);
    // Assert
    assert_eq!(rig.r32(FSTS), 0);
    assert_eq!(rig.seen(), [Invalidation::Iec(IecInval::Global)]);
    assert_eq!(rig.r64(IQH), 301 << 4);
}

#[test]
fn disabling_qi_resets_iqh() {
    // Arrange
    let mut rig = Rig::new(Config::default(), false);
    rig.submit(&[d(0x4, 0)]);
    // Act
    rig.w32(GCMD, 0);
    // Assert
    assert_eq!(rig.r64(IQH), 0);
    assert_eq!(rig.r32(0x1c) & QIE, 0);
}

#[test]
fn a_garbage_queue_never_panics_and_stops_at_the_first_bad_descriptor() {
    // Arrange
    let mut rig = Rig::new(scalable(), true);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..(4096 / 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        rig.mem.write(Gpa::new(QUEUE + 8 * i), &x.to_le_bytes()).unwrap();
    }
    // Act
    rig.w64(IQT, 127 << 5);
    // Assert
    assert!(rig.vtd.stats().descriptors < 127);
    assert_eq!(rig.r32(FSTS) & IQE, IQE);
}
