//! Differential test: random `KVM_SET_USER_MEMORY_REGION(2)` requests applied
//! both to `memvisor-memslots` and to a real KVM VM. Every outcome (success,
//! or the errno) must be the same.
//!
//! The requests cover every row of the rules table in
//! `reference/kvm-memory.md` (row 12, the VM-wide page-count overflow, needs
//! 2^64 pages and is covered by the crate's unit tests with a lowered
//! limit): slot-id, address-space and overflow edges, creates, moves,
//! flags-only changes, no-ops and deletes, and guest_memfd bindings to real
//! guest_memfd files (`KVM_CREATE_GUEST_MEMFD`, MMAP|INIT_SHARED and plain),
//! another VM's guest_memfd, a memfd, the VM's own descriptor and
//! descriptors that are not open. No vCPU ever runs, so the kernel only
//! records the userspace addresses; a few real anonymous mappings back the
//! slots anyway.
//!
//! Prints `memslot differential: N operations, D divergences` and fails if
//! D > 0 or if a rule row was never exercised. Without `/dev/kvm` it prints
//! why and passes, unless `MEMVISOR_REQUIRE_KVM=1`. `MEMVISOR_SEED` picks
//! another random sequence.

#![expect(
    unsafe_code,
    reason = "kvm-ioctls marks set_user_memory_region(2) unsafe (the kernel may access the userspace range as \
              guest memory), and the backing memory is an mmap; each block says why it is sound here"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Instant;

use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};
use memvisor_memslots::gmem::{FLAG_INIT_SHARED, FLAG_MMAP};
use memvisor_memslots::{
    ChangeKind, FileId, GUEST_MEMFD, GmemFile, Ioctl, LOG_DIRTY_PAGES, Limits, MemslotRequest, Memslots,
    READONLY, ResolveError, VmId,
};
use memvisor_types::{Gpa, Hva};

/// Requests per run (release build: about a second on this machine).
const OPERATIONS: u64 = 120_000;
const PAGE: u64 = 4096;
/// The last page of the 64-bit space.
const TOP_PAGE: u64 = !0xfff;
/// Where most slots live: 64 candidate bases, 8 pages apart, so overlaps are common.
const WINDOW: u64 = 0x1_0000_0000;
/// Where the occasional 16 MiB slot lives.
const LARGE_WINDOW: u64 = 0x20_0000_0000;
/// Bytes of each anonymous mapping backing the slots.
const BACKING_LEN: u64 = 64 << 20;
/// Slots larger than this must never be created for real (shadow paging
/// allocates 8 bytes of rmap per page).
const MAX_REAL_PAGES: u64 = 1 << 16;

fn main() -> ExitCode {
    let require = std::env::var("MEMVISOR_REQUIRE_KVM").is_ok_and(|v| v == "1");
    if !std::path::Path::new("/dev/kvm").exists() {
        if require {
            eprintln!("memslot differential: /dev/kvm is absent and MEMVISOR_REQUIRE_KVM=1");
            return ExitCode::FAILURE;
        }
        println!("memslot differential: skipped, /dev/kvm is absent");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("memslot differential: {e}");
            ExitCode::FAILURE
        }
    }
}

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// An anonymous private mapping, unmapped on drop.
struct Backing {
    addr: u64,
    len: u64,
}

impl Backing {
    fn new(len: u64) -> Result<Self, String> {
        let size = usize::try_from(len).map_err(|e| e.to_string())?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks
        // (no MAP_FIXED), so no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap of {len:#x} bytes failed: {}", std::io::Error::last_os_error()));
        }
        Ok(Self { addr: ptr as u64, len })
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; nothing borrows
        // it (the kernel keeps only the numeric address in memslots of a VM
        // whose vCPUs never run, and the VM is gone by now).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, usize::try_from(self.len).unwrap_or(0)) };
    }
}

/// The descriptors requests may name, and what each really is.
struct Fds {
    vm: VmId,
    /// guest_memfd descriptors of this VM: fd → (size).
    own: BTreeMap<i32, u64>,
    foreign: i32,
    memfd: i32,
    vm_fd: i32,
    _keep: Vec<OwnedFd>,
}

