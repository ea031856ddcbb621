//! Owned host mappings and the system calls on them.
//!
//! Facts relied on (Linux man pages mmap(2), madvise(2), fallocate(2),
//! memfd_create(2); mm/madvise.c `madvise_remove`):
//! - `munmap` of a range we mapped cannot fail for a valid, page-aligned
//!   range; the mapping keeps its file alive by itself, so closing the fd
//!   afterwards does not invalidate it.
//! - `MADV_DONTNEED` on a private anonymous mapping drops the pages; the next
//!   touch reads zeros. On a shared file mapping it only drops the page-table
//!   entries — the data stays in the file — so discarding file-backed memory
//!   uses `MADV_REMOVE`, which punches a hole in the file (shmem, hugetlbfs
//!   and guest_memfd all implement `fallocate(PUNCH_HOLE)`).
//! - `FALLOC_FL_PUNCH_HOLE` must be combined with `FALLOC_FL_KEEP_SIZE`.
//! - hugetlb-backed memfds reserve their pages at `mmap` time, so a shortage
//!   is reported there (ENOMEM) rather than as SIGBUS on first touch; we
//!   therefore do not pass `MAP_NORESERVE` for shared file mappings.

#![expect(
    unsafe_code,
    reason = "mmap/munmap/madvise/mprotect/fallocate/memfd_create, and volatile slices over memory those calls mapped"
)]

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use memvisor_types::{Address, Hva, RangeError};
use vm_memory::VolatileSlice;
use vm_memory::bytes::Bytes;

use crate::{Error, Result};

/// The host's base page size (`sysconf(_SC_PAGESIZE)`; 4 KiB on x86-64).
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a configuration value.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(v).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
    })
}

/// A range of host-virtual memory that stays mapped for as long as the object
/// lives — what a memslot or a vm-memory region holds (as
/// `Arc<dyn MappedRegion>`) so that the memory cannot be unmapped under it.
///
/// The provided methods give bounds-checked volatile access to the memory.
///
/// # Safety
///
/// Implementors guarantee that:
/// - `hva()..hva() + size()` is mapped in this process, and `hva() + size()`
///   does not overflow;
/// - the range stays mapped (never unmapped, never replaced by another mapping)
///   until the object is dropped, and `hva()` and `size()` never change;
/// - no Rust reference (`&`/`&mut` to a non-atomic, non-volatile type) covers
///   the range: it is shared with guests and other processes, and is only
///   accessed through volatile and atomic operations.
///
/// Protection may change (see [`Mapping::protect`]); a host access that the
/// current protection forbids raises SIGSEGV, as the same access would in C.
pub unsafe trait MappedRegion: Send + Sync + fmt::Debug {
    /// First host-virtual address of the region.
    fn hva(&self) -> Hva;

    /// Size of the region in bytes.
    fn size(&self) -> u64;

    /// The host address `offset` bytes into the region (`offset <= size()`).
    fn hva_at(&self, offset: u64) -> Result<Hva> {
        check_bounds(offset, 0, self.size())?;
        Ok(self.hva().try_add(offset)?)
    }

    /// A volatile slice of `len` bytes at `offset`, for vm-memory style access.
    fn volatile_slice(&self, offset: u64, len: u64) -> Result<VolatileSlice<'_>> {
        check_bounds(offset, len, self.size())?;
        let start = usize::try_from(self.hva().try_add(offset)?.raw())
            .map_err(|_| RangeError::Overflow { start: self.hva().raw(), len: offset })?;
        let len = usize::try_from(len).map_err(|_| RangeError::Overflow { start: offset, len })?;
        // SAFETY: `offset..offset + len` lies inside the region (checked above),
        // which the trait's contract keeps mapped for the lifetime of `self`,
        // to which the slice's lifetime is tied; the contract also says all
        // other users access it through volatile or atomic operations.
        Ok(unsafe { VolatileSlice::new(std::ptr::with_exposed_provenance_mut::<u8>(start), len) })
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len =
            u64::try_from(buf.len()).map_err(|_| RangeError::Overflow { start: offset, len: u64::MAX })?;
        self.volatile_slice(offset, len)?.read_slice(buf, 0).map_err(|_| Error::OutOfBounds {
            offset,
            len,
            size: self.size(),
        })
    }

    /// Copies `buf` to `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len =
            u64::try_from(buf.len()).map_err(|_| RangeError::Overflow { start: offset, len: u64::MAX })?;
        self.volatile_slice(offset, len)?.write_slice(buf, 0).map_err(|_| Error::OutOfBounds {
            offset,
            len,
            size: self.size(),
        })
    }
}

