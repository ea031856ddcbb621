//! Conformance: scenarios of the Linux iommufd selftests
//! (`tools/testing/selftests/iommu/iommufd.c`) run against memvisor-ioas.
//!
//! Each scenario is named `<fixture>__<TEST_F>` (plus `__<variant>` where the
//! selftest runs the test under several fixture variants) and checks the
//! outcomes the selftest expects: the same successes, the same errnos (through
//! [`Error::errno`]), the same IOVA properties. The selftest's mock driver is
//! replaced by memvisor's objects:
//!
//! - a *mock domain* is a device attached to the IOAS (an automatic paging
//!   HWPT: a VT-d second-stage table with 4 KiB pages, aperture
//!   `0..=2^48-1`), so where the mock's page size (2 KiB) or aperture
//!   (`1<<24..1<<31`) shows in an expectation, the scenario uses memvisor's
//!   (4 KiB, `0..=2^48-1`) and says so;
//! - the selftest's `buffer` (16 pages, huge-page aligned) is 16 pages of an
//!   anonymous mapping at a 2 MiB-aligned host address;
//! - `IOMMU_TEST_OP_ADD_RESERVED` is [`Iommufd::ioas_reserve`], the mock
//!   access is an [`AccessOps`] that records its pins and drops them when
//!   told of an unmap, `IOMMU_TEST_OP_MD_CHECK_MAP` is a DMA translation
//!   through the device compared with the buffer's host addresses, and
//!   `check_refs` is the context's locked-page count.
//!
//! The ioctl ABI (struct sizes, trailing bytes, unknown ioctls) is out of
//! scope of the crate, so those parts of a TEST_F are not ported. The run
//! prints one line per failed check and finally
//! `iommufd conformance: N scenarios, F failures`; it exits non-zero on any
//! failure.

use std::panic::{AssertUnwindSafe, Location, catch_unwind};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use memvisor_hostmem::{MappedRegion, Mapping};
use memvisor_ioas::{
    AccessOps, Backing, DmaAccess, Error, HwptKind, Id, Iommufd, IovaRange, MAX_HW_QUEUES, MapFlags, VtdS1,
};
use memvisor_types::{Address, Hva};

const PAGE: u64 = 4096;
const HUGEPAGE: u64 = 2 << 20;
/// The selftest's `BUFFER_SIZE`.
const BUFFER_SIZE: u64 = 16 * PAGE;
/// The selftest's `MOCK_APERTURE_START`, used as the base IOVA with a domain.
const MOCK_APERTURE_START: u64 = 1 << 24;
/// Last IOVA of memvisor's paging HWPT (4-level VT-d second stage).
const HWPT_APERTURE_LAST: u64 = (1 << 48) - 1;

// ---------------------------------------------------------------------------
// Checks

/// The failures of one scenario, each with the source line of its check.
#[derive(Debug, Default)]
struct Check {
    failures: Vec<String>,
}

impl Check {
    fn fail(&mut self, at: &Location<'_>, msg: String) {
        self.failures.push(format!("line {}: {msg}", at.line()));
    }

    /// Expects success; returns the value.
    #[track_caller]
    fn ok<T>(&mut self, what: &str, r: Result<T, Error>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(
                    Location::caller(),
                    format!("{what}: expected success, got {e} (errno {})", e.errno()),
                );
                None
            }
        }
    }

    /// Expects failure with `errno`.
    #[track_caller]
    fn errno<T: std::fmt::Debug>(&mut self, what: &str, r: Result<T, Error>, errno: i32) {
        match r {
            Ok(v) => {
                self.fail(Location::caller(), format!("{what}: expected errno {errno}, got success {v:x?}"))
            }
            Err(e) if e.errno() != errno => self
                .fail(Location::caller(), format!("{what}: expected errno {errno}, got {} ({e})", e.errno())),
            Err(_) => {}
        }
    }

    /// Expects `cond`.
    #[track_caller]
    fn that(&mut self, what: &str, cond: bool) {
        if !cond {
            self.fail(Location::caller(), format!("{what}: does not hold"));
        }
    }

    /// Expects `got == want`.
    #[track_caller]
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.fail(Location::caller(), format!("{what}: got {got:x?}, expected {want:x?}"));
        }
    }
}

// ---------------------------------------------------------------------------
// Shared pieces: the buffer, the mock access, fixtures

/// Huge-page-aligned host memory standing for the selftest's `buffer`.
struct Buffer {
    region: Arc<dyn MappedRegion>,
    /// Offset of the 2 MiB-aligned start inside `region`.
    base: u64,
    len: u64,
}

impl Buffer {
    /// `len` bytes at a 2 MiB-aligned host address.
    fn new(len: u64) -> Self {
        let mapping = Mapping::anonymous(len + HUGEPAGE).expect("anonymous mapping for the buffer");
        let hva = mapping.hva().raw();
        let base = hva.next_multiple_of(HUGEPAGE) - hva;
        Self { region: Arc::new(mapping), base, len }
    }

    /// The selftest's `buffer + off`.
    fn at(&self, off: u64) -> Backing {
        Backing::Region { region: self.region.clone(), offset: self.base + off }
    }

    /// Host address of `buffer + off`.
    fn hva(&self, off: u64) -> u64 {
        self.region.hva().raw() + self.base + off
    }
}

fn rw() -> MapFlags {
    MapFlags::rw()
}

fn fixed() -> MapFlags {
    MapFlags::rw().fixed()
}

/// The selftest's mock access (`MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES`):
/// records the ranges it pinned and unpins those an unmap covers.
#[derive(Debug, Default)]
struct MockAccess {
    pins: Mutex<Vec<(u64, u64)>>,
}

impl MockAccess {
    fn pin(&self, c: &mut Check, ictx: &Iommufd, access: Id, iova: u64, length: u64) -> bool {
        let r = ictx.access_pin_pages(access, iova, length, true);
        let ok = c.ok("access pin", r).is_some();
        if ok {
            self.pins.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((iova, length));
        }
        ok
    }

    /// Releases one recorded pin of exactly `iova..+length` (ENOENT-like `false` when absent).
    fn unpin(&self, ictx: &Iommufd, access: Id, iova: u64, length: u64) -> bool {
        let mut pins = self.pins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match pins.iter().position(|&p| p == (iova, length)) {
            Some(i) => {
                pins.remove(i);
                drop(pins);
                ictx.access_unpin_pages(access, iova, length);
                true
            }
            None => false,
        }
    }

