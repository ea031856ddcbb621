//! The kernel peer of the memslots suite: a real KVM VM whose memslots are
//! set with `KVM_SET_USER_MEMORY_REGION2`.

#![expect(
    unsafe_code,
    reason = "kvm-ioctls marks set_user_memory_region2 unsafe because the kernel may access the userspace \
              range as guest memory; this VM never creates a vCPU, so it never does"
)]

use anyhow::{Context, Result};
use kvm_bindings::kvm_userspace_memory_region2;
use kvm_ioctls::{Kvm, VmFd};

/// A VM used only for its memslots (no vCPU ever runs in it).
pub(crate) struct KvmVm {
    _kvm: Kvm,
    vm: VmFd,
}

impl KvmVm {
    /// A new VM, or `None` when `/dev/kvm` is absent.
    pub(crate) fn new() -> Result<Option<Self>> {
        if !std::path::Path::new("/dev/kvm").exists() {
            return Ok(None);
        }
        let kvm = Kvm::new().context("cannot open /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM failed")?;
        Ok(Some(Self { _kvm: kvm, vm }))
    }

    /// Creates (`size > 0`) or deletes (`size == 0`) slot `slot`.
    pub(crate) fn set(&self, slot: u32, gpa: u64, size: u64, hva: u64) -> Result<()> {
        let region = kvm_userspace_memory_region2 {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
            ..Default::default()
        };
        // SAFETY: the VM has no vCPU, so the kernel records the userspace
        // range but never reads or writes memory through it.
        unsafe { self.vm.set_user_memory_region2(region) }
            .with_context(|| format!("KVM_SET_USER_MEMORY_REGION2 slot {slot} gpa {gpa:#x} size {size:#x}"))
    }
}

/// The running kernel's release (`uname -r`).
pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}
