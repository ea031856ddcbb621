//! Guest memory as the unit sees it: guest-physical addresses, 8-byte
//! atomic entries for tables (A/D updates by compare-exchange) and byte
//! ranges for descriptors, status writes and DMA.

use memvisor_hostmem::VmTables;
use memvisor_paging::{Arena, MemoryError, TableMemory};
use memvisor_types::{Address, Gpa};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest-physical memory the unit reads tables and descriptors from and
/// writes status and accessed/dirty flags to.
pub trait GuestMemory: TableMemory<Addr = Gpa> {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Writes `buf` at `gpa`.
    fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemoryError>;
}

impl<T: GuestMemory + ?Sized> GuestMemory for &T {
    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read(gpa, buf)
    }
    fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemoryError> {
        (**self).write(gpa, buf)
    }
}

/// Guest memory in a memvisor-paging [`Arena`] (tests, fuzzing, benches):
/// `frames` 4 KiB frames starting at guest-physical `base`.
#[derive(Debug)]
pub struct TestMemory {
    arena: Arena<Gpa>,
}

impl TestMemory {
    /// `frames` zeroed frames at `base` (rounded down to 4 KiB).
    pub fn new(base: Gpa, frames: usize) -> Self {
        Self { arena: Arena::new(Gpa::new(base.raw() & !0xfff), frames) }
    }

    /// The arena (e.g. to build tables with memvisor-paging's mapper).
    pub fn arena(&self) -> &Arena<Gpa> {
        &self.arena
    }

    /// Reads a little-endian u64 at an 8-byte aligned `gpa`.
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError> {
        self.arena.read_entry(gpa)
    }

    /// Writes a little-endian u64 at an 8-byte aligned `gpa`.
    pub fn write_u64(&self, gpa: Gpa, value: u64) -> Result<(), MemoryError> {
        self.arena.write_entry(gpa, value)
    }

    fn bytes(
        &self,
        gpa: Gpa,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        // Walk the 8-byte words the range touches: (word address, byte offset in word, bytes in word).
        let start = gpa.raw();
        let end = start.checked_add(len as u64).ok_or(MemoryError::Unbacked(start))?;
        let mut at = start;
        while at < end {
            let word = at & !7;
            // Both below 8: the offset inside one word and the bytes taken from it.
            let off = at - word;
            let n = (8 - off).min(end - at);
            #[allow(clippy::cast_possible_truncation)] // both < 8
            f(word, off as usize, n as usize)?;
            at += n;
        }
        Ok(())
    }
}

impl TableMemory for TestMemory {
    type Addr = Gpa;
    fn read_entry(&self, addr: Gpa) -> Result<u64, MemoryError> {
        self.arena.read_entry(addr)
    }
    fn write_entry(&self, addr: Gpa, value: u64) -> Result<(), MemoryError> {
        self.arena.write_entry(addr, value)
    }
    fn compare_exchange_entry(
        &self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        self.arena.compare_exchange_entry(addr, current, new)
    }
}

impl GuestMemory for TestMemory {
    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut pos = 0usize;
        self.bytes(gpa, buf.len(), |word, off, n| {
            let v = self.arena.read_entry(Gpa::new(word))?.to_le_bytes();
            buf[pos..pos + n].copy_from_slice(&v[off..off + n]);
            pos += n;
            Ok(())
        })
    }

    fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemoryError> {
        // All or nothing: check every word is backed before changing any.
        self.bytes(gpa, buf.len(), |word, _, _| self.arena.read_entry(Gpa::new(word)).map(drop))?;
        let mut pos = 0usize;
        self.bytes(gpa, buf.len(), |word, off, n| {
            // Read-modify-write of a partial word; a whole word is a plain store.
            loop {
                let cur = self.arena.read_entry(Gpa::new(word))?;
                let mut v = cur.to_le_bytes();
                v[off..off + n].copy_from_slice(&buf[pos..pos + n]);
                let new = u64::from_le_bytes(v);
                if self.arena.compare_exchange_entry(Gpa::new(word), cur, new)?.is_ok() {
                    break;
                }
            }
            pos += n;
            Ok(())
        })
    }
}

/// Guest memory through vm-memory 0.18: any [`GuestMemoryBackend`]
/// (memvisor-hostmem's `GuestRam`, vm-memory's `GuestMemoryMmap`); table
/// entries through memvisor-hostmem's [`VmTables`].
#[derive(Debug)]
pub struct VmMemory<'a, M: GuestMemoryBackend>(pub &'a M);

impl<M: GuestMemoryBackend> TableMemory for VmMemory<'_, M> {
    type Addr = Gpa;
    fn read_entry(&self, addr: Gpa) -> Result<u64, MemoryError> {
        VmTables(self.0).read_entry(addr)
    }
    fn write_entry(&self, addr: Gpa, value: u64) -> Result<(), MemoryError> {
        VmTables(self.0).write_entry(addr, value)
    }
    fn compare_exchange_entry(
        &self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        VmTables(self.0).compare_exchange_entry(addr, current, new)
    }
}

impl<M: GuestMemoryBackend> GuestMemory for VmMemory<'_, M> {
    fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.0.read_slice(buf, GuestAddress(gpa.raw())).map_err(|_| MemoryError::Unbacked(gpa.raw()))
    }
    fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), MemoryError> {
        self.0.write_slice(buf, GuestAddress(gpa.raw())).map_err(|_| MemoryError::Unbacked(gpa.raw()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_byte_ranges_round_trip_across_words() {
        // Arrange
        let mem = TestMemory::new(Gpa::new(0x1000), 2);
        let data: Vec<u8> = (0..29).collect();
        // Act
        mem.write(Gpa::new(0x1ffb), &data).unwrap();
        let mut back = [0u8; 29];
        mem.read(Gpa::new(0x1ffb), &mut back).unwrap();
        // Assert
        assert_eq!(&back[..], &data[..]);
        assert_eq!(mem.read_u64(Gpa::new(0x1ff8)).unwrap() >> 24, 0x0004_0302_0100);
    }

    #[test]
    fn accesses_outside_the_arena_fail_without_writing() {
        // Arrange
        let mem = TestMemory::new(Gpa::new(0x1000), 1);
        // Act
        let r = mem.write(Gpa::new(0x1ffc), &[1; 8]);
        // Assert
        assert!(r.is_err());
    }
}
