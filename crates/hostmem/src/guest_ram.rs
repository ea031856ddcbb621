//! Guest RAM over memvisor mappings, as a vm-memory 0.18 backend.
//!
//! [`RamRegion`] implements [`GuestMemoryRegion`] (and the
//! [`GuestMemoryRegionBytes`] marker, which gives it vm-memory's own
//! `Bytes<MemoryRegionAddress>` over [`GuestMemoryRegion::get_slice`]);
//! [`GuestRam`] implements [`GuestMemoryBackend`], whose blanket impls give
//! `GuestMemory` and `Bytes<GuestAddress>` (`read_obj`, `write_slice`, atomic
//! `load`/`store`, accesses spanning adjacent regions). `GuestRam` is immutable,
//! as vm-memory requires of a backend; [`GuestRam::insert`] and
//! [`GuestRam::remove`] return a new one.
//!
//! Verified by `tests/vm_memory_backend.rs`: random `Bytes<GuestAddress>`
//! operations (slices, partial reads/writes, typed objects, atomics) at
//! addresses around region edges, gaps and the end of memory give the same
//! outcomes and bytes as vm-memory's own `GuestMemoryMmap` over the same
//! layout; accesses spanning two adjacent regions land in both mappings;
//! `find_region`/`get_host_address` agree with [`GuestRam::gpa_to_hva`].
//! Not verified here: vm-memory's dirty-bitmap types (this backend's bitmap
//! is `()`), its `iommu` feature, and consumers such as virtio-queue.

use std::sync::Arc;

use memvisor_types::{AddrRange, Address, Gpa, Hva, RangeError};
use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestMemoryResult, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::mapping::{MappedRegion, check_bounds};
use crate::{Error, Result};

/// A contiguous range of guest-physical memory backed by part of a mapping.
#[derive(Debug, Clone)]
pub struct RamRegion {
    gpa: AddrRange<Gpa>,
    memory: Arc<dyn MappedRegion>,
    offset: u64,
}

impl RamRegion {
    /// The whole of `memory`, starting at guest address `base`.
    pub fn new(base: Gpa, memory: Arc<dyn MappedRegion>) -> Result<Self> {
        let len = memory.size();
        Self::with_offset(base, memory, 0, len)
    }

    /// `len` bytes of `memory` from `offset`, at guest address `base`.
    /// The region must be non-empty, lie inside the mapping, and not wrap the
    /// guest address space.
    pub fn with_offset(base: Gpa, memory: Arc<dyn MappedRegion>, offset: u64, len: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::BadSize { size: 0, page: 1 });
        }
        check_bounds(offset, len, memory.size())?;
        let gpa = AddrRange::from_len(base, len)?;
        Ok(Self { gpa, memory, offset })
    }

    /// The guest-physical range the region covers.
    pub fn gpa_range(&self) -> AddrRange<Gpa> {
        self.gpa
    }

    /// The mapping behind the region.
    pub fn memory(&self) -> &Arc<dyn MappedRegion> {
        &self.memory
    }

    /// Offset of the region's first byte in [`memory`](Self::memory).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The host address backing `gpa`, if the region contains it.
    pub fn hva(&self, gpa: Gpa) -> Option<Hva> {
        let delta = gpa.offset_from(self.gpa.start()).filter(|d| *d < self.gpa.len())?;
        self.memory.hva_at(self.offset.checked_add(delta)?).ok()
    }
}

impl GuestMemoryRegion for RamRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.gpa.len()
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.gpa.start().raw())
    }

    fn bitmap(&self) -> BS<'_, Self::B> {}

    fn get_host_address(&self, addr: MemoryRegionAddress) -> GuestMemoryResult<*mut u8> {
        let gpa = self.gpa.start().checked_add(addr.0).ok_or(GuestMemoryError::InvalidBackendAddress)?;
        let hva = self.hva(gpa).ok_or(GuestMemoryError::InvalidBackendAddress)?;
        let hva = usize::try_from(hva.raw()).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        Ok(std::ptr::with_exposed_provenance_mut(hva))
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestMemoryResult<VolatileSlice<'_, BS<'_, ()>>> {
        let count = u64::try_from(count).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        check_bounds(offset.0, count, self.gpa.len()).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        let start = self.offset.checked_add(offset.0).ok_or(GuestMemoryError::InvalidBackendAddress)?;
        self.memory.volatile_slice(start, count).map_err(|_| GuestMemoryError::InvalidBackendAddress)
    }
}

impl GuestMemoryRegionBytes for RamRegion {}

/// Guest RAM: non-overlapping [`RamRegion`]s sorted by guest address.
///
/// Lookup is a binary search (O(log n)). Cloning is cheap (regions are
/// shared).
#[derive(Debug, Clone, Default)]
pub struct GuestRam {
    regions: Vec<Arc<RamRegion>>,
}

impl GuestRam {
    /// Guest RAM made of `regions` (any order); [`Error::Overlap`] if two overlap.
    pub fn new(regions: Vec<RamRegion>) -> Result<Self> {
        Self::from_arcs(regions.into_iter().map(Arc::new).collect())
    }

    fn from_arcs(mut regions: Vec<Arc<RamRegion>>) -> Result<Self> {
        regions.sort_by_key(|r| r.gpa.start());
        for pair in regions.windows(2) {
            if let [a, b] = pair
                && a.gpa.overlaps(&b.gpa)
            {
                return Err(Error::Overlap { first: a.gpa.start(), second: b.gpa.start() });
            }
        }
        Ok(Self { regions })
    }

