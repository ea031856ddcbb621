//! Memslots and the table that keeps their memory alive.
//!
//! `KVM_SET_USER_MEMORY_REGION2` is `unsafe` in kvm-ioctls because KVM keeps
//! `userspace_addr` and lets the guest read and write it until the slot is
//! deleted: unmapping that memory first would hand the guest whatever is
//! mapped there next. [`SlotTable`] is the one place that issues the ioctl,
//! and it stores the slot's `Arc<dyn MappedRegion>` exactly as long as KVM
//! knows the slot: inserted when KVM accepts it, replaced only when KVM
//! accepted a replacement (a successful modify returns after KVM has switched
//! to the new memslot array and waited for readers of the old one —
//! `kvm_swap_active_memslots` + `synchronize_srcu_expedited` in
//! `virt/kvm/kvm_main.c`), removed only when KVM deleted it.

#![expect(
    unsafe_code,
    reason = "KVM_SET_USER_MEMORY_REGION2; this module's slot table is what keeps every registered mapping alive"
)]

use std::collections::BTreeMap;
use std::fmt;
use std::ops::BitOr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::{
    KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, kvm_userspace_memory_region2,
};
use kvm_ioctls::VmFd;
use memvisor_hostmem::MappedRegion;
use memvisor_types::{Address, Gpa};

use crate::{Error, GuestMemfd, Result};

/// Flags of a memslot (`kvm_userspace_memory_region2.flags`).
///
/// [`GUEST_MEMFD`](Self::GUEST_MEMFD) is set by [`Memslot::with_guest_memfd`];
/// any other bit may be passed and KVM decides (EINVAL for unknown bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemslotFlags(u32);

impl MemslotFlags {
    /// No flags.
    pub const NONE: Self = Self(0);
    /// `KVM_MEM_LOG_DIRTY_PAGES`: track writes in the dirty bitmap / ring.
    pub const LOG_DIRTY_PAGES: Self = Self(KVM_MEM_LOG_DIRTY_PAGES);
    /// `KVM_MEM_READONLY`: guest writes exit to userspace as MMIO.
    pub const READONLY: Self = Self(KVM_MEM_READONLY);
    /// `KVM_MEM_GUEST_MEMFD`: private memory from a guest_memfd.
    pub const GUEST_MEMFD: Self = Self(KVM_MEM_GUEST_MEMFD);

