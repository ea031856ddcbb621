//! Test guests: small 64-bit programs of simple instructions, and the
//! identity-mapped long-mode environment they run in.
//!
//! Programs use only `mov`, `add`, `loop`, `in`, `out` and `hlt` (plus MMIO loads
//! and stores, which are `mov`s to unbacked addresses), because the software
//! KVM memvisor is developed on emulates much of guest execution and
//! fails on complex instructions.
//!
//! The page tables are built by memvisor-paging's [`Mapper`] directly in guest
//! RAM (through [`GuestRam`]), so every test guest also exercises memvisor's
//! x86-64 table format against a real (software) CPU walk.
//!
//! ```
//! use memvisor_kvm::guest::{GuestProgram, pattern_value};
//! use memvisor_types::Gpa;
//!
//! let mut program = GuestProgram::new()?;
//! program.fill_pattern(Gpa::new(0x20_0000), 0x1000, 7)?.out_u32(0x10, 1)?.hlt()?;
//! let code = program.assemble(Gpa::new(0x1_0000))?;
//! assert!(!code.is_empty());
//! assert_eq!(pattern_value(7, Gpa::new(0x20_0008)), 0x20_000f);
//! # Ok::<(), memvisor_kvm::Error>(())
//! ```

use iced_x86::IcedError;
use iced_x86::code_asm::{CodeAssembler, dword_ptr, dx, eax, qword_ptr, rax, rcx, rdi};
use memvisor_hostmem::{GuestRam, VmTables};
use memvisor_paging::{ArenaFrames, Mapper, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Gva, PageSize};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

fn asm_err(e: IcedError) -> Error {
    Error::Assemble(e.to_string())
}

/// The value [`GuestProgram::fill_pattern`] writes at `gpa` with `seed`.
pub fn pattern_value(seed: u64, gpa: Gpa) -> u64 {
    seed.wrapping_add(gpa.raw())
}

/// A 64-bit guest program under construction.
pub struct GuestProgram {
    asm: CodeAssembler,
}

impl std::fmt::Debug for GuestProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestProgram").field("instructions", &self.asm.instructions().len()).finish()
    }
}

impl GuestProgram {
    /// An empty program.
    pub fn new() -> Result<Self> {
        Ok(Self { asm: CodeAssembler::new(64).map_err(asm_err)? })
    }

    /// Stores `value` at `gpa` (8 bytes).
    pub fn write_u64(&mut self, gpa: Gpa, value: u64) -> Result<&mut Self> {
        let a = &mut self.asm;
        a.mov(rax, value).map_err(asm_err)?;
        a.mov(rdi, gpa.raw()).map_err(asm_err)?;
        a.mov(qword_ptr(rdi), rax).map_err(asm_err)?;
        Ok(self)
    }

    /// Fills `len` bytes (a non-zero multiple of 8) from `gpa` with the
    /// pattern [`pattern_value`]`(seed, address)` — a `loop` of 8-byte stores.
    pub fn fill_pattern(&mut self, gpa: Gpa, len: u64, seed: u64) -> Result<&mut Self> {
        if len == 0 || !len.is_multiple_of(8) {
            return Err(Error::Assemble(format!("pattern length {len:#x} is not a non-zero multiple of 8")));
        }
        AddrRange::from_len(gpa, len)?;
        let a = &mut self.asm;
        let mut top = a.create_label();
        a.mov(rdi, gpa.raw()).map_err(asm_err)?;
        a.mov(rax, pattern_value(seed, gpa)).map_err(asm_err)?;
        a.mov(rcx, len / 8).map_err(asm_err)?;
        a.set_label(&mut top).map_err(asm_err)?;
        a.mov(qword_ptr(rdi), rax).map_err(asm_err)?;
        a.add(rdi, 8).map_err(asm_err)?;
        a.add(rax, 8).map_err(asm_err)?;
        a.loop_(top).map_err(asm_err)?;
        Ok(self)
    }

    /// Loads 8 bytes from `from` and stores them at `to`. With `to` an
    /// unbacked (MMIO) address the host sees the loaded value in an MMIO
    /// write exit: how a test guest reports what it read.
    pub fn copy_u64(&mut self, from: Gpa, to: Gpa) -> Result<&mut Self> {
        let a = &mut self.asm;
        a.mov(rdi, from.raw()).map_err(asm_err)?;
        a.mov(rax, qword_ptr(rdi)).map_err(asm_err)?;
        a.mov(rdi, to.raw()).map_err(asm_err)?;
        a.mov(qword_ptr(rdi), rax).map_err(asm_err)?;
        Ok(self)
    }

