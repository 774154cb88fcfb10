//! Machines: configuration, lifecycle requests, exec, files and events.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::MachineState;

/// What a machine runs and with what resources. Stored as given and shown
/// back on every GET.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// `oci:/path/to/layout[:tag]` or `oci-archive:/path/file.tar[:tag]`.
    pub image: String,
    /// Overrides of the image's Entrypoint and Cmd.
    #[serde(default)]
    pub init: InitConfig,
    /// Added to (and overriding) the image's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartConfig>,
    /// Destroy the machine once its main process exits and it is not restarted.
    #[serde(default)]
    pub auto_destroy: bool,
    /// Free-form labels; `GET …/machines?metadata.KEY=VALUE` filters on them.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Files written into the machine's filesystem before each start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<MachineFile>,
    /// Sandbox runtime for this machine; the daemon's default if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    /// Volumes mounted into the machine. A volume belongs to one machine
    /// at a time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MachineMount>,
    /// Secrets (by name, in the machine's app) the machine gets as
    /// placeholders in its environment; the egress gateway swaps in the
    /// values on requests to each secret's hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Replaces the app's egress policy for this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::egress::EgressPolicy>,
    /// Ports the ingress proxy routes to, as in Fly's `services`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<MachineService>,
}

/// A port of the machine reachable through the ingress proxy, at
/// `{machine}.{app}.{domain}` (and `{app}.{domain}`, across the app's
/// machines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineService {
    /// The port the machine's process listens on (on 127.0.0.1 or any).
    pub internal_port: u16,
    /// Start the machine when a request comes for it while it is stopped
    /// or suspended (default true).
    #[serde(default = "default_true")]
    pub autostart: bool,
    /// What to do once the machine has had no requests or connections for
    /// `idle_timeout_s` (default `off`).
    #[serde(default)]
    pub autostop: Autostop,
    /// Seconds without traffic before `autostop` acts (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Autostop never leaves fewer than this many of the app's machines
    /// running (default 0).
    #[serde(default)]
    pub min_machines_running: u32,
    /// The proxy's listening ports this service takes requests from (every
    /// `--proxy-listen` port when empty). With several services, a request
    /// goes to the first whose `ports` holds the port it came in on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// How much traffic the machine takes (no limit when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ServiceConcurrency>,
}

impl MachineService {
    /// Whether requests that came in on the proxy's `listen_port` are for
    /// this service.
    pub fn takes(&self, listen_port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| p.port == listen_port)
    }
}

/// One of the proxy's listening ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
}

/// A machine's load limits, as Fly's `services.concurrency`. An app route
/// prefers machines below `soft_limit` (and wakes a stopped one before
/// going over it); no machine gets more than `hard_limit`: further requests
/// wait in the proxy's bounded queue, then get a 503.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceConcurrency {
    /// What counts as load: open client `connections` (default, as Fly's)
    /// or `requests` in flight.
    #[serde(rename = "type", default)]
    pub kind: ConcurrencyKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConcurrencyKind {
    /// A client connection counts from its first request to the machine
    /// until it closes (an upgraded connection too).
    #[default]
    Connections,
    /// A request counts until its answer has been sent (an upgraded
    /// connection until it closes).
    Requests,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Autostop {
    #[default]
    Off,
    Stop,
    /// Keep the memory (fast to wake; see suspend).
    Suspend,
}

/// A volume mounted into a machine, as in Fly's `mounts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineMount {
    /// The volume's id or name (in the machine's app).
    pub volume: String,
    /// Absolute path inside the machine.
    pub path: String,
}

/// Overrides of the image's process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Replaces entrypoint and cmd together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// User to run as (`uid`, `uid:gid`, `name`); the image's User if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// CPU, memory and process limits, enforced by the sandbox's cgroup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// CPU time in whole CPUs (a quota, not pinning).
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Fly's field, accepted for compatibility; only `shared` exists here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_kind: Option<String>,
    /// The most the machine's root filesystem may hold, beyond its image,
    /// in GiB; 10 by default. Writes past it fail inside the machine
    /// (EDQUOT), and nothing outside notices. Enforced where the kernel
    /// has btrfs simple quotas (6.7+); the daemon's log says if not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gb: Option<u32>,
    /// Maximum number of processes (threads count too); 1024 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u32>,
    /// Capabilities beyond the default set, which leaves out NET_RAW (raw
    /// and packet sockets: ping, traceroute, tcpdump) as podman does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<Capability>,
}

