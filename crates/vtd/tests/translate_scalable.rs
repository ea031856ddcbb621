//! Scalable-mode DMA translation: scalable context → PASID directory → PASID
//! entry → pass-through, second stage, first stage (4/5-level, SRE, WPE,
//! U/S, A/D, EAFE) and nested; the scalable fault reasons.

mod translate_support;

use memvisor_paging::format::x86;
use memvisor_paging::{Access, Nested, SecondStageAttrs, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Gva, Iova, PageSize};
use memvisor_vtd::tables::{self, Pgtt, reason};
use memvisor_vtd::translate::{DmaRequest, Dmar};
use memvisor_vtd::{Config, Mode};
use translate_support::*;

fn config(mode: Mode) -> Config {
    Config { mode, ..Config::default() }
}

fn nested_unit() -> Dmar {
    Dmar::new(&config(Mode::ScalableNested))
}

/// Scalable context for DEV with RID_PASID 0 and PASID entry 0 / `pasid` set to `pe`.
fn setup(mem: &memvisor_vtd::TestMemory, pasid: u32, pe: Pe) {
    set_scalable_context(mem, DEV, scalable_ctx(PASID_DIR, 0));
    set_pasid_entry(mem, pasid, pe.raw());
}

fn user_page(write: bool) -> X86Attrs {
    X86Attrs { write, ..X86Attrs::user_rwx() }
}

#[test]
fn pass_through_pasid_entry_maps_addresses_to_themselves() {
    // Arrange
    let mem = memory();
    setup(&mem, 0, Pe { pgtt: 4, did: 3, ..Pe::default() });
    // Act
    let t = nested_unit().translate(&mem, &scalable_root(), &DmaRequest::write(DEV, 0xabc_d000)).unwrap();
    // Assert
    assert_eq!((t.output, t.did), (0xabc_d000, 3));
}

#[test]
fn request_without_pasid_uses_the_rid_pasid_entry() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x1000, 0x1000, 0x7000, rw(), PageSize::Size4K);
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 77));
    set_pasid_entry(&mem, 77, Pe { pgtt: 2, did: 4, ssptptr: m.root().raw(), ..Pe::default() }.raw());
    let mut d = Dmar::new(&config(Mode::ScalableSecondStage));
    // Act
    let t = d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1008)).unwrap();
    // Assert
    assert_eq!((t.output, t.did), (0x7008, 4));
}

#[test]
fn second_stage_pasid_entry_translates_2m_pages_and_reports_sm_write() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x20_0000, 0x20_0000, 0x4000_0000, ro(), PageSize::Size2M);
    setup(&mem, 5, Pe { pgtt: 2, ssptptr: m.root().raw(), ..Pe::default() });
    let mut d = Dmar::new(&config(Mode::ScalableSecondStage));
    let req = DmaRequest::read(DEV, 0x21_0000).with_pasid(5);
    // Act
    let t = d.translate(&mem, &scalable_root(), &req).unwrap();
    let f = d.translate(&mem, &scalable_root(), &DmaRequest { write: true, ..req }).unwrap_err();
    // Assert
    assert_eq!((t.output, t.page_size), (0x4001_0000, 0x20_0000));
    assert_eq!(f.info.reason, reason::SM_WRITE);
}

#[test]
fn second_stage_with_ssade_sets_accessed_and_dirty_in_guest_memory() {
    // Arrange
    let mem = memory();
    let mut m = ss_mapper(&mem, 4);
    map_ss(&mut m, 0x1000, 0x1000, 0x7000, rw(), PageSize::Size4K);
    setup(&mem, 0, Pe { pgtt: 2, ssptptr: m.root().raw(), ssade: true, ..Pe::default() });
    let mut d = Dmar::new(&config(Mode::ScalableSecondStage));
    // Act
    d.translate(&mem, &scalable_root(), &DmaRequest::write(DEV, 0x1000)).unwrap();
    // Assert
    let leaf = ss_format(4, true);
    let t = memvisor_paging::Walker::lookup(&leaf, mem.arena(), m.root(), Iova::new(0x1000)).unwrap();
    let ad = memvisor_paging::format::second_stage::A | memvisor_paging::format::second_stage::D;
    assert_eq!(t.leaf & ad, ad);
}