    fn count(&self) -> usize {
        self.pins.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

impl AccessOps for MockAccess {
    fn unmap(&self, ictx: &Iommufd, access: Id, iova: u64, length: u64) {
        let last = iova + (length - 1);
        let hit: Vec<(u64, u64)> = {
            let mut pins = self.pins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (hit, keep): (Vec<_>, Vec<_>) =
                pins.iter().partition(|&&(s, l)| s <= last && iova <= s + (l - 1));
            *pins = keep;
            hit
        };
        for (s, l) in hit {
            ictx.access_unpin_pages(access, s, l);
        }
    }
}

/// Creates a mock access on `ioas`.
fn mock_access(c: &mut Check, ictx: &Iommufd, ioas: Id) -> Option<(Id, Arc<MockAccess>)> {
    let ops = Arc::new(MockAccess::default());
    let id = c.ok("access create", ictx.access_create(ioas, ops.clone()))?;
    Some((id, ops))
}

/// A mock device attached to `pt_id` (IOAS or HWPT): (device id, HWPT id).
fn mock_domain(ictx: &Iommufd, pt_id: Id) -> Result<(Id, Id), Error> {
    let dev = ictx.device_add();
    let hwpt = ictx.device_attach(dev, 0, pt_id)?;
    Ok((dev, hwpt))
}

/// Destroys a mock device the way closing the selftest's stdev does: detach, then destroy.
fn destroy_mock_domain(c: &mut Check, ictx: &Iommufd, dev: Id) {
    c.ok("device detach", ictx.device_detach(dev, 0));
    c.ok("device destroy", ictx.destroy(dev));
}

/// `IOMMU_TEST_OP_MD_CHECK_MAP`: the device's DMA at `iova..+length` reaches `hva..+length`.
#[track_caller]
fn check_mock_iova(c: &mut Check, ictx: &Iommufd, dev: Id, hva: u64, iova: u64, length: u64) {
    match ictx.translate(dev, 0, iova, length, DmaAccess::Read) {
        Ok(segs) => {
            let mut at = hva;
            let mut total = 0;
            for s in &segs {
                if s.hva.raw() != at {
                    c.fail(
                        Location::caller(),
                        format!("DMA of {iova:#x}+{length:#x} reaches {segs:x?}, not {hva:#x}"),
                    );
                    return;
                }
                at += s.len;
                total += s.len;
            }
            c.eq("bytes translated", total, length);
        }
        Err(f) => c.fail(Location::caller(), format!("DMA of {iova:#x}+{length:#x} faulted: {f:?}")),
    }
}

/// The pages (4 KiB) spanned by `off..off+len` of a buffer.
fn pages_spanned(off: u64, len: u64) -> u64 {
    (off + len).div_ceil(PAGE) - off / PAGE
}

// ---------------------------------------------------------------------------
// FIXTURE(iommufd)

fn iommufd_cmd_fail(c: &mut Check) {
    let ictx = Iommufd::new();
    // Object id 0 is invalid.
    c.errno("destroy id 0", ictx.destroy(0), libc::ENOENT);
}

// ---------------------------------------------------------------------------
// FIXTURE(iommufd_ioas): variants no_domain, mock_domain, two_mock_domain

#[derive(Debug, Clone, Copy)]
enum IoasVariant {
    NoDomain,
    OneMock,
    TwoMocks,
}

impl IoasVariant {
    const ALL: [IoasVariant; 3] = [IoasVariant::NoDomain, IoasVariant::OneMock, IoasVariant::TwoMocks];

    fn name(self) -> &'static str {
        match self {
            IoasVariant::NoDomain => "no_domain",
            IoasVariant::OneMock => "mock_domain",
            IoasVariant::TwoMocks => "two_mock_domain",
        }
    }

    fn domains(self) -> usize {
        match self {
            IoasVariant::NoDomain => 0,
            IoasVariant::OneMock => 1,
            IoasVariant::TwoMocks => 2,
        }
    }
}

struct IoasFixture {
    ictx: Iommufd,
    ioas: Id,
    /// The last mock device and its HWPT (0 without a domain), like `stdev_id`/`hwpt_id`.
    stdev: Id,
    hwpt: Id,
    base_iova: u64,
    buffer: Buffer,
}

impl IoasFixture {
    fn new(c: &mut Check, v: IoasVariant) -> Self {
        let ictx = Iommufd::new();
        let ioas = ictx.ioas_alloc();
        let (mut stdev, mut hwpt, mut base_iova) = (0, 0, 0);
        for _ in 0..v.domains() {
            if let Some((d, h)) = c.ok("mock domain", mock_domain(&ictx, ioas)) {
                (stdev, hwpt) = (d, h);
            }
            base_iova = MOCK_APERTURE_START;
        }
        Self { ictx, ioas, stdev, hwpt, base_iova, buffer: Buffer::new(BUFFER_SIZE) }
    }

    fn map_fixed(&self, off: u64, len: u64, iova: u64) -> Result<u64, Error> {
        self.ictx.ioas_map(self.ioas, fixed(), iova, self.buffer.at(off), len)
    }

