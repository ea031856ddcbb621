//! Host binding of guest PASID entries (seed 000, QEMU `intel_iommu`
//! "Bind/unbind guest page table to host"): for devices whose DMA really
//! happens on a host IOMMU (memvisor-ioas, iommufd semantics), the guest's
//! scalable-mode PASID entries become host HWPTs instead of being emulated.
//!
//! | guest PASID entry | host side |
//! |---|---|
//! | PGTT = pass-through (4) | the device is attached to the stage-2 **nest parent** (GPA → host) |
//! | PGTT = first-stage (1), FSPTPTR ≠ 0 | a **nested** HWPT `VTD_S1 {flags, addr_width = 48 + 9·FSPM, pgtbl_addr = FSPTPTR}` on the parent |
//! | not present (any level) | UNBIND: detached (DMA blocked), the nested HWPT destroyed |
//! | second-stage (2), nested (3), invalid PGTT, FSPTPTR = 0, FSPM reserved | warned in the VMM log, binding torn down, **nothing reported to the guest** |
//!
//! The decisions are QEMU's `vtd_pasid_cache_sync` ones: a (device, PASID)
//! not bound yet is BOUND when its entry is present and valid; a bound one
//! is UPDATEd only when the entry changed (a new nested HWPT is allocated,
//! the device is *replaced* onto it, then the previous nested HWPT is
//! destroyed, so DMA never sees a detached window); an UPDATE that the host
//! refuses tears the binding down (UNBIND), as QEMU does "to catch invalid
//! pasid entry config during DMA translation". BIND/UPDATE/UNBIND failures
//! are the VMM's problem (a `tracing::warn!`), never a guest-visible fault:
//! the PASID-cache invalidation completes normally.
//!
//! # Which (device, PASID) pairs an invalidation looks at
//!
//! QEMU walks every PASID table of every device for a domain-selective or
//! global PASID-cache invalidation. A PASID table has up to 2^20 entries per
//! device, and [`GuestTables`] reads one entry at a time, so this binding
//! looks at a bounded set instead (a documented choice):
//!
//! - requests *without* PASID: the device's **RID_PASID** entry (re-read on
//!   every invalidation, so a changed RID_PASID is followed), bound at the
//!   host's no-PASID slot ([`HOST_NO_PASID`], Linux `IOMMU_NO_PASID`);
//! - **PASIDs already bound** for the device;
//! - for a PASID-selective invalidation, additionally that PASID of every
//!   host-backed device — this is how a non-RID PASID gets bound (beyond
//!   the seed, which refuses non-RID_PASID bindings), at the same host PASID.
//!
//! Domain-selective and PASID-selective scopes act on a pair when the entry
//! it was bound with, or the entry now in memory, carries the invalidated
//! domain id (the guest invalidates with the old DID when it changes one).
//!
//! # Other events
//!
//! - PASID-based IOTLB invalidation ([`PiotlbInval`]) of a PASID bound to a
//!   nested HWPT (same DID) is forwarded with `hwpt_invalidate`: the whole
//!   HWPT, or `2^am` pages at `addr` (QEMU's `IOMMU_HWPT_INVALIDATE`).
//! - A context-cache invalidation covering a host-backed device (global,
//!   domain — treated as global since the context entry's domain is not
//!   tracked — or device-selective under the function mask) replays that
//!   device: every pair is re-read and re-decided.
//! - [`StateChange::RootTable`] (SRTP) and [`StateChange::TranslationEnable`]
//!   replay every device. With translation **disabled** DMA is untranslated
//!   (GPA = DMA address), so every PASID binding is removed and requests
//!   without PASID are (re)attached to the parent — QEMU's
//!   `vtd_device_reattach_def_hwpt`. With translation enabled but a *legacy*
//!   (non-scalable) root table, host-backed devices are detached (DMA
//!   blocked, fail-closed): shadowing a legacy second-stage table into the
//!   IOAS (QEMU's IOMMU-notifier path) is a VMM's job, not done here.
//!
//! # What the VMM must configure
//!
//! - **Caching mode** ([`crate::Config::caching_mode`]): without CAP.CM a
//!   Linux guest does not invalidate the PASID cache after making an entry
//!   present, so a new entry would never be bound (QEMU requires
//!   `caching-mode=on` for assigned devices for the same reason).
//! - Register the binding as the unit's observer
//!   ([`crate::device::Vtd::set_observer`]); to keep adding devices or
//!   reading [`HostBinding::binding`] afterwards, register an
//!   `Arc<Mutex<HostBinding>>` (it implements [`Observer`]) and keep a
//!   clone. A device added while the guest runs is bound at the guest's next
//!   context-cache or PASID-cache invalidation covering it (which a guest
//!   in caching mode issues when it sets the device's context entry up).
//!
//! The tracing events are named like QEMU's trace points:
//! `vtd_device_attach_hwpt`, `vtd_device_detach_hwpt`,
//! `vtd_device_reattach_def_hwpt`, with fields `sid`, `pasid`, `hwpt`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use memvisor_ioas::{HwptKind, Id, Iommufd, IovaRange, VTD_S1_EAFE, VTD_S1_SRE, VTD_S1_WPE, VtdS1};

