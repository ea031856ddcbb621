//! vm-memory 0.18's [`Iommu`] over the VT-d model (feature `iommu`): a
//! rust-vmm device model built on `IommuMemory<GuestRam, VtdIommu<GuestRam>>`
//! DMAs through memvisor's VT-d exactly as a guest programmed it — root,
//! context and PASID tables, every translation type, faults recorded and
//! signalled by the unit.
//!
//! One [`VtdIommu`] serves one requester: a source id, optionally a PASID
//! (requests-with-PASID), optionally privileged. Translations are served
//! from vm-memory's [`Iotlb`]; a miss (or an access the cached entry does
//! not allow) walks the unit ([`Vtd::translate`], which has its own caches
//! and records faults) one page at a time and caches whole pages.
//!
//! # Invalidation
//!
//! The unit accepts a single [`Observer`], usually the host binding. The
//! IOTLB of every `VtdIommu` must be dropped when the guest invalidates, so
//! a VMM either
//!
//! - registers a [`FlushingObserver`] (which flushes every registered
//!   [`IotlbFlusher`] and then forwards to the inner observer, e.g.
//!   [`crate::bind::HostBinding`]), or
//! - calls [`VtdIommu::invalidate_all`] / [`IotlbFlusher::invalidate_all`]
//!   itself after every invalidation and GCMD change.
//!
//! Any invalidation that can affect DMA translation (context, IOTLB,
//! PASID-cache, PASID-based IOTLB; SRTP and TE changes) drops the whole
//! cache: the cache is not indexed by domain, and invalidations are rare
//! next to DMA. A translation that raced with an invalidation is never
//! cached: a generation counter taken under the unit's lock is compared
//! before inserting.
//!
//! Lock order: the unit (`Mutex<Vtd>`), then the interrupt sink; the IOTLB
//! lock is never held while either is taken.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use memvisor_vtd::device::Vtd;
//! use memvisor_vtd::iommu::{FlushingObserver, VtdIommu};
//! use memvisor_vtd::{Config, RecordingSink, SourceId};
//! use vm_memory::iommu::IommuMemory;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let ram = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)])?);
//! let vtd = Arc::new(Mutex::new(Vtd::new(Config::default())?));
//! let sink = Arc::new(Mutex::new(RecordingSink::default()));
//! let iommu = VtdIommu::new(vtd.clone(), ram.clone(), sink, SourceId::new(0, 3, 0));
//! // The VMM's MMIO path flushes this IOTLB whenever the guest invalidates.
//! let mut observer = FlushingObserver::new(None);
//! observer.add(iommu.flusher());
//! vtd.lock().unwrap().set_observer(Some(Box::new(observer)));
//! let dma = IommuMemory::new((*ram).clone(), iommu, true, ());
//! // Out of reset, translation is disabled: DMA addresses are guest-physical.
//! dma.write_obj(0x55aa_u16, GuestAddress(0x8000))?;
//! assert_eq!(ram.read_obj::<u16>(GuestAddress(0x8000))?, 0x55aa);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, Permissions};

use crate::device::Vtd;
use crate::memory::VmMemory;
use crate::translate::DmaRequest;
use crate::{GuestTables, InterruptSink, Invalidation, Observer, SourceId, StateChange};

const PAGE: u64 = 4096;
/// How often a fill is retried when invalidations keep racing it.
const FILL_RETRIES: u32 = 8;