#[test]
fn first_stage_four_level_translates_a_user_request() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x7f00_0000_0000, 0x1000, 0x5000, user_page(true), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), ..Pe::default() });
    // Act
    let t = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::write(DEV, 0x7f00_0000_0042).with_pasid(1))
        .unwrap();
    // Assert
    assert_eq!((t.output, t.write), (0x5042, true));
}

#[test]
fn first_stage_five_level_translates_a_57_bit_address() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, true);
    map_fs(&mut m, 0x80_0000_0000_0000, 0x20_0000, 0x20_0000, user_page(true), PageSize::Size2M);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), fspm: 1, ..Pe::default() });
    let mut d = Dmar::new(&Config { mode: Mode::ScalableFirstStage, address_width: 57, ..Config::default() });
    // Act
    let t = d
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x80_0000_0001_2345).with_pasid(1))
        .unwrap();
    // Assert
    assert_eq!((t.output, t.page_size), (0x21_2345, 0x20_0000));
}

#[test]
fn five_level_first_stage_on_a_48_bit_unit_is_an_invalid_pasid_entry() {
    // Arrange
    let mem = memory();
    let m = fs_mapper(&mem, true);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), fspm: 1, ..Pe::default() });
    // Act
    let f =
        nested_unit().translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(1)).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PASID_TABLE_ENTRY_INV);
}

#[test]
fn privileged_request_without_sre_is_denied() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, X86Attrs::kernel_rwx(), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), ..Pe::default() });
    let req = DmaRequest::read(DEV, 0x1000).with_pasid(1).privileged();
    // Act
    let f = nested_unit().translate(&mem, &scalable_root(), &req).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PASID_ENTRY_SRE);
}

#[test]
fn privileged_request_with_sre_reaches_supervisor_pages() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, X86Attrs::kernel_rwx(), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), sre: true, ..Pe::default() });
    let req = DmaRequest::read(DEV, 0x1000).with_pasid(1).privileged();
    // Act
    let t = nested_unit().translate(&mem, &scalable_root(), &req).unwrap();
    // Assert
    assert_eq!(t.output, 0x5000);
}

#[test]
fn user_request_to_a_supervisor_page_faults_with_the_us_reason() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, X86Attrs::kernel_rwx(), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), sre: true, ..Pe::default() });
    // Act
    let f = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(1))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::FS_PAGING_ENTRY_US);
}

#[test]
fn supervisor_write_to_a_read_only_page_succeeds_without_wpe() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(
        &mut m,
        0x1000,
        0x1000,
        0x5000,
        X86Attrs { write: false, ..X86Attrs::kernel_rwx() },
        PageSize::Size4K,
    );
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), sre: true, wpe: false, ..Pe::default() });
    let req = DmaRequest::write(DEV, 0x1000).with_pasid(1).privileged();
    // Act
    let t = nested_unit().translate(&mem, &scalable_root(), &req).unwrap();
    // Assert
    assert_eq!(t.output, 0x5000);
}

#[test]
fn supervisor_write_to_a_read_only_page_faults_with_wpe() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(
        &mut m,
        0x1000,
        0x1000,
        0x5000,
        X86Attrs { write: false, ..X86Attrs::kernel_rwx() },
        PageSize::Size4K,
    );
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), sre: true, wpe: true, ..Pe::default() });
    let req = DmaRequest::write(DEV, 0x1000).with_pasid(1).privileged();
    // Act
    let f = nested_unit().translate(&mem, &scalable_root(), &req).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::SM_WRITE);
}

#[test]
fn first_stage_write_sets_accessed_dirty_and_extended_accessed_in_guest_memory() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, user_page(true), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), eafe: true, ..Pe::default() });
    // Act
    nested_unit().translate(&mem, &scalable_root(), &DmaRequest::write(DEV, 0x1000).with_pasid(1)).unwrap();
    // Assert
    let f = X86Paging { phys_width: 46, ..X86Paging::four_level() };
    let t = memvisor_paging::Walker::lookup(&f, mem.arena(), m.root(), Gva::new(0x1000)).unwrap();
    assert_eq!(t.leaf & (x86::A | x86::D | x86::EA), x86::A | x86::D | x86::EA);
    let top = r(&mem, m.root().raw());
    assert_eq!(top & (x86::A | x86::EA), x86::A | x86::EA);
}