    fn map(&self, off: u64, len: u64) -> Result<u64, Error> {
        self.ictx.ioas_map(self.ioas, rw(), 0, self.buffer.at(off), len)
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, Error> {
        self.ictx.ioas_unmap(self.ioas, iova, len)
    }
}

fn iommufd_ioas_ioas_auto_destroy(c: &mut Check, v: IoasVariant) {
    // Setup and teardown alone (the fixture's drop frees everything).
    let f = IoasFixture::new(c, v);
    c.that("IOAS allocated", f.ioas != 0);
}

fn iommufd_ioas_ioas_destroy(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    if f.stdev != 0 {
        // An IOAS cannot be freed while a device has a HWPT using it.
        c.errno("destroy IOAS in use", f.ictx.destroy(f.ioas), libc::EBUSY);
    } else {
        c.ok("destroy IOAS", f.ictx.destroy(f.ioas));
    }
}

fn iommufd_ioas_alloc_hwpt_nested(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let s1 = VtdS1 { flags: 0, pgtbl_addr: 0, addr_width: 48 };
    if f.stdev == 0 {
        // No device: the parent id stays 0.
        c.errno("nested on HWPT 0", ictx.hwpt_alloc(0, HwptKind::Nested(s1)), libc::ENOENT);
        c.errno("replace on device 0", ictx.device_replace(0, 0, 0), libc::ENOENT);
        return;
    }
    let Some(parent) = c.ok("parent", ictx.hwpt_alloc(f.ioas, HwptKind::Paging { nest_parent: true })) else {
        return;
    };
    let Some(not_parent) =
        c.ok("non-parent", ictx.hwpt_alloc(f.ioas, HwptKind::Paging { nest_parent: false }))
    else {
        return;
    };
    // Negative: nested on a HWPT that is not a nesting parent.
    c.errno("nested on non-parent", ictx.hwpt_alloc(not_parent, HwptKind::Nested(s1)), libc::EINVAL);
    // Two nested HWPTs sharing one parent.
    let Some(n0) = c.ok("nested 0", ictx.hwpt_alloc(parent, HwptKind::Nested(s1))) else { return };
    let Some(n1) = c.ok("nested 1", ictx.hwpt_alloc(parent, HwptKind::Nested(s1))) else { return };
    // Negative: a nested HWPT on top of a nested HWPT.
    c.errno("nested on nested", ictx.hwpt_alloc(n0, HwptKind::Nested(s1)), libc::EINVAL);
    // The parent cannot be freed now.
    c.errno("destroy busy parent", ictx.destroy(parent), libc::EBUSY);
    // Attach the device to n0, which is then busy.
    c.ok("replace -> nested 0", ictx.device_replace(f.stdev, 0, n0));
    c.errno("destroy attached nested 0", ictx.destroy(n0), libc::EBUSY);
    // Switch from n0 to n1.
    c.ok("replace -> nested 1", ictx.device_replace(f.stdev, 0, n1));
    c.errno("destroy attached nested 1", ictx.destroy(n1), libc::EBUSY);
    c.ok("destroy nested 0", ictx.destroy(n0));
    // Detach from n1 and destroy it.
    c.ok("replace -> parent", ictx.device_replace(f.stdev, 0, parent));
    c.ok("destroy nested 1", ictx.destroy(n1));
    // Detach from the parent and destroy it.
    c.ok("replace -> IOAS", ictx.device_replace(f.stdev, 0, f.ioas));
    c.ok("destroy parent", ictx.destroy(parent));
    c.ok("destroy non-parent", ictx.destroy(not_parent));
}

fn iommufd_ioas_hwpt_attach(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    // A device attached directly to a HWPT.
    if f.stdev != 0 {
        c.ok("attach to HWPT", mock_domain(&f.ictx, f.hwpt));
    } else {
        c.errno("attach to HWPT 0", mock_domain(&f.ictx, f.hwpt), libc::ENOENT);
    }
}

fn iommufd_ioas_ioas_area_destroy(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    // Adding an area does not change the ability to destroy.
    c.ok("map", f.map_fixed(0, PAGE, f.base_iova));
    if f.stdev != 0 {
        c.errno("destroy IOAS in use", f.ictx.destroy(f.ioas), libc::EBUSY);
    } else {
        c.ok("destroy IOAS", f.ictx.destroy(f.ioas));
    }
}

fn iommufd_ioas_ioas_area_auto_destroy(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    // Many areas, freed with the context.
    for i in 0..10 {
        c.ok("map", f.map_fixed(0, PAGE, f.base_iova + i * PAGE));
    }
}

fn iommufd_ioas_area(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let b = f.base_iova;
    // Unmap fails if nothing is mapped.
    for i in 0..10 {
        c.errno("unmap empty", f.unmap(i * PAGE, PAGE), libc::ENOENT);
    }
    // Unmap works.
    for i in 0..10 {
        c.ok("map", f.map_fixed(0, PAGE, b + i * PAGE));
    }
    for i in 0..10 {
        c.ok("unmap", f.unmap(b + i * PAGE, PAGE));
    }
    // Split fails.
    c.ok("map 2 pages", f.map_fixed(0, 2 * PAGE, b + 16 * PAGE));
    c.errno("unmap first half", f.unmap(b + 16 * PAGE, PAGE), libc::ENOENT);
    c.errno("unmap second half", f.unmap(b + 17 * PAGE, PAGE), libc::ENOENT);
    // Over map fails, in five geometries.
    c.errno("over map same", f.map_fixed(0, 2 * PAGE, b + 16 * PAGE), libc::EEXIST);
    c.errno("over map first page", f.map_fixed(0, PAGE, b + 16 * PAGE), libc::EEXIST);
    c.errno("over map last page", f.map_fixed(0, PAGE, b + 17 * PAGE), libc::EEXIST);
    c.errno("over map head", f.map_fixed(0, 2 * PAGE, b + 15 * PAGE), libc::EEXIST);
    c.errno("over map superset", f.map_fixed(0, 3 * PAGE, b + 15 * PAGE), libc::EEXIST);
    // Unmap all works, and succeeds on an empty IOAS.
    c.ok("unmap all", f.unmap(0, u64::MAX));
    c.ok("unmap all (empty)", f.unmap(0, u64::MAX));
}

fn iommufd_ioas_unmap_fully_contained_areas(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    // Room to rewind the base IOVA.
    let b = f.base_iova + 4 * PAGE;
    for i in 0..4 {
        c.ok("map", f.map_fixed(0, 8 * PAGE, b + i * 16 * PAGE));
    }
    // A range holding part of an area does not unmap.
    c.errno("unmap partial first", f.unmap(b - 4 * PAGE, 8 * PAGE), libc::ENOENT);
    c.errno("unmap partial last", f.unmap(b + 3 * 16 * PAGE + 8 * PAGE - 4 * PAGE, 8 * PAGE), libc::ENOENT);
    // A range holding whole areas does, and reports their bytes.
    let n = c.ok("unmap superset", f.unmap(b - 4 * PAGE, 3 * 16 * PAGE + 8 * PAGE + 4 * PAGE));
    c.eq("bytes unmapped", n, Some(32 * PAGE));
}

/// `iova % (1 << (ffs(length) - 1)) == 0`
fn aligned_to_length(iova: u64, length: u64) -> bool {
    iova.is_multiple_of(1u64 << length.trailing_zeros())
}

fn iommufd_ioas_area_auto_iova(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let mut iovas = [0u64; 10];
    // Simple 4K pages.
    for slot in &mut iovas {
        *slot = c.ok("map page", f.map(0, PAGE)).unwrap_or(0);
    }
    for &iova in &iovas {
        c.ok("unmap page", f.unmap(iova, PAGE));
    }
    // IOVAs are aligned to the length.
    for (i, slot) in (1u64..).zip(iovas.iter_mut()) {
        let length = PAGE * i;
        let r = if f.stdev != 0 {
            f.map(0, length)
        } else {
            ictx.ioas_map(f.ioas, rw(), 0, Backing::User(Hva::new(1 << 31)), length)
        };
        *slot = c.ok("map", r).unwrap_or(0);
        c.that(&format!("IOVA {:#x} aligned to length {length:#x}", *slot), aligned_to_length(*slot, length));
    }
    for (i, &iova) in (1u64..).zip(iovas.iter()) {
        c.ok("unmap", f.unmap(iova, PAGE * i));
    }
    // Avoids a reserved region.
    let (res_start, res_len) = (PAGE * 4, PAGE * 100);
    c.ok(
        "reserve",
        ictx.ioas_reserve(f.ioas, 1, IovaRange { start: res_start, last: res_start + res_len - 1 }),
    );
    for (i, slot) in (1u64..).zip(iovas.iter_mut()) {
        let length = PAGE * i;
        *slot = c.ok("map", f.map(0, length)).unwrap_or(0);
        c.that("aligned", aligned_to_length(*slot, length));
        c.that(
            &format!("IOVA {:#x} outside the reserved range", *slot),
            !(*slot > res_start && *slot < res_start + res_len),
        );
    }
    for (i, &iova) in (1u64..).zip(iovas.iter()) {
        c.ok("unmap", f.unmap(iova, PAGE * i));
    }
    // An allowed range intersecting a reserved one.
    c.errno(
        "allow over reserved",
        ictx.ioas_allow_iovas(f.ioas, &[IovaRange { start: PAGE, last: PAGE * 600 }]),
        libc::EADDRINUSE,
    );
    // Allocation from an allowed range.
    let allowed = if f.stdev != 0 {
        IovaRange { start: MOCK_APERTURE_START + PAGE, last: MOCK_APERTURE_START + PAGE * 600 - 1 }
    } else {
        IovaRange { start: PAGE * 200, last: PAGE * 600 - 1 }
    };
    c.ok("allow", ictx.ioas_allow_iovas(f.ioas, &[allowed]));
    for (i, slot) in (1u64..).zip(iovas.iter_mut()) {
        let length = PAGE * i;
        *slot = c.ok("map", f.map(0, length)).unwrap_or(0);
        let iova = *slot;
        c.that("aligned", aligned_to_length(iova, length));
        c.that(
            &format!("IOVA {iova:#x}+{length:#x} inside the allowed range"),
            iova >= allowed.start
                && iova <= allowed.last
                && iova + length > allowed.start
                && iova + length <= allowed.last + 1,
        );
    }
    for (i, &iova) in (1u64..).zip(iovas.iter()) {
        c.ok("unmap", f.unmap(iova, PAGE * i));
    }
}

fn iommufd_ioas_area_allowed(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let allowed = IovaRange { start: f.base_iova, last: f.base_iova + PAGE * 600 };
    let reserved = IovaRange { start: allowed.start + PAGE, last: allowed.start + 2 * PAGE - 1 };
    // Reserved intersecting an allowed range.
    c.ok("allow", ictx.ioas_allow_iovas(f.ioas, &[allowed]));
    c.errno("reserve over allowed", ictx.ioas_reserve(f.ioas, 1, reserved), libc::EADDRINUSE);
    c.ok("allow nothing", ictx.ioas_allow_iovas(f.ioas, &[]));
    // Allowed intersecting a reserved range.
    c.ok("reserve", ictx.ioas_reserve(f.ioas, 1, reserved));
    c.errno("allow over reserved", ictx.ioas_allow_iovas(f.ioas, &[allowed]), libc::EADDRINUSE);
}

fn iommufd_ioas_copy_area(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    c.ok("map", f.map_fixed(0, PAGE, f.base_iova));
    // Copy inside one IOAS.
    c.ok("copy within", ictx.ioas_copy(f.ioas, f.ioas, fixed(), f.base_iova + PAGE, f.base_iova, PAGE));
    // Copy between IOASes.
    let dst = ictx.ioas_alloc();
    c.ok("copy across", ictx.ioas_copy(dst, f.ioas, fixed(), 0, f.base_iova, PAGE));
}

fn iommufd_ioas_iova_ranges(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    // Without a domain the whole 64-bit space; with one, memvisor's HWPT
    // aperture (the mock's would be 1<<24..1<<31).
    let top = if f.stdev != 0 { HWPT_APERTURE_LAST } else { u64::MAX };
    // The range can be read.
    let r = c.ok("ranges", ictx.ioas_iova_ranges(f.ioas, 64));
    c.eq("ranges", r, Some(vec![IovaRange { start: 0, last: top }]));
    // Buffer too small: EMSGSIZE with the count needed.
    let r = ictx.ioas_iova_ranges(f.ioas, 0);
    c.eq("needed", r.clone().err(), Some(Error::MsgSize { needed: 1 }));
    c.errno("capacity 0", r, libc::EMSGSIZE);
    // Two ranges (memvisor's aperture starts at 0, so the reserved page splits it
    // with a domain too).
    c.ok("reserve", ictx.ioas_reserve(f.ioas, 1, IovaRange { start: PAGE, last: 2 * PAGE - 1 }));
    let r = c.ok("ranges", ictx.ioas_iova_ranges(f.ioas, 64));
    c.eq(
        "ranges",
        r,
        Some(vec![IovaRange { start: 0, last: PAGE - 1 }, IovaRange { start: 2 * PAGE, last: top }]),
    );
    // Buffer too small.
    let r = ictx.ioas_iova_ranges(f.ioas, 1);
    c.eq("needed", r.clone().err(), Some(Error::MsgSize { needed: 2 }));
    c.errno("capacity 1", r, libc::EMSGSIZE);
}

fn iommufd_ioas_access_domain_destory(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let buf = Buffer::new(2 * HUGEPAGE);
    c.ok("map 2 huge pages", ictx.ioas_map(f.ioas, fixed(), f.base_iova, buf.at(0), 2 * HUGEPAGE));
    let Some((access, ops)) = mock_access(c, ictx, f.ioas) else { return };
    ops.pin(c, ictx, access, f.base_iova + PAGE, PAGE);
    // A complicated unpin across a huge page boundary.
    if f.stdev != 0 {
        destroy_mock_domain(c, ictx, f.stdev);
    }
    c.that("unpin", ops.unpin(ictx, access, f.base_iova + PAGE, PAGE));
    c.ok("destroy access", ictx.destroy(access));
}

fn iommufd_ioas_access_pin(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let Some((access, ops)) = mock_access(c, ictx, f.ioas) else { return };
    for npages in 1..BUFFER_SIZE / PAGE {
        let length = npages * PAGE;
        // Single pin and unpin.
        c.ok("map", f.map_fixed(0, BUFFER_SIZE, MOCK_APERTURE_START));
        ops.pin(c, ictx, access, MOCK_APERTURE_START, length);
        c.that("unpin", ops.unpin(ictx, access, MOCK_APERTURE_START, length));
        // Double user.
        ops.pin(c, ictx, access, MOCK_APERTURE_START, length);
        ops.pin(c, ictx, access, MOCK_APERTURE_START, length);
        c.that("unpin 1", ops.unpin(ictx, access, MOCK_APERTURE_START, length));
        c.that("unpin 2", ops.unpin(ictx, access, MOCK_APERTURE_START, length));
        // Add and remove a domain while pinned.
        ops.pin(c, ictx, access, MOCK_APERTURE_START, length);
        if let Some((dev, _)) = c.ok("mock domain", mock_domain(ictx, f.ioas)) {
            check_mock_iova(c, ictx, dev, f.buffer.hva(0), MOCK_APERTURE_START, BUFFER_SIZE);
            destroy_mock_domain(c, ictx, dev);
        }
        c.that("unpin", ops.unpin(ictx, access, MOCK_APERTURE_START, length));
        c.ok("unmap", f.unmap(MOCK_APERTURE_START, BUFFER_SIZE));
    }
    c.ok("destroy access", ictx.destroy(access));
}

fn iommufd_ioas_access_pin_unmap(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let Some((access, ops)) = mock_access(c, ictx, f.ioas) else { return };
    c.ok("map", f.map_fixed(0, BUFFER_SIZE, MOCK_APERTURE_START));
    ops.pin(c, ictx, access, MOCK_APERTURE_START, BUFFER_SIZE);
    // Unmap calls the access's notifier, which unpins; the unmap succeeds.
    c.ok("unmap pinned range", f.unmap(MOCK_APERTURE_START, BUFFER_SIZE));
    // The pin is gone: destroying its record fails (ENOENT in the selftest).
    c.eq("pins left in the access", ops.count(), 0);
    c.that("unpin after unmap finds nothing", !ops.unpin(ictx, access, MOCK_APERTURE_START, BUFFER_SIZE));
    c.ok("destroy access", ictx.destroy(access));
}

fn iommufd_ioas_ioas_iova_alloc(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    // With a domain, lengths must be multiples of its page size (the mock's
    // is 2 KiB, memvisor's HWPT 4 KiB); without one, every length maps.
    for length in 1..PAGE * 2 {
        if f.stdev != 0 && length % PAGE != 0 {
            c.errno(&format!("map length {length:#x}"), f.map(0, length), libc::EINVAL);
        } else if let Some(iova) = c.ok(&format!("map length {length:#x}"), f.map(0, length)) {
            c.ok("unmap", f.unmap(iova, length));
        }
    }
}

fn iommufd_ioas_ioas_align_change(c: &mut Check, v: IoasVariant) {
    // The selftest returns at once with a domain; this port runs no_domain
    // only. The mock's 2 KiB/4 KiB step is memvisor's 4 KiB/8 KiB one
    // (memvisor's IOAS alignment is never below 4 KiB).
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let big = 2 * PAGE;
    // Upgrading works when everything is aligned.
    c.ok("map aligned", f.map_fixed(0, big, MOCK_APERTURE_START));
    c.ok("raise alignment", ictx.set_iova_alignment(f.ioas, big));
    // Misalignment is rejected at map time.
    c.errno("map misaligned", f.map_fixed(0, PAGE, MOCK_APERTURE_START + big + PAGE), libc::EINVAL);
    c.ok("raise alignment again", ictx.set_iova_alignment(f.ioas, big));
    // Reduce the alignment.
    c.ok("lower alignment", ictx.set_iova_alignment(f.ioas, PAGE));
    // A misaligned area blocks the upgrade.
    c.ok("map misaligned", f.map_fixed(0, PAGE, MOCK_APERTURE_START + big + PAGE));
    c.errno("raise over misaligned area", ictx.set_iova_alignment(f.ioas, big), libc::EADDRINUSE);
    c.ok("unmap", f.unmap(MOCK_APERTURE_START + big + PAGE, PAGE));
    c.ok("unmap", f.unmap(MOCK_APERTURE_START, big));
}

fn iommufd_ioas_copy_sweep(c: &mut Check, v: IoasVariant) {
    let f = IoasFixture::new(c, v);
    let ictx = &f.ictx;
    let dst = ictx.ioas_alloc();
    let length = PAGE / 2;
    // With a domain the area must cover whole pages.
    let last_iova = if f.stdev != 0 {
        MOCK_APERTURE_START + BUFFER_SIZE - 1
    } else {
        MOCK_APERTURE_START + BUFFER_SIZE - 2
    };
    c.ok("map", f.map_fixed(0, last_iova - MOCK_APERTURE_START + 1, MOCK_APERTURE_START));
    let mut iova = MOCK_APERTURE_START - PAGE;
    while iova <= last_iova {
        let r = ictx.ioas_copy(dst, f.ioas, fixed(), MOCK_APERTURE_START, iova, length);
        if iova < MOCK_APERTURE_START || iova + length - 1 > last_iova {
            c.errno(&format!("copy from {iova:#x}"), r, libc::ENOENT);
        } else if c.ok(&format!("copy from {iova:#x}"), r).is_some() {
            c.ok("unmap copy", ictx.ioas_unmap(dst, MOCK_APERTURE_START, length));
        }
        iova += 511;
    }
    c.ok("destroy dst", ictx.destroy(dst));
}

// ---------------------------------------------------------------------------
// FIXTURE(iommufd_mock_domain): variants one_domain, two_domains

#[derive(Debug, Clone, Copy)]
enum DomainVariant {
    One,
    Two,
}

impl DomainVariant {
    const ALL: [DomainVariant; 2] = [DomainVariant::One, DomainVariant::Two];

