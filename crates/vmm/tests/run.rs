//! `memvisor run` end to end: a tiny multiboot guest (a.out kludge, 32-bit
//! code assembled with iced-x86, simple instructions only) on the real KVM.
//! Needs `/dev/kvm`; skips without it unless `MEMVISOR_REQUIRE_KVM=1`.
//!
//! With `MEMVISOR_KUT_DIR` set to a kvm-unit-tests build directory, the
//! public VT-d guest `x86/intel-iommu.flat` runs too (never needed by CI).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iced_x86::code_asm::{CodeAssembler, al, ax, dword_ptr, dx, eax};
use memvisor_kvm::testing::kvm_or_skip;

const LOAD_ADDR: u32 = 0x10_0000;
const HEADER_LEN: u32 = 32;

/// A multiboot image with the a.out kludge: the header at offset 0 loads
/// the whole file at 1 MiB; code starts right after the header.
fn image(build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    build(&mut a);
    let code = a.assemble(u64::from(LOAD_ADDR + HEADER_LEN)).unwrap();
    let (magic, flags) = (0x1bad_b002u32, 1u32 << 16);
    let header =
        [magic, flags, 0u32.wrapping_sub(magic + flags), LOAD_ADDR, LOAD_ADDR, 0, 0, LOAD_ADDR + HEADER_LEN];
    let mut file: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    file.extend_from_slice(&code);
    file
}

fn print_and_exit(a: &mut CodeAssembler, text: &[u8], value: u32) {
    a.mov(dx, 0x3f8u32).unwrap();
    for b in text {
        a.mov(al, u32::from(*b)).unwrap();
        a.out(dx, al).unwrap();
    }
    a.mov(dx, 0xf4u32).unwrap();
    a.mov(eax, value).unwrap();
    a.out(dx, eax).unwrap();
    a.hlt().unwrap();
}

/// A kernel file in the temporary directory, removed when dropped.
struct TempKernel(PathBuf);

