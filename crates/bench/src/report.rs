//! The printed table and the JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::pull::PulledImage;
use crate::stats::{Summary, mib, ms};
use crate::{Op, Outcome, Section, System, version_of};

/// Lifecycle rows: the operation, the floor shown beside it, and the p50
/// target from the issue.
const ROWS: &[(Op, Option<Op>, Option<f64>)] = &[
    (Op::Create, None, None),
    (Op::StartApi, Some(Op::UnshareTrue), Some(5.0)),
    (Op::StartToExec, Some(Op::UnshareTrue), Some(5.0)),
    (Op::StartAfterStop, Some(Op::UnshareTrue), Some(5.0)),
    (Op::Exec, Some(Op::HostSpawnTrue), Some(1.0)),
    (Op::Stop, None, Some(10.0)),
    (Op::Destroy, None, None),
];

/// Floor rows of their own: what single runc invocations cost.
const FLOOR_ROWS: &[Op] = &[Op::RuncRun, Op::RuncDelete, Op::RuncVersion];

/// The machine the numbers were measured on.
#[derive(Debug, Serialize)]
pub struct Host {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// /proc/loadavg when the run began: other work on the host shows here.
    pub load_average: String,
}

impl Host {
    pub fn collect() -> Host {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        Host {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            load_average: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    fn line(&self) -> String {
        format!(
            "host: Linux {}, {} CPUs ({}), load average at start {}",
            self.kernel, self.cpus, self.cpu_model, self.load_average
        )
    }
}

/// Where the lifecycle numbers were measured, and with what.
#[derive(Debug, Serialize)]
pub struct HostInfo {
    #[serde(flatten)]
    pub host: Host,
    pub hangar_binary: String,
    pub runc: String,
    pub podman: String,
}

impl HostInfo {
    pub fn collect(hangar: &Path) -> HostInfo {
        HostInfo {
            host: Host::collect(),
            hangar_binary: hangar.display().to_string(),
            runc: version_of(Path::new("runc")),
            podman: version_of(Path::new("podman")),
        }
    }
}

/// One operation's summary and samples.
#[derive(Debug, Serialize)]
pub struct Timing {
    pub operation: Op,
    pub label: &'static str,
    #[serde(flatten)]
    pub summary: Summary,
    /// Every timed sample, in the order taken.
    pub samples_ms: Vec<f64>,
}

impl Timing {
    /// `None` for no samples.
    fn of(op: Op, samples: &[Duration]) -> Option<Timing> {
        Some(Timing {
            operation: op,
            label: op.label(),
            summary: Summary::of(samples)?,
            samples_ms: samples.iter().map(|&d| ms(d)).collect(),
        })
    }

    /// Every operation a section timed.
    fn all(section: &Section) -> Vec<Timing> {
        section
            .samples
            .iter()
            .filter_map(|(&op, s)| Timing::of(op, s))
            .collect()
    }

    fn cell(&self) -> String {
        let s = self.summary;
        format!("{:.2} / {:.2} ({})", s.p50_ms, s.p99_ms, s.n)
    }
}

/// One operation of one system.
#[derive(Debug, Serialize)]
pub struct Row {
    pub system: System,
    #[serde(flatten)]
    pub timing: Timing,
}

/// A section's status in the JSON document.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SectionStatus {
    Ran { notes: Vec<String> },
    Skipped { reason: String },
    Failed { error: String },
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub command: Vec<String>,
    pub iterations: usize,
    /// Idle time before each "settled" start.
    pub settle_ms: u64,
    pub host: HostInfo,
    pub sections: BTreeMap<System, SectionStatus>,
    pub results: Vec<Row>,
}

impl Report {
    pub fn new(
        command: Vec<String>,
        host: HostInfo,
        iterations: usize,
        settle_ms: u64,
        outcomes: &BTreeMap<System, Outcome>,
    ) -> Report {
        let mut sections = BTreeMap::new();
        let mut results = Vec::new();
        for (&system, outcome) in outcomes {
            let status = match outcome {
                Outcome::Ran(section) => {
                    for (&op, s) in &section.samples {
                        if let Some(timing) = Timing::of(op, s) {
                            results.push(Row { system, timing });
                        }
                    }
                    SectionStatus::Ran {
                        notes: section.notes.clone(),
                    }
                }
                Outcome::Skipped(r) => SectionStatus::Skipped { reason: r.clone() },
                Outcome::Failed(e) => SectionStatus::Failed { error: e.clone() },
            };
            sections.insert(system, status);
        }
        Report {
            command,
            iterations,
            settle_ms,
            host,
            sections,
            results,
        }
    }

