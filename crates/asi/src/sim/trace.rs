//! Traces of VM exits: what each exit's handler touches, and the example
//! workloads (generated deterministically, with their assumptions).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::rng::SplitMix64;
use crate::{Error, Result};

/// The memory classes an exit handler touches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touches {
    /// Globally non-sensitive data (mapped in every restricted space).
    pub global: bool,
    /// The VM's own locally non-sensitive data (guest memory, vCPU state).
    pub local: bool,
    /// Sensitive data: forces an exit to the full space under ASI.
    pub sensitive: bool,
    /// Page-cache pages: sensitive (other tenants' files) unless the ASI
    /// implementation maps them ephemerally on access.
    pub page_cache: bool,
}

/// One VM exit: the guest run before it and the handling after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitEvent {
    /// Guest time (ns) from the previous VM entry to this exit.
    pub guest_ns: u64,
    /// Handler time (ns) from the exit to the next VM entry, with no mitigation.
    pub handler_ns: u64,
    /// What the handler touches.
    pub touches: Touches,
    /// The handler leaves the context (returns to the VMM in user space, or
    /// context-switches): an explicit ASI exit, whatever it touches.
    pub explicit_exit: bool,
    /// KVM's L1TF heuristic (`l1tf_flush_l1d`) marks this exit as possibly
    /// having touched sensitive data — it is set by every path that runs
    /// generic kernel code (interrupts, softirqs, scheduling, …), so it is
    /// coarser than what ASI's page tables observe. Kernel core scheduling
    /// untags, and flushes on entry, on such exits.
    pub l1tf_flagged: bool,
}

impl ExitEvent {
    /// Whether ASI must leave the restricted space for this exit (with
    /// `ephemeral_page_cache`, page-cache touches are mapped on demand instead).
    pub fn needs_full_space(&self, ephemeral_page_cache: bool) -> bool {
        self.explicit_exit || self.touches.sensitive || (self.touches.page_cache && !ephemeral_page_cache)
    }

    /// Whether kernel core scheduling must untag for this exit.
    pub fn untags(&self) -> bool {
        self.explicit_exit || self.touches.sensitive || self.touches.page_cache || self.l1tf_flagged
    }
}

/// A sequence of exits one vCPU (one sibling) goes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The exits, in order.
    pub events: Vec<ExitEvent>,
}