    fn name(self) -> &'static str {
        match self {
            DomainVariant::One => "one_domain",
            DomainVariant::Two => "two_domains",
        }
    }
}

struct DomainFixture {
    ictx: Iommufd,
    ioas: Id,
    /// (device, HWPT) per mock domain.
    domains: Vec<(Id, Id)>,
    buffer: Buffer,
}

impl DomainFixture {
    fn new(c: &mut Check, v: DomainVariant) -> Self {
        let ictx = Iommufd::new();
        let ioas = ictx.ioas_alloc();
        let n = match v {
            DomainVariant::One => 1,
            DomainVariant::Two => 2,
        };
        let domains = (0..n).filter_map(|_| c.ok("mock domain", mock_domain(&ictx, ioas))).collect();
        Self { ictx, ioas, domains, buffer: Buffer::new(BUFFER_SIZE) }
    }

    /// `check_mock_iova` on every domain.
    #[track_caller]
    fn check_iova(&self, c: &mut Check, hva: u64, iova: u64, length: u64) {
        for &(dev, _) in &self.domains {
            check_mock_iova(c, &self.ictx, dev, hva, iova, length);
        }
    }
}

fn iommufd_mock_domain_basic(c: &mut Check, v: DomainVariant) {
    let f = DomainFixture::new(c, v);
    let ictx = &f.ictx;
    // Simple one-page map.
    if let Some(iova) = c.ok("map", ictx.ioas_map(f.ioas, rw(), 0, f.buffer.at(0), PAGE)) {
        f.check_iova(c, f.buffer.hva(0), iova, PAGE);
    }
    // EFAULT half way through: the second half lies outside the host memory.
    let size = 8 * PAGE;
    let mapping: Arc<dyn MappedRegion> = Arc::new(Mapping::anonymous(size / 2).expect("mapping"));
    let half = Backing::Region { region: mapping.clone(), offset: 0 };
    c.errno("map past the memory's end", ictx.ioas_map(f.ioas, rw(), 0, half, size), libc::EFAULT);
    // EFAULT on the first page: nothing of the range is host memory.
    let none = Backing::Region { region: mapping, offset: size / 2 };
    c.errno("map outside the memory", ictx.ioas_map(f.ioas, rw(), 0, none, size), libc::EFAULT);
}

/// The maps of `all_aligns`: every start and end at the domain's page size
/// (the mock's is 2 KiB, memvisor's 4 KiB) within an 8-page buffer.
fn all_aligns(c: &mut Check, f: &DomainFixture, add_domain: bool) {
    let ictx = &f.ictx;
    let buf = Buffer::new(8 * PAGE);
    c.eq("pages locked before", ictx.locked_pages(), 0);
    let step = PAGE;
    let mut start = 0;
    while start < buf.len {
        let mut end = start + step;
        while end < buf.len {
            let length = end - start;
            if let Some(iova) = c.ok("map", ictx.ioas_map(f.ioas, rw(), 0, buf.at(start), length)) {
                let extra = if add_domain { c.ok("mock domain", mock_domain(ictx, f.ioas)) } else { None };
                f.check_iova(c, buf.hva(start), iova, length);
                if let Some((dev, _)) = extra {
                    check_mock_iova(c, ictx, dev, buf.hva(start), iova, length);
                }
                // check_refs: each page of the area is pinned once.
                c.eq("pages locked", ictx.locked_pages(), pages_spanned(start, length));
                if let Some((dev, _)) = extra {
                    destroy_mock_domain(c, ictx, dev);
                }
                c.ok("unmap", ictx.ioas_unmap(f.ioas, iova, length));
            }
            end += step;
        }
        start += step;
    }
    c.eq("pages locked after", ictx.locked_pages(), 0);
}

fn iommufd_mock_domain_all_aligns(c: &mut Check, v: DomainVariant) {
    let f = DomainFixture::new(c, v);
    all_aligns(c, &f, false);
}

fn iommufd_mock_domain_all_aligns_copy(c: &mut Check, v: DomainVariant) {
    // As all_aligns, adding and destroying a domain while the area exists.
    let f = DomainFixture::new(c, v);
    all_aligns(c, &f, true);
}

fn iommufd_mock_domain_user_copy(c: &mut Check, v: DomainVariant) {
    let f = DomainFixture::new(c, v);
    let ictx = &f.ictx;
    // Pin the pages in an IOAS without domains, then copy to one with domains.
    let src = ictx.ioas_alloc();
    let Some(src_iova) = c.ok("map src", ictx.ioas_map(src, rw(), 0, f.buffer.at(0), BUFFER_SIZE)) else {
        return;
    };
    let Some((access, ops)) = mock_access(c, ictx, src) else { return };
    ops.pin(c, ictx, access, src_iova, BUFFER_SIZE);
    c.ok("copy", ictx.ioas_copy(f.ioas, src, fixed(), MOCK_APERTURE_START, src_iova, BUFFER_SIZE));
    f.check_iova(c, f.buffer.hva(0), MOCK_APERTURE_START, BUFFER_SIZE);
    // The source can go: the copy holds the pages.
    c.ok("unmap src (notifier unpins)", ictx.ioas_unmap(src, src_iova, BUFFER_SIZE));
    c.eq("access pins left", ops.count(), 0);
    c.ok("destroy access", ictx.destroy(access));
    c.ok("destroy src", ictx.destroy(src));
    f.check_iova(c, f.buffer.hva(0), MOCK_APERTURE_START, BUFFER_SIZE);
}

fn iommufd_mock_domain_replace(c: &mut Check, v: DomainVariant) {
    // one_domain only (see the report: memvisor never shares automatic HWPTs).
    let f = DomainFixture::new(c, v);
    let ictx = &f.ictx;
    let Some(&(dev0, hwpt0)) = f.domains.first() else { return };
    let ioas = ictx.ioas_alloc();
    c.ok("replace -> new IOAS", ictx.device_replace(dev0, 0, ioas));
    // The prior (automatic) HWPT is gone.
    c.errno("replace -> freed HWPT", ictx.device_replace(dev0, 0, hwpt0), libc::ENOENT);
    c.ok("replace -> new IOAS again", ictx.device_replace(dev0, 0, ioas));
    c.ok("replace -> fixture IOAS", ictx.device_replace(dev0, 0, f.ioas));
    c.ok("destroy new IOAS", ictx.destroy(ioas));
}

fn iommufd_mock_domain_alloc_hwpt(c: &mut Check, v: DomainVariant) {
    let f = DomainFixture::new(c, v);
    let ictx = &f.ictx;
    for &(dev, _) in &f.domains {
        let h0 = c.ok("HWPT", ictx.hwpt_alloc(f.ioas, HwptKind::Paging { nest_parent: false }));
        let h1 = c.ok("parent HWPT", ictx.hwpt_alloc(f.ioas, HwptKind::Paging { nest_parent: true }));
        let (Some(h0), Some(h1)) = (h0, h1) else { return };
        // A HWPT rotation.
        c.ok("replace -> h0", ictx.device_replace(dev, 0, h0));
        c.errno("destroy attached h0", ictx.destroy(h0), libc::EBUSY);
        c.ok("replace -> h1", ictx.device_replace(dev, 0, h1));
        c.errno("destroy attached h1", ictx.destroy(h1), libc::EBUSY);
        c.ok("replace -> IOAS", ictx.device_replace(dev, 0, f.ioas));
        c.ok("destroy h1", ictx.destroy(h1));
        if let Some((d, _)) = c.ok("device on h0", mock_domain(ictx, h0)) {
            destroy_mock_domain(c, ictx, d);
        }
        c.ok("destroy h0", ictx.destroy(h0));
    }
}

// ---------------------------------------------------------------------------
// FIXTURE(iommufd_viommu): variants no_viommu, mock_viommu

#[derive(Debug, Clone, Copy)]
enum ViommuVariant {
    None,
    Mock,
}

impl ViommuVariant {
    const ALL: [ViommuVariant; 2] = [ViommuVariant::None, ViommuVariant::Mock];

