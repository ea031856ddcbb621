//! Queued invalidation: descriptors between IQH and IQT in the queue at
//! IQA (2^QS pages of 128- or, with ECAP.SMTS and IQA.DW, 256-bit
//! descriptors) are decoded ([`decode`]) and carried out in order
//! ([`process`]).
//!
//! A descriptor with an unknown type, a reserved bit set, an invalid
//! granularity, a non-zero upper half (256-bit mode), or one that cannot be
//! read or whose status write fails, sets FSTS.IQE: IQH stays at that
//! descriptor, processing stops and a fault event is raised. Clearing IQE
//! resumes at IQH. An IQT beyond the queue, or with bit 4 set in 256-bit
//! mode, also sets IQE. One call handles at most one queue's worth of
//! descriptors, so a guest cannot make the unit loop.
//!
//! Field positions and reserved-bit masks follow the VT-d specification
//! (6.5.2) and Linux `dmar.c` / QEMU `vtd_process_*_desc`.

use memvisor_types::Gpa;

use crate::regs::{ICS_IWC, IQA_DW, Registers, cap, ectl, fsts, off};
use crate::{
    ContextInval, GuestMemory, IecInval, InterruptSink, Invalidation, IotlbInval, PasidCacheInval,
    PiotlbInval, SourceId, fault,
};

/// One decoded descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Descriptor {
    /// Types 1–4, 6–8: an invalidation.
    Invalidate(Invalidation),
    /// Type 5: invalidation wait.
    Wait {
        /// SW: write `data` (32-bit) to `addr`.
        status: Option<(u64, u32)>,
        /// IF: raise an invalidation completion event.
        interrupt: bool,
        /// FN: fence (everything is synchronous here).
        fence: bool,
    },
    /// Type 9: page group response (no page requests are ever issued).
    PageGroupResponse,
}

/// Why a descriptor is invalid (sets FSTS.IQE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DescError {
    /// Type 0, above 9, or a scalable-mode type on a legacy unit.
    Type(u8),
    /// A reserved bit is set.
    Reserved,
    /// Reserved granularity or address mask.
    Granularity,
}

fn check(value: u64, reserved: u64) -> Result<(), DescError> {
    if value & reserved == 0 { Ok(()) } else { Err(DescError::Reserved) }
}

fn did(lo: u64) -> u16 {
    ((lo >> 16) & 0xffff) as u16
}

fn pasid(lo: u64) -> u32 {
    ((lo >> 32) & 0xf_ffff) as u32
}

/// The type of a descriptor: bits 3:0 and 11:9 (as bits 6:4).
pub fn desc_type(lo: u64) -> u8 {
    u8::try_from((lo & 0xf) | ((lo >> 5) & 0x70)).unwrap_or(0)
}

