//! A built-in multiboot guest that drives the VT-d unit at 0xfed90000
//! through a fixed script of register operations and prints what it
//! observes, one `name=value` line (value in hex) per observation, on the
//! 16550 at 0x3f8; then it writes 0 to isa-debug-exit (0xf4).
//!
//! The same bytes run under memvisor and QEMU, so the two models can be
//! compared line by line. 32-bit protected mode, paging off, interrupts off,
//! 4-byte MMIO accesses only (a 64-bit register is written low half first,
//! then the high half, as Linux's 32-bit `dmar_writeq`).
//!
//! Guest memory: the invalidation queue at 2 MiB (one page, 256
//! descriptors), the root table at +4 KiB, the interrupt-remapping table at
//! +8 KiB, the wait-descriptor status words at +12 KiB.

use memvisor_vtd::regs::gcmd::{CFI, IRE, QIE, SIRTP, SRTP, TE};
use std::path::{Path, PathBuf};

use iced_x86::code_asm::{CodeAssembler, CodeLabel, al, dword_ptr, dx, eax, ebx, ecx, esi, esp};

const LOAD_ADDR: u32 = 0x10_0000;
const HEADER_LEN: u32 = 32;

const VTD: u32 = 0xfed9_0000;
const IQ: u32 = 0x20_0000;
const ROOT: u32 = IQ + 0x1000;
const IRT: u32 = IQ + 0x2000;
const STATUS: u32 = IQ + 0x3000;

// Register offsets.
const CAP: u32 = 0x08;
const ECAP: u32 = 0x10;
const GCMD: u32 = 0x18;
const GSTS: u32 = 0x1c;
const RTADDR: u32 = 0x20;
const CCMD: u32 = 0x28;
const FSTS: u32 = 0x34;
const FECTL: u32 = 0x38;
const FEADDR: u32 = 0x40;
const IQH: u32 = 0x80;
const IQT: u32 = 0x88;
const IQA: u32 = 0x90;
const ICS: u32 = 0x9c;
const IECTL: u32 = 0xa0;
const IQER: u32 = 0xb0;
const IRTA: u32 = 0xb8;

/// GSTS bits that may be written back to GCMD (the one-shot ones cleared),
/// as Linux's `readl(GSTS) & 0x96ffffff`.
const PERSISTENT: u32 = 0x96ff_ffff;

/// A 128-bit invalidation descriptor as (low, high) quadwords.
type Desc = (u64, u64);

const CONTEXT_GLOBAL: Desc = (0x1 | 1 << 4, 0);
const IOTLB_GLOBAL: Desc = (0x2 | 1 << 4, 0);
const IEC_GLOBAL: Desc = (0x4, 0);
/// Wait with status write of `data` to `addr`.
const fn wait_sw(data: u32, addr: u32) -> Desc {
    (0x5 | 1 << 5 | (data as u64) << 32, addr as u64)
}
/// Wait with interrupt flag (ICS.IWC).
const WAIT_IF: Desc = (0x5 | 1 << 4, 0);
/// A context-cache descriptor with reserved bit 6 set: an invalid descriptor.
const CONTEXT_RESERVED: Desc = (0x1 | 1 << 4 | 1 << 6, 0);

struct Probe {
    a: CodeAssembler,
    hex: CodeLabel,
}

impl Probe {
    fn reg(off: u32) -> u32 {
        VTD + off
    }

    fn store(&mut self, addr: u32, value: u32) {
        self.a.mov(dword_ptr(addr), value).unwrap();
    }

    fn write32(&mut self, off: u32, value: u32) {
        self.store(Self::reg(off), value);
    }

    fn write64(&mut self, off: u32, value: u64) {
        let [lo, hi] = split(value);
        self.write32(off, lo);
        self.write32(off + 4, hi);
    }

    fn descriptor(&mut self, index: u32, (lo, hi): Desc) {
        let at = IQ + index * 16;
        let [w0, w1] = split(lo);
        let [w2, w3] = split(hi);
        for (addr, word) in [(at, w0), (at + 4, w1), (at + 8, w2), (at + 12, w3)] {
            self.store(addr, word);
        }
    }

