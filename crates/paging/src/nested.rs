//! The two-dimensional (nested) walk: a first-stage table whose every table
//! pointer, and whose final output, are guest-physical addresses translated
//! through a second stage (VT-d PGTT=3 nested translation; EPT/NPT on a CPU).
//!
//! For `n`-level over `m`-level tables a walk makes at most `n·(m+1) + m`
//! entry reads — 24 for 4-level over 4-level: each of the 4 stage-1 entries
//! needs a 4-read stage-2 walk to locate it plus the read itself, and the
//! final GPA needs one more stage-2 walk. Stage-1 accessed/dirty updates are
//! writes to guest memory, so they go through the second stage as writes.

use core::cell::Cell;

use memvisor_types::{Address, PageSize};

use crate::format::{Access, Format, Perms};
use crate::memory::{CountingMemory, TableMemory};
use crate::walk::{
    Direct, EntryReader, Fault, Path, Start, Translation, WalkPlan, finish, translate_path,
    update_accessed_dirty,
};

/// First stage `S1` nested over second stage `S2`.
///
/// ```
/// use memvisor_paging::{Access, Arena, Mapper, Nested, SecondStage, SecondStageAttrs, X86Attrs, X86Paging};
/// use memvisor_types::{AddrRange, Address, Gpa, Gva, Hpa, PageSize};
///
/// // Host frames hold both the stage-2 table and (at host 0x20_0000..) guest RAM.
/// let host = Arena::new(Hpa::new(0), 1024);
/// let mut frames = host.frame_allocator();
/// let mut s2 = Mapper::new(SecondStage::four_level(), &host, &mut frames)?;
/// // Guest RAM GPA 0..2M lives at host 0x20_0000.
/// s2.map(AddrRange::from_len(Gpa::new(0), 0x20_0000)?, Hpa::new(0x20_0000), SecondStageAttrs::rwx(), PageSize::Size4K)?;
///
/// // The guest's own table, built in guest RAM through a GPA view of it.
/// let guest = memvisor_paging::OffsetMemory::<_, Gpa>::new(&host, 0x20_0000);
/// let mut guest_frames = memvisor_paging::ArenaFrames::<Gpa>::range(0x1000, 0x10_0000);
/// let mut s1 = Mapper::new(X86Paging::four_level(), &guest, &mut guest_frames)?;
/// s1.map(AddrRange::from_len(Gva::new(0x7000_0000), 0x1000)?, Gpa::new(0x15_0000), X86Attrs::user_rwx(), PageSize::Size4K)?;
///
/// let nested = Nested { stage1: X86Paging::four_level(), stage2: SecondStage::four_level() };
/// let (t, refs) = nested.translate_counted(&host, s2.root(), s1.root(), Gva::new(0x7000_0123), Access::read().user());
/// assert_eq!(t?.addr, Hpa::new(0x35_0123));
/// assert_eq!(refs, 24);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nested<S1: Format, S2: Format> {
    /// The guest-controlled first stage (input → GPA).
    pub stage1: S1,
    /// The host-controlled second stage (GPA → host).
    pub stage2: S2,
}

/// The result of a nested walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestedTranslation<H, G> {
    /// Host output address.
    pub addr: H,
    /// The intermediate guest-physical address (stage-1 output).
    pub gpa: G,
    /// The effective page size: the smaller of the two stages' pages.
    pub size: PageSize,
    /// Permissions allowed by both stages (`user` from stage 1).
    pub perms: Perms,
    /// The stage-1 leaf entry after this access.
    pub stage1_leaf: u64,
    /// The stage-2 leaf entry of the final translation after this access.
    pub stage2_leaf: u64,
}

/// Reads stage-1 entries at guest-physical addresses through stage 2.
struct ThroughStage2<'a, S2, M> {
    stage2: &'a S2,
    plan: WalkPlan,
    mem: &'a M,
    root: u64,
    /// Per stage-1 level, the stage-2 result of the last read. An A/D update
    /// of the entry just read reuses it instead of walking stage 2 again, as
    /// hardware does for its locked read-modify-write.
    last: [Cell<Option<Stage2Hit>>; 6],
}

/// A stage-2 translation remembered for a stage-1 entry's A/D update.
#[derive(Debug, Clone, Copy)]
struct Stage2Hit {
    gpa: u64,
    hpa: u64,
    writable: bool,
    /// Address and value of the stage-2 leaf (its dirty flag is set before the write).
    leaf_addr: u64,
    leaf: u64,
}

