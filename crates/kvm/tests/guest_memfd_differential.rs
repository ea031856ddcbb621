//! Differential test: random guest_memfd file operations — create (flags and
//! sizes), mmap (lengths, offsets, protections, mapping types), fallocate
//! (modes, offsets, lengths), read/write/pread/pwrite and ftruncate — applied
//! to the model in `memvisor_memslots::gmem` and to real guest_memfd files
//! of a KVM VM. Every outcome (success, or the errno) must be the same.
//!
//! Prints `guest_memfd differential: N operations, D divergences` and fails
//! if D > 0 or if a rule was never exercised. Without `/dev/kvm` it prints
//! why and passes, unless `MEMVISOR_REQUIRE_KVM=1`. `MEMVISOR_SEED` picks
//! another random sequence.

#![expect(
    unsafe_code,
    reason = "the file operations under test are raw syscalls (mmap, munmap, fallocate, read, write, ftruncate) \
              and descriptors returned by KVM are adopted as OwnedFd; each block says why it is sound"
)]

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Instant;

use kvm_bindings::kvm_create_guest_memfd;
use kvm_ioctls::{Kvm, VmFd};
use memvisor_memslots::Error;
use memvisor_memslots::gmem::{
    FLAG_INIT_SHARED, FLAG_MMAP, GmemFileModel, MmapHost, MmapRequest, SUPPORTED_FLAGS,
};

const OPERATIONS: u64 = 100_000;
const PAGE: u64 = 4096;
/// The last page of the 64-bit space.
const TOP_PAGE: u64 = !0xfff;
/// Files kept open at once (the oldest is closed beyond this).
const OPEN_FILES: usize = 8;
/// Longest plain allocation (fallocate KEEP_SIZE) the test makes for real.
const MAX_ALLOCATION: i64 = 16 * 4096;

const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const NO_HIDE_STALE: i32 = 0x04;
const COLLAPSE_RANGE: i32 = libc::FALLOC_FL_COLLAPSE_RANGE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
const INSERT_RANGE: i32 = libc::FALLOC_FL_INSERT_RANGE;
const UNSHARE_RANGE: i32 = libc::FALLOC_FL_UNSHARE_RANGE;
const WRITE_ZEROES: i32 = 0x80;

fn main() -> ExitCode {
    let require = std::env::var("MEMVISOR_REQUIRE_KVM").is_ok_and(|v| v == "1");
    if !std::path::Path::new("/dev/kvm").exists() {
        if require {
            eprintln!("guest_memfd differential: /dev/kvm is absent and MEMVISOR_REQUIRE_KVM=1");
            return ExitCode::FAILURE;
        }
        println!("guest_memfd differential: skipped, /dev/kvm is absent");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("guest_memfd differential: {e}");
            ExitCode::FAILURE
        }
    }
}

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// An open guest_memfd and its model.
struct File {
    fd: OwnedFd,
    model: GmemFileModel,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Create { size: u64, flags: u64 },
    Mmap(MmapRequest),
    Fallocate { mode: i32, offset: i64, len: i64 },
    Read { positioned: bool, offset: i64 },
    Write { positioned: bool, offset: i64 },
    Truncate { len: i64 },
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn create_real(vm: &VmFd, size: u64, flags: u64) -> Result<OwnedFd, i32> {
    let fd = vm
        .create_guest_memfd(kvm_create_guest_memfd { size, flags, reserved: [0; 6] })
        .map_err(|e| e.errno())?;
    // SAFETY: KVM just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `op` on the real file; a successful mapping is unmapped at once.
fn apply_real(file: &File, op: &Op) -> Result<(), i32> {
    let fd = file.fd.as_raw_fd();
    let mut buf = [0u8; 64];
    let ret: i64 = match *op {
        Op::Create { .. } => return Ok(()),
        Op::Mmap(req) => {
            let Ok(len) = usize::try_from(req.len) else { return Err(libc::ENOMEM) };
            // SAFETY: no MAP_FIXED, so no existing mapping can be replaced;
            // the new mapping is never accessed and is unmapped just below.
            let ptr = unsafe {
                libc::mmap(std::ptr::null_mut(), len, req.prot, req.flags, fd, req.offset.cast_signed())
            };
            if ptr == libc::MAP_FAILED {
                return Err(errno());
            }
            // SAFETY: unmaps exactly the mapping created above.
            unsafe { libc::munmap(ptr, len) };
            0
        }
        // SAFETY: fallocate reads no user memory; `fd` is open.
        Op::Fallocate { mode, offset, len } => i64::from(unsafe { libc::fallocate(fd, mode, offset, len) }),
        Op::Read { positioned, offset } => {
            let n = if positioned {
                // SAFETY: `buf` is valid for writes of its length.
                unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) }
            } else {
                // SAFETY: as above.
                unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
            };
            i64::try_from(n).unwrap_or(-1)
        }
        Op::Write { positioned, offset } => {
            let n = if positioned {
                // SAFETY: `buf` is valid for reads of its length.
                unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset) }
            } else {
                // SAFETY: as above.
                unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
            };
            i64::try_from(n).unwrap_or(-1)
        }
        // SAFETY: ftruncate reads no user memory; `fd` is open.
        Op::Truncate { len } => i64::from(unsafe { libc::ftruncate(fd, len) }),
    };
    if ret < 0 { Err(errno()) } else { Ok(()) }
}

