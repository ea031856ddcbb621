//! Fuzz target: the VT-d model against arbitrary invalidation-queue descriptors (see
//! crates/vtd/tests/support/guest_input.rs). Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run vtd_descriptors corpus/vtd_descriptors seeds/vtd_descriptors` from this directory.
#![no_main]

#[path = "../../crates/vtd/tests/support/guest_input.rs"]
mod guest_input;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guest_input::descriptors(data);
});
