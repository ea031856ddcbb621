//! QEMU's `edu` educational PCI device (1234:11e8, QEMU `docs/specs/edu.rst`,
//! `hw/misc/edu.c`): identification and liveness registers, a factorial
//! unit, an interrupt raise/acknowledge pair, and a DMA engine with a 4 KiB
//! buffer at device address 0x40000. Interrupts go out as INTx (pin A) or,
//! once the guest enabled it, as the MSI it programmed.
//!
//! Differences from QEMU, all invisible to a driver that polls as the spec
//! says: factorial and DMA complete synchronously within the register
//! write (QEMU uses a thread and a 100 ms timer), and a DMA whose device
//! buffer range is out of bounds, or whose transfer faults, is dropped
//! (QEMU aborts the whole VM on the former).

use crate::pci::{ConfigSpace, PciDevice};
use crate::{DeviceBus, fill_le, le_value};

/// Register offsets.
pub mod regs {
    /// Identification, `0x010000ed` (RO).
    pub const ID: u64 = 0x00;
    /// Liveness check: reads the inverse of the last write.
    pub const ALIVE: u64 = 0x04;
    /// Factorial: write n, read n!.
    pub const FACTORIAL: u64 = 0x08;
    /// Status: bit 0 computing (RO), bit 7 raise an interrupt after the factorial.
    pub const STATUS: u64 = 0x20;
    /// Interrupt status (RO).
    pub const INTR_STATUS: u64 = 0x24;
    /// Interrupt raise: ORs the value into the status.
    pub const INTR_RAISE: u64 = 0x60;
    /// Interrupt acknowledge: clears the value's bits from the status.
    pub const INTR_ACK: u64 = 0x64;
    /// DMA source address.
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA byte count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command: bit 0 start, bit 1 direction (1 = buffer to RAM), bit 2 interrupt on completion.
    pub const DMA_CMD: u64 = 0x98;
}

/// The identification value.
pub const ID_VALUE: u32 = 0x0100_00ed;
/// Device address of the DMA buffer.
pub const DMA_BUFFER_ADDR: u64 = 0x4_0000;
/// Size of the DMA buffer.
pub const DMA_BUFFER_SIZE: usize = 4096;
/// Size of BAR 0.
pub const BAR_SIZE: u32 = 1 << 20;
/// Interrupt status bit of a factorial completion.
pub const IRQ_FACTORIAL: u32 = 0x1;
/// Interrupt status bit of a DMA completion.
pub const IRQ_DMA: u32 = 0x100;

const STATUS_COMPUTING: u32 = 0x01;
const STATUS_IRQFACT: u32 = 0x80;
const DMA_START: u64 = 0x1;
const DMA_FROM_DEVICE: u64 = 0x2;
const DMA_IRQ: u64 = 0x4;
/// QEMU's default DMA mask (28 bits).
const DMA_MASK: u64 = (1 << 28) - 1;

/// The device; `sid` is its requester id (bus << 8 | device << 3 | function).
#[derive(Debug, Clone)]
pub struct Edu {
    sid: u16,
    config: ConfigSpace,
    alive: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    buffer: Box<[u8; DMA_BUFFER_SIZE]>,
    intx: bool,
    dma_faults: u64,
}

impl Edu {
    /// An edu function at requester id `sid`, BAR 0 at `bar0` (1 MiB
    /// aligned), INTA routed to interrupt line `line`, MSI capability at 0x40.
    pub fn new(sid: u16, bar0: u32, line: u8) -> Self {
        // QEMU's edu: class_id PCI_CLASS_OTHERS (0x00ff: base class 0x00,
        // subclass 0xff), revision 0x10 (hw/misc/edu.c).
        let mut config = ConfigSpace::new(0x1234, 0x11e8, 0x00_ff00, 0x10);
        config.add_mem_bar32(0, BAR_SIZE, bar0);
        config.set_interrupt(1, line);
        config.add_msi_capability(0x40);
        Self {
            sid,
            config,
            alive: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            buffer: Box::new([0; DMA_BUFFER_SIZE]),
            intx: false,
            dma_faults: 0,
        }
    }

    /// The requester id.
    pub fn sid(&self) -> u16 {
        self.sid
    }

    /// The configuration space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// BAR 0's guest-physical range start, if decoded.
    pub fn bar0(&self) -> Option<u64> {
        self.config.bar_address(0)
    }

