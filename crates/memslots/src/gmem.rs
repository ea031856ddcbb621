//! The rules of guest_memfd files (`KVM_CREATE_GUEST_MEMFD` and the file
//! operations on the descriptor it returns), as Linux 6.18 applies them —
//! the VFS's generic checks first, then guest_memfd's own.
//!
//! | operation | rule | errno |
//! |---|---|---|
//! | create | a flag outside [`SUPPORTED_FLAGS`] | EINVAL |
//! | create | size 0, negative as `loff_t`, or unaligned | EINVAL |
//! | read, write | always (no read/write methods) | EINVAL |
//! | pread, pwrite | negative position | EINVAL |
//! | pread, pwrite | otherwise (the file is not positionable) | ESPIPE |
//! | ftruncate | always (the size never changes) | EINVAL |
//! | mmap | length 0, unaligned offset | EINVAL |
//! | mmap | length that does not fit the address space | ENOMEM |
//! | mmap | offset + length beyond the largest file offset | EOVERFLOW |
//! | mmap | no MAP_SHARED/MAP_PRIVATE type | EINVAL |
//! | mmap | PROT_EXEC (guest_memfd's pseudo fs is noexec) | EPERM |
//! | mmap | private writable mapping beyond the host's commit limit ([`MmapHost`]) | ENOMEM |
//! | mmap | file without [`FLAG_MMAP`] | ENODEV |
//! | mmap | not MAP_SHARED | EINVAL |
//! | fallocate | offset < 0 or length ≤ 0 | EINVAL |
//! | fallocate | mode the VFS rejects (unknown bits, PUNCH_HOLE without KEEP_SIZE, COLLAPSE/INSERT/WRITE_ZEROES with KEEP_SIZE, two modes) | EOPNOTSUPP |
//! | fallocate | offset + length overflows | EFBIG |
//! | fallocate | no KEEP_SIZE, or a mode other than KEEP_SIZE [\| PUNCH_HOLE] | EOPNOTSUPP |
//! | fallocate | offset or length unaligned | EINVAL |
//! | fallocate | allocation past the end of the file (punching past it is fine) | EINVAL |
//!
//! What memory a file holds is not modelled (allocation can fail with
//! ENOMEM or EINTR on a real host; the model says it succeeds).

use memvisor_types::PageSize;

use crate::error::Error;

/// `GUEST_MEMFD_FLAG_MMAP`: the file can be mmapped (shared memory).
pub const FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: pages start shared (userspace faults are
/// served instead of raising SIGBUS).
pub const FLAG_INIT_SHARED: u64 = 1 << 1;
/// The flags this kernel accepts (`KVM_CAP_GUEST_MEMFD_FLAGS` = 3).
pub const SUPPORTED_FLAGS: u64 = FLAG_MMAP | FLAG_INIT_SHARED;

const PAGE_MASK: u64 = PageSize::Size4K.offset_mask();
/// `TASK_SIZE` with 4-level paging: no mapping can be longer.
const TASK_SIZE: u64 = (1 << 47) - 4096;

/// The `fallocate` mode bits the VFS knows (`FALLOC_FL_*`).
mod falloc {
    pub const KEEP_SIZE: i32 = 0x01;
    pub const PUNCH_HOLE: i32 = 0x02;
    pub const COLLAPSE_RANGE: i32 = 0x08;
    pub const ZERO_RANGE: i32 = 0x10;
    pub const INSERT_RANGE: i32 = 0x20;
    pub const UNSHARE_RANGE: i32 = 0x40;
    pub const WRITE_ZEROES: i32 = 0x80;
    pub const MODE_MASK: i32 =
        PUNCH_HOLE | COLLAPSE_RANGE | ZERO_RANGE | INSERT_RANGE | UNSHARE_RANGE | WRITE_ZEROES;
}

/// The host's side of an mmap: memory accounting (`vm.overcommit_memory`).
///
/// A private writable mapping without MAP_NORESERVE is charged against the
/// commit limit before the file's mmap method runs; with the default
/// heuristic (mode 0) it fails if it is longer than RAM + swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MmapHost {
    /// The most a private writable mapping may be, in bytes (`None`: no
    /// limit, as with `vm.overcommit_memory` = 1).
    pub commit_limit: Option<u64>,
}

/// A guest_memfd file's creation parameters (what its rules depend on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GmemFileModel {
    size: u64,
    flags: u64,
}

/// An mmap request on a guest_memfd descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmapRequest {
    /// Length in bytes.
    pub len: u64,
    /// File offset in bytes.
    pub offset: u64,
    /// `PROT_*` bits.
    pub prot: i32,
    /// `MAP_*` bits (only the type bits, `MAP_SHARED`/`MAP_PRIVATE`/`MAP_SHARED_VALIDATE`, matter here).
    pub flags: i32,
}

