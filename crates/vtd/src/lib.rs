//! An Intel VT-d vIOMMU device model (seed 000): what a VMM places at
//! 0xfed90000 so a guest can program DMA remapping and interrupt remapping
//! for its devices, and what turns the guest's PASID entries into host IO
//! page tables on memvisor-ioas.
//!
//! | piece | where |
//! |---|---|
//! | configuration → CAP/ECAP (legacy, scalable second/first/nested, 39/48/57-bit) | [`Config`], [`Mode`] |
//! | the register file as a state machine (MMIO reads/writes, GCMD/GSTS, CCMD, IOTLB, IQ, faults) | [`regs`] |
//! | queued invalidation (descriptor types 1–9, 128/256-bit, IQE, wait) | [`qi`] |
//! | fault recording and fault events | [`fault`] |
//! | guest tables: root, context, PASID directory and table, reserved bits | [`tables`] |
//! | DMA translation in every mode and the caches | [`translate`], [`cache`] |
//! | interrupt remapping (IRTE, MSI and IOAPIC formats, source-id checks, IEC) | [`ir`] |
//! | the device: MMIO + DMA + interrupt entry points glued together | [`device::Vtd`] |
//! | host binding of PASID entries to iommufd HWPTs (seed 000) | [`bind`] |
//! | vm-memory 0.18 `Iommu` (feature `iommu`) | `iommu` |
//!
//! Everything the guest writes — registers, tables, descriptors — is
//! untrusted input: the model never panics on it, and reports what hardware
//! would report (a fault record, IQE, a remapping fault).
//!
//! Sources for formats and semantics: the Intel VT-d specification (rev
//! 4.x/5.x), QEMU `hw/i386/intel_iommu.c`, Linux `drivers/iommu/intel/`;
//! see `reference/vtd.md` in the shared notes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bind;
pub mod cache;
pub mod device;
pub mod encode;
pub mod fault;
#[cfg(feature = "iommu")]
pub mod iommu;
pub mod ir;
pub mod memory;
pub mod qi;
pub mod regs;
pub mod tables;
pub mod translate;

pub use memory::{GuestMemory, TestMemory};

/// Which translation modes the unit offers (what CAP/ECAP advertise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Legacy root/context tables, second-stage (multi-level) and pass-through.
    Legacy,
    /// Scalable mode, second-stage only (ECAP.SSTS), PGTT 2 and 4.
    ScalableSecondStage,
    /// Scalable mode, first-stage only (ECAP.FSTS), PGTT 1 and 4.
    ScalableFirstStage,
    /// Scalable mode with first- and second-stage and nesting (PGTT 1–4);
    /// beyond QEMU, which never advertises both.
    ScalableNested,
}

impl Mode {
    /// Whether the unit supports scalable-mode tables (ECAP.SMTS).
    pub fn scalable(self) -> bool {
        !matches!(self, Mode::Legacy)
    }
}

/// Configuration of one VT-d unit. [`Default`] is legacy mode, 48-bit,
/// interrupt remapping, one fault record, caching mode off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Translation modes.
    pub mode: Mode,
    /// Guest address width (SAGAW/MGAW and first-stage 5-level support): 39, 48 or 57.
    pub address_width: u8,
    /// Host (output) address width: output address bits above it are reserved. 39..=52.
    pub host_address_width: u8,
    /// Number of fault-recording registers (CAP.NFR + 1), 1..=256.
    pub fault_records: u16,
    /// CAP.CM: not-present and erroneous entries may be cached, so software
    /// must invalidate after making an entry present (what a VMM shadowing
    /// the tables needs).
    pub caching_mode: bool,
    /// ECAP.IR: interrupt remapping.
    pub interrupt_remapping: bool,
    /// ECAP.EIM: extended interrupt mode (x2APIC, 32-bit destination IDs).
    pub x2apic: bool,
    /// ECAP.PT: pass-through translation type.
    pub pass_through: bool,
    /// CAP.SLLPS (2M, 1G second-stage pages) and CAP.FS1GP (1G first-stage pages).
    pub large_pages: bool,
    /// ECAP.PSS: PASID width in bits (1..=20) in scalable mode.
    pub pasid_bits: u8,
    /// Entries of the IOTLB (per unit); 0 disables caching of translations.
    pub iotlb_entries: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Legacy,
            address_width: 48,
            host_address_width: 46,
            fault_records: 1,
            caching_mode: false,
            interrupt_remapping: true,
            x2apic: true,
            pass_through: true,
            large_pages: true,
            pasid_bits: 20,
            iotlb_entries: 4096,
        }
    }
}

