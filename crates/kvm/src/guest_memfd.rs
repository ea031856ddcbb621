//! guest_memfd: private guest memory in a file KVM creates.
//!
//! Facts (Linux 6.18 `virt/kvm/guest_memfd.c`, `Documentation/virt/kvm/api.rst`
//! §4.140, reproduced on this machine where noted in the tests):
//! - `KVM_CREATE_GUEST_MEMFD` takes a size (> 0, page-aligned) and flags;
//!   with `KVM_CAP_GUEST_MEMFD_FLAGS` (244) reporting `MMAP | INIT_SHARED`,
//!   both may be set, anything else is EINVAL.
//! - The file never changes size; `mmap` needs `MMAP` (ENODEV otherwise) and
//!   `MAP_SHARED`; without `INIT_SHARED` a host fault on it is SIGBUS.
//! - `fallocate(PUNCH_HOLE | KEEP_SIZE)` frees pages after invalidating every
//!   memslot binding that overlaps the range (KVM zaps its mappings first), so
//!   both the guest and host mappings read zeros afterwards.
//! - The file holds a reference to its VM (`kvm_get_kvm` at creation).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use kvm_bindings::kvm_create_guest_memfd;
use kvm_ioctls::VmFd;
use memvisor_hostmem::Mapping;

use crate::{Error, Result, sys};

/// `GUEST_MEMFD_FLAG_MMAP` (`include/uapi/linux/kvm.h`, Linux 6.18): the file
/// may be mmap'ed by the host. kvm-bindings 0.14 lacks it.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18): memory starts shared, so the
/// host may fault it in. kvm-bindings 0.14 lacks it.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// A guest_memfd file. Clones share the file.
#[derive(Debug, Clone)]
pub struct GuestMemfd {
    fd: Arc<OwnedFd>,
    size: u64,
    flags: u64,
}

impl GuestMemfd {
    pub(crate) fn create(vm: &VmFd, size: u64, flags: u64) -> Result<Self> {
        let raw = vm
            .create_guest_memfd(kvm_create_guest_memfd { size, flags, ..Default::default() })
            .map_err(|e| Error::kvm("KVM_CREATE_GUEST_MEMFD", e))?;
        Ok(Self { fd: Arc::new(sys::adopt_guest_memfd(raw)), size, flags })
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The creation flags.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// The file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Maps `len` bytes from `offset` into the host (`MAP_SHARED`); needs the
    /// `MMAP` flag (ENODEV otherwise). The mapping keeps the file open and
    /// can serve as a memslot's `userspace_addr`.
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        Ok(Mapping::from_fd(Arc::clone(&self.fd), offset, len)?)
    }

    /// Frees the pages under `offset..offset + len`
    /// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); KVM first zaps every guest
    /// mapping of them. Guest and host read zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        Ok(memvisor_hostmem::punch_hole(self.fd.as_fd(), offset, len)?)
    }
}
