//! A memslot, the ranges it maps, and what a change did.

use core::fmt;

use memvisor_types::{Address, Gfn, Gpa, Hva, PageSize};

use crate::request::{GUEST_MEMFD, LOG_DIRTY_PAGES, READONLY};

const PAGE_SHIFT: u32 = PageSize::Size4K.shift();

/// A half-open range of guest frame numbers `start..end`.
///
/// [`memvisor_types::AddrRange`] holds addresses; memslots, attributes and
/// invalidations speak in frames (as KVM's `struct kvm_gfn_range` does), so
/// this is its frame-number counterpart. Invariant: `start <= end`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GfnRange {
    start: Gfn,
    end: Gfn,
}

impl GfnRange {
    /// `start..end`, or `None` if `end < start`.
    pub fn new(start: Gfn, end: Gfn) -> Option<Self> {
        (start <= end).then_some(Self { start, end })
    }

    /// `start..start + len`, or `None` if the end does not fit in 64 bits.
    pub fn from_len(start: Gfn, len: u64) -> Option<Self> {
        let end = start.checked_add(len)?;
        Some(Self { start, end })
    }

    /// First frame.
    pub fn start(&self) -> Gfn {
        self.start
    }

    /// First frame after the range.
    pub fn end(&self) -> Gfn {
        self.end
    }

    /// Number of frames.
    pub fn len(&self) -> u64 {
        self.end.as_u64() - self.start.as_u64()
    }

    /// Whether the range holds no frame.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether `gfn` lies in the range.
    pub fn contains(&self, gfn: Gfn) -> bool {
        self.start <= gfn && gfn < self.end
    }

    /// The frames common to both, or `None` if they share none.
    pub fn intersection(&self, other: &Self) -> Option<Self> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(Self { start, end })
    }
}

impl fmt::Display for GfnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start.as_u64(), self.end.as_u64())
    }
}

impl fmt::Debug for GfnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Identity of a guest_memfd file (the caller's choice: an inode number, a
/// counter); two descriptors of the same file resolve to the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u64);

/// Identity of a VM, to tell a VM's own guest_memfd files from another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct VmId(pub u64);

/// Where a slot's private half lives: file pages `pgoff..pgoff + npages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GmemBinding {
    /// The guest_memfd file.
    pub file: FileId,
    /// File page (offset / 4096) backing the slot's first gfn.
    pub pgoff: u64,
    /// False once the file was released: private accesses then fail.
    pub open: bool,
}

/// `(address space, slot id)`: a slot's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// Address-space id.
    pub as_id: u16,
    /// Slot id.
    pub id: u16,
}

impl fmt::Display for SlotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.as_id, self.id)
    }
}

/// One memslot: guest frames `base_gfn..base_gfn + npages` backed by host
/// memory at `userspace_addr` (and, for GUEST_MEMFD slots, by file pages).
///
/// Immutable once published; a change publishes a new `Memslot`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Memslot {
    pub(crate) key: SlotKey,
    pub(crate) base_gfn: Gfn,
    pub(crate) npages: u64,
    pub(crate) flags: u32,
    pub(crate) userspace_addr: Hva,
    pub(crate) gmem: Option<GmemBinding>,
    pub(crate) invalid: bool,
}

impl Memslot {
    /// Address space and slot id.
    pub fn key(&self) -> SlotKey {
        self.key
    }

    /// Slot id within its address space.
    pub fn id(&self) -> u16 {
        self.key.id
    }

    /// Address-space id.
    pub fn as_id(&self) -> u16 {
        self.key.as_id
    }

    /// First guest frame.
    pub fn base_gfn(&self) -> Gfn {
        self.base_gfn
    }

    /// Number of 4 KiB pages.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// `KVM_MEM_*` flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Host-virtual address of the first page.
    pub fn userspace_addr(&self) -> Hva {
        self.userspace_addr
    }

    /// The guest_memfd binding, for GUEST_MEMFD slots.
    pub fn gmem(&self) -> Option<&GmemBinding> {
        self.gmem.as_ref()
    }

