//! The crate's one error type, errno-compatible with Linux iommufd.

/// Errors of the IO address space manager; [`Error::errno`] gives the Linux errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No object with this id (or of the expected type).
    #[error("no such object {0}")]
    NoEnt(u32),
    /// Nothing (or not exactly whole areas) mapped in the range, or a hole.
    #[error("range {iova:#x}+{length:#x} is not (wholly) mapped")]
    NotMapped {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        length: u64,
    },
    /// An argument is invalid (zero length, misaligned, missing permission, ...).
    #[error("invalid argument: {0}")]
    Inval(&'static str),
    /// Address arithmetic would overflow.
    #[error("address range overflows")]
    Overflow,
    /// The object or range is in use.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// A fixed IOVA overlaps an existing area.
    #[error("IOVA range overlaps an existing area")]
    Exists,
    /// A duplicate (queue index, virtual device id).
    #[error("duplicate: {0}")]
    Duplicate(&'static str),
    /// No free IOVA span fits.
    #[error("no IOVA space left")]
    NoSpace,
    /// Range in use by an area, allowed or reserved range.
    #[error("address range in use")]
    AddrInUse,
    /// The caller's buffer is too small; `needed` entries are required.
    #[error("buffer too small, {needed} entries needed")]
    MsgSize {
        /// How many entries the full answer has.
        needed: usize,
    },
    /// The area is read-only (or write-only) for this request.
    #[error("permission denied by the area's protection")]
    Perm,
    /// The locked-memory limit would be exceeded.
    #[error("locked-memory limit exceeded")]
    NoMem,
    /// Memory is unusable: bad user memory or physically discontiguous.
    #[error("bad memory: {0}")]
    Fault(&'static str),
    /// Unmap kept finding new accesses (100 tries).
    #[error("unmap could not drain accesses")]
    Deadlock,
    /// A HW queue was allocated out of index order.
    #[error("HW queue allocated out of index order")]
    Io,
    /// A table could not be built (out of page-table frames, ...).
    #[error("IO page table")]
    Paging(#[from] memvisor_paging::Error),
}

impl Error {
    /// The Linux errno (positive `libc` constant) for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoEnt(_) | Error::NotMapped { .. } => libc::ENOENT,
            Error::Inval(_) => libc::EINVAL,
            Error::Overflow => libc::EOVERFLOW,
            Error::Busy(_) => libc::EBUSY,
            Error::Exists | Error::Duplicate(_) => libc::EEXIST,
            Error::NoSpace => libc::ENOSPC,
            Error::AddrInUse => libc::EADDRINUSE,
            Error::MsgSize { .. } => libc::EMSGSIZE,
            Error::Perm => libc::EPERM,
            Error::NoMem | Error::Paging(_) => libc::ENOMEM,
            Error::Fault(_) => libc::EFAULT,
            Error::Deadlock => libc::EDEADLK,
            Error::Io => libc::EIO,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
