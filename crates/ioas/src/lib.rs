//! IO address spaces with Linux iommufd semantics (`drivers/iommu/iommufd/`).
//!
//! An [`Iommufd`] context owns objects named by [`Id`]: IOAS (an IOVA → host
//! memory map), HWPT paging (a software IO page table in the VT-d
//! second-stage format kept equal to its IOAS; optionally a nesting parent),
//! HWPT nested (a guest VT-d stage-1 table over a parent, [`VtdS1`]), device,
//! access (an in-kernel user with an unmap notifier, [`AccessOps`]), internal
//! access (owner pins that make unmap fail with EBUSY), vIOMMU, vDEVICE and
//! HW queue. Every failure is an [`Error`] whose [`Error::errno`] is Linux's.
//!
//! # Public API (iommufd-shaped)
//!
//! ```text
//! Iommufd::new() / with_locked_limit(Some(pages))
//! ioas_alloc() -> Id
//! ioas_map(ioas, MapFlags{fixed_iova, read, write}, iova, Backing, length) -> Result<u64 iova>
//! ioas_copy(dst, src, MapFlags, dst_iova, src_iova, length) -> Result<u64 iova>
//! ioas_unmap(ioas, iova, length) -> Result<u64 bytes unmapped>   // (0, u64::MAX) = unmap all
//! ioas_allow_iovas(ioas, &[IovaRange]) / ioas_reserve(ioas, owner, IovaRange) / ioas_unreserve(ioas, owner)
//! ioas_iova_ranges(ioas, capacity) -> Result<Vec<IovaRange>>     // Error::MsgSize{needed} = EMSGSIZE
//! set_iova_alignment(ioas, bytes)
//! hwpt_alloc(pt_id, HwptKind::Paging{nest_parent} | HwptKind::Nested(VtdS1)) -> Id
//! hwpt_invalidate(hwpt, Option<IovaRange>)
//! device_add() -> Id; device_attach(dev, pasid, pt_id) -> Id hwpt; device_replace(..); device_detach(dev, pasid)
//! access_create(ioas, Arc<dyn AccessOps>) -> Id; internal_access_create(ioas) -> Id
//! access_pin_pages(access, iova, length, write) -> Result<Vec<Hva>>; access_unpin_pages(access, iova, length)
//! viommu_alloc(dev, hwpt) -> Id; vdevice_alloc(viommu, dev, virt_id) -> Id
//! hw_queue_alloc(viommu, index, iova, length) -> Id
//! destroy(id)
//! translate(dev, pasid, iova, length, DmaAccess) -> Result<Vec<DmaSegment>, DmaFault>
//! begin_host_change(AddrRange<Hva>) -> Result<HostChange>; discard(&NotifiedMapping, offset, len)
//! impl InvalidationSink for Iommufd (register an Arc<Iommufd> with a hostmem Notifier)
//! ```
//!
//! ```
//! use memvisor_ioas::{Backing, DmaAccess, Iommufd, MapFlags};
//! use memvisor_types::Hva;
//!
//! let ictx = Iommufd::new();
//! let ioas = ictx.ioas_alloc();
//! let iova = ictx.ioas_map(ioas, MapFlags::rw(), 0, Backing::User(Hva::new(0x7f00_0000_0000)), 0x2000)?;
//! let dev = ictx.device_add();
//! ictx.device_attach(dev, 0, ioas)?;
//! let dma = ictx.translate(dev, 0, iova + 0x10, 8, DmaAccess::Write).expect("mapped");
//! assert_eq!(dma[0].hva, Hva::new(0x7f00_0000_0010));
//! // Unmapping half an area is refused, as in Linux.
//! assert_eq!(ictx.ioas_unmap(ioas, iova, 0x1000).unwrap_err().errno(), libc::ENOENT);
//! # Ok::<(), memvisor_ioas::Error>(())
//! ```
//!
//! # Pins and host memory (decision)
//!
//! A pin (access, internal, or the storage-domain pin every area holds while
//! a HWPT paging is attached to its IOAS) is honoured by **refusing** host
//! changes: [`Iommufd::begin_host_change`] (and [`Iommufd::discard`], the
//! way a VMM discards, punches a hole or deletes a slot over guest memory)
//! fails with EBUSY while any page of the range is pinned, and while a change
//! is in progress new pins over it fail with EBUSY. Waiting was rejected: an
//! access holds pins for as long as its device model likes, and a VMM thread
//! blocked under a guest-triggered discard is a denial of service.
//!
//! Non-goals: the ioctl ABI (size/trailing-byte checks), dirty tracking,
//! FAULT and VEVENTQ objects, dma-buf backings. Pages backed by a raw user
//! address ([`Backing::User`]) are not checked for validity (no EFAULT at
//! map time); [`Backing::Region`] is bounds-checked and readable, which nested
//! stage-1 walks need.

#![warn(missing_docs)]

mod error;
mod pagemap;
mod pins;
#[cfg(test)]
mod tests;

pub use error::{Error, Result};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_hostmem::{InvalidationSink, MappedRegion, NotifiedMapping};
use memvisor_paging::{
    Access, Arena, ArenaFrames, Fault, Mapper, MemoryError, Nested, SecondStage, SecondStageAttrs,
    TableMemory, Walker, X86Paging,
};
use memvisor_types::{AddrRange, Address, Gpa, Hpa, Hva, Iova, PageSize};

use pins::PinCounts;

/// Object id (never 0).
pub type Id = u32;

const PAGE: u64 = 4096;
/// Linux caps automatic IOVA alignment at the huge page size.
const HPAGE: u64 = 2 << 20;
/// Unmap gives up after this many notifier rounds (EDEADLOCK).
const MAX_UNMAP_TRIES: u32 = 100;
/// VT-d stage-1 flag: supervisor requests enabled (uAPI bit 0).
pub const VTD_S1_SRE: u64 = 1 << 0;
/// VT-d stage-1 flag: extended access flag enabled (uAPI bit 1).
pub const VTD_S1_EAFE: u64 = 1 << 1;
/// VT-d stage-1 flag: write protect enabled (uAPI bit 2).
pub const VTD_S1_WPE: u64 = 1 << 2;
/// HW queues per vIOMMU (the selftest mock's maximum).
pub const MAX_HW_QUEUES: u32 = 2;
const ARENA_BASE: u64 = 0x8000_0000_0000;
const ARENA_FRAMES: usize = 4096;
const IOTLB_CAPACITY: usize = 4096;
/// IO page tables translate 48-bit IOVAs; the rest is reserved per HWPT.
const APERTURE_LAST: u64 = (1 << 48) - 1;

/// Flags of a map or copy (IOMMU_IOAS_MAP_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapFlags {
    /// Use the given IOVA instead of allocating one.
    pub fixed_iova: bool,
    /// Device reads allowed.
    pub read: bool,
    /// Device writes allowed.
    pub write: bool,
}

impl MapFlags {
    /// Read and write at an allocated IOVA.
    pub const fn rw() -> Self {
        Self { fixed_iova: false, read: true, write: true }
    }

    /// The same flags at a fixed IOVA.
    pub const fn fixed(mut self) -> Self {
        self.fixed_iova = true;
        self
    }
}

/// Host memory an area maps.
#[derive(Debug, Clone)]
pub enum Backing {
    /// A user address range of this process (like iommufd's `user_va`).
    User(Hva),
    /// Bytes of a memvisor host mapping starting at `offset` (guest RAM).
    Region {
        /// The mapping.
        region: Arc<dyn MappedRegion>,
        /// Byte offset into it.
        offset: u64,
    },
}

/// An inclusive IOVA range, as iommufd reports it (`start..=last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

/// VT-d stage-1 data of a nested HWPT (`struct iommu_hwpt_vtd_s1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdS1 {
    /// [`VTD_S1_SRE`] | [`VTD_S1_EAFE`] | [`VTD_S1_WPE`].
    pub flags: u64,
    /// Guest-physical address of the stage-1 root table.
    pub pgtbl_addr: u64,
    /// Stage-1 input width: 48 (4-level) or 57 (5-level).
    pub addr_width: u32,
}

