//! The OCI runtime spec (`config.json`) for a machine.
//!
//! Hardened by default, not by option: own pid, mount, uts, ipc, network
//! and cgroup namespaces; Docker's default capabilities less NET_RAW as the bounding
//! set; no_new_privs; a seccomp filter that refuses what a machine has no
//! business doing (new user namespaces, the kernel keyring, module loading,
//! …); Docker's masked and read-only /proc and /sys paths; `hangar-init`
//! bind-mounted read-only. runc always uses `pivot_root` for a rootfs that
//! is a mount point, and passes the container no descriptor of ours beyond
//! the one listening socket we hand over deliberately.

use std::path::PathBuf;

use serde_json::{Value, json};

/// Where hangar-init and its run directory appear inside every machine.
pub const INIT_PATH: &str = "/.hangar/init";
pub const RUN_DIR: &str = "/.hangar/run";

/// What a sandbox runs and with what limits.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub hostname: String,
    /// The mounted root filesystem (the overlay).
    pub rootfs: PathBuf,
    /// Host path of the static hangar-init binary.
    pub init_binary: PathBuf,
    /// Host directory mounted at [`RUN_DIR`] (the init's exit file).
    pub run_dir: PathBuf,
    /// The main process's argv.
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// Image or config user for the main process; root if `None`.
    pub user: Option<String>,
    /// `env` sets no `HOME`: the main process gets its user's (the runtime
    /// would otherwise give it root's).
    pub home_from_passwd: bool,
    /// Boot the sandbox but hold the main process until the init is told to
    /// start it: the expensive part of a start, done ahead of time.
    pub hold: bool,
    /// Whole CPUs of quota.
    pub cpus: u32,
    pub memory_mb: u64,
    pub pids_limit: u32,
    /// Capabilities on top of [`CAPABILITIES`] (kernel names, `CAP_…`).
    pub extra_capabilities: Vec<&'static str>,
    /// cgroup path (see [`crate::cgroup::path_for`]).
    pub cgroup_path: String,
    /// How the init gets its listening socket (see
    /// [`crate::OciRuntime::init_listen`]).
    pub listen: InitListen,
    /// Host directories bind-mounted at paths inside (volumes, egress settings).
    pub mounts: Vec<BindMount>,
    /// Have the init relay 127.0.0.1:PORT to this unix socket inside the
    /// machine (the egress gateway's, where it can't listen itself).
    pub egress_forward: Option<(u16, String)>,
    /// The init's stdout and stderr are the log's two segments, each to
    /// hold at most this many bytes.
    pub log_segment_bytes: u64,
}

/// A host directory made visible inside the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

/// How hangar-init gets the socket it serves the daemon on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitListen {
    /// Already bound by the daemon outside the machine and passed in as this
    /// descriptor: the machine can't touch the host path.
    Fd(i32),
    /// Bound by the init itself at this path inside the machine.
    Path(String),
}

/// Docker's default capability set without CAP_NET_RAW, as podman's: raw
/// and packet sockets let a machine forge traffic. `guest.cap_add` gives it
/// back to a machine that asks.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// Syscalls refused outright with EPERM. Most already need a capability the
/// machine lacks; refusing them here as well means a kernel bug in their
/// capability checks is not an escape. The keyring calls are here because
/// container root otherwise shares the host root's keyring, and `unshare`
/// because new user namespaces hand a process a fresh set of capabilities
/// over a large, bug-prone kernel surface.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
];

const CLONE_NEWUSER: u64 = 0x1000_0000;

fn seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            { "names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM },
            // clone's flags are in a register, so a new user namespace can be
            // refused precisely; clone3 passes them in memory, which seccomp
            // can't read, so it answers ENOSYS and libc falls back to clone.
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": libc::EPERM,
                "args": [{ "index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ" }]
            },
            { "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }
        ]
    })
}

