//! Fuzz target: page walks over guest-controlled table memory (see
//! crates/paging/tests/support/guest_input.rs). Run with
//! `cargo fuzz run walk_guest_tables` from this directory.
#![no_main]

#[path = "../../crates/paging/tests/support/guest_input.rs"]
mod guest_input;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guest_input::exercise(data);
});
