//! The memslot request: `struct kvm_userspace_memory_region2` as userspace
//! hands it to `KVM_SET_USER_MEMORY_REGION(2)`, plus which of the two ioctls
//! carried it.

use memvisor_types::{Address, Gpa, Hva};

/// `KVM_MEM_LOG_DIRTY_PAGES`: track writes in a dirty bitmap or ring.
pub const LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `KVM_MEM_READONLY`: guest writes exit to userspace as MMIO.
pub const READONLY: u32 = 1 << 1;
/// `KVM_MEM_GUEST_MEMFD`: the slot's private half lives in a guest_memfd file.
pub const GUEST_MEMFD: u32 = 1 << 2;

/// The flags the v1 ioctl (`KVM_SET_USER_MEMORY_REGION`) can carry.
pub const V1_FLAGS: u32 = LOG_DIRTY_PAGES | READONLY;

/// Which ioctl carried a request (rule 1 of the table applies to v1 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Ioctl {
    /// `KVM_SET_USER_MEMORY_REGION`: no guest_memfd fields; the kernel zeroes
    /// them, so [`MemslotRequest::normalized`] does too.
    V1,
    /// `KVM_SET_USER_MEMORY_REGION2`.
    #[default]
    V2,
}

/// One memslot request, field for field `struct kvm_userspace_memory_region2`.
///
/// Every field is guest- or userspace-controlled and unchecked: validation is
/// [`Memslots::apply`](crate::Memslots::apply)'s job, in KVM's order.
///
/// ```
/// use memvisor_memslots::{MemslotRequest, GUEST_MEMFD};
/// use memvisor_types::{Gpa, Hva};
///
/// let req = MemslotRequest::new(3, Gpa::new(0x10_0000), 0x4000, Hva::new(0x7f00_0000_0000))
///     .with_guest_memfd(7, 0x2000);
/// assert_eq!(req.flags, GUEST_MEMFD);
/// assert_eq!((req.as_id(), req.id()), (0, 3));
/// assert!(MemslotRequest::delete(3).is_delete());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemslotRequest {
    /// Slot id in bits 0–15, address-space id in bits 16–31.
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// First guest-physical address of the slot.
    pub guest_phys_addr: Gpa,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// First host-virtual address backing the slot (its shared half).
    pub userspace_addr: Hva,
    /// Byte offset of the slot's first page in the guest_memfd file.
    pub guest_memfd_offset: u64,
    /// The guest_memfd file descriptor (the ABI field is a `__u32`; negative
    /// values are simply descriptors that are never open).
    pub guest_memfd: i32,
    /// The ioctl that carried the request.
    pub ioctl: Ioctl,
}

impl MemslotRequest {
    /// A v2 request for slot `slot` (address space 0) without flags.
    pub fn new(slot: u32, guest_phys_addr: Gpa, memory_size: u64, userspace_addr: Hva) -> Self {
        Self { slot, guest_phys_addr, memory_size, userspace_addr, ..Self::default() }
    }

    /// A v2 request deleting `slot` (size 0; KVM ignores the fields it does
    /// not check before noticing the deletion).
    pub fn delete(slot: u32) -> Self {
        Self { slot, ..Self::default() }
    }

    /// The same request with `flags` added.
    #[must_use]
    pub fn with_flags(mut self, flags: u32) -> Self {
        self.flags |= flags;
        self
    }

    /// The same request bound to guest_memfd `fd` at byte `offset` (adds
    /// [`GUEST_MEMFD`]).
    #[must_use]
    pub fn with_guest_memfd(mut self, fd: i32, offset: u64) -> Self {
        self.flags |= GUEST_MEMFD;
        self.guest_memfd = fd;
        self.guest_memfd_offset = offset;
        self
    }

    /// The same request carried by the v1 ioctl.
    #[must_use]
    pub fn v1(mut self) -> Self {
        self.ioctl = Ioctl::V1;
        self
    }

    /// The request as KVM sees it: the v1 ioctl copies only the v1 struct and
    /// zeroes the guest_memfd fields.
    pub fn normalized(&self) -> Self {
        match self.ioctl {
            Ioctl::V1 => Self { guest_memfd_offset: 0, guest_memfd: 0, ..*self },
            Ioctl::V2 => *self,
        }
    }

    /// Address-space id (bits 16–31 of `slot`).
    pub fn as_id(&self) -> u16 {
        // The shift leaves 16 bits, so the conversion cannot fail.
        u16::try_from(self.slot >> 16).unwrap_or(u16::MAX)
    }

    /// Slot id within the address space (bits 0–15 of `slot`).
    pub fn id(&self) -> u16 {
        // Keeping the low 16 bits is the point (KVM's `(u16)mem->slot`).
        u16::try_from(self.slot & 0xffff).unwrap_or(u16::MAX)
    }

    /// Whether the request deletes its slot (size 0).
    pub fn is_delete(&self) -> bool {
        self.memory_size == 0
    }

    /// The raw values, for printing a request as the ioctl would see it.
    pub fn raw(&self) -> [u64; 5] {
        [
            u64::from(self.slot),
            u64::from(self.flags),
            self.guest_phys_addr.raw(),
            self.memory_size,
            self.userspace_addr.raw(),
        ]
    }
}

impl core::fmt::Display for MemslotRequest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:?} slot {}:{} flags {:#x} gpa {:#x} size {:#x} uaddr {:#x}",
            self.ioctl,
            self.as_id(),
            self.id(),
            self.flags,
            self.guest_phys_addr.raw(),
            self.memory_size,
            self.userspace_addr.raw()
        )?;
        if self.flags & GUEST_MEMFD != 0 || self.guest_memfd != 0 || self.guest_memfd_offset != 0 {
            write!(f, " gmem fd {} offset {:#x}", self.guest_memfd, self.guest_memfd_offset)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_field_splits_into_address_space_and_id() {
        // Arrange
        let req = MemslotRequest::delete(0x0003_7ffc);

        // Act
        let (as_id, id) = (req.as_id(), req.id());

        // Assert
        assert_eq!((as_id, id), (3, 0x7ffc));
    }

    #[test]
    fn v1_request_loses_its_guest_memfd_fields() {
        let req = MemslotRequest::new(1, Gpa::new(0), 0x1000, Hva::new(0)).with_guest_memfd(5, 0x1000).v1();

        let seen = req.normalized();

        assert_eq!((seen.guest_memfd, seen.guest_memfd_offset, seen.flags), (0, 0, GUEST_MEMFD));
    }
}