    /// Whether guest writes exit as MMIO.
    pub fn is_readonly(&self) -> bool {
        self.flags & READONLY != 0
    }

    /// Whether writes are logged.
    pub fn logs_dirty_pages(&self) -> bool {
        self.flags & LOG_DIRTY_PAGES != 0
    }

    /// Whether the slot has a private half in a guest_memfd.
    pub fn has_guest_memfd(&self) -> bool {
        self.flags & GUEST_MEMFD != 0
    }

    /// Whether this is the invalid copy published while the slot is being
    /// deleted or moved: faults on it must retry.
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }

    /// The guest frames the slot maps.
    pub fn gfns(&self) -> GfnRange {
        // `base_gfn + npages` was checked when the slot was created.
        GfnRange { start: self.base_gfn, end: Gfn::new(self.base_gfn.as_u64() + self.npages) }
    }

    /// The host-virtual range backing the slot, `start..end`.
    pub fn hva_range(&self) -> (Hva, Hva) {
        // `userspace_addr + size` was checked against the user address space.
        let end = self.userspace_addr.raw() + (self.npages << PAGE_SHIFT);
        (self.userspace_addr, Hva::new(end))
    }

    /// The host-virtual address of `gfn`'s first byte, if the slot maps it.
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Option<Hva> {
        let index = gfn.as_u64().checked_sub(self.base_gfn.as_u64())?;
        (index < self.npages).then(|| Hva::new(self.userspace_addr.raw() + (index << PAGE_SHIFT)))
    }

    /// The host-virtual address of `gpa`, if the slot maps it.
    pub fn gpa_to_hva(&self, gpa: Gpa) -> Option<Hva> {
        let page = self.gfn_to_hva(gpa.gfn())?;
        Some(Hva::new(page.raw() | gpa.page_offset(PageSize::Size4K)))
    }

    /// The guest frame `hva` lies in, if the slot maps it.
    pub fn hva_to_gfn(&self, hva: Hva) -> Option<Gfn> {
        let offset = hva.raw().checked_sub(self.userspace_addr.raw())?;
        let index = offset >> PAGE_SHIFT;
        (index < self.npages).then(|| Gfn::new(self.base_gfn.as_u64() + index))
    }

    /// The guest_memfd file and byte offset backing `gfn`'s private half.
    pub fn gfn_to_gmem(&self, gfn: Gfn) -> Option<(FileId, u64)> {
        let binding = self.gmem.filter(|b| b.open)?;
        let index = gfn.as_u64().checked_sub(self.base_gfn.as_u64())?;
        if index >= self.npages {
            return None;
        }
        let page = binding.pgoff.checked_add(index)?;
        Some((binding.file, page.checked_mul(PageSize::Size4K.bytes())?))
    }

    /// The file pages `pgoff..pgoff + npages` bound to the slot.
    pub(crate) fn gmem_pages(&self) -> Option<(FileId, u64, u64)> {
        let b = self.gmem?;
        Some((b.file, b.pgoff, b.pgoff.saturating_add(self.npages)))
    }
}

/// KVM's classification of a memslot request (`enum kvm_mr_change`), plus
/// the no-op of an identical modification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A new slot.
    Create,
    /// The slot is gone.
    Delete,
    /// Same slot at a new guest-physical address.
    Move,
    /// Only LOG_DIRTY_PAGES changed.
    FlagsOnly,
    /// Identical to the existing slot: nothing changed.
    None,
}

/// What an accepted request did: its kind and the slot before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The classification.
    pub kind: ChangeKind,
    /// The slot before (none for a create).
    pub old: Option<Memslot>,
    /// The slot after (none for a delete).
    pub new: Option<Memslot>,
}

/// Part of one slot: what an MMU notifier or an invalidation must zap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotGfnRange {
    /// The slot.
    pub slot: SlotKey,
    /// The slot's frames concerned.
    pub gfns: GfnRange,
    /// Whether the slot is the invalid copy of a slot being deleted or moved.
    pub invalid: bool,
}