fn apply_model(file: &File, op: &Op, host: &MmapHost) -> Result<(), Error> {
    match *op {
        Op::Create { size, flags } => GmemFileModel::create(size, flags, SUPPORTED_FLAGS).map(|_| ()),
        Op::Mmap(req) => file.model.mmap(&req, host),
        Op::Fallocate { mode, offset, len } => file.model.fallocate(mode, offset, len),
        Op::Read { positioned: false, .. } => file.model.read(),
        Op::Read { positioned: true, offset } => file.model.pread(offset),
        Op::Write { positioned: false, .. } => file.model.write(),
        Op::Write { positioned: true, offset } => file.model.pwrite(offset),
        Op::Truncate { len } => file.model.truncate(len),
    }
}

struct Generator {
    rng: Rng,
}

impl Generator {
    fn create(&mut self) -> Op {
        let random_aligned = self.rng.below(1 << 32) * PAGE;
        let random = self.rng.next();
        let size = self.rng.pick(&[
            0,
            0x800,
            PAGE,
            0x1_0000,
            1 << 20,
            16 << 20,
            1 << 30,
            1 << 40,
            1 << 62,
            (1 << 63) - PAGE,
            1 << 63,
            u64::MAX,
            TOP_PAGE,
            random_aligned,
            random,
        ]);
        let random_flags = self.rng.next();
        let flags = self.rng.pick(&[
            0,
            FLAG_MMAP,
            FLAG_INIT_SHARED,
            FLAG_MMAP | FLAG_INIT_SHARED,
            FLAG_MMAP | FLAG_INIT_SHARED,
            1 << 2,
            FLAG_MMAP | 1 << 3,
            1 << 63,
            random_flags,
        ]);
        Op::Create { size, flags }
    }

    fn mmap(&mut self, size: u64) -> Op {
        let random_len = (self.rng.below(64) + 1) * PAGE;
        let len = self.rng.pick(&[
            0,
            1,
            0x800,
            PAGE,
            2 * PAGE,
            0x1_0000,
            size,
            size.saturating_add(PAGE),
            1 << 30,
            1 << 47,
            u64::MAX,
            u64::MAX - 0x800,
            random_len,
        ]);
        let len = if len > 1 << 40 && len != 1 << 47 && len < u64::MAX - PAGE { PAGE } else { len };
        let offset = self.rng.pick(&[
            0,
            0,
            PAGE,
            0x800,
            size,
            size.saturating_sub(PAGE),
            size.saturating_add(1 << 20),
            (1 << 63) - PAGE,
            (1 << 63) - (1 << 30),
            1 << 63,
            (1 << 52) - PAGE,
            TOP_PAGE,
        ]);
        let prot = self.rng.pick(&[
            libc::PROT_NONE,
            libc::PROT_READ,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::PROT_WRITE,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::PROT_EXEC,
        ]);
        let flags = self.rng.pick(&[
            libc::MAP_SHARED,
            libc::MAP_SHARED,
            libc::MAP_PRIVATE,
            libc::MAP_SHARED_VALIDATE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            0,
            0x4,
            0xf,
        ]);
        Op::Mmap(MmapRequest { len, offset, prot, flags })
    }