/// Decodes a descriptor (`desc[2..]` are the upper half in 256-bit mode,
/// which must be zero for every type defined; ignored otherwise).
/// `scalable`: the unit supports scalable mode (types 6–9 valid).
pub fn decode(desc: &[u64; 4], wide: bool, scalable: bool) -> Result<Descriptor, DescError> {
    let [lo, hi, w2, w3] = *desc;
    let ty = desc_type(lo);
    if ty == 0 || ty > 9 || (ty >= 6 && !scalable) {
        return Err(DescError::Type(ty));
    }
    if wide && (w2 | w3) != 0 {
        return Err(DescError::Reserved);
    }
    let inv = match ty {
        1 => {
            check(lo, 0xfffc_0000_0000_ffc0)?;
            check(hi, !0)?;
            let scope = match (lo >> 4) & 3 {
                1 => ContextInval::Global,
                2 => ContextInval::Domain(did(lo)),
                3 => ContextInval::Device {
                    did: did(lo),
                    sid: SourceId(((lo >> 32) & 0xffff) as u16),
                    fm: ((lo >> 48) & 3) as u8,
                },
                _ => return Err(DescError::Granularity),
            };
            Invalidation::Context(scope)
        }
        2 => {
            // DR (7) and DW (6) are accepted: draining is always done.
            check(lo, 0xffff_ffff_0000_ff00)?;
            check(hi, 0xf80)?;
            let scope = match (lo >> 4) & 3 {
                1 => IotlbInval::Global,
                2 => IotlbInval::Domain(did(lo)),
                3 => {
                    let am = (hi & 0x3f) as u8;
                    if am > cap::MAMV {
                        return Err(DescError::Granularity);
                    }
                    IotlbInval::Page { did: did(lo), addr: hi & !0xfff, am, ih: hi & (1 << 6) != 0 }
                }
                _ => return Err(DescError::Granularity),
            };
            Invalidation::Iotlb(scope)
        }
        3 => {
            // SID 47:32, MIP 20:16, PFSID 15:12 and 63:52; hi: address, S (bit 0).
            check(lo, 0x000f_0000_ffe0_0ff0)?;
            check(hi, 0xffe)?;
            Invalidation::DeviceTlb
        }
        4 => {
            check(lo, 0xffff_0000_07ff_f1e0)?;
            check(hi, !0)?;
            let scope = if lo & (1 << 4) == 0 {
                IecInval::Global
            } else {
                IecInval::Index { index: ((lo >> 32) & 0xffff) as u16, im: ((lo >> 27) & 0x1f) as u8 }
            };
            Invalidation::Iec(scope)
        }
        5 => {
            // PD (bit 7) is reserved: no page requests.
            check(lo, 0xffff_ff80)?;
            check(hi, 3)?;
            let status = (lo & (1 << 5) != 0).then_some((hi & !3, ((lo >> 32) & 0xffff_ffff) as u32));
            return Ok(Descriptor::Wait { status, interrupt: lo & (1 << 4) != 0, fence: lo & (1 << 6) != 0 });
        }
        6 => {
            check(lo, 0xfff0_0000_0000_f1c0)?;
            check(hi, 0xf80)?;
            let scope = match (lo >> 4) & 3 {
                2 => PiotlbInval::Pasid { did: did(lo), pasid: pasid(lo) },
                3 => {
                    let am = (hi & 0x3f) as u8;
                    if am > cap::MAMV {
                        return Err(DescError::Granularity);
                    }
                    PiotlbInval::Page {
                        did: did(lo),
                        pasid: pasid(lo),
                        addr: hi & !0xfff,
                        am,
                        ih: hi & (1 << 6) != 0,
                    }
                }
                _ => return Err(DescError::Granularity),
            };
            Invalidation::Piotlb(scope)
        }
        7 => {
            check(lo, 0xfff0_0000_0000_f1c0)?;
            check(hi, !0)?;
            let scope = match (lo >> 4) & 3 {
                0 => PasidCacheInval::Domain(did(lo)),
                1 => PasidCacheInval::Pasid { did: did(lo), pasid: pasid(lo) },
                3 => PasidCacheInval::Global,
                _ => return Err(DescError::Granularity),
            };
            Invalidation::PasidCache(scope)
        }
        8 => {
            // SID 31:16, PASID 51:32, MIP 8:4, PFSID 15:12 and 63:52; hi: address, S (11), G (0).
            check(lo, 0xe00)?;
            check(hi, 0x7fe)?;
            Invalidation::DeviceTlb
        }
        _ => {
            // 9: RID 31:16, PASID 51:32, response code 15:12, PP (4); hi: PRG index 11:3, private data 63:32.
            check(lo, 0xfff0_0000_0000_0fe0)?;
            check(hi, 0xffff_f007)?;
            return Ok(Descriptor::PageGroupResponse);
        }
    };
    Ok(Descriptor::Invalidate(inv))
}

/// What one [`process`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QiRun {
    /// Descriptors carried out.
    pub descriptors: u64,
    /// Wait descriptors among them.
    pub waits: u64,
    /// Processing stopped with FSTS.IQE.
    pub error: bool,
}

fn queue_error(regs: &mut Registers, irq: &mut dyn InterruptSink, run: &mut QiRun) {
    let pre = regs.fsts();
    regs.update32(off::FSTS, 0, fsts::IQE);
    if let Some(msi) = fault::raise_event(regs, pre) {
        irq.send(msi);
    }
    run.error = true;
}

