//! A 16550 UART, output only: what Linux-style and kvm-unit-tests drivers
//! program (DLAB and divisor, IER, FCR, LCR, MCR, scratch) reads back, THR
//! bytes go to a [`Write`], and the line status always says "transmitter
//! empty, no data". No interrupts are raised (IER is stored only).
//!
//! ```
//! use memvisor_platform::serial::Serial;
//! let mut uart = Serial::new(Vec::new());
//! uart.write(0, b'h');
//! assert_eq!(uart.read(5) & 0x60, 0x60);
//! assert_eq!(uart.into_inner(), b"h");
//! ```

use std::io::Write;

/// Line status: transmitter holding register empty.
pub const LSR_THRE: u8 = 0x20;
/// Line status: transmitter empty.
pub const LSR_TEMT: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;

/// The UART; `offset` is the port minus the base (0x3f8 for COM1).
#[derive(Debug)]
pub struct Serial<W: Write> {
    out: W,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    failed: bool,
}

impl<W: Write> Serial<W> {
    /// A UART whose output goes to `out`.
    pub fn new(out: W) -> Self {
        Self { out, ier: 0, lcr: 0x03, mcr: 0x08, scr: 0, dll: 0x0c, dlm: 0, failed: false }
    }

    /// Reads register `offset` (0..8); other offsets read 0xff.
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => 0, // no receive path: RBR is empty
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => 0x01, // IIR: no interrupt pending, FIFOs off
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT,
            6 => 0xb0, // MSR: DCD, DSR, CTS
            7 => self.scr,
            _ => 0xff,
        }
    }

    /// Writes register `offset`; THR bytes go to the output (a failing
    /// output is remembered, see [`output_failed`](Self::output_failed)).
    pub fn write(&mut self, offset: u16, value: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 => self.failed |= self.out.write_all(&[value]).and_then(|()| self.out.flush()).is_err(),
            1 if dlab => self.dlm = value,
            1 => self.ier = value & 0x0f,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1f,
            7 => self.scr = value,
            _ => {} // FCR, read-only LSR/MSR, out of range
        }
    }

    /// Whether writing to the output ever failed.
    pub fn output_failed(&self) -> bool {
        self.failed
    }

    /// The output.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// The output, borrowed.
    pub fn output(&self) -> &W {
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thr_write_goes_to_output() {
        let mut uart = Serial::new(Vec::new());

        uart.write(0, b'o');
        uart.write(0, b'k');

        assert_eq!(uart.into_inner(), b"ok");
    }

    #[test]
    fn dlab_redirects_offsets_zero_and_one_to_the_divisor() {
        let mut uart = Serial::new(Vec::new());

        uart.write(3, 0x83);
        uart.write(0, 0x01);
        uart.write(1, 0x00);
        uart.write(3, 0x03);

        assert_eq!(uart.read(3), 0x03);
        assert!(uart.into_inner().is_empty());
    }

    #[test]
    fn line_status_always_reports_transmitter_empty() {
        let mut uart = Serial::new(Vec::new());

        let lsr = uart.read(5);

        assert_eq!(lsr & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn out_of_range_offset_reads_all_ones_and_ignores_writes() {
        let mut uart = Serial::new(Vec::new());

        uart.write(9, 1);

        assert_eq!(uart.read(9), 0xff);
    }
}
