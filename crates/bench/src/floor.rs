//! The floor: what a sandbox start costs in bare syscalls (`unshare` into
//! fresh namespaces, `chroot`, exec `true`), what one process spawn costs
//! (the least an exec can do), and what single runc invocations cost.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::process::{check_interrupt, run, run_quiet, which};
use crate::stats::timed;
use crate::{Op, Section};

/// One timed floor operation; its argument is the iteration number.
type Step<'a> = Box<dyn FnMut(usize) -> Result<()> + 'a>;

/// Measures every floor operation `iterations` times after one warm-up.
/// `rootfs` is the busybox root filesystem; `work` a scratch directory.
pub fn bench(rootfs: &Path, work: &Path, iterations: usize) -> Result<Section> {
    let true_bin = which("true").context("true not found on PATH")?;
    let runc = match which("runc") {
        Some(_) => Some(Runc::new(rootfs, work)?),
        None => None,
    };
    let mut ops: Vec<(Op, Step)> = vec![
        (
            Op::UnshareTrue,
            Box::new(|_| {
                run_quiet(
                    Command::new("unshare")
                        .args(["--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "chroot"])
                        .arg(rootfs)
                        .arg("true"),
                )
            }),
        ),
        (Op::HostSpawnTrue, Box::new(|_| run_quiet(&mut Command::new(&true_bin)))),
    ];

    if let Some(runc) = &runc {
        let pid = std::process::id();
        ops.push((
            Op::RuncRun,
            Box::new(move |i| {
                run_quiet(
                    runc.cmd()
                        .arg("run")
                        .arg("--bundle")
                        .arg(&runc.bundle)
                        .arg(format!("hangar-bench-floor-{pid}-{i}")),
                )
            }),
        ));
        // What Hangar calls before each `runc run` (to clear a stale sandbox).
        ops.push((
            Op::RuncDelete,
            Box::new(|_| run_quiet(runc.cmd().args(["delete", "--force", "hangar-bench-absent"]))),
        ));
        ops.push((
            Op::RuncVersion,
            Box::new(|_| run_quiet(Command::new("runc").arg("--version"))),
        ));
    }

    let mut section = Section::default();
    for (op, f) in &mut ops {
        for i in 0..=iterations {
            check_interrupt()?;
            let ((), t) = timed(|| f(i)).with_context(|| format!("floor: {}", op.label()))?;
            if i > 0 {
                section.push(*op, t);
            }
        }
    }
    if runc.is_none() {
        section.notes.push("runc not found on PATH: no runc floor".into());
    }
    Ok(section)
}

/// A minimal runc bundle (`runc spec`, running `true` on the busybox rootfs,
/// read-only) with its own state root. Dropping it deletes any sandbox left
/// in that root.
struct Runc {
    bundle: PathBuf,
    state: PathBuf,
}

impl Runc {
    fn new(rootfs: &Path, work: &Path) -> Result<Runc> {
        let bundle = work.join("runc-bundle");
        let state = work.join("runc-state");
        std::fs::create_dir_all(&bundle)?;
        std::fs::create_dir_all(&state)?;
        let r = Runc { bundle, state };
        run(Command::new("runc").arg("spec").arg("--bundle").arg(&r.bundle))?;
        let path = r.bundle.join("config.json");
        let mut spec: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!(["true"]);
        spec["root"] = json!({ "path": rootfs, "readonly": true });
        std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
        Ok(r)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.state);
        c
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let Ok(list) = run(self.cmd().args(["list", "-q"])) else {
            return;
        };
        for id in list.lines().filter(|l| !l.is_empty()) {
            if let Err(e) = run_quiet(self.cmd().args(["delete", "--force", id])) {
                eprintln!("warning: deleting runc sandbox {id}: {e:#}");
            }
        }
    }
}