use crate::tables::{PasidEntry, Pgtt};
use crate::{
    ContextInval, GuestTables, Invalidation, Observer, PasidCacheInval, PiotlbInval, SourceId, StateChange,
};

/// The host PASID used for requests without PASID (Linux `IOMMU_NO_PASID`):
/// the guest's RID_PASID entry is bound there.
pub const HOST_NO_PASID: u32 = 0;

/// Which guest translation a host binding slot carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Slot {
    /// Requests without PASID (RID_PASID entry, or untranslated when TE is off).
    Rid,
    /// Requests with this PASID.
    Pasid(u32),
}

impl Slot {
    fn from_pasid(pasid: Option<u32>) -> Self {
        pasid.map_or(Slot::Rid, Slot::Pasid)
    }
    fn host_pasid(self) -> u32 {
        match self {
            Slot::Rid => HOST_NO_PASID,
            Slot::Pasid(p) => p,
        }
    }
}

/// What a bound slot is attached to on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundTo {
    /// The stage-2 nest parent because the guest's PASID entry is
    /// pass-through.
    PassThrough,
    /// The stage-2 nest parent because guest translation is disabled
    /// (GCMD.TE = 0): DMA is untranslated.
    Untranslated,
    /// A nested HWPT whose stage-1 is the guest's first-stage table.
    Nested(VtdS1),
}

/// One host binding, as [`HostBinding::binding`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingInfo {
    /// The host (memvisor-ioas) device.
    pub dev: Id,
    /// The host PASID the device is attached at ([`HOST_NO_PASID`] for
    /// requests without PASID).
    pub host_pasid: u32,
    /// The guest PASID-table entry index behind the binding (RID_PASID for
    /// requests without PASID), `None` when translation is disabled.
    pub guest_pasid: Option<u32>,
    /// The HWPT the device is attached to (the parent, or a nested HWPT this
    /// binding owns).
    pub hwpt: Id,
    /// What the HWPT is.
    pub bound_to: BoundTo,
    /// The guest PASID entry the binding was made from.
    pub entry: Option<PasidEntry>,
}

/// Counters of what the binding did (for the VMM's statistics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindStats {
    /// BIND: a guest PASID entry got bound where none was (from nothing or
    /// from the untranslated state), or the parent got attached to a slot
    /// that was detached (translation disabled).
    pub binds: u64,
    /// UPDATE: a bound slot moved to a new HWPT because its entry changed.
    pub updates: u64,
    /// UNBIND: a slot bound from a guest PASID entry was detached, or moved
    /// back to the parent because translation was disabled.
    pub unbinds: u64,
    /// Entries refused as invalid for a host-backed device (warned, torn down).
    pub invalid: u64,
    /// Host operations that failed (warned; an UPDATE failure also unbinds).
    pub host_errors: u64,
    /// PASID-based IOTLB invalidations forwarded to a nested HWPT.
    pub forwarded_invalidations: u64,
}

#[derive(Debug, Clone, Copy)]
struct Binding {
    guest_pasid: Option<u32>,
    hwpt: Id,
    bound_to: BoundTo,
    entry: Option<PasidEntry>,
}