/// What kind of HWPT to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwptKind {
    /// A paging HWPT on the IOAS `pt_id`.
    Paging {
        /// May be the parent of nested HWPTs and vIOMMUs.
        nest_parent: bool,
    },
    /// A nested HWPT on the nest-parent HWPT `pt_id`.
    Nested(VtdS1),
}

/// Notified when an IOAS range an access pinned is being unmapped; the
/// implementation must call [`Iommufd::access_unpin_pages`] for its pins
/// there (Linux `iommufd_access_ops::unmap`).
pub trait AccessOps: Send + Sync {
    /// `iova..iova+length` of the access's IOAS is being unmapped.
    fn unmap(&self, ictx: &Iommufd, access: Id, iova: u64, length: u64);
}

/// A DMA direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaAccess {
    /// Device reads memory.
    Read,
    /// Device writes memory.
    Write,
}

/// A run of host memory a DMA reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSegment {
    /// Host virtual address.
    pub hva: Hva,
    /// Bytes.
    pub len: u64,
}

/// Why a DMA translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaFault {
    /// Unknown device, or nothing attached at this PASID.
    NotAttached,
    /// Zero length or the range overflows.
    BadRange,
    /// The IO page table walk faulted at `iova`.
    Walk {
        /// Faulting IOVA.
        iova: u64,
        /// The walk's fault.
        fault: Fault,
    },
}

/// An in-progress host change over a range; pins over it fail with EBUSY
/// until it is dropped.
#[derive(Debug)]
pub struct HostChange<'a> {
    ictx: &'a Iommufd,
    id: u64,
}

impl Drop for HostChange<'_> {
    fn drop(&mut self) {
        self.ictx.lock().host_changes.remove(&self.id);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prot {
    read: bool,
    write: bool,
}

struct Pages {
    backing: Backing,
    /// Page-aligned host address of page 0.
    base: u64,
    npages: u64,
    pins: PinCounts,
    refs: u32,
}

#[derive(Debug, Clone)]
struct Area {
    last: u64,
    pages: u64,
    /// Byte offset of the area's first IOVA inside its pages.
    start_byte: u64,
    prot: Prot,
    prevent_access: bool,
    num_accesses: u32,
    num_locks: u32,
    domain_pinned: bool,
}

#[derive(Default)]
struct Ioas {
    areas: BTreeMap<u64, Area>,
    allowed: Vec<IovaRange>,
    reserved: Vec<(IovaRange, u64)>,
    iova_alignment: u64,
    hwpts: Vec<Id>,
    accesses: Vec<Id>,
}

type IoMapper = Mapper<SecondStage, Arena<Hpa>, ArenaFrames<Hpa>>;

enum HwptData {
    Paging { ioas: Id, nest_parent: bool, mapper: Box<IoMapper>, auto: bool },
    Nested { parent: Id, s1: VtdS1 },
}

struct Hwpt {
    data: HwptData,
    devices: u32,
    users: u32,
}

struct AccessObj {
    ioas: Id,
    ops: Option<Arc<dyn AccessOps>>,
    pins: u64,
}

struct Viommu {
    hwpt: Id,
    vdevices: BTreeSet<u64>,
    queues: BTreeMap<u32, Id>,
}

enum Obj {
    Ioas(Ioas),
    Hwpt(Hwpt),
    Device { attached: BTreeMap<u32, Id>, users: u32 },
    Access(AccessObj),
    Viommu(Viommu),
    Vdevice { viommu: Id, dev: Id, virt_id: u64 },
    HwQueue { viommu: Id, index: u32, iova: u64, length: u64, access: Id },
}

#[derive(Clone, Copy)]
struct TlbEntry {
    hwpt: Id,
    hva_page: u64,
    write: bool,
}

#[derive(Default)]
struct State {
    next_id: Id,
    objects: BTreeMap<Id, Obj>,
    pages: BTreeMap<u64, Pages>,
    next_pages: u64,
    locked_pages: u64,
    locked_limit: Option<u64>,
    iotlb: HashMap<(Id, u32, u64), TlbEntry>,
    host_changes: BTreeMap<u64, AddrRange<Hva>>,
    next_change: u64,
}

/// The iommufd context: every object, the IOTLB and the pin accounting.
pub struct Iommufd {
    state: Mutex<State>,
}

impl std::fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommufd").field("objects", &self.lock().objects.len()).finish()
    }
}

impl Default for Iommufd {
    fn default() -> Self {
        Self::new()
    }
}

fn last_of(iova: u64, length: u64) -> Result<u64> {
    let l = length.checked_sub(1).ok_or(Error::Inval("zero length"))?;
    iova.checked_add(l).ok_or(Error::Overflow)
}

fn overlaps(a: IovaRange, start: u64, last: u64) -> bool {
    a.start <= last && start <= a.last
}

impl Ioas {
    /// Key of the first area intersecting `start..=last`.
    fn first_area(&self, start: u64, last: u64) -> Option<u64> {
        if let Some((&k, a)) = self.areas.range(..=start).next_back()
            && a.last >= start
        {
            return Some(k);
        }
        self.areas.range(start..=last).next().map(|(&k, _)| k)
    }

    fn area_containing(&self, iova: u64) -> Option<u64> {
        self.areas.range(..=iova).next_back().filter(|(_, a)| a.last >= iova).map(|(&k, _)| k)
    }

    /// Effective alignment: the user's, raised to a page while a domain is attached.
    fn align(&self) -> u64 {
        if self.hwpts.is_empty() { self.iova_alignment } else { self.iova_alignment.max(PAGE) }
    }

    fn reserved_hit(&self, start: u64, last: u64) -> bool {
        self.reserved.iter().any(|(r, _)| overlaps(*r, start, last))
    }

    /// The lowest aligned start (keeping `page_offset`) of `length` bytes
    /// inside the hole `start..=last` that avoids every reserved range.
    fn fit_in_hole(&self, start: u64, last: u64, length: u64, align: u64, page_offset: u64) -> Option<u64> {
        let mut cur = start;
        loop {
            let c = cur.checked_add(align - 1).map(|v| (v & !(align - 1)) | page_offset)?;
            let l = c.checked_add(length - 1)?;
            if c > last || l > last {
                return None;
            }
            let blocker = self.reserved.iter().filter(|(r, _)| overlaps(*r, c, l)).map(|(r, _)| r.last).max();
            match blocker {
                None => return Some(c),
                Some(b) => cur = b.checked_add(1)?,
            }
        }
    }

    /// Linux `iopt_alloc_iova`.
    fn alloc_iova(&self, addr: u64, length: u64) -> Result<u64> {
        if length == 0 || length >= u64::MAX / 2 {
            return Err(Error::Overflow);
        }
        // iopt_alloc_iova(): the length must be a multiple of the IOAS
        // alignment (a page while a domain is attached), else EINVAL.
        if length & (self.align() - 1) != 0 {
            return Err(Error::Inval("length not a multiple of the IOAS alignment"));
        }
        let page_offset = addr % PAGE;
        let pow = length.checked_next_power_of_two().ok_or(Error::Overflow)?;
        let mut align = if addr == 0 { pow } else { pow.min(1u64 << addr.trailing_zeros()) };
        align = align.min(HPAGE);
        if align < self.align() {
            return Err(Error::Inval("allocation alignment below the IOAS alignment"));
        }
        let spans: Vec<IovaRange> = if self.allowed.is_empty() {
            vec![IovaRange { start: PAGE, last: u64::MAX - PAGE }]
        } else {
            self.allowed
                .iter()
                .filter_map(|r| {
                    let s = r.start.max(PAGE);
                    let l = r.last.min(u64::MAX - PAGE);
                    (s <= l).then_some(IovaRange { start: s, last: l })
                })
                .collect()
        };
        // One ordered pass over the areas from the start of each span: the
        // holes between them, minus reserved ranges (Linux's double span).
        for span in spans {
            let mut cur = span.start;
            if let Some(k) = self.area_containing(cur) {
                match self.areas.get(&k).and_then(|a| a.last.checked_add(1)) {
                    Some(n) => cur = n,
                    None => continue,
                }
            }
            let mut areas = self.areas.range(cur..);
            while cur <= span.last {
                let (hole_last, next) = match areas.next() {
                    Some((&k, a)) if k <= span.last => (k.checked_sub(1), a.last.checked_add(1)),
                    _ => (Some(span.last), None),
                };
                if let Some(hole_last) = hole_last
                    && hole_last >= cur
                    && let Some(iova) = self.fit_in_hole(cur, hole_last, length, align, page_offset)
                {
                    return Ok(iova);
                }
                match next {
                    Some(n) => cur = n,
                    None => break,
                }
            }
        }
        Err(Error::NoSpace)
    }
}

