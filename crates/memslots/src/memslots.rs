//! The memslot set of one VM: validation in KVM's order, classification,
//! guest_memfd bindings, and publication of immutable generations that
//! readers load without ever blocking.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Deref;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use memvisor_types::{Address, Gfn, Gpa, Hva, PageSize};

use crate::chunked::Chunked;
use crate::error::Error;
use crate::files::{GmemResolver, ResolveError};
use crate::generation::{Entry, Generation, Miss, Span};
use crate::limits::Limits;
use crate::request::{GUEST_MEMFD, Ioctl, LOG_DIRTY_PAGES, MemslotRequest, READONLY, V1_FLAGS};
use crate::slot::{Change, ChangeKind, FileId, GfnRange, GmemBinding, Memslot, SlotGfnRange, SlotKey, VmId};

const PAGE_SHIFT: u32 = PageSize::Size4K.shift();
const PAGE_MASK: u64 = PageSize::Size4K.offset_mask();

/// A validated request, not yet applied.
#[derive(Debug)]
struct Plan {
    kind: ChangeKind,
    key: SlotKey,
    old: Option<Memslot>,
    new: Option<Memslot>,
}

/// The memslots of one VM (writer side).
///
/// [`apply`](Self::apply) checks a request with KVM's rules, in KVM's order
/// and with KVM's errnos, classifies it (create, delete, move, flags-only,
/// no-op) and publishes the result as a new immutable [`Generation`].
/// Readers ([`Reader`], any number, any thread) load the current generation
/// lock-free and never wait for a writer. Updates take `&mut self`: a VMM
/// with several writers serializes them, as KVM's `slots_lock` does.
///
/// Deleting or moving a slot first publishes a generation in which the slot
/// is *invalid* (lookups report [`Lookup::Invalid`](crate::Lookup::Invalid),
/// so faults retry), calls the caller's zap callback, then publishes the
/// final generation.
///
/// Cost: checking a request is O(log n). The writer's tables are chunked
/// and shared copy-on-write with the published generations: a change clones
/// the few chunks it touches (each at most 512 items, with its bucket table),
/// and a publication copies only the chunk directories and rebuilds the
/// per-address-space bucket table over the chunks — O(chunk size + n / chunk
/// size) instead of O(n). [`apply_batch`](Self::apply_batch) publishes once
/// for many requests.
///
/// ```
/// use memvisor_memslots::{ChangeKind, Memslots, MemslotRequest, NoFiles, VmId};
/// use memvisor_types::{Gfn, Gpa, Hva};
///
/// let mut slots = Memslots::new(VmId(1));
/// let reader = slots.reader();
/// let req = MemslotRequest::new(0, Gpa::new(0x10_0000), 0x4000, Hva::new(0x7f00_0000_0000));
/// assert_eq!(slots.apply(&req, &NoFiles)?.kind, ChangeKind::Create);
///
/// let overlapping = MemslotRequest::new(1, Gpa::new(0x10_2000), 0x1000, Hva::new(0x7f00_1000_0000));
/// assert_eq!(slots.apply(&overlapping, &NoFiles).unwrap_err().errno(), libc::EEXIST);
///
/// assert_eq!(reader.snapshot().gpa_to_hva(0, Gpa::new(0x10_1234)), Ok(Hva::new(0x7f00_0000_1234)));
/// # Ok::<(), memvisor_memslots::Error>(())
/// ```
#[derive(Debug)]
pub struct Memslots {
    limits: Limits,
    vm: VmId,
    /// Every slot, sorted by key.
    slots: Chunked<Memslot>,
    /// Per address space, the slots' entries sorted by base gfn (slots of a
    /// space never overlap).
    spaces: Vec<Chunked<Entry>>,
    /// Every slot's host-virtual range, sorted.
    spans: Chunked<Span>,
    /// Per guest_memfd file: first bound page → (end page, slot).
    bindings: HashMap<FileId, BTreeMap<u64, (u64, SlotKey)>>,
    total_pages: u64,
    number: u64,
    current: Arc<ArcSwap<Generation>>,
}