impl Trace {
    /// Parses the text format, one exit per line:
    ///
    /// ```text
    /// # guest_ns handler_ns classes flags
    /// 20000 1500 gl -
    /// 3000  6000 glp k
    /// 9000  2500 gs xk
    /// ```
    ///
    /// `classes`: any of `g` (global), `l` (local), `s` (sensitive), `p`
    /// (page cache), or `-`; `flags`: any of `x` (explicit exit), `k`
    /// (flagged by KVM's L1TF heuristic), or `-` (may be omitted). `#` starts
    /// a comment.
    pub fn parse(text: &str) -> Result<Trace> {
        let mut events = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| Error::Trace { line: n + 1, reason };
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !(3..=4).contains(&fields.len()) {
                return Err(bad(format!("expected 3 or 4 fields, found {}", fields.len())));
            }
            let number = |s: &str, what: &str| {
                s.parse::<u64>().map_err(|_| bad(format!("{what} {s:?} is not a number")))
            };
            let mut event = ExitEvent {
                guest_ns: number(fields[0], "guest_ns")?,
                handler_ns: number(fields[1], "handler_ns")?,
                ..ExitEvent::default()
            };
            for c in fields[2].chars().filter(|&c| c != '-') {
                match c {
                    'g' => event.touches.global = true,
                    'l' => event.touches.local = true,
                    's' => event.touches.sensitive = true,
                    'p' => event.touches.page_cache = true,
                    _ => return Err(bad(format!("unknown memory class {c:?}"))),
                }
            }
            for c in fields.get(3).copied().unwrap_or("-").chars().filter(|&c| c != '-') {
                match c {
                    'x' => event.explicit_exit = true,
                    'k' => event.l1tf_flagged = true,
                    _ => return Err(bad(format!("unknown flag {c:?}"))),
                }
            }
            events.push(event);
        }
        if events.is_empty() {
            return Err(Error::Trace { line: 0, reason: String::from("no exits") });
        }
        Ok(Trace { events })
    }

    /// Total guest time (ns).
    pub fn guest_ns(&self) -> u64 {
        self.events.iter().map(|e| e.guest_ns).sum()
    }

    /// Total handler time (ns).
    pub fn handler_ns(&self) -> u64 {
        self.events.iter().map(|e| e.handler_ns).sum()
    }

    /// The same exits starting at `offset` (wrapping): a second sibling's view
    /// of the workload that is not in lock-step with the first.
    pub fn rotated(&self, offset: usize) -> Trace {
        let mut events = self.events.clone();
        if !events.is_empty() {
            let len = events.len();
            events.rotate_left(offset % len);
        }
        Trace { events }
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# guest_ns handler_ns classes flags")?;
        for e in &self.events {
            let mut classes = String::new();
            for (on, c) in [
                (e.touches.global, 'g'),
                (e.touches.local, 'l'),
                (e.touches.sensitive, 's'),
                (e.touches.page_cache, 'p'),
            ] {
                if on {
                    classes.push(c);
                }
            }
            let mut flags = String::new();
            for (on, c) in [(e.explicit_exit, 'x'), (e.l1tf_flagged, 'k')] {
                if on {
                    flags.push(c);
                }
            }
            let dash = |s: String| if s.is_empty() { String::from("-") } else { s };
            writeln!(f, "{} {} {} {}", e.guest_ns, e.handler_ns, dash(classes), dash(flags))?;
        }
        Ok(())
    }
}

/// The shape of an example workload: means and per-mille rates from which
/// [`Workload::generate`] draws exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadShape {
    /// Mean guest time between exits (ns; each drawn uniformly in ±50 %).
    pub guest_ns: u64,
    /// Mean handler time (ns; ±50 %).
    pub handler_ns: u64,
    /// Exits whose handler touches sensitive data (‰).
    pub sensitive_per_mille: u64,
    /// Exits whose handler reads the page cache (‰).
    pub page_cache_per_mille: u64,
    /// Exits that return to the VMM or context-switch (‰).
    pub explicit_per_mille: u64,
    /// Exits KVM's L1TF heuristic flags, among the others (‰).
    pub l1tf_per_mille: u64,
}

/// An example workload: its name, what it stands for, and its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Short name.
    pub name: &'static str,
    /// What the trace stands for and the assumptions behind its shape.
    pub assumptions: &'static str,
    /// The distribution exits are drawn from.
    pub shape: WorkloadShape,
}

impl Workload {
    /// An exit-heavy VM whose exits stay restricted (a Redis-like server, or
    /// the common case Google reports): frequent exits touching only global
    /// and the VM's own data.
    pub const COMPUTE: Workload = Workload {
        name: "compute",
        assumptions: "exit every ~20 µs, ~1.5 µs handlers touching global + own data; 1% touch sensitive data, \
                      0.5% return to the VMM; KVM's L1TF heuristic flags 30% (interrupt-related exits)",
        shape: WorkloadShape {
            guest_ns: 20_000,
            handler_ns: 1_500,
            sensitive_per_mille: 10,
            page_cache_per_mille: 0,
            explicit_per_mille: 5,
            l1tf_per_mille: 300,
        },
    };

    /// A kernel build in the guest: longer guest runs; the exits that leave
    /// ASI are page zeroing, copy-on-write and context switches, as the
    /// 2025 ASI figures report.
    pub const KERNEL_BUILD: Workload = Workload {
        name: "kernel-build",
        assumptions: "exit every ~40 µs, ~3 µs handlers; 6% touch sensitive data (page zeroing, CoW), \
                      2% context-switch; L1TF heuristic flags 50%",
        shape: WorkloadShape {
            guest_ns: 40_000,
            handler_ns: 3_000,
            sensitive_per_mille: 60,
            page_cache_per_mille: 0,
            explicit_per_mille: 20,
            l1tf_per_mille: 500,
        },
    };

