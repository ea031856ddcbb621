//! The four sibling-synchronisation protocols.
//!
//! Every protocol shares the world: `siblings` hardware threads of one core;
//! sibling 0 runs VM A only, the others VM A or VM B (chosen each time they
//! start KVM work), so both "same VM" and "other VM" siblings occur. Each
//! thread's [`Place`] is what it is physically running, which is all the
//! leak check looks at. Threads choose freely among their enabled steps: a
//! guest may exit at any time (spontaneously, or because a stun/kick IPI
//! arrived), the kernel may need sensitive data after any exit, and a host
//! thread may start KVM work or go idle.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use super::explore::Protocol;

/// What a sibling is physically running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Place {
    /// Unrestricted kernel code that may touch sensitive data (the full
    /// address space; untagged under core scheduling).
    Host,
    /// The idle loop.
    Idle,
    /// KVM code for VM `v` that touches only what VM `v` may see (its
    /// restricted space under ASI; tagged `v` under core scheduling).
    Kernel(u8),
    /// VM `v`'s guest code.
    Guest(u8),
}

fn vm_name(v: u8) -> char {
    char::from(b'A'.saturating_add(v))
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Place::Host => f.write_str("host"),
            Place::Idle => f.write_str("idle"),
            Place::Kernel(v) => write!(f, "kvm({})", vm_name(v)),
            Place::Guest(v) => write!(f, "GUEST({})", vm_name(v)),
        }
    }
}

/// Why the places leak, if they do: a sibling runs a VM while another runs
/// unrestricted code, another VM's kernel code, or another VM.
fn sibling_leak(places: &[Place]) -> Option<String> {
    for (i, p) in places.iter().enumerate() {
        let Place::Guest(v) = *p else { continue };
        for (j, q) in places.iter().enumerate() {
            let bad = match *q {
                _ if i == j => false,
                Place::Host => true,
                Place::Kernel(w) | Place::Guest(w) => w != v,
                Place::Idle => false,
            };
            if bad {
                return Some(format!("sibling {i} runs VM {} while sibling {j} runs {q}", vm_name(v)));
            }
        }
    }
    None
}

/// The core being modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmtConfig {
    /// Hardware threads per core (2 on x86; up to 4).
    pub siblings: u8,
    /// VMs (1 or 2). Sibling 0 runs VM A only; the others any of them.
    pub vms: u8,
}

impl Default for SmtConfig {
    fn default() -> Self {
        Self { siblings: 2, vms: 2 }
    }
}

impl SmtConfig {
    fn n(&self) -> usize {
        usize::from(self.siblings.clamp(1, 4))
    }

    fn vms_of(&self, t: usize) -> Range<u8> {
        if t == 0 { 0..1 } else { 0..self.vms.clamp(1, 2) }
    }

    /// The first sibling `k >= from` other than `t`, or `n` when there is none.
    fn next_other(&self, t: usize, from: usize) -> usize {
        (from..self.n()).find(|&k| k != t).unwrap_or(self.n())
    }

    fn label(&self, name: &str) -> String {
        format!("{name}, {} siblings, {} VMs", self.n(), self.vms.clamp(1, 2))
    }
}

fn short_u(k: usize) -> u8 {
    u8::try_from(k).unwrap_or(u8::MAX)
}

// ---- ASI with synchronised siblings ----------------------------------------

/// What a sibling has announced about the space it runs in (or is about to
/// run in, when that is less safe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Announce {
    Full,
    Idle,
    Asi(u8),
}

