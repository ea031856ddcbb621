//! The exhaustive interleaving explorer.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::{Error, Result};

/// A protocol run by the sibling threads of one core.
pub trait Protocol {
    /// The whole state: every thread's program counter and local state, and
    /// the shared memory.
    type State: Clone + Ord + fmt::Debug;

    /// The protocol's name and configuration, for reports.
    fn name(&self) -> String;

    /// Number of sibling threads.
    fn threads(&self) -> usize;

    /// The initial state.
    fn initial(&self) -> Self::State;

    /// The states thread `thread` can reach from `state` in one atomic step,
    /// each with a label (several when the thread chooses, none when it is
    /// blocked).
    fn steps(&self, state: &Self::State, thread: usize, out: &mut Vec<(&'static str, Self::State)>);

    /// Why `state` leaks, if it does.
    fn leak(&self, state: &Self::State) -> Option<String>;

    /// A one-line description of `state` for counterexamples.
    fn describe(&self, state: &Self::State) -> String;
}

/// One step of a counterexample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The thread that moved.
    pub thread: usize,
    /// What it did.
    pub action: &'static str,
    /// The state after the step.
    pub state: String,
}

/// A shortest path from the initial state to a leaking state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counterexample {
    /// The initial state.
    pub initial: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Why the last state leaks.
    pub leak: String,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  initial: {}", self.initial)?;
        for (n, s) in self.steps.iter().enumerate() {
            writeln!(f, "  {:>2}. sibling {}: {:<40} → {}", n + 1, s.thread, s.action, s.state)?;
        }
        write!(f, "  LEAK: {}", self.leak)
    }
}

/// The outcome of [`explore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The protocol's name.
    pub protocol: String,
    /// Distinct states reached.
    pub states: usize,
    /// Transitions taken (edges, including those to known states).
    pub transitions: u64,
    /// Reachable leaking states.
    pub leaks: usize,
    /// Reachable non-leaking states where no thread can move.
    pub deadlocks: usize,
    /// A shortest path to a leak, if any.
    pub counterexample: Option<Counterexample>,
}

impl Verdict {
    /// `asi model: N states explored, L leaks (protocol)`.
    pub fn summary(&self) -> String {
        format!("asi model: {} states explored, {} leaks ({})", self.states, self.leaks, self.protocol)
    }
}

/// Explores every interleaving of `protocol`'s threads from its initial
/// state, visiting each distinct state once; fails with
/// [`Error::StateLimit`] beyond `limit` states. Leaking states are counted
/// and not expanded further.
pub fn explore<P: Protocol>(protocol: &P, limit: usize) -> Result<Verdict> {
    let initial = protocol.initial();
    // Each state's parent: (index of the parent, thread, action).
    let mut parents: Vec<Option<(usize, usize, &'static str)>> = Vec::from([None]);
    let mut states: Vec<P::State> = Vec::from([initial.clone()]);
    let mut index: BTreeMap<P::State, usize> = BTreeMap::from([(initial, 0)]);
    let mut queue = VecDeque::from([0usize]);
    let mut verdict = Verdict {
        protocol: protocol.name(),
        states: 0,
        transitions: 0,
        leaks: 0,
        deadlocks: 0,
        counterexample: None,
    };
    let mut first_leak: Option<(usize, String)> = None;
    let mut next = Vec::new();
    while let Some(i) = queue.pop_front() {
        let state = states[i].clone();
        if let Some(why) = protocol.leak(&state) {
            verdict.leaks += 1;
            first_leak.get_or_insert((i, why));
            continue;
        }
        let mut moved = false;
        for thread in 0..protocol.threads() {
            next.clear();
            protocol.steps(&state, thread, &mut next);
            for (action, successor) in next.drain(..) {
                moved = true;
                verdict.transitions += 1;
                if index.contains_key(&successor) {
                    continue;
                }
                if states.len() >= limit {
                    return Err(Error::StateLimit { protocol: protocol.name(), limit });
                }
                let n = states.len();
                index.insert(successor.clone(), n);
                states.push(successor);
                parents.push(Some((i, thread, action)));
                queue.push_back(n);
            }
        }
        if !moved {
            verdict.deadlocks += 1;
        }
    }
    verdict.states = states.len();
    verdict.counterexample = first_leak.map(|(leaf, leak)| {
        let mut steps = Vec::new();
        let mut at = leaf;
        while let Some((parent, thread, action)) = parents[at] {
            steps.push(Step { thread, action, state: protocol.describe(&states[at]) });
            at = parent;
        }
        steps.reverse();
        Counterexample { initial: protocol.describe(&states[0]), steps, leak }
    });
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads each increment a shared counter by read-then-write; a
    /// "leak" is the lost update (both finished, counter 1).
    #[derive(Debug)]
    struct LostUpdate;

    impl Protocol for LostUpdate {
        /// (pc of each thread, register of each thread, counter)
        type State = ([u8; 2], [u8; 2], u8);

        fn name(&self) -> String {
            String::from("lost-update")
        }

        fn threads(&self) -> usize {
            2
        }

        fn initial(&self) -> Self::State {
            ([0, 0], [0, 0], 0)
        }

        fn steps(&self, s: &Self::State, t: usize, out: &mut Vec<(&'static str, Self::State)>) {
            let (mut pc, mut reg, mut counter) = *s;
            match pc[t] {
                0 => {
                    reg[t] = counter;
                    pc[t] = 1;
                    out.push(("read", (pc, reg, counter)));
                }
                1 => {
                    counter = reg[t] + 1;
                    pc[t] = 2;
                    out.push(("write", (pc, reg, counter)));
                }
                _ => {}
            }
        }

        fn leak(&self, s: &Self::State) -> Option<String> {
            (s.0 == [2, 2] && s.2 == 1).then(|| String::from("an increment was lost"))
        }

        fn describe(&self, s: &Self::State) -> String {
            format!("{s:?}")
        }
    }

    #[test]
    fn explorer_finds_the_lost_update_with_a_shortest_trace() {
        // Act
        let v = explore(&LostUpdate, 1000).unwrap();

        // Assert
        assert_eq!(v.leaks, 1);
        let trace = v.counterexample.unwrap();
        assert_eq!(trace.steps.len(), 4);
        assert_eq!(
            trace.steps.iter().map(|s| s.action).collect::<Vec<_>>(),
            ["read", "read", "write", "write"]
        );
        // The two serial orders finish with counter 2 and different registers: stuck, not leaking.
        assert_eq!(v.deadlocks, 2);
    }

    #[test]
    fn explorer_stops_at_its_state_limit() {
        assert!(matches!(explore(&LostUpdate, 3), Err(Error::StateLimit { limit: 3, .. })));
    }
}
