//! `hangar-bench`: Hangar's machine lifecycle (create, start, exec, stop)
//! measured beside podman with runc on the same busybox image, and beside
//! the floor (bare namespaces + chroot, one runc invocation), in one run.
//! `hangar-bench pull`: an image pull from a registry on loopback, Hangar's
//! beside skopeo's. `checkpoint`, `egress` and `ingress` time those parts
//! beside their peers (see each module).
//!
//! Runs as root. Everything it makes (daemon, machines, containers, images,
//! directories) is removed when it ends, also on error or Ctrl-C.

mod burst;
mod checkpoint;
mod egress;
mod floor;
mod hangar;
mod image;
mod ingress;
mod podman;
mod process;
mod pull;
mod report;
mod stats;
mod wrk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Every operation timed, by any system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Create and start: answered with the machine started.
    Create,
    /// Start of a machine stopped a while ago (settled), until the start
    /// call returns.
    StartApi,
    /// The same start, until a first exec of `true` returns.
    StartToExec,
    /// Start issued as soon as a stop has returned, until a first exec of
    /// `true` returns: includes whatever the stop left in the background.
    StartAfterStop,
    /// One exec of `true` in a started machine.
    Exec,
    /// Stop of a started machine, until the call returns.
    Stop,
    /// Removal of a machine whose stop has just returned.
    Destroy,
    UnshareTrue,
    HostSpawnTrue,
    RuncRun,
    RuncDelete,
    RuncVersion,
    /// Hangar's pull of an image none of whose layers it has.
    Pull,
    /// `skopeo copy` of the same image from the registry to a directory
    /// (`dir:`: a file per blob).
    SkopeoCopyDir,
    /// The same, to an OCI layout.
    SkopeoCopyOci,
    /// The first checkpoint after the bulk write: pays for flushing it.
    FirstCheckpoint,
    CheckpointLive,
    CheckpointStopped,
    ForkLive,
    ForkFromCheckpoint,
    RestoreStopped,
    /// The peer: `cp -a --reflink=auto` of the machine's upper directory.
    CopyUpper,
    /// The floor: one btrfs snapshot ioctl of the machine's volume.
    SnapshotIoctl,
    SuspendFreeze,
    ResumeThaw,
    SuspendToDisk,
    ResumeFromDisk,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Create => "create (→ started)",
            Op::StartApi => "start, settled (call returns)",
            Op::StartToExec => "start, settled → first exec `true`",
            Op::StartAfterStop => "start right after stop → first exec",
            Op::Exec => "exec `true` round trip",
            Op::Stop => "stop (call returns)",
            Op::Destroy => "destroy right after stop",
            Op::UnshareTrue => "unshare + chroot `true`",
            Op::HostSpawnTrue => "spawn `true` on the host",
            Op::RuncRun => "runc run `true` (one sandbox)",
            Op::RuncDelete => "runc delete --force (absent id)",
            Op::RuncVersion => "runc --version (Go process start)",
            Op::Pull => "hangar: POST /v1/images/pull (download + unpack)",
            Op::SkopeoCopyDir => "skopeo copy docker:// → dir: (download only)",
            Op::SkopeoCopyOci => "skopeo copy docker:// → oci: (download only)",
            Op::FirstCheckpoint => "first checkpoint after the bulk write (flushes it)",
            Op::CheckpointLive => "checkpoint, running machine",
            Op::CheckpointStopped => "checkpoint, stopped machine",
            Op::ForkLive => "fork of the running machine (created, not started)",
            Op::ForkFromCheckpoint => "fork from a checkpoint, settled (created, not started)",
            Op::RestoreStopped => "restore a checkpoint, stopped machine",
            Op::CopyUpper => "peer: cp -a --reflink=auto of the upper dir",
            Op::SnapshotIoctl => "floor: btrfs snapshot ioctl of the layer",
            Op::SuspendFreeze => "suspend, runc (freeze)",
            Op::ResumeThaw => "resume, runc (start of a frozen machine)",
            Op::SuspendToDisk => "suspend, runsc (checkpoint to disk)",
            Op::ResumeFromDisk => "resume, runsc (start = restore from disk)",
        }
    }
}

/// Samples of each operation one system was timed at.
pub type Samples = BTreeMap<Op, Vec<Duration>>;