    fn find(&self, system: System, op: Op) -> Option<&Timing> {
        self.results
            .iter()
            .find(|r| r.system == system && r.timing.operation == op)
            .map(|r| &r.timing)
    }

    fn get(&self, system: System, op: Op) -> Option<Summary> {
        self.find(system, op).map(|t| t.summary)
    }

    fn cell(&self, system: System, op: Option<Op>) -> String {
        match op.and_then(|op| self.find(system, op)) {
            Some(t) => t.cell(),
            None => "—".into(),
        }
    }

    /// The readable table (Markdown), with the host and notes.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let h = &self.host;
        let _ = writeln!(out, "{}", h.host.line());
        let _ = writeln!(out, "hangar: {}; {}; {}", h.hangar_binary, h.runc, h.podman);
        let _ = writeln!(
            out,
            "times in ms: p50 / p99 (n), p99 by nearest rank, one uncounted warm-up per operation; \
             a settled start follows {} ms stopped\n",
            self.settle_ms
        );

        let mut rows: Vec<[String; 5]> = vec![[
            "operation".into(),
            "hangar".into(),
            "podman (runc)".into(),
            "floor".into(),
            "target (p50)".into(),
        ]];
        for &(op, floor_op, target) in ROWS {
            let label = match floor_op {
                Some(Op::UnshareTrue) => format!("{} ¹", op.label()),
                Some(Op::HostSpawnTrue) => format!("{} ²", op.label()),
                _ => op.label().to_owned(),
            };
            let goal = match (target, self.get(System::Hangar, op)) {
                (Some(t), Some(s)) => format!("≤ {t} ({})", if s.p50_ms <= t { "met" } else { "missed" }),
                (Some(t), None) => format!("≤ {t}"),
                (None, _) => "—".into(),
            };
            rows.push([
                label,
                self.cell(System::Hangar, Some(op)),
                self.cell(System::Podman, Some(op)),
                self.cell(System::Floor, floor_op),
                goal,
            ]);
        }
        for &op in FLOOR_ROWS {
            if self.get(System::Floor, op).is_some() {
                rows.push([
                    op.label().into(),
                    "—".into(),
                    "—".into(),
                    self.cell(System::Floor, Some(op)),
                    "—".into(),
                ]);
            }
        }
        out.push_str(&markdown(&rows));
        let _ = writeln!(
            out,
            "\n¹ floor: `unshare --fork --pid --mount --uts --ipc --net chroot ROOTFS true` on the busybox rootfs"
        );
        let _ = writeln!(out, "² floor: fork + exec of the host's `true` (no sandbox, no HTTP)");
        for (system, status) in &self.sections {
            match status {
                SectionStatus::Ran { notes } => {
                    for n in notes {
                        let _ = writeln!(out, "{n}");
                    }
                }
                SectionStatus::Skipped { reason } => {
                    let _ = writeln!(out, "{system:?} skipped: {reason}");
                }
                SectionStatus::Failed { error } => {
                    let _ = writeln!(out, "{system:?} failed: {error}");
                }
            }
        }
        out
    }
}