impl Memslots {
    /// An empty set for VM `vm` with the x86-64 [`Limits`].
    pub fn new(vm: VmId) -> Self {
        Self::with_limits(vm, Limits::default())
    }

    /// An empty set for VM `vm` with `limits`.
    pub fn with_limits(vm: VmId, limits: Limits) -> Self {
        let spaces: Vec<Chunked<Entry>> = (0..limits.address_spaces).map(|_| Chunked::default()).collect();
        let empty = Generation::build(0, Chunked::default(), spaces.clone(), Chunked::default());
        Self {
            limits,
            vm,
            slots: Chunked::default(),
            spaces,
            spans: Chunked::default(),
            bindings: HashMap::new(),
            total_pages: 0,
            number: 0,
            current: Arc::new(ArcSwap::from_pointee(empty)),
        }
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The VM whose guest_memfd files may be bound.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Total pages of all slots.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// A read handle on the published generations.
    pub fn reader(&self) -> Reader {
        Reader { current: Arc::clone(&self.current) }
    }

    /// The current generation (a lock-free load).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.current.load())
    }

    /// The slot `key` as last applied.
    pub fn slot(&self, key: SlotKey) -> Option<&Memslot> {
        self.slots.get(&key)
    }

    /// Checks and applies one request.
    pub fn apply(&mut self, req: &MemslotRequest, files: &dyn GmemResolver) -> Result<Change, Error> {
        self.apply_with(req, files, |_| {})
    }

    /// Checks and applies one request; for a delete or a move, `zap` is
    /// called with the old slot while its invalid copy is published (unmap
    /// it from every derived table there).
    pub fn apply_with(
        &mut self,
        req: &MemslotRequest,
        files: &dyn GmemResolver,
        zap: impl FnOnce(&Memslot),
    ) -> Result<Change, Error> {
        let plan = self.check(req, files)?;
        if plan.kind == ChangeKind::None {
            return Ok(self.commit(plan));
        }
        if let (ChangeKind::Delete | ChangeKind::Move, Some(old)) = (plan.kind, &plan.old) {
            self.publish_invalid(&[old.key()]);
            zap(old);
        }
        let change = self.commit(plan);
        self.publish();
        Ok(change)
    }

    /// Checks and applies `requests` in order (each against the state the
    /// previous ones left) and publishes once: a generation in which every
    /// slot deleted or moved by the batch is invalid (then `zap` is called
    /// for each), then the final one. What a single [`apply`](Self::apply)
    /// costs per publication (copying the chunk directories) is paid once
    /// per batch.
    pub fn apply_batch(
        &mut self,
        requests: &[MemslotRequest],
        files: &dyn GmemResolver,
        mut zap: impl FnMut(&Memslot),
    ) -> Vec<Result<Change, Error>> {
        let before = self.current.load_full();
        let mut invalidated = BTreeSet::new();
        let mut changed = false;
        let results = requests
            .iter()
            .map(|req| {
                let plan = self.check(req, files)?;
                if matches!(plan.kind, ChangeKind::Delete | ChangeKind::Move)
                    && before.slot(plan.key).is_some()
                {
                    invalidated.insert(plan.key);
                }
                changed |= plan.kind != ChangeKind::None;
                Ok(self.commit(plan))
            })
            .collect();
        if !invalidated.is_empty() {
            let keys: Vec<SlotKey> = invalidated.into_iter().collect();
            self.publish_invalid_from(&before, &keys);
            for key in keys {
                if let Some(old) = before.slot(key) {
                    zap(old);
                }
            }
        }
        if changed {
            self.publish();
        }
        results
    }