    /// fio 4k random reads served from the host page cache: short guest runs,
    /// long handlers, nearly every one reading the page cache (unmapped from
    /// restricted spaces, as in RFC v2).
    pub const FIO_RANDREAD: Workload = Workload {
        name: "fio-4k-randread",
        assumptions: "exit every ~3 µs of guest time, ~6 µs handlers; 90% read the page cache, 3% touch other \
                      sensitive data, 1% return to the VMM; L1TF heuristic flags every exit",
        shape: WorkloadShape {
            guest_ns: 3_000,
            handler_ns: 6_000,
            sensitive_per_mille: 30,
            page_cache_per_mille: 900,
            explicit_per_mille: 10,
            l1tf_per_mille: 1000,
        },
    };

    /// The example workloads, in table order.
    pub const ALL: [Workload; 3] = [Workload::COMPUTE, Workload::KERNEL_BUILD, Workload::FIO_RANDREAD];

    /// `exits` exits drawn from the shape with `seed`. Every exit touches
    /// global data; the VM's own data unless it only touches sensitive data.
    pub fn generate(&self, seed: u64, exits: usize) -> Trace {
        let s = self.shape;
        let mut rng = SplitMix64::new(seed);
        let events = (0..exits)
            .map(|_| {
                let sensitive = rng.chance(s.sensitive_per_mille);
                let page_cache = rng.chance(s.page_cache_per_mille);
                let explicit_exit = rng.chance(s.explicit_per_mille);
                let l1tf_flagged = rng.chance(s.l1tf_per_mille);
                ExitEvent {
                    guest_ns: rng.around(s.guest_ns),
                    handler_ns: rng.around(s.handler_ns),
                    touches: Touches { global: true, local: true, sensitive, page_cache },
                    explicit_exit,
                    l1tf_flagged,
                }
            })
            .collect();
        Trace { events }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_classes_flags_and_skips_comments() {
        // Arrange
        let text = "# header\n20000 1500 gl\n\n3000 6000 glp k # page cache\n9000 2500 s xk\n";

        // Act
        let t = Trace::parse(text).unwrap();

        // Assert
        assert_eq!(t.events.len(), 3);
        assert_eq!(t.events[0].touches, Touches { global: true, local: true, ..Touches::default() });
        assert!(t.events[1].touches.page_cache && t.events[1].l1tf_flagged && !t.events[1].explicit_exit);
        assert!(t.events[2].explicit_exit && t.events[2].touches.sensitive);
        assert_eq!(t.guest_ns(), 32_000);
    }

    #[test]
    fn parse_reports_the_line_of_a_bad_field() {
        let r = Trace::parse("1 2 g\n1 two g\n");
        assert_eq!(
            r,
            Err(Error::Trace { line: 2, reason: String::from("handler_ns \"two\" is not a number") })
        );
        assert!(matches!(Trace::parse("1 2 q"), Err(Error::Trace { line: 1, .. })));
        assert!(matches!(Trace::parse("# nothing\n"), Err(Error::Trace { line: 0, .. })));
    }

    #[test]
    fn display_round_trips_through_parse() {
        let t = Workload::FIO_RANDREAD.generate(7, 50);
        assert_eq!(Trace::parse(&alloc::format!("{t}")).unwrap(), t);
    }

    #[test]
    fn generation_is_deterministic_per_seed() {
        assert_eq!(Workload::COMPUTE.generate(1, 100), Workload::COMPUTE.generate(1, 100));
        assert_ne!(Workload::COMPUTE.generate(1, 100), Workload::COMPUTE.generate(2, 100));
    }
}