impl Binding {
    fn nested_hwpt(&self) -> Option<Id> {
        matches!(self.bound_to, BoundTo::Nested(_)).then_some(self.hwpt)
    }
    fn did(&self) -> Option<u16> {
        self.entry.map(|e| e.did)
    }
}

/// What a slot should be attached to, decided from the guest's tables.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Detached.
    Nothing,
    /// Detached because the guest's entry is unusable for a host-backed device.
    Invalid(&'static str),
    /// Detached (DMA blocked) because the tables are in legacy mode.
    Blocked,
    /// The parent, untranslated (TE off).
    Untranslated,
    /// Bound from this entry (PGTT pass-through or first-stage, checked).
    Entry { guest_pasid: u32, entry: PasidEntry },
}

/// Binds the guest PASID entries of host-backed devices to host HWPTs on a
/// memvisor-ioas [`Iommufd`] (seed 000). Register it as the VT-d unit's
/// [`Observer`]; see the [module documentation](self) for the decisions.
///
/// ```
/// use std::sync::Arc;
/// use memvisor_ioas::{HwptKind, Iommufd};
/// use memvisor_vtd::SourceId;
/// use memvisor_vtd::bind::HostBinding;
///
/// let ictx = Arc::new(Iommufd::new());
/// let ioas = ictx.ioas_alloc();
/// let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true })?;
/// let mut binding = HostBinding::new(ictx.clone(), parent);
/// let dev = ictx.device_add();
/// // Out of reset (translation disabled) the device DMAs untranslated through the parent.
/// binding.add_device(SourceId::new(0, 3, 0), dev)?;
/// assert_eq!(binding.binding(SourceId::new(0, 3, 0), None).map(|b| b.hwpt), Some(parent));
/// # Ok::<(), memvisor_vtd::Error>(())
/// ```
#[derive(Debug)]
pub struct HostBinding {
    iommufd: Arc<Iommufd>,
    parent: Id,
    devices: BTreeMap<SourceId, Id>,
    bindings: BTreeMap<(SourceId, Slot), Binding>,
    stats: BindStats,
}

impl HostBinding {
    /// A binding whose host side is `iommufd`, with `parent` the stage-2
    /// nest-parent HWPT (a `HwptKind::Paging { nest_parent: true }` over the
    /// IOAS that maps guest RAM at IOVA = GPA).
    pub fn new(iommufd: Arc<Iommufd>, parent: Id) -> Self {
        Self {
            iommufd,
            parent,
            devices: BTreeMap::new(),
            bindings: BTreeMap::new(),
            stats: BindStats::default(),
        }
    }

    /// The nest-parent HWPT.
    pub fn parent(&self) -> Id {
        self.parent
    }

    /// Makes `sid` a host-backed device whose host device is `dev`, in the
    /// reset state (translation disabled): `dev` is attached to the parent
    /// at [`HOST_NO_PASID`] (replacing whatever the VMM attached there).
    /// Call [`HostBinding::replay_all`] afterwards if the guest already
    /// enabled translation (hot-plug). Replaces an earlier device of `sid`.
    pub fn add_device(&mut self, sid: SourceId, dev: Id) -> crate::Result<()> {
        if self.devices.contains_key(&sid) {
            self.remove_device(sid);
        }
        let hwpt = match self.iommufd.device_attach(dev, HOST_NO_PASID, self.parent) {
            Ok(h) => h,
            Err(memvisor_ioas::Error::Busy(_)) => {
                self.iommufd.device_replace(dev, HOST_NO_PASID, self.parent)?
            }
            Err(e) => return Err(e.into()),
        };
        tracing::debug!(
            name: "vtd_device_reattach_def_hwpt",
            sid = sid.0, pasid = HOST_NO_PASID, hwpt, dev, "attached to the default (parent) HWPT"
        );
        self.devices.insert(sid, dev);
        self.bindings.insert(
            (sid, Slot::Rid),
            Binding { guest_pasid: None, hwpt, bound_to: BoundTo::Untranslated, entry: None },
        );
        Ok(())
    }

    /// Stops binding `sid`: every binding is detached and its nested HWPT
    /// destroyed. Returns the host device, if `sid` was host-backed.
    pub fn remove_device(&mut self, sid: SourceId) -> Option<Id> {
        let slots: Vec<Slot> = self
            .bindings
            .range((sid, Slot::Rid)..)
            .take_while(|((s, _), _)| *s == sid)
            .map(|((_, slot), _)| *slot)
            .collect();
        for slot in slots {
            self.unbind(sid, slot);
        }
        self.devices.remove(&sid)
    }