/// What one system's section measured.
#[derive(Debug, Default)]
pub struct Section {
    pub samples: Samples,
    /// Facts about the run worth printing beside the numbers.
    pub notes: Vec<String>,
}

impl Section {
    pub fn push(&mut self, op: Op, t: Duration) {
        self.samples.entry(op).or_default().push(t);
    }
}

/// The systems measured, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum System {
    Hangar,
    Podman,
    Floor,
}

/// What became of one system's section.
#[derive(Debug)]
pub enum Outcome {
    Ran(Section),
    /// Not measurable here, and why (not an error).
    Skipped(String),
    Failed(String),
}

#[derive(Debug, Parser)]
#[command(
    name = "hangar-bench",
    about = "Times Hangar's machine lifecycle beside podman (runc) and the bare sandbox floor; `pull` times an \
             image pull beside skopeo. Run as root.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Timed iterations per operation (after one uncounted warm-up).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
    /// How long a stopped machine sits before the "settled" start, in ms:
    /// time for work a stop leaves in the background (Hangar prepares the
    /// next start then) to finish, as for a machine stopped a while ago.
    #[arg(long, default_value_t = 300)]
    settle_ms: u64,
    /// Measure only this system.
    #[arg(long, value_enum)]
    only: Option<System>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Times pulls of one image of several layers from a registry on
    /// loopback (Debian's docker-registry): Hangar's pull beside `skopeo
    /// copy` of the same image to a directory (`dir:` and `oci:`). Run as
    /// root.
    Pull {
        /// Timed pulls by each tool (after one uncounted warm-up).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        iterations: u32,
        /// The image's random bytes in MiB, split evenly over its 3 layers.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(3..))]
        size_mb: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Times checkpoint, fork and restore of a machine with little and with
    /// much written (many 1 MiB files), beside copying its upper directory
    /// (`cp -a --reflink=auto`) and the bare btrfs snapshot ioctl; and
    /// suspend/resume with runc (freeze) and runsc (to disk). Run as root.
    Checkpoint {
        /// Timed repetitions of each operation per size (after a warm-up).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
        iterations: u32,
        /// MiB written into the machine before timing, one size per run
        /// (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "10,2048")]
        sizes_mb: Vec<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Creates many machines at once, each timed from its create to its
    /// first exec's answer, beside machines created one at a time. Run as
    /// root.
    Burst {
        /// Machines created at once.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        machines: u32,
        /// Machines created one at a time first (after an uncounted one).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
        alone: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Times requests through the egress gateway beside the same requests
    /// sent directly, to one loopback upstream, with wrk (HTTP, and HTTPS
    /// with a secret swapped in). Run as root.
    Egress {
        /// Seconds of wrk per case.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        seconds: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Times requests through the ingress proxy beside the same requests
    /// sent directly and through nginx, with wrk; and a request that wakes
    /// a stopped machine beside starting it through the API. Run as root;
    /// needs wrk and nginx.
    Ingress {
        /// Seconds of wrk per case.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        seconds: u32,
        /// Rounds of the three steady-state cases, taking turns.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Wakes timed (and as many API starts).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
        wakes: u32,
        #[command(flatten)]
        common: Common,
    },
}

/// What both modes take.
#[derive(Debug, clap::Args)]
struct Common {
    /// Print JSON (with every sample) instead of the table.
    #[arg(long)]
    json: bool,
    /// The `hangar` binary (default: next to this one).
    #[arg(long)]
    hangar: Option<PathBuf>,
    /// The static hangar-init (default: scripts/build.sh's output for this
    /// build profile).
    #[arg(long)]
    init_binary: Option<PathBuf>,
    /// A directory on btrfs for the daemon's pool; if it is not on btrfs, a
    /// loop-mounted image is made in its parent and mounted there (and left
    /// mounted, as the integration tests leave it).
    #[arg(long, default_value = "/var/tmp/hangar-test-pool/mnt")]
    pool_root: PathBuf,
}

impl Common {
    /// The directory of this binary, and the `hangar` binary to run.
    fn binaries(&self) -> Result<(PathBuf, PathBuf)> {
        let exe = std::env::current_exe()?;
        let bin_dir = exe.parent().context("locating this binary")?.to_owned();
        let hangar = self.hangar.clone().unwrap_or_else(|| bin_dir.join("hangar"));
        Ok((bin_dir, hangar))
    }

    fn print<T: serde::Serialize>(&self, report: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            print!("{}", table(report));
        }
        Ok(())
    }
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    if !rustix::process::geteuid().is_root() {
        bail!("hangar-bench starts sandboxes and needs root");
    }
    process::install_interrupt_handler();
    match cli.mode {
        Some(Mode::Pull {
            iterations,
            size_mb,
            common,
        }) => pull(&common, iterations as usize, size_mb),
        Some(Mode::Checkpoint {
            iterations,
            sizes_mb,
            common,
        }) => checkpoints(&common, iterations as usize, &sizes_mb),
        Some(Mode::Egress { seconds, common }) => egress_overhead(&common, seconds),
        Some(Mode::Burst {
            machines,
            alone,
            common,
        }) => {
            let (cfg, image, _work) = daemon_and_image(&common)?;
            let report = burst::bench(&cfg, &image, machines as usize, alone as usize)?;
            process::check_interrupt()?;
            common.print(&report, burst::Report::table)?;
            Ok(0)
        }
        Some(Mode::Ingress {
            seconds,
            rounds,
            wakes,
            common,
        }) => {
            let (cfg, image, _work) = daemon_and_image(&common)?;
            let report = ingress::bench(&cfg, &image, seconds, rounds as usize, wakes as usize)?;
            process::check_interrupt()?;
            common.print(&report, ingress::Report::table)?;
            Ok(0)
        }
        None => lifecycle(&cli),
    }
}

fn lifecycle(cli: &Cli) -> Result<i32> {
    let iterations = cli.iterations as usize;
    let settle = Duration::from_millis(cli.settle_ms);
    let selected = |s: System| cli.only.is_none_or(|o| o == s);
    let (work, rootfs) = scratch_rootfs()?;

    let (bin_dir, hangar_bin) = cli.common.binaries()?;
    let layout = if selected(System::Hangar) || selected(System::Podman) {
        check_hangar(&hangar_bin)?;
        Some(image::make_layout(&hangar_bin, &rootfs, &work.path().join("layout"))?)
    } else {
        None
    };

    let host = report::HostInfo::collect(&hangar_bin);
    let mut outcomes: BTreeMap<System, Outcome> = BTreeMap::new();
    if let (true, Some(layout)) = (selected(System::Hangar), &layout) {
        eprintln!("hangar: {iterations} lifecycle cycles + {iterations} execs (after a warm-up)…");
        let outcome = match init_binary(cli.common.init_binary.as_deref(), &bin_dir) {
            Ok(init_binary) => {
                let cfg = hangar::Config {
                    hangar: hangar_bin.clone(),
                    init_binary,
                    pool_root: cli.common.pool_root.clone(),
                    serve_args: serve_args(work.path()),
                };
                let image = format!("oci:{}:latest", layout.display());
                outcome(hangar::bench(&cfg, &image, iterations, settle))
            }
            Err(e) => Outcome::Failed(format!("{e:#}")),
        };
        outcomes.insert(System::Hangar, outcome);
    }
    if let (true, Some(layout)) = (selected(System::Podman), &layout) {
        eprintln!("podman: {iterations} lifecycle cycles + {iterations} execs (after a warm-up)…");
        let outcome = match podman::unavailable() {
            Some(why) => Outcome::Skipped(why),
            None => outcome(podman::bench(layout, iterations, settle)),
        };
        outcomes.insert(System::Podman, outcome);
    }
    if selected(System::Floor) {
        eprintln!("floor: {iterations} runs of each (after a warm-up)…");
        outcomes.insert(System::Floor, outcome(floor::bench(&rootfs, work.path(), iterations)));
    }
    process::check_interrupt()?;

    let report = report::Report::new(std::env::args().collect(), host, iterations, cli.settle_ms, &outcomes);
    cli.common.print(&report, report::Report::table)?;
    let failed = outcomes.values().any(|o| matches!(o, Outcome::Failed(_)));
    Ok(if failed { 1 } else { 0 })
}

fn pull(common: &Common, iterations: usize, size_mb: u64) -> Result<i32> {
    let (bin_dir, hangar_bin) = common.binaries()?;
    check_hangar(&hangar_bin)?;
    let host = report::Host::collect();
    let cfg = hangar::Config {
        hangar: hangar_bin.clone(),
        init_binary: init_binary(common.init_binary.as_deref(), &bin_dir)?,
        pool_root: common.pool_root.clone(),
        serve_args: Vec::new(),
    };
    let (section, image) = pull::bench(&cfg, size_mb << 20, iterations)?;
    process::check_interrupt()?;
    let report = report::PullReport::new(
        std::env::args().collect(),
        host,
        &hangar_bin,
        iterations,
        image,
        section,
    );
    common.print(&report, report::PullReport::table)?;
    Ok(0)
}

fn checkpoints(common: &Common, iterations: usize, sizes_mb: &[u64]) -> Result<i32> {
    let (cfg, image, _work) = daemon_and_image(common)?;
    let run = checkpoint::bench(&cfg, &image, sizes_mb, iterations)?;
    process::check_interrupt()?;
    let report = report::SectionsReport::new(std::env::args().collect(), report::Host::collect(), iterations, run);
    common.print(&report, report::SectionsReport::table)?;
    Ok(0)
}

fn egress_overhead(common: &Common, seconds: u32) -> Result<i32> {
    let (cfg, image, _work) = daemon_and_image(common)?;
    let report = egress::bench(&cfg, &image, seconds)?;
    process::check_interrupt()?;
    common.print(&report, egress::Report::table)?;
    Ok(0)
}

/// What the checkpoint and egress modes start from: the daemon's config,
/// and the busybox image as an OCI layout in a scratch directory (removed
/// when the last value is dropped).
fn daemon_and_image(common: &Common) -> Result<(hangar::Config, String, tempfile::TempDir)> {
    let (bin_dir, hangar_bin) = common.binaries()?;
    check_hangar(&hangar_bin)?;
    let (work, rootfs) = scratch_rootfs()?;
    let layout = image::make_layout(&hangar_bin, &rootfs, &work.path().join("layout"))?;
    let cfg = hangar::Config {
        hangar: hangar_bin,
        init_binary: init_binary(common.init_binary.as_deref(), &bin_dir)?,
        pool_root: common.pool_root.clone(),
        serve_args: serve_args(work.path()),
    };
    Ok((cfg, format!("oci:{}:latest", layout.display()), work))
}

/// What every benchmark's daemon is started with: it may import the
/// images the benchmark makes in `dir`, and its pool (the tests', given by
/// `--pool-root`) has machines' disk limits on, as a pool it makes itself
/// would.
fn serve_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--import-dir".into(),
        dir.display().to_string(),
        "--pool-simple-quotas".into(),
    ]
}