    fn fallocate(&mut self, size: u64) -> Op {
        let random_mode = i32::try_from(self.rng.below(0x200)).unwrap_or(0);
        let mode = self.rng.pick(&[
            0,
            KEEP_SIZE,
            KEEP_SIZE,
            KEEP_SIZE | PUNCH_HOLE,
            KEEP_SIZE | PUNCH_HOLE,
            PUNCH_HOLE,
            ZERO_RANGE,
            ZERO_RANGE | KEEP_SIZE,
            COLLAPSE_RANGE,
            COLLAPSE_RANGE | KEEP_SIZE,
            INSERT_RANGE,
            INSERT_RANGE | KEEP_SIZE,
            UNSHARE_RANGE,
            UNSHARE_RANGE | KEEP_SIZE,
            WRITE_ZEROES,
            WRITE_ZEROES | KEEP_SIZE,
            NO_HIDE_STALE,
            NO_HIDE_STALE | KEEP_SIZE | PUNCH_HOLE,
            PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE,
            0x100 | KEEP_SIZE,
            random_mode,
        ]);
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        let pages_in =
            i64::try_from(self.rng.below(u64::try_from(size / 4096).unwrap_or(1).max(1))).unwrap_or(0);
        let offset = self.rng.pick(&[
            0,
            pages_in * 4096,
            pages_in * 4096,
            size - 4096,
            size,
            size.saturating_add(0x10_0000),
            0x800,
            -1,
            -4096,
            i64::MAX & !0xfff,
            i64::MAX - 0xfff - 0x1000,
        ]);
        let small = i64::try_from(self.rng.below(16) + 1).unwrap_or(1) * 4096;
        let len = if mode == KEEP_SIZE {
            // A real allocation: keep it small.
            self.rng.pick(&[0, -1, -4096, 0x800, 4096, small, small, MAX_ALLOCATION, MAX_ALLOCATION + 4096])
        } else {
            self.rng.pick(&[0, -1, 0x800, 4096, small, 1 << 30, i64::MAX & !0xfff, 8192, i64::MAX])
        };
        Op::Fallocate { mode, offset, len }
    }

    fn next(&mut self, size: u64) -> Op {
        match self.rng.below(100) {
            0..10 => self.create(),
            10..45 => self.mmap(size),
            45..85 => self.fallocate(size),
            85..91 => {
                let offset = self.rng.pick(&[0, 4096, -1, i64::MAX]);
                if self.rng.chance(50) {
                    Op::Read { positioned: self.rng.chance(50), offset }
                } else {
                    Op::Write { positioned: self.rng.chance(50), offset }
                }
            }
            _ => {
                let same = i64::try_from(size).unwrap_or(i64::MAX);
                Op::Truncate {
                    len: self.rng.pick(&[0, same, same.saturating_add(4096), same - 4096, -1, 0x800]),
                }
            }
        }
    }
}

/// This host's memory accounting, read from procfs: with the heuristic
/// overcommit mode a private writable mapping may not exceed RAM + swap.
fn mmap_host() -> Result<MmapHost, String> {
    let mode = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").map_err(|e| e.to_string())?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    match mode.trim() {
        "0" => Ok(MmapHost { commit_limit: Some((kib("MemTotal:") + kib("SwapTotal:")) * 1024) }),
        "1" => Ok(MmapHost { commit_limit: None }),
        other => Err(format!("vm.overcommit_memory = {other} (strict accounting) is not modelled")),
    }
}