/// A PCI requester (source) id: bus in 15:8, device 7:3, function 2:0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceId(pub u16);

impl SourceId {
    /// The id of `bus:dev.func`; `dev` and `func` are masked to 5 and 3 bits.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        Self(((bus as u16) << 8) | (((dev & 0x1f) as u16) << 3) | ((func & 7) as u16))
    }
    /// Bus number (root-table index).
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Device and function (context-table index).
    pub const fn devfn(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

/// Where a fault came from: a DMA translation or an interrupt request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultSource {
    /// DMA remapping.
    Dma,
    /// Interrupt remapping (the address field holds the interrupt index in 63:48).
    Interrupt,
}

/// One fault the unit records (a fault-recording register's content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultInfo {
    /// DMA or interrupt remapping.
    pub source: FaultSource,
    /// Requester.
    pub sid: SourceId,
    /// PASID of a request-with-PASID.
    pub pasid: Option<u32>,
    /// Faulting page address (DMA) or `index << 48` (interrupt).
    pub addr: u64,
    /// The specification's fault reason code (see [`tables::reason`]).
    pub reason: u8,
    /// Write request (DMA).
    pub write: bool,
    /// Execute request.
    pub exec: bool,
    /// Supervisor-privileged request.
    pub privileged: bool,
}

/// Scope of a context-cache invalidation (CCMD register or descriptor type 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContextInval {
    /// Everything.
    Global,
    /// Entries of one domain.
    Domain(u16),
    /// Entries of the sources matching `sid` under function mask `fm` (0–3: ignore 0–3 low function bits).
    Device {
        /// Domain id.
        did: u16,
        /// Source id.
        sid: SourceId,
        /// Function mask.
        fm: u8,
    },
}

/// Scope of an IOTLB invalidation (IOTLB register or descriptor type 2); also
/// drops second-stage paging-structure cache entries of the scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IotlbInval {
    /// Everything.
    Global,
    /// One domain.
    Domain(u16),
    /// `2^am` pages at `addr` (aligned down) of one domain; `ih` keeps paging-structure caches.
    Page {
        /// Domain id.
        did: u16,
        /// Address (4 KiB aligned).
        addr: u64,
        /// Address mask: 2^am pages.
        am: u8,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
}

/// Scope of a PASID-cache invalidation (descriptor type 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasidCacheInval {
    /// All PASID entries of a domain (granularity 0).
    Domain(u16),
    /// One PASID of a domain (granularity 1).
    Pasid {
        /// Domain id.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// Everything (granularity 3).
    Global,
}

/// Scope of a PASID-based IOTLB invalidation (descriptor type 6): first-stage
/// and nested translations, and the paging-structure caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PiotlbInval {
    /// All mappings of `pasid` in domain `did` (granularity 2).
    Pasid {
        /// Domain id.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// `2^am` pages at `addr` (granularity 3).
    Page {
        /// Domain id.
        did: u16,
        /// PASID.
        pasid: u32,
        /// Address (4 KiB aligned).
        addr: u64,
        /// 2^am pages.
        am: u8,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
}

/// Scope of an interrupt-entry-cache invalidation (ICC in GCMD/descriptor type 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IecInval {
    /// All entries.
    Global,
    /// `2^im` entries starting at `index`.
    Index {
        /// First interrupt index.
        index: u16,
        /// Index mask.
        im: u8,
    },
}