    /// The gfn ranges of every slot bound to `file` pages `start..end`
    /// (what a guest_memfd punch hole must invalidate).
    pub fn gmem_invalidate(&self, file: FileId, start: u64, end: u64) -> Vec<SlotGfnRange> {
        let mut out = Vec::new();
        let Some(bound) = self.bindings.get(&file) else { return out };
        // Bindings of a file never overlap: at most one starts below `start`
        // and reaches into the range.
        let first = bound.range(..=start).next_back().map_or(start, |(&s, _)| s);
        for (&b_start, &(b_end, key)) in bound.range(first..end) {
            let (lo, hi) = (start.max(b_start), end.min(b_end));
            if lo >= hi {
                continue;
            }
            let Some(slot) = self.slot(key) else { continue };
            let base = slot.base_gfn().as_u64();
            if let Some(gfns) =
                GfnRange::new(Gfn::new(base + (lo - b_start)), Gfn::new(base + (hi - b_start)))
            {
                out.push(SlotGfnRange { slot: key, gfns, invalid: false });
            }
        }
        out
    }

    /// `file` was closed: its bindings end (the slots stay, but private
    /// accesses to them fail) and the whole of every bound slot must be
    /// zapped; returns those ranges.
    pub fn release_gmem_file(&mut self, file: FileId) -> Vec<SlotGfnRange> {
        let Some(bound) = self.bindings.remove(&file) else { return Vec::new() };
        let mut out = Vec::new();
        for (_, (_, key)) in bound {
            let closed = self.slots.update(&key, |slot| {
                if let Some(b) = slot.gmem.as_mut() {
                    b.open = false;
                }
                slot.gfns()
            });
            let Some(gfns) = closed else { continue };
            out.push(SlotGfnRange { slot: key, gfns, invalid: false });
        }
        if !out.is_empty() {
            self.publish();
        }
        out
    }

    /// Runs every check of `req` in KVM's order; changes nothing.
    fn check(&self, req: &MemslotRequest, files: &dyn GmemResolver) -> Result<Plan, Error> {
        let req = req.normalized();
        let l = &self.limits;
        let flags = req.flags;
        // Rule 1: kvm_vm_ioctl() for KVM_SET_USER_MEMORY_REGION.
        if req.ioctl == Ioctl::V1 && flags & !V1_FLAGS != 0 {
            return Err(Error::V1Flags { flags });
        }
        // Rule 2: kvm_vm_ioctl_set_memory_region().
        let (as_id, id) = (req.as_id(), req.id());
        if id >= l.user_slots {
            return Err(Error::SlotId { id, limit: l.user_slots });
        }
        // Rule 3: check_memory_region_flags().
        self.check_flags(flags)?;
        // Rules 4–9: __kvm_set_memory_region()'s sanity checks.
        let size = req.memory_size;
        let gpa = req.guest_phys_addr.raw();
        let uaddr = req.userspace_addr.raw();
        if size & PAGE_MASK != 0 {
            return Err(Error::UnalignedSize { size });
        }
        if gpa & PAGE_MASK != 0 {
            return Err(Error::UnalignedGpa { gpa });
        }
        if uaddr & PAGE_MASK != 0 {
            return Err(Error::UnalignedHva { hva: uaddr });
        }
        // access_ok(): the sum must not wrap and must stay in user space.
        match uaddr.checked_add(size) {
            Some(end) if end <= l.user_addr_max => {}
            _ => return Err(Error::HvaRange { hva: uaddr, size }),
        }
        let offset = req.guest_memfd_offset;
        if flags & GUEST_MEMFD != 0 && (offset & PAGE_MASK != 0 || offset.checked_add(size).is_none()) {
            return Err(Error::GmemOffset { offset, size });
        }
        if as_id >= l.address_spaces {
            return Err(Error::AddressSpace { as_id, count: l.address_spaces });
        }
        if gpa.checked_add(size).is_none() {
            return Err(Error::GpaWrap { gpa, size });
        }
        // Rule 10.
        let npages = size >> PAGE_SHIFT;
        if npages > l.max_pages_per_slot {
            return Err(Error::TooManyPages { npages, max: l.max_pages_per_slot });
        }
        let key = SlotKey { as_id, id };
        let old = self.slot(key).cloned();
        // Rule 11.
        if size == 0 {
            return match old {
                Some(old) => Ok(Plan { kind: ChangeKind::Delete, key, old: Some(old), new: None }),
                None => Err(Error::DeleteEmpty { as_id, id }),
            };
        }
        let base_gfn = gpa >> PAGE_SHIFT;
        let kind = match &old {
            None => {
                // Rule 12.
                if self.total_pages.checked_add(npages).is_none_or(|t| t > l.max_total_pages) {
                    return Err(Error::TotalPages { npages });
                }
                ChangeKind::Create
            }
            Some(old) => {
                // Rule 13: guest_memfd slots are immutable.
                if flags & GUEST_MEMFD != 0 {
                    return Err(Error::GmemImmutable { as_id, id });
                }
                // Rule 14.
                if uaddr != old.userspace_addr().raw()
                    || npages != old.npages()
                    || (flags ^ old.flags()) & (READONLY | GUEST_MEMFD) != 0
                {
                    return Err(Error::InvalidModify { as_id, id });
                }
                // Rule 15.
                if base_gfn != old.base_gfn().as_u64() {
                    ChangeKind::Move
                } else if flags != old.flags() {
                    ChangeKind::FlagsOnly
                } else {
                    ChangeKind::None
                }
            }
        };
        if kind == ChangeKind::None {
            return Ok(Plan { kind, key, old: old.clone(), new: old });
        }
        let end_gfn = base_gfn + npages;
        // Rule 16.
        if matches!(kind, ChangeKind::Create | ChangeKind::Move)
            && let Some(other) = self.overlapping_slot(key, base_gfn, end_gfn)
        {
            return Err(Error::Overlap { start: base_gfn, end: end_gfn, other });
        }
        // Rules 17–18: kvm_gmem_bind() (only a create gets here with the flag).
        let gmem = if flags & GUEST_MEMFD != 0 {
            Some(self.check_binding(req.guest_memfd, offset, size, files)?)
        } else {
            old.as_ref().and_then(|o| o.gmem)
        };
        // Rule 19: kvm_arch_prepare_memory_region().
        if matches!(kind, ChangeKind::Create | ChangeKind::Move) && end_gfn - 1 > l.max_gfn.as_u64() {
            return Err(Error::BeyondMaxGfn { last: end_gfn - 1, max: l.max_gfn.as_u64() });
        }
        let new = Memslot {
            key,
            base_gfn: Gfn::new(base_gfn),
            npages,
            flags,
            userspace_addr: Hva::new(uaddr),
            gmem,
            invalid: false,
        };
        Ok(Plan { kind, key, old, new: Some(new) })
    }