/// Raises an invalidation completion event (ICS.IWC, IECTL.IM/IP); nothing
/// happens while IWC is still set from an earlier one.
fn completion_event(regs: &mut Registers, irq: &mut dyn InterruptSink) {
    if regs.raw32(off::ICS) & ICS_IWC != 0 {
        return;
    }
    regs.update32(off::ICS, 0, ICS_IWC);
    if regs.raw32(off::IECTL) & ectl::IM != 0 {
        regs.update32(off::IECTL, 0, ectl::IP);
    } else {
        regs.update32(off::IECTL, ectl::IP, 0);
        irq.send(regs.completion_msi());
    }
}

/// Processes the queue from IQH to IQT (when QIE is set and IQE clear),
/// calling `invalidate` for every invalidation in order.
pub fn process<M: GuestMemory + ?Sized>(
    regs: &mut Registers,
    mem: &M,
    irq: &mut dyn InterruptSink,
    invalidate: &mut dyn FnMut(&Invalidation),
) -> QiRun {
    let mut run = QiRun::default();
    if !regs.qi_enabled() || regs.fsts() & fsts::IQE != 0 {
        return run;
    }
    let scalable = regs.config().mode.scalable();
    let iqa = regs.raw64(off::IQA);
    let wide = scalable && iqa & IQA_DW != 0;
    let shift: u32 = if wide { 5 } else { 4 };
    let base = iqa & !0xfff;
    // 2^QS pages of 16- or 32-byte descriptors.
    let entries: u64 = (4096u64 << (iqa & 7)) >> shift;
    let iqt = regs.raw64(off::IQT) & 0x7fff0;
    let tail = iqt >> shift;
    let mut head = (regs.raw64(off::IQH) & 0x7fff0) >> shift;
    if (wide && iqt & 0x10 != 0) || tail >= entries || head >= entries {
        queue_error(regs, irq, &mut run);
        return run;
    }
    let len: u64 = 1 << shift;
    for _ in 0..entries {
        if head == tail {
            break;
        }
        let Some(addr) = head.checked_mul(len).and_then(|o| base.checked_add(o)) else {
            queue_error(regs, irq, &mut run);
            return run;
        };
        let mut buf = [0u8; 32];
        let Some(bytes) = buf.get_mut(..if wide { 32 } else { 16 }) else { return run };
        if mem.read(Gpa::new(addr), bytes).is_err() {
            queue_error(regs, irq, &mut run);
            return run;
        }
        let mut desc = [0u64; 4];
        for (q, chunk) in desc.iter_mut().zip(buf.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            *q = u64::from_le_bytes(w);
        }
        match decode(&desc, wide, scalable) {
            Err(_) => {
                queue_error(regs, irq, &mut run);
                return run;
            }
            Ok(Descriptor::Invalidate(inv)) => invalidate(&inv),
            Ok(Descriptor::Wait { status, interrupt, fence: _ }) => {
                run.waits += 1;
                if let Some((addr, data)) = status {
                    let ok = addr & !regs.haw_mask() == 0
                        && mem.write(Gpa::new(addr), &data.to_le_bytes()).is_ok();
                    if !ok {
                        queue_error(regs, irq, &mut run);
                        return run;
                    }
                }
                if interrupt {
                    completion_event(regs, irq);
                }
            }
            Ok(Descriptor::PageGroupResponse) => {}
        }
        run.descriptors += 1;
        head = (head + 1) % entries;
        regs.set64(off::IQH, head << shift);
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_combines_low_and_high_type_bits() {
        // Arrange
        let lo = 0x3 | (0x1 << 9);
        // Act
        let ty = desc_type(lo);
        // Assert
        assert_eq!(ty, 0x13);
    }

    #[test]
    fn scalable_types_are_invalid_on_a_legacy_unit() {
        // Arrange
        let desc = [0x7 | (3 << 4), 0, 0, 0];
        // Act
        let r = decode(&desc, false, false);
        // Assert
        assert_eq!(r, Err(DescError::Type(7)));
    }
}
