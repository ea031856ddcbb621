//! The encoders of `memvisor_vtd::encode` produce what the unit's decoders
//! read back: a driver built on them programs exactly what it means.

use memvisor_types::Gpa;
use memvisor_vtd::encode::{self, PasidEntryFields, PasidTt};
use memvisor_vtd::qi::{self, Descriptor};
use memvisor_vtd::tables::{self, Pgtt};
use memvisor_vtd::{
    ContextInval, Invalidation, IotlbInval, PasidCacheInval, PiotlbInval, RootState, SourceId, TestMemory,
};

const DEV: SourceId = SourceId::new(0, 3, 0);

fn decode(desc: [u64; 2]) -> Descriptor {
    qi::decode(&[desc[0], desc[1], 0, 0], false, true).expect("encoder output decodes")
}

#[test]
fn scalable_tables_written_by_the_encoders_decode_to_the_same_pasid_entry() {
    // Arrange
    let mem = TestMemory::new(Gpa::new(0), 64);
    let root = RootState { rtaddr: 0x1000, scalable: true, enabled: true };
    let fields =
        PasidEntryFields { sre: true, wpe: true, eafe: true, ..PasidEntryFields::first_stage(7, 0x9000) };
    // Act
    encode::install_scalable_context(&mem, 0x1000, 0x2000, DEV, encode::scalable_context_entry(0x3000, 0, 5))
        .unwrap();
    encode::install_pasid_entry(&mem, 0x3000, 0x4000, 5, fields.encode()).unwrap();
    let entry = tables::pasid_entry(&mem, &root, DEV, 5).unwrap().unwrap();
    // Assert
    assert_eq!(tables::rid_pasid(&mem, &root, DEV), Ok(Some(5)));
    assert_eq!(entry.pgtt, Pgtt::FirstStage);
    assert_eq!(entry.did, 7);
    assert_eq!(entry.fsptptr, 0x9000);
    assert!(entry.sre && entry.wpe && entry.eafe && !entry.fpd);
    assert_eq!(entry.fspm, 0);
}

#[test]
fn every_pasid_translation_type_round_trips() {
    // Arrange
    let mem = TestMemory::new(Gpa::new(0), 64);
    let root = RootState { rtaddr: 0x1000, scalable: true, enabled: true };
    encode::install_scalable_context(&mem, 0x1000, 0x2000, DEV, encode::scalable_context_entry(0x3000, 0, 0))
        .unwrap();
    for (tt, want) in [
        (PasidTt::FirstStage, Pgtt::FirstStage),
        (PasidTt::SecondStage, Pgtt::SecondStage),
        (PasidTt::Nested, Pgtt::Nested),
        (PasidTt::PassThrough, Pgtt::PassThrough),
    ] {
        let fields =
            PasidEntryFields { pgtt: tt, ssptptr: 0x8000, ..PasidEntryFields::first_stage(1, 0x9000) };
        // Act
        encode::install_pasid_entry(&mem, 0x3000, 0x4000, 0, fields.encode()).unwrap();
        let entry = tables::pasid_entry(&mem, &root, DEV, 0).unwrap().unwrap();
        // Assert
        assert_eq!(entry.pgtt, want);
    }
}

#[test]
fn invalidation_descriptors_decode_to_their_scopes() {
    // Arrange
    let cases = [
        (encode::qi_context_global(), Invalidation::Context(ContextInval::Global)),
        (
            encode::qi_context_device(3, DEV),
            Invalidation::Context(ContextInval::Device { did: 3, sid: DEV, fm: 0 }),
        ),
        (encode::qi_iotlb_global(), Invalidation::Iotlb(IotlbInval::Global)),
        (encode::qi_iotlb_domain(9), Invalidation::Iotlb(IotlbInval::Domain(9))),
        (
            encode::qi_iotlb_page(9, 0x5000, 2),
            Invalidation::Iotlb(IotlbInval::Page { did: 9, addr: 0x5000, am: 2, ih: false }),
        ),
        (encode::qi_piotlb_pasid(4, 77), Invalidation::Piotlb(PiotlbInval::Pasid { did: 4, pasid: 77 })),
        (
            encode::qi_piotlb_page(4, 77, 0x7000, 0),
            Invalidation::Piotlb(PiotlbInval::Page { did: 4, pasid: 77, addr: 0x7000, am: 0, ih: false }),
        ),
        (
            encode::qi_pasid_cache(4, 77),
            Invalidation::PasidCache(PasidCacheInval::Pasid { did: 4, pasid: 77 }),
        ),
        (encode::qi_pasid_cache_global(), Invalidation::PasidCache(PasidCacheInval::Global)),
    ];
    for (desc, want) in cases {
        // Act
        let got = decode(desc);
        // Assert
        assert_eq!(got, Descriptor::Invalidate(want), "{desc:x?}");
    }
}

#[test]
fn wait_descriptor_carries_its_status_write() {
    // Arrange
    let desc = encode::qi_wait(0x6004, 0xfeed);
    // Act
    let got = decode(desc);
    // Assert
    assert_eq!(got, Descriptor::Wait { status: Some((0x6004, 0xfeed)), interrupt: false, fence: false });
}