    /// A copy with `region` added.
    pub fn insert(&self, region: RamRegion) -> Result<Self> {
        let mut regions = self.regions.clone();
        regions.push(Arc::new(region));
        Self::from_arcs(regions)
    }

    /// A copy without the region starting at `base`, and that region.
    pub fn remove(&self, base: Gpa) -> Result<(Self, Arc<RamRegion>)> {
        let i =
            self.regions.binary_search_by_key(&base, |r| r.gpa.start()).map_err(|_| Error::NoRegion(base))?;
        let mut regions = self.regions.clone();
        let removed = regions.remove(i);
        Ok((Self { regions }, removed))
    }

    /// The region containing `gpa`.
    pub fn region(&self, gpa: Gpa) -> Option<&RamRegion> {
        let i = self.regions.partition_point(|r| r.gpa.start() <= gpa).checked_sub(1)?;
        self.regions.get(i).map(Arc::as_ref).filter(|r| r.gpa.contains(gpa))
    }

    /// The host address backing `gpa` (memvisor's GPA → HVA path).
    pub fn gpa_to_hva(&self, gpa: Gpa) -> Option<Hva> {
        self.region(gpa)?.hva(gpa)
    }

    /// The regions, in guest-address order.
    pub fn regions(&self) -> impl Iterator<Item = &RamRegion> {
        self.regions.iter().map(Arc::as_ref)
    }

    /// Reads `buf.len()` bytes at `gpa`, which must lie inside one region.
    pub fn read_at(&self, gpa: Gpa, buf: &mut [u8]) -> Result<()> {
        let (region, offset) = self.locate(gpa, buf.len())?;
        region.memory.read_at(offset, buf)
    }

    /// Writes `buf` at `gpa`, which must lie inside one region.
    pub fn write_at(&self, gpa: Gpa, buf: &[u8]) -> Result<()> {
        let (region, offset) = self.locate(gpa, buf.len())?;
        region.memory.write_at(offset, buf)
    }

    fn locate(&self, gpa: Gpa, len: usize) -> Result<(&RamRegion, u64)> {
        let len = u64::try_from(len).map_err(|_| RangeError::Overflow { start: gpa.raw(), len: u64::MAX })?;
        let region = self.region(gpa).ok_or(Error::NoRegion(gpa))?;
        let delta = gpa.offset_from(region.gpa.start()).unwrap_or(0);
        check_bounds(delta, len, region.gpa.len())?;
        Ok((region, region.offset + delta))
    }
}

impl GuestMemoryBackend for GuestRam {
    type R = RamRegion;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&RamRegion> {
        self.region(Gpa::new(addr.0))
    }

    fn iter(&self) -> impl Iterator<Item = &RamRegion> {
        self.regions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mapping;

    const PAGE: u64 = 4096;

    fn region(base: u64, pages: u64) -> RamRegion {
        RamRegion::new(Gpa::new(base), Arc::new(Mapping::anonymous(pages * PAGE).unwrap())).unwrap()
    }

    #[test]
    fn overlapping_regions_are_rejected() {
        let err = GuestRam::new(vec![region(0x3000, 2), region(0x2000, 2)]).unwrap_err();

        assert!(
            matches!(err, Error::Overlap { first, second } if first == Gpa::new(0x2000) && second == Gpa::new(0x3000))
        );
    }

    #[test]
    fn gpa_to_hva_follows_the_region_offset() {
        let m: Arc<dyn MappedRegion> = Arc::new(Mapping::anonymous(4 * PAGE).unwrap());
        let ram = GuestRam::new(vec![
            RamRegion::with_offset(Gpa::new(0x10_0000), Arc::clone(&m), PAGE, 2 * PAGE).unwrap(),
        ])
        .unwrap();

        let hva = ram.gpa_to_hva(Gpa::new(0x10_1008));

        assert_eq!(hva, Some(Hva::new(m.hva().raw() + 2 * PAGE + 8)));
        assert_eq!(ram.gpa_to_hva(Gpa::new(0x10_2000)), None);
        assert_eq!(ram.gpa_to_hva(Gpa::new(0xf_ffff)), None);
    }

    #[test]
    fn region_beyond_its_mapping_is_rejected() {
        let m: Arc<dyn MappedRegion> = Arc::new(Mapping::anonymous(PAGE).unwrap());

        let err = RamRegion::with_offset(Gpa::new(0), m, PAGE, 1).unwrap_err();

        assert!(matches!(err, Error::OutOfBounds { .. }), "{err:?}");
    }

    #[test]
    fn region_wrapping_the_guest_address_space_is_rejected() {
        let m: Arc<dyn MappedRegion> = Arc::new(Mapping::anonymous(2 * PAGE).unwrap());

        let err = RamRegion::new(Gpa::new(u64::MAX - PAGE + 1), m).unwrap_err();

        assert!(matches!(err, Error::Range(RangeError::Overflow { .. })), "{err:?}");
    }

    #[test]
    fn insert_and_remove_return_new_layouts() {
        let ram = GuestRam::new(vec![region(0, 1)]).unwrap();

        let bigger = ram.insert(region(0x8000, 1)).unwrap();
        let (smaller, removed) = bigger.remove(Gpa::new(0)).unwrap();

        assert_eq!(ram.num_regions(), 1);
        assert_eq!(bigger.num_regions(), 2);
        assert_eq!(removed.gpa_range().start(), Gpa::new(0));
        assert_eq!(
            smaller.regions().map(|r| r.gpa_range().start()).collect::<Vec<_>>(),
            vec![Gpa::new(0x8000)]
        );
        assert!(matches!(smaller.remove(Gpa::new(0x1000)), Err(Error::NoRegion(_))));
    }
}