impl Announce {
    fn compatible_with_guest(self, v: u8) -> bool {
        match self {
            Announce::Full => false,
            Announce::Idle => true,
            Announce::Asi(w) => w == v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum AsiPc {
    Host,
    AnnounceAsi(u8),
    AnnounceIdle,
    Idle,
    Restricted(u8),
    VmCheck(u8, u8),
    VmBackoff(u8),
    VmEnter(u8),
    InGuest(u8),
    VmExited(u8),
    ExitAnnounce,
    ExitWait(u8),
}

/// State of [`AsiSiblingSync`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AsiState {
    pc: Vec<AsiPc>,
    place: Vec<Place>,
    announce: Vec<Announce>,
    guest: Vec<Option<u8>>,
}

/// ASI with synchronised siblings, the protocol the seed asks for.
///
/// Shared per sibling: `announce` (the space it runs in: full, idle or a VM's
/// restricted space) and `guest` (the VM it is in or about to enter).
///
/// - **VM entry**: publish `guest = v`, then read every sibling's
///   `announce`; all compatible (idle, or `v`'s restricted space) → enter;
///   otherwise withdraw `guest` and retry later.
/// - **Exit to the full space** (fault, explicit exit, waking from idle):
///   announce `full` and send the stun IPI (which makes a sibling's guest
///   exit), then **wait until no sibling has `guest` set** — proof that it is
///   out of the VM, which IPI delivery alone is not — then switch.
/// - **Into a restricted space or idle** (becoming safer): switch first, then announce.
///
/// Publishing before checking on both sides (Dekker's pattern) means two
/// racing siblings cannot both miss each other.
#[derive(Debug, Clone, Copy, Default)]
pub struct AsiSiblingSync {
    config: SmtConfig,
    mutation: Mutation,
}

/// A deliberate bug in [`AsiSiblingSync`], to show the explorer catches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Mutation {
    #[default]
    None,
    /// VM entry checks the siblings first and publishes its intent after.
    CheckBeforePublish,
    /// Exit switches to the full space before waiting for the siblings.
    SwitchBeforeWait,
}

impl AsiSiblingSync {
    /// The protocol on the core `config`.
    pub fn new(config: SmtConfig) -> Self {
        Self { config, mutation: Mutation::None }
    }
}

impl Protocol for AsiSiblingSync {
    type State = AsiState;

    fn name(&self) -> String {
        let name = match self.mutation {
            Mutation::None => "asi-sibling-sync",
            Mutation::CheckBeforePublish => "asi-sibling-sync, mutated: check before publish",
            Mutation::SwitchBeforeWait => "asi-sibling-sync, mutated: switch before wait",
        };
        self.config.label(name)
    }

    fn threads(&self) -> usize {
        self.config.n()
    }

    fn initial(&self) -> AsiState {
        let n = self.config.n();
        AsiState {
            pc: Vec::from_iter((0..n).map(|_| AsiPc::Host)),
            place: Vec::from_iter((0..n).map(|_| Place::Host)),
            announce: Vec::from_iter((0..n).map(|_| Announce::Full)),
            guest: Vec::from_iter((0..n).map(|_| None)),
        }
    }

