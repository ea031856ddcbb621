//! What a stage-2 entry points at: the host's view of a backing page.
//!
//! memvisor's stage 2 maps a GPA to the *host address* of the page backing
//! it. For a userspace VMM that is the host-virtual address (a VMM reaches
//! guest memory through its own mappings), so [`HvaIdentity`] returns the
//! HVA itself; a hardware backend would return the page frame it pinned
//! (KVM's `gfn_to_pfn`), and a test can model page replacement.

use memvisor_memslots::{Backing, FileId};
use memvisor_types::PageSize;

/// A host page found for a backing address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostPage {
    /// Host address of the 4 KiB page holding the backing address (what the
    /// stage-2 leaf stores for a 4K mapping).
    pub addr: u64,
    /// Whether the host allows writes to it.
    pub writable: bool,
    /// The largest naturally aligned block, containing the page, that the
    /// host maps contiguously (a large stage-2 page needs it).
    pub max_size: PageSize,
}

/// Resolves backing addresses to host pages (KVM's `__gfn_to_pfn_memslot` /
/// `kvm_gmem_get_pfn`). Called by the fault slow path without the MMU lock,
/// after the invalidation sequence was sampled; may block.
pub trait HostPages: Send + Sync + core::fmt::Debug {
    /// The host page backing `backing` (page-aligned), or `None` if the host
    /// has none (the fault ends in [`FaultOutcome::HostFault`](crate::FaultOutcome::HostFault)).
    fn lookup(&self, backing: Backing, write: bool) -> Option<HostPage>;
}

/// Userspace-VMM host: shared memory maps to its HVA; private memory to its
/// guest_memfd mapping (`mmap` of a guest_memfd created with the MMAP flag)
/// when one was registered, else the access has no host page.
#[derive(Debug, Clone, Default)]
pub struct HvaIdentity {
    gmem: Vec<(FileId, u64)>,
}

impl HvaIdentity {
    /// Shared memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also maps private memory of `file` through its mapping at host
    /// address `base` (offset 0 of the file).
    #[must_use]
    pub fn with_gmem_mapping(mut self, file: FileId, base: u64) -> Self {
        self.gmem.push((file, base));
        self
    }
}

impl HostPages for HvaIdentity {
    fn lookup(&self, backing: Backing, _write: bool) -> Option<HostPage> {
        let addr = match backing {
            Backing::Shared(hva) => hva.as_u64(),
            Backing::Private { file, offset } => {
                let &(_, base) = self.gmem.iter().find(|(f, _)| *f == file)?;
                base.checked_add(offset)?
            }
        };
        Some(HostPage { addr: addr & !0xfff, writable: true, max_size: PageSize::Size1G })
    }
}
