//! The demo's guest: a driver, in simple instructions, that brings up the
//! VT-d unit (queued invalidation, scalable root table, translation) and
//! then loops over phases the host scripts through the command block
//! (`layout::cmd`): it performs the host-supplied stores (its own page-table
//! updates), queues the invalidation descriptors and waits for their
//! completion status, then runs each DMA job — fill a page, DMA it into
//! edu's buffer at one IOVA, DMA it back out at another, compare — and
//! reports every job with an `out`.
//!
//! Registers kept across phases: r15 = the invalidation queue's tail.

use anyhow::{Context, Result};
use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, dword_ptr, dx, eax, ebx, qword_ptr, r13, r14, r15, rax, rbx, rcx, rdi, rdx, rsi,
};

use memvisor_platform::edu::DMA_BUFFER_ADDR;

use super::layout::{
    CMD, EDU_BASE, EDU_IRTE, EDU_SID, IQ, IR_TABLE, IR_TABLE_S, JOB_SIZE, JOBS, PCI_CONFIG_ADDRESS,
    PCI_CONFIG_DATA, PORT_BAD, PORT_DONE, PORT_OK, PORT_PHASE, ROOT_TABLE, VTD_BASE, WAIT_STATUS, cmd, job,
};
use memvisor_vtd::regs::RTADDR_SMT;
use memvisor_vtd::regs::gcmd::{IRE, QIE, SIRTP, SRTP, TE};

const GCMD: i32 = 0x18;
const GSTS: i32 = 0x1c;
const RTADDR: i32 = 0x20;
const IQT: i32 = 0x88;
const IQA: i32 = 0x90;
const IRTA: i32 = 0xb8;
/// GSTS bits that are not one-shot commands (Linux `dmar_disable_qi` & co).
const PERSISTENT: u32 = 0x96ff_ffff;

fn d(v: u64) -> Result<i32> {
    i32::try_from(v).context("displacement out of range")
}

struct Asm {
    a: CodeAssembler,
}

macro_rules! op {
    ($s:expr, $m:ident($($arg:expr),*)) => {
        $s.a.$m($($arg),*).map_err(|e| anyhow::anyhow!("assembling {}: {e}", stringify!($m)))?
    };
}

impl Asm {
    fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    fn set(&mut self, l: &mut CodeLabel) -> Result<()> {
        op!(self, set_label(l));
        Ok(())
    }

    /// Sets one persistent GCMD bit (or issues a one-shot command) and polls GSTS.
    fn gcmd(&mut self, bit: u32) -> Result<()> {
        op!(self, mov(rdi, VTD_BASE));
        op!(self, mov(eax, dword_ptr(rdi + GSTS)));
        op!(self, and(eax, PERSISTENT));
        op!(self, or(eax, bit));
        op!(self, mov(dword_ptr(rdi + GCMD), eax));
        let mut poll = self.label();
        self.set(&mut poll)?;
        op!(self, mov(eax, dword_ptr(rdi + GSTS)));
        op!(self, and(eax, bit));
        op!(self, jz(poll));
        Ok(())
    }

    /// `out dx, eax` with `eax` = the current job's index.
    fn report_job(&mut self, port: u16) -> Result<()> {
        op!(self, mov(eax, dword_ptr(r13 + d(job::INDEX)?)));
        op!(self, mov(dx, u32::from(port)));
        op!(self, out(dx, eax));
        Ok(())
    }

    /// One edu transfer: registers from rax (source), rbx (destination),
    /// command `cmd_value`; polls until the busy bit clears.
    /// A 32-bit PCI configuration write to edu (00:03.0) at `reg`.
    fn edu_config_write(&mut self, reg: u32, value: u32) -> Result<()> {
        let address = 0x8000_0000 | (u32::from(EDU_SID) << 8) | reg;
        op!(self, mov(eax, address));
        op!(self, mov(dx, u32::from(PCI_CONFIG_ADDRESS)));
        op!(self, out(dx, eax));
        op!(self, mov(eax, value));
        op!(self, mov(dx, u32::from(PCI_CONFIG_DATA)));
        op!(self, out(dx, eax));
        Ok(())
    }