/// The pull benchmark's run.
#[derive(Debug, Serialize)]
pub struct PullReport {
    pub command: Vec<String>,
    pub iterations: usize,
    pub host: Host,
    pub hangar_binary: String,
    pub skopeo: String,
    pub registry: String,
    pub image: PulledImage,
    pub results: Vec<Timing>,
    pub notes: Vec<String>,
}

impl PullReport {
    pub fn new(
        command: Vec<String>,
        host: Host,
        hangar: &Path,
        iterations: usize,
        image: PulledImage,
        section: Section,
    ) -> PullReport {
        PullReport {
            command,
            iterations,
            host,
            hangar_binary: hangar.display().to_string(),
            skopeo: version_of(Path::new("skopeo")),
            registry: version_of(Path::new("docker-registry")),
            image,
            results: Timing::all(&section),
            notes: section.notes,
        }
    }

    /// The readable table (Markdown), with the host, the image and notes.
    pub fn table(&self) -> String {
        let i = &self.image;
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.host.line());
        let _ = writeln!(
            out,
            "hangar: {}; {}; {}",
            self.hangar_binary, self.skopeo, self.registry
        );
        let _ = writeln!(
            out,
            "image: {}, {} layers of {:.1} MiB of random bytes each ({:.1} MiB gzip'd in all)",
            i.reference,
            i.layers,
            mib(i.layer_bytes),
            mib(i.compressed_bytes)
        );
        let _ = writeln!(
            out,
            "times in ms: p50 / p99 (n), p99 by nearest rank, one uncounted warm-up each; hangar and skopeo take turns\n"
        );
        let mut rows = vec![["operation".to_owned(), "time".to_owned()]];
        rows.extend(self.results.iter().map(|t| [t.label.to_owned(), t.cell()]));
        out.push_str(&markdown(&rows));
        out.push('\n');
        for n in &self.notes {
            let _ = writeln!(out, "{n}");
        }
        out
    }
}