    /// Flags from raw bits (unknown bits kept, for KVM to judge).
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` without the bits of `other`.
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

impl BitOr for MemslotFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for MemslotFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = [
            (Self::LOG_DIRTY_PAGES, "LOG_DIRTY_PAGES"),
            (Self::READONLY, "READONLY"),
            (Self::GUEST_MEMFD, "GUEST_MEMFD"),
        ]
        .into_iter()
        .filter(|(flag, _)| self.contains(*flag))
        .map(|(_, name)| name.to_owned())
        .collect();
        let rest = self.0 & !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD);
        if rest != 0 || parts.is_empty() {
            parts.push(format!("{rest:#x}"));
        }
        write!(f, "MemslotFlags({})", parts.join("|"))
    }
}

/// One memslot: `size` bytes of guest-physical memory at `gpa`, backed by the
/// start of a host mapping (and, for private memory, by a guest_memfd).
///
/// Slot ids follow KVM: bits 15:0 are the slot, bits 31:16 the address space.
#[derive(Debug, Clone)]
pub struct Memslot {
    slot: u32,
    gpa: Gpa,
    size: u64,
    flags: MemslotFlags,
    memory: Arc<dyn MappedRegion>,
    guest_memfd: Option<(GuestMemfd, u64)>,
}

impl Memslot {
    /// Slot `slot` covering all of `memory` at `gpa`.
    pub fn new(slot: u32, gpa: Gpa, memory: Arc<dyn MappedRegion>) -> Self {
        Self { slot, gpa, size: memory.size(), flags: MemslotFlags::NONE, memory, guest_memfd: None }
    }

    /// A `KVM_MEM_GUEST_MEMFD` slot: guest memory from `file` at `offset`,
    /// with `memory` as the slot's `userspace_addr` (its shared half). For a
    /// guest_memfd created with `MMAP`, `memory` is typically a mapping of the
    /// file itself ([`GuestMemfd::map`]).
    pub fn with_guest_memfd(
        slot: u32,
        gpa: Gpa,
        file: GuestMemfd,
        offset: u64,
        memory: Arc<dyn MappedRegion>,
    ) -> Self {
        Self {
            slot,
            gpa,
            size: memory.size(),
            flags: MemslotFlags::GUEST_MEMFD,
            memory,
            guest_memfd: Some((file, offset)),
        }
    }

    /// The same slot with `flags` (GUEST_MEMFD is kept as the slot's kind decides).
    pub fn with_flags(mut self, flags: MemslotFlags) -> Self {
        let kind = if self.guest_memfd.is_some() { MemslotFlags::GUEST_MEMFD } else { MemslotFlags::NONE };
        self.flags = flags.without(MemslotFlags::GUEST_MEMFD) | kind;
        self
    }

    /// The same slot covering only the first `size` bytes of its mapping.
    pub fn with_size(mut self, size: u64) -> Self {
        self.size = size;
        self
    }

    /// The same slot at another guest address.
    pub fn at(mut self, gpa: Gpa) -> Self {
        self.gpa = gpa;
        self
    }

    /// Raw slot id (address space in bits 31:16).
    pub fn id(&self) -> u32 {
        self.slot
    }

    /// First guest-physical address.
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the slot has no pages (a request of this shape deletes the slot).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The slot's flags.
    pub fn flags(&self) -> MemslotFlags {
        self.flags
    }

    /// The host mapping behind `userspace_addr`.
    pub fn memory(&self) -> &Arc<dyn MappedRegion> {
        &self.memory
    }

    /// The guest_memfd and offset, for a `GUEST_MEMFD` slot.
    pub fn guest_memfd(&self) -> Option<(&GuestMemfd, u64)> {
        self.guest_memfd.as_ref().map(|(f, o)| (f, *o))
    }

    fn region(&self) -> Result<kvm_userspace_memory_region2> {
        let (fd, offset) = match &self.guest_memfd {
            Some((file, offset)) => (
                u32::try_from(file.fd().as_raw_fd())
                    .map_err(|_| Error::TooLarge { what: "guest_memfd descriptor", value: 0 })?,
                *offset,
            ),
            None => (0, 0),
        };
        Ok(kvm_userspace_memory_region2 {
            slot: self.slot,
            flags: self.flags.bits(),
            guest_phys_addr: self.gpa.raw(),
            memory_size: self.size,
            userspace_addr: self.memory.hva().raw(),
            guest_memfd_offset: offset,
            guest_memfd: fd,
            ..Default::default()
        })
    }
}

/// The memslots a VM has, with their memory; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct SlotTable {
    slots: Mutex<BTreeMap<u32, Memslot>>,
}

impl SlotTable {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Memslot>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // with KVM: it is only changed after the ioctl returned.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates, moves or changes the flags of a slot (KVM decides which, and
    /// whether it is allowed). Returns the slot it replaced, if any.
    pub(crate) fn apply(&self, vm: &VmFd, slot: Memslot) -> Result<Option<Memslot>> {
        if slot.memory.size() < slot.size {
            return Err(Error::MappingTooSmall {
                slot: slot.slot,
                mapping: slot.memory.size(),
                size: slot.size,
            });
        }
        let region = slot.region()?;
        let mut slots = self.lock();
        // SAFETY: `userspace_addr..+memory_size` lies inside `slot.memory`
        // (checked above), which the MappedRegion contract keeps mapped while
        // the Arc lives. On success the Arc goes into the table (below, under
        // the same lock) and stays there until KVM no longer knows the slot;
        // on failure KVM changed nothing. A size-0 request deletes the slot,
        // after which KVM no longer uses the old memory.
        let rc = unsafe { vm.set_user_memory_region2(region) };
        rc.map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION2", e))?;
        Ok(if slot.size == 0 { slots.remove(&slot.slot) } else { slots.insert(slot.slot, slot) })
    }

    /// Deletes slot `id` (memory_size 0). Returns the slot, if it was
    /// registered here; KVM's errno (EINVAL for an empty slot) otherwise.
    pub(crate) fn delete(&self, vm: &VmFd, id: u32) -> Result<Option<Memslot>> {
        let region = kvm_userspace_memory_region2 { slot: id, ..Default::default() };
        let mut slots = self.lock();
        // SAFETY: a delete makes KVM drop the slot; no memory is registered.
        let rc = unsafe { vm.set_user_memory_region2(region) };
        rc.map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION2", e))?;
        Ok(slots.remove(&id))
    }

    pub(crate) fn get(&self, id: u32) -> Option<Memslot> {
        self.lock().get(&id).cloned()
    }

    pub(crate) fn snapshot(&self) -> Vec<Memslot> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_debug_names_known_bits_and_keeps_unknown_ones() {
        assert_eq!(format!("{:?}", MemslotFlags::NONE), "MemslotFlags(0x0)");
        assert_eq!(
            format!("{:?}", MemslotFlags::LOG_DIRTY_PAGES | MemslotFlags::READONLY),
            "MemslotFlags(LOG_DIRTY_PAGES|READONLY)"
        );
        assert_eq!(format!("{:?}", MemslotFlags::from_bits(0x101)), "MemslotFlags(LOG_DIRTY_PAGES|0x100)");
    }

    #[test]
    fn guest_memfd_kind_survives_a_flags_change() {
        let memory: Arc<dyn MappedRegion> = Arc::new(memvisor_hostmem::Mapping::anonymous(0x1000).unwrap());

        let slot = Memslot::new(1, Gpa::new(0), memory)
            .with_flags(MemslotFlags::GUEST_MEMFD | MemslotFlags::READONLY);

        assert_eq!(slot.flags(), MemslotFlags::READONLY);
    }
}
