//! Checkpoint, fork and restore of a machine with little and with much
//! written, beside the peer (copying its upper directory with `cp -a
//! --reflink=auto`, what a copy-based design does) and the floor (one btrfs
//! snapshot ioctl); then suspend and resume.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hangar_rootfs::Pool as _;
use reqwest::Method;
use serde_json::{Value, json};

use crate::hangar::{self, APP, Daemon, create, machine, stop};
use crate::process::{check_interrupt, run_quiet};
use crate::stats::timed;
use crate::{Op, Section};

/// Pause after an operation that leaves work in the background.
const SETTLE: Duration = Duration::from_millis(300);

/// One run: a section per size written, and one for suspend/resume.
#[derive(Debug)]
pub struct Run {
    pub sections: Vec<(String, Section)>,
}

pub fn bench(cfg: &hangar::Config, image: &str, sizes_mb: &[u64], iterations: usize) -> Result<Run> {
    let daemon = Daemon::start(cfg)?;
    let result = measure(&daemon, image, sizes_mb, iterations);
    if result.is_err() && check_interrupt().is_ok() {
        daemon.print_log_tail();
    }
    result
}

fn measure(d: &Daemon, image: &str, sizes_mb: &[u64], iterations: usize) -> Result<Run> {
    d.call(Method::POST, "/v1/apps", Some(json!({ "app_name": APP })))?;
    let mut sections = Vec::new();
    for &size in sizes_mb {
        eprintln!("checkpoint: {size} MiB written, {iterations} of each operation (after a warm-up)…");
        let section = sized(d, image, size, iterations).with_context(|| format!("with {size} MiB written"))?;
        sections.push((format!("{size} MiB written in {size} files"), section));
    }
    eprintln!("suspend: {iterations} suspend/resume cycles with runc, and with runsc…");
    sections.push(("suspend and resume".into(), suspend(d, image, iterations)?));
    Ok(Run { sections })
}

fn post(d: &Daemon, path: &str, body: Value) -> Result<Value> {
    d.call(Method::POST, path, Some(body))
}

fn sh(d: &Daemon, id: &str, script: &str) -> Result<()> {
    let r = post(
        d,
        &format!("{}/exec", machine(id)),
        json!({ "command": ["sh", "-c", script] }),
    )?;
    if r["exit_code"] != 0 {
        bail!("{script}: {r}");
    }
    Ok(())
}

fn id_of(v: &Value) -> Result<String> {
    Ok(v["id"].as_str().context("answer without an id")?.to_owned())
}

fn destroy(d: &Daemon, id: &str) -> Result<()> {
    d.call(Method::DELETE, &format!("{}?force=true", machine(id)), None)?;
    Ok(())
}

fn sized(d: &Daemon, image: &str, size_mb: u64, iterations: usize) -> Result<Section> {
    let mut section = Section::default();
    let id = create(d, image)?;
    // Incompressible, in 1 MiB files, as package installs leave them;
    // not synced, as a machine would not.
    sh(
        d,
        &id,
        &format!(
            "mkdir -p /data && i=0; while [ $i -lt {size_mb} ]; do i=$((i+1)); \
             dd if=/dev/urandom of=/data/f$i bs=1048576 count=1 2>/dev/null; done"
        ),
    )?;
    let cps = format!("{}/checkpoints", machine(&id));
    let (first, t) = timed(|| post(d, &cps, json!({ "comment": "after the bulk write" })))?;
    section.push(Op::FirstCheckpoint, t);
    let mut last_checkpoint = id_of(&first)?;

    let pool = hangar_rootfs::BtrfsPool::open(d.pool_dir())?;
    let layer = format!("machine-{id}");
    for i in 0..=iterations {
        check_interrupt()?;
        let keep = i > 0;
        sh(d, &id, &format!("echo {i} > /data/step"))?;
        let (cp, t) = timed(|| post(d, &cps, json!({})))?;
        if keep {
            section.push(Op::CheckpointLive, t);
        }
        last_checkpoint = id_of(&cp)?;
        let (fork, t) = timed(|| post(d, &format!("{}/fork", machine(&id)), json!({ "skip_launch": true })))?;
        if keep {
            section.push(Op::ForkLive, t);
        }
        destroy(d, &id_of(&fork)?)?;

        let name = format!("floor-{i}");
        let (_, t) = timed(|| pool.snapshot(&layer, &name, true))?;
        if keep {
            section.push(Op::SnapshotIoctl, t);
        }
        pool.delete(&name)?;

        // Last: deleting the copy leaves much to commit.
        let copy = d.pool_dir().join(format!("copy-{i}"));
        let upper = pool.path(&layer).join("upper");
        let ((), t) = timed(|| run_quiet(Command::new("cp").args(["-a", "--reflink=auto"]).arg(&upper).arg(&copy)))?;
        if keep {
            section.push(Op::CopyUpper, t);
        }
        std::fs::remove_dir_all(&copy).with_context(|| format!("removing {}", copy.display()))?;
        // Committed here, untimed, rather than inside the next snapshot.
        rustix::fs::syncfs(std::fs::File::open(d.pool_dir())?)?;
    }

    stop(d, &id)?;
    for i in 0..=iterations {
        check_interrupt()?;
        let keep = i > 0;
        let (cp, t) = timed(|| post(d, &cps, json!({})))?;
        if keep {
            section.push(Op::CheckpointStopped, t);
        }
        let restore = format!("{cps}/{last_checkpoint}/restore");
        let (_, t) = timed(|| post(d, &restore, json!({})))?;
        if keep {
            section.push(Op::RestoreStopped, t);
        }
        last_checkpoint = id_of(&cp)?;
        // A restore leaves the next start's preparation (a `runc run`)
        // running in the background; let it finish, as between an agent's
        // steps, so it is not counted in the fork.
        std::thread::sleep(SETTLE);
        let body = json!({ "checkpoint": last_checkpoint, "skip_launch": true });
        let (fork, t) = timed(|| post(d, &format!("{}/fork", machine(&id)), body))?;
        if keep {
            section.push(Op::ForkFromCheckpoint, t);
        }
        destroy(d, &id_of(&fork)?)?;
        std::thread::sleep(SETTLE);
    }
    destroy(d, &id)?;
    Ok(section)
}

fn suspend(d: &Daemon, image: &str, iterations: usize) -> Result<Section> {
    let mut section = Section::default();
    for (runtime, suspend_op, resume_op) in [
        ("runc", Op::SuspendFreeze, Op::ResumeThaw),
        ("runsc", Op::SuspendToDisk, Op::ResumeFromDisk),
    ] {
        let m = post(
            d,
            &format!("/v1/apps/{APP}/machines"),
            json!({ "config": { "image": image, "runtime": runtime } }),
        )?;
        let id = id_of(&m)?;
        hangar::expect_state(&m, "started", "create")?;
        for i in 0..=iterations {
            check_interrupt()?;
            let (m, t_suspend) = timed(|| post(d, &format!("{}/suspend", machine(&id)), json!({})))?;
            hangar::expect_state(&m, "suspended", "suspend")?;
            std::thread::sleep(Duration::from_millis(20));
            let (m, t_resume) = timed(|| post(d, &format!("{}/start", machine(&id)), json!({})))?;
            hangar::expect_state(&m, "started", "resume")?;
            if i > 0 {
                section.push(suspend_op, t_suspend);
                section.push(resume_op, t_resume);
            }
        }
        destroy(d, &id)?;
    }
    Ok(section)
}
