//! `/dev/kvm`, VMs, capabilities, memslots and dirty logging.

use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    CpuId, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS, KVM_CAP_READONLY_MEM, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_USER_MEMORY2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_IRQ_ROUTING_MSI,
    KVM_MAX_CPUID_ENTRIES, KvmIrqRouting, kvm_enable_cap, kvm_irq_routing_entry,
    kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, kvm_msi,
};
use kvm_ioctls::VmFd;
use memvisor_hostmem::{GuestRam, RamRegion, page_size};
use memvisor_types::{Address, Gpa};

use crate::dirty::{DirtyBitmap, DirtyRing};
use crate::memslot::SlotTable;
use crate::{Error, GuestMemfd, Memslot, MemslotFlags, Result, Vcpu, sys};

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (`include/uapi/linux/kvm.h`, Linux 6.18): the
/// guest_memfd creation flags this VM accepts. kvm-bindings 0.14 lacks it.
const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// One MSI route of the VM's GSI routing table ([`Vm::set_msi_routes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    /// The GSI.
    pub gsi: u32,
    /// The MSI address.
    pub address: u64,
    /// The MSI data.
    pub data: u32,
}

/// An open `/dev/kvm`.
#[derive(Debug)]
pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
}

impl Kvm {
    /// Opens `/dev/kvm`.
    pub fn open() -> Result<Self> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| Error::kvm("open /dev/kvm", e))?;
        Ok(Self { kvm })
    }

    /// Creates a VM of the default type.
    pub fn create_vm(&self) -> Result<Vm> {
        let fd = self.kvm.create_vm().map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(Vm {
            inner: Arc::new(VmInner {
                fd,
                slots: SlotTable::default(),
                cpuid,
                dirty_ring_bytes: OnceLock::new(),
            }),
        })
    }

    /// `KVM_CHECK_EXTENSION` on the system fd.
    pub fn check_extension(&self, cap: u32) -> i32 {
        self.kvm.check_extension_raw(u64::from(cap))
    }

    /// The kvm-ioctls handle, for ioctls this crate does not wrap.
    pub fn raw(&self) -> &kvm_ioctls::Kvm {
        &self.kvm
    }
}

/// What a VM supports, from `KVM_CHECK_EXTENSION` on the VM fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `KVM_SET_USER_MEMORY_REGION2`.
    pub user_memory2: bool,
    /// `KVM_CREATE_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// Accepted guest_memfd flags (`KVM_CAP_GUEST_MEMFD_FLAGS`).
    pub guest_memfd_flags: u64,
    /// Supported memory attributes (`KVM_CAP_MEMORY_ATTRIBUTES`; 0 = none).
    pub memory_attributes: u64,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags (0 = unsupported).
    pub manual_dirty_log_protect: u64,
    /// Largest dirty ring in bytes (0 = no dirty ring).
    pub dirty_ring_max_bytes: u32,
    /// Whether the ring is offered with acquire/release semantics
    /// (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
    pub dirty_ring_acq_rel: bool,
    /// Usable memslots per address space.
    pub memslots: u32,
    /// Address spaces (1 unless `KVM_CAP_MULTI_ADDRESS_SPACE` says more).
    pub address_spaces: u32,
    /// `KVM_MEM_READONLY`.
    pub readonly_mem: bool,
}

/// Fields are dropped in declaration order: the VM fd is closed before the
/// slot table releases the memory KVM had registered. vCPUs hold an
/// `Arc<VmInner>`, so they are all gone by then.
#[derive(Debug)]
pub(crate) struct VmInner {
    pub(crate) fd: VmFd,
    slots: SlotTable,
    pub(crate) cpuid: CpuId,
    pub(crate) dirty_ring_bytes: OnceLock<u32>,
}

/// A KVM virtual machine and the memslots registered through it.
///
/// Memslot methods take `&self` and are serialised internally (KVM
/// serialises them too, under `slots_lock`).
#[derive(Debug)]
pub struct Vm {
    inner: Arc<VmInner>,
}

