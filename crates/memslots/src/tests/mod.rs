//! Unit and property tests of the whole crate (no `/dev/kvm` needed).

mod attributes;
mod lookups;
mod properties;
mod rules;

use memvisor_types::{Gpa, Hva};

use crate::{FileId, GmemFile, GmemResolver, MemslotRequest, Memslots, ResolveError, VmId};

/// The VM every test's memslots belong to.
const VM: VmId = VmId(1);
/// A user address that is page-aligned and far from the user-space limit.
const HVA: u64 = 0x7f00_0000_0000;

/// A table of descriptors: 10 → a 1 MiB guest_memfd of `VM`, 11 → a 64 KiB
/// one, 12 → another VM's, 3 → an ordinary file, anything else → not open.
struct Files;

impl GmemResolver for Files {
    fn resolve(&self, fd: i32) -> Result<GmemFile, ResolveError> {
        match fd {
            10 => Ok(GmemFile { id: FileId(10), size: 0x10_0000, owner: VM }),
            11 => Ok(GmemFile { id: FileId(11), size: 0x1_0000, owner: VM }),
            12 => Ok(GmemFile { id: FileId(12), size: 0x10_0000, owner: VmId(2) }),
            3 => Err(ResolveError::NotGuestMemfd),
            _ => Err(ResolveError::BadFd),
        }
    }
}

fn req(slot: u32, gpa: u64, size: u64, hva: u64) -> MemslotRequest {
    MemslotRequest::new(slot, Gpa::new(gpa), size, Hva::new(hva))
}

fn slots() -> Memslots {
    Memslots::new(VM)
}

/// Memslots holding one slot: id 0, gpa 1 MiB, 16 KiB, at `HVA`.
fn one_slot() -> Memslots {
    let mut s = slots();
    s.apply(&req(0, 0x10_0000, 0x4000, HVA), &Files).unwrap();
    s
}
