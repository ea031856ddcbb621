//! The IOMMU between the platform's devices and guest memory/interrupts:
//! none (identity DMA, compatibility-format interrupts only) or the
//! memvisor VT-d model ([`memvisor_vtd::device::Vtd`]).
//!
//! With VT-d, a device's DMA is translated page by page through the unit
//! (requester id = the device's BDF; a fault is recorded by the unit as
//! hardware would, and the transfer stops there), its MSIs go through
//! interrupt remapping, and so do the I/O APIC's redirection entries. The
//! I/O APIC's requester id is not verified against IRTEs (QEMU does not
//! either: kvm-unit-tests programs the IOAPIC IRTE with the PCI device's
//! id), see [`Iommu::remap_ioapic`].

use memvisor_hostmem::GuestRam;
use memvisor_platform::DmaError;
use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::memory::VmMemory;
use memvisor_vtd::{Config, InterruptSink, Mode, Msi, SourceId};

use crate::run::VtdMode;

/// Where the unit's own interrupts (fault events) go: (address, data) to KVM.
pub type Inject<'a> = dyn FnMut(u64, u32) + 'a;

/// A DMA transfer's direction and data.
#[derive(Debug)]
pub enum Dir<'b> {
    /// Device reads memory into the buffer.
    Read(&'b mut [u8]),
    /// Device writes the buffer to memory.
    Write(&'b [u8]),
}

/// The IOMMU.
#[derive(Debug)]
pub enum Iommu {
    /// No IOMMU: DMA addresses are guest-physical, MSIs go out unchanged.
    Off,
    /// A VT-d unit.
    Vtd(Box<Vtd>),
}

/// The unit's own interrupts (fault and invalidation events) to KVM.
struct Events<'i, 'a>(&'i mut Inject<'a>);

impl InterruptSink for Events<'_, '_> {
    fn send(&mut self, msi: Msi) {
        (self.0)(msi.addr, msi.data);
    }
}

/// A VT-d unit offering `mode`, with interrupt remapping if
/// `interrupt_remapping`; like QEMU's `-device intel-iommu` of
/// kvm-unit-tests (`eim=off`): xAPIC-only remapping.
pub fn vtd(mode: VtdMode, interrupt_remapping: bool) -> anyhow::Result<Iommu> {
    let mode = match mode {
        VtdMode::Off => return Ok(Iommu::Off),
        VtdMode::Legacy => Mode::Legacy,
        VtdMode::ScalableSs => Mode::ScalableSecondStage,
        VtdMode::ScalableFs => Mode::ScalableFirstStage,
        VtdMode::ScalableNested => Mode::ScalableNested,
    };
    let config = Config { mode, interrupt_remapping, x2apic: false, ..Config::default() };
    let vtd = Vtd::new(config).map_err(|e| anyhow::anyhow!("VT-d unit: {e}"))?;
    Ok(Iommu::Vtd(Box::new(vtd)))
}

impl Iommu {
    /// A load from the unit's registers.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        match self {
            Iommu::Vtd(vtd) if offset < vtd.mmio_size() => vtd.mmio_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A store to the unit's registers.
    pub fn mmio_write(&mut self, ram: &GuestRam, inject: &mut Inject<'_>, offset: u64, data: &[u8]) {
        match self {
            Iommu::Vtd(vtd) if offset < vtd.mmio_size() => {
                vtd.mmio_write(&VmMemory(ram), &mut Events(inject), offset, data);
            }
            _ => {}
        }
    }

    /// An MSI from requester `sid`, remapped (or `None`: blocked).
    pub fn remap_msi(
        &mut self,
        ram: &GuestRam,
        inject: &mut Inject<'_>,
        sid: u16,
        address: u64,
        data: u32,
    ) -> Option<(u64, u32)> {
        match self {
            Iommu::Off => Some((address, data)),
            Iommu::Vtd(vtd) => vtd
                .remap_msi(&VmMemory(ram), &mut Events(inject), SourceId(sid), Msi { addr: address, data })
                .map(|m| (m.addr, m.data)),
        }
    }

    /// An I/O APIC redirection entry as the message it becomes. `sid`,
    /// the I/O APIC's requester id, is `None` to skip IRTE source-id
    /// verification (what QEMU does for its I/O APIC).
    pub fn remap_ioapic(
        &mut self,
        ram: &GuestRam,
        inject: &mut Inject<'_>,
        sid: Option<u16>,
        rte: u64,
    ) -> Option<(u64, u32)> {
        match self {
            Iommu::Off => crate::machine::compat(rte),
            Iommu::Vtd(vtd) => vtd
                .remap_ioapic(&VmMemory(ram), &mut Events(inject), sid.map(SourceId), rte)
                .map(|m| (m.addr, m.data)),
        }
    }

    /// A DMA transfer by requester `sid` at device address `iova`.
    pub fn dma(
        &mut self,
        ram: &GuestRam,
        inject: &mut Inject<'_>,
        sid: u16,
        iova: u64,
        dir: Dir<'_>,
    ) -> Result<(), DmaError> {
        match self {
            Iommu::Off => identity(ram, iova, dir),
            Iommu::Vtd(vtd) => translated(vtd, ram, inject, sid, iova, dir),
        }
    }
}

/// DMA through the unit, one translation per page it touches; stops at the
/// first fault (which the unit has recorded).
fn translated(
    vtd: &mut Vtd,
    ram: &GuestRam,
    inject: &mut Inject<'_>,
    sid: u16,
    iova: u64,
    mut dir: Dir<'_>,
) -> Result<(), DmaError> {
    let mem = VmMemory(ram);
    let (write, len) = match &dir {
        Dir::Read(buf) => (false, buf.len()),
        Dir::Write(buf) => (true, buf.len()),
    };
    vtd.dma(&mem, &mut Events(inject), SourceId(sid), None, iova, len, write, |gpa, range| {
        let gpa = Gpa::new(gpa);
        let r = match &mut dir {
            Dir::Read(buf) => buf.get_mut(range).map(|b| ram.read_at(gpa, b)),
            Dir::Write(buf) => buf.get(range).map(|b| ram.write_at(gpa, b)),
        };
        matches!(r, Some(Ok(())))
    })
    .map_err(|stop| DmaError { iova: stop.iova })
}

/// DMA without an IOMMU: device addresses are guest-physical.
fn identity(ram: &GuestRam, iova: u64, dir: Dir<'_>) -> Result<(), DmaError> {
    let gpa = Gpa::new(iova);
    let r = match dir {
        Dir::Read(buf) => ram.read_at(gpa, buf),
        Dir::Write(buf) => ram.write_at(gpa, buf),
    };
    r.map_err(|_| DmaError { iova })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use memvisor_hostmem::{Mapping, RamRegion};
    use memvisor_vtd::encode::{LegacyTt, install_legacy_context, legacy_context_entry, write_words};
    use memvisor_vtd::regs::{gcmd, off};

    use super::*;

    const ROOT: u64 = 0x1000;
    const CONTEXT: u64 = 0x2000;
    const L3: u64 = 0x3000;
    const L2: u64 = 0x4000;
    const L1: u64 = 0x5000;
    const EDU: u16 = 0x18;
    const RW: u64 = 0b11;

    /// 1 MiB of RAM and a legacy unit translating `EDU`'s IOVA page 0 to
    /// GPA 0x10000 and page 1 to GPA 0x20000 (3-level second stage).
    fn translating_unit() -> (Iommu, GuestRam) {
        let ram = GuestRam::new(vec![
            RamRegion::new(Gpa::new(0), Arc::new(Mapping::anonymous(0x10_0000).unwrap())).unwrap(),
        ])
        .unwrap();
        let mem = VmMemory(&ram);
        let entry = legacy_context_entry(L3, LegacyTt::MultiLevel, 3, 1);
        install_legacy_context(&mem, ROOT, CONTEXT, SourceId(EDU), entry).unwrap();
        write_words(&mem, Gpa::new(L3), &[L2 | RW]).unwrap();
        write_words(&mem, Gpa::new(L2), &[L1 | RW]).unwrap();
        write_words(&mem, Gpa::new(L1), &[0x1_0000 | RW, 0x2_0000 | RW]).unwrap();
        let mut iommu = vtd(VtdMode::Legacy, false).unwrap();
        let mut inject = |_: u64, _: u32| {};
        iommu.mmio_write(&ram, &mut inject, off::RTADDR, &ROOT.to_le_bytes());
        iommu.mmio_write(&ram, &mut inject, off::GCMD, &gcmd::SRTP.to_le_bytes());
        iommu.mmio_write(&ram, &mut inject, off::GCMD, &gcmd::TE.to_le_bytes());
        (iommu, ram)
    }

    #[test]
    fn dma_across_a_page_boundary_is_translated_page_by_page() {
        let (mut iommu, ram) = translating_unit();
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];

        let r = iommu.dma(&ram, &mut |_, _| {}, EDU, 0xffc, Dir::Write(&data));

        assert_eq!(r, Ok(()));
        let (mut low, mut high) = ([0u8; 4], [0u8; 4]);
        ram.read_at(Gpa::new(0x1_0ffc), &mut low).unwrap();
        ram.read_at(Gpa::new(0x2_0000), &mut high).unwrap();
        assert_eq!((low, high), ([1, 2, 3, 4], [5, 6, 7, 8]));
    }

    #[test]
    fn dma_to_an_unmapped_iova_fails_at_that_page_and_is_recorded() {
        let (mut iommu, ram) = translating_unit();
        let mut buf = [0u8; 16];

        let r = iommu.dma(&ram, &mut |_, _| {}, EDU, 0x1ff8, Dir::Read(&mut buf));

        assert_eq!(r, Err(DmaError { iova: 0x2000 }));
        let mut fsts = [0u8; 4];
        iommu.mmio_read(off::FSTS, &mut fsts);
        assert_ne!(u32::from_le_bytes(fsts), 0);
    }

    #[test]
    fn dma_from_another_requester_faults() {
        let (mut iommu, ram) = translating_unit();
        let mut buf = [0u8; 4];

        let r = iommu.dma(&ram, &mut |_, _| {}, 0x20, 0, Dir::Read(&mut buf));

        assert_eq!(r, Err(DmaError { iova: 0 }));
    }

    #[test]
    fn without_an_iommu_dma_addresses_are_guest_physical() {
        let (_, ram) = translating_unit();
        let mut buf = [0u8; 8];

        let r = Iommu::Off.dma(&ram, &mut |_, _| {}, EDU, L1, Dir::Read(&mut buf));

        assert_eq!(r, Ok(()));
        assert_eq!(u64::from_le_bytes(buf), 0x1_0000 | RW);
    }
}
