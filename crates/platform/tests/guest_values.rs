//! Invariant 3 for the platform: nothing a guest writes — a kernel image,
//! register offsets and values of any size — panics a device or the loader.

use memvisor_platform::edu::Edu;
use memvisor_platform::fw_cfg::FwCfg;
use memvisor_platform::ioapic::{Ioapic, IoapicSink};
use memvisor_platform::multiboot;
use memvisor_platform::pci::{ConfigIo, HostBridge, PciBus, PciDevice};
use memvisor_platform::serial::Serial;
use memvisor_platform::{DmaError, DmaPort, GuestWrite, PciInterrupt};
use proptest::prelude::*;

struct Ram(Vec<u8>);

impl GuestWrite for Ram {
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), ()> {
        let start = usize::try_from(gpa).map_err(drop)?;
        let end = start.checked_add(data.len()).ok_or(())?;
        self.0.get_mut(start..end).ok_or(())?.copy_from_slice(data);
        Ok(())
    }
}

/// A bus whose DMA fails past 64 KiB and whose interrupts go nowhere.
struct Bus(Vec<u8>);

impl DmaPort for Bus {
    fn read(&mut self, _: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let s = usize::try_from(iova).map_err(|_| DmaError { iova })?;
        let src = s.checked_add(buf.len()).and_then(|e| self.0.get(s..e)).ok_or(DmaError { iova })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, _: u16, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let s = usize::try_from(iova).map_err(|_| DmaError { iova })?;
        let dst = s.checked_add(buf.len()).and_then(|e| self.0.get_mut(s..e)).ok_or(DmaError { iova })?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}

impl PciInterrupt for Bus {
    fn set_intx(&mut self, _: u16, _: bool) {}
    fn msi(&mut self, _: u16, _: u64, _: u32) {}
}

struct Drop;

impl IoapicSink for Drop {
    fn deliver(&mut self, _: u8, _: u64) {}
}

struct OneBridge(HostBridge);

impl PciBus for OneBridge {
    fn device(&mut self, bdf: u16) -> Option<&mut dyn PciDevice> {
        (bdf == 0).then_some(&mut self.0 as &mut dyn PciDevice)
    }
}

/// A register access: offset and 0..=9 bytes of data.
fn access() -> impl Strategy<Value = (u64, Vec<u8>)> {
    (any::<u64>().prop_map(|o| o % 0x2_0000), proptest::collection::vec(any::<u8>(), 0..=9))
}

proptest! {
    #[test]
    fn any_image_behind_a_multiboot_header_loads_or_is_rejected(
        flags in any::<u32>(),
        fields in proptest::collection::vec(any::<u32>(), 5),
        tail in proptest::collection::vec(any::<u8>(), 0..512),
        elf in any::<bool>(),
    ) {
        let mut image = Vec::new();
        if elf {
            image.extend_from_slice(b"\x7fELF\x01\x01");
            image.resize(52, 0);
        }
        let magic = multiboot::HEADER_MAGIC;
        for v in [magic, flags, 0u32.wrapping_sub(magic).wrapping_sub(flags)].iter().chain(&fields) {
            image.extend_from_slice(&v.to_le_bytes());
        }
        image.extend_from_slice(&tail);
        let mut ram = Ram(vec![0; 4 << 20]);

        let _ = multiboot::load(&image, "x", 4 << 20, &mut ram);
    }

    #[test]
    fn edu_survives_any_register_access(ops in proptest::collection::vec((access(), any::<bool>()), 1..64)) {
        let mut edu = Edu::new(0x18, 0xfe00_0000, 11);
        edu.config_write(4, &[0x06, 0]);
        let mut bus = Bus(vec![0; 0x1_0000]);
        for ((offset, data), write) in ops {
            if write {
                edu.mmio_write(offset, &data, &mut bus);
            } else {
                let mut d = data;
                edu.mmio_read(offset, &mut d);
            }
        }
    }

    #[test]
    fn ioapic_survives_any_register_access_and_pin(ops in proptest::collection::vec((access(), any::<u8>()), 1..64)) {
        let mut io = Ioapic::new();
        for ((offset, data), pin) in ops {
            io.mmio_write(offset, &data, &mut Drop);
            io.set_irq(usize::from(pin), pin % 2 == 0, &mut Drop);
            io.eoi(pin, &mut Drop);
            let mut d = data;
            io.mmio_read(offset, &mut d);
        }
    }

    #[test]
    fn pci_config_io_survives_any_port_access(ops in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 0..=5)), 1..64)) {
        let mut io = ConfigIo::default();
        let mut bus = OneBridge(HostBridge::new());
        for (port, data) in ops {
            let port = port % 8;
            io.write(port, &data, &mut bus);
            let mut d = data;
            io.read(port, &mut d, &mut bus);
        }
    }

    #[test]
    fn serial_and_fw_cfg_survive_any_access(ops in proptest::collection::vec((any::<u16>(), any::<u8>()), 1..64)) {
        let mut uart = Serial::new(Vec::new());
        let mut cfg = FwCfg::new(1, 1 << 27);
        for (offset, value) in ops {
            uart.write(offset, value);
            uart.read(offset);
            cfg.write_selector(&offset.to_le_bytes());
            cfg.read_data();
        }
    }
}