/// `offset..offset + len` must lie within `0..size`.
pub(crate) fn check_bounds(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfBounds { offset, len, size }),
    }
}

/// Huge pages for a [`Memfd`] (`MFD_HUGETLB` with an explicit size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Base pages (shmem).
    #[default]
    None,
    /// 2 MiB hugetlb pages.
    Size2M,
    /// 1 GiB hugetlb pages.
    Size1G,
}

impl HugePages {
    /// The page size this choice implies.
    pub fn page_size(self) -> u64 {
        match self {
            HugePages::None => page_size(),
            HugePages::Size2M => 2 << 20,
            HugePages::Size1G => 1 << 30,
        }
    }

    fn memfd_flags(self) -> libc::c_uint {
        match self {
            HugePages::None => 0,
            HugePages::Size2M => libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            HugePages::Size1G => libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
        }
    }
}

/// Access the host has to a mapping ([`Mapping::protect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// No access (`PROT_NONE`).
    None,
    /// Read-only (`PROT_READ`).
    Read,
    /// Read and write (`PROT_READ | PROT_WRITE`), the initial state of every mapping.
    ReadWrite,
}

impl Protection {
    fn prot(self) -> libc::c_int {
        match self {
            Protection::None => libc::PROT_NONE,
            Protection::Read => libc::PROT_READ,
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// The file behind a file-backed mapping.
#[derive(Debug, Clone)]
struct FileBacking {
    fd: Arc<OwnedFd>,
    offset: u64,
}

/// An owned mapping: `munmap` when dropped.
///
/// Share it as `Arc<Mapping>` (or `Arc<dyn MappedRegion>`) with whatever
/// registers it with a hypervisor; the last owner unmaps it.
pub struct Mapping {
    addr: usize,
    size: usize,
    page: u64,
    file: Option<FileBacking>,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Mapping");
        d.field("hva", &format_args!("{:#x}", self.addr)).field("size", &format_args!("{:#x}", self.size));
        d.field("page", &format_args!("{:#x}", self.page));
        match &self.file {
            Some(b) => {
                d.field("fd", &b.fd.as_raw_fd()).field("file_offset", &format_args!("{:#x}", b.offset))
            }
            None => d.field("fd", &"anonymous"),
        };
        d.finish()
    }
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Range(RangeError::Overflow { start: v, len: 0 }))
}

fn to_off(v: u64) -> Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| Error::Range(RangeError::Overflow { start: v, len: 0 }))
}

fn check_size(size: u64, page: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(page) {
        return Err(Error::BadSize { size, page });
    }
    Ok(())
}