impl<S2: Format, M: TableMemory> ThroughStage2<'_, S2, M> {
    fn host_translation(&self, gpa: u64, level: u8, access: Access) -> Result<Stage2Hit, Option<Fault>> {
        let start = Start::root(&self.plan, self.root);
        let in_stage1 = |f: Fault| Some(Fault { stage1_level: Some(level), ..f });
        let mut path = Path::default();
        let walked =
            translate_path(self.stage2, &self.plan, &Direct(self.mem), start, gpa, access, &mut path)
                .map_err(in_stage1)?;
        let t: Translation<M::Addr> = finish(self.stage2, &walked, gpa, access).map_err(in_stage1)?;
        let leaf_addr = path.addr.get(path.len.wrapping_sub(1)).copied().unwrap_or(0);
        Ok(Stage2Hit { gpa, hpa: t.addr.raw(), writable: t.perms.write, leaf_addr, leaf: t.leaf })
    }

    /// The host address for writing the stage-1 entry at `gpa`, with the
    /// stage-2 dirty flag set.
    fn write_target(&self, gpa: u64, level: u8) -> Result<u64, Option<Fault>> {
        let write = Access::write().implicit();
        if let Some(hit) = self.last.get(usize::from(level)).and_then(Cell::get)
            && hit.gpa == gpa
            && hit.writable
        {
            let leaf_addr = M::Addr::from_raw(hit.leaf_addr);
            let set = update_accessed_dirty(self.stage2, hit.leaf, true, write, |cur, new| {
                self.mem.compare_exchange_entry(leaf_addr, cur, new).map(|r| r.map(|_| ()))
            });
            if let Ok(Some(dirty)) = set {
                // Other stage-1 levels may sit behind the same stage-2 leaf.
                for slot in &self.last {
                    if let Some(h) = slot.get().filter(|h| h.leaf_addr == hit.leaf_addr) {
                        slot.set(Some(Stage2Hit { leaf: dirty, ..h }));
                    }
                }
                return Ok(hit.hpa);
            }
        }
        Ok(self.host_translation(gpa, level, write)?.hpa)
    }
}

impl<S2: Format, M: TableMemory> EntryReader for ThroughStage2<'_, S2, M> {
    fn read(&self, gpa: u64, level: u8) -> Result<u64, Option<Fault>> {
        let hit = self.host_translation(gpa, level, Access::read().implicit())?;
        if let Some(slot) = self.last.get(usize::from(level)) {
            slot.set(Some(hit));
        }
        self.mem.read_entry(M::Addr::from_raw(hit.hpa)).map_err(|_| None)
    }

    fn update(&self, gpa: u64, old: u64, new: u64, level: u8) -> Result<Result<(), u64>, Option<Fault>> {
        let hpa = self.write_target(gpa, level)?;
        let hpa = M::Addr::from_raw(hpa);
        match self.mem.compare_exchange_entry(hpa, old, new) {
            Ok(r) => Ok(r.map(|_| ())),
            Err(_) => Err(None),
        }
    }
}

impl<S1: Format, S2: Format> Nested<S1, S2> {
    /// Translates `input` through stage 1 (table at the guest-physical
    /// `stage1_root`) and stage 2 (table at the host `stage2_root`), with all
    /// checks and accessed/dirty updates of both stages.
    ///
    /// Compiles both formats on every call; for many walks,
    /// [`prepare`](Self::prepare) once.
    pub fn translate<M: TableMemory, G: Address, I: Address>(
        &self,
        mem: &M,
        stage2_root: M::Addr,
        stage1_root: G,
        input: I,
        access: Access,
    ) -> Result<NestedTranslation<M::Addr, G>, Fault> {
        self.prepare().translate(mem, stage2_root, stage1_root, input, access)
    }

    /// Both stages compiled for repeated walks.
    pub fn prepare(&self) -> PreparedNested<S1, S2> {
        PreparedNested {
            nested: *self,
            stage1: WalkPlan::new(&self.stage1),
            stage2: WalkPlan::new(&self.stage2),
        }
    }

