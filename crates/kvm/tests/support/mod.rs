//! Fixtures for the real-guest tests: a VM with a boot slot holding the page
//! tables and the program, and an exit handler that records what it sees.

#![allow(dead_code, reason = "each test binary uses a subset")]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use memvisor_hostmem::{HugePages, MappedRegion, Memfd};
use memvisor_kvm::guest::{Boot, GuestProgram};
use memvisor_kvm::{DirtyGfn, ExitHandler, Flow, Kvm, Memslot, Stop, Vcpu, Vm};
use memvisor_memslots::{FileId, GmemFile, MemslotRequest, Memslots, ResolveError, VmId};
use memvisor_types::{Address, Gpa};

/// Slot 0: 2 MiB of memfd at GPA 0 with page tables and code.
pub const BOOT_SLOT: u32 = 0;
pub const BOOT_SIZE: u64 = 0x20_0000;
pub const PAGE: u64 = 4096;
/// An address no slot backs: stores there reach the handler as MMIO writes.
pub const REPORT: Gpa = Gpa::new(0xd000_0000);
/// Generous bound so a broken guest fails the test instead of hanging it.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn memfd_region(pages: u64) -> Arc<dyn MappedRegion> {
    let memfd = Memfd::create("memvisor-test", pages * PAGE, HugePages::None).unwrap();
    Arc::new(memfd.map(0, pages * PAGE).unwrap())
}

pub fn anon_region(pages: u64) -> Arc<dyn MappedRegion> {
    Arc::new(memvisor_hostmem::Mapping::anonymous(pages * PAGE).unwrap())
}

/// A VM with the boot slot; `prepare` runs before the vCPU exists (enable the
/// dirty ring or manual protect there) and returns the test's other slots.
pub fn vm_with_slots(kvm: &Kvm, prepare: impl FnOnce(&Vm) -> Vec<Memslot>) -> Vm {
    let vm = kvm.create_vm().unwrap();
    vm.set_memslot(Memslot::new(BOOT_SLOT, Gpa::new(0), memfd_region(BOOT_SIZE / PAGE))).unwrap();
    for slot in prepare(&vm) {
        vm.set_memslot(slot).unwrap();
    }
    vm
}

/// Loads `program` into the boot slot and returns a vCPU about to run it.
pub fn boot(vm: &Vm, program: &mut GuestProgram) -> Vcpu {
    let entry = Boot::default().load(&vm.guest_ram().unwrap(), program).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.enter_long_mode(&entry).unwrap();
    vcpu
}

/// Records every exit; MMIO reads return `mmio_fill` bytes.
#[derive(Debug, Default)]
pub struct Recorder {
    pub outs: Vec<(u16, Vec<u8>)>,
    pub ins: Vec<u16>,
    pub mmio_writes: Vec<(Gpa, Vec<u8>)>,
    pub mmio_reads: Vec<Gpa>,
    pub in_value: u32,
    pub mmio_fill: u8,
}

impl Recorder {
    /// The 8-byte values the guest stored at [`REPORT`].
    pub fn reports(&self) -> Vec<u64> {
        self.mmio_writes
            .iter()
            .filter(|(gpa, _)| *gpa == REPORT)
            .filter_map(|(_, d)| <[u8; 8]>::try_from(d.as_slice()).ok().map(u64::from_le_bytes))
            .collect()
    }
}

impl ExitHandler for Recorder {
    fn pio_out(&mut self, port: u16, data: &[u8]) -> Flow {
        self.outs.push((port, data.to_vec()));
        Flow::Continue
    }