    fn steps(&self, s: &AsiState, t: usize, out: &mut Vec<(&'static str, AsiState)>) {
        let cfg = &self.config;
        let mutation = self.mutation;
        let mut go = |label: &'static str, f: &dyn Fn(&mut AsiState)| {
            let mut next = s.clone();
            f(&mut next);
            out.push((label, next));
        };
        match s.pc[t] {
            AsiPc::Host => {
                for v in cfg.vms_of(t) {
                    go("switch into ASI (CR3)", &|n| {
                        n.place[t] = Place::Kernel(v);
                        n.pc[t] = AsiPc::AnnounceAsi(v);
                    });
                }
                go("go idle", &|n| {
                    n.place[t] = Place::Idle;
                    n.pc[t] = AsiPc::AnnounceIdle;
                });
            }
            AsiPc::AnnounceAsi(v) => go("announce restricted", &|n| {
                n.announce[t] = Announce::Asi(v);
                n.pc[t] = AsiPc::Restricted(v);
            }),
            AsiPc::AnnounceIdle => go("announce idle", &|n| {
                n.announce[t] = Announce::Idle;
                n.pc[t] = AsiPc::Idle;
            }),
            AsiPc::Idle => go("wake up", &|n| n.pc[t] = AsiPc::ExitAnnounce),
            AsiPc::Restricted(v) => {
                let first = short_u(cfg.next_other(t, 0));
                if mutation == Mutation::CheckBeforePublish {
                    go("check siblings", &|n| n.pc[t] = AsiPc::VmCheck(v, first));
                } else {
                    go("publish guest intent", &|n| {
                        n.guest[t] = Some(v);
                        n.pc[t] = AsiPc::VmCheck(v, first);
                    });
                }
                go("need sensitive data: asi_exit", &|n| n.pc[t] = AsiPc::ExitAnnounce);
            }
            AsiPc::VmCheck(v, k) => {
                let k = usize::from(k);
                if k >= cfg.n() && mutation == Mutation::CheckBeforePublish {
                    go("all siblings compatible: publish guest intent", &|n| {
                        n.guest[t] = Some(v);
                        n.pc[t] = AsiPc::VmEnter(v);
                    });
                } else if k >= cfg.n() {
                    go("all siblings compatible", &|n| n.pc[t] = AsiPc::VmEnter(v));
                } else if s.announce[k].compatible_with_guest(v) {
                    let next = short_u(cfg.next_other(t, k + 1));
                    go("read sibling: compatible", &|n| n.pc[t] = AsiPc::VmCheck(v, next));
                } else {
                    go("read sibling: incompatible", &|n| n.pc[t] = AsiPc::VmBackoff(v));
                }
            }
            AsiPc::VmBackoff(v) => go("withdraw guest intent", &|n| {
                n.guest[t] = None;
                n.pc[t] = AsiPc::Restricted(v);
            }),
            AsiPc::VmEnter(v) => go("VM entry", &|n| {
                n.place[t] = Place::Guest(v);
                n.pc[t] = AsiPc::InGuest(v);
            }),
            AsiPc::InGuest(v) => go("VM exit", &|n| {
                n.place[t] = Place::Kernel(v);
                n.pc[t] = AsiPc::VmExited(v);
            }),
            AsiPc::VmExited(v) => go("clear guest", &|n| {
                n.guest[t] = None;
                n.pc[t] = AsiPc::Restricted(v);
            }),
            AsiPc::ExitAnnounce => {
                let first = short_u(cfg.next_other(t, 0));
                go("announce full + stun IPI", &|n| {
                    n.announce[t] = Announce::Full;
                    if mutation == Mutation::SwitchBeforeWait {
                        n.place[t] = Place::Host;
                    }
                    n.pc[t] = AsiPc::ExitWait(first);
                });
            }
            AsiPc::ExitWait(k) => {
                let k = usize::from(k);
                if k >= cfg.n() {
                    go("switch to full space (CR3)", &|n| {
                        n.place[t] = Place::Host;
                        n.pc[t] = AsiPc::Host;
                    });
                } else if s.guest[k].is_none() {
                    let next = short_u(cfg.next_other(t, k + 1));
                    go("read sibling: out of guest", &|n| n.pc[t] = AsiPc::ExitWait(next));
                }
                // Otherwise: spin until the sibling's guest has exited.
            }
        }
    }

    fn leak(&self, s: &AsiState) -> Option<String> {
        sibling_leak(&s.place)
    }

    fn describe(&self, s: &AsiState) -> String {
        let mut out = String::new();
        for t in 0..s.pc.len() {
            let guest = s.guest[t].map_or(String::from("-"), |v| String::from(vm_name(v)));
            let announce = match s.announce[t] {
                Announce::Full => String::from("full"),
                Announce::Idle => String::from("idle"),
                Announce::Asi(v) => format!("asi({})", vm_name(v)),
            };
            if t > 0 {
                out.push_str(" | ");
            }
            out.push_str(&format!("s{t} {} [announce {announce}, guest {guest}]", s.place[t]));
        }
        out
    }
}

// ---- naive IPI stun ----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum IpiPc {
    Host,
    Idle,
    Restricted(u8),
    KickWait(u8),
    VmEnter(u8),
    InGuest(u8),
    StunWait,
}

