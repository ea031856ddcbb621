//! Properties of `Vtd` under arbitrary guest input: register writes,
//! queue contents, interrupt requests and DMA requests never panic, never
//! loop, and keep the register invariants.

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::translate::DmaRequest;
use memvisor_vtd::{Config, GuestMemory, Mode, Msi, RecordingSink, SourceId, TestMemory};
use proptest::prelude::*;

const FRAMES: usize = 16;

fn config(mode: u8, records: u16) -> Config {
    let mode = match mode % 4 {
        0 => Mode::Legacy,
        1 => Mode::ScalableSecondStage,
        2 => Mode::ScalableFirstStage,
        _ => Mode::ScalableNested,
    };
    Config { mode, fault_records: records, ..Config::default() }
}

/// Register offsets that do something, plus anything in the window.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0x18u64, 0x20, 0x24, 0x28, 0x2c, 0x34, 0x38, 0x88, 0x90, 0x94, 0x9c, 0xa0, 0xb8, 0xf0, 0xf8,
            0xfc, 0x228, 0x22c, 0x238,
        ]),
        0u64..0x1100,
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        // Small addresses inside the test memory, with low control bits.
        (0u64..(FRAMES as u64 * 4096)).prop_map(|v| v & !0xff0),
        Just(u64::from(u32::MAX) << 23),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, wide: bool, value: u64 },
    Read { offset: u64, wide: bool },
    Dma { sid: u16, addr: u64, write: bool, pasid: Option<u32> },
    Msi { sid: u16, addr: u64, data: u32 },
    Ioapic { rte: u64, verify: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (offset(), any::<bool>(), value()).prop_map(|(offset, wide, value)| Op::Write { offset, wide, value }),
        1 => (offset(), any::<bool>()).prop_map(|(offset, wide)| Op::Read { offset, wide }),
        1 => (any::<u16>(), any::<u64>(), any::<bool>(), proptest::option::of(0u32..(1 << 20)))
            .prop_map(|(sid, addr, write, pasid)| Op::Dma { sid, addr, write, pasid }),
        1 => (any::<u16>(), prop_oneof![any::<u64>(), (0u64..0x10_0000).prop_map(|a| 0xfee0_0000 | a)], any::<u32>())
            .prop_map(|(sid, addr, data)| Op::Msi { sid, addr, data }),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(rte, verify)| Op::Ioapic { rte, verify }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_guest_input_never_panics_and_keeps_register_invariants(
        mode in any::<u8>(),
        records in 1u16..=8,
        fill in proptest::collection::vec(any::<u64>(), 0..512),
        ops in proptest::collection::vec(op(), 1..64),
    ) {
        // Arrange
        let mut vtd = Vtd::new(config(mode, records)).unwrap();
        let mem = TestMemory::new(Gpa::new(0), FRAMES);
        for (i, q) in fill.iter().enumerate() {
            mem.write(Gpa::new(((i as u64 * 56) % (FRAMES as u64 * 4096 - 8)) & !7), &q.to_le_bytes()).unwrap();
        }
        let mut irq = RecordingSink::default();
        // Act
        for op in ops {
            match op {
                Op::Write { offset, wide, value } => {
                    if wide {
                        vtd.mmio_write(&mem, &mut irq, offset, &value.to_le_bytes());
                    } else {
                        vtd.mmio_write(&mem, &mut irq, offset, &value.to_le_bytes()[..4]);
                    }
                }
                Op::Read { offset, wide } => {
                    let mut b = [0u8; 8];
                    vtd.mmio_read(offset, if wide { &mut b[..] } else { &mut b[..4] });
                }
                Op::Dma { sid, addr, write, pasid } => {
                    let req = DmaRequest { sid: SourceId(sid), pasid, addr, write, ..Default::default() };
                    let _ = vtd.translate(&mem, &mut irq, &req);
                }
                Op::Msi { sid, addr, data } => {
                    let _ = vtd.remap_msi(&mem, &mut irq, SourceId(sid), Msi { addr, data });
                }
                Op::Ioapic { rte, verify } => {
                    let _ = vtd.remap_ioapic(&mem, &mut irq, verify.then_some(SourceId(0xf0f8)), rte);
                }
            }
        }
        // Assert
        let regs = vtd.registers();
        let ppf = regs.fsts() & 2 != 0;
        let mut any_f = false;
        for i in 0..u64::from(records) {
            any_f |= regs.read(0x220 + 16 * i + 8, 8) >> 63 == 1;
        }
        prop_assert_eq!(ppf, any_f, "PPF is the OR of the F bits");
        prop_assert_eq!(regs.read(0x28, 8) >> 63, 0, "ICC self-clears");
        prop_assert_eq!(regs.read(0xf8, 8) >> 63, 0, "IVT self-clears");
        prop_assert_eq!(regs.read(0x18, 4), 0, "GCMD reads zero");
        let iqh = regs.read(0x80, 8);
        prop_assert_eq!(iqh & !0x7fff0, 0, "IQH within bits 18:4");
    }
}

#[test]
fn the_unit_is_send() {
    // Arrange
    fn assert_send<T: Send>() {}
    // Act
    assert_send::<Vtd>();
    // Assert: compiles.
}