/// A capability a machine may ask for on top of the default set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub enum Capability {
    /// Raw and packet sockets.
    #[serde(rename = "NET_RAW")]
    NetRaw,
}

impl Capability {
    /// The name the kernel and the OCI runtime spec use.
    pub fn kernel_name(self) -> &'static str {
        match self {
            Capability::NetRaw => "CAP_NET_RAW",
        }
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_memory_mb() -> u64 {
    256
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            cpus: default_cpus(),
            memory_mb: default_memory_mb(),
            cpu_kind: None,
            disk_gb: None,
            pids_limit: None,
            cap_add: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartConfig {
    pub policy: RestartPolicy,
    /// For `on-failure`: restarts allowed before the machine is marked failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// What to do when the main process exits on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Stay stopped (or failed, if it exited non-zero).
    #[default]
    No,
    OnFailure,
    Always,
}

/// A file placed in the machine before it starts, as in Fly's `files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineFile {
    /// Absolute path inside the machine.
    pub guest_path: String,
    /// Base64 of the file's content.
    pub raw_value: String,
    /// Permission bits, e.g. 420 (0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// OCI runtime runc: the default.
    Runc,
    /// gVisor: a user-space kernel between the machine and the host.
    Runsc,
}

impl RuntimeKind {
    pub fn binary(self) -> &'static str {
        match self {
            Self::Runc => "runc",
            Self::Runsc => "runsc",
        }
    }
}

/// `POST /v1/apps/{app}/machines`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachineRequest {
    /// Unique within the app; generated if absent.
    #[serde(default)]
    pub name: Option<String>,
    pub config: MachineConfig,
    /// Create without starting (state `created`).
    #[serde(default)]
    pub skip_launch: bool,
    /// Accepted for Fly compatibility and ignored: one host, one region.
    #[serde(default, skip_serializing)]
    pub region: Option<String>,
}

/// The image a machine was created from, resolved at create time.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ImageRef {
    pub reference: String,
    /// Manifest digest, `sha256:…`.
    pub digest: String,
}

/// How the main process last ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ExitInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed by the kernel for exceeding `guest.memory_mb`.
    #[serde(default)]
    pub oom_killed: bool,
    /// Stopped on request rather than ending on its own.
    #[serde(default)]
    pub requested_stop: bool,
    pub exited_at: String,
}

/// A machine as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct Machine {
    /// 14 hex characters.
    pub id: String,
    pub name: String,
    pub app: String,
    pub state: MachineState,
    pub config: MachineConfig,
    pub image_ref: ImageRef,
    /// Changes on every start: one sandbox instance.
    pub instance_id: String,
    pub created_at: String,
    pub updated_at: String,
    /// Seconds spent in state `started`, summed over the machine's life;
    /// the metered quantity (a stopped machine costs only disk).
    pub run_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// Which daemon owns the machine.
    pub host: String,
}

/// `GET /v1/apps/{app}/machines` query. `metadata.KEY=VALUE` pairs filter too.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListMachinesQuery {
    /// Only machines in this state (comma-separated list allowed).
    pub state: Option<String>,
    /// Include destroyed machines.
    #[serde(default)]
    pub include_deleted: bool,
}

/// `POST …/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Signal name or number to send first; `SIGTERM` by default.
    #[serde(default)]
    pub signal: Option<String>,
    /// How long to wait before SIGKILL: seconds, or a duration like `10s`, `500ms`.
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// A duration as Fly writes it: a number of seconds or a string like `5s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Duration {
    Seconds(f64),
    Text(String),
}

