//! The cost model and the two-sibling discrete-event replay.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::trace::{ExitEvent, Trace, Workload};

/// The cost of each mitigation step, in nanoseconds.
///
/// The defaults are order-of-magnitude assumptions for a current x86 server
/// (a few thousand cycles for an L1D flush including the refill it causes,
/// ~100 ns for `VERW`, microseconds for IPI round trips and IBPB), not
/// measurements; every figure the simulator prints follows from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costs {
    /// L1D flush, including refilling what the handler and guest then miss.
    pub l1d_flush_ns: u64,
    /// CPU buffer clear (`VERW`).
    pub buffer_clear_ns: u64,
    /// Sending a stun or kick IPI.
    pub ipi_ns: u64,
    /// What a sibling kicked out of its guest pays: interrupt delivery, VM
    /// exit, handling, VM entry.
    pub kick_ns: u64,
    /// An address-space switch with PCIDs (no TLB flush).
    pub asi_switch_ns: u64,
    /// The page fault on an unmapped address that triggers an ASI exit.
    pub fault_exit_ns: u64,
    /// Barriers on ASI exit (IBPB and RSB stuffing, as RFC v2 did).
    pub exit_barrier_ns: u64,
    /// Mapping and unmapping a page-cache page in the restricted space on access.
    pub ephemeral_map_ns: u64,
    /// Strict core scheduling's cross-sibling handshake per VM entry.
    pub rendezvous_ns: u64,
    /// Updating a core-scheduling tag.
    pub tag_ns: u64,
}

impl Default for Costs {
    fn default() -> Self {
        Self {
            l1d_flush_ns: 1_000,
            buffer_clear_ns: 100,
            ipi_ns: 500,
            kick_ns: 1_500,
            asi_switch_ns: 100,
            fault_exit_ns: 400,
            exit_barrier_ns: 2_500,
            ephemeral_map_ns: 250,
            rendezvous_ns: 3_000,
            tag_ns: 20,
        }
    }
}

impl fmt::Display for Costs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "L1D flush {} ns, buffer clear {} ns, IPI {} ns, kicked sibling {} ns, ASI switch {} ns, \
             fault exit {} ns, exit barrier {} ns, ephemeral map {} ns, rendezvous {} ns, tag {} ns",
            self.l1d_flush_ns,
            self.buffer_clear_ns,
            self.ipi_ns,
            self.kick_ns,
            self.asi_switch_ns,
            self.fault_exit_ns,
            self.exit_barrier_ns,
            self.ephemeral_map_ns,
            self.rendezvous_ns,
            self.tag_ns
        )
    }
}

/// A mitigation strategy (see the [module table](crate::sim)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// No mitigation: the baseline.
    None,
    /// Stun on every exit, L1D flush and buffer clear on every entry.
    AlwaysFlush,
    /// ASI: mitigations only after an exit to the full space.
    Asi,
    /// ASI with page-cache pages mapped ephemerally on access.
    AsiEphemeral,
    /// Strict kernel core scheduling.
    CoreScheduling,
    /// ASI with core-scheduling tags as its sibling synchronisation.
    AsiCoreScheduling,
}

impl Strategy {
    /// The strategies compared in the table.
    pub const COMPARED: [Strategy; 5] = [
        Strategy::AlwaysFlush,
        Strategy::Asi,
        Strategy::AsiEphemeral,
        Strategy::CoreScheduling,
        Strategy::AsiCoreScheduling,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::AlwaysFlush => "always-flush",
            Strategy::Asi => "asi",
            Strategy::AsiEphemeral => "asi+ephemeral-pagecache",
            Strategy::CoreScheduling => "core-sched (strict)",
            Strategy::AsiCoreScheduling => "asi+core-sched",
        }
    }

    /// What the kicked sibling pays on top of the wait.
    fn kick_cost(self, c: &Costs) -> u64 {
        match self {
            Strategy::None => 0,
            // Every entry flushes, including the re-entry after the kick.
            Strategy::AlwaysFlush => c.kick_ns + c.l1d_flush_ns + c.buffer_clear_ns,
            // The IPI is handled in the restricted space; re-entry needs no switch.
            Strategy::Asi | Strategy::AsiEphemeral | Strategy::AsiCoreScheduling => c.kick_ns,
            // Re-entry is another rendezvous, and the interrupt exit sets the L1TF flag.
            Strategy::CoreScheduling => c.kick_ns + c.rendezvous_ns + c.l1d_flush_ns + c.buffer_clear_ns,
        }
    }
}