/// `rows` as a Markdown table, the first row as its header, columns padded.
fn markdown<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Section;

    fn machine() -> Host {
        Host {
            kernel: "6.1".into(),
            cpus: 2,
            cpu_model: "cpu".into(),
            load_average: "0.00 0.00 0.00".into(),
        }
    }

    fn host() -> HostInfo {
        HostInfo {
            host: machine(),
            hangar_binary: "hangar".into(),
            runc: "runc version 1".into(),
            podman: "podman version 4".into(),
        }
    }

    fn samples(ops: &[(Op, &[u64])]) -> Section {
        let mut s = Section::default();
        for (op, ms) in ops {
            for &m in *ms {
                s.push(*op, Duration::from_millis(m));
            }
        }
        s
    }

    fn section(ops: &[(Op, &[u64])]) -> Outcome {
        Outcome::Ran(samples(ops))
    }

    #[test]
    fn the_table_marks_targets_against_hangars_p50_and_shows_missing_systems() {
        let outcomes = BTreeMap::from([
            (
                System::Hangar,
                section(&[(Op::StartApi, &[4, 5, 9]), (Op::Exec, &[2, 2, 3])]),
            ),
            (System::Podman, Outcome::Skipped("podman not found".into())),
            (System::Floor, section(&[(Op::UnshareTrue, &[3, 3, 3])])),
        ]);
        let table = Report::new(vec![], host(), 3, 300, &outcomes).table();
        let row = |label: &str| table.lines().find(|l| l.contains(label)).unwrap().to_owned();
        let start = row("start, settled (call returns)");
        assert!(start.contains("5.00 / 9.00 (3)"), "{start}");
        assert!(start.contains("3.00 / 3.00 (3)"), "{start}");
        assert!(start.contains("≤ 5 (met)"), "{start}");
        let exec = row("exec `true` round trip");
        assert!(exec.contains("≤ 1 (missed)"), "{exec}");
        // No Hangar sample for stop: the target is shown, without a verdict.
        let stop = row("stop (call returns)");
        assert!(
            stop.contains("≤ 10") && !stop.contains("met") && !stop.contains("missed"),
            "{stop}"
        );
        assert!(table.contains("Podman skipped: podman not found"));
        // No runc floor rows without runc samples.
        assert!(!table.contains("runc run"));
    }

    #[test]
    fn json_carries_every_sample_and_the_section_status() {
        let outcomes = BTreeMap::from([
            (System::Hangar, section(&[(Op::Stop, &[3, 1, 2])])),
            (System::Podman, Outcome::Failed("no".into())),
        ]);
        let v = serde_json::to_value(Report::new(vec!["hangar-bench".into()], host(), 3, 300, &outcomes)).unwrap();
        assert_eq!(v["results"][0]["operation"], "stop");
        assert_eq!(v["results"][0]["p50_ms"], 2.0);
        assert_eq!(v["results"][0]["samples_ms"], serde_json::json!([3.0, 1.0, 2.0]));
        assert_eq!(v["sections"]["podman"]["status"], "failed");
        assert_eq!(v["sections"]["hangar"]["status"], "ran");
    }

    #[test]
    fn the_pull_table_shows_both_tools_the_image_and_the_notes() {
        let mut section = samples(&[
            (Op::Pull, &[4000, 3000, 5000]),
            (Op::SkopeoCopyDir, &[1000, 2000, 1500]),
        ]);
        section.notes.push("hangar also unpacks".into());
        let image = PulledImage {
            reference: "127.0.0.1:5000/big:latest".into(),
            layers: 3,
            layer_bytes: 100 << 20,
            compressed_bytes: 300 << 20,
        };
        let report = PullReport::new(vec![], machine(), Path::new("hangar"), 3, image, section);
        let table = report.table();
        let row = |label: &str| table.lines().find(|l| l.contains(label)).unwrap().to_owned();
        assert!(row("POST /v1/images/pull").contains("4000.00 / 5000.00 (3)"), "{table}");
        assert!(row("skopeo copy").contains("1500.00 / 2000.00 (3)"), "{table}");
        assert!(
            table.contains(
                "127.0.0.1:5000/big:latest, 3 layers of 100.0 MiB of random bytes each (300.0 MiB gzip'd in all)"
            ),
            "{table}"
        );
        assert!(table.contains("hangar also unpacks"));
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["results"][0]["operation"], "pull");
        assert_eq!(
            v["results"][1]["samples_ms"],
            serde_json::json!([1000.0, 2000.0, 1500.0])
        );
    }
}

/// A run of named sections, each a table of operations (the checkpoint
/// benchmark's).
#[derive(Debug, Serialize)]
pub struct SectionsReport {
    pub command: Vec<String>,
    pub iterations: usize,
    pub host: Host,
    pub sections: Vec<NamedSection>,
}

#[derive(Debug, Serialize)]
pub struct NamedSection {
    pub name: String,
    pub results: Vec<Timing>,
    pub notes: Vec<String>,
}

impl SectionsReport {
    pub fn new(command: Vec<String>, host: Host, iterations: usize, run: crate::checkpoint::Run) -> SectionsReport {
        SectionsReport {
            command,
            iterations,
            host,
            sections: run
                .sections
                .into_iter()
                .map(|(name, section)| NamedSection {
                    name,
                    results: Timing::all(&section),
                    notes: section.notes,
                })
                .collect(),
        }
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.host.line());
        let _ = writeln!(
            out,
            "times in ms: p50 / p99 (n), p99 by nearest rank, one uncounted warm-up each"
        );
        for s in &self.sections {
            let _ = writeln!(out, "\n{}:\n", s.name);
            let mut rows = vec![["operation".to_owned(), "time".to_owned()]];
            rows.extend(s.results.iter().map(|t| [t.label.to_owned(), t.cell()]));
            out.push_str(&markdown(&rows));
            for n in &s.notes {
                let _ = writeln!(out, "{n}");
            }
        }
        out
    }
}
