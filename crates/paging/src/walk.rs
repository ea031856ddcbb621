//! The page walker: translate an input address through a table of any
//! [`Format`], check the access, and set accessed/dirty flags atomically.
//!
//! Order of checks, as on hardware: the input address (canonical form or
//! width), then level by level from the root: present, reserved bits, leaf?;
//! then the access rights of the whole walk; then A/D updates. Following KVM's
//! `paging_tmpl.h` (and matching what software can observe on Intel CPUs), the
//! accessed and dirty flags are written only when the access is allowed, by
//! compare-exchange from the top entry down; if an entry changed since it was
//! read the walk starts again, so a concurrent writer is never overwritten.

use memvisor_types::{Address, PageSize};

use crate::format::{ADDR_MASK, Access, FaultKind, Format, Perms, StageId, Walked, entry_span, index};
use crate::memory::TableMemory;

/// How many times a walk restarts after losing an A/D race before giving up
/// with [`FaultKind::Contended`] (keeps a guest that rewrites its tables in a
/// loop from holding a VMM thread forever).
const MAX_AD_RETRIES: u32 = 64;

/// A failed translation: what went wrong, where, and the architectural error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    /// What went wrong.
    pub kind: FaultKind,
    /// The stage whose table faulted.
    pub stage: StageId,
    /// Level of the faulting entry (the leaf level for permission faults; 0
    /// for input-address checks).
    pub level: u8,
    /// The input address of the faulting stage (for a stage-2 fault in a
    /// nested walk: the guest-physical address being translated).
    pub addr: u64,
    /// x86 #PF error code for first-stage faults (0 otherwise).
    pub error_code: u32,
    /// In a nested walk, a stage-2 fault hit while reading the stage-1 table
    /// at this level; `None` for the final translation or a single-stage walk.
    pub stage1_level: Option<u8>,
}

impl Fault {
    fn new<F: Format>(f: &F, kind: FaultKind, level: u8, addr: u64, access: Access) -> Self {
        Fault {
            kind,
            stage: F::STAGE,
            level,
            addr,
            error_code: f.error_code(kind, access),
            stage1_level: None,
        }
    }
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:?} stage fault {:?} at level {} for {:#x}",
            self.stage, self.kind, self.level, self.addr
        )?;
        if self.error_code != 0 {
            write!(f, " (error code {:#x})", self.error_code)?;
        }
        if let Some(l) = self.stage1_level {
            write!(f, " while reading the stage-1 table at level {l}")?;
        }
        Ok(())
    }
}

impl core::error::Error for Fault {}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Translation<A> {
    /// The output address (page base plus the input's offset in the page).
    pub addr: A,
    /// Size of the page that maps it.
    pub size: PageSize,
    /// Effective permissions of the walk.
    pub perms: Perms,
    /// The leaf entry as it is after this access (A/D set).
    pub leaf: u64,
}

impl<A: Address> Translation<A> {
    /// First address of the page.
    pub fn page_base(&self) -> A {
        A::from_raw(self.addr.raw() & !self.size.offset_mask())
    }
}

/// The entries a walk went through, top first.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Path {
    pub addr: [u64; 5],
    pub value: [u64; 5],
    pub len: usize,
    pub top: u8,
}

/// Reads entries for a walk. `Err(None)` means "no memory there" (a
/// [`FaultKind::TableRead`] of the walking stage); `Err(Some(f))` passes on a
/// fault of another stage (the nested walk's stage-2 faults).
pub(crate) trait EntryReader {
    fn read(&self, addr: u64, level: u8) -> Result<u64, Option<Fault>>;
    /// Compare-exchange; `Ok(Err(actual))` when the entry no longer holds `old`.
    fn update(&self, addr: u64, old: u64, new: u64, level: u8) -> Result<Result<(), u64>, Option<Fault>>;
}

/// Entries read straight from table memory.
pub(crate) struct Direct<'a, M>(pub &'a M);

impl<M: TableMemory> EntryReader for Direct<'_, M> {
    #[inline(always)]
    fn read(&self, addr: u64, _level: u8) -> Result<u64, Option<Fault>> {
        self.0.read_entry(M::Addr::from_raw(addr)).map_err(|_| None)
    }

    #[inline]
    fn update(&self, addr: u64, old: u64, new: u64, _level: u8) -> Result<Result<(), u64>, Option<Fault>> {
        match self.0.compare_exchange_entry(M::Addr::from_raw(addr), old, new) {
            Ok(r) => Ok(r.map(|_| ())),
            Err(_) => Err(None),
        }
    }
}