fn run() -> Result<bool, String> {
    let seed = std::env::var("MEMVISOR_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x676d_656d_6664);
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let mut files: VecDeque<File> = VecDeque::new();
    for (size, flags) in [(1 << 20, FLAG_MMAP | FLAG_INIT_SHARED), (64 << 10, 0)] {
        let model = GmemFileModel::create(size, flags, SUPPORTED_FLAGS).map_err(|e| e.to_string())?;
        let fd = create_real(&vm, size, flags).map_err(|e| format!("KVM_CREATE_GUEST_MEMFD: errno {e}"))?;
        files.push_back(File { fd, model });
    }
    let host = mmap_host()?;
    let mut generator = Generator { rng: Rng(seed) };
    let (mut operations, mut divergences) = (0u64, 0u64);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    while operations < OPERATIONS {
        let index = usize::try_from(generator.rng.below(files.len() as u64)).unwrap_or(0);
        let file = &files[index];
        let op = generator.next(file.model.size());
        let ours = apply_model(file, &op, &host);
        let real = match op {
            Op::Create { size, flags } => create_real(&vm, size, flags).map(|fd| {
                if let Ok(model) = GmemFileModel::create(size, flags, SUPPORTED_FLAGS) {
                    files.push_back(File { fd, model });
                    if files.len() > OPEN_FILES {
                        files.pop_front();
                    }
                }
            }),
            _ => apply_real(file, &op),
        };
        operations += 1;
        let name = match op {
            Op::Create { .. } => "create",
            Op::Mmap(_) => "mmap",
            Op::Fallocate { .. } => "fallocate",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "ftruncate",
        };
        let key = match &ours {
            Ok(()) => format!("{name} ok"),
            Err(e) => {
                let variant = format!("{e:?}");
                format!("{name} {}", variant.split([' ', '{']).next().unwrap_or_default())
            }
        };
        *outcomes.entry(key).or_default() += 1;
        let same = match (&ours, &real) {
            (Ok(()), Ok(())) => true,
            (Err(e), Err(errno)) => e.errno() == *errno,
            _ => false,
        };
        if !same {
            divergences += 1;
            if divergences <= 20 {
                let ours = ours.map_err(|e| format!("{} ({e})", e.errno()));
                eprintln!(
                    "divergence at operation {operations}: {op:x?}\n  memvisor: {ours:?}\n  kvm:      {real:?}"
                );
            }
        }
    }
    let elapsed = start.elapsed();
    eprintln!(
        "guest_memfd differential: seed {seed:#x}, {:.2} s, {:.2} µs per operation",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / operations as f64
    );
    eprintln!("guest_memfd differential: outcomes {outcomes:?}");
    let wanted = [
        "create ok",
        "create GmemFlags",
        "create GmemSize",
        "mmap ok",
        "mmap MmapInvalid",
        "mmap MmapNoMemory",
        "mmap MmapOverflow",
        "mmap MmapExec",
        "mmap MmapUnsupported",
        "mmap MmapPrivate",
        "fallocate ok",
        "fallocate FallocateRange",
        "fallocate FallocateMode",
        "fallocate FallocateTooBig",
        "fallocate FallocateUnaligned",
        "fallocate FallocatePastEof",
        "read GmemFileOp",
        "write GmemFileOp",
        "ftruncate GmemFileOp",
        "read GmemNotPositionable",
        "read NegativePosition",
        "write GmemNotPositionable",
        "write NegativePosition",
    ];
    let missing: Vec<&str> = wanted.into_iter().filter(|k| !outcomes.contains_key(*k)).collect();
    println!("guest_memfd differential: {operations} operations, {divergences} divergences");
    if !missing.is_empty() {
        eprintln!("guest_memfd differential: never exercised: {missing:?}");
        return Ok(false);
    }
    Ok(divergences == 0)
}
