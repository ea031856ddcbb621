//! Invariant 3 for page walks: whatever a guest writes into its page tables,
//! every walker returns a translation or a fault — never a panic or a hang.

mod support {
    pub mod guest_input;
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn arbitrary_guest_tables_yield_a_translation_or_a_fault(data in proptest::collection::vec(any::<u8>(), 16..2048)) {
        support::guest_input::exercise(&data);
    }

    #[test]
    fn arbitrary_folded_tables_walk_deep_without_panicking(mut data in proptest::collection::vec(any::<u8>(), 16..4096)) {
        // Set the "fold" bit so every table pointer lands inside the arena and
        // make the top entries present, so walks reach every level.
        data[7] |= 32;
        for i in (16..data.len()).step_by(8) {
            data[i] |= 1;
        }
        support::guest_input::exercise(&data);
    }
}