/// State of [`IpiStun`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpiState {
    pc: Vec<IpiPc>,
    place: Vec<Place>,
    ipi: Vec<bool>,
    ack: Vec<bool>,
}

/// Naive IPI-only stunning: before VM entry, and before going unrestricted,
/// a sibling sends an IPI to the others and waits until each has
/// acknowledged it — the acknowledgement being sent when the interrupt is
/// taken. Fine for user space (taking an interrupt means being in the
/// kernel), not for ASI: the interrupted sibling may be running unrestricted
/// kernel code, and nothing makes it enter ASI before the VM runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct IpiStun(SmtConfig);

impl IpiStun {
    /// The protocol on the core `config`.
    pub fn new(config: SmtConfig) -> Self {
        Self(config)
    }

    fn send(n: &mut IpiState, t: usize) {
        for k in 0..n.ipi.len() {
            if k != t {
                n.ipi[k] = true;
                n.ack[k] = false;
            }
        }
    }

    fn all_acked(s: &IpiState, t: usize) -> bool {
        s.ack.iter().enumerate().all(|(k, &a)| k == t || a)
    }
}

impl Protocol for IpiStun {
    type State = IpiState;

    fn name(&self) -> String {
        self.0.label("ipi-stun, naive")
    }

    fn threads(&self) -> usize {
        self.0.n()
    }

    fn initial(&self) -> IpiState {
        let n = self.0.n();
        IpiState {
            pc: Vec::from_iter((0..n).map(|_| IpiPc::Host)),
            place: Vec::from_iter((0..n).map(|_| Place::Host)),
            ipi: Vec::from_iter((0..n).map(|_| false)),
            ack: Vec::from_iter((0..n).map(|_| false)),
        }
    }

    fn steps(&self, s: &IpiState, t: usize, out: &mut Vec<(&'static str, IpiState)>) {
        let mut go = |label: &'static str, f: &dyn Fn(&mut IpiState)| {
            let mut next = s.clone();
            f(&mut next);
            out.push((label, next));
        };
        let interruptible = !matches!(s.pc[t], IpiPc::VmEnter(_));
        if s.ipi[t] && interruptible {
            go("take IPI: acknowledge", &|n| {
                n.ipi[t] = false;
                n.ack[t] = true;
                if let IpiPc::InGuest(v) = n.pc[t] {
                    n.place[t] = Place::Kernel(v);
                    n.pc[t] = IpiPc::Restricted(v);
                }
            });
        }
        match s.pc[t] {
            IpiPc::Host => {
                for v in self.0.vms_of(t) {
                    go("switch into ASI (CR3)", &|n| {
                        n.place[t] = Place::Kernel(v);
                        n.pc[t] = IpiPc::Restricted(v);
                    });
                }
                go("go idle", &|n| {
                    n.place[t] = Place::Idle;
                    n.pc[t] = IpiPc::Idle;
                });
            }
            IpiPc::Idle => go("wake up: stun IPI to siblings", &|n| {
                IpiStun::send(n, t);
                n.pc[t] = IpiPc::StunWait;
            }),
            IpiPc::Restricted(v) => {
                go("kick IPI to siblings before VM entry", &|n| {
                    IpiStun::send(n, t);
                    n.pc[t] = IpiPc::KickWait(v);
                });
                go("asi_exit: stun IPI to siblings", &|n| {
                    IpiStun::send(n, t);
                    n.pc[t] = IpiPc::StunWait;
                });
            }
            IpiPc::KickWait(v) if IpiStun::all_acked(s, t) => {
                go("IPIs acknowledged", &|n| n.pc[t] = IpiPc::VmEnter(v));
            }
            IpiPc::VmEnter(v) => go("VM entry", &|n| {
                n.place[t] = Place::Guest(v);
                n.pc[t] = IpiPc::InGuest(v);
            }),
            IpiPc::InGuest(v) => go("VM exit", &|n| {
                n.place[t] = Place::Kernel(v);
                n.pc[t] = IpiPc::Restricted(v);
            }),
            IpiPc::StunWait if IpiStun::all_acked(s, t) => {
                go("IPIs acknowledged: switch to full space", &|n| {
                    n.place[t] = Place::Host;
                    n.pc[t] = IpiPc::Host;
                })
            }
            IpiPc::KickWait(_) | IpiPc::StunWait => {}
        }
    }

