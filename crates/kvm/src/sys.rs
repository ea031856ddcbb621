//! Raw KVM ioctls that kvm-ioctls 0.25 lacks, and the other few calls that
//! need `unsafe`: adopting a guest_memfd descriptor, reading `kvm_run` union
//! fields, and kicking a vCPU thread out of `KVM_RUN` with a signal.
//!
//! ioctl numbers from Linux `include/uapi/linux/kvm.h`:
//! `KVM_CLEAR_DIRTY_LOG _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`,
//! `KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)`.

#![expect(
    unsafe_code,
    reason = "ioctls on KVM file descriptors, adopting a descriptor KVM returned, kvm_run union reads, pthread_kill"
)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_run};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

use crate::{Error, Result};

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages of `slot` whose bits are set
/// in `bitmap` (bit i = page `first_page + i`).
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> Result<()> {
    // KVM reads ceil(num_pages / 64) words (kvm_clear_dirty_log_protect).
    let words = usize::try_from(num_pages.div_ceil(64)).unwrap_or(usize::MAX);
    if bitmap.len() < words {
        return Err(Error::TooLarge { what: "clear-dirty-log page count", value: u64::from(num_pages) });
    }
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 { dirty_bitmap: bitmap.as_mut_ptr().cast() },
    };
    // SAFETY: `vm` is a VM fd; the bitmap pointer is valid for the
    // `num_pages` bits KVM reads (checked above) during the call.
    let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if rc < 0 {
        return Err(Error::last_os("KVM_CLEAR_DIRTY_LOG"));
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects every harvested (RESET-flagged) entry
/// of every vCPU's ring; returns the number of entries reset.
pub(crate) fn reset_dirty_rings(vm: &VmFd) -> Result<u32> {
    // SAFETY: `vm` is a VM fd; the ioctl takes no argument.
    let rc = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    u32::try_from(rc).map_err(|_| Error::last_os("KVM_RESET_DIRTY_RINGS"))
}

/// Takes ownership of the descriptor `KVM_CREATE_GUEST_MEMFD` returned.
pub(crate) fn adopt_guest_memfd(fd: RawFd) -> OwnedFd {
    // SAFETY: kvm-ioctls' create_guest_memfd returns a descriptor the kernel
    // just created and that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A new descriptor for the file behind `fd` (e.g. a vCPU, to map its dirty ring).
pub(crate) fn dup(fd: &impl AsRawFd) -> Result<OwnedFd> {
    // SAFETY: `fd` is borrowed for the duration of the call, so its
    // descriptor stays open while it is duplicated.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    borrowed.try_clone_to_owned().map_err(|e| Error::Kvm { op: "dup", source: e })
}

/// `kvm_run.internal` after a `KVM_EXIT_INTERNAL_ERROR`: suberror and data.
pub(crate) fn internal_error(run: &kvm_run) -> (u32, Vec<u64>) {
    // SAFETY: called only when exit_reason is KVM_EXIT_INTERNAL_ERROR, for
    // which the kernel fills the `internal` member of the union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = usize::try_from(internal.ndata).unwrap_or(0).min(internal.data.len());
    (internal.suberror, internal.data.iter().take(n).copied().collect())
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` when a run times out.
/// Its handler does nothing; its only effect is that `KVM_RUN` returns EINTR
/// (the handler is installed without `SA_RESTART`).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Interrupts the calling thread's `KVM_RUN` once `timeout` has passed, by
/// signalling it every millisecond until dropped (a signal that lands just
/// before `KVM_RUN` is entered would otherwise be lost).
#[derive(Debug)]
pub(crate) struct Kicker {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    pub(crate) fn arm(timeout: Duration) -> Result<Self> {
        static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
        INSTALLED
            .get_or_init(|| {
                vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_signal)
                    .map_err(|e| e.errno())
            })
            .map_err(|errno| Error::kvm("sigaction", vmm_sys_util::errno::Error::new(errno)))?;
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let deadline = Instant::now().checked_add(timeout);
        let thread = std::thread::Builder::new()
            .name("vcpu-kicker".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    let now = Instant::now();
                    match deadline {
                        Some(d) if now < d => std::thread::park_timeout(d - now),
                        None => std::thread::park(),
                        Some(_) => {
                            // SAFETY: `target` is the thread that armed this
                            // kicker; it joins this thread (in Drop) before it
                            // can exit, so the id is still valid. The signal's
                            // handler is a no-op.
                            unsafe { libc::pthread_kill(target, kick_signal()) };
                            std::thread::park_timeout(Duration::from_millis(1));
                        }
                    }
                }
            })
            .map_err(|e| Error::Kvm { op: "spawn vCPU kicker", source: e })?;
        Ok(Self { done, thread: Some(thread) })
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            // A kicker thread cannot panic; nothing to report if it did.
            let _ = t.join();
        }
    }
}