impl Fds {
    fn resolve(&self, fd: i32) -> Result<GmemFile, ResolveError> {
        if let Some(&size) = self.own.get(&fd) {
            return Ok(GmemFile { id: FileId(fd.unsigned_abs().into()), size, owner: self.vm });
        }
        if fd == self.foreign {
            return Ok(GmemFile { id: FileId(fd.unsigned_abs().into()), size: 1 << 20, owner: VmId(2) });
        }
        if fd == self.memfd || fd == self.vm_fd {
            return Err(ResolveError::NotGuestMemfd);
        }
        Err(ResolveError::BadFd)
    }

    /// Every descriptor a request may carry, including two that are not open.
    fn all(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.own.keys().copied().collect();
        v.extend([self.foreign, self.memfd, self.vm_fd, -1, 1_000_000]);
        v
    }
}

fn create_gmem(vm: &VmFd, size: u64, flags: u64) -> Result<OwnedFd, String> {
    let fd = vm
        .create_guest_memfd(kvm_create_guest_memfd { size, flags, reserved: [0; 6] })
        .map_err(|e| format!("KVM_CREATE_GUEST_MEMFD(size {size:#x}, flags {flags:#x}): {e}"))?;
    // SAFETY: KVM just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Applies `req` to the real VM.
fn apply_real(vm: &VmFd, req: &MemslotRequest) -> Result<(), i32> {
    let result = match req.ioctl {
        Ioctl::V1 => {
            let region = kvm_userspace_memory_region {
                slot: req.slot,
                flags: req.flags,
                guest_phys_addr: req.guest_phys_addr.as_u64(),
                memory_size: req.memory_size,
                userspace_addr: req.userspace_addr.as_u64(),
            };
            // SAFETY: no vCPU of this VM ever runs, so the kernel records the
            // userspace range but never reads or writes guest memory through it.
            unsafe { vm.set_user_memory_region(region) }
        }
        Ioctl::V2 => {
            let region = kvm_userspace_memory_region2 {
                slot: req.slot,
                flags: req.flags,
                guest_phys_addr: req.guest_phys_addr.as_u64(),
                memory_size: req.memory_size,
                userspace_addr: req.userspace_addr.as_u64(),
                guest_memfd_offset: req.guest_memfd_offset,
                guest_memfd: req.guest_memfd.cast_unsigned(),
                ..Default::default()
            };
            // SAFETY: as above: the VM never runs a vCPU.
            unsafe { vm.set_user_memory_region2(region) }
        }
    };
    result.map_err(|e| e.errno())
}

/// Generates requests from the current model state.
struct Generator<'a> {
    rng: Rng,
    backing: &'a [Backing],
    fds: &'a Fds,
}