    fn name(self) -> &'static str {
        match self {
            ViommuVariant::None => "no_viommu",
            ViommuVariant::Mock => "mock_viommu",
        }
    }
}

struct ViommuFixture {
    ictx: Iommufd,
    ioas: Id,
    device: Id,
    hwpt: Id,
    viommu: Id,
    nested: Id,
    buffer: Buffer,
}

impl ViommuFixture {
    fn new(c: &mut Check, v: ViommuVariant) -> Self {
        let ictx = Iommufd::new();
        let ioas = ictx.ioas_alloc();
        let (mut device, mut hwpt, mut viommu, mut nested) = (0, 0, 0, 0);
        if let ViommuVariant::Mock = v {
            device = c.ok("mock domain", mock_domain(&ictx, ioas)).map_or(0, |(d, _)| d);
            // A nesting parent, a vIOMMU on it, a nested HWPT.
            hwpt = c.ok("parent", ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true })).unwrap_or(0);
            viommu = c.ok("vIOMMU", ictx.viommu_alloc(device, hwpt)).unwrap_or(0);
            let s1 = VtdS1 { flags: 0, pgtbl_addr: 0, addr_width: 48 };
            nested = c.ok("nested", ictx.hwpt_alloc(hwpt, HwptKind::Nested(s1))).unwrap_or(0);
        }
        Self { ictx, ioas, device, hwpt, viommu, nested, buffer: Buffer::new(BUFFER_SIZE) }
    }
}

