//! Process listing from `/proc`.

use std::fs;

use hangar_init_protocol::{ErrorReply, ProcessInfo};

/// Every process visible in `/proc`, sorted by pid. Processes that vanish
/// while we look are skipped.
pub fn list() -> Result<Vec<ProcessInfo>, ErrorReply> {
    let rd = fs::read_dir("/proc").map_err(|e| ErrorReply::from_io(&e, "/proc"))?;
    let mut procs: Vec<ProcessInfo> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_process)
        .collect();
    procs.sort_by_key(|p| p.pid);
    Ok(procs)
}

/// Pid and parent pid of every process, for finding our descendants.
pub fn parents() -> Vec<(u32, u32)> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_stat(&stat)?.2))
        })
        .collect()
}

fn read_process(pid: u32) -> Option<ProcessInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (comm, state, ppid) = parse_stat(&stat)?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let (uid, rss_kb) = parse_status(&status);
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    Some(ProcessInfo {
        pid,
        ppid,
        uid,
        state,
        rss_kb,
        command: command_line(&cmdline, &comm),
    })
}

/// `(comm, state, ppid)` from `/proc/PID/stat`. The comm is delimited by the
/// first `(` and the last `)` since it may itself contain spaces and parens.
fn parse_stat(stat: &str) -> Option<(String, String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.to_owned();
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// Real uid and VmRSS (kB) from `/proc/PID/status`; zombies have no VmRSS.
fn parse_status(status: &str) -> (u32, u64) {
    let mut uid = 0;
    let mut rss = 0;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uid = v.split_whitespace().next().and_then(|u| u.parse().ok()).unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("VmRSS:") {
            rss = v.split_whitespace().next().and_then(|r| r.parse().ok()).unwrap_or(0);
        }
    }
    (uid, rss)
}

fn command_line(cmdline: &[u8], comm: &str) -> String {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        format!("[{comm}]")
    } else {
        args.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = "1234 (my (weird) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(stat), Some(("my (weird) prog".into(), "S".into(), 1)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_status() {
        let status = "Name:\tsleep\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\t0\t0\t0\nVmRSS:\t    1536 kB\n";
        assert_eq!(parse_status(status), (1000, 1536));
        assert_eq!(parse_status("Name:\tzombie\nUid:\t5\t5\t5\t5\n"), (5, 0));
    }

    #[test]
    fn command_lines() {
        assert_eq!(command_line(b"sleep\x0030\x00", "sleep"), "sleep 30");
        assert_eq!(command_line(b"", "kthreadd"), "[kthreadd]");
    }

    #[test]
    fn lists_self() {
        let me = std::process::id();
        let procs = list().unwrap();
        let p = procs.iter().find(|p| p.pid == me).expect("own process listed");
        assert!(p.rss_kb > 0);
        assert!(parents().iter().any(|&(pid, _)| pid == me));
    }
}
