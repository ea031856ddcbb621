//! QEMU's `isa-debug-exit`: a write of `value` ends the VM with exit status
//! `(value << 1) | 1`, so a guest can never produce status 0.
//!
//! ```
//! use memvisor_platform::debug_exit::DebugExit;
//! assert_eq!(DebugExit::write(&[0, 0, 0, 0]), 1);
//! assert_eq!(DebugExit::write(&[1]), 3);
//! ```

/// The device (stateless).
#[derive(Debug, Clone, Copy, Default)]
pub struct DebugExit;

impl DebugExit {
    /// The process exit status for a guest write of `data` (little-endian,
    /// 1–4 bytes), as QEMU computes it: `(value << 1) | 1`, truncated to the
    /// 8 bits a process status has.
    pub fn write(data: &[u8]) -> u8 {
        let value = crate::le_value(data);
        (value.wrapping_shl(1) | 1).to_le_bytes()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_exits_with_status_one() {
        assert_eq!(DebugExit::write(&0u32.to_le_bytes()), 1);
    }

    #[test]
    fn value_is_shifted_and_ored_with_one() {
        assert_eq!(DebugExit::write(&5u32.to_le_bytes()), 11);
    }

    #[test]
    fn large_values_keep_their_low_bits() {
        assert_eq!(DebugExit::write(&0x80u8.to_le_bytes()), 1);
    }
}