fn init_args(spec: &SandboxSpec) -> Vec<String> {
    let mut args = vec![INIT_PATH.to_owned()];
    if let Some(user) = &spec.user {
        args.extend(["--user".to_owned(), user.clone()]);
        if spec.home_from_passwd {
            args.push("--home-from-passwd".to_owned());
        }
    }
    match &spec.listen {
        InitListen::Fd(fd) => args.extend(["--listen-fd".to_owned(), fd.to_string()]),
        InitListen::Path(p) => args.extend(["--listen-path".to_owned(), p.clone()]),
    }
    if spec.hold {
        args.push("--hold".to_owned());
    }
    if let Some((port, socket)) = &spec.egress_forward {
        args.extend(["--egress-forward".to_owned(), format!("{port}:{socket}")]);
    }
    args.extend(["--log-segment-bytes".to_owned(), spec.log_segment_bytes.to_string()]);
    args.push("--".to_owned());
    args.extend(spec.args.iter().cloned());
    args
}

/// The complete `config.json` for a machine's bundle.
pub fn oci_config(spec: &SandboxSpec) -> Value {
    let memory = spec.memory_mb.saturating_mul(1024 * 1024);
    let capabilities: Vec<&str> = CAPABILITIES.iter().chain(&spec.extra_capabilities).copied().collect();
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": init_args(spec),
            "env": spec.env,
            "cwd": spec.cwd,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "noNewPrivileges": true,
            // Not whatever the daemon runs with (a service manager may give
            // it a negative score, which machines could then claim too).
            "oomScoreAdj": 0,
        },
        "root": { "path": spec.rootfs, "readonly": false },
        "hostname": spec.hostname,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
              "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] },
            { "destination": INIT_PATH, "type": "bind", "source": spec.init_binary,
              "options": ["bind", "ro", "nosuid", "nodev"] },
            { "destination": RUN_DIR, "type": "bind", "source": spec.run_dir,
              "options": ["bind", "rw", "nosuid", "nodev", "noexec"] },
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }, { "type": "cgroup" },
            ],
            "cgroupsPath": spec.cgroup_path,
            "resources": {
                "devices": [{ "allow": false, "access": "rwm" }],
                "memory": { "limit": memory },
                "cpu": { "quota": i64::from(spec.cpus.max(1)) * 100_000, "period": 100_000 },
                "pids": { "limit": spec.pids_limit },
            },
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp(),
        },
    });
    let mounts = config["mounts"].as_array_mut().expect("mounts is an array");
    for m in &spec.mounts {
        mounts.push(json!({
            "destination": m.destination, "type": "bind", "source": m.source,
            "options": ["rbind", if m.readonly { "ro" } else { "rw" }, "nosuid", "nodev"],
        }));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            hostname: "m1".into(),
            mounts: Vec::new(),
            egress_forward: None,
            log_segment_bytes: 1 << 20,
            rootfs: "/data/m1/rootfs".into(),
            init_binary: "/usr/lib/hangar/hangar-init".into(),
            run_dir: "/data/m1/run".into(),
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: Some("1000".into()),
            home_from_passwd: false,
            hold: false,
            cpus: 2,
            memory_mb: 128,
            pids_limit: 512,
            extra_capabilities: Vec::new(),
            cgroup_path: "/hangar/m1".into(),
            listen: InitListen::Fd(3),
        }
    }

    #[test]
    fn init_wraps_the_main_process() {
        let c = oci_config(&spec());
        let args: Vec<String> = serde_json::from_value(c["process"]["args"].clone()).unwrap();
        assert_eq!(
            args,
            [
                INIT_PATH,
                "--user",
                "1000",
                "--listen-fd",
                "3",
                "--log-segment-bytes",
                "1048576",
                "--",
                "sh",
                "-c",
                "echo hi"
            ]
        );
    }

    #[test]
    fn hardened_by_default() {
        let c = oci_config(&spec());
        assert_eq!(c["process"]["noNewPrivileges"], true);
        let caps = c["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN" || c == "CAP_SYS_PTRACE"));
        let denied = c["linux"]["seccomp"]["syscalls"][0]["names"].as_array().unwrap();
        for call in ["keyctl", "add_key", "request_key", "unshare", "bpf"] {
            assert!(denied.iter().any(|d| d == call), "{call} allowed");
        }
        let init_mount = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == INIT_PATH)
            .unwrap();
        assert!(init_mount["options"].as_array().unwrap().iter().any(|o| o == "ro"));
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 128 * 1024 * 1024);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 200_000);
    }
}