fn cap_u64(v: i32) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Vm {
    /// `KVM_CHECK_EXTENSION` on the VM fd (negative on error, 0 = absent).
    pub fn check_extension(&self, cap: u32) -> i32 {
        self.inner.fd.check_extension_raw(u64::from(cap))
    }

    /// The VM's memory-related capabilities.
    pub fn capabilities(&self) -> Capabilities {
        let c = |cap| self.check_extension(cap);
        let ring = c(KVM_CAP_DIRTY_LOG_RING_ACQ_REL).max(c(KVM_CAP_DIRTY_LOG_RING));
        Capabilities {
            user_memory2: c(KVM_CAP_USER_MEMORY2) > 0,
            guest_memfd: c(KVM_CAP_GUEST_MEMFD) > 0,
            guest_memfd_flags: cap_u64(c(KVM_CAP_GUEST_MEMFD_FLAGS)),
            memory_attributes: cap_u64(c(KVM_CAP_MEMORY_ATTRIBUTES)),
            manual_dirty_log_protect: cap_u64(c(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)),
            dirty_ring_max_bytes: u32::try_from(ring).unwrap_or(0),
            dirty_ring_acq_rel: c(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0,
            memslots: u32::try_from(c(KVM_CAP_NR_MEMSLOTS)).unwrap_or(0),
            address_spaces: u32::try_from(c(KVM_CAP_MULTI_ADDRESS_SPACE)).unwrap_or(0).max(1),
            readonly_mem: c(KVM_CAP_READONLY_MEM) > 0,
        }
    }

    /// The kvm-ioctls VM handle, for ioctls this crate does not wrap. Memslots
    /// set through it bypass the ownership tracking of [`set_memslot`](Self::set_memslot).
    pub fn raw(&self) -> &VmFd {
        &self.inner.fd
    }

    // ---- memslots -------------------------------------------------------

    /// Creates a slot, or modifies the slot with the same id (a move if only
    /// the GPA differs, a flags change if only `LOG_DIRTY_PAGES` differs —
    /// KVM decides and returns its errno otherwise). The slot's memory stays
    /// alive until the slot is deleted or replaced. Returns the replaced slot.
    pub fn set_memslot(&self, slot: Memslot) -> Result<Option<Memslot>> {
        self.inner.slots.apply(&self.inner.fd, slot)
    }

    /// Deletes slot `id`; returns it (with its memory) if it was registered here.
    pub fn delete_memslot(&self, id: u32) -> Result<Option<Memslot>> {
        self.inner.slots.delete(&self.inner.fd, id)
    }

    /// Moves registered slot `id` to `gpa` (KVM_MR_MOVE: same memory, same
    /// flags; not allowed for guest_memfd slots, which are immutable).
    pub fn move_memslot(&self, id: u32, gpa: Gpa) -> Result<()> {
        let slot = self.inner.slots.get(id).ok_or(Error::NoSuchSlot(id))?;
        self.set_memslot(slot.at(gpa)).map(drop)
    }

    /// Changes the flags of registered slot `id` (KVM_MR_FLAGS_ONLY for
    /// `LOG_DIRTY_PAGES`).
    pub fn set_memslot_flags(&self, id: u32, flags: MemslotFlags) -> Result<()> {
        let slot = self.inner.slots.get(id).ok_or(Error::NoSuchSlot(id))?;
        self.set_memslot(slot.with_flags(flags)).map(drop)
    }

    /// Registered slot `id`.
    pub fn memslot(&self, id: u32) -> Option<Memslot> {
        self.inner.slots.get(id)
    }

    /// All registered slots, by id.
    pub fn memslots(&self) -> Vec<Memslot> {
        self.inner.slots.snapshot()
    }

    /// The registered slots of address space 0 as memvisor guest RAM — the
    /// VMM's GPA → HVA path (and a vm-memory backend).
    pub fn guest_ram(&self) -> Result<GuestRam> {
        let regions = self
            .memslots()
            .into_iter()
            .filter(|s| s.id() >> 16 == 0)
            .map(|s| RamRegion::with_offset(s.gpa(), Arc::clone(s.memory()), 0, s.len()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GuestRam::new(regions)?)
    }

    // ---- guest_memfd ------------------------------------------------------

    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes with `flags`
    /// ([`GUEST_MEMFD_FLAG_MMAP`](crate::GUEST_MEMFD_FLAG_MMAP),
    /// [`GUEST_MEMFD_FLAG_INIT_SHARED`](crate::GUEST_MEMFD_FLAG_INIT_SHARED)).
    pub fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<GuestMemfd> {
        GuestMemfd::create(&self.inner.fd, size, flags)
    }

    // ---- dirty logging ----------------------------------------------------

    /// `KVM_GET_DIRTY_LOG` for registered slot `id`. Without manual protect
    /// this also clears the log and write-protects the pages again; with it
    /// ([`enable_manual_dirty_log_protect`](Self::enable_manual_dirty_log_protect))
    /// only [`clear_dirty_log`](Self::clear_dirty_log) does.
    pub fn get_dirty_log(&self, id: u32) -> Result<DirtyBitmap> {
        let slot = self.inner.slots.get(id).ok_or(Error::NoSuchSlot(id))?;
        let len = usize::try_from(slot.len())
            .map_err(|_| Error::TooLarge { what: "slot size", value: slot.len() })?;
        let words = self.inner.fd.get_dirty_log(id, len).map_err(|e| Error::kvm("KVM_GET_DIRTY_LOG", e))?;
        Ok(DirtyBitmap::new(id, slot.gpa(), slot.len() / page_size(), words))
    }

    /// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `KVM_GET_DIRTY_LOG` stops
    /// clearing, and pages are re-protected only by `KVM_CLEAR_DIRTY_LOG`.
    /// With `initially_set`, newly logged slots start all-dirty and are not
    /// write-protected until cleared.
    pub fn enable_manual_dirty_log_protect(&self, initially_set: bool) -> Result<()> {
        let mut args = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        if initially_set {
            args |= u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
        }
        self.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args)
    }

    /// `KVM_CLEAR_DIRTY_LOG` for the pages set in `bitmap` (as returned by
    /// [`get_dirty_log`](Self::get_dirty_log)): they are write-protected
    /// again and their bits cleared.
    pub fn clear_dirty_log(&self, bitmap: &DirtyBitmap) -> Result<()> {
        let pages = u32::try_from(bitmap.pages())
            .map_err(|_| Error::TooLarge { what: "clear-dirty-log page count", value: bitmap.pages() })?;
        let mut words = bitmap.words().to_vec();
        self.clear_dirty_pages(bitmap.slot(), 0, pages, &mut words)
    }

    /// `KVM_CLEAR_DIRTY_LOG` for `num_pages` pages of slot `id` from
    /// `first_page` (a multiple of 64; `num_pages` too unless the range ends
    /// the slot — KVM returns EINVAL otherwise); bit `i` of `bitmap` is page
    /// `first_page + i`.
    pub fn clear_dirty_pages(
        &self,
        id: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &mut [u64],
    ) -> Result<()> {
        sys::clear_dirty_log(&self.inner.fd, id, first_page, num_pages, bitmap)
    }

    /// Enables the dirty ring with `bytes` per vCPU (a power of two, at most
    /// [`Capabilities::dirty_ring_max_bytes`]). Must precede every
    /// [`create_vcpu`](Self::create_vcpu) (KVM: EINVAL otherwise). Uses the
    /// acquire/release variant when offered; the harvesting code follows its
    /// ordering rules either way.
    pub fn enable_dirty_ring(&self, bytes: u32) -> Result<()> {
        let cap = if self.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0 {
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        } else {
            KVM_CAP_DIRTY_LOG_RING
        };
        self.enable_cap(cap, u64::from(bytes))?;
        // A second successful enable with another size is impossible (KVM
        // returns EINVAL once a ring size is set), so the first value holds.
        let _ = self.inner.dirty_ring_bytes.set(bytes);
        Ok(())
    }

    /// The dirty ring size per vCPU, if enabled.
    pub fn dirty_ring_bytes(&self) -> Option<u32> {
        self.inner.dirty_ring_bytes.get().copied()
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects every entry harvested from every
    /// vCPU's ring; returns how many were reset.
    pub fn reset_dirty_rings(&self) -> Result<u32> {
        sys::reset_dirty_rings(&self.inner.fd)
    }

    /// The guest-physical address of a dirty-ring entry, through the slot table.
    pub fn dirty_gfn_gpa(&self, gfn: crate::DirtyGfn) -> Option<Gpa> {
        let slot = self.inner.slots.get(gfn.slot)?;
        let offset = gfn.offset.checked_mul(page_size()).filter(|o| *o < slot.len())?;
        slot.gpa().checked_add(offset)
    }

    fn enable_cap(&self, cap: u32, arg0: u64) -> Result<()> {
        let mut req = kvm_enable_cap { cap, ..Default::default() };
        req.args[0] = arg0;
        self.inner.fd.enable_cap(&req).map_err(|e| Error::kvm("KVM_ENABLE_CAP", e))
    }

    // ---- interrupts ---------------------------------------------------------

    /// `KVM_CAP_SPLIT_IRQCHIP` with `ioapic_pins` routes reserved for a
    /// userspace I/O APIC: local APICs are emulated in the kernel, the I/O
    /// APIC and PIC are the VMM's (their MMIO and ports exit to it), and
    /// interrupts come in as MSIs ([`signal_msi`](Self::signal_msi)). Must
    /// precede every [`create_vcpu`](Self::create_vcpu).
    pub fn enable_split_irqchip(&self, ioapic_pins: u32) -> Result<()> {
        self.enable_cap(KVM_CAP_SPLIT_IRQCHIP, u64::from(ioapic_pins))
    }

    /// `KVM_SIGNAL_MSI`: delivers the message `data` written to `address`
    /// to the in-kernel local APICs. Returns whether some APIC accepted it
    /// (`false`: blocked or no destination — as on hardware, not an error).
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<bool> {
        let msi = kvm_msi {
            address_lo: u32::try_from(address & 0xffff_ffff).unwrap_or(0),
            address_hi: u32::try_from(address >> 32).unwrap_or(0),
            data,
            ..Default::default()
        };
        let delivered = self.inner.fd.signal_msi(msi).map_err(|e| Error::kvm("KVM_SIGNAL_MSI", e))?;
        Ok(delivered > 0)
    }

    /// `KVM_SET_GSI_ROUTING` with one MSI route per entry of `routes`,
    /// replacing the whole table. With a split irqchip, routes for GSIs
    /// below the reserved I/O APIC pin count tell KVM which vectors a
    /// userspace I/O APIC delivers level-triggered (MSI data bit 15): the
    /// local APIC's EOI of such a vector exits with `KVM_EXIT_IOAPIC_EOI`
    /// ([`ExitHandler::ioapic_eoi`](crate::ExitHandler::ioapic_eoi)).
    pub fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        let mut table = KvmIrqRouting::new(routes.len())
            .map_err(|_| Error::TooLarge { what: "GSI routing table entries", value: routes.len() as u64 })?;
        for (entry, route) in table.as_mut_slice().iter_mut().zip(routes) {
            *entry = kvm_irq_routing_entry {
                gsi: route.gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: u32::try_from(route.address & 0xffff_ffff).unwrap_or(0),
                        address_hi: u32::try_from(route.address >> 32).unwrap_or(0),
                        data: route.data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            };
        }
        self.inner.fd.set_gsi_routing(&table).map_err(|e| Error::kvm("KVM_SET_GSI_ROUTING", e))
    }

    // ---- vCPUs -----------------------------------------------------------

    /// Creates vCPU `id` with the host's supported CPUID (its initial APIC
    /// id set to `id`, as KVM sets the local APIC's), and maps its dirty
    /// ring if the ring is enabled.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu> {
        let fd = self.inner.fd.create_vcpu(id).map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
        let apic_id = u32::try_from(id).map_err(|_| Error::TooLarge { what: "vCPU id", value: id })?;
        let mut cpuid = self.inner.cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // CPUID.1:EBX[31:24]: initial (xAPIC) id.
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (apic_id & 0xff) << 24,
                // CPUID.0BH / 1FH:EDX: x2APIC id.
                0xb | 0x1f => entry.edx = apic_id,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid).map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
        let ring = self.dirty_ring_bytes().map(|bytes| DirtyRing::map(&fd, bytes)).transpose()?;
        Ok(Vcpu::new(id, fd, Arc::clone(&self.inner), ring))
    }

    /// MAXPHYADDR the vCPUs report (CPUID 0x8000_0008 EAX bits 7:0; 36 if absent).
    pub fn phys_addr_width(&self) -> u8 {
        self.inner
            .cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .and_then(|e| u8::try_from(e.eax & 0xff).ok())
            .unwrap_or(36)
    }
}