#[test]
fn first_stage_read_without_eafe_leaves_bit_10_clear() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, user_page(true), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), ..Pe::default() });
    // Act
    nested_unit().translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(1)).unwrap();
    // Assert
    let top = r(&mem, m.root().raw());
    assert_eq!(top & (x86::A | x86::EA), x86::A);
}

#[test]
fn first_stage_faults_report_not_present_reserved_and_non_canonical() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, user_page(true), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), ..Pe::default() });
    w(&mem, m.root().raw() + 8, 0x3000 | 1 | x86::PS); // PS in a PML4E is reserved
    let mut d = nested_unit();
    let root = scalable_root();
    // Act
    let np = d.translate(&mem, &root, &DmaRequest::read(DEV, 0x2000).with_pasid(1)).unwrap_err();
    let rsvd = d.translate(&mem, &root, &DmaRequest::read(DEV, 1 << 39).with_pasid(1)).unwrap_err();
    let nc = d.translate(&mem, &root, &DmaRequest::read(DEV, 1 << 50).with_pasid(1)).unwrap_err();
    // Assert
    assert_eq!(np.info.reason, reason::FS_PAGING_ENTRY_P);
    assert_eq!(rsvd.info.reason, reason::FS_PAGING_ENTRY_RSVD);
    assert_eq!(nc.info.reason, reason::FS_NON_CANONICAL);
}

#[test]
fn unreadable_first_stage_root_faults_with_invalid_fsptptr() {
    // Arrange
    let mem = memory();
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: 0x10_0000_0000, ..Pe::default() });
    // Act
    let f = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(1))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PASID_ENTRY_FSPTPTR_INV);
}

/// Stage 2 maps all guest table memory 1:1 and GPA 0x4000_0000.. to 0x100_0000..; stage 1
/// maps IOVA 0x7000_0000 to GPA 0x4000_5000.
fn nested_setup(mem: &memvisor_vtd::TestMemory) -> (u64, u64) {
    let mut s2 = ss_mapper(mem, 4);
    map_ss(&mut s2, 0, MEM_SIZE, 0, rw(), PageSize::Size4K);
    map_ss(&mut s2, 0x4000_0000, 0x20_0000, 0x100_0000_0000, rw(), PageSize::Size2M);
    let mut s1 = fs_mapper(mem, false);
    map_fs(&mut s1, 0x7000_0000, 0x1000, 0x4000_5000, user_page(true), PageSize::Size4K);
    (s2.root().raw(), s1.root().raw())
}

#[test]
fn nested_translation_goes_through_both_stages_within_24_references() {
    // Arrange
    let mem = memory();
    let (s2, s1) = nested_setup(&mem);
    setup(&mem, 2, Pe { pgtt: 3, ssptptr: s2, fsptptr: s1, ..Pe::default() });
    let mut d = nested_unit();
    let req = DmaRequest::read(DEV, 0x7000_0123).with_pasid(2);
    // Warm the context and PASID caches so only the page walk is counted.
    d.translate(&mem, &scalable_root(), &DmaRequest { addr: 0x7000_1000, ..req }).unwrap_err();
    // Act
    let t = d.translate(&mem, &scalable_root(), &req).unwrap();
    // Assert
    assert_eq!((t.output, t.page_size), (0x100_0000_5123, 0x1000));
    assert!(d.last_table_reads() <= 24, "{}", d.last_table_reads());
}

/// Memory references of a nested translation of a page next to one just
/// translated (context and PASID caches warm, IOTLB miss).
fn neighbour_references(psc: bool) -> u32 {
    let mem = memory();
    let mut s2 = ss_mapper(&mem, 4);
    map_ss(&mut s2, 0, MEM_SIZE, 0, rw(), PageSize::Size4K);
    map_ss(&mut s2, 0x4000_0000, 0x2000, 0x100_0000_0000, rw(), PageSize::Size4K);
    let mut s1 = fs_mapper(&mem, false);
    map_fs(&mut s1, 0x7000_0000, 0x2000, 0x4000_0000, user_page(true), PageSize::Size4K);
    setup(&mem, 2, Pe { pgtt: 3, ssptptr: s2.root().raw(), fsptptr: s1.root().raw(), ..Pe::default() });
    let mut d = nested_unit();
    d.set_paging_structure_caches(psc);
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x7000_0000).with_pasid(2)).unwrap();
    d.translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x7000_1000).with_pasid(2)).unwrap();
    d.last_table_reads()
}