    /// Queues `desc` at `slot` and rings the doorbell; shows FSTS and IQH
    /// (`fsts_<name>`, `iqh_<name>`). Then, whatever the unit made of it,
    /// brings the queue back to a known state: the slot is overwritten with
    /// a global IEC invalidation, a wait writing `marker` follows, IQE is
    /// cleared and the doorbell rung past both; shows IQH, the status word
    /// and FSTS (`<name>_after`). Returns the next free slot.
    fn descriptor_check(&mut self, name: &str, slot: u32, desc: Desc, marker: u32) -> u32 {
        let status = STATUS + 0x100 + 4 * slot;
        self.store(status, 0);
        self.descriptor(slot, desc);
        self.write64(IQT, u64::from(slot + 1) << 4);
        self.show32(&format!("fsts_{name}"), FSTS);
        self.show64(&format!("iqh_{name}"), IQH);
        self.descriptor(slot, IEC_GLOBAL);
        self.descriptor(slot + 1, wait_sw(marker, status));
        self.write32(FSTS, 1 << 4);
        self.write64(IQT, u64::from(slot + 2) << 4);
        self.show64(&format!("iqh_{name}_after"), IQH);
        self.show_at(&format!("status_{name}_after"), &[status]);
        self.show32(&format!("fsts_{name}_after"), FSTS);
        slot + 2
    }

    /// `GCMD = (GSTS & PERSISTENT) | set & !clear`.
    fn command(&mut self, set: u32, clear: u32) {
        self.a.mov(eax, dword_ptr(Self::reg(GSTS))).unwrap();
        self.a.and(eax, PERSISTENT & !clear).unwrap();
        self.a.or(eax, set).unwrap();
        self.a.mov(dword_ptr(Self::reg(GCMD)), eax).unwrap();
    }

    fn text(&mut self, s: &str) {
        self.a.mov(dx, 0x3f8u32).unwrap();
        for b in s.bytes() {
            self.a.mov(al, u32::from(b)).unwrap();
            self.a.out(dx, al).unwrap();
        }
    }

    /// Prints `name=` and the 32-bit values at `addrs` as one hex number
    /// (the first address is the most significant dword).
    fn show_at(&mut self, name: &str, addrs: &[u32]) {
        self.text(&format!("{name}="));
        for &addr in addrs {
            self.a.mov(eax, dword_ptr(addr)).unwrap();
            self.a.call(self.hex).unwrap();
        }
        self.text("\n");
    }

    /// A 32-bit register.
    fn show32(&mut self, name: &str, off: u32) {
        self.show_at(name, &[Self::reg(off)]);
    }

    /// A 64-bit register, high half first.
    fn show64(&mut self, name: &str, off: u32) {
        self.show_at(name, &[Self::reg(off + 4), Self::reg(off)]);
    }

    /// A 32-bit register masked by `mask`.
    fn show_masked(&mut self, name: &str, off: u32, mask: u32) {
        self.text(&format!("{name}="));
        self.a.mov(eax, dword_ptr(Self::reg(off))).unwrap();
        self.a.and(eax, mask).unwrap();
        self.a.call(self.hex).unwrap();
        self.text("\n");
    }

    /// The hex-printing routine: EAX as 8 digits; clobbers EBX, ECX, EDX.
    fn hex_routine(&mut self) {
        let mut top = self.a.create_label();
        let mut digit = self.a.create_label();
        self.a.set_label(&mut self.hex).unwrap();
        self.a.mov(ecx, 8u32).unwrap();
        self.a.mov(dx, 0x3f8u32).unwrap();
        self.a.set_label(&mut top).unwrap();
        self.a.rol(eax, 4u32).unwrap();
        self.a.mov(ebx, eax).unwrap();
        self.a.and(ebx, 0xfu32).unwrap();
        self.a.add(ebx, u32::from(b'0')).unwrap();
        self.a.cmp(ebx, u32::from(b'9')).unwrap();
        self.a.jbe(digit).unwrap();
        self.a.add(ebx, u32::from(b'a' - b'9' - 1)).unwrap();
        self.a.set_label(&mut digit).unwrap();
        self.a.mov(esi, eax).unwrap();
        self.a.mov(eax, ebx).unwrap();
        self.a.out(dx, al).unwrap();
        self.a.mov(eax, esi).unwrap();
        self.a.dec(ecx).unwrap();
        self.a.jnz(top).unwrap();
        self.a.ret().unwrap();
    }
}

