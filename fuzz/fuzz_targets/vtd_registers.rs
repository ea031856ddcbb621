//! Fuzz target: the VT-d model against arbitrary guest register sequences (see
//! crates/vtd/tests/support/guest_input.rs). Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run vtd_registers corpus/vtd_registers seeds/vtd_registers` from this directory.
#![no_main]

#[path = "../../crates/vtd/tests/support/guest_input.rs"]
mod guest_input;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guest_input::registers(data);
});
