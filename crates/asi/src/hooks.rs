//! ASI classes and their enter/exit hooks.
//!
//! A class says which mitigations run when a CPU switches into one of its
//! restricted spaces and when it switches out; the mitigations themselves are
//! callbacks ([`Mitigations`]) that a hypervisor backs with the real
//! operations (an `IA32_FLUSH_CMD` write, `VERW`, a stun IPI …) and tests
//! back with recorders.

use alloc::boxed::Box;
use alloc::string::String;
use core::fmt;

use crate::CpuId;

/// The mitigation operations a class's hooks can perform, as callbacks.
/// Every method defaults to doing nothing.
pub trait Mitigations {
    /// Flush the L1 data cache of `cpu` (L1TF).
    fn l1d_flush(&mut self, cpu: CpuId) {
        let _ = cpu;
    }

    /// Clear the CPU's internal buffers (MDS).
    fn clear_cpu_buffers(&mut self, cpu: CpuId) {
        let _ = cpu;
    }

    /// Stop the SMT siblings of `cpu` from running untrusted code (and make
    /// them leave it) until [`unstun_siblings`](Self::unstun_siblings).
    fn stun_siblings(&mut self, cpu: CpuId) {
        let _ = cpu;
    }

    /// Let the SMT siblings of `cpu` run untrusted code again.
    fn unstun_siblings(&mut self, cpu: CpuId) {
        let _ = cpu;
    }
}

/// Callbacks that do nothing (a KPTI-like class, or a test that only counts).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMitigations;

impl Mitigations for NoMitigations {}

/// Which mitigations a hook performs. On enter they run in the order
/// L1D flush, buffer clear, unstun (the sibling resumes only once this CPU's
/// caches hold nothing sensitive); on exit: stun, then the other two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookSet {
    /// Flush L1D.
    pub l1d_flush: bool,
    /// Clear CPU buffers.
    pub clear_buffers: bool,
    /// Stun the siblings.
    pub stun_siblings: bool,
    /// Unstun the siblings.
    pub unstun_siblings: bool,
}

impl HookSet {
    /// Nothing.
    pub const NONE: HookSet =
        HookSet { l1d_flush: false, clear_buffers: false, stun_siblings: false, unstun_siblings: false };

    pub(crate) fn run(self, cpu: CpuId, m: &mut dyn Mitigations, counts: &mut HookCounts) {
        if self.stun_siblings {
            m.stun_siblings(cpu);
            counts.stuns += 1;
        }
        if self.l1d_flush {
            m.l1d_flush(cpu);
            counts.l1d_flushes += 1;
        }
        if self.clear_buffers {
            m.clear_cpu_buffers(cpu);
            counts.buffer_clears += 1;
        }
        if self.unstun_siblings {
            m.unstun_siblings(cpu);
            counts.unstuns += 1;
        }
    }
}

/// How many times each mitigation ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookCounts {
    /// L1D flushes.
    pub l1d_flushes: u64,
    /// CPU buffer clears.
    pub buffer_clears: u64,
    /// Sibling stuns.
    pub stuns: u64,
    /// Sibling unstuns.
    pub unstuns: u64,
}

/// An ASI class: a name, the hooks of its enter and exit, and the callbacks
/// that perform them.
pub struct ClassConfig {
    /// A name for reports.
    pub name: String,
    /// Run when a CPU switches from the full space into one of the class's spaces.
    pub on_enter: HookSet,
    /// Run when a CPU switches from one of the class's spaces to the full space.
    pub on_exit: HookSet,
    /// The callbacks.
    pub mitigations: Box<dyn Mitigations>,
}

impl ClassConfig {
    /// The KVM class of the RFC: on exit stun the siblings; on enter flush
    /// L1D, clear CPU buffers and unstun the siblings.
    pub fn kvm(mitigations: Box<dyn Mitigations>) -> Self {
        Self {
            name: String::from("kvm"),
            on_enter: HookSet {
                l1d_flush: true,
                clear_buffers: true,
                stun_siblings: false,
                unstun_siblings: true,
            },
            on_exit: HookSet { stun_siblings: true, ..HookSet::NONE },
            mitigations,
        }
    }

    /// A KPTI-like class: switching the page tables is all the mitigation it needs.
    pub fn kpti() -> Self {
        Self {
            name: String::from("kpti"),
            on_enter: HookSet::NONE,
            on_exit: HookSet::NONE,
            mitigations: Box::new(NoMitigations),
        }
    }
}

impl fmt::Debug for ClassConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassConfig")
            .field("name", &self.name)
            .field("on_enter", &self.on_enter)
            .field("on_exit", &self.on_exit)
            .finish_non_exhaustive()
    }
}