    /// How many DMA transfers failed (translation fault or bad buffer range).
    pub fn dma_faults(&self) -> u64 {
        self.dma_faults
    }

    /// A load of `data.len()` bytes at BAR offset `offset`. As in QEMU, only
    /// 4-byte accesses below 0x80 and 4- or 8-byte accesses from 0x80 on
    /// return a value; others read all ones.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let ok = matches!((offset < 0x80, data.len()), (true, 4) | (false, 4 | 8));
        let value = if !ok {
            u64::MAX
        } else {
            match offset {
                regs::ID => u64::from(ID_VALUE),
                regs::ALIVE => u64::from(!self.alive),
                regs::FACTORIAL => u64::from(self.factorial),
                regs::STATUS => u64::from(self.status),
                regs::INTR_STATUS => u64::from(self.irq_status),
                regs::DMA_SRC => self.dma_src,
                regs::DMA_DST => self.dma_dst,
                regs::DMA_COUNT => self.dma_count,
                regs::DMA_CMD => self.dma_cmd,
                _ => u64::MAX,
            }
        };
        fill_le(data, value);
    }

    /// A store of `data` at BAR offset `offset` (same size rules as reads).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], bus: &mut dyn DeviceBus) {
        if !matches!((offset < 0x80, data.len()), (true, 4) | (false, 4 | 8)) {
            return;
        }
        let value = le_value(data);
        let low = u32::try_from(value & 0xffff_ffff).unwrap_or(0);
        match offset {
            regs::ALIVE => self.alive = low,
            regs::FACTORIAL if self.status & STATUS_COMPUTING == 0 => {
                self.factorial = factorial(low);
                if self.status & STATUS_IRQFACT != 0 {
                    self.raise(IRQ_FACTORIAL, bus);
                }
            }
            regs::STATUS => self.status = (self.status & !STATUS_IRQFACT) | (low & STATUS_IRQFACT),
            regs::INTR_RAISE => self.raise(low, bus),
            regs::INTR_ACK => self.lower(low, bus),
            regs::DMA_SRC => self.dma_src = value,
            regs::DMA_DST => self.dma_dst = value,
            regs::DMA_COUNT => self.dma_count = value,
            regs::DMA_CMD if self.dma_cmd & DMA_START == 0 => {
                self.dma_cmd = value;
                if value & DMA_START != 0 {
                    self.run_dma(bus);
                }
            }
            _ => {}
        }
    }

    fn run_dma(&mut self, bus: &mut dyn DeviceBus) {
        let from_device = self.dma_cmd & DMA_FROM_DEVICE != 0;
        let (buf_addr, mem_addr) =
            if from_device { (self.dma_src, self.dma_dst) } else { (self.dma_dst, self.dma_src) };
        let master = self.config.command() & crate::pci::regs::COMMAND_MASTER != 0;
        let range = buf_addr
            .checked_sub(DMA_BUFFER_ADDR)
            .and_then(|start| usize::try_from(start).ok())
            .and_then(|start| Some(start..start.checked_add(usize::try_from(self.dma_count).ok()?)?))
            .filter(|r| r.end <= DMA_BUFFER_SIZE);
        let result = match (master, range) {
            (true, Some(range)) => {
                let iova = mem_addr & DMA_MASK;
                match self.buffer.get_mut(range) {
                    Some(buf) if from_device => bus.write(self.sid, iova, buf).is_ok(),
                    Some(buf) => bus.read(self.sid, iova, buf).is_ok(),
                    None => false,
                }
            }
            _ => false,
        };
        if !result {
            self.dma_faults = self.dma_faults.saturating_add(1);
        }
        self.dma_cmd &= !DMA_START;
        if self.dma_cmd & DMA_IRQ != 0 {
            self.raise(IRQ_DMA, bus);
        }
    }

    fn raise(&mut self, bits: u32, irq: &mut dyn DeviceBus) {
        self.irq_status |= bits;
        if self.irq_status == 0 {
            return;
        }
        if let Some((address, data)) = self.config.msi() {
            irq.msi(self.sid, address, data);
        } else {
            self.set_intx(true, irq);
        }
    }

    fn lower(&mut self, bits: u32, irq: &mut dyn DeviceBus) {
        self.irq_status &= !bits;
        if self.irq_status == 0 && self.config.msi().is_none() {
            self.set_intx(false, irq);
        }
    }

    fn set_intx(&mut self, level: bool, irq: &mut dyn DeviceBus) {
        let level = level && self.config.command() & crate::pci::regs::COMMAND_INTX_DISABLE == 0;
        if level != self.intx {
            self.intx = level;
            irq.set_intx(self.sid, level);
        }
    }
}