fn iommufd_viommu_viommu_auto_destroy(c: &mut Check, v: ViommuVariant) {
    let f = ViommuFixture::new(c, v);
    c.that("fixture built", matches!(v, ViommuVariant::None) || (f.viommu != 0 && f.nested != 0));
}

fn iommufd_viommu_viommu_negative_tests(c: &mut Check, v: ViommuVariant) {
    let f = ViommuFixture::new(c, v);
    let ictx = &f.ictx;
    if f.device == 0 {
        c.errno("vIOMMU without device", ictx.viommu_alloc(f.device, f.hwpt), libc::ENOENT);
        return;
    }
    // Invalid HWPT (id 0).
    c.errno("vIOMMU on HWPT 0", ictx.viommu_alloc(f.device, 0), libc::ENOENT);
    // Not a nesting parent.
    if let Some(h) = c.ok("HWPT", ictx.hwpt_alloc(f.ioas, HwptKind::Paging { nest_parent: false })) {
        c.errno("vIOMMU on non-parent", ictx.viommu_alloc(f.device, h), libc::EINVAL);
        c.ok("destroy HWPT", ictx.destroy(h));
    }
    // The parent is in use by the vIOMMU.
    c.errno("destroy parent", ictx.destroy(f.hwpt), libc::EBUSY);
}