/// (low, high) dwords of `v`.
fn split(v: u64) -> [u32; 2] {
    let [a, b, c, d, e, f, g, h] = v.to_le_bytes();
    [u32::from_le_bytes([a, b, c, d]), u32::from_le_bytes([e, f, g, h])]
}

/// The script. Every observation is one line; the comments say what a
/// VT-d unit is expected to show.
fn script(p: &mut Probe) {
    p.show32("gsts_reset", GSTS);
    p.show32("fsts_reset", FSTS);
    p.show_masked("cap_sagaw39", CAP, 1 << 9);
    p.show_masked("ecap_qi_ir", ECAP, 0b1010);
    // CAP is read-only.
    p.write32(CAP, 0);
    p.show_masked("cap_sagaw39_written", CAP, 1 << 9);

    // Queued invalidation on.
    p.write64(IQA, u64::from(IQ));
    p.write64(IQT, 0);
    p.command(QIE, 0);
    p.show32("gsts_qie", GSTS);
    p.show64("iqh_qie", IQH);

    // Root table.
    p.write64(RTADDR, u64::from(ROOT));
    p.command(SRTP, 0);
    p.show32("gsts_srtp", GSTS);
    p.command(0, 0);
    p.show32("gsts_after_srtp", GSTS);

    // Four descriptors: context, IOTLB, IEC (all global), wait + status.
    p.store(STATUS, 0);
    p.descriptor(0, CONTEXT_GLOBAL);
    p.descriptor(1, IOTLB_GLOBAL);
    p.descriptor(2, IEC_GLOBAL);
    p.descriptor(3, wait_sw(0xcafe_0001, STATUS));
    p.write64(IQT, 4 << 4);
    p.show64("iqh_4", IQH);
    p.show64("iqt_4", IQT);
    p.show_at("status_4", &[STATUS]);
    p.show32("fsts_4", FSTS);

    // Interrupt-remapping table, then translation and remapping on.
    p.write64(IRTA, u64::from(IRT) | 7);
    p.command(SIRTP, 0);
    p.show32("gsts_sirtp", GSTS);
    p.command(TE, 0);
    p.show32("gsts_te", GSTS);
    p.command(IRE, 0);
    p.show32("gsts_ire", GSTS);

    // Wait with interrupt flag: ICS.IWC, IECTL.IP (IECTL masked at reset).
    p.show32("iectl_reset", IECTL);
    p.descriptor(4, WAIT_IF);
    p.write64(IQT, 5 << 4);
    p.show64("iqh_if", IQH);
    p.show32("ics_if", ICS);
    p.show32("iectl_if", IECTL);
    p.write32(ICS, 1);
    p.show32("ics_cleared", ICS);
    p.show32("iectl_cleared", IECTL);

    // An invalid descriptor: IQE, the head stays on it.
    p.show32("fectl_reset", FECTL);
    p.descriptor(5, CONTEXT_RESERVED);
    p.write64(IQT, 6 << 4);
    p.show32("fsts_iqe", FSTS);
    p.show32("fectl_iqe", FECTL);
    p.show64("iqh_iqe", IQH);
    p.show64("iqt_iqe", IQT);
    p.show64("iqer_iqe", IQER);
    // As Linux's qi_check_fault: overwrite the bad descriptor with a wait,
    // then clear IQE (RW1C) — fetching resumes at IQH once IQE is clear.
    p.store(STATUS + 4, 0);
    p.descriptor(5, wait_sw(0xcafe_0002, STATUS + 4));
    p.write32(FSTS, 1 << 4);
    p.show32("fsts_iqe_cleared", FSTS);
    p.show32("fectl_iqe_cleared", FECTL);
    p.show64("iqh_iqe_cleared", IQH);
    p.show_at("status_iqe_cleared", &[STATUS + 4]);
    // Ring the doorbell again (same tail): the queue is past the wait.
    p.write64(IQT, 6 << 4);
    p.show64("iqh_fixed", IQH);
    p.show_at("status_fixed", &[STATUS + 4]);
    p.show32("fsts_fixed", FSTS);

    // A descriptor of type 0 (no such type): IQE again. This time ring the
    // doorbell only after the fix and the IQE clear, so that both units
    // (whether or not they resume on the clear) end in the same state.
    p.descriptor(6, (0, 0));
    p.write64(IQT, 7 << 4);
    p.show32("fsts_type0", FSTS);
    p.show64("iqh_type0", IQH);
    p.store(STATUS + 8, 0);
    p.descriptor(6, wait_sw(0xcafe_0003, STATUS + 8));
    p.write32(FSTS, 1 << 4);
    p.write64(IQT, 7 << 4);
    p.show64("iqh_type0_fixed", IQH);
    p.show_at("status_type0_fixed", &[STATUS + 8]);
    p.show32("fsts_type0_fixed", FSTS);

    // Compatibility-format interrupts through (CFI) while remapping is on.
    p.command(CFI, 0);
    p.show32("gsts_cfi", GSTS);
    p.command(0, CFI);
    p.show32("gsts_cfi_off", GSTS);

    // Translation off; queued invalidation off and on again.
    p.command(0, TE);
    p.show32("gsts_te_off", GSTS);
    p.command(0, QIE);
    p.show32("gsts_qie_off", GSTS);
    p.show64("iqh_qie_off", IQH);
    p.show64("iqt_qie_off", IQT);

    // Register-based invalidation while QI is off: CCMD global (ICC|CIRG=1),
    // then the IOTLB register (at ECAP.IRO * 16 + 8) global (IVT|IIRG=1).
    p.write64(CCMD, 1 << 63 | 1 << 61);
    p.show64("ccmd_global", CCMD);
    p.a.mov(eax, dword_ptr(Probe::reg(ECAP))).unwrap();
    p.a.shr(eax, 4u32).unwrap();
    p.a.and(eax, 0x3ff0u32).unwrap();
    p.a.add(eax, VTD + 8).unwrap();
    p.a.mov(esi, eax).unwrap();
    p.a.mov(dword_ptr(esi), 0u32).unwrap();
    p.a.mov(dword_ptr(esi + 4), 0x9000_0000u32).unwrap();
    p.text("iotlb_global=");
    p.a.mov(eax, dword_ptr(esi + 4)).unwrap();
    p.a.mov(ebx, esi).unwrap();
    // The routine clobbers ESI; keep the address on the stack.
    p.a.push(ebx).unwrap();
    p.a.call(p.hex).unwrap();
    p.a.pop(ebx).unwrap();
    p.a.mov(eax, dword_ptr(ebx)).unwrap();
    p.a.call(p.hex).unwrap();
    p.text("\n");

    // Software must zero IQT before enabling queued invalidation. (With a
    // stale non-zero tail, QEMU runs the queue from 0 on enable — a
    // documented workaround for Windows in vtd_handle_gcmd_qie — while
    // memvisor does not: a guest error, so not compared.)
    p.write64(IQT, 0);
    p.command(QIE, 0);
    p.show32("gsts_qie_again", GSTS);
    p.show64("iqh_qie_again", IQH);
    p.show64("iqt_qie_again", IQT);

    // Descriptors at the edges of the spec, each followed by a known state.
    let mut slot = 0;
    // (No wait with both SW and IF: QEMU 7.2 aborts on an assertion in
    // vtd_process_wait_desc; fixed upstream by e8145dcd311b, QEMU issue
    // 3028.)
    // Wait with neither SW nor IF (a no-op, as used with FN for fencing).
    slot = p.descriptor_check("wait_none", slot, (0x5, 0), 0xcafe_0014);
    // Wait whose status address has reserved bits 1:0 set.
    slot = p.descriptor_check("wait_addr_rsvd", slot, wait_sw(0xcafe_0015, STATUS + 0x84 + 1), 0xcafe_0016);
    // Context-cache and IOTLB descriptors with the reserved granularity 0.
    slot = p.descriptor_check("context_granularity0", slot, (0x1, 0), 0xcafe_0017);
    slot = p.descriptor_check("iotlb_granularity0", slot, (0x2, 0), 0xcafe_0018);
    // A context-cache descriptor with a non-zero high quadword.
    slot = p.descriptor_check("context_hi", slot, (CONTEXT_GLOBAL.0, 1), 0xcafe_0019);
    // An IEC descriptor, index-selective (bit 4) for index 5, mask 0.
    slot = p.descriptor_check("iec_index", slot, (0x4 | 1 << 4 | 5 << 32, 0), 0xcafe_001a);
    // A PASID-cache descriptor (type 7) in legacy mode.
    p.descriptor_check("pasid_cache_legacy", slot, (0x7 | 3 << 4, 0), 0xcafe_001b);

    // Write masks: reserved low bits of RTADDR, IRTA, IQT, FEADDR; GCMD
    // read back.
    p.write64(RTADDR, u64::from(ROOT) | 0x3ff);
    p.show32("rtaddr_reserved", RTADDR);
    // TTM (11:10) = 11b, abort-DMA mode, which neither unit supports.
    p.write64(RTADDR, u64::from(ROOT) | 0xc00);
    p.show32("rtaddr_ttm", RTADDR);
    p.write64(RTADDR, u64::from(ROOT));
    p.write64(IRTA, u64::from(IRT) | 0x7f7);
    p.show32("irta_lowbits", IRTA);
    p.write64(IRTA, u64::from(IRT) | 7);
    p.write32(FEADDR, 0xfee0_0003);
    p.show32("feaddr_lowbits", FEADDR);
    p.write32(FEADDR, 0);
    p.show32("gcmd_read", GCMD);

    // Halves of the address registers; a reserved offset.
    p.show32("rtaddr_lo", RTADDR);
    p.show32("rtaddr_hi", RTADDR + 4);
    p.show32("iqa_lo", IQA);
    p.show32("iqa_hi", IQA + 4);
    p.show32("irta_lo", IRTA);
    p.show32("irta_hi", IRTA + 4);
    p.show32("pmen", 0x64);
    p.show32("reserved_30", 0x30);
    p.show32("reserved_4c", 0x4c);

    p.command(0, IRE);
    p.show32("gsts_ire_off", GSTS);
}