impl PciDevice for Edu {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
}

/// n! in 32 bits, wrapping as QEMU's loop does. 34! has 32 factors of two,
/// so from 34 on the result is 0: the loop stops there instead of running
/// up to 2^32 times for a guest's large n.
fn factorial(n: u32) -> u32 {
    (1..=n.min(34)).fold(1u32, u32::wrapping_mul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::regs as pci;
    use crate::{DmaError, DmaPort, PciInterrupt};

    #[derive(Default)]
    struct Mem {
        ram: Vec<u8>,
    }

    impl DmaPort for Mem {
        fn read(&mut self, _sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let s = usize::try_from(iova).unwrap();
            buf.copy_from_slice(self.ram.get(s..s + buf.len()).ok_or(DmaError { iova })?);
            Ok(())
        }

        fn write(&mut self, _sid: u16, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
            let s = usize::try_from(iova).unwrap();
            self.ram.get_mut(s..s + buf.len()).ok_or(DmaError { iova })?.copy_from_slice(buf);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Irq {
        intx: Vec<bool>,
        msi: Vec<(u16, u64, u32)>,
    }

    impl PciInterrupt for Irq {
        fn set_intx(&mut self, _sid: u16, level: bool) {
            self.intx.push(level);
        }

        fn msi(&mut self, sid: u16, address: u64, data: u32) {
            self.msi.push((sid, address, data));
        }
    }

    fn edu() -> Edu {
        let mut e = Edu::new(0x18, 0xfe00_0000, 11);
        e.config_write(pci::COMMAND, &(pci::COMMAND_MEMORY | pci::COMMAND_MASTER).to_le_bytes());
        e
    }

    #[test]
    fn config_space_identifies_the_device_as_qemus_edu() {
        // Arrange
        let mut e = edu();
        let mut id = [0u8; 4];
        let mut class = [0u8; 4];
        // Act
        e.config_read(0x00, &mut id);
        e.config_read(0x08, &mut class);
        // Assert: 1234:11e8, revision 0x10, base class 0x00, subclass 0xff.
        assert_eq!(u32::from_le_bytes(id), 0x11e8_1234);
        assert_eq!(u32::from_le_bytes(class), 0x00ff_0010);
    }

    fn read32(e: &mut Edu, off: u64) -> u32 {
        let mut d = [0; 4];
        e.mmio_read(off, &mut d);
        u32::from_le_bytes(d)
    }

    struct Host<'a>(&'a mut Mem, &'a mut Irq);

    impl DmaPort for Host<'_> {
        fn read(&mut self, sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            self.0.read(sid, iova, buf)
        }

        fn write(&mut self, sid: u16, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
            self.0.write(sid, iova, buf)
        }
    }

    impl PciInterrupt for Host<'_> {
        fn set_intx(&mut self, sid: u16, level: bool) {
            self.1.set_intx(sid, level);
        }

        fn msi(&mut self, sid: u16, address: u64, data: u32) {
            self.1.msi(sid, address, data);
        }
    }

    fn write(e: &mut Edu, off: u64, v: u64, size: usize, mem: &mut Mem, irq: &mut Irq) {
        e.mmio_write(off, &v.to_le_bytes()[..size], &mut Host(mem, irq));
    }

    #[test]
    fn id_register_identifies_edu() {
        assert_eq!(read32(&mut edu(), regs::ID), ID_VALUE);
    }

    #[test]
    fn liveness_register_reads_the_inverse() {
        let (mut e, mut m, mut i) = (edu(), Mem::default(), Irq::default());

        write(&mut e, regs::ALIVE, 5, 4, &mut m, &mut i);

        assert_eq!(read32(&mut e, regs::ALIVE), !5);
    }

    #[test]
    fn factorial_is_computed_on_write() {
        let (mut e, mut m, mut i) = (edu(), Mem::default(), Irq::default());

        write(&mut e, regs::FACTORIAL, 5, 4, &mut m, &mut i);

        assert_eq!(read32(&mut e, regs::FACTORIAL), 120);
    }

    #[test]
    fn factorial_wraps_in_32_bits_and_is_zero_from_34_on() {
        let naive = |n: u32| (1..=n).fold(1u32, u32::wrapping_mul);

        assert_eq!(factorial(33), naive(33));
        assert_ne!(factorial(33), 0);
        assert_eq!(factorial(34), 0);
        assert_eq!(factorial(1000), naive(1000));
        assert_eq!(factorial(u32::MAX), 0);
    }

    #[test]
    fn raise_asserts_intx_and_ack_deasserts_it() {
        let (mut e, mut m, mut i) = (edu(), Mem::default(), Irq::default());

        write(&mut e, regs::INTR_RAISE, 1, 4, &mut m, &mut i);
        assert_eq!(read32(&mut e, regs::INTR_STATUS), 1);
        write(&mut e, regs::INTR_ACK, 1, 4, &mut m, &mut i);

        assert_eq!(i.intx, vec![true, false]);
    }

    #[test]
    fn raise_sends_the_programmed_msi_when_enabled() {
        let (mut e, mut m, mut i) = (edu(), Mem::default(), Irq::default());
        e.config_write(0x44, &0xfee0_0010u32.to_le_bytes());
        e.config_write(0x4c, &0x0u16.to_le_bytes());
        e.config_write(0x42, &1u16.to_le_bytes());

        write(&mut e, regs::INTR_RAISE, 1, 4, &mut m, &mut i);

        assert_eq!(i.msi, vec![(0x18, 0xfee0_0010, 0)]);
        assert!(i.intx.is_empty());
    }

    #[test]
    fn dma_to_device_then_from_device_copies_through_the_buffer() {
        let (mut e, mut i) = (edu(), Irq::default());
        let mut m = Mem { ram: vec![0; 0x2000] };
        m.ram[0x1000..0x1004].copy_from_slice(&0x1234_5678u32.to_le_bytes());

        for (src, dst, cmd) in [(0x1000, DMA_BUFFER_ADDR, 1), (DMA_BUFFER_ADDR, 0x1004, 3)] {
            write(&mut e, regs::DMA_SRC, src, 8, &mut m, &mut i);
            write(&mut e, regs::DMA_DST, dst, 8, &mut m, &mut i);
            write(&mut e, regs::DMA_COUNT, 4, 8, &mut m, &mut i);
            write(&mut e, regs::DMA_CMD, cmd, 4, &mut m, &mut i);
        }

        assert_eq!(&m.ram[0x1004..0x1008], &0x1234_5678u32.to_le_bytes());
        assert_eq!(read32(&mut e, regs::DMA_CMD) & 1, 0);
        assert_eq!(e.dma_faults(), 0);
    }

    #[test]
    fn dma_outside_the_buffer_is_dropped_and_counted() {
        let (mut e, mut i) = (edu(), Irq::default());
        let mut m = Mem { ram: vec![0; 0x2000] };

        write(&mut e, regs::DMA_SRC, 0, 8, &mut m, &mut i);
        write(&mut e, regs::DMA_DST, DMA_BUFFER_ADDR + 4090, 8, &mut m, &mut i);
        write(&mut e, regs::DMA_COUNT, 100, 8, &mut m, &mut i);
        write(&mut e, regs::DMA_CMD, 1 | 4, 4, &mut m, &mut i);

        assert_eq!(e.dma_faults(), 1);
        assert_eq!(read32(&mut e, regs::INTR_STATUS), IRQ_DMA);
    }

    #[test]
    fn dma_fault_from_the_port_is_counted() {
        let (mut e, mut i) = (edu(), Irq::default());
        let mut m = Mem { ram: vec![0; 16] };

        write(&mut e, regs::DMA_SRC, 0x10_0000, 8, &mut m, &mut i);
        write(&mut e, regs::DMA_DST, DMA_BUFFER_ADDR, 8, &mut m, &mut i);
        write(&mut e, regs::DMA_COUNT, 8, 8, &mut m, &mut i);
        write(&mut e, regs::DMA_CMD, 1, 4, &mut m, &mut i);

        assert_eq!(e.dma_faults(), 1);
    }

    #[test]
    fn two_byte_access_below_0x80_reads_all_ones() {
        let mut e = edu();
        let mut d = [0; 2];

        e.mmio_read(regs::ID, &mut d);

        assert_eq!(d, [0xff, 0xff]);
    }
}