impl Generator<'_> {
    fn slot_id(&mut self) -> u32 {
        if self.rng.chance(90) {
            self.rng.pick(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
        } else {
            self.rng.pick(&[32763, 32762, 100])
        }
    }

    fn pages(&mut self) -> u64 {
        1 + self.rng.below(24)
    }

    fn window_gpa(&mut self) -> u64 {
        if self.rng.chance(5) {
            LARGE_WINDOW + self.rng.below(8) * (16 << 20)
        } else {
            WINDOW + self.rng.below(64) * 8 * PAGE
        }
    }

    fn uaddr(&mut self, size: u64) -> u64 {
        let b = &self.backing[usize::try_from(self.rng.below(self.backing.len() as u64)).unwrap_or(0)];
        let room = b.len.saturating_sub(size) / PAGE;
        b.addr + self.rng.below(room + 1) * PAGE
    }

    fn valid_flags(&mut self) -> u32 {
        self.rng.pick(&[0, 0, 0, LOG_DIRTY_PAGES, READONLY, LOG_DIRTY_PAGES | READONLY])
    }

    fn plain(&mut self) -> MemslotRequest {
        let size = if self.rng.chance(3) { 16 << 20 } else { self.pages() * PAGE };
        let gpa = self.window_gpa();
        let uaddr = self.uaddr(size);
        MemslotRequest::new(self.slot_id(), Gpa::new(gpa), size, Hva::new(uaddr))
            .with_flags(self.valid_flags())
    }

    fn gmem_offset(&mut self, file_size: u64, size: u64) -> u64 {
        match self.rng.below(20) {
            0 => 0x800,
            1 => TOP_PAGE,
            2 => 1 << 63,
            3 => (1 << 63) - PAGE,
            4 => file_size,
            5 => file_size.saturating_sub(size).wrapping_add(PAGE),
            6 => file_size.saturating_sub(size),
            _ => self.rng.below(file_size.saturating_sub(size) / PAGE + 1) * PAGE,
        }
    }

    fn gmem(&mut self) -> MemslotRequest {
        let size = self.pages().min(16) * PAGE;
        let gpa = self.window_gpa();
        let uaddr = self.uaddr(size);
        let fds = self.fds.all();
        let fd =
            if self.rng.chance(70) { self.rng.pick(&fds[..self.fds.own.len()]) } else { self.rng.pick(&fds) };
        let file_size = self.fds.own.get(&fd).copied().unwrap_or(1 << 20);
        let offset = self.gmem_offset(file_size, size);
        MemslotRequest::new(self.slot_id(), Gpa::new(gpa), size, Hva::new(uaddr)).with_guest_memfd(fd, offset)
    }

    fn delete(&mut self, model: &Memslots) -> MemslotRequest {
        let live: Vec<u32> = model.snapshot().slots().map(|s| u32::from(s.id())).collect();
        let slot =
            if !live.is_empty() && self.rng.chance(75) { self.rng.pick(&live) } else { self.slot_id() };
        let mut req = MemslotRequest::delete(slot);
        if self.rng.chance(30) {
            // Fields a delete ignores (and some it does not: the alignment checks come first).
            req.guest_phys_addr = Gpa::new(self.window_gpa() + self.rng.pick(&[0, 0, 0, 0x10]));
            req.userspace_addr = Hva::new(self.uaddr(0));
            req.flags = self.rng.pick(&[0, LOG_DIRTY_PAGES, READONLY, GUEST_MEMFD]);
        }
        req
    }

    fn modify(&mut self, model: &Memslots) -> MemslotRequest {
        let snap = model.snapshot();
        let live: Vec<_> = snap.slots().cloned().collect();
        if live.is_empty() {
            return self.plain();
        }
        let s = &live[usize::try_from(self.rng.below(live.len() as u64)).unwrap_or(0)];
        let slot = (u32::from(s.as_id()) << 16) | u32::from(s.id());
        let size = s.npages() * PAGE;
        let mut req =
            MemslotRequest::new(slot, Gpa::new(s.base_gfn().as_u64() * PAGE), size, s.userspace_addr());
        req.flags = s.flags();
        if s.has_guest_memfd() {
            let fd = self
                .fds
                .own
                .keys()
                .copied()
                .find(|&fd| s.gmem().is_some_and(|b| b.file == FileId(fd.unsigned_abs().into())));
            req.guest_memfd = fd.unwrap_or(-1);
            req.guest_memfd_offset = s.gmem().map_or(0, |b| b.pgoff * PAGE);
        }
        match self.rng.below(10) {
            0 => {}
            1 | 2 => req.guest_phys_addr = Gpa::new(self.window_gpa()),
            3 => req.flags ^= LOG_DIRTY_PAGES,
            4 => req.flags ^= READONLY,
            5 => req.userspace_addr = Hva::new(self.uaddr(size)),
            6 => req.memory_size = size.wrapping_add(PAGE * self.rng.pick(&[1, 2])),
            7 => req.flags ^= GUEST_MEMFD,
            8 => {
                req.guest_phys_addr =
                    Gpa::new(self.rng.pick(&[(1u64 << 52).wrapping_sub(size), 1 << 52, (1 << 52) - PAGE]))
            }
            _ => {
                req.flags ^= GUEST_MEMFD;
                req.guest_phys_addr = Gpa::new(self.window_gpa());
            }
        }
        req
    }

    /// A request with one or two values at the edges the rules are about.
    fn edge(&mut self) -> MemslotRequest {
        let mut req = if self.rng.chance(70) { self.plain() } else { self.gmem() };
        for _ in 0..1 + self.rng.below(2) {
            let size = req.memory_size;
            match self.rng.below(8) {
                0 => {
                    let id = req.slot & 0xffff;
                    req.slot = self.rng.pick(&[
                        32763,
                        32764,
                        32765,
                        32766,
                        32767,
                        0xffff,
                        (1 << 16) | id,
                        (0xffff << 16) | id,
                        (2 << 16) | 32764,
                        u32::MAX,
                    ]);
                }
                1 => {
                    let random = u32::try_from(self.rng.next() >> 32).unwrap_or(0);
                    req.flags = self.rng.pick(&[
                        1 << 3,
                        1 << 31,
                        GUEST_MEMFD | LOG_DIRTY_PAGES,
                        GUEST_MEMFD | READONLY,
                        GUEST_MEMFD | READONLY | LOG_DIRTY_PAGES,
                        0xff,
                        random,
                    ])
                }
                2 => {
                    req.memory_size = self.rng.pick(&[0x800, 0x1001, 1 << 43, (1 << 43) + PAGE, TOP_PAGE, 0]);
                }
                3 => {
                    // 2^31 - 1 pages: valid by rule 10, so placed where rule 19 refuses it.
                    req.memory_size = (1 << 43) - PAGE;
                    req.guest_phys_addr = Gpa::new((1 << 52) - (1 << 43) + 2 * PAGE);
                    req.flags &= !LOG_DIRTY_PAGES;
                }
                4 => {
                    req.guest_phys_addr = Gpa::new(self.rng.pick(&[
                        0x10,
                        0x1_0000_0800,
                        (1 << 52) - PAGE,
                        (1u64 << 52).wrapping_sub(size),
                        (1u64 << 52).wrapping_sub(size).wrapping_add(PAGE),
                        1 << 52,
                        TOP_PAGE,
                        TOP_PAGE.wrapping_sub(size).wrapping_add(PAGE),
                        TOP_PAGE.wrapping_sub(size),
                        0,
                    ]))
                }
                5 => {
                    let user_max = Limits::default().user_addr_max;
                    req.userspace_addr = Hva::new(self.rng.pick(&[
                        req.userspace_addr.as_u64().wrapping_add(8),
                        0,
                        user_max.wrapping_sub(size),
                        user_max.wrapping_sub(size).wrapping_add(PAGE),
                        0x8000_0000_0000,
                        0xffff_8000_0000_0000,
                        TOP_PAGE,
                    ]));
                }
                6 => {
                    let file_size = self.fds.own.get(&req.guest_memfd).copied().unwrap_or(1 << 20);
                    req.guest_memfd_offset = self.gmem_offset(file_size, size);
                }
                _ => req.ioctl = Ioctl::V1,
            }
        }
        req
    }

    fn next(&mut self, model: &Memslots) -> MemslotRequest {
        let live = model.snapshot().len();
        let mut req = match self.rng.below(100) {
            _ if live > 20 && self.rng.chance(50) => self.delete(model),
            0..30 => self.plain(),
            30..42 => self.gmem(),
            42..55 => self.delete(model),
            55..77 => self.modify(model),
            _ => self.edge(),
        };
        if self.rng.chance(8) {
            req.ioctl = Ioctl::V1;
        }
        req
    }
}