/// Sets the accessed/dirty flags an access needs on an entry read as `old`,
/// through `cas(expected, new)`. A concurrent change of only the flag bits
/// (another walker setting A, or the same entry met twice on one walk) is
/// folded in and retried; any other change returns `Ok(None)`: the walk must
/// start again. `Ok(Some(value))` is the entry as written.
pub(crate) fn update_accessed_dirty<F: Format, E>(
    f: &F,
    old: u64,
    leaf: bool,
    access: Access,
    mut cas: impl FnMut(u64, u64) -> Result<Result<(), u64>, E>,
) -> Result<Option<u64>, E> {
    let flags = f.preserved_bits();
    let mut current = old;
    for _ in 0..MAX_AD_RETRIES {
        let new = f.accessed_dirty(current, leaf, access);
        if new == current {
            return Ok(Some(current));
        }
        match cas(current, new)? {
            Ok(()) => return Ok(Some(new)),
            Err(actual) if actual & !flags == old & !flags => current = actual,
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// Where a walk starts: the root, or a table found in a paging-structure cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    pub table: u64,
    pub level: u8,
    pub and_bits: u64,
    pub or_bits: u64,
}

impl Start {
    pub(crate) fn root(plan: &WalkPlan, root: u64) -> Self {
        Start { table: root & !0xfff, level: plan.levels, and_bits: u64::MAX, or_bits: 0 }
    }
}

/// A [`Format`] compiled into the masks the walk loop tests: computed once,
/// so a walk does a handful of AND operations per level instead of
/// re-deriving the format's rules from its configuration.
///
/// Get one with [`Walker::prepare`]; [`Prepared`] walks with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkPlan {
    levels: u8,
    present: u64,
    large_bit: u64,
    /// Reserved bits of an entry without the large-page bit, by level.
    small: [u64; 8],
    /// Reserved bits of an entry with the large-page bit, by level (for
    /// levels without large pages this includes the large-page bit itself).
    large: [u64; 8],
    /// Flags a successful access sets in a non-leaf entry / a read leaf / a written leaf.
    ad_table: u64,
    ad_leaf_read: u64,
    ad_leaf_write: u64,
}

impl WalkPlan {
    /// Compiles `f`.
    pub fn new<F: Format>(f: &F) -> Self {
        let mut small = [0; 8];
        let mut large = [0; 8];
        for level in 1..=f.levels().min(7) {
            let l = usize::from(level);
            small[l] = f.reserved_bits(!F::LARGE_BIT, level);
            large[l] = if level == 1 { small[l] } else { f.reserved_bits(u64::MAX, level) };
        }
        WalkPlan {
            levels: f.levels(),
            present: F::PRESENT_BITS,
            large_bit: F::LARGE_BIT,
            small,
            large,
            ad_table: f.accessed_dirty(0, false, Access::read()),
            ad_leaf_read: f.accessed_dirty(0, true, Access::read()),
            ad_leaf_write: f.accessed_dirty(0, true, Access::write()),
        }
    }
}

/// The walk loop: present and reserved-bit checks from `start` to the leaf.
/// Returns the walk and whether any entry lacks a flag `access` would set.
/// With `RECORD`, also fills `path` with every entry read.
#[inline(always)]
fn walk_core<F: Format, R: EntryReader, const RECORD: bool>(
    f: &F,
    plan: &WalkPlan,
    r: &R,
    start: Start,
    input: u64,
    access: Access,
    path: &mut Path,
) -> Result<(Walked, bool), Fault> {
    // One copy of the loop per start level, so the compiler unrolls it with
    // constant shifts and a distinct (well-predicted) branch per level.
    match start.level {
        4 => walk_levels::<F, R, RECORD, 4>(f, plan, r, start, input, access, path),
        5 => walk_levels::<F, R, RECORD, 5>(f, plan, r, start, input, access, path),
        3 => walk_levels::<F, R, RECORD, 3>(f, plan, r, start, input, access, path),
        2 => walk_levels::<F, R, RECORD, 2>(f, plan, r, start, input, access, path),
        _ => walk_levels::<F, R, RECORD, 1>(f, plan, r, start, input, access, path),
    }
}

#[inline(always)]
fn walk_levels<F: Format, R: EntryReader, const RECORD: bool, const TOP: u8>(
    f: &F,
    plan: &WalkPlan,
    r: &R,
    start: Start,
    input: u64,
    access: Access,
    path: &mut Path,
) -> Result<(Walked, bool), Fault> {
    path.top = TOP;
    let mut table = start.table;
    let mut and_bits = start.and_bits;
    let mut or_bits = start.or_bits;
    let ad_leaf = if access.is_write() { plan.ad_leaf_write } else { plan.ad_leaf_read };
    let mut missing = 0;
    for level in (1..=TOP).rev() {
        let ea = table | (index(input, level) << 3);
        let e = match r.read(ea, level) {
            Ok(e) => e,
            Err(None) => return Err(Fault::new(f, FaultKind::TableRead, level, input, access)),
            Err(Some(fault)) => return Err(fault),
        };
        if e & plan.present == 0 {
            return Err(Fault::new(f, FaultKind::NotPresent, level, input, access));
        }
        let large = level > 1 && e & plan.large_bit != 0;
        let l = usize::from(level & 7);
        let reserved = if large { plan.large[l] } else { plan.small[l] };
        if e & reserved != 0 {
            return Err(Fault::new(f, FaultKind::Reserved, level, input, access));
        }
        and_bits &= e;
        or_bits |= e;
        if RECORD && let (Some(a), Some(v)) = (path.addr.get_mut(path.len), path.value.get_mut(path.len)) {
            *a = ea;
            *v = e;
            path.len += 1;
        }
        if level <= 1 || large {
            missing |= ad_leaf & !e;
            return Ok((Walked { leaf: e, level, and_bits, or_bits }, missing != 0));
        }
        missing |= plan.ad_table & !e;
        table = e & ADDR_MASK;
    }
    // Level 1 always ends the loop above.
    Err(Fault::new(f, FaultKind::Reserved, 0, input, access))
}

/// A full translation from `start`: walk, access check, A/D updates (with
/// restart on a race), recording the entries read in `path` (for
/// paging-structure caches and stage-2 leaf updates).
pub(crate) fn translate_path<F: Format, R: EntryReader>(
    f: &F,
    plan: &WalkPlan,
    r: &R,
    start: Start,
    input: u64,
    access: Access,
    path: &mut Path,
) -> Result<Walked, Fault> {
    f.check_input(input).map_err(|kind| Fault::new(f, kind, 0, input, access))?;
    'retry: for _ in 0..MAX_AD_RETRIES {
        path.len = 0;
        let (mut walked, _) = walk_core::<F, R, true>(f, plan, r, start, input, access, path)?;
        f.check_access(&walked, access).map_err(|kind| Fault::new(f, kind, walked.level, input, access))?;
        let mut level = path.top;
        for i in 0..path.len {
            let old = path.value[i];
            let leaf = i + 1 == path.len;
            let entry_level = level;
            level = level.saturating_sub(1);
            if f.accessed_dirty(old, leaf, access) == old {
                continue;
            }
            let addr = path.addr[i];
            match update_accessed_dirty(f, old, leaf, access, |cur, new| {
                r.update(addr, cur, new, entry_level)
            }) {
                Ok(Some(written)) => {
                    path.value[i] = written;
                    if leaf {
                        walked.leaf = written;
                    }
                }
                Ok(None) => continue 'retry,
                Err(None) => return Err(Fault::new(f, FaultKind::TableRead, entry_level, input, access)),
                Err(Some(fault)) => return Err(fault),
            }
        }
        return Ok(walked);
    }
    Err(Fault::new(f, FaultKind::Contended, 0, input, access))
}