    /// The host device of `sid`, if host-backed.
    pub fn device(&self, sid: SourceId) -> Option<Id> {
        self.devices.get(&sid).copied()
    }

    /// The binding of `sid` for requests without PASID (`pasid = None`) or
    /// with `pasid`.
    pub fn binding(&self, sid: SourceId, pasid: Option<u32>) -> Option<BindingInfo> {
        let slot = Slot::from_pasid(pasid);
        let dev = *self.devices.get(&sid)?;
        self.bindings.get(&(sid, slot)).map(|b| BindingInfo {
            dev,
            host_pasid: slot.host_pasid(),
            guest_pasid: b.guest_pasid,
            hwpt: b.hwpt,
            bound_to: b.bound_to,
            entry: b.entry,
        })
    }

    /// The counters.
    pub fn stats(&self) -> BindStats {
        self.stats
    }

    /// Re-reads and re-decides every slot of every host-backed device (what
    /// SRTP and TE changes do; a VMM calls it after hot-plugging a device
    /// into a running guest).
    pub fn replay_all(&mut self, tables: &dyn GuestTables) {
        let sids: Vec<SourceId> = self.devices.keys().copied().collect();
        for sid in sids {
            self.replay_device(sid, tables);
        }
    }

    /// Re-reads and re-decides every slot of `sid` (context-cache
    /// invalidation).
    pub fn replay_device(&mut self, sid: SourceId, tables: &dyn GuestTables) {
        for slot in self.candidates(sid, None) {
            let want = self.want(sid, slot, tables);
            self.apply(sid, slot, want);
        }
    }

    /// The slots of `sid` an invalidation considers: requests without PASID,
    /// the bound PASIDs, and `extra`.
    fn candidates(&self, sid: SourceId, extra: Option<u32>) -> Vec<Slot> {
        let mut slots = vec![Slot::Rid];
        slots.extend(
            self.bindings
                .range((sid, Slot::Rid)..)
                .take_while(|((s, _), _)| *s == sid)
                .map(|((_, slot), _)| *slot)
                .filter(|slot| *slot != Slot::Rid),
        );
        if let Some(p) = extra
            && !slots.contains(&Slot::Pasid(p))
        {
            slots.push(Slot::Pasid(p));
        }
        slots
    }

    /// Decides what `slot` of `sid` should be attached to.
    fn want(&self, sid: SourceId, slot: Slot, tables: &dyn GuestTables) -> Want {
        let root = tables.root();
        if !root.enabled {
            return match slot {
                Slot::Rid => Want::Untranslated,
                Slot::Pasid(_) => Want::Nothing,
            };
        }
        if !root.scalable {
            return Want::Blocked;
        }
        let rid_pasid = match tables.rid_pasid(sid) {
            Ok(Some(p)) => p,
            Ok(None) => return Want::Nothing,
            Err(_) => return Want::Invalid("malformed context entry"),
        };
        let pasid = match slot {
            Slot::Rid => rid_pasid,
            // The RID_PASID entry is bound at the no-PASID slot only.
            Slot::Pasid(p) if p == rid_pasid => return Want::Nothing,
            Slot::Pasid(p) if p == HOST_NO_PASID => {
                return Want::Invalid(
                    "PASID 0 is not RID_PASID: the host reserves it for requests without PASID",
                );
            }
            Slot::Pasid(p) => p,
        };
        let entry = match tables.pasid_entry(sid, pasid) {
            Ok(Some(e)) => e,
            Ok(None) => return Want::Nothing,
            Err(_) => return Want::Invalid("malformed PASID entry (reserved bits or PGTT)"),
        };
        match entry.pgtt {
            Pgtt::PassThrough => Want::Entry { guest_pasid: pasid, entry },
            Pgtt::FirstStage if entry.fsptptr == 0 => Want::Invalid("first-stage table pointer is 0"),
            Pgtt::FirstStage if entry.fspm > 1 => Want::Invalid("reserved first-stage paging mode"),
            Pgtt::FirstStage => Want::Entry { guest_pasid: pasid, entry },
            Pgtt::SecondStage | Pgtt::Nested => Want::Invalid("invalid PGTT for a host-backed device"),
        }
    }