/// Names the edge an accepted request sits on, if any (to show they are exercised).
fn notable_success(req: &MemslotRequest, change: &memvisor_memslots::Change) -> Option<&'static str> {
    let new = change.new.as_ref()?;
    let end = new.gfns().end().as_u64();
    if change.kind == ChangeKind::Create && new.gmem().is_some_and(|b| b.pgoff >= 1 << 50) {
        Some("guest_memfd offset whose signed end wraps")
    } else if end == 1 << 40 {
        Some("slot ending at the max gfn")
    } else if new.hva_range().1.as_u64() == Limits::default().user_addr_max {
        Some("userspace range ending at USER_PTR_MAX")
    } else if new.id() == 32763 {
        Some("slot id 32763")
    } else if req.ioctl == Ioctl::V1 && change.kind == ChangeKind::Create {
        Some("v1 create")
    } else {
        None
    }
}

fn run() -> Result<bool, String> {
    let seed =
        std::env::var("MEMVISOR_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6d65_6d73_6c6f_7473);
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let other_vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let backing: Vec<Backing> = (0..4).map(|_| Backing::new(BACKING_LEN)).collect::<Result<_, _>>()?;

    let files = [
        (1 << 20, FLAG_MMAP | FLAG_INIT_SHARED),
        (64 << 10, 0),
        (1 << 40, FLAG_MMAP | FLAG_INIT_SHARED),
        (16 << 20, FLAG_MMAP),
    ];
    let mut keep = Vec::new();
    let mut own = BTreeMap::new();
    for (size, flags) in files {
        let fd = create_gmem(&vm, size, flags)?;
        own.insert(fd.as_raw_fd(), size);
        keep.push(fd);
    }
    let foreign = create_gmem(&other_vm, 1 << 20, FLAG_MMAP | FLAG_INIT_SHARED)?;
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor or -1.
    let memfd = unsafe { libc::memfd_create(c"memvisor-differential".as_ptr(), 0) };
    if memfd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    let memfd = unsafe { OwnedFd::from_raw_fd(memfd) };
    let fds = Fds {
        vm: VmId(1),
        own,
        foreign: foreign.as_raw_fd(),
        memfd: memfd.as_raw_fd(),
        vm_fd: vm.as_raw_fd(),
        _keep: keep,
    };
    let resolver = |fd: i32| fds.resolve(fd);

    let mut model = Memslots::new(VmId(1));
    let mut generator = Generator { rng: Rng(seed), backing: &backing, fds: &fds };
    let (mut divergences, mut operations) = (0u64, 0u64);
    let mut rows: BTreeMap<u8, u64> = BTreeMap::new();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut edges: BTreeMap<&str, u64> = BTreeMap::new();
    let mut checks: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    while operations < OPERATIONS {
        let req = generator.next(&model);
        let ours = model.apply(&req, &resolver);
        if let Ok(change) = &ours
            && matches!(change.kind, ChangeKind::Create | ChangeKind::Move)
            && change.new.as_ref().is_some_and(|s| s.npages() > MAX_REAL_PAGES)
        {
            return Err(format!("generator bug: {req} would create a huge slot for real"));
        }
        let real = apply_real(&vm, &req);
        operations += 1;
        match &ours {
            Ok(change) => {
                *kinds.entry(format!("{:?}", change.kind)).or_default() += 1;
                if let Some(edge) = notable_success(&req, change) {
                    *edges.entry(edge).or_default() += 1;
                }
            }
            Err(e) => {
                *rows.entry(e.rule().unwrap_or(0)).or_default() += 1;
                let name = format!("{e:?}");
                let name = name.split([' ', '{']).next().unwrap_or_default().to_string();
                *checks.entry(name).or_default() += 1;
            }
        }
        let same = match (&ours, &real) {
            (Ok(_), Ok(())) => true,
            (Err(e), Err(errno)) => e.errno() == *errno,
            _ => false,
        };
        if !same {
            divergences += 1;
            if divergences <= 20 {
                let ours = ours
                    .as_ref()
                    .map(|c| format!("{:?}", c.kind))
                    .map_err(|e| format!("{} ({e})", e.errno()));
                eprintln!(
                    "divergence at operation {operations}: {req}\n  memvisor: {ours:?}\n  kvm:      {real:?}"
                );
            }
        }
    }
    let elapsed = start.elapsed();

    eprintln!(
        "memslot differential: seed {seed:#x}, {:.2} s, {:.2} µs per operation",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / operations as f64
    );
    eprintln!("memslot differential: successes by kind {kinds:?}");
    eprintln!("memslot differential: refusals by rule row {rows:?}");
    eprintln!("memslot differential: refusals by check {checks:?}");
    eprintln!("memslot differential: accepted edges {edges:?}");
    let wanted_rows: BTreeSet<u8> = (1..=19).filter(|r| *r != 12 && *r != 15).collect();
    let missing_rows: Vec<u8> = wanted_rows.iter().copied().filter(|r| !rows.contains_key(r)).collect();
    let missing_kinds: Vec<&str> = ["Create", "Delete", "Move", "FlagsOnly", "None"]
        .into_iter()
        .filter(|k| !kinds.contains_key(*k))
        .collect();
    println!("memslot differential: {operations} operations, {divergences} divergences");
    if !missing_rows.is_empty() || !missing_kinds.is_empty() {
        eprintln!(
            "memslot differential: never exercised: rule rows {missing_rows:?}, changes {missing_kinds:?}"
        );
        return Ok(false);
    }
    Ok(divergences == 0)
}