fn iommufd_viommu_vdevice_alloc(c: &mut Check, v: ViommuVariant) {
    let f = ViommuFixture::new(c, v);
    let ictx = &f.ictx;
    if f.device == 0 {
        c.errno("vdevice without vIOMMU", ictx.vdevice_alloc(f.viommu, f.device, 0x99), libc::ENOENT);
        return;
    }
    // Virtual id 0x99, a duplicate, then 0x88.
    let vdev = c.ok("vdevice 0x99", ictx.vdevice_alloc(f.viommu, f.device, 0x99));
    c.errno("duplicate 0x99", ictx.vdevice_alloc(f.viommu, f.device, 0x99), libc::EEXIST);
    if let Some(vdev) = vdev {
        c.ok("destroy vdevice", ictx.destroy(vdev));
    }
    if let Some(vdev) = c.ok("vdevice 0x88", ictx.vdevice_alloc(f.viommu, f.device, 0x88)) {
        c.ok("destroy vdevice", ictx.destroy(vdev));
    }
}

fn iommufd_viommu_hw_queue(c: &mut Check, v: ViommuVariant) {
    // mock_viommu only (the selftest skips no_viommu).
    let f = ViommuFixture::new(c, v);
    let ictx = &f.ictx;
    let vi = f.viommu;
    // Queue address and length.
    c.errno("length 0", ictx.hw_queue_alloc(vi, 0, MOCK_APERTURE_START, 0), libc::EINVAL);
    c.errno("base overflow", ictx.hw_queue_alloc(vi, 0, u64::MAX, PAGE), libc::EOVERFLOW);
    // IOVA not mapped.
    c.errno("missing IOVA", ictx.hw_queue_alloc(vi, 0, MOCK_APERTURE_START, PAGE), libc::ENOENT);
    let Some(iova) = c.ok("map", ictx.ioas_map(f.ioas, rw(), 0, f.buffer.at(0), PAGE)) else { return };
    let Some(iova2) = c.ok("map 2", ictx.ioas_map(f.ioas, rw(), 0, f.buffer.at(PAGE), PAGE)) else { return };
    // Index 1 and MAX fail: queues start at index 0.
    c.errno("index 1 first", ictx.hw_queue_alloc(vi, 1, iova, PAGE), libc::EIO);
    c.errno("index MAX", ictx.hw_queue_alloc(vi, MAX_HW_QUEUES, iova, PAGE), libc::EINVAL);
    // Index 0 owns the IOVA.
    let q0 = c.ok("queue 0", ictx.hw_queue_alloc(vi, 0, iova, PAGE));
    c.errno("duplicate index", ictx.hw_queue_alloc(vi, 0, iova, PAGE), libc::EEXIST);
    c.errno("unmap under queue", ictx.ioas_unmap(f.ioas, iova, PAGE), libc::EBUSY);
    // The unpinned second page unmaps.
    c.ok("unmap neighbour", ictx.ioas_unmap(f.ioas, iova2, PAGE));
    // Index 1, unaligned.
    let q1 = c.ok("queue 1", ictx.hw_queue_alloc(vi, 1, iova + PAGE / 2, PAGE / 2));
    let (Some(q0), Some(q1)) = (q0, q1) else { return };
    c.errno("destroy depended-on queue", ictx.destroy(q0), libc::EBUSY);
    // Descending order.
    c.ok("destroy queue 1", ictx.destroy(q1));
    c.ok("destroy queue 0", ictx.destroy(q0));
    c.ok("unmap after queues", ictx.ioas_unmap(f.ioas, iova, PAGE));
}

