//! The invariant checker: every restricted space is a subset of the full
//! space with identical leaves, and no frame a restricted space reaches holds
//! data its owner may not see.

use alloc::vec::Vec;
use core::fmt;

use memvisor_paging::Format;
use memvisor_types::{Address, Hpa, Hva, PageSize};

use crate::space::{AD_BITS, Leaf, leaf_span};
use crate::{Asi, InstanceId, OwnerId, Sensitivity};

/// One broken invariant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A restricted space maps an address the full space does not map.
    MissingInFull {
        /// The restricted space.
        instance: InstanceId,
        /// The leaf's first address.
        va: Hva,
        /// The restricted leaf.
        entry: u64,
    },
    /// A restricted leaf differs from the full space's leaf for the same
    /// address (output, attributes or page size; accessed/dirty flags are
    /// hardware state and ignored).
    DiffersFromFull {
        /// The restricted space.
        instance: InstanceId,
        /// The leaf's first address.
        va: Hva,
        /// The restricted leaf.
        restricted: u64,
        /// Its page size.
        restricted_size: PageSize,
        /// The full space's leaf.
        full: u64,
        /// Its page size.
        full_size: PageSize,
    },
    /// A restricted space reaches a frame whose data its owner may not see:
    /// sensitive data, another owner's local data, a free frame, or memory
    /// nobody classified (page tables, for one).
    SensitiveReachable {
        /// The restricted space.
        instance: InstanceId,
        /// The address that maps the frame.
        va: Hva,
        /// The frame.
        pa: Hpa,
        /// What the frame holds (sensitive when free or unclassified).
        sensitivity: Sensitivity,
        /// Whether the frame is free.
        free: bool,
    },
    /// A table entry has reserved bits set or points outside the table arena.
    MalformedEntry {
        /// The restricted space.
        instance: InstanceId,
        /// First address the entry covers.
        va: Hva,
        /// Its level.
        level: u8,
        /// The entry.
        entry: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Violation::MissingInFull { instance, va, entry } => {
                write!(f, "{instance}: {va:#x} is mapped ({entry:#x}) but the full space does not map it")
            }
            Violation::DiffersFromFull { instance, va, restricted, restricted_size, full, full_size } => {
                write!(
                    f,
                    "{instance}: {va:#x} maps {restricted:#x} ({restricted_size}) but the full space maps {full:#x} ({full_size})"
                )
            }
            Violation::SensitiveReachable { instance, va, pa, sensitivity, free } => {
                let what = if free { "a free frame" } else { "a frame" };
                write!(f, "{instance}: {va:#x} reaches {what} {pa:#x} holding {sensitivity} data")
            }
            Violation::MalformedEntry { instance, va, level, entry } => {
                write!(f, "{instance}: malformed level-{level} entry {entry:#x} covering {va:#x}")
            }
        }
    }
}

/// What [`Asi::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Broken invariants (empty when all hold).
    pub violations: Vec<Violation>,
    /// Restricted leaves examined.
    pub leaves_checked: u64,
    /// Non-sensitive pages a restricted space may map but does not. Not a
    /// violation — a missing mapping costs a fault-driven exit, not
    /// correctness — but the allocator always maps them, so a non-empty list
    /// means its bookkeeping is off.
    pub missing: Vec<(InstanceId, Hva)>,
}

impl CheckReport {
    /// Whether every invariant holds.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl Asi {
    /// Checks every restricted space against the full space and the
    /// sensitivity of the frames it reaches. Cost: proportional to the tables
    /// of the restricted spaces (each leaf is also looked up in the full space).
    pub fn check(&self) -> CheckReport {
        let mut report = CheckReport::default();
        for (&id, instance) in &self.instances {
            let (leaves, bad) = self.tables.leaves(instance.root);
            for b in bad {
                report.violations.push(Violation::MalformedEntry {
                    instance: id,
                    va: b.va,
                    level: b.level,
                    entry: b.entry,
                });
            }
            for leaf in leaves {
                report.leaves_checked += 1;
                self.check_leaf(id, instance.owner, leaf, &mut report.violations);
            }
            for run in self.allocator.runs(|s| s.visible_to(instance.owner)) {
                for index in run.first..run.first + run.count {
                    let pa = self.allocator.frame_pa(index);
                    let Ok(va) = crate::space::direct_map_va(pa) else { continue };
                    if self.tables.lookup(instance.root, va).is_err() {
                        report.missing.push((id, va));
                    }
                }
            }
        }
        report
    }

    fn check_leaf(&self, id: InstanceId, owner: OwnerId, leaf: Leaf, out: &mut Vec<Violation>) {
        match self.tables.lookup(self.full_root, leaf.va) {
            Err(_) => out.push(Violation::MissingInFull { instance: id, va: leaf.va, entry: leaf.entry }),
            Ok(full) if full.size != leaf.size || full.leaf & !AD_BITS != leaf.entry & !AD_BITS => {
                out.push(Violation::DiffersFromFull {
                    instance: id,
                    va: leaf.va,
                    restricted: leaf.entry,
                    restricted_size: leaf.size,
                    full: full.leaf,
                    full_size: full.size,
                });
            }
            Ok(_) => {}
        }
        let span = leaf_span(leaf.size);
        let base = self.tables.format.address(leaf.entry) & !(span - 1);
        if let Some((pa, sensitivity, free)) = self.first_forbidden_frame(base, span, owner) {
            let va = Hva::new(leaf.va.raw() + (pa.raw() - base));
            out.push(Violation::SensitiveReachable { instance: id, va, pa, sensitivity, free });
        }
    }

    /// The first frame of `base..base + span` that `owner` may not see.
    fn first_forbidden_frame(
        &self,
        base: u64,
        span: u64,
        owner: OwnerId,
    ) -> Option<(Hpa, Sensitivity, bool)> {
        let end = base.saturating_add(span);
        let mut pa = base;
        while pa < end {
            let frame = Hpa::new(pa);
            if self.allocator.contains(frame) {
                match self.allocator.sensitivity_of(frame) {
                    None => return Some((frame, Sensitivity::Sensitive, true)),
                    Some(s) if !s.visible_to(owner) => return Some((frame, s, false)),
                    Some(_) => pa += 4096,
                }
                continue;
            }
            let region = self.statics.iter().filter_map(|s| s.pa_range().map(|r| (r, s.sensitivity)));
            match region.into_iter().find(|(r, _)| r.contains(frame)) {
                Some((_, s)) if !s.visible_to(owner) => return Some((frame, s, false)),
                Some((r, _)) => pa = r.end().raw(),
                None => return Some((frame, Sensitivity::Sensitive, false)),
            }
        }
        None
    }
}
