//! The crate's one error type, errno-compatible with Linux.

/// Why a memslot request or a guest_memfd file operation was refused.
///
/// Each variant is one check of KVM (or of the VFS in front of guest_memfd)
/// and carries the errno the kernel returns for it ([`Error::errno`]);
/// memslot variants also name their row of the rules table in
/// `reference/kvm-memory.md` ([`Error::rule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- KVM_SET_USER_MEMORY_REGION(2), in KVM's order of checks ----
    /// Rule 1: the v1 ioctl carries a flag other than LOG_DIRTY_PAGES or READONLY.
    #[error("flags {flags:#x} cannot be set through KVM_SET_USER_MEMORY_REGION")]
    V1Flags {
        /// The requested flags.
        flags: u32,
    },
    /// Rule 2: the slot id is not a user slot.
    #[error("slot id {id} is not below the {limit} user memslots")]
    SlotId {
        /// Requested id (bits 0–15 of the slot field).
        id: u16,
        /// `KVM_USER_MEM_SLOTS`.
        limit: u16,
    },
    /// Rule 3: an unknown flag, or a forbidden combination (GUEST_MEMFD with
    /// LOG_DIRTY_PAGES or READONLY), or a flag the VM does not support.
    #[error("flags {flags:#x} are not a valid memslot flag combination")]
    Flags {
        /// The requested flags.
        flags: u32,
    },
    /// Rule 4: the size is not a multiple of the page size.
    #[error("memory size {size:#x} is not page-aligned")]
    UnalignedSize {
        /// Requested size.
        size: u64,
    },
    /// Rule 5: the guest-physical address is not page-aligned.
    #[error("guest-physical address {gpa:#x} is not page-aligned")]
    UnalignedGpa {
        /// Requested address.
        gpa: u64,
    },
    /// Rule 6: the userspace address is not page-aligned.
    #[error("userspace address {hva:#x} is not page-aligned")]
    UnalignedHva {
        /// Requested address.
        hva: u64,
    },
    /// Rule 6 (`access_ok`): the userspace range wraps or leaves the user address space.
    #[error("userspace range {hva:#x} + {size:#x} is not inside the user address space")]
    HvaRange {
        /// Requested address.
        hva: u64,
        /// Requested size.
        size: u64,
    },
    /// Rule 7: the guest_memfd offset is unaligned, or offset + size wraps.
    #[error("guest_memfd offset {offset:#x} is unaligned or {offset:#x} + {size:#x} wraps")]
    GmemOffset {
        /// Requested offset.
        offset: u64,
        /// Requested size.
        size: u64,
    },
    /// Rule 8: the address-space id does not exist.
    #[error("address space {as_id} does not exist (the VM has {count})")]
    AddressSpace {
        /// Requested address-space id.
        as_id: u16,
        /// Number of address spaces.
        count: u16,
    },
    /// Rule 9: guest-physical address + size wraps.
    #[error("guest-physical range {gpa:#x} + {size:#x} wraps")]
    GpaWrap {
        /// Requested address.
        gpa: u64,
        /// Requested size.
        size: u64,
    },
    /// Rule 10: the slot has more pages than one slot may.
    #[error("{npages:#x} pages exceed the per-slot maximum of {max:#x}")]
    TooManyPages {
        /// Requested page count.
        npages: u64,
        /// `KVM_MEM_MAX_NR_PAGES`.
        max: u64,
    },
    /// Rule 11: deleting a slot that does not exist.
    #[error("slot {as_id}:{id} is empty, so there is nothing to delete")]
    DeleteEmpty {
        /// Address space.
        as_id: u16,
        /// Slot id.
        id: u16,
    },
    /// Rule 12: the VM's total page count would overflow.
    #[error("{npages:#x} more pages would overflow the VM's total page count")]
    TotalPages {
        /// Requested page count.
        npages: u64,
    },
    /// Rule 13: a GUEST_MEMFD request names an existing slot (such slots can
    /// only be created and deleted).
    #[error("slot {as_id}:{id} exists, and guest_memfd slots cannot be modified, only deleted")]
    GmemImmutable {
        /// Address space.
        as_id: u16,
        /// Slot id.
        id: u16,
    },
    /// Rule 14: a modification changes the userspace address or the size, or
    /// toggles READONLY or GUEST_MEMFD.
    #[error("slot {as_id}:{id} cannot change its userspace address, size, READONLY or GUEST_MEMFD")]
    InvalidModify {
        /// Address space.
        as_id: u16,
        /// Slot id.
        id: u16,
    },
    /// Rule 16: the new or moved slot overlaps another slot of its address space.
    #[error("gfns {start:#x}..{end:#x} overlap slot {other}")]
    Overlap {
        /// First gfn of the request.
        start: u64,
        /// End gfn (exclusive) of the request.
        end: u64,
        /// The slot already there.
        other: u16,
    },
    /// Rule 17: the guest_memfd descriptor is not open.
    #[error("file descriptor {fd} is not open")]
    BadFd {
        /// The descriptor.
        fd: i32,
    },
    /// Rule 18: the descriptor is not a guest_memfd.
    #[error("file descriptor {fd} is not a guest_memfd")]
    NotGuestMemfd {
        /// The descriptor.
        fd: i32,
    },
    /// Rule 18: the guest_memfd was created by another VM.
    #[error("guest_memfd {fd} belongs to another VM")]
    ForeignGuestMemfd {
        /// The descriptor.
        fd: i32,
    },
    /// Rule 18: the bound range is not inside the file (or the offset is
    /// negative as a signed file offset).
    #[error("guest_memfd range {offset:#x} + {size:#x} is not inside the file's {file_size:#x} bytes")]
    GmemRange {
        /// Requested offset.
        offset: u64,
        /// Requested size.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// Rule 18: part of the range is already bound to another slot (6.18
    /// returns EINVAL; later kernels EEXIST).
    #[error("guest_memfd pages {start:#x}..{end:#x} overlap another slot's binding")]
    GmemBindingOverlap {
        /// First file page of the request.
        start: u64,
        /// End file page (exclusive) of the request.
        end: u64,
    },
    /// Rule 19: the slot's last gfn is beyond what the MMU can map.
    #[error("last gfn {last:#x} is beyond the MMU's maximum {max:#x}")]
    BeyondMaxGfn {
        /// The slot's last gfn.
        last: u64,
        /// `kvm_mmu_max_gfn()`.
        max: u64,
    },

    // ---- guest_memfd files (KVM_CREATE_GUEST_MEMFD and file operations) ----
    /// KVM_CREATE_GUEST_MEMFD with an unsupported flag.
    #[error("guest_memfd flags {flags:#x} are not supported")]
    GmemFlags {
        /// Requested flags.
        flags: u64,
    },
    /// KVM_CREATE_GUEST_MEMFD with a size that is 0, negative or unaligned.
    #[error("guest_memfd size {size:#x} is not a positive multiple of the page size")]
    GmemSize {
        /// Requested size.
        size: u64,
    },
    /// read, write or truncate of a guest_memfd: its contents are reached
    /// only through mappings, and its size never changes.
    #[error("a guest_memfd cannot be {op}")]
    GmemFileOp {
        /// "read", "written" or "truncated".
        op: &'static str,
    },
    /// pread or pwrite of a guest_memfd: the file is not positionable.
    #[error("a guest_memfd cannot be {op} at a position")]
    GmemNotPositionable {
        /// "read" or "written".
        op: &'static str,
    },
    /// pread or pwrite at a negative position.
    #[error("file position {offset:#x} is negative")]
    NegativePosition {
        /// The position.
        offset: i64,
    },
    /// mmap with length 0, an unaligned offset, or no mapping type.
    #[error("invalid mmap request: {reason}")]
    MmapInvalid {
        /// What is wrong.
        reason: &'static str,
    },
    /// mmap whose length does not fit the address space.
    #[error("no room for a mapping of {len:#x} bytes")]
    MmapNoMemory {
        /// Requested length.
        len: u64,
    },
    /// mmap whose offset + length exceeds the largest file offset.
    #[error("mmap offset {offset:#x} + {len:#x} exceeds the largest file offset")]
    MmapOverflow {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// mmap with PROT_EXEC of a file on a noexec mount (guest_memfd's pseudo fs).
    #[error("guest_memfd cannot be mapped executable")]
    MmapExec,
    /// mmap of a guest_memfd created without GUEST_MEMFD_FLAG_MMAP.
    #[error("guest_memfd was created without the MMAP flag")]
    MmapUnsupported,
    /// mmap of a guest_memfd that is not MAP_SHARED.
    #[error("guest_memfd can only be mapped MAP_SHARED")]
    MmapPrivate,
    /// fallocate with a negative offset or a length that is not positive.
    #[error("fallocate range {offset:#x} + {len:#x} is invalid")]
    FallocateRange {
        /// Requested offset.
        offset: i64,
        /// Requested length.
        len: i64,
    },
    /// fallocate mode the VFS or guest_memfd does not support.
    #[error("fallocate mode {mode:#x} is not supported")]
    FallocateMode {
        /// Requested mode.
        mode: i32,
    },
    /// fallocate whose offset + length overflows a file offset.
    #[error("fallocate range {offset:#x} + {len:#x} exceeds the largest file offset")]
    FallocateTooBig {
        /// Requested offset.
        offset: i64,
        /// Requested length.
        len: i64,
    },
    /// fallocate with an unaligned offset or length.
    #[error("fallocate range {offset:#x} + {len:#x} is not page-aligned")]
    FallocateUnaligned {
        /// Requested offset.
        offset: i64,
        /// Requested length.
        len: i64,
    },
    /// fallocate allocating beyond the end of the file (guest_memfd never grows).
    #[error("fallocate range {offset:#x} + {len:#x} extends past the file's end")]
    FallocatePastEof {
        /// Requested offset.
        offset: i64,
        /// Requested length.
        len: i64,
    },
}

impl Error {
    /// The errno Linux returns for this error (`libc::EINVAL`, `libc::EEXIST`, …).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Overlap { .. } => libc::EEXIST,
            Error::BadFd { .. } => libc::EBADF,
            Error::MmapNoMemory { .. } => libc::ENOMEM,
            Error::GmemNotPositionable { .. } => libc::ESPIPE,
            Error::MmapOverflow { .. } => libc::EOVERFLOW,
            Error::MmapExec => libc::EPERM,
            Error::MmapUnsupported => libc::ENODEV,
            Error::FallocateMode { .. } => libc::EOPNOTSUPP,
            Error::FallocateTooBig { .. } => libc::EFBIG,
            Error::V1Flags { .. }
            | Error::SlotId { .. }
            | Error::Flags { .. }
            | Error::UnalignedSize { .. }
            | Error::UnalignedGpa { .. }
            | Error::UnalignedHva { .. }
            | Error::HvaRange { .. }
            | Error::GmemOffset { .. }
            | Error::AddressSpace { .. }
            | Error::GpaWrap { .. }
            | Error::TooManyPages { .. }
            | Error::DeleteEmpty { .. }
            | Error::TotalPages { .. }
            | Error::GmemImmutable { .. }
            | Error::InvalidModify { .. }
            | Error::NotGuestMemfd { .. }
            | Error::ForeignGuestMemfd { .. }
            | Error::GmemRange { .. }
            | Error::GmemBindingOverlap { .. }
            | Error::BeyondMaxGfn { .. }
            | Error::GmemFlags { .. }
            | Error::GmemSize { .. }
            | Error::GmemFileOp { .. }
            | Error::NegativePosition { .. }
            | Error::MmapInvalid { .. }
            | Error::MmapPrivate
            | Error::FallocateRange { .. }
            | Error::FallocateUnaligned { .. }
            | Error::FallocatePastEof { .. } => libc::EINVAL,
        }
    }

    /// The row of the memslot rules table (`reference/kvm-memory.md`) this
    /// error enforces, or `None` for guest_memfd file errors.
    pub fn rule(&self) -> Option<u8> {
        Some(match self {
            Error::V1Flags { .. } => 1,
            Error::SlotId { .. } => 2,
            Error::Flags { .. } => 3,
            Error::UnalignedSize { .. } => 4,
            Error::UnalignedGpa { .. } => 5,
            Error::UnalignedHva { .. } | Error::HvaRange { .. } => 6,
            Error::GmemOffset { .. } => 7,
            Error::AddressSpace { .. } => 8,
            Error::GpaWrap { .. } => 9,
            Error::TooManyPages { .. } => 10,
            Error::DeleteEmpty { .. } => 11,
            Error::TotalPages { .. } => 12,
            Error::GmemImmutable { .. } => 13,
            Error::InvalidModify { .. } => 14,
            Error::Overlap { .. } => 16,
            Error::BadFd { .. } => 17,
            Error::NotGuestMemfd { .. }
            | Error::ForeignGuestMemfd { .. }
            | Error::GmemRange { .. }
            | Error::GmemBindingOverlap { .. } => 18,
            Error::BeyondMaxGfn { .. } => 19,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_eexist_and_rule_16() {
        let e = Error::Overlap { start: 0, end: 1, other: 2 };

        assert_eq!((e.errno(), e.rule()), (libc::EEXIST, Some(16)));
    }

    #[test]
    fn messages_are_sentence_case_without_trailing_period() {
        let e = Error::SlotId { id: 32764, limit: 32764 };

        let msg = e.to_string();

        assert_eq!(msg, "slot id 32764 is not below the 32764 user memslots");
    }
}
