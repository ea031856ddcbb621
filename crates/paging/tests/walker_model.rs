//! The walker and the mapper against an independently written reference
//! model (`common::RefModel`): random map / unmap / protect sequences over
//! 4K, 2M and 1G pages, in the lower and upper canonical halves, for x86
//! 4- and 5-level paging and the VT-d second stage with 3, 4 and 5 levels.
//!
//! After every operation each property checks
//! - the operation's result against the model (including the errors for
//!   occupied ranges, non-present attributes and ranges beyond the input
//!   space),
//! - `Changes`: `flush` is exactly the smallest range covering every
//!   translation that disappeared or changed (a split large page included),
//!   and the counts of leaves written and pages split,
//! - the number of table frames in use (tables emptied by an unmap are freed),
//! - `Walker::lookup` and `Walker::translate` of probe addresses near every
//!   mapping edge, anywhere in the windows, and arbitrary 64-bit values:
//!   output, page size, permissions, the fault's kind, level and error code,
//!   and the accessed/dirty flags of the leaf.
//!
//! Two more properties run the same sequences in arenas of a few frames: an
//! operation that fails with `OutOfFrames` must leave the table exactly as it
//! was (the model is not updated, and every later check still holds), with
//! no table leaked.

mod common;

use common::{
    Chain, Frames, RefModel, access_strategy, check_against_model, ops_strategy, probe_strategy,
    second_stage_attrs_strategy, second_stage_strategy, x86_attrs_strategy, x86_strategy,
};
use memvisor_paging::{Access, Fault, FaultKind, Levels, StageId, Walker, X86Paging};
use memvisor_types::{Gva, PageSize};
use proptest::collection::vec;
use proptest::prelude::*;

/// Map outputs: anywhere below 2^39.
const OUT_SPAN: u64 = 1 << 39;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn x86_four_level_walks_match_the_reference_model(
        paging in x86_strategy(Levels::Four),
        ops in ops_strategy(x86_attrs_strategy(), 0, OUT_SPAN, 6),
        probes in vec((probe_strategy(), access_strategy()), 8..16),
    ) {
        check_against_model(paging, Frames::Ample, &ops, &probes)?;
    }

    #[test]
    fn x86_five_level_walks_match_the_reference_model(
        paging in x86_strategy(Levels::Five),
        ops in ops_strategy(x86_attrs_strategy(), 0, OUT_SPAN, 6),
        probes in vec((probe_strategy(), access_strategy()), 8..16),
    ) {
        check_against_model(paging, Frames::Ample, &ops, &probes)?;
    }

    #[test]
    fn x86_operations_that_run_out_of_frames_change_nothing(
        paging in prop_oneof![x86_strategy(Levels::Four), x86_strategy(Levels::Five)],
        frames in 2usize..12,
        ops in ops_strategy(x86_attrs_strategy(), 0, OUT_SPAN, 8),
        probes in vec((probe_strategy(), access_strategy()), 8..16),
    ) {
        check_against_model(paging, Frames::Scarce(frames), &ops, &probes)?;
    }

    #[test]
    fn second_stage_operations_that_run_out_of_frames_change_nothing(
        format in prop_oneof![second_stage_strategy(3), second_stage_strategy(4), second_stage_strategy(5)],
        frames in 2usize..12,
        ops in ops_strategy(second_stage_attrs_strategy(), 0, OUT_SPAN, 8),
        probes in vec((probe_strategy(), access_strategy()), 8..16),
    ) {
        check_against_model(format, Frames::Scarce(frames), &ops, &probes)?;
    }

    #[test]
    fn second_stage_three_level_walks_match_the_reference_model(
        format in second_stage_strategy(3),
        ops in ops_strategy(second_stage_attrs_strategy(), 0, OUT_SPAN, 6),
        probes in vec((probe_strategy(), access_strategy()), 8..16),
    ) {
        check_against_model(format, Frames::Ample, &ops, &probes)?;
    }

    #[test]
    fn second_stage_four_level_walks_match_the_reference_model(
        format in second_stage_strategy(4),
        ops in ops_strategy(second_stage_attrs_strategy(), 0, OUT_SPAN, 6),
        probes in vec((probe_strategy(), access_strategy()), 8..16),
    ) {
        check_against_model(format, Frames::Ample, &ops, &probes)?;
    }

    #[test]
    fn second_stage_five_level_walks_match_the_reference_model(
        format in second_stage_strategy(5),
        ops in ops_strategy(second_stage_attrs_strategy(), 0, OUT_SPAN, 6),
        probes in vec((probe_strategy(), access_strategy()), 8..16),
    ) {
        check_against_model(format, Frames::Ample, &ops, &probes)?;
    }
}

#[test]
fn reference_model_splits_a_1g_page_cut_mid_2m_into_2m_and_4k_pages() {
    // Arrange: the model itself is code, so it gets a check of its own.
    let mut model = RefModel::new();
    model.map(0, 1 << 30, 0, 'a', PageSize::Size1G, |_| true);

    // Act
    let edit = model.unmap(0x20_1000, 0x20_2000);

    // Assert
    assert_eq!((edit.leaves, edit.splits), (1, 2));
    let sizes = [0, 0x20_0000, 0x20_2000, 0x40_0000].map(|a| model.lookup(a).map(|p| p.size));
    assert_eq!(
        sizes,
        [Some(PageSize::Size2M), Some(PageSize::Size4K), Some(PageSize::Size4K), Some(PageSize::Size2M)]
    );
    assert_eq!(model.lookup(0x20_1000), None);
    assert_eq!(model.tables(4), 4);
}

#[test]
fn walker_reports_the_stage_and_level_of_a_missing_table() {
    // Arrange: the PML4E and PDPTE exist, the PDE does not.
    let chain = Chain::new(4, 0x4000_0000, &[0x7, 0x7, 0], 0);

    // Act
    let r = X86Paging::four_level().translate(
        &chain.arena,
        chain.root,
        Gva::new(0x4000_0000),
        Access::write().user(),
    );

    // Assert
    assert_eq!(
        r,
        Err(Fault {
            kind: FaultKind::NotPresent,
            stage: StageId::First,
            level: 2,
            addr: 0x4000_0000,
            error_code: 0b110,
            stage1_level: None,
        })
    );
}