impl std::ops::Deref for TempKernel {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempKernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_temp(name: &str, bytes: &[u8]) -> TempKernel {
    let path = std::env::temp_dir().join(format!("memvisor-run-test-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    TempKernel(path)
}

fn memvisor(kernel: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(["--timeout", "30"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn guest_serial_output_reaches_stdout_and_debug_exit_sets_the_status() {
    let Some(_kvm) = kvm_or_skip("guest_serial_output_reaches_stdout") else { return };
    let kernel = write_temp("hello", &image(|a| print_and_exit(a, b"hello\n", 0x10)));

    let out = memvisor(&kernel, &[]);

    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(out.status.code(), Some(0x21));
}

/// Exits with the value in EAX.
fn exit_with_eax(a: &mut CodeAssembler) {
    a.mov(dx, 0xf4u32).unwrap();
    a.out(dx, eax).unwrap();
    a.hlt().unwrap();
}

#[test]
fn fw_cfg_reports_the_number_of_vcpus() {
    let Some(_kvm) = kvm_or_skip("fw_cfg_reports_the_number_of_vcpus") else { return };
    let kernel = write_temp(
        "fwcfg",
        &image(|a| {
            a.mov(dx, 0x510u32).unwrap();
            a.mov(ax, 0x05u32).unwrap(); // FW_CFG_NB_CPUS
            a.out(dx, ax).unwrap();
            a.mov(eax, 0u32).unwrap();
            a.mov(dx, 0x511u32).unwrap();
            a.in_(al, dx).unwrap();
            exit_with_eax(a);
        }),
    );

    let out = memvisor(&kernel, &["--smp", "3"]);

    assert_eq!(out.status.code(), Some(3 << 1 | 1));
}

#[test]
fn edu_is_found_on_the_pci_bus_and_answers_on_its_bar() {
    let Some(_kvm) = kvm_or_skip("edu_is_found_on_the_pci_bus") else { return };
    // Config mechanism #1 for 00:03.0's vendor/device id, then edu's
    // liveness register (reads the inverse of what was written) in BAR 0.
    let kernel = write_temp(
        "edu",
        &image(|a| {
            a.mov(eax, 0x8000_1800u32).unwrap();
            a.mov(dx, 0xcf8u32).unwrap();
            a.out(dx, eax).unwrap();
            a.mov(dx, 0xcfcu32).unwrap();
            a.in_(eax, dx).unwrap();
            a.mov(dx, 0x3f8u32).unwrap();
            a.out(dx, al).unwrap(); // 0x34 = '4' from 1234:11e8
            a.mov(dword_ptr(0xfe00_0004u32), 0x1234_5678u32).unwrap();
            a.mov(eax, dword_ptr(0xfe00_0004u32)).unwrap();
            exit_with_eax(a);
        }),
    );

    let out = memvisor(&kernel, &["--edu"]);

    assert_eq!(String::from_utf8_lossy(&out.stdout), "4");
    let inverse = !0x1234_5678u32;
    assert_eq!(out.status.code(), Some(i32::from((inverse << 1 | 1).to_le_bytes()[0])));
}

#[test]
fn without_edu_the_pci_slot_is_empty() {
    let Some(_kvm) = kvm_or_skip("without_edu_the_pci_slot_is_empty") else { return };
    let kernel = write_temp(
        "noedu",
        &image(|a| {
            a.mov(eax, 0x8000_1800u32).unwrap();
            a.mov(dx, 0xcf8u32).unwrap();
            a.out(dx, eax).unwrap();
            a.mov(dx, 0xcfcu32).unwrap();
            a.in_(eax, dx).unwrap();
            exit_with_eax(a);
        }),
    );

    let out = memvisor(&kernel, &[]);

    assert_eq!(out.status.code(), Some(0xff));
}

#[test]
fn guest_memfd_backed_ram_runs_the_same_guest() {
    let Some(_kvm) = kvm_or_skip("guest_memfd_backed_ram_runs_the_same_guest") else { return };
    let kernel = write_temp("gmem", &image(|a| print_and_exit(a, b"ok", 0)));

    let out = memvisor(&kernel, &["--guest-memfd", "--mem", "16"]);

    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn guest_that_never_exits_times_out_with_status_124() {
    let Some(_kvm) = kvm_or_skip("guest_that_never_exits_times_out") else { return };
    let kernel = write_temp(
        "spin",
        &image(|a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            a.jmp(top).unwrap();
        }),
    );

    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["run", "--timeout", "1", "--kernel"])
        .arg(&*kernel)
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("memvisor: error: the guest did not exit"));
}

#[test]
fn guest_crash_is_an_error_with_status_4() {
    let Some(_kvm) = kvm_or_skip("guest_crash_is_an_error_with_status_4") else { return };
    // ud2 with no usable IDT: #UD, then #NP on its gate, #DF, triple fault.
    let kernel = write_temp("crash", &image(|a| a.ud2().unwrap()));

    let out = memvisor(&kernel, &[]);

    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("memvisor: error: guest stopped"));
}

#[test]
fn file_without_multiboot_header_is_a_setup_error() {
    let kernel = write_temp("garbage", b"\x7fELF but not a kernel");

    let out = memvisor(&kernel, &[]);

    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1);
    assert!(stderr.starts_with("memvisor: error: cannot load kernel"), "{stderr}");
}

#[test]
fn missing_kernel_file_is_a_setup_error() {
    let out = memvisor(Path::new("/nonexistent/memvisor-kernel"), &[]);

    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("memvisor: error: cannot read kernel"));
}

#[test]
fn application_processors_wait_for_sipi_while_the_bootstrap_processor_runs() {
    let Some(_kvm) = kvm_or_skip("application_processors_wait_for_sipi") else { return };
    let kernel = write_temp("smp", &image(|a| print_and_exit(a, b"bsp", 2)));

    let out = memvisor(&kernel, &["--smp", "4"]);

    assert_eq!(String::from_utf8_lossy(&out.stdout), "bsp");
    assert_eq!(out.status.code(), Some(5));
}

#[test]
fn more_vcpus_than_the_machine_has_are_refused() {
    let kernel = write_temp("too-many", &image(|a| print_and_exit(a, b"", 0)));

    let out = memvisor(&kernel, &["--smp", "65"]);

    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("memvisor: error: --smp 65"));
}

/// kvm-unit-tests' VT-d guest, when a build is at hand (`MEMVISOR_KUT_DIR`).
#[test]
fn kvm_unit_tests_intel_iommu_passes_all_checks() {
    let Some(dir) = std::env::var_os("MEMVISOR_KUT_DIR") else {
        eprintln!("skipping kvm_unit_tests_intel_iommu: MEMVISOR_KUT_DIR is not set");
        return;
    };
    let Some(_kvm) = kvm_or_skip("kvm_unit_tests_intel_iommu_passes_all_checks") else { return };
    let kernel = Path::new(&dir).join("x86/intel-iommu.flat");

    // As kvm-unit-tests' x86/unittests.cfg runs it (smp = 4).
    let out = memvisor(&kernel, &["--vtd", "legacy", "--intremap", "--edu", "--smp", "4"]);

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SUMMARY: 11 tests\r\n"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert_eq!(out.status.code(), Some(1));
}
