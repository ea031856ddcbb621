//! Host physical frame numbers from `/proc/self/pagemap` (no `unsafe`: plain
//! file reads). Needs root (CAP_SYS_ADMIN) for real PFNs; otherwise the kernel
//! reports 0 and the caller treats the page as unknown.

use std::fs::File;
use std::os::unix::fs::FileExt;

const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// PFNs of the `count` pages starting at the page-aligned `hva`; `None` for a
/// page that is not present or whose PFN is hidden.
pub(crate) fn pfns(hva: u64, count: u64) -> std::io::Result<Vec<Option<u64>>> {
    let file = File::open("/proc/self/pagemap")?;
    let len = usize::try_from(count.checked_mul(8).ok_or(std::io::ErrorKind::InvalidInput)?)
        .map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, (hva >> 12).checked_mul(8).ok_or(std::io::ErrorKind::InvalidInput)?)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let e = u64::from_le_bytes(b);
            let pfn = e & PFN_MASK;
            (e & PRESENT != 0 && pfn != 0).then_some(pfn)
        })
        .collect())
}