/// What handling one exit costs under a strategy.
#[derive(Debug, Clone, Copy, Default)]
struct Plan {
    /// Time before the unsafe window opens.
    pre: u64,
    /// The unsafe window (0: none): the sibling must stay out of the guest.
    window: u64,
    /// Mitigation work included in `pre + window`.
    mitigation: u64,
    to_full: bool,
    flush: bool,
    ipi: bool,
}

fn plan(strategy: Strategy, e: &ExitEvent, c: &Costs, other_in_guest: bool) -> Plan {
    let h = e.handler_ns;
    let flush = c.l1d_flush_ns + c.buffer_clear_ns;
    match strategy {
        Strategy::None => Plan { pre: h, ..Plan::default() },
        Strategy::AlwaysFlush => Plan {
            pre: 0,
            window: c.ipi_ns + h + flush,
            mitigation: c.ipi_ns + flush,
            to_full: true,
            flush: true,
            ipi: true,
        },
        Strategy::Asi | Strategy::AsiEphemeral | Strategy::AsiCoreScheduling => {
            let ephemeral = strategy == Strategy::AsiEphemeral;
            if !e.needs_full_space(ephemeral) {
                let extra = if ephemeral && e.touches.page_cache { c.ephemeral_map_ns } else { 0 };
                return Plan { pre: h + extra, mitigation: extra, ..Plan::default() };
            }
            // The handler runs restricted until its first access to unmapped
            // memory (assumed at its start); an explicit exit needs no fault.
            let pre = if e.explicit_exit { 0 } else { c.fault_exit_ns };
            let ipi = strategy != Strategy::AsiCoreScheduling || other_in_guest;
            let sync = if ipi { c.ipi_ns } else { c.tag_ns };
            let switches = 2 * c.asi_switch_ns;
            Plan {
                pre,
                window: sync + switches + c.exit_barrier_ns + h + flush,
                mitigation: pre + sync + switches + c.exit_barrier_ns + flush,
                to_full: true,
                flush: true,
                ipi,
            }
        }
        Strategy::CoreScheduling => {
            let untag = e.untags();
            let flush = if untag { flush } else { 0 };
            let ipi = if other_in_guest { c.ipi_ns } else { 0 };
            Plan {
                pre: 0,
                window: ipi + c.tag_ns + h + flush + c.rendezvous_ns,
                mitigation: ipi + c.tag_ns + flush + c.rendezvous_ns,
                to_full: untag,
                flush: untag,
                ipi: other_in_guest,
            }
        }
    }
}

/// The outcome of replaying two siblings' traces under one strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimResult {
    /// The strategy.
    pub strategy: Strategy,
    /// VM exits replayed (both siblings).
    pub exits: u64,
    /// Handlers that ran in the full space (untagged, for core scheduling).
    pub exits_to_full: u64,
    /// L1D flushes performed (including re-entries after a kick).
    pub flushes: u64,
    /// VM entries that skipped the flush always-flush would do.
    pub flushes_avoided: u64,
    /// Stun or kick IPIs sent.
    pub ipis: u64,
    /// Times a sibling was forced out of its guest.
    pub kicks: u64,
    /// Time siblings spent kicked out or waiting to enter (ns).
    pub stall_ns: u64,
    /// Time spent on mitigation work (ns).
    pub mitigation_ns: u64,
    /// Elapsed time until both siblings finished (ns).
    pub elapsed_ns: u64,
    /// The same with no mitigation (ns).
    pub baseline_ns: u64,
}