/// One invalidation the guest requested, by register or queued descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Invalidation {
    /// Context cache.
    Context(ContextInval),
    /// IOTLB (and second-stage paging-structure caches).
    Iotlb(IotlbInval),
    /// PASID cache.
    PasidCache(PasidCacheInval),
    /// PASID-based IOTLB.
    Piotlb(PiotlbInval),
    /// Interrupt entry cache.
    Iec(IecInval),
    /// Device-TLB (types 3 and 8): accepted, nothing cached by emulated devices.
    DeviceTlb,
}

/// A change of global state the guest made through GCMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateChange {
    /// SRTP latched a new root-table pointer (and TTM).
    RootTable,
    /// GCMD.TE changed.
    TranslationEnable(bool),
    /// SIRTP latched a new interrupt-remapping table pointer.
    IrTable,
    /// GCMD.IRE changed.
    IrEnable(bool),
}

/// An MSI the unit sends (fault event, invalidation-completion event) or a
/// remapped interrupt it delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Msi {
    /// Address (0xfeeX_XXXX in the low 32 bits; upper bits for x2APIC).
    pub addr: u64,
    /// Data.
    pub data: u32,
}

/// Where the unit's own interrupts (fault events, invalidation-completion
/// events) go; a VMM delivers them through KVM.
pub trait InterruptSink {
    /// Deliver `msi`.
    fn send(&mut self, msi: Msi);
}

/// An [`InterruptSink`] that records what it was sent (tests, fuzzing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordingSink {
    /// MSIs in the order sent.
    pub sent: Vec<Msi>,
}

impl InterruptSink for RecordingSink {
    fn send(&mut self, msi: Msi) {
        self.sent.push(msi);
    }
}

/// Errors of the VMM-facing API (configuration and host binding). Guest
/// mistakes are not errors: they become faults the guest sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid VT-d configuration: {0}")]
    Config(&'static str),
    /// An MMIO access of an unsupported size or alignment.
    #[error("unsupported register access at {offset:#x} of {size} bytes")]
    Access {
        /// Register offset.
        offset: u64,
        /// Access size.
        size: u32,
    },
    /// The host IOMMU (memvisor-ioas) refused an operation.
    #[error("host IOMMU: {0}")]
    Host(#[from] memvisor_ioas::Error),
}

impl Error {
    /// The Linux errno closest to this error (EINVAL for configuration and
    /// access errors; the host error's own errno).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Access { .. } => 22,
            Error::Host(e) => e.errno(),
        }
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the unit has latched about the guest's translation structures
/// (GCMD.SRTP and GCMD.TE): the input of every table walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RootState {
    /// Latched root-table address (RTADDR 63:12).
    pub rtaddr: u64,
    /// Latched RTADDR.TTM selects scalable-mode tables.
    pub scalable: bool,
    /// GSTS.TES: DMA remapping enabled (otherwise DMA is untranslated).
    pub enabled: bool,
}

/// Read access to the guest's structures for an [`Observer`], at the
/// moment of the event.
pub trait GuestTables {
    /// The latched root state.
    fn root(&self) -> RootState;
    /// The scalable-mode PASID entry of `sid`/`pasid`: `Ok(None)` when
    /// some level (root, context, PASID directory, entry) is not present,
    /// `Err(reason)` when an entry is malformed (reserved bits, bad PGTT).
    fn pasid_entry(&self, sid: SourceId, pasid: u32) -> Result<Option<tables::PasidEntry>, u8>;
    /// RID_PASID of `sid`'s scalable-mode context entry (`Ok(None)` if not present).
    fn rid_pasid(&self, sid: SourceId) -> Result<Option<u32>, u8>;
}

/// Told of every invalidation and global state change the unit processed,
/// after its own caches were updated (host binding, seed 000).
pub trait Observer: Send {
    /// The guest requested `inv` (register-based or queued).
    fn invalidated(&mut self, inv: &Invalidation, tables: &dyn GuestTables);
    /// The guest changed global state through GCMD.
    fn state_changed(&mut self, change: StateChange, tables: &dyn GuestTables);
}