    /// Moves `slot` of `sid` to `want`: BIND, UPDATE, UNBIND or nothing.
    fn apply(&mut self, sid: SourceId, slot: Slot, want: Want) {
        let Some(&dev) = self.devices.get(&sid) else { return };
        let current = self.bindings.get(&(sid, slot)).copied();
        match want {
            Want::Nothing => {
                if current.is_some() {
                    self.unbind(sid, slot);
                }
            }
            Want::Invalid(why) => {
                self.stats.invalid += 1;
                tracing::warn!(sid = sid.0, pasid = slot.host_pasid(), dev, "PASID binding refused: {why}");
                if current.is_some() {
                    self.unbind(sid, slot);
                }
            }
            Want::Blocked => {
                if current.is_some() {
                    tracing::warn!(
                        sid = sid.0,
                        dev,
                        "legacy-mode tables: host-backed devices need scalable mode; DMA blocked"
                    );
                    self.unbind(sid, slot);
                }
            }
            Want::Untranslated => {
                if current.is_some_and(|b| b.bound_to == BoundTo::Untranslated) {
                    return;
                }
                let b = Binding {
                    guest_pasid: None,
                    hwpt: self.parent,
                    bound_to: BoundTo::Untranslated,
                    entry: None,
                };
                self.attach(sid, slot, dev, current, b, None);
            }
            Want::Entry { guest_pasid, entry } => {
                if current.is_some_and(|b| b.entry == Some(entry) && b.guest_pasid == Some(guest_pasid)) {
                    return;
                }
                let (hwpt, bound_to, new_nested) = match entry.pgtt {
                    Pgtt::FirstStage => {
                        let s1 = s1_data(&entry);
                        match self.iommufd.hwpt_alloc(self.parent, HwptKind::Nested(s1)) {
                            Ok(id) => (id, BoundTo::Nested(s1), Some(id)),
                            Err(e) => {
                                self.host_error(sid, slot, dev, "nested HWPT allocation", &e);
                                if current.is_some() {
                                    self.unbind(sid, slot);
                                }
                                return;
                            }
                        }
                    }
                    _ => (self.parent, BoundTo::PassThrough, None),
                };
                let b = Binding { guest_pasid: Some(guest_pasid), hwpt, bound_to, entry: Some(entry) };
                self.attach(sid, slot, dev, current, b, new_nested);
            }
        }
    }

    /// Attaches (or replaces) `slot` to `new.hwpt`; on success destroys the
    /// previous nested HWPT, on failure destroys `new_nested` and unbinds.
    fn attach(
        &mut self,
        sid: SourceId,
        slot: Slot,
        dev: Id,
        current: Option<Binding>,
        new: Binding,
        new_nested: Option<Id>,
    ) {
        let pasid = slot.host_pasid();
        let res = match current {
            Some(_) => self.iommufd.device_replace(dev, pasid, new.hwpt),
            None => self.iommufd.device_attach(dev, pasid, new.hwpt),
        };
        let ok = res.is_ok();
        if new.bound_to == BoundTo::Untranslated {
            tracing::debug!(name: "vtd_device_reattach_def_hwpt", sid = sid.0, pasid, hwpt = new.hwpt, dev, ok, "re-attach default HWPT");
        } else {
            tracing::debug!(name: "vtd_device_attach_hwpt", sid = sid.0, pasid, hwpt = new.hwpt, dev, ok, "attach HWPT");
        }
        match res {
            Ok(_) => {
                if let Some(old) = current.and_then(|b| b.nested_hwpt())
                    && old != new.hwpt
                {
                    self.destroy(sid, slot, dev, old);
                }
                // Leaving or reaching the untranslated reset state is a BIND
                // or UNBIND of the guest entry, not an UPDATE.
                match (current.map(|b| b.bound_to), new.bound_to) {
                    (Some(BoundTo::Untranslated), BoundTo::Untranslated) => {}
                    (Some(_), BoundTo::Untranslated) => self.stats.unbinds += 1,
                    (None | Some(BoundTo::Untranslated), _) => self.stats.binds += 1,
                    (Some(_), _) => self.stats.updates += 1,
                }
                self.bindings.insert((sid, slot), new);
            }
            Err(e) => {
                self.host_error(sid, slot, dev, if current.is_some() { "replace" } else { "attach" }, &e);
                if let Some(id) = new_nested {
                    self.destroy(sid, slot, dev, id);
                }
                if current.is_some() {
                    // QEMU: a failed UPDATE tears the binding down.
                    self.unbind(sid, slot);
                }
            }
        }
    }