    fn check_flags(&self, flags: u32) -> Result<(), Error> {
        let mut valid = LOG_DIRTY_PAGES;
        if self.limits.guest_memfd {
            valid |= GUEST_MEMFD;
        }
        // Dirty logging of private memory is not supported.
        if flags & GUEST_MEMFD != 0 {
            valid &= !LOG_DIRTY_PAGES;
        }
        // Writes to read-only slots are emulated MMIO, which private memory cannot be.
        if self.limits.readonly && flags & GUEST_MEMFD == 0 {
            valid |= READONLY;
        }
        if flags & !valid != 0 { Err(Error::Flags { flags }) } else { Ok(()) }
    }

    /// Another slot of `key`'s address space overlapping `start..end`.
    fn overlapping_slot(&self, key: SlotKey, start: u64, end: u64) -> Option<u16> {
        let space = self.spaces.get(usize::from(key.as_id))?;
        // Slots of a space are disjoint: only the two highest bases below
        // `end` can reach `start` (two, because one may be `key` itself).
        let other = space.iter_below(&end).take(2).find(|e| e.id != key.id)?;
        (other.end > start).then_some(other.id)
    }

    /// kvm_gmem_bind()'s checks, in its order.
    fn check_binding(
        &self,
        fd: i32,
        offset: u64,
        size: u64,
        files: &dyn GmemResolver,
    ) -> Result<GmemBinding, Error> {
        let file = files.resolve(fd).map_err(|e| match e {
            ResolveError::BadFd => Error::BadFd { fd },
            ResolveError::NotGuestMemfd => Error::NotGuestMemfd { fd },
        })?;
        if file.owner != self.vm {
            return Err(Error::ForeignGuestMemfd { fd });
        }
        // The kernel compares signed file offsets (loff_t), and its sum wraps
        // (it builds with -fno-strict-overflow): an offset near 2^63 whose
        // sum with the size turns negative passes this check on Linux 6.18.
        let (s_offset, s_size) = (offset.cast_signed(), size.cast_signed());
        if s_offset < 0 || s_offset.wrapping_add(s_size) > file.size.cast_signed() {
            return Err(Error::GmemRange { offset, size, file_size: file.size });
        }
        let start = offset >> PAGE_SHIFT;
        let end = start + (size >> PAGE_SHIFT);
        if let Some(bound) = self.bindings.get(&file.id)
            && let Some((_, &(b_end, _))) = bound.range(..end).next_back()
            && b_end > start
        {
            return Err(Error::GmemBindingOverlap { start, end });
        }
        Ok(GmemBinding { file: file.id, pgoff: start, open: true })
    }