impl SimResult {
    /// Extra elapsed time against the baseline, in percent.
    pub fn overhead_percent(&self) -> f64 {
        if self.baseline_ns == 0 {
            return 0.0;
        }
        (self.elapsed_ns as f64 / self.baseline_ns as f64 - 1.0) * 100.0
    }

    /// Throughput against the baseline, in percent (negative: slower), the
    /// unit of the published fio figures.
    pub fn throughput_change_percent(&self) -> f64 {
        if self.elapsed_ns == 0 {
            return 0.0;
        }
        (self.baseline_ns as f64 / self.elapsed_ns as f64 - 1.0) * 100.0
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Guest { start: u64, end: u64 },
    Ready,
    Done,
}

#[derive(Debug)]
struct Sibling<'a> {
    events: &'a [ExitEvent],
    next: usize,
    phase: Phase,
    /// Time of this sibling's next action.
    t: u64,
    /// Its unsafe windows so far, in time order.
    windows: Vec<(u64, u64)>,
}

impl<'a> Sibling<'a> {
    fn new(trace: &'a Trace) -> Self {
        let mut s = Self { events: &trace.events, next: 0, phase: Phase::Done, t: 0, windows: Vec::new() };
        if let Some(e) = s.events.first() {
            s.phase = Phase::Guest { start: 0, end: e.guest_ns };
            s.t = e.guest_ns;
        }
        s
    }

    fn in_guest_at(&self, t: u64) -> bool {
        matches!(self.phase, Phase::Guest { start, end } if start <= t && t < end)
    }
}

/// Replays `traces` (one per sibling of a core) under `strategy`.
pub fn simulate(traces: [&Trace; 2], strategy: Strategy, costs: &Costs) -> SimResult {
    let baseline_ns = replay(traces, Strategy::None, costs).elapsed_ns;
    let mut r = replay(traces, strategy, costs);
    r.baseline_ns = baseline_ns;
    r
}

fn replay(traces: [&Trace; 2], strategy: Strategy, costs: &Costs) -> SimResult {
    let mut r = SimResult {
        strategy,
        exits: 0,
        exits_to_full: 0,
        flushes: 0,
        flushes_avoided: 0,
        ipis: 0,
        kicks: 0,
        stall_ns: 0,
        mitigation_ns: 0,
        elapsed_ns: 0,
        baseline_ns: 0,
    };
    let kick_cost = strategy.kick_cost(costs);
    let kick_flushes = matches!(strategy, Strategy::AlwaysFlush | Strategy::CoreScheduling);
    let mut sibs = traces.map(Sibling::new);
    loop {
        let active = (0..2).filter(|&i| !matches!(sibs[i].phase, Phase::Done));
        let Some(i) = active.min_by_key(|&i| (sibs[i].t, i)) else { break };
        let j = 1 - i;
        let t = sibs[i].t;
        match sibs[i].phase {
            Phase::Guest { .. } => {
                let Some(e) = sibs[i].events.get(sibs[i].next) else {
                    sibs[i].phase = Phase::Done;
                    continue;
                };
                let p = plan(strategy, e, costs, sibs[j].in_guest_at(t));
                r.exits += 1;
                r.exits_to_full += u64::from(p.to_full);
                r.flushes += u64::from(p.flush);
                r.ipis += u64::from(p.ipi);
                r.mitigation_ns += p.mitigation;
                if p.window > 0 {
                    let (ws, we) = (t + p.pre, t + p.pre + p.window);
                    sibs[i].windows.push((ws, we));
                    let other = &mut sibs[j];
                    if let Phase::Guest { start, end } = other.phase
                        && start <= ws
                        && ws < end
                    {
                        let end = end + (we - ws) + kick_cost;
                        other.phase = Phase::Guest { start, end };
                        other.t = end;
                        r.kicks += 1;
                        r.stall_ns += (we - ws) + kick_cost;
                        r.flushes += u64::from(kick_flushes);
                    }
                }
                sibs[i].t = t + p.pre + p.window;
                sibs[i].phase = Phase::Ready;
                sibs[i].next += 1;
            }
            Phase::Ready => {
                // Wait for an unsafe window of the sibling that covers now.
                let blocking =
                    sibs[j].windows.iter().rev().take_while(|w| w.1 > t).find(|w| w.0 <= t).copied();
                if let Some((_, we)) = blocking {
                    r.stall_ns += we - t;
                    sibs[i].t = we;
                    continue;
                }
                let Some(e) = sibs[i].events.get(sibs[i].next) else {
                    sibs[i].phase = Phase::Done;
                    continue;
                };
                let mut end = t + e.guest_ns;
                // Windows the sibling already scheduled to open during this run kick it.
                let upcoming: Vec<(u64, u64)> =
                    sibs[j].windows.iter().filter(|w| w.0 >= t).copied().collect();
                for (ws, we) in upcoming {
                    if ws < end {
                        end += (we - ws) + kick_cost;
                        r.kicks += 1;
                        r.stall_ns += (we - ws) + kick_cost;
                        r.flushes += u64::from(kick_flushes);
                    }
                }
                sibs[i].phase = Phase::Guest { start: t, end };
                sibs[i].t = end;
            }
            Phase::Done => {}
        }
    }
    r.elapsed_ns = sibs.iter().map(|s| s.t).max().unwrap_or(0);
    r.flushes_avoided = (r.exits + r.kicks).saturating_sub(r.flushes);
    r
}