    /// UNBIND: detaches `slot` and destroys its nested HWPT. A failed detach
    /// is warned and the binding forgotten anyway (the device cannot be
    /// attached there any more as far as the host is concerned).
    fn unbind(&mut self, sid: SourceId, slot: Slot) {
        let Some(b) = self.bindings.remove(&(sid, slot)) else { return };
        let Some(&dev) = self.devices.get(&sid) else { return };
        let pasid = slot.host_pasid();
        let res = self.iommufd.device_detach(dev, pasid);
        tracing::debug!(name: "vtd_device_detach_hwpt", sid = sid.0, pasid, hwpt = b.hwpt, dev, ok = res.is_ok(), "detach HWPT");
        if let Err(e) = res {
            self.host_error(sid, slot, dev, "detach", &e);
        }
        if let Some(id) = b.nested_hwpt() {
            self.destroy(sid, slot, dev, id);
        }
        self.stats.unbinds += 1;
    }

    fn destroy(&mut self, sid: SourceId, slot: Slot, dev: Id, hwpt: Id) {
        if let Err(e) = self.iommufd.destroy(hwpt) {
            self.host_error(sid, slot, dev, "nested HWPT destroy", &e);
        }
    }

    fn host_error(&mut self, sid: SourceId, slot: Slot, dev: Id, op: &str, e: &memvisor_ioas::Error) {
        self.stats.host_errors += 1;
        tracing::warn!(
            sid = sid.0,
            pasid = slot.host_pasid(),
            dev,
            errno = e.errno(),
            "PASID binding: host {op} failed: {e}"
        );
    }

    /// PASID-cache invalidation: re-decide the affected pairs.
    fn pasid_cache(&mut self, scope: PasidCacheInval, tables: &dyn GuestTables) {
        let (did, extra) = match scope {
            PasidCacheInval::Global => (None, None),
            PasidCacheInval::Domain(did) => (Some(did), None),
            PasidCacheInval::Pasid { did, pasid } => (Some(did), Some(pasid)),
        };
        let sids: Vec<SourceId> = self.devices.keys().copied().collect();
        for sid in sids {
            let rid_pasid = tables.rid_pasid(sid).ok().flatten();
            for slot in self.candidates(sid, extra) {
                // PASID-selective: only the slot carrying that PASID.
                if let Some(p) = extra {
                    let carries = match slot {
                        Slot::Rid => {
                            rid_pasid == Some(p)
                                || self.bindings.get(&(sid, slot)).is_some_and(|b| b.guest_pasid == Some(p))
                        }
                        Slot::Pasid(q) => q == p,
                    };
                    if !carries {
                        continue;
                    }
                }
                let want = self.want(sid, slot, tables);
                if let Some(did) = did {
                    let old = self.bindings.get(&(sid, slot)).and_then(Binding::did);
                    let new = match want {
                        Want::Entry { entry, .. } => Some(entry.did),
                        _ => None,
                    };
                    if old != Some(did) && new != Some(did) {
                        continue;
                    }
                }
                self.apply(sid, slot, want);
            }
        }
    }