/// The probe as a multiboot image (a.out kludge: the whole file loads at
/// 1 MiB, code right after the 32-byte header).
pub fn image() -> Vec<u8> {
    let a = CodeAssembler::new(32).unwrap();
    let mut p = Probe { hex: CodeLabel::default(), a };
    p.hex = p.a.create_label();
    let mut main = p.a.create_label();
    p.a.mov(esp, 0x9_0000u32).unwrap();
    p.a.jmp(main).unwrap();
    p.hex_routine();
    p.a.set_label(&mut main).unwrap();
    script(&mut p);
    p.a.mov(dx, 0xf4u32).unwrap();
    p.a.mov(eax, 0u32).unwrap();
    p.a.out(dx, eax).unwrap();
    p.a.hlt().unwrap();

    let code = p.a.assemble(u64::from(LOAD_ADDR + HEADER_LEN)).unwrap();
    let (magic, flags) = (0x1bad_b002u32, 1u32 << 16);
    let header =
        [magic, flags, 0u32.wrapping_sub(magic + flags), LOAD_ADDR, LOAD_ADDR, 0, 0, LOAD_ADDR + HEADER_LEN];
    let mut file: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    file.extend_from_slice(&code);
    file
}

/// The probe written to a temporary file, removed when dropped.
pub struct ProbeFile(PathBuf);

impl ProbeFile {
    /// Writes [`image`] to the temporary directory.
    pub fn new() -> ProbeFile {
        let path = std::env::temp_dir().join(format!("memvisor-vtd-probe-{}", std::process::id()));
        std::fs::write(&path, image()).unwrap();
        ProbeFile(path)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