/// One workload's results, strategy by strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadResult {
    /// The workload.
    pub workload: Workload,
    /// One result per strategy of [`Strategy::COMPARED`], in that order.
    pub results: Vec<SimResult>,
}

impl WorkloadResult {
    /// The result of `strategy`.
    pub fn get(&self, strategy: Strategy) -> Option<&SimResult> {
        self.results.iter().find(|r| r.strategy == strategy)
    }
}

/// Replays each workload (`exits` exits per sibling, the two siblings drawn
/// with different seeds) under every compared strategy.
pub fn simulate_workloads(workloads: &[Workload], exits: usize, costs: &Costs) -> Vec<WorkloadResult> {
    workloads
        .iter()
        .enumerate()
        .map(|(n, w)| {
            let seed = 0x6173_6900 + n as u64 * 2;
            let a = w.generate(seed, exits);
            let b = w.generate(seed + 1, exits);
            let results = Strategy::COMPARED.iter().map(|&s| simulate([&a, &b], s, costs)).collect();
            WorkloadResult { workload: *w, results }
        })
        .collect()
}

/// The comparison table (Markdown).
pub fn format_table(results: &[WorkloadResult]) -> String {
    let header = [
        "workload",
        "strategy",
        "exits",
        "to full space",
        "L1D flushes",
        "flushes avoided",
        "IPIs",
        "sibling kicks",
        "stall ms",
        "overhead",
        "throughput",
    ];
    let mut rows: Vec<[String; 11]> = Vec::new();
    for w in results {
        for r in &w.results {
            rows.push([
                String::from(w.workload.name),
                String::from(r.strategy.name()),
                format!("{}", r.exits),
                format!("{}", r.exits_to_full),
                format!("{}", r.flushes),
                format!("{}", r.flushes_avoided),
                format!("{}", r.ipis),
                format!("{}", r.kicks),
                format!("{:.2}", r.stall_ns as f64 / 1e6),
                format!("{:+.1}%", r.overhead_percent()),
                format!("{:+.1}%", r.throughput_change_percent()),
            ]);
        }
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
        let padded: Vec<String> = cells.zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(&format!("| {} |\n", padded.join(" | ")));
    };
    line(&mut header.iter().copied(), &mut out);
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
    for row in &rows {
        line(&mut row.iter().map(String::as_str), &mut out);
    }
    out
}

/// A published figure's direction and whether the model reproduces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direction {
    /// The published claim (from `reference/asi.md` or the seed).
    pub claim: &'static str,
    /// What the model shows.
    pub model: String,
    /// Whether the model goes the same way.
    pub holds: bool,
}