#[test]
fn nested_walk_without_walk_caches_makes_the_full_24_references() {
    // Arrange, Act
    let refs = neighbour_references(false);
    // Assert
    assert_eq!(refs, 24);
}

#[test]
fn nested_walk_caches_cut_the_references_of_a_neighbouring_page() {
    // Arrange, Act
    let refs = neighbour_references(true);
    // Assert
    assert!(refs <= 5, "{refs} references");
}

#[test]
fn nested_translation_equals_the_reference_nested_walk() {
    // Arrange
    let mem = memory();
    let (s2, s1) = nested_setup(&mem);
    setup(&mem, 2, Pe { pgtt: 3, ssptptr: s2, fsptptr: s1, ..Pe::default() });
    let nested = Nested {
        stage1: X86Paging { phys_width: 46, ..X86Paging::four_level() },
        stage2: ss_format(4, false),
    };
    // Act
    let t = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::write(DEV, 0x7000_0ff8).with_pasid(2))
        .unwrap();
    let reference = nested
        .translate(mem.arena(), Gpa::new(s2), Gpa::new(s1), Gva::new(0x7000_0ff8), Access::write().user())
        .unwrap();
    // Assert
    assert_eq!(t.output, reference.addr.raw());
}

#[test]
fn nested_stage1_table_outside_stage2_faults_reading_the_first_stage() {
    // Arrange: stage 2 maps nothing, so the stage-1 root cannot be read.
    let mem = memory();
    let s2 = ss_mapper(&mem, 4);
    let s1 = fs_mapper(&mem, false);
    setup(&mem, 2, Pe { pgtt: 3, ssptptr: s2.root().raw(), fsptptr: s1.root().raw(), ..Pe::default() });
    // Act
    let f = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(2))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::NESTED_FS_TOP_READ);
}

#[test]
fn nested_final_address_outside_stage2_is_an_sm_read_fault() {
    // Arrange
    let mem = memory();
    let mut s2 = ss_mapper(&mem, 4);
    map_ss(&mut s2, 0, MEM_SIZE, 0, rw(), PageSize::Size4K);
    let mut s1 = fs_mapper(&mem, false);
    map_fs(&mut s1, 0x1000, 0x1000, 0x9000_0000, user_page(true), PageSize::Size4K);
    setup(&mem, 2, Pe { pgtt: 3, ssptptr: s2.root().raw(), fsptptr: s1.root().raw(), ..Pe::default() });
    // Act
    let f = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(2))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::SM_READ);
}

#[test]
fn pgtt_not_offered_by_the_configuration_is_an_invalid_pasid_entry() {
    // Arrange
    let mem = memory();
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: 0x20_0000, ..Pe::default() });
    setup(&mem, 2, Pe { pgtt: 3, fsptptr: 0x20_0000, ..Pe::default() });
    let mut ss_only = Dmar::new(&config(Mode::ScalableSecondStage));
    let mut fs_only = Dmar::new(&config(Mode::ScalableFirstStage));
    let root = scalable_root();
    // Act
    let fs = ss_only.translate(&mem, &root, &DmaRequest::read(DEV, 0).with_pasid(1)).unwrap_err();
    let nested = fs_only.translate(&mem, &root, &DmaRequest::read(DEV, 0).with_pasid(2)).unwrap_err();
    // Assert
    assert_eq!(fs.info.reason, reason::PASID_TABLE_ENTRY_INV);
    assert_eq!(nested.info.reason, reason::PASID_TABLE_ENTRY_INV);
}

