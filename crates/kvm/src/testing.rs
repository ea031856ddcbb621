//! Support for tests that need `/dev/kvm`.
//!
//! CI runs with `MEMVISOR_REQUIRE_KVM=1`, so a missing or unusable KVM fails
//! the suite there instead of silently skipping it.

use crate::Kvm;

/// Environment variable that turns a skip into a failure.
pub const REQUIRE_KVM_ENV: &str = "MEMVISOR_REQUIRE_KVM";

/// Opens `/dev/kvm` for the test `test`. If that is impossible, prints why
/// and returns `None` (the test should return early) — or panics when
/// `MEMVISOR_REQUIRE_KVM=1`.
///
/// ```
/// let Some(kvm) = memvisor_kvm::testing::kvm_or_skip("doc example") else { return };
/// let vm = kvm.create_vm().unwrap();
/// # drop(vm);
/// ```
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    let reason = if std::path::Path::new("/dev/kvm").exists() {
        match Kvm::open() {
            Ok(kvm) => return Some(kvm),
            Err(e) => format!(
                "/dev/kvm cannot be opened: {e} ({})",
                std::io::Error::from_raw_os_error(e.errno().unwrap_or(0))
            ),
        }
    } else {
        "/dev/kvm does not exist".to_owned()
    };
    if std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: {reason}, and {REQUIRE_KVM_ENV}=1");
    }
    eprintln!("skipping {test}: {reason}");
    None
}