/// A scratch directory (removed when dropped) holding the busybox rootfs
/// the benchmarks' images are made of.
fn scratch_rootfs() -> Result<(tempfile::TempDir, PathBuf)> {
    let work = tempfile::Builder::new()
        .prefix("hangar-bench")
        .tempdir()
        .context("creating a scratch directory")?;
    let rootfs = work.path().join("rootfs");
    image::make_rootfs(&rootfs)?;
    Ok((work, rootfs))
}

/// A section's result, its error printed as it happens so the rest goes on.
fn outcome(result: Result<Section>) -> Outcome {
    match result {
        Ok(s) => Outcome::Ran(s),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("  failed: {msg}");
            Outcome::Failed(msg)
        }
    }
}

fn check_hangar(hangar: &Path) -> Result<()> {
    if !hangar.is_file() {
        bail!(
            "{} missing: build it with scripts/build.sh, or pass --hangar",
            hangar.display()
        );
    }
    Ok(())
}

/// hangar-init is built static for an explicit target (scripts/build.sh), so
/// it sits under target/x86_64-unknown-linux-gnu/PROFILE/.
fn init_binary(given: Option<&Path>, bin_dir: &Path) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let mut candidates = vec![bin_dir.join("hangar-init")];
    if let (Some(profile), Some(target)) = (bin_dir.file_name(), bin_dir.parent()) {
        candidates.insert(
            0,
            target
                .join("x86_64-unknown-linux-gnu")
                .join(profile)
                .join("hangar-init"),
        );
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("the static hangar-init is missing: build it with scripts/build.sh, or pass --init-binary")
}

/// The first line of `PROGRAM --version`, for the record.
pub fn version_of(program: &Path) -> String {
    process::first_line(Command::new(program).arg("--version"))
}
