//! The results table, and the expected results per target that a run is checked against.
//!
//! An expectations file has one line per test, `<id> pass`, `<id> skip` or `<id> racy`, and
//! `#` comments (the reason a test is not expected to pass goes there; a run prints the
//! family's own reason for a skip); a test not listed is expected to pass. `racy` accepts a
//! pass or a failure: a test whose outcome depends on a race the kernel tool itself leaves
//! open, reported either way. Anything else than expected is unexpected.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::runner::{Status, TestResult};

/// The expected outcome of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Every check holds.
    Pass,
    /// The test is skipped on this target (a feature the family lacks).
    Skip,
    /// The test passes or fails depending on a race the kernel tool leaves open.
    Racy,
}

/// Expected outcomes by test id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    by_id: BTreeMap<usize, Expected>,
}

impl Expectations {
    /// Parses an expectations file.
    pub fn parse(text: &str) -> Result<Expectations, String> {
        let mut by_id = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(id), Some(word), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {}: expected `<id> pass|skip`, got `{line}`", n + 1));
            };
            let id: usize =
                id.parse().map_err(|_| format!("line {}: `{id}` is not a test id", n + 1))?;
            let expected = match word {
                "pass" => Expected::Pass,
                "skip" => Expected::Skip,
                "racy" => Expected::Racy,
                other => {
                    return Err(format!("line {}: `{other}` is not pass, skip or racy", n + 1))
                }
            };
            if by_id.insert(id, expected).is_some() {
                return Err(format!("line {}: test {id} is listed twice", n + 1));
            }
        }
        Ok(Expectations { by_id })
    }

    /// What test `id` is expected to do.
    pub fn of(&self, id: usize) -> Expected {
        self.by_id.get(&id).copied().unwrap_or(Expected::Pass)
    }

    /// The results that are not what was expected, each described.
    pub fn unexpected(&self, results: &[TestResult]) -> Vec<String> {
        results
            .iter()
            .filter_map(|r| {
                let expected = self.of(r.id);
                let fine = matches!(
                    (&r.status, expected),
                    (Status::Pass, Expected::Pass)
                        | (Status::Skip(_), Expected::Skip)
                        | (Status::Pass | Status::Fail(_), Expected::Racy)
                );
                (!fine).then(|| {
                    let want = match expected {
                        Expected::Pass => "PASS",
                        Expected::Skip => "SKIP",
                        Expected::Racy => "PASS or FAIL",
                    };
                    format!("{} {}: {} (expected {want})", r.id, r.name, r.status.word())
                })
            })
            .collect()
    }
}

/// The expectations checked in for `target` (the file under `expected/`), if there are any.
pub fn checked_in(target: &str) -> Option<&'static str> {
    match target {
        "loopback" => Some(include_str!("../expected/loopback.txt")),
        "device" => Some(include_str!("../expected/device.txt")),
        "kernel" => Some(include_str!("../expected/kernel.txt")),
        _ => None,
    }
}

/// The PASS / SKIP / FAIL table: one line per test, with the reason of a skip or a failure
/// and any check left out, then the totals.
pub fn table(title: &str, results: &[TestResult]) -> String {
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = format!("{title}\n");
    for r in results {
        let detail = match &r.status {
            Status::Skip(why) | Status::Fail(why) => format!("  {why}"),
            Status::Pass | Status::NotRun => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>3}  {:<width$}  {:<7} {:>6.2}s{detail}",
            r.id,
            r.name,
            r.status.word(),
            r.seconds
        );
        for note in &r.notes {
            let _ = writeln!(out, "{:>3}  {:<width$}  {:<7}          note: {note}", "", "", "");
        }
    }
    let count = |word| results.iter().filter(|r| r.status.word() == word).count();
    let _ = writeln!(
        out,
        "{} passed, {} skipped, {} failed, {} not run",
        count("PASS"),
        count("SKIP"),
        count("FAIL"),
        count("NOT RUN")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: usize, status: Status) -> TestResult {
        TestResult { id, name: "t", status, notes: Vec::new(), seconds: 0.0 }
    }

    #[test]
    fn a_skip_where_a_pass_is_expected_is_unexpected_and_so_is_every_failure() {
        let expected =
            Expectations::parse("0 pass\n1 skip # no such thing here\n4 racy\n").unwrap();
        let results = [
            result(0, Status::Skip("x".into())),
            result(1, Status::Skip("y".into())),
            result(2, Status::Pass),
            result(3, Status::Fail("z".into())),
        ];
        let unexpected = expected.unexpected(&results);
        assert_eq!(unexpected, ["0 t: SKIP (expected PASS)", "3 t: FAIL (expected PASS)"]);
        // A skip expected and a pass that came instead is reported too.
        assert_eq!(expected.unexpected(&[result(1, Status::Pass)]), ["1 t: PASS (expected SKIP)"]);
        // A racy test may pass or fail, but not be skipped.
        assert!(expected.unexpected(&[result(4, Status::Pass)]).is_empty());
        assert!(expected.unexpected(&[result(4, Status::Fail("r".into()))]).is_empty());
        assert_eq!(
            expected.unexpected(&[result(4, Status::Skip("s".into()))]),
            ["4 t: SKIP (expected PASS or FAIL)"]
        );
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(
            Expectations::parse("0 pass\nzero pass").unwrap_err(),
            "line 2: `zero` is not a test id"
        );
        assert_eq!(
            Expectations::parse("0 maybe").unwrap_err(),
            "line 1: `maybe` is not pass, skip or racy"
        );
        assert_eq!(
            Expectations::parse("0 pass\n0 skip").unwrap_err(),
            "line 2: test 0 is listed twice"
        );
    }

    #[test]
    fn the_checked_in_files_parse() {
        for target in ["loopback", "device", "kernel"] {
            let text = checked_in(target).unwrap();
            Expectations::parse(text).unwrap_or_else(|e| panic!("{target}: {e}"));
        }
    }
}
