//! The pin case's reference: the kernel pinning the same host memory with
//! `mlock(2)` and releasing it with `munlock(2)`.

#![expect(
    unsafe_code,
    reason = "mlock/munlock are system calls on a raw address range; the range is one the caller keeps mapped"
)]

use anyhow::{Result, bail};
use memvisor_types::{Address, Hva};

/// A host range that the bench keeps mapped while it locks and unlocks it.
#[derive(Debug)]
pub(crate) struct Lockable {
    addr: usize,
    len: usize,
}

impl Lockable {
    /// The range `hva..hva+len`; the caller keeps it mapped for the value's lifetime.
    pub(crate) fn new(hva: Hva, len: u64) -> Result<Self> {
        Ok(Self { addr: usize::try_from(hva.raw())?, len: usize::try_from(len)? })
    }

    /// `mlock` of the range (faults it in the first time).
    pub(crate) fn lock(&self) -> Result<()> {
        // SAFETY: mlock only changes the locking of the pages of this
        // process's own range, which the caller keeps mapped; it reads or
        // writes no Rust-visible memory.
        let rc =
            unsafe { libc::mlock(std::ptr::with_exposed_provenance::<libc::c_void>(self.addr), self.len) };
        if rc != 0 {
            bail!("mlock: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `munlock` of the range.
    pub(crate) fn unlock(&self) -> Result<()> {
        // SAFETY: as for `lock`: only the locking of the caller's mapped range changes.
        let rc =
            unsafe { libc::munlock(std::ptr::with_exposed_provenance::<libc::c_void>(self.addr), self.len) };
        if rc != 0 {
            bail!("munlock: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}
