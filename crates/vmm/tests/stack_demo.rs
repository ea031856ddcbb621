//! `memvisor demo` under KVM (issue 7, item 3): the built-in guest drives
//! the VT-d model, edu DMAs and host memory changes, and the binary's exit
//! status and JSON report say whether every check passed.
//!
//! Variants: scalable mode with the guest's first-stage tables nested over
//! memvisor's stage-2 through the host binding (the demo), first-stage
//! emulated by the VT-d model, legacy second-stage — and for each, a guest
//! that leaves out its IOTLB invalidations after changing its tables, which
//! must be caught as wrong data (so the checks can fail).
//!
//! Each test skips with a printed reason when `/dev/kvm` is absent, and
//! fails instead when `MEMVISOR_REQUIRE_KVM=1`.

use std::process::Command;

use memvisor_kvm::testing::kvm_or_skip;
use serde_json::Value;

/// Runs `memvisor demo --json --variant <variant>`: (exit success, report).
fn demo(variant: &str) -> (bool, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["demo", "--json", "--variant", variant])
        .output()
        .expect("memvisor runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{variant}: no JSON report ({e}); stderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.success(), report)
}

fn n(report: &Value, path: &str) -> u64 {
    report.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("{path} missing in {report}"))
}

/// What every passing variant must show.
fn assert_passed(variant: &str, success: bool, r: &Value) {
    assert!(success, "{variant}: {r:#}");
    assert_eq!(r["passed"], Value::Bool(true), "{variant}");
    assert_eq!(n(r, "/jobs/data_errors"), 0, "{variant}");
    assert_eq!(n(r, "/jobs/unexpected"), 0, "{variant}");
    assert_eq!(n(r, "/jobs/expected_faults"), 8, "{variant}: DMA to private memory must fault");
    assert!(n(r, "/jobs/checked_ok") >= 200, "{variant}");
    assert_eq!(n(r, "/host/discard_refused_pinned"), 1, "{variant}: pinned memory cannot be discarded");
    for source in ["host_discard", "hole_punch", "conversion", "slot_move"] {
        assert!(n(r, &format!("/host/{source}/events")) >= 1, "{variant}: {source}");
    }
    assert!(n(r, "/dirty_pages_distinct") >= 32, "{variant}: the guest's writes are in the dirty log");
    assert_eq!(r["phases"].as_array().map(Vec::len), Some(8), "{variant}");
}

/// What every missing-invalidation variant must show: wrong data seen by
/// the guest after its table change, and a failing exit status.
fn assert_stale_data_detected(variant: &str, success: bool, r: &Value) {
    assert!(!success, "{variant}: a stale IOTLB must fail the demo: {r:#}");
    assert_eq!(r["passed"], Value::Bool(false), "{variant}");
    assert!(n(r, "/jobs/data_errors") >= 8, "{variant}: {r:#}");
}

#[test]
fn nested_demo_binds_the_guest_first_stage_and_passes_every_check() {
    let Some(_kvm) = kvm_or_skip("nested_demo_binds_the_guest_first_stage") else { return };
    let (success, r) = demo("nested");
    assert_passed("nested", success, &r);
    assert!(n(&r, "/vtd/binds") >= 1, "the PASID entry is bound to a nested HWPT");
    assert!(n(&r, "/vtd/forwarded") >= 1, "PASID-IOTLB invalidations reach the nested HWPT");
    assert_eq!(n(&r, "/vtd/bind_errors"), 0);
    assert!(n(&r, "/dma/iotlb_walks") > 0 && n(&r, "/dma/iotlb_hits") > 0);
}

#[test]
fn nested_demo_without_piotlb_invalidation_reports_stale_data() {
    let Some(_kvm) = kvm_or_skip("nested_demo_without_piotlb_invalidation") else { return };
    let (success, r) = demo("missing-invalidation");
    assert_stale_data_detected("missing-invalidation", success, &r);
}

#[test]
fn emulated_first_stage_demo_passes_every_check() {
    let Some(_kvm) = kvm_or_skip("emulated_first_stage_demo_passes") else { return };
    let (success, r) = demo("first-stage");
    assert_passed("first-stage", success, &r);
    assert!(n(&r, "/vtd/translations") > 0 && n(&r, "/vtd/iotlb_hits") > 0);
}

#[test]
fn emulated_first_stage_demo_without_piotlb_invalidation_reports_stale_data() {
    let Some(_kvm) = kvm_or_skip("emulated_first_stage_demo_without_piotlb_invalidation") else { return };
    let (success, r) = demo("first-stage-missing-invalidation");
    assert_stale_data_detected("first-stage-missing-invalidation", success, &r);
}

#[test]
fn legacy_second_stage_demo_passes_every_check() {
    let Some(_kvm) = kvm_or_skip("legacy_second_stage_demo_passes") else { return };
    let (success, r) = demo("legacy");
    assert_passed("legacy", success, &r);
    assert!(n(&r, "/vtd/iotlb") >= 2, "page- and domain-selective IOTLB invalidations");
}

#[test]
fn legacy_demo_without_iotlb_invalidation_reports_stale_data() {
    let Some(_kvm) = kvm_or_skip("legacy_demo_without_iotlb_invalidation") else { return };
    let (success, r) = demo("legacy-missing-invalidation");
    assert_stale_data_detected("legacy-missing-invalidation", success, &r);
}

#[test]
fn interrupt_remapping_demo_remaps_every_edu_msi_to_the_guest_vector() {
    let Some(_kvm) = kvm_or_skip("interrupt_remapping_demo_remaps_every_edu_msi") else { return };
    let (success, r) = demo("interrupt-remapping");
    assert_passed("interrupt-remapping", success, &r);
    let raised = n(&r, "/interrupts/raised");
    assert!(raised > 0);
    assert_eq!(n(&r, "/interrupts/remapped_ok"), raised);
    assert!(
        n(&r, "/vtd/iec") >= 1,
        "the guest invalidates the interrupt entry cache after changing its IRTE"
    );
}

#[test]
fn interrupt_remapping_demo_without_iec_invalidation_reports_stale_vectors() {
    let Some(_kvm) = kvm_or_skip("interrupt_remapping_demo_without_iec_invalidation") else { return };
    let (success, r) = demo("interrupt-remapping-missing-invalidation");
    assert!(!success, "{r:#}");
    assert_eq!(n(&r, "/jobs/data_errors"), 0, "only the interrupt check may fail");
    assert!(n(&r, "/interrupts/wrong_vector") > 0, "{r:#}");
}

#[test]
fn default_command_runs_the_demo_vm_and_prints_a_readable_report() {
    let Some(_kvm) = kvm_or_skip("default_command_runs_the_demo_vm") else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor")).output().expect("memvisor runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["phases", "DMAs", "guest QI", "host", "dirty", "wall time", "every check passed"] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

#[test]
fn engine_demo_stays_reachable() {
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["demo", "--engine", "--pages", "64"])
        .output()
        .expect("memvisor runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}