    fn leak(&self, s: &IpiState) -> Option<String> {
        sibling_leak(&s.place)
    }

    fn describe(&self, s: &IpiState) -> String {
        let mut out = String::new();
        for t in 0..s.pc.len() {
            if t > 0 {
                out.push_str(" | ");
            }
            out.push_str(&format!(
                "s{t} {} [ipi {}, ack {}]",
                s.place[t],
                u8::from(s.ipi[t]),
                u8::from(s.ack[t])
            ));
        }
        out
    }
}

// ---- kernel core scheduling --------------------------------------------------

/// A thread's core-scheduling tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tag {
    Untagged,
    Idle,
    Vm(u8),
}

impl Tag {
    fn compatible_with_guest(self, v: u8) -> bool {
        match self {
            Tag::Untagged => false,
            Tag::Idle => true,
            Tag::Vm(w) => w == v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KcsPc {
    Host,
    TagLock(Tag),
    TagSet(Tag),
    Idle,
    Tagged(u8),
    EntryLock(u8),
    EntryCheck(u8, u8),
    EntryPublish(u8),
    VmEnter(u8),
    InGuest(u8),
    VmExited(u8),
    UntagLock,
    UntagSet,
    UntagWait(u8),
}

/// State of [`KcsCoreLock`] and [`KcsUnlocked`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KcsState {
    pc: Vec<KcsPc>,
    place: Vec<Place>,
    tag: Vec<Tag>,
    guest: Vec<Option<u8>>,
    lock: Option<u8>,
}

fn kcs_initial(n: usize) -> KcsState {
    KcsState {
        pc: Vec::from_iter((0..n).map(|_| KcsPc::Host)),
        place: Vec::from_iter((0..n).map(|_| Place::Host)),
        tag: Vec::from_iter((0..n).map(|_| Tag::Untagged)),
        guest: Vec::from_iter((0..n).map(|_| None)),
        lock: None,
    }
}

fn kcs_describe(s: &KcsState) -> String {
    let mut out = String::new();
    for t in 0..s.pc.len() {
        if t > 0 {
            out.push_str(" | ");
        }
        let tag = match s.tag[t] {
            Tag::Untagged => String::from("none"),
            Tag::Idle => String::from("idle"),
            Tag::Vm(v) => String::from(vm_name(v)),
        };
        let guest = s.guest[t].map_or(String::from("-"), |v| String::from(vm_name(v)));
        out.push_str(&format!("s{t} {} [tag {tag}, guest {guest}]", s.place[t]));
    }
    if let Some(holder) = s.lock {
        out.push_str(&format!(" | core lock: s{holder}"));
    }
    out
}

/// Kernel core scheduling (the seed's alternative to ASI): a thread is
/// tagged with its VM while it runs KVM code that touches no sensitive data
/// and untagged before it does; a VM is entered only beside same-tagged or
/// idle siblings.
///
/// Tags change, and VM entry is decided (check the siblings' tags, publish
/// `guest`), under a core-wide lock — as core scheduling updates a core's
/// cookies under its runqueue lock. Untagging then kicks the siblings out of
/// the guest and waits until none has `guest` set before running sensitive
/// code.
#[derive(Debug, Clone, Copy, Default)]
pub struct KcsCoreLock(SmtConfig);

impl KcsCoreLock {
    /// The protocol on the core `config`.
    pub fn new(config: SmtConfig) -> Self {
        Self(config)
    }
}

/// Kernel core scheduling without the core-wide lock: VM entry reads the
/// siblings' tags, then publishes `guest` — a check-then-act race with a
/// sibling that untags between the two and sees no guest yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct KcsUnlocked(SmtConfig);

impl KcsUnlocked {
    /// The protocol on the core `config`.
    pub fn new(config: SmtConfig) -> Self {
        Self(config)
    }
}

/// The steps both core-scheduling variants share; `locked` selects the variant.
fn kcs_steps(cfg: &SmtConfig, locked: bool, s: &KcsState, t: usize, out: &mut Vec<(&'static str, KcsState)>) {
    let me = short_u(t);
    let free = s.lock.is_none();
    let first_other = short_u(cfg.next_other(t, 0));
    let untag_step = if locked { KcsPc::UntagLock } else { KcsPc::UntagSet };
    let mut go = |label: &'static str, f: &dyn Fn(&mut KcsState)| {
        let mut next = s.clone();
        f(&mut next);
        out.push((label, next));
    };
    let acquire = |n: &mut KcsState| {
        if locked {
            n.lock = Some(me);
        }
    };
    let release = |n: &mut KcsState| {
        if locked {
            n.lock = None;
        }
    };
    match s.pc[t] {
        KcsPc::Host => {
            // Without the lock, the lock steps are skipped altogether.
            let tag_step = |tag| if locked { KcsPc::TagLock(tag) } else { KcsPc::TagSet(tag) };
            for v in cfg.vms_of(t) {
                go("run KVM code (no sensitive data)", &|n| {
                    n.place[t] = Place::Kernel(v);
                    n.pc[t] = tag_step(Tag::Vm(v));
                });
            }
            go("go idle", &|n| {
                n.place[t] = Place::Idle;
                n.pc[t] = tag_step(Tag::Idle);
            });
        }
        KcsPc::TagLock(tag) if free || !locked => go("take core lock", &|n| {
            acquire(n);
            n.pc[t] = KcsPc::TagSet(tag);
        }),
        KcsPc::TagSet(tag) => go(if locked { "set tag, release lock" } else { "set tag" }, &|n| {
            n.tag[t] = tag;
            release(n);
            n.pc[t] = match tag {
                Tag::Vm(v) => KcsPc::Tagged(v),
                Tag::Idle | Tag::Untagged => KcsPc::Idle,
            };
        }),
        KcsPc::Idle => go("wake up", &|n| n.pc[t] = untag_step),
        KcsPc::Tagged(v) => {
            let entry = if locked { KcsPc::EntryLock(v) } else { KcsPc::EntryCheck(v, first_other) };
            go("prepare VM entry", &|n| n.pc[t] = entry);
            go("need sensitive data: untag", &|n| n.pc[t] = untag_step);
        }
        KcsPc::EntryLock(v) if free || !locked => go("take core lock", &|n| {
            acquire(n);
            n.pc[t] = KcsPc::EntryCheck(v, first_other);
        }),
        KcsPc::EntryCheck(v, k) => {
            let k = usize::from(k);
            if k >= cfg.n() {
                go("siblings same-tagged", &|n| n.pc[t] = KcsPc::EntryPublish(v));
            } else if s.tag[k].compatible_with_guest(v) {
                let next = short_u(cfg.next_other(t, k + 1));
                go("read sibling tag: same", &|n| n.pc[t] = KcsPc::EntryCheck(v, next));
            } else {
                go(
                    if locked {
                        "read sibling tag: different, unlock"
                    } else {
                        "read sibling tag: different"
                    },
                    &|n| {
                        release(n);
                        n.pc[t] = KcsPc::Tagged(v);
                    },
                );
            }
        }
        KcsPc::EntryPublish(v) => {
            go(if locked { "publish guest, release lock" } else { "publish guest" }, &|n| {
                n.guest[t] = Some(v);
                release(n);
                n.pc[t] = KcsPc::VmEnter(v);
            })
        }
        KcsPc::VmEnter(v) => go("VM entry", &|n| {
            n.place[t] = Place::Guest(v);
            n.pc[t] = KcsPc::InGuest(v);
        }),
        KcsPc::InGuest(v) => go("VM exit", &|n| {
            n.place[t] = Place::Kernel(v);
            n.pc[t] = KcsPc::VmExited(v);
        }),
        KcsPc::VmExited(v) => go("clear guest", &|n| {
            n.guest[t] = None;
            n.pc[t] = KcsPc::Tagged(v);
        }),
        KcsPc::UntagLock if free || !locked => go("take core lock", &|n| {
            acquire(n);
            n.pc[t] = KcsPc::UntagSet;
        }),
        KcsPc::UntagSet => {
            go(if locked { "untag, release lock, kick IPI" } else { "untag, kick IPI" }, &|n| {
                n.tag[t] = Tag::Untagged;
                release(n);
                n.pc[t] = KcsPc::UntagWait(first_other);
            });
        }
        KcsPc::UntagWait(k) => {
            let k = usize::from(k);
            if k >= cfg.n() {
                go("run sensitive code", &|n| {
                    n.place[t] = Place::Host;
                    n.pc[t] = KcsPc::Host;
                });
            } else if s.guest[k].is_none() {
                let next = short_u(cfg.next_other(t, k + 1));
                go("read sibling: out of guest", &|n| n.pc[t] = KcsPc::UntagWait(next));
            }
        }
        KcsPc::TagLock(_) | KcsPc::EntryLock(_) | KcsPc::UntagLock => {}
    }
}

impl Protocol for KcsCoreLock {
    type State = KcsState;

    fn name(&self) -> String {
        self.0.label("kcs-core-lock")
    }

    fn threads(&self) -> usize {
        self.0.n()
    }

    fn initial(&self) -> KcsState {
        kcs_initial(self.0.n())
    }

    fn steps(&self, s: &KcsState, t: usize, out: &mut Vec<(&'static str, KcsState)>) {
        kcs_steps(&self.0, true, s, t, out);
    }

    fn leak(&self, s: &KcsState) -> Option<String> {
        sibling_leak(&s.place)
    }

    fn describe(&self, s: &KcsState) -> String {
        kcs_describe(s)
    }
}

impl Protocol for KcsUnlocked {
    type State = KcsState;

    fn name(&self) -> String {
        self.0.label("kcs-unlocked, naive")
    }

    fn threads(&self) -> usize {
        self.0.n()
    }

    fn initial(&self) -> KcsState {
        kcs_initial(self.0.n())
    }

    fn steps(&self, s: &KcsState, t: usize, out: &mut Vec<(&'static str, KcsState)>) {
        kcs_steps(&self.0, false, s, t, out);
    }

    fn leak(&self, s: &KcsState) -> Option<String> {
        sibling_leak(&s.place)
    }

    fn describe(&self, s: &KcsState) -> String {
        kcs_describe(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::explore;

    const LIMIT: usize = 2_000_000;

    #[test]
    fn guest_beside_host_code_is_a_leak() {
        let leak = sibling_leak(&[Place::Guest(0), Place::Host]);
        assert_eq!(leak.as_deref(), Some("sibling 0 runs VM A while sibling 1 runs host"));
    }

    #[test]
    fn guest_beside_same_vm_kernel_code_or_idle_is_no_leak() {
        assert_eq!(sibling_leak(&[Place::Guest(0), Place::Kernel(0), Place::Idle]), None);
        assert_eq!(sibling_leak(&[Place::Guest(1), Place::Guest(1)]), None);
    }

    #[test]
    fn guest_beside_another_vms_kernel_code_is_a_leak() {
        assert!(sibling_leak(&[Place::Kernel(1), Place::Guest(0)]).is_some());
    }

    #[test]
    fn asi_sibling_sync_never_leaks_and_never_deadlocks() {
        // Act
        let v = explore(&AsiSiblingSync::default(), LIMIT).unwrap();

        // Assert
        assert_eq!((v.leaks, v.deadlocks), (0, 0), "{}", v.summary());
        assert!(v.states > 100);
    }

    #[test]
    fn kcs_core_lock_never_leaks_and_never_deadlocks() {
        let v = explore(&KcsCoreLock::default(), LIMIT).unwrap();
        assert_eq!((v.leaks, v.deadlocks), (0, 0), "{}", v.summary());
    }

    #[test]
    fn naive_ipi_stun_leaks_because_an_acknowledged_sibling_still_runs_host_code() {
        // Act
        let v = explore(&IpiStun::default(), LIMIT).unwrap();

        // Assert
        assert!(v.leaks > 0);
        let trace = v.counterexample.as_ref().expect("a counterexample");
        std::println!("{}\n{trace}", v.summary());
        let actions: Vec<&str> = trace.steps.iter().map(|s| s.action).collect();
        assert_eq!(
            actions,
            [
                "switch into ASI (CR3)",
                "kick IPI to siblings before VM entry",
                "take IPI: acknowledge",
                "IPIs acknowledged",
                "VM entry"
            ]
        );
        assert!(trace.leak.ends_with("runs host"), "{}", trace.leak);
    }

    #[test]
    fn kcs_without_the_core_lock_leaks_through_a_check_then_act_race() {
        // Act
        let v = explore(&KcsUnlocked::default(), LIMIT).unwrap();

        // Assert
        assert!(v.leaks > 0);
        let trace = v.counterexample.as_ref().expect("a counterexample");
        std::println!("{}\n{trace}", v.summary());
        let entering = trace.steps.iter().find(|s| s.action == "VM entry").expect("a VM entry").thread;
        let untagger = 1 - entering;
        let order: Vec<(usize, &str)> = trace
            .steps
            .iter()
            .filter(|s| matches!(s.action, "siblings same-tagged" | "untag, kick IPI" | "publish guest"))
            .map(|s| (s.thread, s.action))
            .collect();
        assert_eq!(
            order,
            [(entering, "siblings same-tagged"), (untagger, "untag, kick IPI"), (entering, "publish guest"),]
        );
    }

    #[test]
    fn asi_sibling_sync_holds_with_three_siblings() {
        let cfg = SmtConfig { siblings: 3, vms: 2 };
        let v = explore(&AsiSiblingSync::new(cfg), LIMIT).unwrap();
        assert_eq!((v.leaks, v.deadlocks), (0, 0), "{}", v.summary());
    }

    #[test]
    fn asi_sibling_sync_checking_before_publishing_leaks() {
        // Arrange
        let mutated = AsiSiblingSync { config: SmtConfig::default(), mutation: Mutation::CheckBeforePublish };

        // Act
        let v = explore(&mutated, LIMIT).unwrap();

        // Assert
        assert!(v.leaks > 0, "{}", v.summary());
    }

    #[test]
    fn asi_sibling_sync_switching_before_waiting_leaks() {
        // Arrange
        let mutated = AsiSiblingSync { config: SmtConfig::default(), mutation: Mutation::SwitchBeforeWait };

        // Act
        let v = explore(&mutated, LIMIT).unwrap();

        // Assert
        assert!(v.leaks > 0, "{}", v.summary());
        let trace = v.counterexample.as_ref().expect("a counterexample");
        assert!(trace.leak.ends_with("runs host"), "{}", trace.leak);
    }
}