/// Checks the results of [`simulate_workloads`] over [`Workload::ALL`]
/// against the directions of the published figures.
pub fn directions(results: &[WorkloadResult]) -> Vec<Direction> {
    let find = |name: &str, s: Strategy| {
        results
            .iter()
            .find(|w| w.workload.name == name)
            .and_then(|w| w.get(s))
            .map(SimResult::overhead_percent)
    };
    let tput = |name: &str, s: Strategy| {
        results
            .iter()
            .find(|w| w.workload.name == name)
            .and_then(|w| w.get(s))
            .map(SimResult::throughput_change_percent)
    };
    let mut out = Vec::new();
    let (compute, kbuild, fio) =
        (Workload::COMPUTE.name, Workload::KERNEL_BUILD.name, Workload::FIO_RANDREAD.name);
    if let (Some(asi), Some(flush)) = (find(compute, Strategy::Asi), find(compute, Strategy::AlwaysFlush)) {
        out.push(Direction {
            claim: "exits that stay restricted: ASI < 5% overhead (Google: < 5% end to end, < 1% common), \
                    far below mitigating every exit (linuxasi.dev: mitigations ~5% CPU, ASI almost always < 1%)",
            model: format!("{compute}: asi {asi:+.1}%, always-flush {flush:+.1}%"),
            holds: asi < 5.0 && asi * 5.0 < flush,
        });
    }
    if let (Some(c), Some(f), Some(ft)) =
        (find(compute, Strategy::Asi), find(fio, Strategy::Asi), tput(fio, Strategy::Asi))
    {
        out.push(Direction {
            claim: "page-cache-heavy fio is far worse than a compute workload under ASI (RFC v2: fio 4k randread -70%)",
            model: format!("asi: {compute} {c:+.1}%, {fio} {f:+.1}% (throughput {ft:+.1}%)"),
            holds: f > 10.0 * c && ft < -30.0,
        });
    }
    if let (Some(f), Some(e), Some(c)) =
        (find(fio, Strategy::Asi), find(fio, Strategy::AsiEphemeral), find(compute, Strategy::Asi))
    {
        out.push(Direction {
            claim: "ephemeral page-cache mappings recover most of fio's loss (Aug 2025: -70% -> -13.1%)",
            model: format!("{fio}: asi {f:+.1}%, asi+ephemeral {e:+.1}%"),
            holds: e * 3.0 < f && e > c,
        });
    }
    if let (Some(c), Some(k), Some(f)) =
        (find(compute, Strategy::Asi), find(kbuild, Strategy::Asi), find(fio, Strategy::Asi))
    {
        out.push(Direction {
            claim: "a kernel build lies in between (+5.8% in a guest; exits: context switch, page zeroing, CoW)",
            model: format!("asi: {compute} {c:+.1}% < {kbuild} {k:+.1}% < {fio} {f:+.1}%"),
            holds: c < k && k < f,
        });
    }
    if let (Some(kcs), Some(asi)) = (find(compute, Strategy::CoreScheduling), find(compute, Strategy::Asi)) {
        out.push(Direction {
            claim: "strict kernel core scheduling performs \"abyssally\" (seed)",
            model: format!("{compute}: core-sched {kcs:+.1}% vs asi {asi:+.1}%"),
            holds: kcs > 20.0 && kcs > 10.0 * asi,
        });
    }
    let mut composable = true;
    let mut detail = String::new();
    for w in results {
        if let (Some(a), Some(b)) = (w.get(Strategy::Asi), w.get(Strategy::AsiCoreScheduling)) {
            let (a, b) = (a.overhead_percent(), b.overhead_percent());
            composable &= b <= a + (a.abs() * 0.2).max(1.0);
            detail.push_str(&format!("{}: asi {a:+.1}% / asi+core-sched {b:+.1}%; ", w.workload.name));
        }
    }
    out.push(Direction {
        claim: "core scheduling composes with ASI at no extra cost (seed: \"it doesn't preclude to later do ASI\")",
        model: String::from(detail.trim_end_matches("; ")),
        holds: composable,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Touches;

    fn trace(events: &[(u64, u64, bool)]) -> Trace {
        Trace {
            events: events
                .iter()
                .map(|&(g, h, sensitive)| ExitEvent {
                    guest_ns: g,
                    handler_ns: h,
                    touches: Touches { global: true, local: true, sensitive, page_cache: false },
                    explicit_exit: false,
                    l1tf_flagged: false,
                })
                .collect(),
        }
    }

    #[test]
    fn baseline_elapsed_is_the_longer_siblings_guest_plus_handler_time() {
        // Arrange
        let a = trace(&[(1000, 100, false), (1000, 100, false)]);
        let b = trace(&[(500, 50, false)]);

        // Act
        let r = simulate([&a, &b], Strategy::None, &Costs::default());

        // Assert
        assert_eq!(r.elapsed_ns, 2200);
        assert_eq!(r.overhead_percent(), 0.0);
    }

    #[test]
    fn asi_exits_that_stay_restricted_cost_nothing() {
        // Arrange
        let a = trace(&[(1000, 100, false); 10]);

        // Act
        let r = simulate([&a, &a], Strategy::Asi, &Costs::default());

        // Assert
        assert_eq!((r.exits, r.exits_to_full, r.flushes, r.flushes_avoided), (20, 0, 0, 20));
        assert_eq!(r.elapsed_ns, r.baseline_ns);
    }

    #[test]
    fn a_sensitive_exit_kicks_the_sibling_out_of_its_guest_for_the_whole_window() {
        // Arrange: sibling 0 exits at 1000 into a sensitive handler; sibling 1 is in its guest until 5000.
        let costs = Costs::default();
        let a = trace(&[(1000, 100, true)]);
        let b = trace(&[(5000, 100, false)]);

        // Act
        let r = simulate([&a, &b], Strategy::Asi, &costs);

        // Assert
        let window = costs.ipi_ns
            + 2 * costs.asi_switch_ns
            + costs.exit_barrier_ns
            + 100
            + costs.l1d_flush_ns
            + costs.buffer_clear_ns;
        assert_eq!((r.exits_to_full, r.kicks, r.ipis), (1, 1, 1));
        assert_eq!(r.stall_ns, window + costs.kick_ns);
        assert_eq!(r.elapsed_ns, 5000 + window + costs.kick_ns + 100);
    }

    #[test]
    fn a_sibling_ready_to_enter_waits_for_an_open_window() {
        // Arrange: both exit at 1000; sibling 0's handler is sensitive, sibling 1's is short.
        let costs = Costs { fault_exit_ns: 0, ..Costs::default() };
        let a = trace(&[(1000, 2000, true)]);
        let b = trace(&[(1000, 10, false), (1000, 10, false)]);

        // Act
        let r = simulate([&a, &b], Strategy::Asi, &costs);

        // Assert
        assert_eq!(r.kicks, 0);
        let window_end = 1000
            + costs.ipi_ns
            + 2 * costs.asi_switch_ns
            + costs.exit_barrier_ns
            + 2000
            + costs.l1d_flush_ns
            + costs.buffer_clear_ns;
        assert_eq!(r.stall_ns, window_end - 1010);
        assert_eq!(r.elapsed_ns, window_end + 1010);
    }

    #[test]
    fn always_flush_flushes_on_every_entry_including_after_kicks() {
        let a = trace(&[(1000, 100, false); 5]);
        let r = simulate([&a, &a.rotated(2)], Strategy::AlwaysFlush, &Costs::default());
        assert_eq!(r.flushes, r.exits + r.kicks);
        assert_eq!(r.flushes_avoided, 0);
    }

    #[test]
    fn the_model_reproduces_every_published_direction() {
        // Act
        let results = simulate_workloads(&Workload::ALL, 10_000, &Costs::default());
        let directions = directions(&results);

        // Assert
        assert_eq!(directions.len(), 6);
        for d in &directions {
            assert!(d.holds, "{}: {}", d.claim, d.model);
        }
    }
}