impl GmemFileModel {
    /// `KVM_CREATE_GUEST_MEMFD { size, flags }` with the flags `supported`.
    pub fn create(size: u64, flags: u64, supported: u64) -> Result<Self, Error> {
        if flags & !supported != 0 {
            return Err(Error::GmemFlags { flags });
        }
        // `loff_t size`: 2^63 and beyond are negative.
        if size.cast_signed() <= 0 || size & PAGE_MASK != 0 {
            return Err(Error::GmemSize { size });
        }
        Ok(Self { size, flags })
    }

    /// The file's size (fixed).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The creation flags.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// read: always EINVAL.
    pub fn read(&self) -> Result<(), Error> {
        Err(Error::GmemFileOp { op: "read" })
    }

    /// write: always EINVAL.
    pub fn write(&self) -> Result<(), Error> {
        Err(Error::GmemFileOp { op: "written" })
    }

    /// pread at `offset`: EINVAL for a negative position, else ESPIPE (the
    /// file is not positionable, which the VFS checks before anything else).
    pub fn pread(&self, offset: i64) -> Result<(), Error> {
        if offset < 0 {
            return Err(Error::NegativePosition { offset });
        }
        Err(Error::GmemNotPositionable { op: "read" })
    }

    /// pwrite at `offset`: as [`pread`](Self::pread).
    pub fn pwrite(&self, offset: i64) -> Result<(), Error> {
        if offset < 0 {
            return Err(Error::NegativePosition { offset });
        }
        Err(Error::GmemNotPositionable { op: "written" })
    }

    /// ftruncate to `len`: always EINVAL (negative lengths included).
    pub fn truncate(&self, _len: i64) -> Result<(), Error> {
        Err(Error::GmemFileOp { op: "truncated" })
    }

