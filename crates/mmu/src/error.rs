//! The crate's error type.

use memvisor_memslots::SlotKey;

/// Errors of the MMU's VMM-facing operations. Guest accesses never produce
/// one: they end in a [`FaultOutcome`](crate::FaultOutcome) (a mapping or
/// an exit record).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The memslot request was rejected (KVM's rule and errno inside).
    #[error("memslot update rejected")]
    Memslots(#[from] memvisor_memslots::Error),
    /// The stage-2 table could not be edited.
    #[error("stage-2 table edit failed")]
    Table(#[from] memvisor_paging::Error),
    /// The stage-2 table memory could not be accessed.
    #[error("stage-2 table memory")]
    Memory(#[from] memvisor_paging::MemoryError),
    /// A range is misaligned or overflows.
    #[error("invalid range")]
    Range(#[from] memvisor_types::RangeError),
    /// The address-space id is not below the memslots' address-space count.
    #[error("address space {0} does not exist")]
    AddressSpace(u16),
    /// No slot has this key.
    #[error("slot {0} does not exist")]
    NoSlot(SlotKey),
    /// The slot does not log dirty pages (KVM: ENOENT).
    #[error("slot {0} does not log dirty pages")]
    NotLogging(SlotKey),
    /// A dirty-log clear range is not 64-page aligned or leaves the slot (KVM: EINVAL).
    #[error("dirty-log clear of {len} pages from page {first} is outside slot {slot} or unaligned")]
    ClearRange {
        /// The slot.
        slot: SlotKey,
        /// First page (slot-relative).
        first: u64,
        /// Number of pages.
        len: u64,
    },
}
