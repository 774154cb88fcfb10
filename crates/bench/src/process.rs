//! External commands, and Ctrl-C noticed between iterations so that every
//! section still cleans up what it made.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag that [`check_interrupt`] reads, so
/// the benchmark stops at the next iteration and its guards' `Drop` run.
/// Children still die of the signal (exec resets handlers), which is fine:
/// the iteration they belong to fails and cleanup follows.
pub fn install_interrupt_handler() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; signal(2) has no other preconditions.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// Fails once SIGINT or SIGTERM has arrived.
pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `cmd` to completion and returns its stdout; a failure carries its
/// stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} exited with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], discarding stdout (nothing to read on the timed path).
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    run(cmd.stdout(Stdio::null())).map(drop)
}

/// The command line, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first line of `cmd`'s stdout, or why there is none.
pub fn first_line(cmd: &mut Command) -> String {
    match run(cmd) {
        Ok(out) => out.lines().next().unwrap_or("").trim().to_owned(),
        Err(e) => format!("unavailable ({e:#})"),
    }
}
