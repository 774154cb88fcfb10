//! What the daemon reads from a sandbox's cgroup itself (the runtime sets
//! the cgroup up and tears it down).

use std::path::{Path, PathBuf};

/// The cgroup, under each hierarchy's root, that holds every sandbox's.
const PARENT: &str = "hangar";

/// The cgroup path Hangar asks the runtime to use for a sandbox.
pub fn path_for(id: &str) -> String {
    format!("/{PARENT}/{id}")
}

fn is_v2(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

/// The file that counts OOM kills for a cgroup, on a v2 (unified) or v1
/// (memory controller) hierarchy.
fn oom_counter(root: &Path, id: &str) -> PathBuf {
    let rel = path_for(id);
    let rel = rel.trim_start_matches('/');
    if is_v2(root) {
        root.join(rel).join("memory.events")
    } else {
        root.join("memory").join(rel).join("memory.oom_control")
    }
}

/// Freezes (or thaws) every process of a sandbox through its cgroup, and
/// waits until the kernel says it is done: a frozen process is stopped
/// outside any system call, so no write is half done. Costs no runtime
/// invocation (`runc pause` would be a Go process start).
pub fn set_frozen(id: &str, frozen: bool) -> std::io::Result<()> {
    let root = Path::new("/sys/fs/cgroup");
    let rel = path_for(id);
    let rel = rel.trim_start_matches('/');
    // The file to write, what to write, the file that says when the
    // kernel is done, and the line it then holds.
    let (control, value, status, done) = if is_v2(root) {
        let dir = root.join(rel);
        let (value, done) = if frozen { ("1", "frozen 1") } else { ("0", "frozen 0") };
        (dir.join("cgroup.freeze"), value, dir.join("cgroup.events"), done)
    } else {
        let file = root.join("freezer").join(rel).join("freezer.state");
        let value = if frozen { "FROZEN" } else { "THAWED" };
        (file.clone(), value, file, value)
    };
    std::fs::write(&control, value)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if std::fs::read_to_string(&status)?.lines().any(|l| l.trim() == done) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{} did not reach {value} within 5 s", control.display()),
            ));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Kills every process in a sandbox's cgroup and lifts its memory limit
/// and CPU quota, so that they can finish dying: processes killed while
/// their cgroup is at its memory limit and out of CPU time (a fork bomb's)
/// may otherwise never get to exit. Best effort: a cgroup already gone is
/// fine.
pub fn kill_all(id: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let rel = path_for(id);
    let rel = rel.trim_start_matches('/');
    // Killed first, limits lifted after: nothing may run unlimited.
    if is_v2(root) {
        let dir = root.join(rel);
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        let _ = std::fs::write(dir.join("memory.max"), "max");
        let _ = std::fs::write(dir.join("cpu.max"), "max");
        return;
    }
    // Frozen (or freezing), nothing forks between our reading the list
    // and the kill; thawed in any case, or a SIGKILL never lands.
    let _ = set_frozen(id, true);
    if let Ok(pids) = std::fs::read_to_string(root.join("pids").join(rel).join("cgroup.procs")) {
        for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid read from the sandbox's cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = set_frozen(id, false);
    // The swap limit first: the memory limit may not exceed it.
    for (controller, file, value) in [
        ("memory", "memory.memsw.limit_in_bytes", "-1"),
        ("memory", "memory.limit_in_bytes", "-1"),
        ("cpu", "cpu.cfs_quota_us", "-1"),
    ] {
        let _ = std::fs::write(root.join(controller).join(rel).join(file), value);
    }
}

/// Caps how many processes all sandboxes together may have, through the
/// parent of their cgroups (the pids controller counts a cgroup's
/// descendants against its limit), so that machines can't take every pid
/// the host has, however many there are. Returns the cap set.
pub fn set_pids_budget(budget: Option<u64>) -> std::io::Result<u64> {
    let root = Path::new("/sys/fs/cgroup");
    let budget = match budget {
        Some(b) => b,
        // Half of what the kernel hands out, the other half the host's.
        None => pid_max()? / 2,
    };
    let dir = if is_v2(root) {
        // The controller must be on for children of the root first.
        std::fs::write(root.join("cgroup.subtree_control"), "+pids")?;
        root.join(PARENT)
    } else {
        root.join("pids").join(PARENT)
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("pids.max"), budget.to_string())?;
    Ok(budget)
}

/// The most pids (and threads) the kernel hands out at once.
fn pid_max() -> std::io::Result<u64> {
    let read = |file: &str| -> std::io::Result<u64> {
        std::fs::read_to_string(file)?
            .trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{file}: {e}")))
    };
    Ok(read("/proc/sys/kernel/pid_max")?.min(read("/proc/sys/kernel/threads-max")?))
}

/// How many processes the kernel's OOM killer killed in the sandbox's cgroup.
/// Zero if the cgroup is already gone or the kernel doesn't say.
pub fn oom_kills(id: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(oom_counter(Path::new("/sys/fs/cgroup"), id)) else {
        return 0;
    };
    parse_oom_kill(&text)
}

fn parse_oom_kill(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_both_formats() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        let v2 = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(super::parse_oom_kill(v1), 2);
        assert_eq!(super::parse_oom_kill(v2), 1);
        assert_eq!(super::parse_oom_kill(""), 0);
    }
}