    /// PASID-based IOTLB invalidation: forward to the nested HWPT bound for
    /// that PASID (same domain).
    fn piotlb(&mut self, inv: PiotlbInval) {
        let (did, pasid, range) = match inv {
            PiotlbInval::Pasid { did, pasid } => (did, pasid, None),
            PiotlbInval::Page { did, pasid, addr, am, .. } => (did, pasid, page_range(addr, am)),
        };
        let targets: Vec<(SourceId, Slot, Id)> = self
            .bindings
            .iter()
            .filter(|(_, b)| b.guest_pasid == Some(pasid) && b.did() == Some(did))
            .filter_map(|(&(sid, slot), b)| b.nested_hwpt().map(|h| (sid, slot, h)))
            .collect();
        for (sid, slot, hwpt) in targets {
            let dev = self.devices.get(&sid).copied().unwrap_or_default();
            match self.iommufd.hwpt_invalidate(hwpt, range) {
                Ok(()) => {
                    self.stats.forwarded_invalidations += 1;
                    tracing::debug!(name: "vtd_piotlb_forward", sid = sid.0, pasid = slot.host_pasid(), hwpt, "forwarded PASID-based IOTLB invalidation");
                }
                Err(e) => self.host_error(sid, slot, dev, "stage-1 invalidation", &e),
            }
        }
    }

    fn context(&mut self, scope: ContextInval, tables: &dyn GuestTables) {
        match scope {
            ContextInval::Global | ContextInval::Domain(_) => self.replay_all(tables),
            ContextInval::Device { sid, fm, .. } => {
                let masked: u16 = (0b111u16 << 3u8.saturating_sub(fm.min(3))) & 0b111;
                let sids: Vec<SourceId> =
                    self.devices.keys().copied().filter(|s| (s.0 ^ sid.0) & !masked == 0).collect();
                for s in sids {
                    self.replay_device(s, tables);
                }
            }
        }
    }
}

/// The iommufd `VTD_S1` data of a first-stage PASID entry (QEMU
/// `vtd_init_s1_hwpt_data`): the flag bits are iommufd's, not the entry's.
fn s1_data(e: &PasidEntry) -> VtdS1 {
    let flags = if e.sre { VTD_S1_SRE } else { 0 }
        | if e.wpe { VTD_S1_WPE } else { 0 }
        | if e.eafe { VTD_S1_EAFE } else { 0 };
    VtdS1 { flags, pgtbl_addr: e.fsptptr, addr_width: 48 + 9 * u32::from(e.fspm) }
}

/// `2^am` 4 KiB pages at `addr` (aligned down to the size); `None` (the
/// whole HWPT) when the size does not fit 64 bits.
fn page_range(addr: u64, am: u8) -> Option<IovaRange> {
    let size =
        4096u64.checked_shl(u32::from(am)).filter(|s| *s != 0 && s.trailing_zeros() == 12 + u32::from(am))?;
    let start = addr & !(size - 1);
    Some(IovaRange { start, last: start.checked_add(size - 1)? })
}

impl Observer for HostBinding {
    fn invalidated(&mut self, inv: &Invalidation, tables: &dyn GuestTables) {
        match *inv {
            Invalidation::PasidCache(scope) => self.pasid_cache(scope, tables),
            Invalidation::Piotlb(scope) => self.piotlb(scope),
            Invalidation::Context(scope) => self.context(scope, tables),
            Invalidation::Iotlb(_) | Invalidation::Iec(_) | Invalidation::DeviceTlb => {}
        }
    }

    fn state_changed(&mut self, change: StateChange, tables: &dyn GuestTables) {
        match change {
            StateChange::RootTable | StateChange::TranslationEnable(_) => self.replay_all(tables),
            StateChange::IrTable | StateChange::IrEnable(_) => {}
        }
    }
}

/// A binding shared with the VMM (to add and remove devices, read
/// [`HostBinding::binding`] and [`HostBinding::stats`]) while the unit owns
/// a clone as its observer. A poisoned lock is taken over: the binding's
/// state is consistent between calls.
impl Observer for Arc<Mutex<HostBinding>> {
    fn invalidated(&mut self, inv: &Invalidation, tables: &dyn GuestTables) {
        self.lock().unwrap_or_else(PoisonError::into_inner).invalidated(inv, tables);
    }

    fn state_changed(&mut self, change: StateChange, tables: &dyn GuestTables) {
        self.lock().unwrap_or_else(PoisonError::into_inner).state_changed(change, tables);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_range_aligns_down_and_covers_two_to_the_am_pages() {
        assert_eq!(page_range(0x5_3000, 2), Some(IovaRange { start: 0x5_0000, last: 0x5_3fff }));
        assert_eq!(page_range(0x1234, 0), Some(IovaRange { start: 0x1000, last: 0x1fff }));
        assert_eq!(page_range(0, 52), None);
    }
}
