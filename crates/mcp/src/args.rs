//! The tools' arguments and the answers that are not REST types as they
//! are. Field names are the REST API's; `machine_id` and `checkpoint_id`
//! name what the REST paths call `{id}` and `{checkpoint}`.

use std::collections::BTreeMap;

use hangar_api::{GuestConfig, MachineMount, MachineService, MachineState, RuntimeKind};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The app the CLI and these tools use when none is named; created on
/// first use.
pub const DEFAULT_APP: &str = "default";

fn default_app() -> String {
    DEFAULT_APP.into()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppArgs {
    /// The app (a namespace of machines, volumes and secrets); `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAppArgs {
    /// The new app's name: 1-63 lowercase letters, digits and dashes.
    pub app: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListMachinesArgs {
    /// The app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// Only machines in these states.
    #[serde(default)]
    pub state: Vec<MachineState>,
}

/// One machine.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name.
    pub machine_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachineArgs {
    /// The app to create it in; `default` if absent (created if missing).
    #[serde(default = "default_app")]
    pub app: String,
    /// Unique within the app (lowercase letters, digits, dashes); generated if absent.
    #[serde(default)]
    pub name: Option<String>,
    /// A registry image (`debian:12`, `ghcr.io/org/app:1.2`) or a local
    /// `oci:/path/to/layout[:tag]`. A registry image must have been pulled
    /// (pull_image) first.
    pub image: String,
    /// The main process (argv), replacing the image's entrypoint and command.
    /// A long-running one such as `["sleep", "infinity"]` keeps the machine
    /// started; the machine stops when it exits.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Environment variables added to the image's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// CPUs and memory (default 1 CPU, 256 MB).
    #[serde(default)]
    pub guest: Option<GuestConfig>,
    /// Ports the ingress proxy routes to: `{name}.{app}.localhost` on the
    /// proxy's port reaches `internal_port`, waking the machine if it is stopped.
    #[serde(default)]
    pub services: Vec<MachineService>,
    /// Volumes to mount (create_volume first).
    #[serde(default)]
    pub mounts: Vec<MachineMount>,
    /// Names of the app's secrets to give the machine as placeholders.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// `runc` (default) or `runsc` (gVisor: a user-space kernel, stronger isolation).
    #[serde(default)]
    pub runtime: Option<RuntimeKind>,
    /// Create it stopped instead of starting it.
    #[serde(default)]
    pub skip_launch: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopMachineArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name.
    pub machine_id: String,
    /// Seconds to wait after SIGTERM before SIGKILL (default 10).
    #[serde(default)]
    pub timeout: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestroyMachineArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name.
    pub machine_id: String,
    /// Stop a started machine first instead of failing.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitMachineArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name.
    pub machine_id: String,
    /// The state to wait for: `started`, `stopped`, `failed` or `destroyed`.
    pub state: MachineState,
    /// Seconds to wait at most (default 60, at most 600).
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name. It must be started.
    pub machine_id: String,
    /// argv, e.g. `["sh", "-c", "make test 2>&1"]`; the first element is
    /// looked up in PATH. No shell unless you run one.
    pub command: Vec<String>,
    /// Written to the command's stdin, then closed.
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as (`uid`, `uid:gid` or a name); root if absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Seconds before the command and everything it started are killed
    /// (default 600).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// What a command did: the REST exec's answer, each stream cut to its
/// last 64 KiB.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ExecResult {
    #[serde(flatten)]
    pub output: hangar_api::ExecResponse,
    /// Output was longer than 64 KiB and only its end is here.
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Text (the file must be UTF-8).
    #[default]
    Utf8,
    /// Any bytes, base64-encoded.
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name. It must be started.
    pub machine_id: String,
    /// Absolute path inside the machine.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name. It must be started.
    pub machine_id: String,
    /// Absolute path inside the machine.
    pub path: String,
    /// `utf8` (default) for text, `base64` for binary files.
    #[serde(default)]
    pub encoding: Encoding,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FileContent {
    pub path: String,
    pub content: String,
    pub encoding: Encoding,
    /// Bytes in the file.
    pub size: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name. It must be started.
    pub machine_id: String,
    /// Absolute path inside the machine. Replaced atomically if it exists.
    pub path: String,
    /// The whole new content.
    pub content: String,
    /// How `content` is encoded: `utf8` (default) or `base64`.
    #[serde(default)]
    pub encoding: Encoding,
    /// Permission bits in octal, e.g. `755` for a script (default `644`).
    #[serde(default)]
    pub mode: Option<String>,
    /// Create missing parent directories (default true).
    #[serde(default = "default_true")]
    pub parents: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveFileArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name. It must be started.
    pub machine_id: String,
    /// Absolute path inside the machine.
    pub path: String,
    /// Remove a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name.
    pub machine_id: String,
    /// Only the last this many bytes (default 16384, at most 1048576).
    #[serde(default)]
    pub tail_bytes: Option<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Logs {
    /// The main process's stdout and stderr, as written.
    pub text: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpointArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name (started or stopped).
    pub machine_id: String,
    /// What this step was, for whoever reads the list later.
    #[serde(default)]
    pub comment: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name.
    pub machine_id: String,
    /// The checkpoint's id (create_checkpoint, list_checkpoints).
    pub checkpoint_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiffCheckpointArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine's id or name.
    pub machine_id: String,
    /// The checkpoint to compare from.
    pub checkpoint_id: String,
    /// Compare with this later checkpoint instead of the filesystem now.
    #[serde(default)]
    pub to: Option<String>,
    /// Also return the unified diff of this text file.
    #[serde(default)]
    pub path: Option<String>,
    /// Report at most this many changed paths (default 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkMachineArgs {
    /// The machine's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The machine to copy (id or name).
    pub machine_id: String,
    /// The new machine's name; generated if absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Copy this checkpoint instead of the filesystem as it is now.
    #[serde(default)]
    pub checkpoint_id: Option<String>,
    /// Create the fork stopped instead of starting it.
    #[serde(default)]
    pub skip_launch: bool,
    /// Give the fork the parent's secrets too.
    #[serde(default)]
    pub inherit_secrets: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeArgs {
    /// The app; `default` if absent (created if missing).
    #[serde(default = "default_app")]
    pub app: String,
    /// Unique within the app.
    pub name: String,
    /// The most it may hold, in GB.
    pub size_gb: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeArgs {
    /// The volume's app; `default` if absent.
    #[serde(default = "default_app")]
    pub app: String,
    /// The volume's id or name.
    pub volume_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageArgs {
    /// `[registry/]repository[:tag][@sha256:…]` (Docker Hub when no
    /// registry is named), or a local `oci:/path[:tag]`.
    pub image: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MachineList {
    pub machines: Vec<hangar_api::Machine>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct VolumeList {
    pub volumes: Vec<hangar_api::Volume>,
}

/// The answer of a call that has nothing else to say.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Done {
    pub ok: bool,
}
