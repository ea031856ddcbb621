//! Shared/private memory attributes, kept in software (the kernel here has
//! no `KVM_CAP_MEMORY_ATTRIBUTES`), and the access check that turns a
//! mismatch into a `KVM_EXIT_MEMORY_FAULT`-style record for the VMM.
//!
//! Storage is by runs, not by page: a `BTreeMap` of disjoint, non-adjacent
//! private runs `start → end` (everything else is shared, the default), so
//! the cost of an update is proportional to the runs it touches.
//!
//! Which mappings to zap after a change: every part of the changed gfns
//! that any memslot maps — including slots without a guest_memfd. This is
//! what x86 KVM does (`kvm_arch_pre_set_memory_attributes` zaps regardless
//! of the slot), and it is required: when a gfn of an ordinary slot becomes
//! private, its existing shared mapping must go, or the guest would keep
//! shared access to memory it has just declared private; its next access
//! then exits with a memory fault. Gfns no slot maps have no mapping, so
//! nothing is reported for them, and unchanged gfns are never reported.

use std::collections::BTreeMap;

use memvisor_types::{Address, Gfn, Gpa, Hva, PageSize};

use crate::generation::{Generation, Lookup};
use crate::slot::{FileId, GfnRange, SlotGfnRange};

/// The attribute of a guest frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Attribute {
    /// Backed by the slot's userspace memory (the default).
    #[default]
    Shared,
    /// Backed by the slot's guest_memfd.
    Private,
}

/// `KVM_EXIT_MEMORY_FAULT`: the access's kind does not match the attribute
/// (or a private access hit a slot without guest_memfd). The VMM converts
/// the page (or gives up) and re-enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryFault {
    /// Page-aligned guest-physical address.
    pub gpa: Gpa,
    /// Bytes concerned (one page).
    pub size: u64,
    /// Whether the access was private (`KVM_MEMORY_EXIT_FLAG_PRIVATE`).
    pub private: bool,
}

/// Where an access is served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backing {
    /// The slot's userspace memory at this host-virtual address.
    Shared(Hva),
    /// The slot's guest_memfd file at this byte offset.
    Private {
        /// The file.
        file: FileId,
        /// Byte offset of the accessed byte.
        offset: u64,
    },
}

/// Why an access has no backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessError {
    /// No slot maps the address: emulated MMIO.
    NoSlot,
    /// The slot is being deleted or moved: retry the access.
    Retry,
    /// Exit to the VMM with this record.
    MemoryFault(MemoryFault),
}

/// The attributes of one VM's guest frames.
///
/// ```
/// use memvisor_memslots::{Attribute, Attributes, GfnRange};
/// use memvisor_types::{Gfn, Gpa};
///
/// let mut attrs = Attributes::new();
/// let range = GfnRange::new(Gfn::new(0x10), Gfn::new(0x20)).unwrap();
/// assert_eq!(attrs.set(range, Attribute::Private), vec![range]);
/// // Only what changes is reported.
/// let wider = GfnRange::new(Gfn::new(0x8), Gfn::new(0x20)).unwrap();
/// assert_eq!(attrs.set(wider, Attribute::Private), vec![GfnRange::new(Gfn::new(0x8), Gfn::new(0x10)).unwrap()]);
/// // A shared access to a private page is a memory fault.
/// let fault = attrs.check_access(Gpa::new(0x10_123), false).unwrap_err();
/// assert_eq!((fault.gpa, fault.size, fault.private), (Gpa::new(0x10_000), 0x1000, false));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Private runs: start → end (exclusive); disjoint and never adjacent.
    private: BTreeMap<u64, u64>,
}

impl Attributes {
    /// Every frame shared.
    pub fn new() -> Self {
        Self::default()
    }

    /// The attribute of `gfn`.
    pub fn get(&self, gfn: Gfn) -> Attribute {
        let g = gfn.as_u64();
        match self.private.range(..=g).next_back() {
            Some((_, &end)) if g < end => Attribute::Private,
            _ => Attribute::Shared,
        }
    }