    /// `out dx, eax` with `value` to `port`.
    pub fn out_u32(&mut self, port: u16, value: u32) -> Result<&mut Self> {
        let a = &mut self.asm;
        a.mov(eax, value).map_err(asm_err)?;
        a.mov(dx, u32::from(port)).map_err(asm_err)?;
        a.out(dx, eax).map_err(asm_err)?;
        Ok(self)
    }

    /// `in eax, dx` from `port`, then stores the 4 bytes read at `to`.
    pub fn in_u32(&mut self, port: u16, to: Gpa) -> Result<&mut Self> {
        let a = &mut self.asm;
        a.mov(dx, u32::from(port)).map_err(asm_err)?;
        a.in_(eax, dx).map_err(asm_err)?;
        a.mov(rdi, to.raw()).map_err(asm_err)?;
        a.mov(dword_ptr(rdi), eax).map_err(asm_err)?;
        Ok(self)
    }

    /// Spins `iterations` times without touching memory or exiting
    /// (`loop` on itself; 0 means 2^64 — forever, for timeout tests).
    pub fn spin(&mut self, iterations: u64) -> Result<&mut Self> {
        let a = &mut self.asm;
        let mut top = a.create_label();
        a.mov(rcx, iterations).map_err(asm_err)?;
        a.set_label(&mut top).map_err(asm_err)?;
        a.loop_(top).map_err(asm_err)?;
        Ok(self)
    }

    /// `hlt`: [`Vcpu::run`](crate::Vcpu::run) returns
    /// [`Stop::Halted`](crate::Stop::Halted); running again continues after it.
    pub fn hlt(&mut self) -> Result<&mut Self> {
        self.asm.hlt().map_err(asm_err)?;
        Ok(self)
    }

    /// Machine code for the program placed at `at`.
    pub fn assemble(&mut self, at: Gpa) -> Result<Vec<u8>> {
        self.asm.assemble(at.raw()).map_err(asm_err)
    }
}

/// Where a vCPU starts in 64-bit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongModeEntry {
    /// Root of the 4-level page tables.
    pub cr3: Gpa,
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer (programs here use no stack; it points at unused RAM).
    pub rsp: u64,
}

/// Layout of a long-mode test guest in its boot memory: page tables from
/// `tables`, code at `code`; guest-virtual = guest-physical for the low
/// `identity_limit` bytes, mapped with 2 MiB pages (so MMIO addresses and
/// slots moved anywhere below the limit stay reachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    /// Frames for page tables: `tables..code`.
    pub tables: Gpa,
    /// Where the program is loaded; the stack grows down from here.
    pub code: Gpa,
    /// Bytes identity-mapped from address 0 (a multiple of 2 MiB).
    pub identity_limit: u64,
}

impl Default for Boot {
    /// Tables at 64 KiB, code at 128 KiB, the low 4 GiB identity-mapped
    /// (6 table frames).
    fn default() -> Self {
        Self { tables: Gpa::new(0x1_0000), code: Gpa::new(0x2_0000), identity_limit: 4 << 30 }
    }
}

impl Boot {
    /// Writes the page tables and `program` into `ram` (which must back
    /// `tables..code + program length`) and returns the entry point.
    pub fn load(&self, ram: &GuestRam, program: &mut GuestProgram) -> Result<LongModeEntry> {
        let mem = VmTables(ram);
        let frames = ArenaFrames::<Gpa>::range(self.tables.raw(), self.code.raw());
        // 2 MiB pages only: this software CPU does not advertise 1 GiB pages
        // (CPUID 0x8000_0001 EDX bit 26 is clear), so 1 GiB leaves would fault.
        let format = X86Paging { gbpages: false, nxe: false, ..X86Paging::four_level() };
        let mut mapper = Mapper::new(format, mem, frames)?;
        let identity = AddrRange::new_aligned(Gva::new(0), self.identity_limit, PageSize::Size2M)?;
        mapper.map(identity, Gpa::new(0), X86Attrs::kernel_rwx(), PageSize::Size2M)?;
        let code = program.assemble(self.code)?;
        ram.write_slice(&code, GuestAddress(self.code.raw()))
            .map_err(|e| Error::Assemble(format!("loading {} bytes at {}: {e}", code.len(), self.code)))?;
        Ok(LongModeEntry { cr3: mapper.root(), rip: self.code.raw(), rsp: self.code.raw() })
    }
}
