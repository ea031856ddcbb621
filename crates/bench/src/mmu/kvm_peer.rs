//! The kernel peer of the mmu suite: a real KVM VM whose memslot covers the
//! very host memory memvisor's MMU maps, and a guest that touches one
//! qword per 4 KiB page of it, so KVM maps every page.
//!
//! The guest is 13 bytes of hand-assembled long-mode code, placed by
//! memvisor-kvm's test-guest loader (identity page tables with 2 MiB pages):
//!
//! ```text
//! top: 48 89 0f              mov [rdi], rcx
//!      48 81 c7 00 10 00 00  add rdi, 0x1000
//!      e2 f4                 loop top
//!      f4                    hlt
//! ```
//!
//! `rdi` (first GPA) and `rcx` (page count) are set before every run.

#![expect(unsafe_code, reason = "madvise(MADV_HUGEPAGE) on the benchmark's own anonymous mapping")]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use memvisor_hostmem::{HugePages, MappedRegion, Memfd};
use memvisor_kvm::guest::{Boot, GuestProgram};
use memvisor_kvm::{ExitHandler, Kvm, Memslot, Stop, Vcpu, Vm};
use memvisor_types::{Address, Gpa};
use vm_memory::{Bytes, GuestAddress};

const TOUCH: [u8; 13] = [0x48, 0x89, 0x0f, 0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0xe2, 0xf4, 0xf4];
const BOOT_SIZE: u64 = 0x20_0000;
const PAGE: u64 = 4096;
/// Slot id of the benchmarked memory (slot 0 holds tables and code).
const SLOT: u32 = 1;
/// Generous: first touch costs ~6 µs per page on the software KVM here.
const TIMEOUT: Duration = Duration::from_secs(60);

struct Quiet;
impl ExitHandler for Quiet {}

/// A VM with one vCPU whose slot 1 maps `memory` at `gpa`.
pub(crate) struct Toucher {
    vm: Vm,
    vcpu: Vcpu,
    entry_rip: u64,
    entry_rsp: u64,
    gpa: Gpa,
    memory: Arc<dyn MappedRegion>,
}

impl Toucher {
    /// A VM over `memory` at `gpa` (below 4 GiB, 2 MiB-aligned), or `None`
    /// when `/dev/kvm` is absent.
    pub(crate) fn new(memory: Arc<dyn MappedRegion>, gpa: Gpa) -> Result<Option<Self>> {
        if !std::path::Path::new("/dev/kvm").exists() {
            return Ok(None);
        }
        let kvm = Kvm::open().context("cannot open /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM failed")?;
        let boot = Arc::new(Memfd::create("mmu-bench-boot", BOOT_SIZE, HugePages::None)?.map(0, BOOT_SIZE)?);
        vm.set_memslot(Memslot::new(0, Gpa::new(0), boot))?;
        vm.set_memslot(Memslot::new(SLOT, gpa, Arc::clone(&memory)))?;
        let ram = vm.guest_ram()?;
        let layout = Boot::default();
        let mut program = GuestProgram::new()?;
        program.hlt()?;
        let entry = layout.load(&ram, &mut program)?;
        ram.write_slice(&TOUCH, GuestAddress(layout.code.raw())).context("loading the touch loop")?;
        let vcpu = vm.create_vcpu(0)?;
        vcpu.enter_long_mode(&entry)?;
        Ok(Some(Self { vm, vcpu, entry_rip: entry.rip, entry_rsp: entry.rsp, gpa, memory }))
    }

    /// Runs the guest: one store to each of the first `pages` pages.
    pub(crate) fn touch(&mut self, pages: u64) -> Result<()> {
        ensure!(pages > 0 && pages * PAGE <= self.memory.size(), "{pages} pages do not fit the slot");
        let mut regs = self.vcpu.regs()?;
        regs.rip = self.entry_rip;
        regs.rsp = self.entry_rsp;
        regs.rdi = self.gpa.raw();
        regs.rcx = pages;
        regs.rflags = 0x2;
        self.vcpu.set_regs(&regs)?;
        match self.vcpu.run(&mut Quiet, Some(TIMEOUT))? {
            Stop::Halted => Ok(()),
            other => bail!("the touch guest stopped with {other:?}"),
        }
    }

    /// Deletes and re-creates the slot: KVM zaps every mapping of it, the
    /// host pages stay.
    pub(crate) fn zap_by_slot_toggle(&self) -> Result<()> {
        self.vm.delete_memslot(SLOT)?;
        self.vm.set_memslot(Memslot::new(SLOT, self.gpa, Arc::clone(&self.memory)))?;
        Ok(())
    }
}

/// `madvise(MADV_HUGEPAGE)` on `region`, so the host backs it with
/// transparent huge pages (THP mode here is `madvise`).
pub(crate) fn want_thp(region: &dyn MappedRegion) -> Result<()> {
    let addr = usize::try_from(region.hva().raw())?;
    let len = usize::try_from(region.size())?;
    // SAFETY: the range is a mapping the region keeps alive; MADV_HUGEPAGE
    // changes only how the kernel backs it, never its contents.
    let rc = unsafe { libc::madvise(std::ptr::with_exposed_provenance_mut(addr), len, libc::MADV_HUGEPAGE) };
    ensure!(rc == 0, "madvise(MADV_HUGEPAGE): {}", std::io::Error::last_os_error());
    Ok(())
}

/// Kilobytes of anonymous memory backed by THP in this process (`AnonHugePages` of smaps_rollup).
pub(crate) fn anon_huge_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