/// The cache shared between a [`VtdIommu`] and its [`IotlbFlusher`]s.
#[derive(Debug, Default)]
struct Shared {
    iotlb: RwLock<Iotlb>,
    /// Bumped (under the IOTLB write lock) by every flush.
    generation: AtomicU64,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Iotlb> {
        self.iotlb.read().unwrap_or_else(PoisonError::into_inner)
    }
    fn flush(&self) {
        let mut tlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        tlb.invalidate_all();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// A handle that drops one [`VtdIommu`]'s cached translations; cheap to
/// clone, not generic, `Send + Sync` (for a [`FlushingObserver`] or the
/// VMM's MMIO path).
#[derive(Debug, Clone)]
pub struct IotlbFlusher(Arc<Shared>);

impl IotlbFlusher {
    /// Drops every cached translation.
    pub fn invalidate_all(&self) {
        self.0.flush();
    }
}

/// An [`Observer`] that flushes the IOTLBs of [`VtdIommu`]s on every
/// invalidation or GCMD change that can affect DMA translation, then
/// forwards the event to an inner observer (the host binding, or none).
#[derive(Default)]
pub struct FlushingObserver {
    flushers: Vec<IotlbFlusher>,
    inner: Option<Box<dyn Observer>>,
}

impl fmt::Debug for FlushingObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlushingObserver")
            .field("flushers", &self.flushers.len())
            .field("inner", &self.inner.is_some())
            .finish()
    }
}

impl FlushingObserver {
    /// An observer forwarding to `inner` (if any) after flushing.
    pub fn new(inner: Option<Box<dyn Observer>>) -> Self {
        Self { flushers: Vec::new(), inner }
    }

    /// Also flushes `flusher`'s IOTLB.
    pub fn add(&mut self, flusher: IotlbFlusher) {
        self.flushers.push(flusher);
    }

    fn flush(&self) {
        for f in &self.flushers {
            f.invalidate_all();
        }
    }
}

/// Whether `inv` can change a DMA translation.
fn affects_dma(inv: &Invalidation) -> bool {
    !matches!(inv, Invalidation::Iec(_) | Invalidation::DeviceTlb)
}

impl Observer for FlushingObserver {
    fn invalidated(&mut self, inv: &Invalidation, tables: &dyn GuestTables) {
        if affects_dma(inv) {
            self.flush();
        }
        if let Some(o) = self.inner.as_mut() {
            o.invalidated(inv, tables);
        }
    }

    fn state_changed(&mut self, change: StateChange, tables: &dyn GuestTables) {
        if matches!(change, StateChange::RootTable | StateChange::TranslationEnable(_)) {
            self.flush();
        }
        if let Some(o) = self.inner.as_mut() {
            o.state_changed(change, tables);
        }
    }
}

/// vm-memory's [`Iommu`] for one requester behind memvisor's VT-d unit.
///
/// `M` is the guest-physical memory the unit reads its tables from (the
/// same memory `IommuMemory` accesses after translation).
pub struct VtdIommu<M: GuestMemoryBackend> {
    vtd: Arc<Mutex<Vtd>>,
    mem: Arc<M>,
    irq: Arc<Mutex<dyn InterruptSink + Send>>,
    sid: SourceId,
    pasid: Option<u32>,
    privileged: bool,
    shared: Arc<Shared>,
}

