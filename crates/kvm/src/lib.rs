//! The only memvisor crate that issues KVM ioctls.
//!
//! | piece | where |
//! |---|---|
//! | open `/dev/kvm`, capabilities | [`Kvm`], [`Capabilities`] |
//! | VM, memslots (`KVM_SET_USER_MEMORY_REGION2`, guest_memfd slots included) | [`Vm`], [`Memslot`], [`MemslotFlags`] |
//! | guest_memfd: create, mmap, punch hole | [`GuestMemfd`] |
//! | dirty bitmap, `MANUAL_DIRTY_LOG_PROTECT2` + `KVM_CLEAR_DIRTY_LOG`, dirty ring | [`DirtyBitmap`], [`Vm::enable_dirty_ring`], [`Vcpu::harvest_dirty_ring`], [`Vm::reset_dirty_rings`], [`Vcpu::take_dirty_ring_overflow`] |
//! | vCPUs in 64-bit or 32-bit protected (multiboot) mode, run loop dispatching PIO/MMIO/IOAPIC-EOI exits | [`Vcpu`], [`ProtectedModeEntry`], [`ExitHandler`], [`Stop`] |
//! | split irqchip (in-kernel local APICs), MSI injection, MSI routes (I/O APIC EOI exits) | [`Vm::enable_split_irqchip`], [`Vm::signal_msi`], [`Vm::set_msi_routes`] |
//! | test guests: simple-instruction programs and identity page tables | [`guest`] |
//! | skip-or-fail helper for tests that need `/dev/kvm` | [`testing::kvm_or_skip`] |
//!
//! Memory safety of memslots rests on ownership, as in crosvm: a [`Memslot`]
//! holds its host memory as `Arc<dyn MappedRegion>`, and the [`Vm`] keeps that
//! `Arc` from the moment KVM accepts the slot until KVM has forgotten it
//! (delete, or replacement by a successful update). vCPUs hold the VM, so the
//! memory outlives every `KVM_RUN` that could touch it; a slot can never
//! outlive its mapping.
//!
//! Errors carry the errno KVM returned ([`Error::errno`]).
//!
//! Observed on the kernel this was developed on (Linux 6.18.44, the PVM
//! software KVM, default VM type), each pinned by a test in
//! `tests/real_guest.rs`:
//! - guest accesses to a `GUEST_MEMFD` slot go through its `userspace_addr`
//!   (there are no private attributes), so the slot's shared half must be a
//!   mapping of the guest_memfd itself for guest and file to agree;
//! - guest_memfd slots cannot be moved (EINVAL); punching a hole zeroes the
//!   range for guest and host;
//! - with the dirty ring enabled `KVM_GET_DIRTY_LOG` fails with ENXIO;
//! - the dirty ring gets an entry per guest store rather than per page, and
//!   the vCPU is not stopped at the ring's soft limit: the ring fills
//!   completely and laps, losing entries — harvesting detects and recovers
//!   from that and reports it ([`Vcpu::take_dirty_ring_overflow`]);
//! - with a split irqchip, the EOI exit of a routed level-triggered vector
//!   (`KVM_EXIT_IOAPIC_EOI`) is taken at the vCPU's next exit to userspace,
//!   not right after the guest's EOI: a guest that halts right after the
//!   EOI with nothing else pending never produces it (`tests/irqchip.rs`).
//!
//! ```no_run
//! use memvisor_kvm::{Kvm, Memslot};
//! use memvisor_hostmem::Mapping;
//! use memvisor_types::Gpa;
//! use std::sync::Arc;
//!
//! let kvm = Kvm::open()?;
//! let vm = kvm.create_vm()?;
//! let ram = Arc::new(Mapping::anonymous(0x20_0000)?);
//! vm.set_memslot(Memslot::new(0, Gpa::new(0), ram))?;
//! let err = vm.move_memslot(7, Gpa::new(0x1000)).unwrap_err();
//! assert!(matches!(err, memvisor_kvm::Error::NoSuchSlot(7)));
//! # Ok::<(), memvisor_kvm::Error>(())
//! ```
//!
//! Non-goals here: device models, the I/O APIC included (the reference
//! VMM's job, over the split irqchip), confidential VM types (absent on the
//! machines memvisor is developed on), architectures other than x86-64.