// ---------------------------------------------------------------------------
// The runner

type Body = Box<dyn Fn(&mut Check)>;

fn scenarios() -> Vec<(String, Body)> {
    let mut s: Vec<(String, Body)> = vec![("iommufd__cmd_fail".into(), Box::new(iommufd_cmd_fail))];
    type IoasTest = fn(&mut Check, IoasVariant);
    let ioas_tests: [(&str, IoasTest); 16] = [
        ("ioas_auto_destroy", iommufd_ioas_ioas_auto_destroy),
        ("ioas_destroy", iommufd_ioas_ioas_destroy),
        ("alloc_hwpt_nested", iommufd_ioas_alloc_hwpt_nested),
        ("hwpt_attach", iommufd_ioas_hwpt_attach),
        ("ioas_area_destroy", iommufd_ioas_ioas_area_destroy),
        ("ioas_area_auto_destroy", iommufd_ioas_ioas_area_auto_destroy),
        ("area", iommufd_ioas_area),
        ("unmap_fully_contained_areas", iommufd_ioas_unmap_fully_contained_areas),
        ("area_auto_iova", iommufd_ioas_area_auto_iova),
        ("area_allowed", iommufd_ioas_area_allowed),
        ("copy_area", iommufd_ioas_copy_area),
        ("iova_ranges", iommufd_ioas_iova_ranges),
        ("access_domain_destory", iommufd_ioas_access_domain_destory),
        ("access_pin", iommufd_ioas_access_pin),
        ("access_pin_unmap", iommufd_ioas_access_pin_unmap),
        ("copy_sweep", iommufd_ioas_copy_sweep),
    ];
    for (name, t) in ioas_tests {
        for v in IoasVariant::ALL {
            s.push((format!("iommufd_ioas__{name}__{}", v.name()), Box::new(move |c| t(c, v))));
        }
    }
    // With a domain, lengths must be a multiple of its page size (EINVAL).
    for v in IoasVariant::ALL {
        s.push((
            format!("iommufd_ioas__ioas_iova_alloc__{}", v.name()),
            Box::new(move |c| iommufd_ioas_ioas_iova_alloc(c, v)),
        ));
    }
    s.push((
        "iommufd_ioas__ioas_align_change__no_domain".into(),
        Box::new(|c| iommufd_ioas_ioas_align_change(c, IoasVariant::NoDomain)),
    ));
    type DomainTest = fn(&mut Check, DomainVariant);
    let domain_tests: [(&str, DomainTest); 5] = [
        ("basic", iommufd_mock_domain_basic),
        ("all_aligns", iommufd_mock_domain_all_aligns),
        ("all_aligns_copy", iommufd_mock_domain_all_aligns_copy),
        ("user_copy", iommufd_mock_domain_user_copy),
        ("alloc_hwpt", iommufd_mock_domain_alloc_hwpt),
    ];
    for (name, t) in domain_tests {
        for v in DomainVariant::ALL {
            s.push((format!("iommufd_mock_domain__{name}__{}", v.name()), Box::new(move |c| t(c, v))));
        }
    }
    s.push((
        "iommufd_mock_domain__replace__one_domain".into(),
        Box::new(|c| iommufd_mock_domain_replace(c, DomainVariant::One)),
    ));
    type ViommuTest = fn(&mut Check, ViommuVariant);
    let viommu_tests: [(&str, ViommuTest); 3] = [
        ("viommu_auto_destroy", iommufd_viommu_viommu_auto_destroy),
        ("viommu_negative_tests", iommufd_viommu_viommu_negative_tests),
        ("vdevice_alloc", iommufd_viommu_vdevice_alloc),
    ];
    for (name, t) in viommu_tests {
        for v in ViommuVariant::ALL {
            s.push((format!("iommufd_viommu__{name}__{}", v.name()), Box::new(move |c| t(c, v))));
        }
    }
    s.push((
        "iommufd_viommu__hw_queue__mock_viommu".into(),
        Box::new(|c| iommufd_viommu_hw_queue(c, ViommuVariant::Mock)),
    ));
    s
}

/// Failed checks printed per scenario (the rest are counted).
const MAX_LINES: usize = 8;

fn main() -> ExitCode {
    let all = scenarios();
    let mut failed = 0usize;
    for (name, body) in &all {
        let mut check = Check::default();
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut check)));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            check.failures.push(format!("panicked: {msg}"));
        }
        if !check.failures.is_empty() {
            failed += 1;
            for f in check.failures.iter().take(MAX_LINES) {
                println!("FAIL {name}: {f}");
            }
            if check.failures.len() > MAX_LINES {
                println!("FAIL {name}: ... and {} more failed checks", check.failures.len() - MAX_LINES);
            }
        }
    }
    println!("iommufd conformance: {} scenarios, {failed} failures", all.len());
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
