//! 32-bit protected-mode entry, the split irqchip and MSI injection on the
//! real `/dev/kvm`. Skips without it unless `MEMVISOR_REQUIRE_KVM=1`.

mod support;

use iced_x86::code_asm::{CodeAssembler, al, dword_ptr, eax, ebx, ecx, edx, esp};
use memvisor_kvm::testing::kvm_or_skip;
use memvisor_kvm::{ExitHandler, Flow, MsiRoute, ProtectedModeEntry, Stop};
use memvisor_types::Gpa;
use support::*;

const CODE: u32 = 0x1000;
const HANDLER: u32 = 0x1800;
const GDT: u32 = 0x3000;
const IDT: u32 = 0x4000;
const DESCRIPTORS: u32 = 0x5000;
const STACK_TOP: u32 = 0x8000;
const VECTOR: u32 = 0x40;
const READY_PORT: u16 = 0x10;
const ISR_PORT: u16 = 0x11;
const DONE_PORT: u16 = 0x12;

/// Stops the run at every `OUT` and records it, and the I/O APIC EOIs.
#[derive(Default)]
struct Outs(Vec<(u16, Vec<u8>)>, Vec<u8>);

impl ExitHandler for Outs {
    fn pio_out(&mut self, port: u16, data: &[u8]) -> Flow {
        self.0.push((port, data.to_vec()));
        Flow::Stop
    }

    fn ioapic_eoi(&mut self, vector: u8) -> Flow {
        self.1.push(vector);
        Flow::Continue
    }
}

fn assemble(at: u32, build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    build(&mut a);
    a.assemble(at.into()).unwrap()
}

#[test]
fn protected_mode_entry_starts_32_bit_code_with_the_given_eax_and_ebx() {
    let Some(kvm) = kvm_or_skip("protected_mode_entry_starts_32_bit_code") else { return };
    let vm = vm_with_slots(&kvm, |_| Vec::new());
    let code = assemble(CODE, |a| {
        a.out(u32::from(READY_PORT), eax).unwrap();
        a.mov(eax, ebx).unwrap();
        a.out(u32::from(READY_PORT), eax).unwrap();
        a.hlt().unwrap();
    });
    vm.guest_ram().unwrap().write_at(Gpa::new(CODE.into()), &code).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let entry = ProtectedModeEntry { eip: CODE, eax: 0x2bad_b002, ebx: 0x9000 };
    vcpu.enter_protected_mode(&entry).unwrap();
    let mut outs = Outs::default();

    while vcpu.run(&mut outs, Some(TIMEOUT)).unwrap() == Stop::Handler {}

    let values: Vec<_> =
        outs.0.iter().map(|(_, d)| u32::from_le_bytes(d.as_slice().try_into().unwrap())).collect();
    assert_eq!(values, vec![0x2bad_b002, 0x9000]);
}

/// A flat GDT (null, code 0x8, data 0x10) and an IDT whose gate `VECTOR`
/// leads to `HANDLER`; the guest loads both, enables its local APIC,
/// enables interrupts and reports on `READY_PORT`; the handler reports on
/// `ISR_PORT`.
fn write_interrupt_guest(vm: &memvisor_kvm::Vm, masked_at_ready: bool) {
    let ram = vm.guest_ram().unwrap();
    let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    ram.write_at(Gpa::new(GDT.into()), &gdt.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<_>>())
        .unwrap();
    let handler = u64::from(HANDLER);
    let gate = (handler & 0xffff) | 0x8 << 16 | 0x8e00 << 32 | (handler >> 16) << 48;
    ram.write_at(Gpa::new(u64::from(IDT + VECTOR * 8)), &gate.to_le_bytes()).unwrap();
    // Pseudo-descriptors: limit (u16) then base (u32).
    let mut desc = Vec::new();
    desc.extend_from_slice(&23u16.to_le_bytes());
    desc.extend_from_slice(&(GDT).to_le_bytes());
    desc.extend_from_slice(&[0, 0]);
    desc.extend_from_slice(&(256u16 * 8 - 1).to_le_bytes());
    desc.extend_from_slice(&(IDT).to_le_bytes());
    ram.write_at(Gpa::new(DESCRIPTORS.into()), &desc).unwrap();
    let code = assemble(CODE, |a| {
        a.mov(esp, STACK_TOP).unwrap();
        a.lgdt(dword_ptr(DESCRIPTORS)).unwrap();
        a.lidt(dword_ptr(DESCRIPTORS + 8)).unwrap();
        a.mov(dword_ptr(0xfee0_00f0u32), 0x1ffu32).unwrap(); // SVR: APIC on
        a.mov(ecx, 0x1bu32).unwrap(); // IA32_APIC_BASE: x2APIC mode
        a.rdmsr().unwrap();
        a.or(eax, 0x400).unwrap();
        a.wrmsr().unwrap();
        if masked_at_ready {
            a.cli().unwrap();
            a.out(u32::from(READY_PORT), al).unwrap();
            a.sti().unwrap();
        } else {
            a.sti().unwrap();
            a.out(u32::from(READY_PORT), al).unwrap();
        }
        let mut idle = a.create_label();
        a.set_label(&mut idle).unwrap();
        a.hlt().unwrap();
        a.jmp(idle).unwrap();
    });
    ram.write_at(Gpa::new(CODE.into()), &code).unwrap();
    let isr = assemble(HANDLER, |a| {
        a.mov(ecx, 0x80bu32).unwrap(); // x2APIC EOI
        a.xor(eax, eax).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(al, VECTOR).unwrap();
        a.out(u32::from(ISR_PORT), al).unwrap();
        a.out(u32::from(DONE_PORT), al).unwrap();
        a.hlt().unwrap();
    });
    ram.write_at(Gpa::new(HANDLER.into()), &isr).unwrap();
}