impl Mapping {
    /// Private anonymous memory of `size` bytes (page-aligned, > 0), zero-filled
    /// on first touch and not reserved up front (`MAP_NORESERVE`, so terabyte
    /// sparse guests cost only what they touch).
    pub fn anonymous(size: u64) -> Result<Self> {
        let page = page_size();
        check_size(size, page)?;
        let len = to_usize(size)?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing; it overlaps nothing Rust owns.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap"));
        }
        Ok(Self { addr: ptr.expose_provenance(), size: len, page, file: None })
    }

    /// Maps `size` bytes of the file `fd` from `offset`, shared (`MAP_SHARED`)
    /// and read-write — e.g. a guest_memfd created with `MMAP`. Both must be
    /// multiples of the base page size. The mapping keeps `fd` for
    /// [`punch_hole`](Self::punch_hole).
    pub fn from_fd(fd: Arc<OwnedFd>, offset: u64, size: u64) -> Result<Self> {
        Self::map_file(fd, offset, size, page_size())
    }

    fn map_file(fd: Arc<OwnedFd>, offset: u64, size: u64, page: u64) -> Result<Self> {
        check_size(size, page)?;
        if !offset.is_multiple_of(page) {
            return Err(Error::Unaligned { offset, len: size, page });
        }
        offset.checked_add(size).ok_or(RangeError::Overflow { start: offset, len: size })?;
        let len = to_usize(size)?;
        let off = to_off(offset)?;
        // SAFETY: a fresh shared mapping of an fd we hold, at an address of the
        // kernel's choosing; it overlaps nothing Rust owns.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap"));
        }
        Ok(Self { addr: ptr.expose_provenance(), size: len, page, file: Some(FileBacking { fd, offset }) })
    }

    /// The page size ranges passed to [`discard`](Self::discard),
    /// [`punch_hole`](Self::punch_hole) and [`protect`](Self::protect) must be
    /// aligned to (the huge page size for hugetlb memory).
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// The backing file and the file offset of the mapping's first byte, if file-backed.
    pub fn file(&self) -> Option<(BorrowedFd<'_>, u64)> {
        self.file.as_ref().map(|b| (b.fd.as_fd(), b.offset))
    }

    /// Checks a page-aligned sub-range and returns its address and length.
    fn sub_range(&self, offset: u64, len: u64) -> Result<(usize, usize)> {
        if !offset.is_multiple_of(self.page) || !len.is_multiple_of(self.page) {
            return Err(Error::Unaligned { offset, len, page: self.page });
        }
        check_bounds(offset, len, self.size())?;
        // Both fit: offset + len <= size, which is a usize.
        Ok((self.addr + to_usize(offset)?, to_usize(len)?))
    }

    /// Frees the memory behind `offset..offset + len`; it reads as zeros
    /// afterwards. Anonymous memory: `MADV_DONTNEED`. File-backed memory:
    /// `MADV_REMOVE`, which frees the file's pages (a hole), so every other
    /// mapping of the file sees zeros too.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let (addr, len) = self.sub_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let advice = if self.file.is_some() { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
        // SAFETY: the range lies inside this mapping (checked); dropping its
        // pages changes only memory that is accessed volatilely (MappedRegion
        // contract), never memory Rust owns.
        if unsafe { libc::madvise(std::ptr::with_exposed_provenance_mut(addr), len, advice) } != 0 {
            return Err(Error::last_os("madvise"));
        }
        Ok(())
    }

    /// Punches a hole in the backing file under `offset..offset + len`
    /// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); [`Error::NotFileBacked`] for
    /// anonymous memory.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let Some(file) = &self.file else { return Err(Error::NotFileBacked) };
        self.sub_range(offset, len)?;
        let file_offset = file
            .offset
            .checked_add(offset)
            .ok_or(RangeError::Overflow { start: file.offset, len: offset })?;
        punch_hole(file.fd.as_fd(), file_offset, len)
    }

    /// Changes the host's access to `offset..offset + len` (`mprotect`).
    ///
    /// A host access the new protection forbids raises SIGSEGV. Guests are
    /// affected too: KVM maps guest memory with the host's permissions (a write
    /// to read-only memory fails KVM_RUN with EFAULT).
    pub fn protect(&self, offset: u64, len: u64, protection: Protection) -> Result<()> {
        let (addr, len) = self.sub_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside this mapping (checked); only its
        // permissions change, nothing is unmapped.
        if unsafe { libc::mprotect(std::ptr::with_exposed_provenance_mut(addr), len, protection.prot()) } != 0
        {
            return Err(Error::last_os("mprotect"));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr + size` is the mapping this object created and
        // owns; whoever registered it elsewhere held an `Arc` to it, so nobody
        // uses it any more. munmap of a valid mapping cannot fail.
        unsafe {
            libc::munmap(std::ptr::with_exposed_provenance_mut(self.addr), self.size);
        }
    }
}

// SAFETY: `addr..addr + size` was mapped by `mmap` in the constructors (which
// cannot return an overflowing range) and is unmapped only in `Drop`; the
// fields never change; the memory is fresh, so no Rust reference covers it.
unsafe impl MappedRegion for Mapping {
    fn hva(&self) -> Hva {
        Hva::new(self.addr as u64)
    }

    fn size(&self) -> u64 {
        self.size as u64
    }
}

/// Punches a hole in the file `fd` (`fallocate(PUNCH_HOLE | KEEP_SIZE)`).
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
    let off = to_off(offset)?;
    let l = to_off(len)?;
    // SAFETY: fallocate on a file descriptor we borrow; it changes file
    // contents only, which mappings observe as volatile memory.
    let rc = unsafe {
        libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, l)
    };
    if rc != 0 {
        return Err(Error::last_os("fallocate"));
    }
    Ok(())
}

/// A sized memory file (`memfd_create` + `ftruncate`): shared memory that
/// several mappings — a memslot's, a device process's — see alike.
#[derive(Debug, Clone)]
pub struct Memfd {
    fd: Arc<OwnedFd>,
    size: u64,
    huge: HugePages,
}

impl Memfd {
    /// Creates a memfd named `name` of `size` bytes (a multiple of the page
    /// size `huge` implies). With huge pages this fails (EINVAL, ENOENT) when
    /// the kernel lacks hugetlbfs for that size; a shortage of free huge pages
    /// shows at [`map`](Self::map) (ENOMEM).
    pub fn create(name: &str, size: u64, huge: HugePages) -> Result<Self> {
        check_size(size, huge.page_size())?;
        let cname = CString::new(name).map_err(|_| Error::BadName)?;
        // SAFETY: `cname` is a valid NUL-terminated string; the flags are valid.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | huge.memfd_flags()) };
        if raw < 0 {
            return Err(Error::last_os("memfd_create"));
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = to_off(size)?;
        // SAFETY: ftruncate on the descriptor just created.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(Error::last_os("ftruncate"));
        }
        Ok(Self { fd: Arc::new(fd), size, huge })
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The huge-page choice the file was created with.
    pub fn huge_pages(&self) -> HugePages {
        self.huge
    }

    /// The file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Maps `len` bytes from `offset` (both multiples of the page size), shared.
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        check_bounds(offset, len, self.size)?;
        Mapping::map_file(Arc::clone(&self.fd), offset, len, self.huge.page_size())
    }

    /// Punches a hole in the file; every mapping of the range reads zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let page = self.huge.page_size();
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(Error::Unaligned { offset, len, page });
        }
        check_bounds(offset, len, self.size)?;
        punch_hole(self.fd.as_fd(), offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    /// The permission string ("rw-p", "r--s", ...) of the /proc/self/maps line
    /// containing `hva`, or `None` if no mapping contains it.
    fn maps_perms(hva: Hva) -> Option<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            let (start, end) = parts.next()?.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            (start <= hva.raw() && hva.raw() < end).then(|| parts.next().unwrap_or("").to_owned())
        })
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap_or(0).wrapping_add(seed)).collect()
    }

    #[test]
    fn anonymous_mapping_reads_zero_then_what_was_written() {
        // Arrange
        let m = Mapping::anonymous(4 * PAGE).unwrap();
        let data = pattern(100, 7);
        let mut zeros = vec![0xffu8; 100];

        // Act
        m.read_at(PAGE, &mut zeros).unwrap();
        m.write_at(PAGE + 10, &data).unwrap();
        let mut back = vec![0u8; 100];
        m.read_at(PAGE + 10, &mut back).unwrap();

        // Assert
        assert_eq!(zeros, vec![0u8; 100]);
        assert_eq!(back, data);
    }

    #[test]
    fn access_beyond_the_mapping_is_out_of_bounds() {
        let m = Mapping::anonymous(PAGE).unwrap();

        let err = m.write_at(PAGE - 4, &[0u8; 8]).unwrap_err();

        assert!(matches!(err, Error::OutOfBounds { offset: 0xffc, len: 8, size: 0x1000 }), "{err:?}");
    }

    #[test]
    fn offset_near_u64_max_is_out_of_bounds_not_a_wrap() {
        let m = Mapping::anonymous(PAGE).unwrap();

        let err = m.volatile_slice(u64::MAX - 1, 4).unwrap_err();

        assert!(matches!(err, Error::OutOfBounds { .. }), "{err:?}");
    }

    #[test]
    fn unaligned_or_zero_size_is_rejected_before_mmap() {
        assert!(matches!(Mapping::anonymous(0), Err(Error::BadSize { size: 0, .. })));
        assert!(matches!(Mapping::anonymous(PAGE + 1), Err(Error::BadSize { .. })));
        assert!(matches!(Memfd::create("x", 100, HugePages::None), Err(Error::BadSize { .. })));
    }

    #[test]
    fn dropping_the_last_owner_unmaps() {
        // Arrange
        let m = Arc::new(Mapping::anonymous(2 * PAGE).unwrap());
        let hva = m.hva();
        let second_owner: Arc<dyn MappedRegion> = Arc::clone(&m) as Arc<dyn MappedRegion>;

        // Act
        drop(m);
        let still_mapped = maps_perms(hva).is_some();
        drop(second_owner);

        // Assert
        assert!(still_mapped, "a remaining owner keeps the mapping");
        assert_eq!(maps_perms(hva), None);
    }

    #[test]
    fn two_mappings_of_one_memfd_share_bytes() {
        // Arrange
        let memfd = Memfd::create("share", 4 * PAGE, HugePages::None).unwrap();
        let a = memfd.map(0, 4 * PAGE).unwrap();
        let b = memfd.map(2 * PAGE, 2 * PAGE).unwrap();

        // Act
        a.write_at(2 * PAGE + 8, &[1, 2, 3, 4]).unwrap();
        let mut got = [0u8; 4];
        b.read_at(8, &mut got).unwrap();

        // Assert
        assert_eq!(got, [1, 2, 3, 4]);
        assert_eq!(b.file().map(|(_, off)| off), Some(2 * PAGE));
        assert_eq!(maps_perms(a.hva()).as_deref(), Some("rw-s"));
    }

    #[test]
    fn discard_of_anonymous_memory_reads_zeros() {
        let m = Mapping::anonymous(2 * PAGE).unwrap();
        m.write_at(0, &[0xaa; 64]).unwrap();
        m.write_at(PAGE, &[0xbb; 64]).unwrap();

        m.discard(0, PAGE).unwrap();

        let mut first = [1u8; 64];
        let mut second = [0u8; 64];
        m.read_at(0, &mut first).unwrap();
        m.read_at(PAGE, &mut second).unwrap();
        assert_eq!(first, [0u8; 64]);
        assert_eq!(second, [0xbb; 64]);
    }

    #[test]
    fn discard_of_memfd_memory_frees_the_file_pages_for_every_mapping() {
        // Arrange
        let memfd = Memfd::create("discard", 2 * PAGE, HugePages::None).unwrap();
        let a = memfd.map(0, 2 * PAGE).unwrap();
        let b = memfd.map(0, 2 * PAGE).unwrap();
        a.write_at(PAGE, &[0xcc; 32]).unwrap();

        // Act
        a.discard(PAGE, PAGE).unwrap();

        // Assert
        let mut got = [1u8; 32];
        b.read_at(PAGE, &mut got).unwrap();
        assert_eq!(got, [0u8; 32]);
    }

    #[test]
    fn punch_hole_zeroes_only_the_punched_pages() {
        let memfd = Memfd::create("punch", 3 * PAGE, HugePages::None).unwrap();
        let m = memfd.map(PAGE, 2 * PAGE).unwrap();
        m.write_at(0, &[0x11; 16]).unwrap();
        m.write_at(PAGE, &[0x22; 16]).unwrap();

        m.punch_hole(PAGE, PAGE).unwrap();

        let (mut kept, mut punched) = ([0u8; 16], [1u8; 16]);
        m.read_at(0, &mut kept).unwrap();
        m.read_at(PAGE, &mut punched).unwrap();
        assert_eq!(kept, [0x11; 16]);
        assert_eq!(punched, [0u8; 16]);
    }

    #[test]
    fn punch_hole_on_anonymous_memory_is_not_file_backed() {
        let m = Mapping::anonymous(PAGE).unwrap();

        assert!(matches!(m.punch_hole(0, PAGE), Err(Error::NotFileBacked)));
    }

    #[test]
    fn unaligned_discard_is_rejected() {
        let m = Mapping::anonymous(2 * PAGE).unwrap();

        let err = m.discard(1, PAGE).unwrap_err();

        assert!(matches!(err, Error::Unaligned { offset: 1, .. }), "{err:?}");
    }

    #[test]
    fn protect_changes_the_host_permissions_and_keeps_the_data() {
        // Arrange
        let m = Mapping::anonymous(2 * PAGE).unwrap();
        m.write_at(PAGE, &[0x5a; 8]).unwrap();
        let second_page = m.hva_at(PAGE).unwrap();

        // Act
        m.protect(PAGE, PAGE, Protection::Read).unwrap();
        let read_only = maps_perms(second_page);
        let first_untouched = maps_perms(m.hva());
        m.protect(PAGE, PAGE, Protection::None).unwrap();
        let none = maps_perms(second_page);
        m.protect(PAGE, PAGE, Protection::ReadWrite).unwrap();

        // Assert
        assert_eq!(read_only.as_deref(), Some("r--p"));
        assert_eq!(first_untouched.as_deref(), Some("rw-p"));
        assert_eq!(none.as_deref(), Some("---p"));
        let mut got = [0u8; 8];
        m.read_at(PAGE, &mut got).unwrap();
        assert_eq!(got, [0x5a; 8]);
    }

    #[test]
    fn mmap_failure_carries_the_errno() {
        // /dev/null has no mmap operation: mmap fails with ENODEV.
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();

        let err = Mapping::from_fd(Arc::new(OwnedFd::from(null)), 0, PAGE).unwrap_err();

        assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
    }

    /// Huge-page tests skip with a reason when the host reserved none, and
    /// fail instead when `MEMVISOR_REQUIRE_HUGEPAGES=1` (CI reserves them).
    fn skip_or_fail(reason: &str) {
        assert!(std::env::var_os("MEMVISOR_REQUIRE_HUGEPAGES").is_none_or(|v| v != "1"), "{reason}");
        eprintln!("skipping: {reason}");
    }

    #[test]
    fn hugetlb_memfd_maps_2m_pages_or_skips_when_none_are_reserved() {
        let huge = HugePages::Size2M;
        let size = 2 * huge.page_size();
        let memfd = match Memfd::create("huge", size, huge) {
            Ok(m) => m,
            Err(e) => {
                skip_or_fail(&format!("hugetlb memfd unavailable: {e} (errno {:?})", e.errno()));
                return;
            }
        };
        let m = match memfd.map(0, size) {
            Ok(m) => m,
            Err(e) if e.errno() == Some(libc::ENOMEM) => {
                skip_or_fail(&format!("no free 2 MiB huge pages (vm.nr_hugepages): {e}"));
                return;
            }
            Err(e) => panic!("mapping a hugetlb memfd: {e}"),
        };

        m.write_at(huge.page_size() + 8, &[9; 8]).unwrap();
        let small = m.discard(0, PAGE).unwrap_err();
        m.discard(huge.page_size(), huge.page_size()).unwrap();

        assert_eq!(m.page_size(), 2 << 20);
        assert!(matches!(small, Error::Unaligned { .. }), "{small:?}");
        let mut got = [1u8; 8];
        m.read_at(huge.page_size() + 8, &mut got).unwrap();
        assert_eq!(got, [0u8; 8]);
    }
}
