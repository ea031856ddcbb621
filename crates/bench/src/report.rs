//! Results: one [`Record`] per case, printed as JSON lines (`--json`) or as
//! the human table `suite | case | memvisor | peer | peer time | speedup`.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use crate::harness::Medians;

/// What `ours_ns` and `peer_ns` of a record count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Nanoseconds per operation (the normal case).
    Nanoseconds,
    /// Memory references per operation (a case compared with an analytical bound).
    References,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Nanoseconds => "ns",
            Unit::References => "refs",
        }
    }
}

/// One line of the report. Field order is the JSON key order of BENCH.md.
///
/// For a case with no in-process peer, `peer` names the bound compared with
/// (`"bound: 24 memory references"`), `peer_ns` holds the bound's value and
/// `ours_ns` the measured value, both in [`unit`](Self::unit) (the JSON keys
/// keep their `_ns` names so every line has one shape).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Record {
    suite: &'static str,
    case: String,
    ours_ns: f64,
    peer: String,
    peer_ns: f64,
    /// `peer_ns / ours_ns`: above 1 means memvisor is faster (or under the bound).
    speedup: f64,
    #[serde(skip)]
    unit: Unit,
}

impl Record {
    /// A timed comparison with a peer.
    pub(crate) fn timed(
        suite: &'static str,
        case: impl Into<String>,
        peer: impl Into<String>,
        m: Medians,
    ) -> Self {
        Self::new(suite, case.into(), m.ours_ns, peer.into(), m.peer_ns, Unit::Nanoseconds)
    }

    /// A measured count against an analytical `bound` described by `peer`.
    pub(crate) fn bound(
        suite: &'static str,
        case: impl Into<String>,
        peer: impl Into<String>,
        measured: f64,
        bound: f64,
        unit: Unit,
    ) -> Self {
        Self::new(suite, case.into(), measured, peer.into(), bound, unit)
    }

    fn new(suite: &'static str, case: String, ours: f64, peer: String, peer_value: f64, unit: Unit) -> Self {
        let speedup = if ours > 0.0 { peer_value / ours } else { 0.0 };
        Self {
            suite,
            case,
            ours_ns: round(ours, 2),
            peer,
            peer_ns: round(peer_value, 2),
            speedup: round(speedup, 2),
            unit,
        }
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Where records go: straight to stdout as JSON lines, or collected for the table.
#[derive(Debug)]
pub(crate) struct Reporter {
    json: bool,
    records: Vec<Record>,
}

impl Reporter {
    /// A reporter printing JSON lines (`json`) or a table at the end.
    pub(crate) fn new(json: bool) -> Self {
        Self { json, records: Vec::new() }
    }

    /// Reports one case. In JSON mode the line is written (and flushed) at once.
    pub(crate) fn emit(&mut self, record: Record) -> Result<()> {
        eprintln!(
            "{}: {} — memvisor {} vs {} {}",
            record.suite,
            record.case,
            value(record.ours_ns, record.unit),
            record.peer,
            value(record.peer_ns, record.unit)
        );
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &record)?;
            writeln!(out)?;
            out.flush()?;
        }
        self.records.push(record);
        Ok(())
    }

    /// Prints the table (human mode only).
    pub(crate) fn finish(self) -> Result<()> {
        if self.json {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        out.write_all(table(&self.records).as_bytes())?;
        out.flush()?;
        Ok(())
    }
}

fn value(x: f64, unit: Unit) -> String {
    format!("{x:.2} {}", unit.suffix())
}

/// The records as a Markdown table (pasteable into the README).
fn table(records: &[Record]) -> String {
    let header = ["suite", "case", "memvisor", "peer", "peer time", "speedup"].map(String::from);
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            [
                r.suite.to_string(),
                r.case.clone(),
                value(r.ours_ns, r.unit),
                r.peer.clone(),
                value(r.peer_ns, r.unit),
                format!("{:.2}x", r.speedup),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String; 6]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut s = line(&header);
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    s.push_str(&format!("|-{}-|\n", rule.join("-|-")));
    for row in &rows {
        s.push_str(&line(row));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_bench_md_keys_in_order() {
        let r = Record::timed("paging", "walk/x", "peer 1.0", Medians { ours_ns: 2.0, peer_ns: 5.0 });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"suite":"paging","case":"walk/x","ours_ns":2.0,"peer":"peer 1.0","peer_ns":5.0,"speedup":2.5}"#
        );
    }

    #[test]
    fn bound_record_puts_measured_value_in_ours_and_bound_in_peer() {
        let r = Record::bound("paging", "refs", "bound: 24 memory references", 24.0, 24.0, Unit::References);
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains(
                r#""ours_ns":24.0,"peer":"bound: 24 memory references","peer_ns":24.0,"speedup":1.0"#
            )
        );
    }

    #[test]
    fn table_has_header_rule_and_one_row_per_record() {
        let r = Record::timed("paging", "walk/x", "peer", Medians { ours_ns: 1.0, peer_ns: 3.0 });
        let t = table(&[r]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("| suite"));
        assert!(lines[2].contains("3.00x"));
    }
}