#[test]
fn pgtt_zero_is_an_invalid_pasid_entry_for_the_public_lookup_too() {
    // Arrange
    let mem = memory();
    setup(&mem, 1, Pe { pgtt: 0, ..Pe::default() });
    // Act
    let f =
        nested_unit().translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0).with_pasid(1)).unwrap_err();
    let looked_up = tables::pasid_entry(&mem, &scalable_root(), DEV, 1);
    // Assert
    assert_eq!(f.info.reason, reason::PASID_TABLE_ENTRY_INV);
    assert_eq!(looked_up, Err(reason::PASID_TABLE_ENTRY_INV));
}

#[test]
fn public_lookups_decode_the_pasid_entry_and_rid_pasid() {
    // Arrange
    let mem = memory();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 9));
    set_pasid_entry(
        &mem,
        9,
        Pe {
            pgtt: 1,
            did: 12,
            fsptptr: 0x20_0000,
            sre: true,
            wpe: true,
            eafe: true,
            fspm: 1,
            ..Pe::default()
        }
        .raw(),
    );
    let root = scalable_root();
    // Act
    let e = tables::pasid_entry(&mem, &root, DEV, 9).unwrap().unwrap();
    let rid = tables::rid_pasid(&mem, &root, DEV);
    let absent = tables::pasid_entry(&mem, &root, DEV, 10);
    // Assert
    assert_eq!(
        (e.pgtt, e.did, e.fsptptr, e.sre, e.wpe, e.eafe, e.fspm),
        (Pgtt::FirstStage, 12, 0x20_0000, true, true, true, 1)
    );
    assert_eq!(rid, Ok(Some(9)));
    assert_eq!(absent, Ok(None));
}

#[test]
fn missing_scalable_structures_fault_with_their_scalable_reasons() {
    // Arrange
    let mem = memory();
    let root = scalable_root();
    let mut d = nested_unit();
    let req = DmaRequest::read(DEV, 0).with_pasid(1);
    // Act
    let no_root = d.translate(&mem, &root, &req).unwrap_err();
    set_scalable_context(&mem, DEV, [0; 4]);
    let no_ctx = d.translate(&mem, &root, &req).unwrap_err();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    let no_dir = d.translate(&mem, &root, &req).unwrap_err();
    set_pasid_entry(&mem, 1, [0; 8]);
    let no_entry = d.translate(&mem, &root, &req).unwrap_err();
    // Assert
    assert_eq!(no_root.info.reason, reason::SM_ROOT_ENTRY_P);
    assert_eq!(no_ctx.info.reason, reason::SM_CONTEXT_ENTRY_P);
    assert_eq!(no_dir.info.reason, reason::PASID_DIR_ENTRY_P);
    assert_eq!(no_entry.info.reason, reason::PASID_ENTRY_P);
}

#[test]
fn request_with_pasid_needs_paside_and_a_pasid_within_the_directory() {
    // Arrange
    let mem = memory();
    let mut ctx = scalable_ctx(PASID_DIR, 0);
    set_scalable_context(&mem, DEV, ctx);
    let root = scalable_root();
    // Act
    let too_large =
        nested_unit().translate(&mem, &root, &DmaRequest::read(DEV, 0).with_pasid(1 << 13)).unwrap_err();
    ctx[0] &= !(1 << 3);
    set_scalable_context(&mem, DEV, ctx);
    let no_paside =
        nested_unit().translate(&mem, &root, &DmaRequest::read(DEV, 0).with_pasid(1)).unwrap_err();
    // Assert
    assert_eq!(too_large.info.reason, reason::SM_PASID_TOO_LARGE);
    assert_eq!(no_paside.info.reason, reason::SM_PASIDE_CLEAR);
}

#[test]
fn fpd_in_the_pasid_entry_suppresses_its_page_faults() {
    // Arrange
    let mem = memory();
    let m = fs_mapper(&mem, false);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), fpd: true, ..Pe::default() });
    // Act
    let f = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(1))
        .unwrap_err();
    // Assert
    assert_eq!((f.info.reason, f.fpd), (reason::FS_PAGING_ENTRY_P, true));
}

