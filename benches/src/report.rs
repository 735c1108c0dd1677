//! Medians, percentiles and formatting shared by the benchmarks.

use std::time::Duration;

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The `p`-th percentile (0-100) of `samples` (sorted in place), nearest rank.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// A benchmark's result: a table for people, JSON lines for programs, charts for reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The subcommand (`pipes`, `timers`, ...).
    pub bench: String,
    /// What was measured and how, printed above the table.
    pub intro: Vec<String>,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows of cells, already formatted.
    pub rows: Vec<Vec<String>>,
    /// One JSON object per result.
    pub json: Vec<serde_json::Value>,
    /// Charts to draw with `--plot`.
    pub charts: Vec<Chart>,
    /// Targets with their measured values, for the report's summary.
    pub targets: Vec<Target>,
}

/// A grouped bar chart: for each group (a parameter set), one bar per series (a system).
#[derive(Debug, Clone, Default)]
pub struct Chart {
    /// File name without extension.
    pub name: String,
    /// Title.
    pub title: String,
    /// What the bars measure.
    pub y_label: String,
    /// `(group, [(series, value)])`.
    pub groups: Vec<(String, Vec<(String, f64)>)>,
}

/// A target from the benchmark issue and what this run measured for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The target, in words.
    pub what: String,
    /// The measured value, in words.
    pub measured: String,
    /// Whether it was met.
    pub met: bool,
}

impl Report {
    /// The table as aligned text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for line in &self.intro {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain(std::iter::once(&self.columns[i]))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                if i == 0 {
                    l.push_str(&format!("{c:<w$}"));
                } else {
                    l.push_str(&format!("  {c:>w$}"));
                }
            }
            l.trim_end().to_owned() + "\n"
        };
        out.push_str(&line(&self.columns));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        if !self.targets.is_empty() {
            out.push('\n');
            for t in &self.targets {
                let mark = if t.met { "met" } else { "MISSED" };
                out.push_str(&format!("target: {} -> {} ({mark})\n", t.what, t.measured));
            }
        }
        out
    }

    /// The table as GitHub markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for line in &self.intro {
            out.push_str(line);
            out.push_str("\n\n");
        }
        out.push_str(&format!("| {} |\n", self.columns.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(self.columns.len())));
        for r in &self.rows {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        if !self.targets.is_empty() {
            out.push_str("\n| target | measured | |\n|---|---|---|\n");
            for t in &self.targets {
                let mark = if t.met { "met" } else { "**missed**" };
                out.push_str(&format!("| {} | {} | {mark} |\n", t.what, t.measured));
            }
        }
        out
    }
}

/// `vireo-<backend>` for every compiled backend that starts on this machine, then `others`.
pub fn systems_with(others: &[&str]) -> Vec<String> {
    use vireo_backends::{AnyBackend, BackendKind, Choice};
    BackendKind::compiled()
        .into_iter()
        .filter(|&k| AnyBackend::with_choice(Choice::Only(k)).is_ok())
        .map(|k| format!("vireo-{k}"))
        .chain(others.iter().map(|s| (*s).to_owned()))
        .collect()
}

/// The systems to run: those `requested` (each must be in `all`), or all of them.
///
/// # Errors
///
/// `InvalidInput` naming a requested system that is unknown or cannot run here.
pub fn choose(all: &[String], requested: &[String]) -> std::io::Result<Vec<String>> {
    if let Some(bad) = requested.iter().find(|s| !all.contains(s)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "unknown or unavailable system {bad:?}: choose from {}",
                all.join(", ")
            ),
        ));
    }
    Ok(all
        .iter()
        .filter(|s| requested.is_empty() || requested.contains(s))
        .cloned()
        .collect())
}

/// Microseconds as a float.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// CPU time the calling thread has used so far.
pub fn thread_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut s, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&mut s, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&mut s, 100.0), Duration::from_micros(100));
    }
}