impl State {
    fn new_id(&mut self) -> Id {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        while self.objects.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        self.next_id
    }

    fn ioas(&self, id: Id) -> Result<&Ioas> {
        match self.objects.get(&id) {
            Some(Obj::Ioas(i)) => Ok(i),
            _ => Err(Error::NoEnt(id)),
        }
    }

    fn ioas_mut(&mut self, id: Id) -> Result<&mut Ioas> {
        match self.objects.get_mut(&id) {
            Some(Obj::Ioas(i)) => Ok(i),
            _ => Err(Error::NoEnt(id)),
        }
    }

    fn hwpt(&self, id: Id) -> Result<&Hwpt> {
        match self.objects.get(&id) {
            Some(Obj::Hwpt(h)) => Ok(h),
            _ => Err(Error::NoEnt(id)),
        }
    }

    fn hwpt_mut(&mut self, id: Id) -> Result<&mut Hwpt> {
        match self.objects.get_mut(&id) {
            Some(Obj::Hwpt(h)) => Ok(h),
            _ => Err(Error::NoEnt(id)),
        }
    }

    fn page_range(&self, area: &Area, iova: u64, last: u64, area_iova: u64) -> (u64, u64) {
        let first_byte = area.start_byte + (iova - area_iova);
        let last_byte = area.start_byte + (last - area_iova);
        (first_byte / PAGE, last_byte / PAGE + 1)
    }

    /// Pins pages `[start, end)` of `pages`, charging the locked limit.
    fn pages_pin(&mut self, pages: u64, start: u64, end: u64) -> Result<()> {
        let base = {
            let p = self.pages.get(&pages).ok_or(Error::NoEnt(0))?;
            let newly = p.pins.unpinned_in(start, end);
            if let Some(limit) = self.locked_limit
                && self.locked_pages.checked_add(newly).is_none_or(|t| t > limit)
            {
                return Err(Error::NoMem);
            }
            p.base
        };
        let lo = base + start * PAGE;
        let hi = base + end * PAGE;
        if self.host_changes.values().any(|r| r.start().raw() < hi && lo < r.end().raw()) {
            return Err(Error::Busy("host change in progress over the pages"));
        }
        if let Some(p) = self.pages.get_mut(&pages) {
            self.locked_pages += p.pins.add(start, end);
        }
        Ok(())
    }

    fn pages_unpin(&mut self, pages: u64, start: u64, end: u64) {
        if let Some(p) = self.pages.get_mut(&pages) {
            self.locked_pages = self.locked_pages.saturating_sub(p.pins.remove(start, end));
        }
    }

    fn area_whole_pages(area: &Area, area_iova: u64) -> (u64, u64) {
        let last_byte = area.start_byte + (area.last - area_iova);
        (area.start_byte / PAGE, last_byte / PAGE + 1)
    }

    /// Maps one area into a paging HWPT's table.
    fn domain_map(&mut self, hwpt: Id, area_iova: u64, area: &Area) -> Result<()> {
        let base = self.pages.get(&area.pages).map(|p| p.base).ok_or(Error::NoEnt(0))?;
        let (s, e) = Self::area_whole_pages(area, area_iova);
        let iova = area_iova & !(PAGE - 1);
        let len = (e - s) * PAGE;
        let attrs = SecondStageAttrs {
            read: area.prot.read,
            write: area.prot.write,
            execute: false,
            ..SecondStageAttrs::rwx()
        };
        if let Ok(Hwpt { data: HwptData::Paging { mapper, .. }, .. }) = self.hwpt_mut(hwpt) {
            let range = AddrRange::from_len(Iova::new(iova), len).map_err(|_| Error::Overflow)?;
            mapper.map(range, Hpa::new(base + s * PAGE), attrs, PageSize::Size1G)?;
        }
        Ok(())
    }

    fn domain_unmap(&mut self, hwpt: Id, area_iova: u64, area: &Area) {
        let (s, e) = Self::area_whole_pages(area, area_iova);
        let iova = area_iova & !(PAGE - 1);
        if let Ok(Hwpt { data: HwptData::Paging { mapper, .. }, .. }) = self.hwpt_mut(hwpt)
            && let Ok(range) = AddrRange::from_len(Iova::new(iova), (e - s) * PAGE)
            && let Ok(ch) = mapper.unmap(range)
        {
            mapper.release(ch.freed_tables);
        }
    }

    /// Removes an area entirely: domains, storage pin, pages reference, IOTLB.
    fn remove_area(&mut self, ioas: Id, key: u64) -> Option<u64> {
        let (area, hwpts) = {
            let i = self.ioas_mut(ioas).ok()?;
            (i.areas.remove(&key)?, i.hwpts.clone())
        };
        for h in &hwpts {
            self.domain_unmap(*h, key, &area);
        }
        if area.domain_pinned {
            let (s, e) = Self::area_whole_pages(&area, key);
            self.pages_unpin(area.pages, s, e);
        }
        self.pages_put(area.pages);
        self.iotlb_drop_ioas(ioas, key, area.last);
        Some(area.last - key + 1)
    }

    fn pages_put(&mut self, id: u64) {
        if let Some(p) = self.pages.get_mut(&id) {
            p.refs -= 1;
            if p.refs == 0 {
                self.pages.remove(&id);
            }
        }
    }

    /// Inserts an area, filling every attached domain (pin + map).
    fn insert_area(&mut self, ioas: Id, iova: u64, mut area: Area) -> Result<()> {
        let hwpts = self.ioas(ioas)?.hwpts.clone();
        if !hwpts.is_empty() {
            let (s, e) = Self::area_whole_pages(&area, iova);
            self.pages_pin(area.pages, s, e)?;
            area.domain_pinned = true;
            for (n, h) in hwpts.iter().enumerate() {
                if let Err(err) = self.domain_map(*h, iova, &area) {
                    for done in &hwpts[..n] {
                        self.domain_unmap(*done, iova, &area);
                    }
                    self.pages_unpin(area.pages, s, e);
                    return Err(err);
                }
            }
        }
        if let Some(p) = self.pages.get_mut(&area.pages) {
            p.refs += 1;
        }
        self.ioas_mut(ioas)?.areas.insert(iova, area);
        Ok(())
    }

    fn check_fixed(&self, ioas: Id, iova: u64, length: u64) -> Result<u64> {
        let i = self.ioas(ioas)?;
        if iova & (i.align() - 1) != 0 {
            return Err(Error::Inval("IOVA misaligned"));
        }
        let last = last_of(iova, length)?;
        if i.reserved_hit(iova, last) {
            return Err(Error::Inval("IOVA range is reserved"));
        }
        if i.first_area(iova, last).is_some() {
            return Err(Error::Exists);
        }
        Ok(last)
    }