    /// Applies a checked plan to the working state (not yet published).
    fn commit(&mut self, plan: Plan) -> Change {
        let Plan { kind, old, new, .. } = plan;
        if kind != ChangeKind::None {
            if let Some(old) = &old {
                self.remove(old);
            }
            if let Some(new) = &new {
                self.insert(new.clone());
            }
        }
        Change { kind, old, new }
    }

    fn insert(&mut self, slot: Memslot) {
        let key = slot.key();
        if let Some(space) = self.spaces.get_mut(usize::from(key.as_id)) {
            space.insert(Entry::of(&slot));
        }
        self.spans.insert(Span::of(&slot));
        if let Some((file, start, end)) = slot.gmem_pages()
            && slot.gmem().is_some_and(|b| b.open)
        {
            self.bindings.entry(file).or_default().insert(start, (end, key));
        }
        self.total_pages += slot.npages();
        self.slots.insert(slot);
    }

    fn remove(&mut self, slot: &Memslot) {
        let key = slot.key();
        if let Some(space) = self.spaces.get_mut(usize::from(key.as_id)) {
            space.remove(&slot.base_gfn().as_u64());
        }
        self.spans.remove(&Span::of(slot));
        if let Some((file, start, _)) = slot.gmem_pages()
            && let Some(bound) = self.bindings.get_mut(&file)
        {
            if bound.get(&start).is_some_and(|&(_, k)| k == key) {
                bound.remove(&start);
            }
            if bound.is_empty() {
                self.bindings.remove(&file);
            }
        }
        self.total_pages -= slot.npages();
        self.slots.remove(&key);
    }

    fn publish(&mut self) {
        self.number += 1;
        let generation =
            Generation::build(self.number, self.slots.clone(), self.spaces.clone(), self.spans.clone());
        self.current.store(Arc::new(generation));
    }

    fn publish_invalid(&mut self, keys: &[SlotKey]) {
        let current = self.current.load_full();
        self.publish_invalid_from(&current, keys);
    }

    fn publish_invalid_from(&mut self, base: &Generation, keys: &[SlotKey]) {
        self.number += 1;
        self.current.store(Arc::new(base.with_invalid(self.number, keys)));
    }
}

/// A cloneable, `Send + Sync` read handle: loads the current generation
/// without locks, so readers never wait for an update.
#[derive(Debug, Clone)]
pub struct Reader {
    current: Arc<ArcSwap<Generation>>,
}

impl Reader {
    /// The current generation, held for a short read section (a fault).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.current.load())
    }

    /// The current generation as an owned `Arc`, for holding longer.
    pub fn load_full(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// gpa → hva in the current generation.
    pub fn gpa_to_hva(&self, as_id: u16, gpa: Gpa) -> Result<Hva, Miss> {
        self.current.load().gpa_to_hva(as_id, gpa)
    }
}

/// A loaded generation (an `arc-swap` guard): cheap to take, meant for short
/// read sections; dereferences to [`Generation`].
#[derive(Debug)]
pub struct Snapshot(Guard<Arc<Generation>>);

impl Deref for Snapshot {
    type Target = Generation;

    fn deref(&self) -> &Generation {
        &self.0
    }
}
