//! Shared by the `guest_input` test (proptest) and the `walk_guest_tables`
//! fuzz target: walk tables whose every byte is guest-controlled, under every
//! configuration, and check the results are defined and self-consistent.
//! Any panic, hang or out-of-bounds access is a failure.

use memvisor_paging::{
    Access, AccessKind, Arena, FaultKind, Levels, Nested, OffsetMemory, SecondStage, TableMemory,
    TranslationCache, Walker, X86Paging,
};
use memvisor_types::{AddrRange, Gpa, Hpa, Iova};

const MAX_FRAMES: usize = 8;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

fn word(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, v) in b.iter_mut().enumerate() {
        *v = byte(data, i + k);
    }
    u64::from_le_bytes(b)
}

/// Decodes `data` into a configuration, an access, an input address and up to
/// eight frames of table memory, then exercises every walker on it.
pub fn exercise(data: &[u8]) {
    let (b0, b1, b2, b7) = (byte(data, 0), byte(data, 1), byte(data, 2), byte(data, 7));
    let x86 = X86Paging {
        levels: if b0 & 1 != 0 { Levels::Five } else { Levels::Four },
        phys_width: 32 + b1 % 21,
        wp: b0 & 2 != 0,
        smep: b0 & 4 != 0,
        smap: b0 & 8 != 0,
        nxe: b0 & 16 != 0,
        pke: b0 & 32 != 0,
        pkru: u32::from_le_bytes([byte(data, 3), byte(data, 4), byte(data, 5), byte(data, 6)]),
        gbpages: b0 & 64 != 0,
        update_accessed_dirty: true,
        extended_accessed: b0 & 128 != 0,
    };
    let ss = SecondStage {
        levels: 3 + b2 % 3,
        host_width: 32 + (b2 >> 2) % 21,
        large_2m: b2 & 0x80 != 0,
        large_1g: b1 & 0x80 != 0,
        snoop_control: b1 & 0x40 != 0,
        accessed_dirty: b7 & 0x40 != 0,
        execute_requests: b7 & 0x80 != 0,
    };
    let kind = match b7 % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Execute,
    };
    let access = Access { kind, user: b7 & 4 != 0, implicit: b7 & 8 != 0, ac: b7 & 16 != 0 };
    let input = word(data, 8);
    let fold = b7 & 32 != 0;

    let body = data.get(16..).unwrap_or(&[]);
    let frames = body.len().div_ceil(4096).clamp(1, MAX_FRAMES);
    let arena = Arena::new(Hpa::new(0), frames);
    for (i, chunk) in body.chunks(8).take(frames * 512).enumerate() {
        let mut e = word(chunk, 0);
        if fold {
            // Keep table pointers inside the arena so walks go deep.
            e = (e & !ADDR_MASK) | ((((e & ADDR_MASK) >> 12) % frames as u64) << 12);
        }
        arena.write_entry(Hpa::new(i as u64 * 8), e).expect("in the arena");
    }
    let root = Hpa::new(0);

    // One-dimensional walks: translate and lookup agree on success.
    let t = x86.translate(&arena, root, Iova::new(input), access);
    if let Ok(t) = t {
        let l = x86.lookup(&arena, root, Iova::new(input)).expect("a translated address has a mapping");
        assert_eq!(l.addr, t.addr);
        assert_eq!(l.size, t.size);
    }
    let s = ss.translate(&arena, root, Gpa::new(input), access);
    if let Err(f) = s {
        assert_eq!(f.error_code, 0, "second-stage faults carry no #PF error code");
    }

    // Nested: the guest's view of the same frames is its RAM (identity).
    let guest = OffsetMemory::<_, Gpa>::new(&arena, 0);
    let nested = Nested { stage1: x86, stage2: ss };
    let (r, refs) = nested.translate_counted(&arena, root, Gpa::new(0x1000), Iova::new(input), access);
    assert!(refs <= nested.max_references(), "{refs} references exceed the bound");
    if let Err(f) = r {
        assert!(f.kind != FaultKind::Contended, "no other writer, so no lost A/D race");
    }
    let _ = guest.read_entry(Gpa::new(0));

    // Cached and uncached walks agree on the same, unchanged memory.
    let mut cache = TranslationCache::new(x86, 8, 4);
    for _ in 0..2 {
        let cached = cache.translate(&arena, root, Iova::new(input), access);
        let direct = x86.translate(&arena, root, Iova::new(input), access);
        assert_eq!(cached, direct);
    }
    if let Ok(range) = AddrRange::from_len(Iova::new(input & !0xfff), 0x1000) {
        cache.invalidate_range(root, range);
    }
    cache.invalidate_root(root);
}
