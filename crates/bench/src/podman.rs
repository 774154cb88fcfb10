//! The peer: podman with runc on the same busybox image, driven through its
//! CLI the way a user would.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::process::{check_interrupt, run, run_quiet, which};
use crate::stats::timed;
use crate::{Op, Section};

/// `podman run` flags. `--runtime runc`: the runtime Hangar uses. The two
/// ulimits: podman's defaults ask for more than this host lets a process set
/// (HOST.md; runc fails with "error setting rlimit"). `--init`: like
/// hangar-init, an init as PID 1 that passes SIGTERM on; without it busybox
/// `sleep` is PID 1, ignores SIGTERM and every stop waits its full timeout.
/// `--network none`: a network namespace with loopback only, which is what
/// a Hangar machine gets.
pub const RUN_FLAGS: &[&str] = &[
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
    "--init",
    "--network",
    "none",
];

/// Why podman can't be measured here, if it can't.
pub fn unavailable() -> Option<String> {
    if which("podman").is_none() {
        return Some("podman not found on PATH (Debian: apt-get install podman)".into());
    }
    if which("skopeo").is_none() {
        return Some(
            "skopeo (to load the OCI layout into podman's storage) not found on PATH (Debian: apt-get install skopeo)"
                .into(),
        );
    }
    if which("runc").is_none() {
        return Some("runc not found on PATH (Debian: apt-get install runc)".into());
    }
    None
}

/// Measures create, start, exec and stop; one uncounted warm-up cycle first.
/// `settle` is the idle time before the "settled" start, as for Hangar.
pub fn bench(layout: &Path, iterations: usize, settle: Duration) -> Result<Section> {
    let mut p = Podman::load(layout)?;
    let mut section = Section::default();
    for i in 0..=iterations {
        check_interrupt()?;
        let cycle = p
            .cycle(settle)
            .with_context(|| format!("podman lifecycle iteration {i}"))?;
        if i > 0 {
            for (op, t) in cycle {
                section.push(op, t);
            }
        }
    }
    let name = p.run()?;
    for i in 0..=iterations {
        check_interrupt()?;
        let ((), t) = timed(|| podman(&["exec", &name, "true"]))?;
        if i > 0 {
            section.push(Op::Exec, t);
        }
    }
    p.remove(&name)?;
    section.notes.push(format!("podman run flags: {}", RUN_FLAGS.join(" ")));
    Ok(section)
}

fn podman(args: &[&str]) -> Result<()> {
    run_quiet(Command::new("podman").args(args))
}

/// `podman start`, then `podman exec … true`: the time until each returned.
fn start_then_exec(name: &str) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    podman(&["start", name])?;
    let t_start = t0.elapsed();
    podman(&["exec", name, "true"])?;
    Ok((t_start, t0.elapsed()))
}

/// The loaded image and the containers made from it; dropping it removes
/// both.
struct Podman {
    /// `localhost/hangar-bench-busybox:PID`.
    image: String,
    containers: Vec<String>,
    next: usize,
}

impl Podman {
    fn load(layout: &Path) -> Result<Podman> {
        // skopeo, not `podman pull oci:…`: podman would name the image after
        // the layout's path, which need not be a valid image name.
        let image = format!("localhost/hangar-bench-busybox:{}", std::process::id());
        run(Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("containers-storage:{image}")))
        .context("loading the busybox OCI layout into podman's storage")?;
        Ok(Podman {
            image,
            containers: Vec::new(),
            next: 0,
        })
    }

    /// `podman run -d`: a started container; returns its name.
    fn run(&mut self) -> Result<String> {
        let name = format!("hangar-bench-{}-{}", std::process::id(), self.next);
        self.next += 1;
        self.containers.push(name.clone());
        run_quiet(
            Command::new("podman")
                .args(["run", "-d", "--name", &name])
                .args(RUN_FLAGS)
                .arg(&self.image),
        )?;
        Ok(name)
    }

    fn remove(&mut self, name: &str) -> Result<()> {
        run_quiet(Command::new("podman").args(["rm", "-f", "-t", "0", name]))?;
        self.containers.retain(|c| c != name);
        Ok(())
    }

    /// The same cycle as Hangar's: create → stop → (settle) → start → first
    /// exec → stop → start at once → first exec → stop → destroy, timed.
    fn cycle(&mut self, settle: Duration) -> Result<Vec<(Op, Duration)>> {
        let (name, t_create) = timed(|| self.run())?;
        let stop = || podman(&["stop", "-t", "10", &name]);
        let ((), t_stop) = timed(stop)?;
        std::thread::sleep(settle);
        let (t_start, t_start_exec) = start_then_exec(&name)?;
        stop()?;
        let (_, t_after_stop) = start_then_exec(&name)?;
        stop()?;
        let ((), t_destroy) = timed(|| self.remove(&name))?;
        Ok(vec![
            (Op::Create, t_create),
            (Op::Stop, t_stop),
            (Op::StartApi, t_start),
            (Op::StartToExec, t_start_exec),
            (Op::StartAfterStop, t_after_stop),
            (Op::Destroy, t_destroy),
        ])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if !self.containers.is_empty()
            && let Err(e) = run_quiet(
                Command::new("podman")
                    .args(["rm", "-f", "-i", "-t", "0"])
                    .args(&self.containers),
            )
        {
            eprintln!("warning: removing podman containers: {e:#}");
        }
        if let Err(e) = run_quiet(Command::new("podman").args(["rmi", "-f", &self.image])) {
            eprintln!("warning: removing podman image {}: {e:#}", self.image);
        }
    }
}
