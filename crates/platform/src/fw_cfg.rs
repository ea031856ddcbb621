//! QEMU's fw_cfg, legacy I/O interface: a 16-bit selector at port 0x510 and
//! a byte-wide data port at 0x511 that streams the selected item. Only the
//! numeric items a kvm-unit-tests guest reads exist; every other item reads
//! as zeros (as QEMU does for an unknown selector).
//!
//! ```
//! use memvisor_platform::fw_cfg::{FwCfg, NB_CPUS};
//! let mut cfg = FwCfg::new(2, 128 << 20);
//! cfg.write_selector(&NB_CPUS.to_le_bytes());
//! assert_eq!([cfg.read_data(), cfg.read_data()], [2, 0]);
//! ```

/// Item: the signature "QEMU".
pub const SIGNATURE: u16 = 0x00;
/// Item: interface id (bit 0: traditional interface).
pub const ID: u16 = 0x01;
/// Item: RAM size in bytes (u64).
pub const RAM_SIZE: u16 = 0x03;
/// Item: number of boot CPUs (u16).
pub const NB_CPUS: u16 = 0x05;
/// Item: maximum number of CPUs (u16).
pub const MAX_CPUS: u16 = 0x0f;
/// Item: maximum RAM address the guest may use (u64; 0 = no limit).
pub const MAX_RAM: u16 = 0x11;

/// The device.
#[derive(Debug, Clone)]
pub struct FwCfg {
    cpus: u16,
    ram_size: u64,
    selector: u16,
    offset: usize,
}

impl FwCfg {
    /// A fw_cfg describing `cpus` CPUs and `ram_size` bytes of RAM.
    pub fn new(cpus: u16, ram_size: u64) -> Self {
        Self { cpus, ram_size, selector: 0, offset: 0 }
    }

    fn item(&self) -> Vec<u8> {
        match self.selector & 0x3fff {
            SIGNATURE => b"QEMU".to_vec(),
            ID => 1u32.to_le_bytes().to_vec(),
            RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            NB_CPUS | MAX_CPUS => self.cpus.to_le_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    /// A write to the selector port (little-endian, 1 or 2 bytes); rewinds
    /// the data stream.
    pub fn write_selector(&mut self, data: &[u8]) {
        self.selector = u16::try_from(crate::le_value(data) & 0xffff).unwrap_or(0);
        self.offset = 0;
    }

    /// The selector last written.
    pub fn selector(&self) -> u16 {
        self.selector
    }

    /// The next byte of the selected item (0 past its end or for an unknown item).
    pub fn read_data(&mut self) -> u8 {
        let byte = self.item().get(self.offset).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        byte
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(cfg: &mut FwCfg, selector: u16, len: usize) -> Vec<u8> {
        cfg.write_selector(&selector.to_le_bytes());
        (0..len).map(|_| cfg.read_data()).collect()
    }

    #[test]
    fn signature_reads_qemu() {
        let mut cfg = FwCfg::new(1, 0);

        assert_eq!(read_item(&mut cfg, SIGNATURE, 4), b"QEMU");
    }

    #[test]
    fn ram_size_reads_as_little_endian_u64() {
        let mut cfg = FwCfg::new(1, 0x800_0000);

        assert_eq!(read_item(&mut cfg, RAM_SIZE, 8), 0x800_0000u64.to_le_bytes());
    }

    #[test]
    fn unknown_item_reads_zeros() {
        let mut cfg = FwCfg::new(1, 0);

        assert_eq!(read_item(&mut cfg, 0x1234, 3), [0, 0, 0]);
    }

    #[test]
    fn reading_past_the_end_of_an_item_reads_zeros() {
        let mut cfg = FwCfg::new(3, 0);

        assert_eq!(read_item(&mut cfg, NB_CPUS, 4), [3, 0, 0, 0]);
    }
}