#[test]
fn reserved_bits_in_scalable_structures_fault_with_their_reasons() {
    // Arrange
    let mem = memory();
    let root = scalable_root();
    let req = DmaRequest::read(DEV, 0).with_pasid(1);
    let mut ctx = scalable_ctx(PASID_DIR, 0);
    ctx[2] = 1;
    set_scalable_context(&mem, DEV, ctx);
    // Act
    let ctx_rsvd = nested_unit().translate(&mem, &root, &req).unwrap_err();
    set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
    let mut raw = Pe::default().raw();
    raw[0] |= 1 << 10;
    set_pasid_entry(&mem, 1, raw);
    let pe_rsvd = nested_unit().translate(&mem, &root, &req).unwrap_err();
    w(&mem, PASID_DIR, r(&mem, PASID_DIR) | 0x10);
    let dir_rsvd = nested_unit().translate(&mem, &root, &req).unwrap_err();
    // Assert
    assert_eq!(ctx_rsvd.info.reason, reason::SM_CONTEXT_ENTRY_RSVD);
    assert_eq!(pe_rsvd.info.reason, reason::PASID_ENTRY_RSVD);
    assert_eq!(dir_rsvd.info.reason, reason::PASID_DIR_ENTRY_RSVD);
}

#[test]
fn scalable_tables_on_a_legacy_unit_are_an_invalid_root_table() {
    // Arrange
    let mem = memory();
    // Act
    let f = Dmar::new(&Config::default())
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::SM_RTADDR_INV);
}

#[test]
fn second_stage_only_unit_rejects_second_stage_input_beyond_aw() {
    // Arrange
    let mem = memory();
    let m = ss_mapper(&mem, 4);
    setup(&mem, 0, Pe { pgtt: 2, ssptptr: m.root().raw(), ..Pe::default() });
    let _ = SecondStageAttrs::rwx();
    let _ = AddrRange::from_len(Iova::new(0), 1);
    // Act
    let f = Dmar::new(&config(Mode::ScalableSecondStage))
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 1 << 48))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::SM_ADDR_BEYOND);
}

#[test]
fn execute_request_without_ere_is_denied() {
    // Arrange
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, user_page(true), PageSize::Size4K);
    setup(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), ..Pe::default() });
    let req = DmaRequest { exec: true, ..DmaRequest::read(DEV, 0x1000).with_pasid(1) };
    // Act
    let f = nested_unit().translate(&mem, &scalable_root(), &req).unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::PASID_ENTRY_ERE);
}

#[test]
fn request_without_pasid_is_a_user_request_unless_rid_priv_is_set() {
    // Arrange: a supervisor-only page behind RID_PASID 0.
    let mem = memory();
    let mut m = fs_mapper(&mem, false);
    map_fs(&mut m, 0x1000, 0x1000, 0x5000, X86Attrs::kernel_rwx(), PageSize::Size4K);
    setup(&mem, 0, Pe { pgtt: 1, fsptptr: m.root().raw(), sre: true, ..Pe::default() });
    let user = nested_unit().translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000)).unwrap_err();
    let mut ctx = scalable_ctx(PASID_DIR, 0);
    ctx[1] |= 1 << 20;
    set_scalable_context(&mem, DEV, ctx);
    // Act
    let supervisor = nested_unit().translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000));
    // Assert
    assert_eq!(user.info.reason, reason::FS_PAGING_ENTRY_US);
    assert_eq!(supervisor.unwrap().output, 0x5000);
}

#[test]
fn nested_user_request_to_a_supervisor_page_faults_with_the_us_reason() {
    // Arrange
    let mem = memory();
    let mut s2 = ss_mapper(&mem, 4);
    map_ss(&mut s2, 0, MEM_SIZE, 0, rw(), PageSize::Size4K);
    let mut s1 = fs_mapper(&mem, false);
    map_fs(&mut s1, 0x1000, 0x1000, 0x5000, X86Attrs::kernel_rwx(), PageSize::Size4K);
    setup(&mem, 2, Pe { pgtt: 3, ssptptr: s2.root().raw(), fsptptr: s1.root().raw(), ..Pe::default() });
    // Act
    let f = nested_unit()
        .translate(&mem, &scalable_root(), &DmaRequest::read(DEV, 0x1000).with_pasid(2))
        .unwrap_err();
    // Assert
    assert_eq!(f.info.reason, reason::FS_PAGING_ENTRY_US);
}
