//! Register access for the device test rigs: 4- and 8-byte MMIO reads and
//! writes of a `Vtd` over a `TestMemory`, as a guest driver makes them.
#![allow(dead_code)]

use memvisor_vtd::device::Vtd;
use memvisor_vtd::{RecordingSink, TestMemory};

/// A rig owning a unit, its guest memory and its interrupt sink.
pub trait Mmio {
    /// The unit, the guest memory and the sink, borrowed together.
    fn parts(&mut self) -> (&mut Vtd, &TestMemory, &mut RecordingSink);

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0; 4];
        self.parts().0.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r64(&mut self, off: u64) -> u64 {
        let mut b = [0; 8];
        self.parts().0.mmio_read(off, &mut b);
        u64::from_le_bytes(b)
    }
    fn w32(&mut self, off: u64, v: u32) {
        let (vtd, mem, irq) = self.parts();
        vtd.mmio_write(mem, irq, off, &v.to_le_bytes());
    }
    fn w64(&mut self, off: u64, v: u64) {
        let (vtd, mem, irq) = self.parts();
        vtd.mmio_write(mem, irq, off, &v.to_le_bytes());
    }
}