    /// [`translate`](Self::translate), also returning the number of entry
    /// reads the walk made (at most 24 for 4-level over 4-level).
    pub fn translate_counted<M: TableMemory, G: Address, I: Address>(
        &self,
        mem: &M,
        stage2_root: M::Addr,
        stage1_root: G,
        input: I,
        access: Access,
    ) -> (Result<NestedTranslation<M::Addr, G>, Fault>, u32) {
        let counted = CountingMemory::new(mem);
        let r = self.translate(&counted, stage2_root, stage1_root, input, access);
        (r, counted.reads())
    }

    /// The most entry reads one walk can make: `n·(m+1) + m`.
    pub fn max_references(&self) -> u32 {
        let n = u32::from(self.stage1.levels());
        let m = u32::from(self.stage2.levels());
        n * (m + 1) + m
    }
}

/// A [`Nested`] with both formats compiled (from [`Nested::prepare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedNested<S1: Format, S2: Format> {
    nested: Nested<S1, S2>,
    stage1: WalkPlan,
    stage2: WalkPlan,
}

impl<S1: Format, S2: Format> PreparedNested<S1, S2> {
    /// As [`Nested::translate`].
    pub fn translate<M: TableMemory, G: Address, I: Address>(
        &self,
        mem: &M,
        stage2_root: M::Addr,
        stage1_root: G,
        input: I,
        access: Access,
    ) -> Result<NestedTranslation<M::Addr, G>, Fault> {
        let (s1f, s2f) = (&self.nested.stage1, &self.nested.stage2);
        // Both stages record their paths: re-walking after a missing A/D
        // flag would double the memory references of a first touch.
        let reader = ThroughStage2 {
            stage2: s2f,
            plan: self.stage2,
            mem,
            root: stage2_root.raw(),
            last: Default::default(),
        };
        let input = input.raw();
        let mut path = Path::default();
        let start = Start::root(&self.stage1, stage1_root.raw());
        let s1_walked = translate_path(s1f, &self.stage1, &reader, start, input, access, &mut path)?;
        let s1: Translation<G> = finish(s1f, &s1_walked, input, access)?;
        let gpa = s1.addr.raw();
        let s2_access = Access { user: false, ..access };
        let start = Start::root(&self.stage2, stage2_root.raw());
        let s2_walked = translate_path(s2f, &self.stage2, &Direct(mem), start, gpa, s2_access, &mut path)?;
        let s2: Translation<M::Addr> = finish(s2f, &s2_walked, gpa, s2_access)?;
        Ok(NestedTranslation {
            addr: s2.addr,
            gpa: s1.addr,
            size: s1.size.min(s2.size),
            perms: Perms { user: s1.perms.user, ..s1.perms.intersect(s2.perms) },
            stage1_leaf: s1.leaf,
            stage2_leaf: s2.leaf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::x86;
    use crate::{Arena, Mapper, OffsetMemory, SecondStage, SecondStageAttrs, X86Paging};
    use memvisor_types::{AddrRange, Gpa, Gva, Hpa};

    #[test]
    fn self_referencing_stage1_table_stays_within_the_reference_bound() {
        // Arrange: guest RAM = host frames 0x10_0000.. (identity-offset view);
        // the stage-1 root's entry 0 points at the root itself at every level
        // (a recursive mapping), so one entry is read — and gets its A flag —
        // four times on one walk.
        let host = Arena::new(Hpa::new(0), 64);
        let mut s2 = Mapper::new(SecondStage::four_level(), &host, host.frame_allocator()).unwrap();
        let ram = AddrRange::from_len(Gpa::new(0), 0x10_0000).unwrap();
        s2.map(ram, Hpa::new(0), SecondStageAttrs::rwx(), PageSize::Size4K).unwrap();
        let guest = OffsetMemory::<_, Gpa>::new(&host, 0);
        let root = Gpa::new(0x3f000);
        guest.write_entry(root, root.raw() | x86::P | x86::RW | x86::US).unwrap();
        let nested = Nested { stage1: X86Paging::four_level(), stage2: SecondStage::four_level() };

        // Act
        let (t, refs) = nested.translate_counted(&host, s2.root(), root, Gva::new(0x18), Access::write());

        // Assert
        assert_eq!(t.unwrap().addr, Hpa::new(0x3f018));
        assert!(refs <= nested.max_references(), "{refs} references");
        let entry = guest.read_entry(root).unwrap();
        assert_eq!(entry & (x86::A | x86::D), x86::A | x86::D);
    }
}
