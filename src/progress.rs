//! One progress line for every long command (`backup`, `restore`,
//! `migrate --encrypt`, `sessions export`, `torture`; issue 15): a line on
//! stderr rewritten in place with `\r`, only when stderr is a terminal and
//! only for large work, ended with a newline when the work is complete (or
//! when it stops midway, so an error stands on its own line). In scripts
//! (stderr a pipe or a file) nothing is written at all.

use std::io::{IsTerminal, Write};

/// Stores larger than this show a progress line while they are copied.
pub const LARGE_BYTES: u64 = 8 * 1024 * 1024;

/// What the counts are: the line's last part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `(12.3 of 30.0 MiB)`.
    Bytes,
    /// `(120 of 450 rows)`.
    Rows,
    /// `(3 of 24 cycles)`.
    Cycles,
    /// `(2 of 5 migrations)`.
    Migrations,
}

/// `LABEL: 41% (12.3 of 30.0 MiB)` on stderr, rewritten at each new
/// percentage.
pub struct ProgressLine {
    label: String,
    unit: Unit,
    /// Work whose total is at most this shows nothing (it is quick).
    from: u64,
    terminal: bool,
    last: Option<u64>,
    /// The length of the line last written, to blank a shorter one.
    width: usize,
}

impl ProgressLine {
    /// A line for work of more than `from` units, shown only when stderr
    /// is a terminal.
    pub fn new(label: impl Into<String>, unit: Unit, from: u64) -> ProgressLine {
        ProgressLine::on(label, unit, from, std::io::stderr().is_terminal())
    }

    /// As [`ProgressLine::new`], with the terminal check made by the caller.
    pub fn on(label: impl Into<String>, unit: Unit, from: u64, terminal: bool) -> ProgressLine {
        ProgressLine {
            label: label.into(),
            unit,
            from,
            terminal,
            last: None,
            width: 0,
        }
    }

    /// `done` of `total` units.
    pub fn show(&mut self, done: u64, total: u64) {
        self.show_with(done, total, "");
    }

    /// `done` of `total` units, with `extra` inside the parentheses
    /// (`(3 of 24 cycles, 0 lost)`).
    pub fn show_with(&mut self, done: u64, total: u64, extra: &str) {
        if !self.terminal || total <= self.from {
            return;
        }
        let pct = (done.min(total) * 100) / total;
        if self.last == Some(pct) {
            return;
        }
        self.last = Some(pct);
        let counts = match self.unit {
            Unit::Bytes => {
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                format!("{:.1} of {:.1} MiB", mib(done), mib(total))
            }
            Unit::Rows => format!("{done} of {total} rows"),
            Unit::Cycles => format!("{done} of {total} cycles"),
            Unit::Migrations => format!("{done} of {total} migrations"),
        };
        let mut line = format!("{}: {pct}% ({counts}{extra})", self.label);
        let len = line.chars().count();
        if len < self.width {
            line.push_str(&" ".repeat(self.width - len));
        }
        self.width = len;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}");
        if done >= total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

/// Work that stopped midway ends the line, so what follows (an error) is
/// on a line of its own.
impl Drop for ProgressLine {
    fn drop(&mut self) {
        if self.last.is_some_and(|pct| pct < 100) {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_off_a_terminal_and_for_small_work() {
        let mut p = ProgressLine::on("x", Unit::Rows, 10, false);
        p.show(5, 100);
        assert_eq!(p.last, None);
        let mut p = ProgressLine::on("x", Unit::Rows, 10, true);
        p.show(5, 10);
        assert_eq!(p.last, None);
    }
}