/// A full translation when the caller needs no path: one walk without
/// bookkeeping when every flag the access sets is already set (the steady
/// state), else the recording walk with updates.
#[inline]
pub(crate) fn translate_walk<F: Format, R: EntryReader>(
    f: &F,
    plan: &WalkPlan,
    r: &R,
    start: Start,
    input: u64,
    access: Access,
) -> Result<Walked, Fault> {
    f.check_input(input).map_err(|kind| Fault::new(f, kind, 0, input, access))?;
    let mut unused = Path::default();
    let (walked, missing) = walk_core::<F, R, false>(f, plan, r, start, input, access, &mut unused)?;
    f.check_access(&walked, access).map_err(|kind| Fault::new(f, kind, walked.level, input, access))?;
    if !missing {
        return Ok(walked);
    }
    translate_path(f, plan, r, start, input, access, &mut unused)
}

/// A lookup: present and reserved-bit checks, no access check, no writes.
#[inline]
pub(crate) fn lookup_walk<F: Format, R: EntryReader>(
    f: &F,
    plan: &WalkPlan,
    r: &R,
    start: Start,
    input: u64,
) -> Result<Walked, Fault> {
    let access = Access::read();
    f.check_input(input).map_err(|kind| Fault::new(f, kind, 0, input, access))?;
    let mut unused = Path::default();
    walk_core::<F, R, false>(f, plan, r, start, input, access, &mut unused).map(|(walked, _)| walked)
}