#[test]
fn msi_signalled_on_a_split_irqchip_reaches_the_guest_handler() {
    let Some(kvm) = kvm_or_skip("msi_signalled_on_a_split_irqchip") else { return };
    let vm = vm_with_slots(&kvm, |vm| {
        vm.enable_split_irqchip(24).unwrap();
        Vec::new()
    });
    write_interrupt_guest(&vm, false);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.enter_protected_mode(&ProtectedModeEntry { eip: CODE, eax: 0, ebx: 0 }).unwrap();
    let mut outs = Outs::default();
    assert_eq!(vcpu.run(&mut outs, Some(TIMEOUT)).unwrap(), Stop::Handler);
    assert_eq!(outs.0.last().map(|(p, _)| *p), Some(READY_PORT));

    let delivered = vm.signal_msi(0xfee0_0000, VECTOR).unwrap();
    let stop = vcpu.run(&mut outs, Some(TIMEOUT)).unwrap();

    assert!(delivered);
    assert_eq!(stop, Stop::Handler);
    assert_eq!(outs.0.last(), Some(&(ISR_PORT, vec![VECTOR.to_le_bytes()[0]])));
}

#[test]
fn msi_without_an_in_kernel_apic_is_an_error() {
    let Some(kvm) = kvm_or_skip("msi_without_an_in_kernel_apic_is_an_error") else { return };
    let vm = kvm.create_vm().unwrap();

    let result = vm.signal_msi(0xfee0_0000, 0x40);

    assert!(result.is_err());
}

#[test]
fn msi_signalled_while_interrupts_are_off_arrives_after_sti() {
    let Some(kvm) = kvm_or_skip("msi_signalled_while_interrupts_are_off") else { return };
    let vm = vm_with_slots(&kvm, |vm| {
        vm.enable_split_irqchip(24).unwrap();
        Vec::new()
    });
    write_interrupt_guest(&vm, true);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.enter_protected_mode(&ProtectedModeEntry { eip: CODE, eax: 0, ebx: 0 }).unwrap();
    let mut outs = Outs::default();
    assert_eq!(vcpu.run(&mut outs, Some(TIMEOUT)).unwrap(), Stop::Handler);

    let delivered = vm.signal_msi(0xfee0_0000, VECTOR).unwrap();
    let stop = vcpu.run(&mut outs, Some(std::time::Duration::from_secs(2)));

    assert!(delivered);
    assert_eq!(stop.unwrap(), Stop::Handler);
    assert_eq!(outs.0.last(), Some(&(ISR_PORT, vec![VECTOR.to_le_bytes()[0]])));
}

/// A level-triggered MSI whose vector a GSI route below the reserved I/O
/// APIC pins names: the guest's EOI comes back as `KVM_EXIT_IOAPIC_EOI`.
///
/// Observed on the PVM software KVM (Linux 6.18): the EOI exit is not taken
/// right after the guest's EOI write but at the vCPU's next exit to
/// userspace (here the handler's second `OUT`); a guest that halts right
/// after an EOI with nothing else pending never produces it.
fn level_msi_eoi_exits(masked_at_ready: bool) -> Option<Vec<u8>> {
    let kvm = kvm_or_skip("level_triggered_msi_eoi_exits")?;
    let vm = vm_with_slots(&kvm, |vm| {
        vm.enable_split_irqchip(24).unwrap();
        Vec::new()
    });
    write_interrupt_guest(&vm, masked_at_ready);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.enter_protected_mode(&ProtectedModeEntry { eip: CODE, eax: 0, ebx: 0 }).unwrap();
    let mut outs = Outs::default();
    assert_eq!(vcpu.run(&mut outs, Some(TIMEOUT)).unwrap(), Stop::Handler);
    let level = VECTOR | 0x8000;
    vm.set_msi_routes(&[MsiRoute { gsi: 14, address: 0xfee0_0000, data: level }]).unwrap();

    vm.signal_msi(0xfee0_0000, level).unwrap();
    while outs.0.last().map(|(p, _)| *p) != Some(DONE_PORT) {
        assert_eq!(vcpu.run(&mut outs, Some(TIMEOUT)).unwrap(), Stop::Handler);
    }

    Some(outs.1)
}

#[test]
fn eoi_of_a_routed_level_msi_exits_to_the_ioapic() {
    let Some(eois) = level_msi_eoi_exits(false) else { return };

    assert_eq!(eois, vec![VECTOR.to_le_bytes()[0]]);
}

#[test]
fn eoi_of_a_routed_level_msi_signalled_while_interrupts_are_off_exits_to_the_ioapic() {
    let Some(eois) = level_msi_eoi_exits(true) else { return };

    assert_eq!(eois, vec![VECTOR.to_le_bytes()[0]]);
}
