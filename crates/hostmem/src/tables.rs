//! Guest memory as page-table memory: 8-byte entries read, written and
//! compare-exchanged atomically through vm-memory 0.18, so memvisor-paging's
//! walker and mapper work on tables in a guest's RAM (the guest's own page
//! tables, a vIOMMU's guest-programmed tables, or tables a VMM builds there).

use std::sync::atomic::{AtomicU64, Ordering};

use memvisor_paging::{MemoryError, TableMemory};
use memvisor_types::{Address, Gpa};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

/// Any vm-memory [`GuestMemoryBackend`] (memvisor's [`GuestRam`](crate::GuestRam),
/// vm-memory's `GuestMemoryMmap`) as [`TableMemory`] addressed by GPA.
#[derive(Debug)]
pub struct VmTables<'a, M: GuestMemoryBackend>(pub &'a M);

impl<M: GuestMemoryBackend> VmTables<'_, M> {
    /// Runs `f` on the 8-byte entry at `addr` as an atomic.
    fn with_entry<R>(&self, addr: Gpa, f: impl FnOnce(&AtomicU64) -> R) -> Result<R, MemoryError> {
        if !addr.raw().is_multiple_of(8) {
            return Err(MemoryError::Misaligned(addr.raw()));
        }
        let unbacked = MemoryError::Unbacked(addr.raw());
        let region = self.0.find_region(GuestAddress(addr.raw())).ok_or(unbacked)?;
        let offset = region.to_region_addr(GuestAddress(addr.raw())).ok_or(unbacked)?;
        let slice = region.get_slice(offset, 8).map_err(|_| unbacked)?;
        let entry = slice.get_atomic_ref::<AtomicU64>(0).map_err(|_| unbacked)?;
        Ok(f(entry))
    }
}

impl<M: GuestMemoryBackend> TableMemory for VmTables<'_, M> {
    type Addr = Gpa;

    fn read_entry(&self, addr: Gpa) -> Result<u64, MemoryError> {
        self.with_entry(addr, |e| e.load(Ordering::Acquire))
    }

    fn write_entry(&self, addr: Gpa, value: u64) -> Result<(), MemoryError> {
        self.with_entry(addr, |e| e.store(value, Ordering::Release))
    }

    fn compare_exchange_entry(
        &self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        self.with_entry(addr, |e| e.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{GuestRam, Mapping, RamRegion};

    fn ram() -> GuestRam {
        let mapping = Arc::new(Mapping::anonymous(0x2000).unwrap());
        GuestRam::new(vec![RamRegion::new(Gpa::new(0x10_0000), mapping).unwrap()]).unwrap()
    }

    #[test]
    fn entries_round_trip_and_compare_exchange_reports_the_current_value() {
        // Arrange
        let ram = ram();
        let t = VmTables(&ram);
        // Act
        t.write_entry(Gpa::new(0x10_1008), 7).unwrap();
        let lost = t.compare_exchange_entry(Gpa::new(0x10_1008), 6, 9).unwrap();
        let won = t.compare_exchange_entry(Gpa::new(0x10_1008), 7, 9).unwrap();
        // Assert
        assert_eq!(lost, Err(7));
        assert_eq!(won, Ok(7));
        assert_eq!(t.read_entry(Gpa::new(0x10_1008)).unwrap(), 9);
    }

    #[test]
    fn unbacked_and_misaligned_entries_are_errors() {
        // Arrange
        let ram = ram();
        let t = VmTables(&ram);
        // Act / Assert
        assert_eq!(t.read_entry(Gpa::new(0x20_0000)), Err(MemoryError::Unbacked(0x20_0000)));
        assert_eq!(t.read_entry(Gpa::new(0x10_0004)), Err(MemoryError::Misaligned(0x10_0004)));
    }
}