impl Duration {
    pub fn to_std(&self) -> Result<std::time::Duration, String> {
        let secs = match self {
            Self::Seconds(s) => *s,
            Self::Text(t) => parse_duration_text(t)?,
        };
        if !(0.0..=86_400.0).contains(&secs) {
            return Err(format!("duration {secs}s is out of range 0..86400s"));
        }
        Ok(std::time::Duration::from_secs_f64(secs))
    }
}

fn parse_duration_text(t: &str) -> Result<f64, String> {
    let t = t.trim();
    let bad = || format!("invalid duration {t:?}: use seconds or e.g. \"500ms\", \"10s\", \"2m\"");
    let (num, unit) = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((t, "s"), |i| (&t[..i], &t[i..]));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    Ok(n * scale)
}

/// `POST …/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// `SIGTERM`, `TERM` or a number.
    pub signal: String,
}

/// `GET …/wait`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// The state to wait for: `started`, `stopped`, `failed` or `destroyed`.
    #[serde(default = "default_wait_state")]
    pub state: String,
    /// Seconds to wait at most (default 60, at most 600).
    pub timeout: Option<u64>,
}

fn default_wait_state() -> String {
    "started".into()
}

/// `DELETE …/{id}`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DestroyQuery {
    /// Stop a running machine first instead of answering 409.
    #[serde(default)]
    pub force: bool,
}

/// A lifecycle event, oldest first in listings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct MachineEvent {
    /// e.g. `create`, `pull` (the image's download while creating: detail
    /// has `phase` `pulling`, `pulled` or `failed`, bytes and layers),
    /// `start`, `stop`, `exit`, `restart`, `destroy`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The state the machine reached, or `error`.
    pub status: String,
    /// `user`, `daemon` (restart policy, recovery) or `machine` (it exited).
    pub source: String,
    /// Milliseconds since the Unix epoch, as Fly reports it.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// `POST …/exec`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// argv; the first element is looked up in PATH.
    pub command: Vec<String>,
    /// Written to the command's stdin, then closed.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Added to the machine's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this user (`uid`, `uid:gid`, `name`); root if absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Seconds before the command (its whole process group) is killed. No
    /// limit when absent.
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// Result of a buffered exec. Output is UTF-8 with invalid bytes replaced;
/// use the streaming form for binary output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ExecResponse {
    /// Absent when the command was killed by a signal.
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    #[serde(default)]
    pub timed_out: bool,
}

/// One line of the streaming exec (`POST …/exec/stream`, NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecStreamEvent {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit {
        exit_code: Option<i32>,
        exit_signal: Option<i32>,
        timed_out: bool,
    },
    Error {
        error: String,
    },
}

/// File metadata inside a machine.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct FileInfo {
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// Directory listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileInfo>,
}

/// `?path=` for file operations.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilePathQuery {
    /// Absolute path inside the machine.
    pub path: String,
    /// `PUT`: permission bits in octal, e.g. `755` (default 644).
    pub mode: Option<String>,
    /// `PUT`/`mkdir`: create missing parent directories.
    #[serde(default)]
    pub parents: bool,
    /// `DELETE`: remove a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// A process inside a machine.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub state: String,
    pub rss_kb: u64,
    pub command: String,
}

/// `GET …/logs`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep the response open and stream new output as it is written.
    #[serde(default)]
    pub follow: bool,
    /// Only the last N bytes of existing output.
    pub tail_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |v: &str| serde_json::from_str::<Duration>(v).unwrap().to_std();
        assert_eq!(d("5").unwrap().as_secs(), 5);
        assert_eq!(d("\"500ms\"").unwrap().as_millis(), 500);
        assert_eq!(d("\"2m\"").unwrap().as_secs(), 120);
        assert!(d("\"5 parsecs\"").is_err());
        assert!(d("-1").is_err());
    }

    #[test]
    fn config_rejects_unknown_fields_and_fills_defaults() {
        let c: MachineConfig = serde_json::from_str(r#"{"image":"oci:/x"}"#).unwrap();
        assert_eq!(c.restart, None);
        assert!(serde_json::from_str::<MachineConfig>(r#"{"image":"x","imag":1}"#).is_err());
        let g: GuestConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(g, GuestConfig::default());
    }
}