    /// Linux `iopt_pin_pages` (seed 003).
    fn pin(&mut self, ioas: Id, iova: u64, length: u64, write: bool, owner: bool) -> Result<Vec<Hva>> {
        if length == 0 {
            return Err(Error::Inval("zero length"));
        }
        let last_iova = iova.checked_add(length - 1).ok_or(Error::Overflow)?;
        let mut done: Vec<(u64, u64)> = Vec::new();
        let mut out = Vec::new();
        let mut cur = iova;
        let result = (|| -> Result<()> {
            loop {
                let i = self.ioas(ioas)?;
                let Some(key) = i.area_containing(cur) else { return Err(Error::NotMapped { iova, length }) };
                let area = i.areas.get(&key).cloned().ok_or(Error::NoEnt(0))?;
                let last = last_iova.min(area.last);
                let is_done = area.last >= last_iova;
                let start_byte = area.start_byte + (cur - key);
                let end_byte = area.start_byte + (area.last - key);
                if area.prevent_access
                    || !start_byte.is_multiple_of(PAGE)
                    || (!is_done && end_byte % PAGE != PAGE - 1)
                {
                    return Err(Error::Inval("area prevents access or is not page aligned"));
                }
                if !(if write { area.prot.write } else { area.prot.read }) {
                    return Err(Error::Perm);
                }
                let (s, e) = self.page_range(&area, cur, last, key);
                self.pages_pin(area.pages, s, e)?;
                let base = self.pages.get(&area.pages).map(|p| p.base).unwrap_or(0);
                out.extend((s..e).map(|p| Hva::new(base + p * PAGE)));
                if let Some(a) = self.ioas_mut(ioas)?.areas.get_mut(&key) {
                    if owner {
                        a.num_locks += 1;
                    } else {
                        a.num_accesses += 1;
                    }
                }
                done.push((cur, last));
                if is_done {
                    return Ok(());
                }
                cur = area.last + 1;
            }
        })();
        match result {
            Ok(()) => Ok(out),
            Err(e) => {
                for (s, l) in done {
                    self.unpin_one(ioas, s, l, owner);
                }
                Err(e)
            }
        }
    }

    fn unpin_one(&mut self, ioas: Id, cur: u64, last: u64, owner: bool) {
        let Ok(i) = self.ioas_mut(ioas) else { return };
        let Some(key) = i.area_containing(cur) else { return };
        let Some(a) = i.areas.get_mut(&key) else { return };
        if owner {
            a.num_locks = a.num_locks.saturating_sub(1);
        } else {
            a.num_accesses = a.num_accesses.saturating_sub(1);
        }
        let area = a.clone();
        let (s, e) = self.page_range(&area, cur, last, key);
        self.pages_unpin(area.pages, s, e);
    }

    /// Linux `iopt_unpin_pages`.
    fn unpin(&mut self, ioas: Id, iova: u64, length: u64, owner: bool) {
        let Ok(last_iova) = last_of(iova, length) else { return };
        let mut cur = iova;
        loop {
            let Ok(i) = self.ioas(ioas) else { return };
            let Some(key) = i.area_containing(cur) else { return };
            let Some(area_last) = i.areas.get(&key).map(|a| a.last) else { return };
            let last = last_iova.min(area_last);
            self.unpin_one(ioas, cur, last, owner);
            if area_last >= last_iova {
                return;
            }
            cur = area_last + 1;
        }
    }