    /// `mmap(NULL, len, prot, flags, fd, offset)` on a host with `host`'s accounting.
    pub fn mmap(&self, req: &MmapRequest, host: &MmapHost) -> Result<(), Error> {
        let MmapRequest { len, offset, prot, flags } = *req;
        if offset & PAGE_MASK != 0 {
            return Err(Error::MmapInvalid { reason: "the offset is not page-aligned" });
        }
        if len == 0 {
            return Err(Error::MmapInvalid { reason: "the length is 0" });
        }
        let Some(aligned) = len.checked_add(PAGE_MASK).map(|l| l & !PAGE_MASK) else {
            return Err(Error::MmapNoMemory { len });
        };
        if aligned > TASK_SIZE {
            return Err(Error::MmapNoMemory { len });
        }
        // file_mmap_ok(): the mapping must end below the largest file offset.
        let max = i64::MAX.cast_unsigned();
        if aligned > max || offset > (max - aligned) & !PAGE_MASK {
            return Err(Error::MmapOverflow { offset, len });
        }
        match flags & libc::MAP_TYPE {
            libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE | libc::MAP_PRIVATE => {}
            _ => return Err(Error::MmapInvalid { reason: "neither MAP_SHARED nor MAP_PRIVATE" }),
        }
        if prot & libc::PROT_EXEC != 0 {
            return Err(Error::MmapExec);
        }
        // mmap_region(): accounting comes before the file's mmap method.
        let accounted = flags & libc::MAP_TYPE == libc::MAP_PRIVATE
            && prot & libc::PROT_WRITE != 0
            && flags & libc::MAP_NORESERVE == 0;
        if accounted && host.commit_limit.is_some_and(|limit| aligned > limit) {
            return Err(Error::MmapNoMemory { len });
        }
        if self.flags & FLAG_MMAP == 0 {
            return Err(Error::MmapUnsupported);
        }
        if flags & libc::MAP_TYPE == libc::MAP_PRIVATE {
            return Err(Error::MmapPrivate);
        }
        Ok(())
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub fn fallocate(&self, mode: i32, offset: i64, len: i64) -> Result<(), Error> {
        use falloc::*;
        // vfs_fallocate().
        if offset < 0 || len <= 0 {
            return Err(Error::FallocateRange { offset, len });
        }
        if mode & !(MODE_MASK | KEEP_SIZE) != 0 {
            return Err(Error::FallocateMode { mode });
        }
        let keep = mode & KEEP_SIZE != 0;
        let vfs_ok = match mode & MODE_MASK {
            0 | UNSHARE_RANGE | ZERO_RANGE => true,
            PUNCH_HOLE => keep,
            COLLAPSE_RANGE | INSERT_RANGE | WRITE_ZEROES => !keep,
            _ => false,
        };
        if !vfs_ok {
            return Err(Error::FallocateMode { mode });
        }
        let Some(end) = offset.checked_add(len) else {
            return Err(Error::FallocateTooBig { offset, len });
        };
        // kvm_gmem_fallocate().
        if !keep || mode & !(KEEP_SIZE | PUNCH_HOLE) != 0 {
            return Err(Error::FallocateMode { mode });
        }
        if offset.cast_unsigned() & PAGE_MASK != 0 || len.cast_unsigned() & PAGE_MASK != 0 {
            return Err(Error::FallocateUnaligned { offset, len });
        }
        if mode & PUNCH_HOLE == 0 && end.cast_unsigned() > self.size {
            return Err(Error::FallocatePastEof { offset, len });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(flags: u64) -> GmemFileModel {
        GmemFileModel::create(0x10_0000, flags, SUPPORTED_FLAGS).unwrap()
    }

    fn shared(len: u64) -> MmapRequest {
        MmapRequest { len, offset: 0, prot: libc::PROT_READ | libc::PROT_WRITE, flags: libc::MAP_SHARED }
    }

    #[test]
    fn create_with_unknown_flag_returns_einval() {
        assert_eq!(GmemFileModel::create(0x1000, 4, SUPPORTED_FLAGS).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn create_with_size_zero_unaligned_or_negative_returns_einval() {
        for size in [0, 0xfff, 1 << 63] {
            assert_eq!(GmemFileModel::create(size, 0, SUPPORTED_FLAGS).unwrap_err().errno(), libc::EINVAL);
        }
    }

    #[test]
    fn create_with_init_shared_alone_succeeds() {
        assert!(GmemFileModel::create(0x1000, FLAG_INIT_SHARED, SUPPORTED_FLAGS).is_ok());
    }

    #[test]
    fn read_write_and_truncate_return_einval() {
        let f = file(0);

        let errnos =
            [f.read(), f.write(), f.truncate(0x1000), f.truncate(-1)].map(|r| r.unwrap_err().errno());

        assert_eq!(errnos, [libc::EINVAL; 4]);
    }

    #[test]
    fn pread_and_pwrite_return_espipe_or_einval_for_negative_positions() {
        let f = file(0);

        let errnos =
            [f.pread(0), f.pwrite(0x1000), f.pread(-1), f.pwrite(-1)].map(|r| r.unwrap_err().errno());

        assert_eq!(errnos, [libc::ESPIPE, libc::ESPIPE, libc::EINVAL, libc::EINVAL]);
    }

    #[test]
    fn mmap_without_mmap_flag_returns_enodev() {
        assert_eq!(file(0).mmap(&shared(0x1000), &MmapHost::default()).unwrap_err().errno(), libc::ENODEV);
    }

    #[test]
    fn mmap_private_returns_einval() {
        let req = MmapRequest { flags: libc::MAP_PRIVATE, ..shared(0x1000) };

        assert_eq!(file(FLAG_MMAP).mmap(&req, &MmapHost::default()).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn mmap_shared_beyond_end_of_file_succeeds() {
        let req = MmapRequest { offset: 0x20_0000, ..shared(0x1000) };

        assert_eq!(file(FLAG_MMAP).mmap(&req, &MmapHost::default()), Ok(()));
    }

    #[test]
    fn private_writable_mapping_beyond_commit_limit_returns_enomem() {
        let host = MmapHost { commit_limit: Some(1 << 30) };
        let req = MmapRequest { len: 2 << 30, flags: libc::MAP_PRIVATE, ..shared(0) };

        assert_eq!(file(0).mmap(&req, &host).unwrap_err().errno(), libc::ENOMEM);
    }

    #[test]
    fn mmap_executable_returns_eperm() {
        let req = MmapRequest { prot: libc::PROT_READ | libc::PROT_EXEC, ..shared(0x1000) };

        assert_eq!(file(FLAG_MMAP).mmap(&req, &MmapHost::default()).unwrap_err().errno(), libc::EPERM);
    }

    #[test]
    fn fallocate_without_keep_size_returns_eopnotsupp() {
        assert_eq!(file(0).fallocate(0, 0, 0x1000).unwrap_err().errno(), libc::EOPNOTSUPP);
    }

    #[test]
    fn fallocate_zero_range_returns_eopnotsupp() {
        let mode = falloc::ZERO_RANGE | falloc::KEEP_SIZE;

        assert_eq!(file(0).fallocate(mode, 0, 0x1000).unwrap_err().errno(), libc::EOPNOTSUPP);
    }

    #[test]
    fn fallocate_unaligned_returns_einval() {
        assert_eq!(file(0).fallocate(falloc::KEEP_SIZE, 0x800, 0x1000).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn allocate_past_eof_returns_einval_but_punch_past_eof_succeeds() {
        let f = file(0);
        let punch = falloc::KEEP_SIZE | falloc::PUNCH_HOLE;

        let allocate = f.fallocate(falloc::KEEP_SIZE, 0xff000, 0x2000);
        let punched = f.fallocate(punch, 0xff000, 0x2000);

        assert_eq!((allocate.unwrap_err().errno(), punched), (libc::EINVAL, Ok(())));
    }

    #[test]
    fn fallocate_whose_end_overflows_returns_efbig() {
        let r = file(0).fallocate(falloc::KEEP_SIZE, i64::MAX - 0xfff, 0x2000);

        assert_eq!(r.unwrap_err().errno(), libc::EFBIG);
    }
}