impl<M: GuestMemoryBackend> fmt::Debug for VtdIommu<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VtdIommu")
            .field("sid", &self.sid)
            .field("pasid", &self.pasid)
            .field("privileged", &self.privileged)
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemoryBackend> VtdIommu<M> {
    /// DMA of requester `sid` (requests without PASID, unprivileged) through
    /// `vtd`, whose tables live in `mem`; fault events go to `irq`.
    pub fn new(
        vtd: Arc<Mutex<Vtd>>,
        mem: Arc<M>,
        irq: Arc<Mutex<dyn InterruptSink + Send>>,
        sid: SourceId,
    ) -> Self {
        Self { vtd, mem, irq, sid, pasid: None, privileged: false, shared: Arc::default() }
    }

    /// Requests carry `pasid` (requests-with-PASID; `None`: without).
    #[must_use]
    pub fn with_pasid(mut self, pasid: Option<u32>) -> Self {
        self.pasid = pasid;
        self
    }

    /// Requests are privileged (supervisor) ones.
    #[must_use]
    pub fn privileged(mut self, privileged: bool) -> Self {
        self.privileged = privileged;
        self
    }

    /// The requester.
    pub fn sid(&self) -> SourceId {
        self.sid
    }

    /// A handle that flushes this IOTLB (for a [`FlushingObserver`]).
    pub fn flusher(&self) -> IotlbFlusher {
        IotlbFlusher(self.shared.clone())
    }

    /// Drops every cached translation (call after the guest invalidated, if
    /// no [`FlushingObserver`] does it).
    pub fn invalidate_all(&self) {
        self.shared.flush();
    }

    /// Walks the unit for every page of `range` and caches the results;
    /// `Ok(false)` when an invalidation raced the walk (nothing cached).
    fn fill(&self, range: &IovaRange, access: Permissions) -> Result<bool, Error> {
        let unresolved = |reason: String| Error::CannotResolve { iova_range: range.clone(), reason };
        let len = u64::try_from(range.length).map_err(|_| unresolved("length".into()))?;
        let end = range.base.0.checked_add(len).ok_or_else(|| unresolved("range overflows".into()))?;
        let mut pages = Vec::new();
        let generation;
        {
            let mut vtd = self.vtd.lock().unwrap_or_else(PoisonError::into_inner);
            let mut irq = self.irq.lock().unwrap_or_else(PoisonError::into_inner);
            generation = self.shared.generation.load(Ordering::Acquire);
            let mem = VmMemory(&*self.mem);
            let mut at = range.base.0;
            while at < end {
                let req = DmaRequest {
                    sid: self.sid,
                    pasid: self.pasid,
                    addr: at,
                    write: access.has_write(),
                    exec: false,
                    privileged: self.privileged,
                };
                let t = vtd.translate(&mem, &mut *irq, &req).map_err(|f| {
                    unresolved(format!(
                        "VT-d DMA remapping fault (reason {:#x}) at {:#x} for {:?}",
                        f.reason, f.addr, self.sid
                    ))
                })?;
                if access.allow(Permissions::Read) && !t.read {
                    return Err(unresolved("the VT-d translation does not allow reads".into()));
                }
                let size =
                    if t.page_size.is_power_of_two() && t.page_size >= PAGE { t.page_size } else { PAGE };
                let base = at & !(size - 1);
                let perm = match (t.read, t.write) {
                    (true, true) => Permissions::ReadWrite,
                    (true, false) => Permissions::Read,
                    (false, true) => Permissions::Write,
                    (false, false) => Permissions::No,
                };
                pages.push((base, t.output & !(size - 1), size, perm));
                at = match base.checked_add(size) {
                    Some(next) => next,
                    None => break,
                };
            }
        }
        let mut tlb = self.shared.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        if self.shared.generation.load(Ordering::Acquire) != generation {
            return Ok(false);
        }
        for (iova, out, size, perm) in pages {
            // The last page of the address space cannot be cached whole:
            // rangemap ranges are half-open `u64`s.
            let size = size.min(u64::MAX - iova);
            let size = usize::try_from(size).map_err(|_| unresolved("page size".into()))?;
            tlb.set_mapping(GuestAddress(iova), GuestAddress(out), size, perm)?;
        }
        Ok(true)
    }
}

impl<M: GuestMemoryBackend + Send + Sync> Iommu for VtdIommu<M> {
    type IotlbGuard<'a>
        = RwLockReadGuard<'a, Iotlb>
    where
        Self: 'a;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, Error> {
        let whole = IovaRange { base: iova, length };
        let fits = u64::try_from(length).ok().and_then(|l| iova.0.checked_add(l)).is_some();
        if !fits {
            return Err(Error::CannotResolve { iova_range: whole, reason: "range overflows".into() });
        }
        for _ in 0..FILL_RETRIES {
            let fails = match Iotlb::lookup(self.shared.read(), iova, length, access) {
                Ok(hit) => return Ok(hit),
                Err(fails) => fails,
            };
            let mut filled = true;
            for r in fails.misses.iter().chain(&fails.access_fails) {
                filled &= self.fill(r, access)?;
            }
            if filled && let Ok(hit) = Iotlb::lookup(self.shared.read(), iova, length, access) {
                return Ok(hit);
            }
        }
        Err(Error::CannotResolve {
            iova_range: whole,
            reason: "invalidations kept racing the translation".into(),
        })
    }
}