    fn iotlb_drop_ioas(&mut self, ioas: Id, start: u64, last: u64) {
        if self.iotlb.is_empty() {
            return;
        }
        let hwpt_ioas: HashMap<Id, (Id, bool)> = self
            .objects
            .iter()
            .filter_map(|(&id, o)| match o {
                Obj::Hwpt(Hwpt { data: HwptData::Paging { ioas, .. }, .. }) => Some((id, (*ioas, false))),
                Obj::Hwpt(Hwpt { data: HwptData::Nested { parent, .. }, .. }) => {
                    match self.objects.get(parent) {
                        Some(Obj::Hwpt(Hwpt { data: HwptData::Paging { ioas, .. }, .. })) => {
                            Some((id, (*ioas, true)))
                        }
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        self.iotlb.retain(|&(_, _, page), e| match hwpt_ioas.get(&e.hwpt) {
            Some(&(i, nested)) if i == ioas => {
                let hit = page <= last && start <= page | (PAGE - 1);
                !(nested || hit)
            }
            _ => true,
        });
    }
}

impl Iommufd {
    /// A context without a locked-memory limit.
    pub fn new() -> Self {
        Self { state: Mutex::new(State::default()) }
    }

    /// A context whose pins may lock at most `pages` 4 KiB pages (RLIMIT_MEMLOCK).
    pub fn with_locked_limit(pages: Option<u64>) -> Self {
        let ictx = Self::new();
        ictx.lock().locked_limit = pages;
        ictx
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pages currently pinned (each page once, however many pins it has).
    pub fn locked_pages(&self) -> u64 {
        self.lock().locked_pages
    }

    /// Allocates an empty IOAS.
    pub fn ioas_alloc(&self) -> Id {
        let mut st = self.lock();
        let id = st.new_id();
        st.objects.insert(id, Obj::Ioas(Ioas { iova_alignment: 1, ..Ioas::default() }));
        id
    }

    /// Maps `length` bytes of `backing` at `iova` (with `fixed_iova`) or at an
    /// allocated IOVA; returns the IOVA.
    pub fn ioas_map(
        &self,
        ioas: Id,
        flags: MapFlags,
        iova: u64,
        backing: Backing,
        length: u64,
    ) -> Result<u64> {
        if !flags.read && !flags.write {
            return Err(Error::Inval("neither read nor write"));
        }
        if length == 0 {
            return Err(Error::Inval("zero length"));
        }
        let addr = match &backing {
            Backing::User(h) => h.raw(),
            Backing::Region { region, offset } => {
                let end = offset.checked_add(length).ok_or(Error::Overflow)?;
                if end > region.size() {
                    return Err(Error::Fault("range beyond the host mapping"));
                }
                region.hva().raw().checked_add(*offset).ok_or(Error::Overflow)?
            }
        };
        let end = addr.checked_add(length).ok_or(Error::Overflow)?;
        let base = addr & !(PAGE - 1);
        let npages = end.checked_add(PAGE - 1).ok_or(Error::Overflow)? / PAGE - base / PAGE;
        let mut st = self.lock();
        let iova = if flags.fixed_iova {
            st.check_fixed(ioas, iova, length)?;
            iova
        } else {
            st.ioas(ioas)?.alloc_iova(addr, length)?
        };
        let pid = st.next_pages;
        st.next_pages += 1;
        st.pages.insert(pid, Pages { backing, base, npages, pins: PinCounts::default(), refs: 0 });
        let area = Area {
            last: iova + (length - 1),
            pages: pid,
            start_byte: addr - base,
            prot: Prot { read: flags.read, write: flags.write },
            prevent_access: false,
            num_accesses: 0,
            num_locks: 0,
            domain_pinned: false,
        };
        if let Err(e) = st.insert_area(ioas, iova, area) {
            st.pages.remove(&pid);
            return Err(e);
        }
        Ok(iova)
    }

    /// Maps into `dst` the pages `src` maps at `src_iova..+length` (shared,
    /// not re-pinned); a hole in the source → ENOENT.
    pub fn ioas_copy(
        &self,
        dst: Id,
        src: Id,
        flags: MapFlags,
        dst_iova: u64,
        src_iova: u64,
        length: u64,
    ) -> Result<u64> {
        if !flags.read && !flags.write {
            return Err(Error::Inval("neither read nor write"));
        }
        let src_last = last_of(src_iova, length)?;
        let mut st = self.lock();
        st.ioas(dst)?;
        // Collect the source pieces: (pages, start_byte, len).
        let mut pieces = Vec::new();
        let mut cur = src_iova;
        loop {
            let i = st.ioas(src)?;
            let key = i.area_containing(cur).ok_or(Error::NotMapped { iova: src_iova, length })?;
            let a = i.areas.get(&key).ok_or(Error::NoEnt(src))?;
            let last = src_last.min(a.last);
            pieces.push((a.pages, a.start_byte + (cur - key), last - cur + 1));
            if a.last >= src_last {
                break;
            }
            cur = a.last + 1;
        }
        let first_addr =
            pieces.first().and_then(|(p, b, _)| st.pages.get(p).map(|pg| pg.base + b)).unwrap_or(0);
        let iova = if flags.fixed_iova {
            st.check_fixed(dst, dst_iova, length)?;
            dst_iova
        } else {
            st.ioas(dst)?.alloc_iova(first_addr, length)?
        };
        let mut at = iova;
        let mut inserted = Vec::new();
        for (pages, start_byte, len) in pieces {
            let area = Area {
                last: at + (len - 1),
                pages,
                start_byte,
                prot: Prot { read: flags.read, write: flags.write },
                prevent_access: false,
                num_accesses: 0,
                num_locks: 0,
                domain_pinned: false,
            };
            if let Err(e) = st.insert_area(dst, at, area) {
                for k in inserted {
                    st.remove_area(dst, k);
                }
                return Err(e);
            }
            inserted.push(at);
            at += len;
        }
        Ok(iova)
    }

    /// Unmaps whole areas in `iova..iova+length`; `(0, u64::MAX)` unmaps
    /// everything (succeeding when empty). Returns the bytes unmapped.
    pub fn ioas_unmap(&self, ioas: Id, iova: u64, length: u64) -> Result<u64> {
        if iova == 0 && length == u64::MAX {
            return match self.unmap_range(ioas, 0, u64::MAX) {
                Err(Error::NotMapped { .. }) => Ok(0),
                r => r,
            };
        }
        let last = last_of(iova, length)?;
        self.unmap_range(ioas, iova, last)
    }

    /// Linux `iopt_unmap_iova_range`.
    fn unmap_range(&self, ioas: Id, first: u64, last: u64) -> Result<u64> {
        let mut unmapped: u64 = 0;
        let mut tries = 0;
        let mut start = first;
        loop {
            let mut st = self.lock();
            let i = st.ioas(ioas)?;
            let Some(key) = i.first_area(start, last) else { break };
            let area = i.areas.get(&key).cloned().ok_or(Error::NoEnt(ioas))?;
            if area.num_locks > 0 {
                return Err(Error::Busy("area is pinned by an internal access"));
            }
            if key < start || area.last > last {
                return Err(Error::NotMapped {
                    iova: first,
                    length: last.wrapping_sub(first).wrapping_add(1),
                });
            }
            if key != start {
                tries = 0;
            }
            if area.num_accesses > 0 {
                start = key;
                let accesses = i.accesses.clone();
                if let Some(a) = st.ioas_mut(ioas)?.areas.get_mut(&key) {
                    a.prevent_access = true;
                }
                let ops: Vec<(Id, Arc<dyn AccessOps>)> = accesses
                    .iter()
                    .filter_map(|id| match st.objects.get(id) {
                        Some(Obj::Access(AccessObj { ops: Some(o), .. })) => Some((*id, o.clone())),
                        _ => None,
                    })
                    .collect();
                drop(st);
                for (id, o) in ops {
                    o.unmap(self, id, key, area.last - key + 1);
                }
                // Something is not responding to unmap requests.
                tries += 1;
                if tries > MAX_UNMAP_TRIES {
                    return Err(Error::Deadlock);
                }
                continue;
            }
            unmapped = unmapped.saturating_add(st.remove_area(ioas, key).unwrap_or(0));
        }
        if unmapped == 0 {
            return Err(Error::NotMapped { iova: first, length: last.wrapping_sub(first).wrapping_add(1) });
        }
        Ok(unmapped)
    }

    /// Replaces the allowed ranges (automatic allocation stays inside them);
    /// one overlapping a reserved range → EADDRINUSE.
    pub fn ioas_allow_iovas(&self, ioas: Id, ranges: &[IovaRange]) -> Result<()> {
        let mut st = self.lock();
        let i = st.ioas_mut(ioas)?;
        for r in ranges {
            if r.start > r.last {
                return Err(Error::Inval("range start after last"));
            }
            if i.reserved_hit(r.start, r.last) {
                return Err(Error::AddrInUse);
            }
        }
        i.allowed = ranges.to_vec();
        Ok(())
    }

    /// Reserves `range` for `owner` (reserved ranges may overlap each other);
    /// over an area or an allowed range → EADDRINUSE.
    pub fn ioas_reserve(&self, ioas: Id, owner: u64, range: IovaRange) -> Result<()> {
        let mut st = self.lock();
        let i = st.ioas_mut(ioas)?;
        if range.start > range.last {
            return Err(Error::Inval("range start after last"));
        }
        if i.first_area(range.start, range.last).is_some()
            || i.allowed.iter().any(|a| overlaps(*a, range.start, range.last))
        {
            return Err(Error::AddrInUse);
        }
        i.reserved.push((range, owner));
        Ok(())
    }

    /// Drops every reserved range of `owner`.
    pub fn ioas_unreserve(&self, ioas: Id, owner: u64) -> Result<()> {
        let mut st = self.lock();
        st.ioas_mut(ioas)?.reserved.retain(|(_, o)| *o != owner);
        Ok(())
    }

    /// The usable IOVA ranges (allowed, or everything, minus reserved); more
    /// than `capacity` → [`Error::MsgSize`] (EMSGSIZE) with the needed count.
    pub fn ioas_iova_ranges(&self, ioas: Id, capacity: usize) -> Result<Vec<IovaRange>> {
        let st = self.lock();
        let i = st.ioas(ioas)?;
        let mut base = if i.allowed.is_empty() {
            vec![IovaRange { start: 0, last: u64::MAX }]
        } else {
            i.allowed.clone()
        };
        base.sort_by_key(|r| r.start);
        let mut out = Vec::new();
        for r in base {
            let mut pieces = vec![r];
            for (res, _) in &i.reserved {
                pieces = pieces
                    .into_iter()
                    .flat_map(|p| {
                        if !overlaps(*res, p.start, p.last) {
                            return vec![p];
                        }
                        let mut v = Vec::new();
                        if p.start < res.start {
                            v.push(IovaRange { start: p.start, last: res.start - 1 });
                        }
                        if res.last < p.last {
                            v.push(IovaRange { start: res.last + 1, last: p.last });
                        }
                        v
                    })
                    .collect();
            }
            out.extend(pieces);
        }
        if out.len() > capacity {
            return Err(Error::MsgSize { needed: out.len() });
        }
        Ok(out)
    }

    /// Sets the IOAS's IOVA alignment (default 1; a page while a HWPT is
    /// attached); an existing area not aligned to it → EADDRINUSE; not a
    /// power of two → EINVAL.
    pub fn set_iova_alignment(&self, ioas: Id, alignment: u64) -> Result<()> {
        if !alignment.is_power_of_two() {
            return Err(Error::Inval("alignment"));
        }
        let mut st = self.lock();
        let i = st.ioas_mut(ioas)?;
        let mask = alignment - 1;
        if i.areas.iter().any(|(&k, a)| k & mask != 0 || (a.last - k + 1) & mask != 0) {
            return Err(Error::AddrInUse);
        }
        i.iova_alignment = alignment;
        Ok(())
    }

    /// Allocates a HWPT on `pt_id` (an IOAS for paging, a nest-parent HWPT
    /// for nested).
    pub fn hwpt_alloc(&self, pt_id: Id, kind: HwptKind) -> Result<Id> {
        let mut st = self.lock();
        Self::hwpt_alloc_locked(&mut st, pt_id, kind, false)
    }

    fn hwpt_alloc_locked(st: &mut State, pt_id: Id, kind: HwptKind, auto: bool) -> Result<Id> {
        match kind {
            HwptKind::Paging { nest_parent } => {
                let i = st.ioas(pt_id)?;
                if i.first_area(APERTURE_LAST + 1, u64::MAX).is_some()
                    || i.areas.iter().any(|(&k, a)| k % PAGE != 0 || (a.last - k + 1) % PAGE != 0)
                {
                    return Err(Error::AddrInUse);
                }
                let arena = Arena::new(Hpa::new(ARENA_BASE), ARENA_FRAMES);
                let frames = arena.frame_allocator();
                let mapper = Mapper::new(SecondStage::four_level(), arena, frames)?;
                let id = st.new_id();
                st.objects.insert(
                    id,
                    Obj::Hwpt(Hwpt {
                        data: HwptData::Paging { ioas: pt_id, nest_parent, mapper: Box::new(mapper), auto },
                        devices: 0,
                        users: 0,
                    }),
                );
                // Fill: pin every area once (storage domain) and map it.
                let areas: Vec<(u64, Area)> =
                    st.ioas(pt_id)?.areas.iter().map(|(k, a)| (*k, a.clone())).collect();
                let first = st.ioas(pt_id)?.hwpts.is_empty();
                let mut res = Ok(());
                let mut pinned = Vec::new();
                for (k, a) in &areas {
                    if first {
                        let (s, e) = State::area_whole_pages(a, *k);
                        if let Err(e2) = st.pages_pin(a.pages, s, e) {
                            res = Err(e2);
                            break;
                        }
                        pinned.push((*k, a.clone()));
                    }
                    if let Err(e2) = st.domain_map(id, *k, a) {
                        res = Err(e2);
                        break;
                    }
                }
                if let Err(e) = res {
                    for (k, a) in pinned {
                        let (s, en) = State::area_whole_pages(&a, k);
                        st.pages_unpin(a.pages, s, en);
                    }
                    st.objects.remove(&id);
                    return Err(e);
                }
                let i = st.ioas_mut(pt_id)?;
                if first {
                    for a in i.areas.values_mut() {
                        a.domain_pinned = true;
                    }
                }
                i.hwpts.push(id);
                i.reserved.push((IovaRange { start: APERTURE_LAST + 1, last: u64::MAX }, u64::from(id)));
                Ok(id)
            }
            HwptKind::Nested(s1) => {
                match st.hwpt(pt_id)?.data {
                    HwptData::Paging { nest_parent: true, .. } => {}
                    _ => return Err(Error::Inval("parent is not a nest-parent paging HWPT")),
                }
                if s1.flags & !(VTD_S1_SRE | VTD_S1_EAFE | VTD_S1_WPE) != 0 {
                    return Err(Error::Inval("unknown VT-d stage-1 flags"));
                }
                if s1.addr_width != 48 && s1.addr_width != 57 {
                    return Err(Error::Inval("stage-1 address width"));
                }
                if s1.pgtbl_addr % PAGE != 0 {
                    return Err(Error::Inval("stage-1 table pointer misaligned"));
                }
                st.hwpt_mut(pt_id)?.users += 1;
                let id = st.new_id();
                st.objects.insert(
                    id,
                    Obj::Hwpt(Hwpt { data: HwptData::Nested { parent: pt_id, s1 }, devices: 0, users: 0 }),
                );
                Ok(id)
            }
        }
    }

    /// Invalidates cached translations of a HWPT (for nested: after the guest
    /// changed its stage-1 table); `None` invalidates all.
    pub fn hwpt_invalidate(&self, hwpt: Id, range: Option<IovaRange>) -> Result<()> {
        let mut st = self.lock();
        st.hwpt(hwpt)?;
        st.iotlb.retain(|&(_, _, page), e| {
            e.hwpt != hwpt || range.is_some_and(|r| !(page <= r.last && r.start <= page | (PAGE - 1)))
        });
        Ok(())
    }

    /// Adds a (mock) device.
    pub fn device_add(&self) -> Id {
        let mut st = self.lock();
        let id = st.new_id();
        st.objects.insert(id, Obj::Device { attached: BTreeMap::new(), users: 0 });
        id
    }

    /// Attaches `dev` at `pasid` to `pt_id` (a HWPT, or an IOAS: then a
    /// paging HWPT is created for it automatically). Returns the HWPT id.
    pub fn device_attach(&self, dev: Id, pasid: u32, pt_id: Id) -> Result<Id> {
        let mut st = self.lock();
        match st.objects.get(&dev) {
            Some(Obj::Device { attached, .. }) if attached.contains_key(&pasid) => {
                return Err(Error::Busy("already attached"));
            }
            Some(Obj::Device { .. }) => {}
            _ => return Err(Error::NoEnt(dev)),
        }
        let hwpt = Self::resolve_pt(&mut st, pt_id)?;
        Self::set_attach(&mut st, dev, pasid, Some(hwpt));
        Ok(hwpt)
    }

    /// Atomically moves `dev` at `pasid` to `pt_id`: translations switch in
    /// one step under the context lock; the old HWPT's cached translations
    /// for the device are dropped before this returns.
    pub fn device_replace(&self, dev: Id, pasid: u32, pt_id: Id) -> Result<Id> {
        let mut st = self.lock();
        match st.objects.get(&dev) {
            Some(Obj::Device { attached, .. }) if attached.contains_key(&pasid) => {}
            Some(Obj::Device { .. }) => return Err(Error::Inval("not attached")),
            _ => return Err(Error::NoEnt(dev)),
        }
        let hwpt = Self::resolve_pt(&mut st, pt_id)?;
        Self::set_attach(&mut st, dev, pasid, Some(hwpt));
        Ok(hwpt)
    }

    /// Detaches `dev` at `pasid`.
    pub fn device_detach(&self, dev: Id, pasid: u32) -> Result<()> {
        let mut st = self.lock();
        match st.objects.get(&dev) {
            Some(Obj::Device { attached, .. }) if attached.contains_key(&pasid) => {}
            Some(Obj::Device { .. }) => return Err(Error::Inval("not attached")),
            _ => return Err(Error::NoEnt(dev)),
        }
        Self::set_attach(&mut st, dev, pasid, None);
        Ok(())
    }

    fn resolve_pt(st: &mut State, pt_id: Id) -> Result<Id> {
        match st.objects.get(&pt_id) {
            Some(Obj::Hwpt(_)) => Ok(pt_id),
            Some(Obj::Ioas(_)) => {
                Self::hwpt_alloc_locked(st, pt_id, HwptKind::Paging { nest_parent: false }, true)
            }
            _ => Err(Error::NoEnt(pt_id)),
        }
    }

    fn set_attach(st: &mut State, dev: Id, pasid: u32, hwpt: Option<Id>) {
        let old = match st.objects.get_mut(&dev) {
            Some(Obj::Device { attached, .. }) => match hwpt {
                Some(h) => attached.insert(pasid, h),
                None => attached.remove(&pasid),
            },
            _ => None,
        };
        if let Some(h) = hwpt
            && let Ok(x) = st.hwpt_mut(h)
        {
            x.devices += 1;
        }
        st.iotlb.retain(|&(d, p, _), _| !(d == dev && p == pasid));
        if let Some(old) = old {
            let auto_unused = match st.hwpt_mut(old) {
                Ok(x) => {
                    x.devices -= 1;
                    matches!(x.data, HwptData::Paging { auto: true, .. }) && x.devices == 0 && x.users == 0
                }
                Err(_) => false,
            };
            if auto_unused {
                Self::destroy_hwpt(st, old);
            }
        }
    }

    fn destroy_hwpt(st: &mut State, id: Id) {
        let Some(Obj::Hwpt(h)) = st.objects.remove(&id) else { return };
        match h.data {
            HwptData::Paging { ioas, .. } => {
                let mut unpin = Vec::new();
                if let Ok(i) = st.ioas_mut(ioas) {
                    i.hwpts.retain(|x| *x != id);
                    i.reserved.retain(|(_, o)| *o != u64::from(id));
                    if i.hwpts.is_empty() {
                        for (k, a) in i.areas.iter_mut() {
                            if a.domain_pinned {
                                a.domain_pinned = false;
                                unpin.push((*k, a.clone()));
                            }
                        }
                    }
                }
                for (k, a) in unpin {
                    let (s, e) = State::area_whole_pages(&a, k);
                    st.pages_unpin(a.pages, s, e);
                }
            }
            HwptData::Nested { parent, .. } => {
                if let Ok(p) = st.hwpt_mut(parent) {
                    p.users -= 1;
                }
            }
        }
        st.iotlb.retain(|_, e| e.hwpt != id);
    }

    /// Creates an access on `ioas` whose `ops` are told of unmaps over its pins.
    pub fn access_create(&self, ioas: Id, ops: Arc<dyn AccessOps>) -> Result<Id> {
        self.access_create_inner(ioas, Some(ops))
    }

    /// Creates an internal access: its pins lock areas (unmap → EBUSY).
    pub fn internal_access_create(&self, ioas: Id) -> Result<Id> {
        self.access_create_inner(ioas, None)
    }

    fn access_create_inner(&self, ioas: Id, ops: Option<Arc<dyn AccessOps>>) -> Result<Id> {
        let mut st = self.lock();
        st.ioas(ioas)?;
        let id = st.new_id();
        st.objects.insert(id, Obj::Access(AccessObj { ioas, ops, pins: 0 }));
        st.ioas_mut(ioas)?.accesses.push(id);
        Ok(id)
    }

    /// Pins `iova..iova+length` for `access` (page-aligned areas, contiguous
    /// coverage); returns the host address of every page.
    pub fn access_pin_pages(&self, access: Id, iova: u64, length: u64, write: bool) -> Result<Vec<Hva>> {
        let mut st = self.lock();
        let (ioas, owner) = match st.objects.get(&access) {
            Some(Obj::Access(a)) => (a.ioas, a.ops.is_none()),
            _ => return Err(Error::NoEnt(access)),
        };
        let pages = st.pin(ioas, iova, length, write, owner)?;
        if let Some(Obj::Access(a)) = st.objects.get_mut(&access) {
            a.pins += 1;
        }
        Ok(pages)
    }

    /// Releases a pin made by [`access_pin_pages`](Self::access_pin_pages) with the same range.
    pub fn access_unpin_pages(&self, access: Id, iova: u64, length: u64) {
        let mut st = self.lock();
        let (ioas, owner) = match st.objects.get_mut(&access) {
            Some(Obj::Access(a)) => {
                a.pins = a.pins.saturating_sub(1);
                (a.ioas, a.ops.is_none())
            }
            _ => return,
        };
        st.unpin(ioas, iova, length, owner);
    }

    /// Creates a vIOMMU for `dev` over the nest-parent paging HWPT `hwpt`.
    pub fn viommu_alloc(&self, dev: Id, hwpt: Id) -> Result<Id> {
        let mut st = self.lock();
        if !matches!(st.objects.get(&dev), Some(Obj::Device { .. })) {
            return Err(Error::NoEnt(dev));
        }
        match st.hwpt(hwpt)?.data {
            HwptData::Paging { nest_parent: true, .. } => {}
            _ => return Err(Error::Inval("vIOMMU needs a nest-parent HWPT")),
        }
        st.hwpt_mut(hwpt)?.users += 1;
        let id = st.new_id();
        st.objects
            .insert(id, Obj::Viommu(Viommu { hwpt, vdevices: BTreeSet::new(), queues: BTreeMap::new() }));
        Ok(id)
    }

    /// Creates a virtual device `virt_id` of `dev` on `viommu` (duplicate → EEXIST).
    pub fn vdevice_alloc(&self, viommu: Id, dev: Id, virt_id: u64) -> Result<Id> {
        let mut st = self.lock();
        match st.objects.get_mut(&dev) {
            Some(Obj::Device { .. }) => {}
            _ => return Err(Error::NoEnt(dev)),
        }
        match st.objects.get_mut(&viommu) {
            Some(Obj::Viommu(v)) => {
                if !v.vdevices.insert(virt_id) {
                    return Err(Error::Duplicate("virtual device id"));
                }
            }
            _ => return Err(Error::NoEnt(viommu)),
        }
        if let Some(Obj::Device { users, .. }) = st.objects.get_mut(&dev) {
            *users += 1;
        }
        let id = st.new_id();
        st.objects.insert(id, Obj::Vdevice { viommu, dev, virt_id });
        Ok(id)
    }

    /// Allocates HW queue `index` of `viommu` over guest memory at `iova`
    /// (an IOVA of the parent's IOAS): pinned by an internal access and
    /// required to be physically contiguous (EFAULT otherwise).
    pub fn hw_queue_alloc(&self, viommu: Id, index: u32, iova: u64, length: u64) -> Result<Id> {
        let mut st = self.lock();
        let v = match st.objects.get(&viommu) {
            Some(Obj::Viommu(v)) => v,
            _ => return Err(Error::NoEnt(viommu)),
        };
        if length == 0 {
            return Err(Error::Inval("zero length"));
        }
        iova.checked_add(length - 1).ok_or(Error::Overflow)?;
        if index >= MAX_HW_QUEUES {
            return Err(Error::Inval("queue index beyond the maximum"));
        }
        if v.queues.contains_key(&index) {
            return Err(Error::Duplicate("queue index"));
        }
        if index > 0 && !v.queues.contains_key(&(index - 1)) {
            return Err(Error::Io);
        }
        let ioas = match &st.hwpt(v.hwpt)?.data {
            HwptData::Paging { ioas, .. } => *ioas,
            HwptData::Nested { .. } => return Err(Error::Inval("vIOMMU parent")),
        };
        let start = iova & !(PAGE - 1);
        let pin_len = (iova - start).checked_add(length).ok_or(Error::Overflow)?.div_ceil(PAGE) * PAGE;
        let hvas = st.pin(ioas, start, pin_len, false, true)?;
        let contiguous = Self::physically_contiguous(&st, &hvas);
        if let Err(e) = contiguous {
            st.unpin(ioas, start, pin_len, true);
            return Err(e);
        }
        let access = st.new_id();
        st.objects.insert(access, Obj::Access(AccessObj { ioas, ops: None, pins: 1 }));
        st.ioas_mut(ioas)?.accesses.push(access);
        let id = st.new_id();
        st.objects.insert(id, Obj::HwQueue { viommu, index, iova: start, length: pin_len, access });
        if let Some(Obj::Viommu(v)) = st.objects.get_mut(&viommu) {
            v.queues.insert(index, id);
        }
        Ok(id)
    }

    fn physically_contiguous(st: &State, hvas: &[Hva]) -> Result<()> {
        // Fault every page in (a write of the byte already there), so the
        // PFNs are real and not the shared zero page.
        for h in hvas {
            if let Some((region, off)) = st.region_at(h.raw()) {
                let mut b = [0u8; 1];
                region.read_at(off, &mut b).map_err(|_| Error::Fault("unreadable queue page"))?;
                region.write_at(off, &b).map_err(|_| Error::Fault("unwritable queue page"))?;
            }
        }
        let mut prev: Option<u64> = None;
        for h in hvas {
            let pfn = pagemap::pfns(h.raw(), 1)
                .map_err(|_| Error::Fault("pagemap unreadable"))?
                .first()
                .copied()
                .flatten()
                .ok_or(Error::Fault("queue page not present"))?;
            if let Some(p) = prev
                && p.checked_add(1) != Some(pfn)
            {
                return Err(Error::Fault("queue pages are not physically contiguous"));
            }
            prev = Some(pfn);
        }
        Ok(())
    }

    /// Destroys an object: ENOENT for an unknown id, EBUSY while in use.
    pub fn destroy(&self, id: Id) -> Result<()> {
        let mut st = self.lock();
        let busy = match st.objects.get(&id) {
            None => return Err(Error::NoEnt(id)),
            Some(Obj::Ioas(i)) => !i.hwpts.is_empty() || !i.accesses.is_empty(),
            Some(Obj::Hwpt(h)) => h.devices > 0 || h.users > 0,
            Some(Obj::Device { attached, users }) => !attached.is_empty() || *users > 0,
            Some(Obj::Access(a)) => a.pins > 0,
            Some(Obj::Viommu(v)) => !v.vdevices.is_empty() || !v.queues.is_empty(),
            Some(Obj::Vdevice { .. }) => false,
            Some(Obj::HwQueue { viommu, index, .. }) => match st.objects.get(viommu) {
                Some(Obj::Viommu(v)) => v.queues.contains_key(&(index + 1)),
                _ => false,
            },
        };
        if busy {
            return Err(Error::Busy("object in use"));
        }
        if matches!(st.objects.get(&id), Some(Obj::Hwpt(_))) {
            Self::destroy_hwpt(&mut st, id);
            return Ok(());
        }
        match st.objects.remove(&id) {
            Some(Obj::Access(a)) => {
                if let Ok(i) = st.ioas_mut(a.ioas) {
                    i.accesses.retain(|x| *x != id);
                }
            }
            Some(Obj::Viommu(v)) => {
                if let Ok(h) = st.hwpt_mut(v.hwpt) {
                    h.users -= 1;
                }
            }
            Some(Obj::Vdevice { viommu, dev, virt_id }) => {
                if let Some(Obj::Viommu(v)) = st.objects.get_mut(&viommu) {
                    v.vdevices.remove(&virt_id);
                }
                if let Some(Obj::Device { users, .. }) = st.objects.get_mut(&dev) {
                    *users -= 1;
                }
            }
            Some(Obj::HwQueue { viommu, index, iova, length, access }) => {
                if let Some(Obj::Viommu(v)) = st.objects.get_mut(&viommu) {
                    v.queues.remove(&index);
                }
                if let Some(Obj::Access(a)) = st.objects.remove(&access) {
                    st.unpin(a.ioas, iova, length, true);
                    if let Ok(i) = st.ioas_mut(a.ioas) {
                        i.accesses.retain(|x| *x != access);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Translates a DMA of `dev` at `pasid`: the host memory reached, or a fault.
    pub fn translate(
        &self,
        dev: Id,
        pasid: u32,
        iova: u64,
        length: u64,
        access: DmaAccess,
    ) -> Result<Vec<DmaSegment>, DmaFault> {
        let last = last_of(iova, length).map_err(|_| DmaFault::BadRange)?;
        let mut st = self.lock();
        let hwpt = match st.objects.get(&dev) {
            Some(Obj::Device { attached, .. }) => *attached.get(&pasid).ok_or(DmaFault::NotAttached)?,
            _ => return Err(DmaFault::NotAttached),
        };
        let write = access == DmaAccess::Write;
        let mut out: Vec<DmaSegment> = Vec::new();
        let mut page = iova & !(PAGE - 1);
        loop {
            let hva_page = match st.iotlb.get(&(dev, pasid, page)) {
                Some(e) if e.hwpt == hwpt && (!write || e.write) => e.hva_page,
                _ => {
                    let (hva_page, w) =
                        st.walk(hwpt, page, write).map_err(|fault| DmaFault::Walk { iova: page, fault })?;
                    if st.iotlb.len() >= IOTLB_CAPACITY {
                        st.iotlb.clear();
                    }
                    st.iotlb.insert((dev, pasid, page), TlbEntry { hwpt, hva_page, write: w });
                    hva_page
                }
            };
            let seg_start = page.max(iova);
            let seg_last = (page + (PAGE - 1)).min(last);
            let hva = hva_page + (seg_start - page);
            let len = seg_last - seg_start + 1;
            match out.last_mut() {
                Some(s) if s.hva.raw() + s.len == hva => s.len += len,
                _ => out.push(DmaSegment { hva: Hva::new(hva), len }),
            }
            match page.checked_add(PAGE) {
                Some(n) if n <= last => page = n,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Number of cached DMA translations.
    pub fn iotlb_entries(&self) -> usize {
        self.lock().iotlb.len()
    }

    /// Starts a host change (discard, punch hole, slot delete) over `range`:
    /// EBUSY if any page there is pinned; until the guard drops, new pins
    /// over the range fail with EBUSY.
    pub fn begin_host_change(&self, range: AddrRange<Hva>) -> Result<HostChange<'_>> {
        let mut st = self.lock();
        let (lo, hi) = (range.start().raw(), range.end().raw());
        for p in st.pages.values() {
            let pend = p.base + p.npages * PAGE;
            if p.base < hi && lo < pend {
                let s = lo.saturating_sub(p.base) / PAGE;
                let e = (hi.min(pend) - p.base).div_ceil(PAGE);
                if p.pins.pinned_in(s, e) > 0 {
                    return Err(Error::Busy("pinned pages in the range"));
                }
            }
        }
        let id = st.next_change;
        st.next_change += 1;
        st.host_changes.insert(id, range);
        Ok(HostChange { ictx: self, id })
    }

    /// Discards `offset..offset+len` of `mapping` unless pinned here (EBUSY).
    pub fn discard(&self, mapping: &NotifiedMapping, offset: u64, len: u64) -> Result<()> {
        let start = mapping.mapping().hva().try_add(offset).map_err(|_| Error::Overflow)?;
        let range = AddrRange::from_len(start, len).map_err(|_| Error::Overflow)?;
        let _guard = self.begin_host_change(range)?;
        mapping.discard(offset, len).map_err(|_| Error::Inval("discard failed"))
    }
}

impl State {
    fn region_at(&self, hva: u64) -> Option<(Arc<dyn MappedRegion>, u64)> {
        self.pages.values().find_map(|p| match &p.backing {
            Backing::Region { region, .. } => {
                let off = hva.checked_sub(region.hva().raw())?;
                (off < region.size()).then(|| (region.clone(), off))
            }
            Backing::User(_) => None,
        })
    }

    /// Walks the HWPT's tables for one page: (host page, writable).
    fn walk(&self, hwpt: Id, page: u64, write: bool) -> Result<(u64, bool), Fault> {
        let acc = if write { Access::write() } else { Access::read() };
        let h = self.hwpt(hwpt).map_err(|_| nofault(page))?;
        match &h.data {
            HwptData::Paging { mapper, .. } => {
                let t = SecondStage::four_level().translate(
                    mapper.memory(),
                    mapper.root(),
                    Iova::new(page),
                    acc,
                )?;
                Ok((t.addr.raw() & !(PAGE - 1), t.perms.write))
            }
            HwptData::Nested { parent, s1 } => {
                let Ok(Hwpt { data: HwptData::Paging { mapper, .. }, .. }) = self.hwpt(*parent) else {
                    return Err(nofault(page));
                };
                let stage1 =
                    if s1.addr_width == 57 { X86Paging::five_level() } else { X86Paging::four_level() };
                let nested = Nested { stage1, stage2: SecondStage::four_level() };
                let view = HostView { st: self, arena: mapper.memory() };
                let t = nested.translate(
                    &view,
                    mapper.root(),
                    Gpa::new(s1.pgtbl_addr),
                    Iova::new(page),
                    acc.user(),
                )?;
                Ok((t.addr.raw() & !(PAGE - 1), write))
            }
        }
    }
}

fn nofault(page: u64) -> Fault {
    Fault {
        kind: memvisor_paging::FaultKind::NotPresent,
        stage: memvisor_paging::StageId::Second,
        level: 0,
        addr: page,
        error_code: 0,
        stage1_level: None,
    }
}

/// Table memory for nested walks: the IO page table's arena, and guest RAM
/// (host mappings of the IOAS's region backings) for the stage-1 tables.
struct HostView<'a> {
    st: &'a State,
    arena: &'a Arena<Hpa>,
}

impl HostView<'_> {
    fn region(&self, addr: Hpa) -> Result<(Arc<dyn MappedRegion>, u64), MemoryError> {
        if !addr.raw().is_multiple_of(8) {
            return Err(MemoryError::Misaligned(addr.raw()));
        }
        self.st.region_at(addr.raw()).ok_or(MemoryError::Unbacked(addr.raw()))
    }
}

impl TableMemory for HostView<'_> {
    type Addr = Hpa;

    fn read_entry(&self, addr: Hpa) -> Result<u64, MemoryError> {
        if addr.raw() >= ARENA_BASE {
            return self.arena.read_entry(addr);
        }
        let (r, off) = self.region(addr)?;
        let mut b = [0u8; 8];
        r.read_at(off, &mut b).map_err(|_| MemoryError::Unbacked(addr.raw()))?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_entry(&self, addr: Hpa, value: u64) -> Result<(), MemoryError> {
        if addr.raw() >= ARENA_BASE {
            return self.arena.write_entry(addr, value);
        }
        let (r, off) = self.region(addr)?;
        r.write_at(off, &value.to_le_bytes()).map_err(|_| MemoryError::Unbacked(addr.raw()))
    }

    /// Guest RAM is not atomically updatable through a `MappedRegion`; the
    /// exchange is a read-compare-write (a guest racing its own A/D bits
    /// loses at most one update, as with a non-atomic emulated walker).
    fn compare_exchange_entry(
        &self,
        addr: Hpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        if addr.raw() >= ARENA_BASE {
            return self.arena.compare_exchange_entry(addr, current, new);
        }
        let v = self.read_entry(addr)?;
        if v != current {
            return Ok(Err(v));
        }
        self.write_entry(addr, new)?;
        Ok(Ok(v))
    }
}

impl InvalidationSink for Iommufd {
    fn invalidate_range_start(&self, range: AddrRange<Hva>) {
        let (lo, hi) = (range.start().raw(), range.end().raw());
        self.lock().iotlb.retain(|_, e| !(e.hva_page < hi && lo < e.hva_page + PAGE));
    }

    fn invalidate_range_end(&self, _range: AddrRange<Hva>) {}
}