    fn pio_in(&mut self, port: u16, data: &mut [u8]) -> Flow {
        self.ins.push(port);
        for (d, s) in data.iter_mut().zip(self.in_value.to_le_bytes().iter().cycle()) {
            *d = *s;
        }
        Flow::Continue
    }

    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Flow {
        self.mmio_reads.push(gpa);
        data.fill(self.mmio_fill);
        Flow::Continue
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Flow {
        self.mmio_writes.push((gpa, data.to_vec()));
        Flow::Continue
    }
}

/// Runs until the next `hlt`, failing the test on anything else.
pub fn run_to_halt(vcpu: &mut Vcpu, recorder: &mut Recorder) {
    assert_eq!(vcpu.run(recorder, Some(TIMEOUT)).unwrap(), Stop::Halted);
}

/// What [`run_harvesting_ring`] saw.
#[derive(Debug)]
pub struct RingRun {
    pub stop: Stop,
    pub harvested: Vec<DirtyGfn>,
    pub full_exits: u32,
    /// Whether the ring was ever found overfilled (entries may be lost).
    pub overflowed: bool,
}

/// Runs to a stop other than a full dirty ring, harvesting and resetting the
/// ring at each ring-full exit (at most 10,000 of them).
pub fn run_harvesting_ring(vm: &Vm, vcpu: &mut Vcpu, exits: &mut Recorder) -> RingRun {
    let mut harvested = Vec::new();
    let mut overflowed = false;
    for full_exits in 0..10_000 {
        let stop = vcpu.run(exits, Some(TIMEOUT)).unwrap();
        vcpu.harvest_dirty_ring(&mut harvested).unwrap();
        overflowed |= vcpu.take_dirty_ring_overflow().unwrap();
        if stop != Stop::DirtyRingFull {
            return RingRun { stop, harvested, full_exits, overflowed };
        }
        vm.reset_dirty_rings().unwrap();
    }
    panic!("the dirty ring stayed full after 10,000 harvests");
}

/// Reads the u64 at `gpa` through memvisor's GPA → HVA path.
pub fn read_u64(vm: &Vm, gpa: Gpa) -> u64 {
    let mut buf = [0u8; 8];
    vm.guest_ram().unwrap().read_at(gpa, &mut buf).unwrap();
    u64::from_le_bytes(buf)
}

/// Page `n` of the slot at `base`.
pub fn page(base: Gpa, n: u64) -> Gpa {
    at(base, n * PAGE)
}

/// `gpa + offset`.
pub fn at(gpa: Gpa, offset: u64) -> Gpa {
    gpa.checked_add(offset).unwrap()
}

/// memvisor-memslots' model of the VM's slots, mirrored from the requests
/// the VM accepted: the test reads guest memory through its gpa → hva.
pub struct MemslotsModel {
    model: Memslots,
    slots: Vec<Memslot>,
}

impl MemslotsModel {
    pub fn mirror(vm: &Vm) -> Self {
        let id = VmId(1);
        let slots = vm.memslots();
        let files = |fd: i32| {
            slots
                .iter()
                .filter_map(|s| s.guest_memfd())
                .find(|(f, _)| f.fd().as_raw_fd() == fd)
                .map(|(f, _)| GmemFile {
                    id: FileId(u64::from(fd.unsigned_abs())),
                    size: f.size(),
                    owner: id,
                })
                .ok_or(ResolveError::NotGuestMemfd)
        };
        let mut model = Memslots::new(id);
        for s in &slots {
            let mut req =
                MemslotRequest::new(s.id(), s.gpa(), s.len(), s.memory().hva()).with_flags(s.flags().bits());
            if let Some((file, offset)) = s.guest_memfd() {
                req = req.with_guest_memfd(file.fd().as_raw_fd(), offset);
            }
            model.apply(&req, &files).unwrap();
        }
        Self { model, slots }
    }

    /// The u64 at `gpa`: gpa → hva by memvisor-memslots, then read from the
    /// slot's mapping that contains the hva.
    pub fn read_u64(&self, gpa: Gpa) -> u64 {
        let hva = self.model.reader().gpa_to_hva(0, gpa).unwrap();
        let slot = self
            .slots
            .iter()
            .find(|s| hva.offset_from(s.memory().hva()).is_some_and(|d| d < s.len()))
            .unwrap();
        let mut buf = [0u8; 8];
        slot.memory().read_at(hva.offset_from(slot.memory().hva()).unwrap(), &mut buf).unwrap();
        u64::from_le_bytes(buf)
    }
}
