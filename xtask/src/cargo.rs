//! Running cargo from the xtask: the workspace root, the command, and its result lines.

use std::path::PathBuf;
use std::process::Command;

/// The workspace root (the xtask crate sits one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// A `cargo` command run in the workspace root (the same cargo that runs the xtask).
pub fn command() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Counts from one libtest summary line:
/// `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub measured: u64,
    pub filtered: u64,
}

impl Counts {
    /// Parses a summary line; `None` for any other line.
    pub fn parse(line: &str) -> Option<Counts> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let mut counts = Counts::default();
        for field in rest.split(';') {
            let field = field
                .trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ");
            let mut words = field.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse() else { continue };
            match what {
                "passed" => counts.passed = n,
                "failed" => counts.failed = n,
                "ignored" => counts.ignored = n,
                "measured" => counts.measured = n,
                "filtered" => counts.filtered = n,
                _ => {}
            }
        }
        Some(counts)
    }

    pub fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.measured += other.measured;
        self.filtered += other.filtered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_parse() {
        let ok = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished in 0.01s";
        assert_eq!(
            Counts::parse(ok),
            Some(Counts {
                passed: 12,
                failed: 0,
                ignored: 1,
                measured: 0,
                filtered: 3
            })
        );
        let bad = "test result: FAILED. 4 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.5s";
        assert_eq!(
            Counts::parse(bad).map(|c| (c.passed, c.failed)),
            Some((4, 2))
        );
        assert_eq!(Counts::parse("running 3 tests"), None);
    }
}