#![warn(missing_docs)]

mod dirty;
pub mod guest;
mod guest_memfd;
mod memslot;
mod sys;
pub mod testing;
mod vcpu;
mod vm;

pub use dirty::{DirtyBitmap, DirtyGfn};
pub use guest_memfd::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd};
pub use memslot::{Memslot, MemslotFlags};
pub use vcpu::{ExitHandler, Flow, ProtectedModeEntry, Stop, Vcpu};
pub use vm::{Capabilities, Kvm, MsiRoute, Vm};

use std::time::Duration;

use memvisor_types::RangeError;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ioctl (or mmap of a KVM file) failed; the source carries the errno.
    #[error("{op} failed")]
    Kvm {
        /// The operation (`KVM_SET_USER_MEMORY_REGION2`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Host memory could not be mapped or changed.
    #[error("host memory")]
    HostMem(#[from] memvisor_hostmem::Error),
    /// A memslot's mapping is smaller than the slot; KVM would let the guest
    /// reach whatever is mapped after it.
    #[error("memslot {slot}: its mapping has {mapping:#x} bytes, the slot needs {size:#x}")]
    MappingTooSmall {
        /// Raw slot id.
        slot: u32,
        /// Size of the mapping.
        mapping: u64,
        /// Size of the slot.
        size: u64,
    },
    /// The slot was not registered through this [`Vm`].
    #[error("memslot {0} is not registered")]
    NoSuchSlot(u32),
    /// A value does not fit the field KVM has for it.
    #[error("{what} {value:#x} does not fit KVM's field")]
    TooLarge {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// The dirty ring is not enabled on this VM.
    #[error("the dirty ring is not enabled")]
    NoDirtyRing,
    /// A dirty-ring entry could not be accessed.
    #[error("dirty ring entry at byte {offset:#x}: {reason}")]
    DirtyRing {
        /// Byte offset of the entry in the ring.
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// The guest shut down (triple fault).
    #[error("the guest shut down (triple fault)")]
    Shutdown,
    /// `KVM_RUN` could not enter the guest.
    #[error("guest entry failed: hardware reason {reason:#x} on cpu {cpu}")]
    FailEntry {
        /// Hardware entry-failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM reported an internal error (suberror 1 is an emulation failure:
    /// an instruction KVM cannot emulate).
    #[error("KVM internal error, suberror {suberror}, data {data:x?}")]
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// `kvm_run.internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// An exit the run loop does not handle.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// The vCPU did not stop within the time given to [`Vcpu::run`].
    #[error("the vCPU did not stop within {0:?}")]
    Timeout(Duration),
    /// A guest program could not be assembled.
    #[error("guest program: {0}")]
    Assemble(String),
    /// Guest page tables could not be built.
    #[error("guest page tables")]
    Paging(#[from] memvisor_paging::Error),
    /// Checked address arithmetic failed.
    #[error("invalid address range")]
    Range(#[from] RangeError),
}

impl Error {
    /// The errno of an OS failure (KVM's or the host memory's), `None` otherwise.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kvm { source, .. } => source.raw_os_error(),
            Error::HostMem(e) => e.errno(),
            _ => None,
        }
    }

    pub(crate) fn kvm(op: &'static str, e: vmm_sys_util::errno::Error) -> Self {
        Error::Kvm { op, source: std::io::Error::from_raw_os_error(e.errno()) }
    }

    pub(crate) fn last_os(op: &'static str) -> Self {
        Error::Kvm { op, source: std::io::Error::last_os_error() }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
