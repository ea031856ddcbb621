//! How the memslot model learns about file descriptors: a small trait the
//! caller implements (the KVM backend asks the kernel; a test keeps a table).

use crate::slot::{FileId, VmId};

/// What a descriptor refers to, when it is a guest_memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GmemFile {
    /// The file's identity (shared by every descriptor of the file).
    pub id: FileId,
    /// Its size in bytes (fixed at creation).
    pub size: u64,
    /// The VM that created it.
    pub owner: VmId,
}

/// Why a descriptor does not resolve to a guest_memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolveError {
    /// The descriptor is not open (EBADF).
    BadFd,
    /// It is open but is not a guest_memfd (EINVAL).
    NotGuestMemfd,
}

/// Resolves the `guest_memfd` descriptor of a request.
pub trait GmemResolver {
    /// The guest_memfd behind `fd`.
    fn resolve(&self, fd: i32) -> Result<GmemFile, ResolveError>;
}

/// A resolver for VMs that never bind guest_memfd: every descriptor is "not open".
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFiles;

impl GmemResolver for NoFiles {
    fn resolve(&self, _fd: i32) -> Result<GmemFile, ResolveError> {
        Err(ResolveError::BadFd)
    }
}

impl<F: Fn(i32) -> Result<GmemFile, ResolveError>> GmemResolver for F {
    fn resolve(&self, fd: i32) -> Result<GmemFile, ResolveError> {
        self(fd)
    }
}
