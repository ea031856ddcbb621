//! The limits KVM validates memslots against, with the values of the x86-64
//! kernel memvisor runs on.

use memvisor_types::Gfn;

/// What a VM accepts. [`Limits::default`] is x86-64 Linux 6.18 with one
/// address space (no SMM) and shadow paging (so the MMU's reach is 52 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `KVM_USER_MEM_SLOTS`: slot ids `0..user_slots` are accepted (32764).
    pub user_slots: u16,
    /// `kvm_arch_nr_memslot_as_ids()`: 1, or 2 with SMM.
    pub address_spaces: u16,
    /// `KVM_MEM_MAX_NR_PAGES`: the largest slot, in pages (2^31 − 1).
    pub max_pages_per_slot: u64,
    /// The largest total page count of all slots (KVM: the total must fit in
    /// an `unsigned long`, so `u64::MAX`). Lower it to exercise rule 12.
    pub max_total_pages: u64,
    /// `kvm_mmu_max_gfn()`: the last gfn a slot may contain (2^40 − 1 with
    /// 52-bit guest-physical addresses, which shadow paging always uses).
    pub max_gfn: Gfn,
    /// `USER_PTR_MAX`: `userspace_addr + memory_size` must not exceed it
    /// (`access_ok`); `TASK_SIZE_MAX` = 2^47 − 4096 with 4-level paging.
    pub user_addr_max: u64,
    /// `kvm_arch_has_readonly_mem()`: whether `KVM_MEM_READONLY` is accepted.
    pub readonly: bool,
    /// Whether `KVM_MEM_GUEST_MEMFD` is accepted (guest_memfd support).
    pub guest_memfd: bool,
}

impl Limits {
    /// x86-64 Linux 6.18 defaults (see the type's documentation).
    pub const X86_64: Limits = Limits {
        user_slots: 32764,
        address_spaces: 1,
        max_pages_per_slot: (1 << 31) - 1,
        max_total_pages: u64::MAX,
        max_gfn: Gfn::new((1 << 40) - 1),
        user_addr_max: (1 << 47) - 4096,
        readonly: true,
        guest_memfd: true,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::X86_64
    }
}
