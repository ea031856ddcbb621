//! Guests cannot hurt the VMM: the fuzz exercisers (shared with the
//! cargo-fuzz targets in `fuzz/`) run over the seed corpora and over
//! random inputs; any panic fails the test.

#[path = "support/guest_input.rs"]
mod guest_input;

use proptest::prelude::*;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds").join(target);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        out.push(std::fs::read(&path).expect("corpus file"));
    }
    out.sort();
    out
}

#[test]
fn register_seed_corpus_runs_without_panics() {
    // Arrange
    let corpus = seeds("vtd_registers");
    assert!(!corpus.is_empty());
    // Act / Assert: a panic fails the test.
    for input in &corpus {
        guest_input::registers(input);
    }
}

#[test]
fn table_seed_corpus_runs_without_panics() {
    let corpus = seeds("vtd_tables");
    assert!(!corpus.is_empty());
    for input in &corpus {
        guest_input::tables(input);
    }
}

#[test]
fn descriptor_seed_corpus_runs_without_panics() {
    let corpus = seeds("vtd_descriptors");
    assert!(!corpus.is_empty());
    for input in &corpus {
        guest_input::descriptors(input);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_register_sequences_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
        guest_input::registers(&data);
    }

    #[test]
    fn arbitrary_guest_tables_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4000)) {
        guest_input::tables(&data);
    }

    #[test]
    fn arbitrary_invalidation_queues_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4500)) {
        guest_input::descriptors(&data);
    }
}