    /// The private runs, in order.
    pub fn private_runs(&self) -> impl Iterator<Item = GfnRange> + '_ {
        self.private.iter().filter_map(|(&s, &e)| GfnRange::new(Gfn::new(s), Gfn::new(e)))
    }

    /// Number of private runs (the storage cost).
    pub fn run_count(&self) -> usize {
        self.private.len()
    }

    /// Sets `range` to `attr`; returns the sub-ranges whose attribute
    /// changed, in order.
    pub fn set(&mut self, range: GfnRange, attr: Attribute) -> Vec<GfnRange> {
        let (start, end) = (range.start().as_u64(), range.end().as_u64());
        if start >= end {
            return Vec::new();
        }
        // Runs overlapping or adjacent to the range.
        let mut touching: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.private.range(..start).next_back()
            && e >= start
        {
            touching.push((s, e));
        }
        touching.extend(self.private.range(start..=end).map(|(&s, &e)| (s, e)));
        let overlapping = touching.iter().filter(|&&(s, e)| s < end && e > start);
        let mut changed = Vec::new();
        match attr {
            Attribute::Private => {
                // The gaps between private runs inside the range become private.
                let mut cursor = start;
                for &(s, e) in overlapping {
                    push_range(&mut changed, cursor, s.min(end));
                    cursor = cursor.max(e);
                }
                push_range(&mut changed, cursor, end);
                let lo = touching.first().map_or(start, |&(s, _)| s.min(start));
                let hi = touching.last().map_or(end, |&(_, e)| e.max(end));
                for &(s, _) in &touching {
                    self.private.remove(&s);
                }
                self.private.insert(lo, hi);
            }
            Attribute::Shared => {
                let overlapping: Vec<(u64, u64)> = overlapping.copied().collect();
                for (s, e) in overlapping {
                    push_range(&mut changed, s.max(start), e.min(end));
                    self.private.remove(&s);
                    if s < start {
                        self.private.insert(s, start);
                    }
                    if e > end {
                        self.private.insert(end, e);
                    }
                }
            }
        }
        changed
    }

    /// Sets `range` to `attr` and returns what must be zapped: the changed
    /// frames that memslots of `slots` map (in every address space; see the
    /// module documentation for why slots without guest_memfd count).
    pub fn set_and_zap(&mut self, range: GfnRange, attr: Attribute, slots: &Generation) -> Vec<SlotGfnRange> {
        self.set(range, attr).into_iter().flat_map(|changed| slots.gfn_range_slots(changed)).collect()
    }

    /// Checks an access of kind `private` to `gpa` against the attribute.
    pub fn check_access(&self, gpa: Gpa, private: bool) -> Result<(), MemoryFault> {
        let is_private = self.get(gpa.gfn()) == Attribute::Private;
        if is_private == private { Ok(()) } else { Err(fault(gpa, private)) }
    }

    /// Resolves an access of kind `private` to `gpa` in address space
    /// `as_id`, as KVM's fault path does: an invalid slot retries, no slot is
    /// MMIO, a kind that does not match the attribute is a memory fault, and
    /// so is a private access to a slot without an open guest_memfd.
    pub fn resolve(
        &self,
        slots: &Generation,
        as_id: u16,
        gpa: Gpa,
        private: bool,
    ) -> Result<Backing, AccessError> {
        let gfn = gpa.gfn();
        let slot = match slots.lookup(as_id, gfn) {
            Lookup::Slot(s) => s,
            Lookup::Invalid(_) => return Err(AccessError::Retry),
            Lookup::None => return Err(AccessError::NoSlot),
        };
        self.check_access(gpa, private).map_err(AccessError::MemoryFault)?;
        let in_page = gpa.page_offset(PageSize::Size4K);
        if private {
            let (file, offset) = slot.gfn_to_gmem(gfn).ok_or(AccessError::MemoryFault(fault(gpa, true)))?;
            Ok(Backing::Private { file, offset: offset + in_page })
        } else {
            slot.gpa_to_hva(gpa).map(Backing::Shared).ok_or(AccessError::NoSlot)
        }
    }
}

fn fault(gpa: Gpa, private: bool) -> MemoryFault {
    MemoryFault { gpa: gpa.align_down(PageSize::Size4K), size: PageSize::Size4K.bytes(), private }
}

fn push_range(out: &mut Vec<GfnRange>, start: u64, end: u64) {
    if start < end
        && let Some(r) = GfnRange::new(Gfn::new(start), Gfn::new(end))
    {
        out.push(r);
    }
}