/// Builds the translation of `input` from a completed walk.
#[inline(always)]
pub(crate) fn finish<F: Format, A: Address>(
    f: &F,
    walked: &Walked,
    input: u64,
    access: Access,
) -> Result<Translation<A>, Fault> {
    let Some(size) = PageSize::from_level(walked.level) else {
        return Err(Fault::new(f, FaultKind::Reserved, walked.level, input, access));
    };
    let span = entry_span(walked.level);
    let base = f.address(walked.leaf) & !(span - 1);
    Ok(Translation {
        addr: A::from_raw(base | (input & (span - 1))),
        size,
        perms: f.perms(walked),
        leaf: walked.leaf,
    })
}

/// Translation through a table of format `Self`, for every [`Format`].
///
/// ```
/// use memvisor_paging::{Access, Arena, Mapper, Walker, X86Attrs, X86Paging};
/// use memvisor_types::{AddrRange, Gva, Hpa, PageSize};
///
/// let arena = Arena::new(Hpa::new(0x10_0000), 64);
/// let mut mapper = Mapper::new(X86Paging::four_level(), &arena, arena.frame_allocator())?;
/// let va = AddrRange::from_len(Gva::new(0x40_0000), 0x20_0000)?;
/// mapper.map(va, Hpa::new(0x8000_0000), X86Attrs::user_rwx(), PageSize::Size2M)?;
///
/// let t = X86Paging::four_level().translate(&arena, mapper.root(), Gva::new(0x41_2345), Access::write().user())?;
/// assert_eq!(t.addr, Hpa::new(0x8001_2345));
/// assert_eq!(t.size, PageSize::Size2M);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Walker: Format {
    /// Translates `input` for `access` through the table at `root`: checks
    /// everything and sets accessed/dirty flags on success.
    ///
    /// Compiles the format on every call; for many walks with one format,
    /// [`prepare`](Self::prepare) once.
    fn translate<M: TableMemory, I: Address>(
        &self,
        mem: &M,
        root: M::Addr,
        input: I,
        access: Access,
    ) -> Result<Translation<M::Addr>, Fault> {
        self.prepare().translate(mem, root, input, access)
    }

    /// Looks up the mapping of `input` without checking access rights and
    /// without writing anything (a debugger's or a software TLB-fill view).
    /// Present and reserved-bit checks still apply.
    fn lookup<M: TableMemory, I: Address>(
        &self,
        mem: &M,
        root: M::Addr,
        input: I,
    ) -> Result<Translation<M::Addr>, Fault> {
        self.prepare().lookup(mem, root, input)
    }

    /// This format compiled for repeated walks.
    fn prepare(&self) -> Prepared<Self> {
        Prepared { format: *self, plan: WalkPlan::new(self) }
    }
}

/// A format with its compiled [`WalkPlan`]: the fast way to walk many
/// addresses with one configuration (from [`Walker::prepare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared<F: Format> {
    format: F,
    plan: WalkPlan,
}

impl<F: Format> Prepared<F> {
    /// The format.
    pub fn format(&self) -> &F {
        &self.format
    }

    /// The compiled plan.
    pub fn plan(&self) -> &WalkPlan {
        &self.plan
    }

    /// As [`Walker::translate`].
    #[inline]
    pub fn translate<M: TableMemory, I: Address>(
        &self,
        mem: &M,
        root: M::Addr,
        input: I,
        access: Access,
    ) -> Result<Translation<M::Addr>, Fault> {
        let (f, input) = (&self.format, input.raw());
        let start = Start::root(&self.plan, root.raw());
        let walked = translate_walk(f, &self.plan, &Direct(mem), start, input, access)?;
        finish(f, &walked, input, access)
    }

    /// As [`Walker::lookup`].
    #[inline]
    pub fn lookup<M: TableMemory, I: Address>(
        &self,
        mem: &M,
        root: M::Addr,
        input: I,
    ) -> Result<Translation<M::Addr>, Fault> {
        let (f, input) = (&self.format, input.raw());
        let start = Start::root(&self.plan, root.raw());
        let walked = lookup_walk(f, &self.plan, &Direct(mem), start, input)?;
        finish(f, &walked, input, Access::read())
    }
}

impl<F: Format> Walker for F {}