    fn edu_transfer(&mut self, src: Src, dst: Src, cmd_value: u64) -> Result<()> {
        op!(self, mov(rdi, EDU_BASE));
        for (reg, what) in [(0x80, src), (0x88, dst)] {
            match what {
                Src::Buffer => op!(self, mov(rax, DMA_BUFFER_ADDR)),
                Src::Job(off) => op!(self, mov(rax, qword_ptr(r13 + d(off)?))),
            }
            op!(self, mov(qword_ptr(rdi + reg), rax));
        }
        op!(self, mov(rax, 0x1000u64));
        op!(self, mov(qword_ptr(rdi + 0x90), rax));
        op!(self, mov(rax, cmd_value));
        op!(self, mov(qword_ptr(rdi + 0x98), rax));
        let mut poll = self.label();
        self.set(&mut poll)?;
        op!(self, mov(rax, qword_ptr(rdi + 0x98)));
        op!(self, and(rax, 1));
        op!(self, jnz(poll));
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Src {
    Buffer,
    Job(u64),
}

/// Assembles the guest for load address `at`; `scalable` selects the
/// scalable-mode root table (RTADDR.TTM), otherwise legacy; `ir` turns on
/// interrupt remapping and has edu raise an interrupt after every transfer.
pub fn program(at: u64, scalable: bool, ir: bool) -> Result<Vec<u8>> {
    let mut s = Asm { a: CodeAssembler::new(64).map_err(|e| anyhow::anyhow!("assembler: {e}"))? };

    // edu: memory decode and bus mastering; with interrupt remapping, MSI
    // in remappable format (handle EDU_IRTE, SHV clear).
    s.edu_config_write(0x04, 0x6)?;
    if ir {
        let handle = u32::try_from(EDU_IRTE).context("IRTE handle")?;
        s.edu_config_write(0x44, 0xfee0_0000 | (handle << 5) | (1 << 4))?;
        s.edu_config_write(0x48, 0)?;
        s.edu_config_write(0x4c, 0)?;
        s.edu_config_write(0x40, 1 << 16)?; // MSI control: enable
    }

    // Bring-up, in Linux's order: QI, root table, translation.
    op!(s, mov(rdi, VTD_BASE));
    op!(s, mov(rax, 0u64));
    op!(s, mov(qword_ptr(rdi + IQT), rax));
    op!(s, mov(rax, IQ));
    op!(s, mov(qword_ptr(rdi + IQA), rax));
    s.gcmd(QIE)?;
    op!(s, mov(rdi, VTD_BASE));
    op!(s, mov(rax, if scalable { ROOT_TABLE | RTADDR_SMT } else { ROOT_TABLE }));
    op!(s, mov(qword_ptr(rdi + RTADDR), rax));
    s.gcmd(SRTP)?;
    if ir {
        op!(s, mov(rdi, VTD_BASE));
        op!(s, mov(rax, IR_TABLE | IR_TABLE_S));
        op!(s, mov(qword_ptr(rdi + IRTA), rax));
        s.gcmd(SIRTP)?;
        s.gcmd(IRE)?;
    }
    s.gcmd(TE)?;
    op!(s, mov(r15, 0u64));

    let mut main = s.label();
    let mut done = s.label();
    let mut descs = s.label();
    let mut jobs = s.label();
    s.set(&mut main)?;
    // Ask the host for the next phase; it stops the vCPU here and fills CMD.
    op!(s, mov(eax, 0u32));
    op!(s, mov(dx, u32::from(PORT_PHASE)));
    op!(s, out(dx, eax));
    op!(s, mov(rsi, CMD));
    op!(s, mov(rax, qword_ptr(rsi + d(cmd::QUIT)?)));
    op!(s, cmp(rax, 0));
    op!(s, jne(done));

    // Stores: the guest's own table updates.
    op!(s, mov(rcx, qword_ptr(rsi + d(cmd::NSTORES)?)));
    op!(s, cmp(rcx, 0));
    op!(s, je(descs));
    op!(s, mov(rbx, CMD + cmd::STORES));
    let mut store = s.label();
    s.set(&mut store)?;
    op!(s, mov(rdi, qword_ptr(rbx)));
    op!(s, mov(rax, qword_ptr(rbx + 8)));
    op!(s, mov(qword_ptr(rdi), rax));
    op!(s, add(rbx, 16));
    op!(s, loop_(store));

    // Invalidation descriptors: copy into the queue at the tail, ring IQT,
    // wait for the last wait descriptor's status.
    s.set(&mut descs)?;
    op!(s, mov(rcx, qword_ptr(rsi + d(cmd::NDESCS)?)));
    op!(s, cmp(rcx, 0));
    op!(s, je(jobs));
    op!(s, mov(rbx, CMD + cmd::DESCS));
    let mut desc = s.label();
    s.set(&mut desc)?;
    op!(s, mov(rdi, IQ));
    op!(s, add(rdi, r15));
    op!(s, mov(rax, qword_ptr(rbx)));
    op!(s, mov(qword_ptr(rdi), rax));
    op!(s, mov(rax, qword_ptr(rbx + 8)));
    op!(s, mov(qword_ptr(rdi + 8), rax));
    op!(s, add(rbx, 16));
    op!(s, add(r15, 16));
    op!(s, and(r15, 0xff0));
    op!(s, loop_(desc));
    op!(s, mov(rdi, VTD_BASE));
    op!(s, mov(qword_ptr(rdi + IQT), r15));
    op!(s, mov(rdi, WAIT_STATUS));
    op!(s, mov(rbx, qword_ptr(rsi + d(cmd::TOKEN)?)));
    let mut wait = s.label();
    s.set(&mut wait)?;
    op!(s, mov(eax, dword_ptr(rdi)));
    op!(s, cmp(eax, ebx));
    op!(s, jne(wait));

    // Jobs.
    s.set(&mut jobs)?;
    op!(s, mov(r14, qword_ptr(rsi + d(cmd::NJOBS)?)));
    op!(s, mov(r13, JOBS));
    let mut next_job = s.label();
    let mut job_loop = s.label();
    s.set(&mut job_loop)?;
    op!(s, cmp(r14, 0));
    op!(s, je(main));
    // Fill.
    let mut nofill = s.label();
    op!(s, mov(rdi, qword_ptr(r13 + d(job::FILL_GPA)?)));
    op!(s, cmp(rdi, 0));
    op!(s, je(nofill));
    op!(s, mov(rax, qword_ptr(r13 + d(job::SEED)?)));
    op!(s, mov(rdx, qword_ptr(r13 + d(job::INC)?)));
    op!(s, mov(rcx, 512u64));
    let mut fill = s.label();
    s.set(&mut fill)?;
    op!(s, mov(qword_ptr(rdi), rax));
    op!(s, add(rdi, 8));
    op!(s, add(rax, rdx));
    op!(s, loop_(fill));
    s.set(&mut nofill)?;
    // RAM → edu, then edu → RAM.
    let raise = if ir { 4 } else { 0 };
    s.edu_transfer(Src::Job(job::SRC_IOVA), Src::Buffer, 1 | raise)?;
    s.edu_transfer(Src::Buffer, Src::Job(job::DST_IOVA), 3 | raise)?;
    // Compare.
    let mut nocheck = s.label();
    let mut bad = s.label();
    op!(s, mov(rdi, qword_ptr(r13 + d(job::CHECK_GPA)?)));
    op!(s, cmp(rdi, 0));
    op!(s, je(nocheck));
    op!(s, mov(rax, qword_ptr(r13 + d(job::SEED)?)));
    op!(s, mov(rdx, qword_ptr(r13 + d(job::INC)?)));
    op!(s, mov(rcx, 512u64));
    let mut cmp = s.label();
    s.set(&mut cmp)?;
    op!(s, mov(rbx, qword_ptr(rdi)));
    op!(s, cmp(rbx, rax));
    op!(s, jne(bad));
    op!(s, add(rdi, 8));
    op!(s, add(rax, rdx));
    op!(s, loop_(cmp));
    s.report_job(PORT_OK)?;
    op!(s, jmp(next_job));
    s.set(&mut bad)?;
    s.report_job(PORT_BAD)?;
    op!(s, jmp(next_job));
    s.set(&mut nocheck)?;
    s.report_job(PORT_DONE)?;
    s.set(&mut next_job)?;
    op!(s, add(r13, d(JOB_SIZE)?));
    op!(s, sub(r14, 1));
    op!(s, jmp(job_loop));

    s.set(&mut done)?;
    op!(s, hlt());
    op!(s, jmp(done));
    s.a.assemble(at).map_err(|e| anyhow::anyhow!("assembling the demo guest: {e}"))
}
