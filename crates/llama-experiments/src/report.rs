//! What an experiment produces and how it is written: a [`Section`] per device (tables, plots,
//! findings and the raw numbers), saved as JSON under target/experiments/, and the page
//! (docs/experiments/<name>.md) and plot (<name>.svg) drawn from every section at hand.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// A Markdown table.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = format!("### {}\n\n", self.title);
        out += &line(&self.columns);
        out += &line(&vec!["---".to_string(); self.columns.len()]);
        for row in &self.rows {
            out += &line(row);
        }
        out
    }
}

/// One line of a plot: (x, y) points in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of an experiment's figure.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
    /// Where the legend goes: the corner the lines leave free.
    #[serde(default)]
    pub legend: Corner,
}

/// A corner of a plot.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Corner {
    #[default]
    UpperLeft,
    UpperRight,
    LowerLeft,
    LowerRight,
}

/// An experiment's results on one device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Section {
    pub experiment: String,
    /// "cpu" or "cuda".
    pub device: String,
    /// The processor, in words.
    pub machine: String,
    pub command: String,
    /// YYYY-MM-DD.
    pub date: String,
    /// Whether the reduced grid ran.
    pub quick: bool,
    pub tables: Vec<Table>,
    pub plots: Vec<Plot>,
    /// What the numbers say, worked out from them.
    pub findings: Vec<String>,
    /// Every measurement, as measured.
    pub raw: Value,
}

/// target/experiments/<name>.<device>.json (".quick" before ".json" for the reduced grid).
pub fn json_name(experiment: &str, device: &str, quick: bool) -> String {
    let grid = if quick { ".quick" } else { "" };
    format!("{experiment}.{device}{grid}.json")
}

pub fn save_section(dir: &Path, section: &Section) -> Result<(), Error> {
    let name = json_name(&section.experiment, &section.device, section.quick);
    let text = serde_json::to_string_pretty(section)?;
    llama_core::write_atomic(&dir.join(name), text.as_bytes())?;
    Ok(())
}

/// The sections of `experiment` saved in `dir`: the CPU's first, then the GPU's.
pub fn load_sections(dir: &Path, experiment: &str, quick: bool) -> Result<Vec<Section>, Error> {
    let mut sections = Vec::new();
    for device in ["cpu", "cuda"] {
        let path = dir.join(json_name(experiment, device, quick));
        if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            let section: Section = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not an experiment section: {e}", path.display()))?;
            sections.push(section);
        }
    }
    Ok(sections)
}

/// The Markdown page of an experiment: its title and what it does, then per device the
/// machine, the command, the tables and the findings, and the figure.
pub fn page(title: &str, about: &str, svg_name: &str, sections: &[Section]) -> String {
    let mut out = format!("# Experiment: {title}\n\n{about}\n");
    for s in sections {
        let device = if s.device == "cuda" { "GPU" } else { "CPU" };
        out += &format!("\n## {device}: {}\n\n", s.machine);
        let grid = if s.quick {
            " — the reduced grid (`--quick`)"
        } else {
            ""
        };
        out += &format!("Command: `{}`, run on {}{grid}.\n\n", s.command, s.date);
        for table in &s.tables {
            out += &table.markdown();
            out += "\n";
        }
        if !s.findings.is_empty() {
            out += "Reading:\n\n";
            for f in &s.findings {
                out += &format!("- {f}\n");
            }
        }
    }
    out += &format!("\n![{title}]({svg_name})\n\nRaw numbers: `target/experiments/` after a run (JSON, one file per device).\n");
    out
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock (Howard Hinnant's civil-from-days).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Number formats shared by the tables.
pub mod fmt {
    pub fn mib(bytes: usize) -> String {
        format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
    }

    pub fn secs(s: f64) -> String {
        if s < 1e-3 {
            format!("{:.1} µs", s * 1e6)
        } else if s < 1.0 {
            format!("{:.2} ms", s * 1e3)
        } else {
            format!("{s:.2} s")
        }
    }

    pub fn rate(per_s: f64) -> String {
        if per_s >= 100.0 {
            format!("{per_s:.0}")
        } else {
            format!("{per_s:.1}")
        }
    }

    pub fn count(n: usize) -> String {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_get_thousands_separators() {
        assert_eq!(fmt::count(0), "0");
        assert_eq!(fmt::count(999), "999");
        assert_eq!(fmt::count(131_072), "131,072");
        assert_eq!(fmt::count(1_234_567), "1,234,567");
    }

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new("T", &["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(
            t.markdown(),
            "### T\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
        );
    }

    #[test]
    fn today_is_a_date() {
        let d = today();
        assert_eq!(d.len(), 10, "{d}");
        assert!(d.starts_with("20"), "{d}");
        assert_eq!(&d[4..5], "-");
    }
}
