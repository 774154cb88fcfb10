//! `hangar`: runs the daemon, and drives it through its REST API.

#![forbid(unsafe_code)]

mod client;
mod mcp;
mod output;
mod stage;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use hangar_api::{
    App, CreateMachineRequest, ExecRequest, ExecStreamEvent, FileInfo, GuestConfig, InitConfig, Machine, MachineConfig,
    RestartConfig, RestartPolicy, RuntimeKind, StopRequest,
};
use reqwest::Method;

use crate::client::Client;

#[derive(Debug, Parser)]
#[command(
    name = "hangar",
    version,
    about = "Machines for AI coding agents: create once, start in milliseconds."
)]
struct Cli {
    /// Daemon URL (default: read from the data dir of a local daemon).
    #[arg(long, global = true, env = "HANGAR_URL")]
    url: Option<String>,
    /// API token (default: DATA_DIR/api-token).
    #[arg(long, global = true, env = "HANGAR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The daemon's data dir (for `serve`, and to find a local daemon).
    #[arg(long, global = true, env = "HANGAR_DATA_DIR", default_value = "/var/lib/hangar")]
    data_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(Box<ServeArgs>),
    /// Manage apps (namespaces of machines).
    #[command(subcommand)]
    App(AppCommand),
    /// Manage machines.
    #[command(subcommand, alias = "m")]
    Machine(MachineCommand),
    /// Local image tools.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Seal a machine's filesystem, list its checkpoints, roll back.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Storage that outlives machines: create, snapshot, restore, fork.
    #[command(subcommand, alias = "vol")]
    Volume(VolumeCommand),
    /// Secrets machines use through placeholders (values never leave the
    /// egress gateway).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// What machines may reach, and the log of what they did.
    #[command(subcommand)]
    Egress(EgressCommand),
    /// Serve MCP on stdin/stdout, for an agent's MCP client to start (it
    /// finds the daemon as the other commands do: HANGAR_URL, HANGAR_TOKEN).
    Mcp,
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Create a secret, or rotate it if it exists. The value is read from
    /// stdin (never from the command line, where `ps` would show it).
    Set {
        #[command(flatten)]
        app: AppArg,
        name: String,
        /// A host (egress rule syntax) where the value may be sent; repeatable.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Also allow the value in the URL or body (`url`, `body`); repeatable.
        #[arg(long = "allow-in", value_parser = ["url", "body"])]
        allow_in: Vec<String>,
        /// Set this header on every request to the hosts (e.g. Authorization).
        #[arg(long)]
        inject_header: Option<String>,
        /// The injected header's value, with {value} for the secret.
        #[arg(long, requires = "inject_header")]
        inject_format: Option<String>,
    },
    #[command(alias = "list")]
    Ls(AppArg),
    #[command(alias = "delete")]
    Rm {
        #[command(flatten)]
        app: AppArg,
        name: String,
    },
}

#[derive(Debug, Args)]
struct PolicyTarget {
    #[command(flatten)]
    app: AppArg,
    /// The machine's own policy (replacing the app's) instead of the app's.
    #[arg(long)]
    machine: Option<String>,
}

#[derive(Debug, Subcommand)]
enum EgressCommand {
    /// Add destinations: host, *.suffix, IP or CIDR, each with optional :port.
    Allow {
        #[command(flatten)]
        target: PolicyTarget,
        #[arg(required = true)]
        rules: Vec<String>,
    },
    /// Remove destinations.
    Revoke {
        #[command(flatten)]
        target: PolicyTarget,
        #[arg(required = true)]
        rules: Vec<String>,
    },
    /// Show the policy.
    Policy(PolicyTarget),
    /// The audit log, newest first.
    Log {
        #[command(flatten)]
        app: AppArg,
        #[arg(long)]
        machine: Option<String>,
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Args)]
struct VolumeArg {
    #[command(flatten)]
    app: AppArg,
    /// Volume id or name.
    volume: String,
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    Create {
        #[command(flatten)]
        app: AppArg,
        name: String,
        #[arg(long)]
        size_gb: u64,
    },
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        app: AppArg,
        /// Also deleted volumes still within their retention.
        #[arg(long)]
        deleted: bool,
    },
    Show(VolumeArg),
    /// Grow a volume.
    Extend {
        #[command(flatten)]
        v: VolumeArg,
        #[arg(long)]
        size_gb: u64,
    },
    /// Delete a volume (kept, recoverable, for the retention period).
    #[command(alias = "delete")]
    Rm(VolumeArg),
    /// Bring back a deleted volume.
    Undelete(VolumeArg),
    /// Snapshot a volume (O(1)).
    Snapshot(VolumeArg),
    Snapshots(VolumeArg),
    /// Bring a volume back to a snapshot.
    Restore {
        #[command(flatten)]
        v: VolumeArg,
        snapshot: String,
    },
    /// A new volume with a copy of this one's data.
    Fork {
        #[command(flatten)]
        v: VolumeArg,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        snapshot: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CheckpointCommand {
    /// Checkpoint a machine's filesystem (O(1); a running machine pauses
    /// for milliseconds).
    Create {
        #[command(flatten)]
        m: MachineArg,
        /// What this step was.
        #[arg(long, short)]
        comment: Option<String>,
    },
    #[command(alias = "list")]
    Ls(MachineArg),
    /// What changed since a checkpoint (until now, or `--to` another one).
    Diff {
        #[command(flatten)]
        m: MachineArg,
        checkpoint: String,
        #[arg(long)]
        to: Option<String>,
        /// Also show the content diff of this text file.
        #[arg(long)]
        path: Option<String>,
    },
    /// Roll the machine's filesystem back to a checkpoint (a running
    /// machine is restarted).
    Restore {
        #[command(flatten)]
        m: MachineArg,
        checkpoint: String,
    },
    #[command(alias = "delete")]
    Rm {
        #[command(flatten)]
        m: MachineArg,
        checkpoint: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:4280")]
    listen: SocketAddr,
    /// Where the ingress proxy listens: requests for
    /// `{machine}.{app}.{proxy-domain}` reach the machine's service.
    /// Repeatable; a service's `ports` pick among these.
    #[arg(long, default_value = "127.0.0.1:4281")]
    proxy_listen: Vec<SocketAddr>,
    /// The domain the proxy routes under (`localhost` names resolve to
    /// loopback).
    #[arg(long, default_value = "localhost")]
    proxy_domain: String,
    /// A request header naming a session that must stay on the machine
    /// that issued it, besides `Mcp-Session-Id`; repeatable.
    #[arg(long = "proxy-session-header")]
    proxy_session_headers: Vec<String>,
    /// A cookie naming such a session; repeatable.
    #[arg(long = "proxy-session-cookie")]
    proxy_session_cookies: Vec<String>,
    /// Seconds a streamed answer (SSE, chunked) or an upgraded connection
    /// (WebSocket) may pass nothing before the proxy cuts it.
    #[arg(long, default_value_t = 3600)]
    proxy_stream_idle_timeout: u64,
    /// Requests that may wait, per machine (or app), while machines are at
    /// their concurrency hard_limit.
    #[arg(long, default_value_t = 100)]
    proxy_queue_limit: usize,
    /// Seconds a request waits for room before it gets a 503.
    #[arg(long, default_value_t = 10)]
    proxy_queue_timeout: u64,
    /// The static hangar-init binary (default: next to this binary, or the
    /// workspace's static build).
    #[arg(long, env = "HANGAR_INIT_BINARY")]
    init_binary: Option<PathBuf>,
    /// Default sandbox runtime.
    #[arg(long, value_enum, default_value = "runc")]
    runtime: RuntimeArg,
    /// A directory on btrfs to hold machine filesystems (default: the data
    /// dir if on btrfs, else a loop-mounted image file in it).
    #[arg(long)]
    pool_dir: Option<PathBuf>,
    /// Size of the loop-mounted pool image, in GiB.
    #[arg(long, default_value_t = 16)]
    pool_size_gb: u64,
    /// A directory on btrfs to hold volumes, a filesystem apart from the
    /// pool (their size limits turn on btrfs quotas, which slow snapshots);
    /// default: a loop-mounted image file in the data dir, made when the
    /// first volume is.
    #[arg(long)]
    volume_pool_dir: Option<PathBuf>,
    /// Stopped machines kept prepared for a fast start (about 1 MB of
    /// memory each; 0 makes every start cold).
    #[arg(long, default_value_t = 32)]
    prepared_limit: usize,
    /// Registry credentials, in the docker/podman auth file format
    /// (default: $REGISTRY_AUTH_FILE, then podman's and docker's usual files).
    #[arg(long, env = "HANGAR_REGISTRY_AUTH_FILE")]
    registry_auth_file: Option<PathBuf>,
    /// PEM certificates to trust for HTTPS registries, besides the system's.
    #[arg(long)]
    registry_ca_file: Option<PathBuf>,
    /// A registry (host[:port]) that may be reached over plain HTTP when it
    /// does not speak HTTPS; repeatable. Loopback registries always may.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// How long a deleted volume is kept, recoverable, before its data is
    /// removed, in hours.
    #[arg(long, default_value_t = 24.0)]
    volume_retention_hours: f64,
    /// The egress gateway's directory (keys, CA, audit log, admin socket);
    /// DATA_DIR/egress by default.
    #[arg(long)]
    egress_dir: Option<PathBuf>,
    /// The hangar-egress binary to start if no gateway runs on the
    /// directory; by default the one next to this binary.
    #[arg(long)]
    egress_binary: Option<PathBuf>,
    /// HOST=IP: have the gateway resolve HOST to IP (trusted even when
    /// internal, e.g. a package mirror on the LAN); repeatable.
    #[arg(long = "egress-resolve")]
    egress_resolve: Vec<String>,
    /// A CA (PEM) the gateway trusts for upstream HTTPS besides the
    /// system's; repeatable.
    #[arg(long = "egress-upstream-ca")]
    egress_upstream_cas: Vec<PathBuf>,
    /// A directory whose OCI layouts and archives API callers may name as
    /// images (`oci:DIR/…`, `oci-archive:DIR/…`); repeatable. No other host
    /// file can be named (exports aside). DATA_DIR/imports by default.
    #[arg(long = "import-dir")]
    import_dirs: Vec<PathBuf>,
    /// How many processes (threads count) all machines together may have;
    /// half of the kernel's pid_max by default.
    #[arg(long)]
    pids_budget: Option<u64>,
    /// How much of its newest output a machine's log keeps, in MiB; the
    /// oldest goes first.
    #[arg(long, default_value_t = 64)]
    machine_log_mb: u64,
    /// The largest image layer (compressed) a pull or import takes, in GiB.
    #[arg(long, default_value_t = 8)]
    image_max_layer_gb: u64,
    /// The largest an image layer may be once decompressed, in GiB.
    #[arg(long, default_value_t = 32)]
    image_max_unpacked_gb: u64,
    /// How many times its compressed size a layer may decompress to (past
    /// its first 64 MiB): a bound on decompression bombs.
    #[arg(long, default_value_t = 100)]
    image_max_ratio: u64,
    /// Turn on btrfs simple quotas (what enforces machines' guest.disk_gb)
    /// in the pool given by --pool-dir or a data dir on btrfs. Kernels
    /// before 6.7 can't mount a filesystem with them. The pool the daemon
    /// makes itself gets them anyway.
    #[arg(long)]
    pool_simple_quotas: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RuntimeArg {
    Runc,
    Runsc,
}

impl From<RuntimeArg> for RuntimeKind {
    fn from(r: RuntimeArg) -> RuntimeKind {
        match r {
            RuntimeArg::Runc => RuntimeKind::Runc,
            RuntimeArg::Runsc => RuntimeKind::Runsc,
        }
    }
}

#[derive(Debug, Subcommand)]
enum AppCommand {
    Create {
        name: String,
    },
    #[command(alias = "list")]
    Ls,
    #[command(alias = "delete")]
    Rm {
        name: String,
    },
}

#[derive(Debug, Args)]
struct AppArg {
    /// The app (created on first use if it is the default).
    #[arg(long, short, env = "HANGAR_APP", default_value = "default")]
    app: String,
}

#[derive(Debug, Args)]
struct CreateArgs {
    #[command(flatten)]
    app: AppArg,
    /// `oci:/path/to/layout[:tag]` or `oci-archive:/path/file.tar[:tag]`.
    image: String,
    #[arg(long)]
    name: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long, short)]
    env: Vec<String>,
    /// KEY=VALUE metadata, repeatable.
    #[arg(long)]
    metadata: Vec<String>,
    #[arg(long)]
    cpus: Option<u32>,
    #[arg(long)]
    memory_mb: Option<u64>,
    #[arg(long, value_parser = ["no", "on-failure", "always"])]
    restart: Option<String>,
    #[arg(long, value_enum)]
    runtime: Option<RuntimeArg>,
    /// Override the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Destroy the machine when its process exits.
    #[arg(long)]
    rm: bool,
    /// VOLUME:/path: mount a volume (by name or id); repeatable.
    #[arg(long, short)]
    volume: Vec<String>,
    /// A secret the machine gets as a placeholder; repeatable.
    #[arg(long)]
    secret: Vec<String>,
    /// The command (overrides the image's Cmd).
    #[arg(last = true)]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
struct MachineArg {
    #[command(flatten)]
    app: AppArg,
    /// Machine id or name.
    machine: String,
}

#[derive(Debug, Subcommand)]
enum MachineCommand {
    /// Create a machine from an image and start it.
    Run(CreateArgs),
    /// Create a machine without starting it.
    Create(CreateArgs),
    Start(MachineArg),
    Stop {
        #[command(flatten)]
        m: MachineArg,
        #[arg(long)]
        signal: Option<String>,
        /// Seconds before SIGKILL.
        #[arg(long)]
        timeout: Option<f64>,
    },
    Restart(MachineArg),
    /// Pause a started machine with its memory kept; `start` resumes it.
    Suspend(MachineArg),
    /// Export the machine (now, or at a checkpoint) as an OCI image, with a
    /// Dockerfile of the commands that built it.
    Export {
        #[command(flatten)]
        m: MachineArg,
        /// The layout's name under the daemon's exports directory.
        #[arg(long)]
        name: String,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        checkpoint: Option<String>,
        /// Also push it to this registry reference (registry/repo[:tag]).
        #[arg(long)]
        push: Option<String>,
        /// One layer per checkpoint instead of one for all the changes.
        #[arg(long)]
        per_checkpoint: bool,
    },
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        app: AppArg,
        #[arg(long)]
        state: Option<String>,
    },
    #[command(alias = "show")]
    Status(MachineArg),
    /// Run a command inside a started machine; exits with its exit code.
    Exec {
        #[command(flatten)]
        m: MachineArg,
        #[arg(long, short)]
        env: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long, short)]
        user: Option<String>,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Output of the machine's main process.
    Logs {
        #[command(flatten)]
        m: MachineArg,
        #[arg(long, short)]
        follow: bool,
    },
    Ps(MachineArg),
    Events(MachineArg),
    /// Copy a file: `hangar machine cp ./f ID:/path` or `cp ID:/path ./f`.
    Cp {
        #[command(flatten)]
        app: AppArg,
        src: String,
        dst: String,
    },
    /// A new machine with a copy of this one's filesystem (now, or at a
    /// checkpoint), made in milliseconds.
    Fork {
        #[command(flatten)]
        m: MachineArg,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        checkpoint: Option<String>,
        /// Leave the fork stopped.
        #[arg(long)]
        stopped: bool,
        /// Give the fork the parent's secrets (placeholders of its own).
        #[arg(long)]
        inherit_secrets: bool,
    },
    #[command(alias = "destroy")]
    Rm {
        #[command(flatten)]
        m: MachineArg,
        /// Destroy even if started.
        #[arg(long, short)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pull an image from its registry (`[registry/]repo[:tag][@sha256:…]`;
    /// Docker Hub when no registry is named), or import a local
    /// `oci:/layout[:tag]`. Shows progress on a terminal.
    Pull { image: String },
    /// List the images in the store, with their disk usage.
    Ls,
    /// Show one image (by reference or digest), with per-layer disk usage.
    Inspect { image: String },
    /// Remove an image no machine uses, and whatever only it needed.
    Rm { image: String },
    /// Remove every image no machine uses.
    Prune,
    /// Package a directory as a one-layer OCI image layout.
    FromDir {
        dir: PathBuf,
        /// `oci:/path/to/layout:tag`.
        output: String,
        /// The image's Cmd.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
}

fn key_values(pairs: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("{what} {p:?} must look like KEY=VALUE"),
        })
        .collect()
}

fn machine_path(app: &str, m: &str) -> String {
    format!("/v1/apps/{app}/machines/{m}")
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    let client = || client::connect(cli.url.clone(), cli.token.clone(), &cli.data_dir);
    let json = cli.json;
    match cli.command {
        Command::Serve(args) => serve(&cli.data_dir, *args).await.map(|()| 0),
        Command::Image(ImageCommand::Pull { image }) => pull(&client()?, json, &image).await,
        Command::Image(ImageCommand::Ls) => {
            let list: hangar_api::ImageList = client()?.get("/v1/images").await?;
            output::print(json, &list, || output::images(&list));
            Ok(0)
        }
        Command::Image(ImageCommand::Inspect { image }) => {
            let info: hangar_api::ImageInfo = client()?.get(&image_path(&image)).await?;
            output::print(json, &info, || output::image(&info));
            Ok(0)
        }
        Command::Image(ImageCommand::Rm { image }) => {
            let c = client()?;
            c.send(c.request(Method::DELETE, &image_path(&image))).await?;
            if !json {
                println!("removed {image}");
            }
            Ok(0)
        }
        Command::Image(ImageCommand::Prune) => {
            let report: hangar_api::PruneReport = client()?.post("/v1/images/prune", &serde_json::json!({})).await?;
            output::print(json, &report, || {
                for r in &report.removed {
                    println!("removed {r}");
                }
                println!("freed {}", output::bytes(report.freed_bytes));
            });
            Ok(0)
        }
        Command::Image(ImageCommand::FromDir { dir, output, cmd }) => {
            let (layout, tag) = match output.strip_prefix("oci:").and_then(|r| r.rsplit_once(':')) {
                Some((l, t)) => (PathBuf::from(l), t.to_owned()),
                None => bail!("output must look like oci:/path/to/layout:tag"),
            };
            let config = hangar_image::ImageConfig {
                cmd,
                env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
                ..Default::default()
            };
            let digest = hangar_image::write_oci_layout(&layout, &tag, &dir, &config)?;
            println!("{digest}");
            Ok(0)
        }
        Command::App(cmd) => {
            let c = client()?;
            match cmd {
                AppCommand::Create { name } => {
                    let app: App = c.post("/v1/apps", &serde_json::json!({ "app_name": name })).await?;
                    output::print(json, &app, || println!("created app {}", app.name));
                }
                AppCommand::Ls => {
                    let list: hangar_api::AppList = c.get("/v1/apps").await?;
                    output::print(json, &list.apps, || output::apps(&list.apps));
                }
                AppCommand::Rm { name } => {
                    c.send(c.request(Method::DELETE, &format!("/v1/apps/{name}"))).await?;
                    if !json {
                        println!("deleted app {name}");
                    }
                }
            }
            Ok(0)
        }
        Command::Machine(cmd) => machine(client()?, json, cmd).await,
        Command::Checkpoint(cmd) => checkpoint(client()?, json, cmd).await,
        Command::Volume(cmd) => volume(client()?, json, cmd).await,
        Command::Secret(cmd) => secret(client()?, json, cmd).await,
        Command::Egress(cmd) => egress(client()?, json, cmd).await,
        Command::Mcp => mcp::serve_stdio(client()?).await.map(|()| 0),
    }
}

async fn secret(c: Client, json: bool, cmd: SecretCommand) -> Result<i32> {
    use hangar_api::egress::{CreateSecretRequest, Secret, SecretInjection, SecretList, SecretPlacement};
    match cmd {
        SecretCommand::Set {
            app,
            name,
            hosts,
            allow_in,
            inject_header,
            inject_format,
        } => {
            ensure_app(&c, &app.app).await?;
            let mut value = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut value).context("reading the value from stdin")?;
            let value = value.strip_suffix('\n').unwrap_or(&value).to_owned();
            let req = CreateSecretRequest {
                name: name.clone(),
                value,
                allowed_hosts: hosts,
                allowed_in: allow_in
                    .iter()
                    .map(|p| {
                        if p == "url" {
                            SecretPlacement::Url
                        } else {
                            SecretPlacement::Body
                        }
                    })
                    .collect(),
                inject: inject_header.map(|header| SecretInjection {
                    header,
                    format: inject_format,
                }),
            };
            let base = format!("/v1/apps/{}/secrets", app.app);
            let exists = c.send(c.request(Method::GET, &format!("{base}/{name}"))).await.is_ok();
            let s: Secret = if exists {
                c.json(c.request(Method::PUT, &format!("{base}/{name}")).json(&req))
                    .await?
            } else {
                c.post(&base, &req).await?
            };
            output::print(json, &s, || println!("sealed {} (version {})", s.name, s.version));
        }
        SecretCommand::Ls(app) => {
            let list: SecretList = c.get(&format!("/v1/apps/{}/secrets", app.app)).await?;
            output::print(json, &list, || output::secrets(&list.secrets));
        }
        SecretCommand::Rm { app, name } => {
            c.send(c.request(Method::DELETE, &format!("/v1/apps/{}/secrets/{name}", app.app)))
                .await?;
            if !json {
                println!("deleted secret {name}");
            }
        }
    }
    Ok(0)
}

async fn egress(c: Client, json: bool, cmd: EgressCommand) -> Result<i32> {
    use hangar_api::egress::{EgressLog, EgressPolicy};
    let policy_path = |t: &PolicyTarget| match &t.machine {
        Some(m) => format!("{}/egress-policy", machine_path(&t.app.app, m)),
        None => format!("/v1/apps/{}/egress-policy", t.app.app),
    };
    // The policy in force: a machine's own, else its app's.
    async fn current(c: &Client, t: &PolicyTarget) -> Result<EgressPolicy> {
        if let Some(m) = &t.machine {
            let machine: Machine = c.get(&machine_path(&t.app.app, m)).await?;
            if let Some(p) = machine.config.egress {
                return Ok(p);
            }
        }
        c.get(&format!("/v1/apps/{}/egress-policy", t.app.app)).await
    }
    match cmd {
        EgressCommand::Allow { target, rules } => {
            ensure_app(&c, &target.app.app).await?;
            let mut policy = current(&c, &target).await?;
            for r in rules {
                if !policy.allow.contains(&r) {
                    policy.allow.push(r);
                }
            }
            c.send(c.request(Method::PUT, &policy_path(&target)).json(&policy))
                .await?;
            output::print(json, &policy, || output::policy(&policy));
        }
        EgressCommand::Revoke { target, rules } => {
            let mut policy = current(&c, &target).await?;
            policy.allow.retain(|r| !rules.contains(r));
            c.send(c.request(Method::PUT, &policy_path(&target)).json(&policy))
                .await?;
            output::print(json, &policy, || output::policy(&policy));
        }
        EgressCommand::Policy(target) => {
            let policy = current(&c, &target).await?;
            output::print(json, &policy, || output::policy(&policy));
        }
        EgressCommand::Log {
            app,
            machine,
            since,
            until,
            limit,
        } => {
            let limit = limit.to_string();
            let query: Vec<(&str, &str)> = [
                ("machine", machine.as_deref()),
                ("since", since.as_deref()),
                ("until", until.as_deref()),
                ("limit", Some(limit.as_str())),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            let req = c
                .request(Method::GET, &format!("/v1/apps/{}/egress-log", app.app))
                .query(&query);
            let log: EgressLog = c.json(req).await?;
            output::print(json, &log, || output::egress_log(&log.entries));
        }
    }
    Ok(0)
}

async fn volume(c: Client, json: bool, cmd: VolumeCommand) -> Result<i32> {
    let path = |v: &VolumeArg| format!("/v1/apps/{}/volumes/{}", v.app.app, v.volume);
    let show = |v: &hangar_api::Volume| output::print(json, v, || output::volume(v));
    match cmd {
        VolumeCommand::Create { app, name, size_gb } => {
            ensure_app(&c, &app.app).await?;
            let req = hangar_api::CreateVolumeRequest { name, size_gb };
            show(&c.post(&format!("/v1/apps/{}/volumes", app.app), &req).await?);
        }
        VolumeCommand::Ls { app, deleted } => {
            let list: Vec<hangar_api::Volume> = c
                .get(&format!("/v1/apps/{}/volumes?include_deleted={deleted}", app.app))
                .await?;
            output::print(json, &list, || output::volumes(&list));
        }
        VolumeCommand::Show(v) => show(&c.get(&path(&v)).await?),
        VolumeCommand::Extend { v, size_gb } => {
            let req = hangar_api::ExtendVolumeRequest { size_gb };
            let resp = c
                .send(c.request(Method::PUT, &format!("{}/extend", path(&v))).json(&req))
                .await?;
            show(&resp.json().await?);
        }
        VolumeCommand::Rm(v) => show(&c.send(c.request(Method::DELETE, &path(&v))).await?.json().await?),
        VolumeCommand::Undelete(v) => show(&c.post(&format!("{}/undelete", path(&v)), &()).await?),
        VolumeCommand::Snapshot(v) => {
            let s: hangar_api::VolumeSnapshot = c.post(&format!("{}/snapshots", path(&v)), &()).await?;
            output::print(json, &s, || println!("{}", s.id));
        }
        VolumeCommand::Snapshots(v) => {
            let list: hangar_api::VolumeSnapshotList = c.get(&format!("{}/snapshots", path(&v))).await?;
            output::print(json, &list, || {
                for s in &list.snapshots {
                    println!("{}  {}", s.id, s.created_at);
                }
            });
        }
        VolumeCommand::Restore { v, snapshot } => show(
            &c.post(&format!("{}/snapshots/{snapshot}/restore", path(&v)), &())
                .await?,
        ),
        VolumeCommand::Fork { v, name, snapshot } => {
            let req = hangar_api::ForkVolumeRequest { name, snapshot };
            show(&c.post(&format!("{}/fork", path(&v)), &req).await?);
        }
    }
    Ok(0)
}

async fn checkpoint(c: Client, json: bool, cmd: CheckpointCommand) -> Result<i32> {
    let base = |m: &MachineArg| format!("{}/checkpoints", machine_path(&m.app.app, &m.machine));
    match cmd {
        CheckpointCommand::Create { m, comment } => {
            let req = hangar_api::CreateCheckpointRequest { comment };
            let cp: hangar_api::Checkpoint = c.post(&base(&m), &req).await?;
            output::print(json, &cp, || {
                let took = cp
                    .timing
                    .map(|t| format!(" ({:.1} ms, paused {:.1} ms)", t.total_ms, t.paused_ms))
                    .unwrap_or_default();
                println!("{}{took}", cp.id)
            });
        }
        CheckpointCommand::Ls(m) => {
            let list: hangar_api::CheckpointList = c.get(&base(&m)).await?;
            output::print(json, &list, || output::checkpoints(&list.checkpoints));
        }
        CheckpointCommand::Diff {
            m,
            checkpoint,
            to,
            path,
        } => {
            let mut request = c.request(Method::GET, &format!("{}/{checkpoint}/diff", base(&m)));
            let query: Vec<(&str, &String)> = [("to", &to), ("path", &path)]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
                .collect();
            request = request.query(&query);
            let diff: hangar_api::CheckpointDiff = c.send(request).await?.json().await?;
            output::print(json, &diff, || output::diff(&diff));
        }
        CheckpointCommand::Restore { m, checkpoint } => {
            let machine: Machine = c.post(&format!("{}/{checkpoint}/restore", base(&m)), &()).await?;
            output::print(json, &machine, || {
                println!("{} restored to {checkpoint}, {}", machine.id, machine.state)
            });
        }
        CheckpointCommand::Rm { m, checkpoint } => {
            c.send(c.request(Method::DELETE, &format!("{}/{checkpoint}", base(&m))))
                .await?;
            if !json {
                println!("deleted checkpoint {checkpoint}");
            }
        }
    }
    Ok(0)
}

async fn serve(data_dir: &std::path::Path, args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HANGAR_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let init_binary = match args.init_binary {
        Some(p) => p,
        None => find_init_binary()?,
    };
    let cfg = hangar_machine::ManagerConfig {
        data_dir: data_dir.to_owned(),
        init_binary,
        default_runtime: args.runtime.into(),
        runc_binary: "runc".into(),
        runsc_binary: "runsc".into(),
        pool_dir: args.pool_dir,
        volume_pool_dir: args.volume_pool_dir,
        pool_image_bytes: args.pool_size_gb << 30,
        prepared_limit: args.prepared_limit,
        registry: hangar_image::RegistryConfig {
            auth_file: args.registry_auth_file,
            ca_file: args.registry_ca_file,
            insecure: args.insecure_registries,
        },
        volume_retention: std::time::Duration::try_from_secs_f64(args.volume_retention_hours * 3600.0)
            .context("--volume-retention-hours must be a number of hours, 0 or more")?,
        egress: hangar_machine::EgressConfig {
            dir: args.egress_dir,
            binary: args.egress_binary.or_else(|| {
                let exe = std::env::current_exe().ok()?;
                Some(exe.parent()?.join("hangar-egress")).filter(|p| p.is_file())
            }),
            resolve: args.egress_resolve,
            upstream_cas: args.egress_upstream_cas,
        },
        import_dirs: args.import_dirs,
        pids_budget: args.pids_budget,
        machine_log_bytes: args.machine_log_mb.max(1) << 20,
        image_limits: hangar_image::ImageLimits {
            max_layer_bytes: args.image_max_layer_gb << 30,
            max_unpacked_bytes: args.image_max_unpacked_gb << 30,
            max_ratio: args.image_max_ratio,
        },
        pool_simple_quotas: args.pool_simple_quotas,
    };
    let mut proxy = hangar_ingress::Config {
        domain: args.proxy_domain,
        stream_idle_timeout: std::time::Duration::from_secs(args.proxy_stream_idle_timeout),
        queue_limit: args.proxy_queue_limit,
        queue_timeout: std::time::Duration::from_secs(args.proxy_queue_timeout),
        session_cookies: args.proxy_session_cookies,
        ..Default::default()
    };
    proxy
        .session_headers
        .extend(args.proxy_session_headers.iter().map(|h| h.to_ascii_lowercase()));
    hangar_daemon::serve(args.listen, args.proxy_listen, proxy, cfg)
        .await
        .map_err(anyhow::Error::msg)
}

/// hangar-init must be static (it runs inside arbitrary images), so it is
/// built for an explicit target; look where the build puts it.
fn find_init_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("locating this binary")?;
    let mut candidates = vec![dir.join("hangar-init")];
    if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
        let static_build = target.join("x86_64-unknown-linux-gnu").join(profile);
        candidates.insert(0, static_build.join("hangar-init"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("hangar-init not found next to hangar: build it with scripts/build.sh, or pass --init-binary")
}

async fn ensure_app(c: &Client, app: &str) -> Result<()> {
    if app == "default" {
        let exists = c.send(c.request(Method::GET, "/v1/apps/default")).await.is_ok();
        if !exists {
            let _: serde_json::Value = c
                .post("/v1/apps", &serde_json::json!({ "app_name": "default" }))
                .await?;
        }
    }
    Ok(())
}

/// Pulls an image, following the daemon's progress lines: redrawn in place
/// on a terminal, silent otherwise (and with `--json`, which prints only
/// the image).
async fn pull(c: &Client, json: bool, image: &str) -> Result<i32> {
    use std::io::{IsTerminal, Write};
    let request = c
        .request(Method::POST, "/v1/images/pull")
        .header(reqwest::header::ACCEPT, "application/x-ndjson")
        .json(&hangar_api::PullImageRequest {
            image: stage::stage(image, c.import_dir.as_deref())?,
        });
    let mut body = c.send(request).await?.bytes_stream();
    let show = !json && std::io::stderr().is_terminal();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.context("reading the pull's progress")?);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            match serde_json::from_slice::<hangar_api::PullEvent>(&line).context("reading the pull's progress")? {
                hangar_api::PullEvent::Progress(p) if show => {
                    let done = p
                        .layers
                        .iter()
                        .filter(|l| matches!(l.status.as_str(), "done" | "present"))
                        .count();
                    let per_layer: Vec<String> = p
                        .layers
                        .iter()
                        .filter(|l| l.status == "downloading")
                        .map(|l| {
                            format!(
                                "{} {}/{}",
                                output::short(&l.digest),
                                output::bytes(l.downloaded),
                                output::bytes(l.size)
                            )
                        })
                        .collect();
                    eprint!(
                        "\r\x1b[2K{}: {done}/{} layers, {} of {} {}",
                        p.reference,
                        p.layers.len(),
                        output::bytes(p.downloaded),
                        output::bytes(p.total),
                        per_layer.join("  ")
                    );
                    let _ = std::io::stderr().flush();
                }
                hangar_api::PullEvent::Progress(_) => {}
                hangar_api::PullEvent::Image(info) => {
                    if show {
                        eprint!("\r\x1b[2K");
                    }
                    output::print(json, &info, || {
                        let n = info.layers.len();
                        let layers = if n == 1 { "layer" } else { "layers" };
                        println!(
                            "{} {} ({}, {n} {layers})",
                            info.reference,
                            info.digest,
                            output::bytes(info.size)
                        )
                    });
                    return Ok(0);
                }
                hangar_api::PullEvent::Error(e) => {
                    if show {
                        eprintln!();
                    }
                    bail!("{} ({})", e.error, e.code);
                }
            }
        }
    }
    bail!("the daemon ended the pull without an answer")
}

/// `/v1/images/{image}`, the reference URL-encoded into one segment.
fn image_path(image: &str) -> String {
    let encoded: String = image
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    format!("/v1/images/{encoded}")
}

async fn machine(c: Client, json: bool, cmd: MachineCommand) -> Result<i32> {
    match cmd {
        MachineCommand::Fork {
            m,
            name,
            checkpoint,
            stopped,
            inherit_secrets,
        } => {
            let req = hangar_api::ForkMachineRequest {
                name,
                checkpoint,
                skip_launch: stopped,
                inherit_secrets,
            };
            let fork: Machine = c
                .post(&format!("{}/fork", machine_path(&m.app.app, &m.machine)), &req)
                .await?;
            output::print(json, &fork, || println!("{} {}", fork.id, fork.state));
            Ok(0)
        }
        MachineCommand::Export {
            m,
            name,
            tag,
            checkpoint,
            push,
            per_checkpoint,
        } => {
            let req = hangar_api::ExportRequest {
                name,
                tag,
                checkpoint,
                push,
                layers: if per_checkpoint {
                    hangar_api::ExportLayers::Checkpoints
                } else {
                    hangar_api::ExportLayers::Squashed
                },
            };
            let out: hangar_api::ExportedImage = c
                .post(&format!("{}/export", machine_path(&m.app.app, &m.machine)), &req)
                .await?;
            output::print(json, &out, || {
                println!("{} ({})\nrecipe: {}", out.image, out.digest, out.recipe_path);
                if let Some(p) = &out.pushed {
                    println!("pushed: {p}");
                }
            });
            Ok(0)
        }
        MachineCommand::Suspend(m) => {
            let machine: Machine = c
                .post(&format!("{}/suspend", machine_path(&m.app.app, &m.machine)), &())
                .await?;
            output::print(json, &machine, || println!("{} {}", machine.id, machine.state));
            Ok(0)
        }
        MachineCommand::Run(args) => create(&c, json, args, false).await,
        MachineCommand::Create(args) => create(&c, json, args, true).await,
        MachineCommand::Start(m) => {
            let machine: Machine = c
                .post(&format!("{}/start", machine_path(&m.app.app, &m.machine)), &())
                .await?;
            output::print(json, &machine, || println!("{} {}", machine.id, machine.state));
            Ok(0)
        }
        MachineCommand::Stop { m, signal, timeout } => {
            let req = StopRequest {
                signal,
                timeout: timeout.map(hangar_api::Duration::Seconds),
            };
            let machine: Machine = c
                .post(&format!("{}/stop", machine_path(&m.app.app, &m.machine)), &req)
                .await?;
            output::print(json, &machine, || println!("{} {}", machine.id, machine.state));
            Ok(0)
        }
        MachineCommand::Restart(m) => {
            let machine: Machine = c
                .post(&format!("{}/restart", machine_path(&m.app.app, &m.machine)), &())
                .await?;
            output::print(json, &machine, || println!("{} {}", machine.id, machine.state));
            Ok(0)
        }
        MachineCommand::Ls { app, state } => {
            let mut req = c.request(Method::GET, &format!("/v1/apps/{}/machines", app.app));
            if let Some(s) = state {
                req = req.query(&[("state", s)]);
            }
            let list: Vec<Machine> = c.json(req).await?;
            output::print(json, &list, || output::machines(&list));
            Ok(0)
        }
        MachineCommand::Status(m) => {
            let machine: Machine = c.get(&machine_path(&m.app.app, &m.machine)).await?;
            output::print(json, &machine, || output::machine(&machine));
            Ok(0)
        }
        MachineCommand::Exec {
            m,
            env,
            cwd,
            user,
            timeout,
            command,
        } => {
            let req = ExecRequest {
                command,
                stdin: None,
                env: key_values(&env, "--env")?,
                cwd,
                user,
                timeout,
            };
            exec(&c, json, &machine_path(&m.app.app, &m.machine), &req).await
        }
        MachineCommand::Logs { m, follow } => {
            let req = c
                .request(Method::GET, &format!("{}/logs", machine_path(&m.app.app, &m.machine)))
                .query(&[("follow", follow)]);
            let mut body = c.send(req).await?.bytes_stream();
            let mut out = std::io::stdout();
            while let Some(chunk) = body.next().await {
                out.write_all(&chunk?)?;
                out.flush()?;
            }
            Ok(0)
        }
        MachineCommand::Ps(m) => {
            let ps: Vec<hangar_api::ProcessInfo> =
                c.get(&format!("{}/ps", machine_path(&m.app.app, &m.machine))).await?;
            output::print(json, &ps, || output::processes(&ps));
            Ok(0)
        }
        MachineCommand::Events(m) => {
            let ev: Vec<hangar_api::MachineEvent> = c
                .get(&format!("{}/events", machine_path(&m.app.app, &m.machine)))
                .await?;
            output::print(json, &ev, || output::events(&ev));
            Ok(0)
        }
        MachineCommand::Cp { app, src, dst } => copy(&c, json, &app.app, &src, &dst).await,
        MachineCommand::Rm { m, force } => {
            let req = c
                .request(Method::DELETE, &machine_path(&m.app.app, &m.machine))
                .query(&[("force", force)]);
            c.send(req).await?;
            if !json {
                println!("destroyed {}", m.machine);
            }
            Ok(0)
        }
    }
}

async fn create(c: &Client, json: bool, a: CreateArgs, skip_launch: bool) -> Result<i32> {
    ensure_app(c, &a.app.app).await?;
    let guest = (a.cpus.is_some() || a.memory_mb.is_some()).then(|| GuestConfig {
        cpus: a.cpus.unwrap_or(1),
        memory_mb: a.memory_mb.unwrap_or(256),
        ..Default::default()
    });
    let restart = a.restart.map(|p| RestartConfig {
        policy: match p.as_str() {
            "always" => RestartPolicy::Always,
            "on-failure" => RestartPolicy::OnFailure,
            _ => RestartPolicy::No,
        },
        max_retries: None,
    });
    let req = CreateMachineRequest {
        name: a.name,
        config: MachineConfig {
            image: stage::stage(&a.image, c.import_dir.as_deref())?,
            init: InitConfig {
                entrypoint: a.entrypoint.map(|e| vec![e]),
                cmd: (!a.cmd.is_empty()).then_some(a.cmd),
                ..Default::default()
            },
            env: key_values(&a.env, "--env")?,
            guest,
            restart,
            auto_destroy: a.rm,
            metadata: key_values(&a.metadata, "--metadata")?,
            runtime: a.runtime.map(Into::into),
            mounts: a
                .volume
                .iter()
                .map(|v| match v.split_once(':') {
                    Some((volume, path)) if !volume.is_empty() => Ok(hangar_api::MachineMount {
                        volume: volume.to_owned(),
                        path: path.to_owned(),
                    }),
                    _ => bail!("--volume {v:?} must look like VOLUME:/path"),
                })
                .collect::<Result<_>>()?,
            secrets: a.secret,
            ..Default::default()
        },
        skip_launch,
        region: None,
    };
    let machine: Machine = c.post(&format!("/v1/apps/{}/machines", a.app.app), &req).await?;
    output::print(json, &machine, || {
        println!("{} {} {}", machine.id, machine.name, machine.state)
    });
    Ok(0)
}

async fn exec(c: &Client, json: bool, path: &str, req: &ExecRequest) -> Result<i32> {
    if json {
        let resp: hangar_api::ExecResponse = c.post(&format!("{path}/exec"), req).await?;
        println!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(resp.exit_code.unwrap_or(1));
    }
    let mut body = c
        .send(c.request(Method::POST, &format!("{path}/exec/stream")).json(req))
        .await?
        .bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            match serde_json::from_slice::<ExecStreamEvent>(&line)? {
                ExecStreamEvent::Stdout { data } => {
                    std::io::stdout().write_all(data.as_bytes())?;
                    std::io::stdout().flush()?;
                }
                ExecStreamEvent::Stderr { data } => std::io::stderr().write_all(data.as_bytes())?,
                ExecStreamEvent::Exit {
                    exit_code,
                    exit_signal,
                    timed_out,
                } => {
                    if timed_out {
                        eprintln!("hangar: command timed out");
                    }
                    return Ok(exit_code.unwrap_or(128 + exit_signal.unwrap_or(0)));
                }
                ExecStreamEvent::Error { error } => bail!("{error}"),
            }
        }
    }
    bail!("the exec stream ended without an exit status")
}

/// `ID:/path` names a file in a machine; anything else is local.
fn split_remote(s: &str) -> Option<(&str, &str)> {
    s.split_once(':')
        .filter(|(m, p)| !m.is_empty() && !m.contains('/') && p.starts_with('/'))
}

async fn copy(c: &Client, json: bool, app: &str, src: &str, dst: &str) -> Result<i32> {
    match (split_remote(src), split_remote(dst)) {
        (None, Some((m, path))) => {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(src).with_context(|| format!("reading {src}"))?;
            let mode = format!("{:o}", meta.permissions().mode() & 0o7777);
            let file = tokio::fs::File::open(src)
                .await
                .with_context(|| format!("opening {src}"))?;
            let req = c
                .request(Method::PUT, &format!("{}/files/content", machine_path(app, m)))
                .query(&[("path", path), ("mode", &mode), ("parents", "true")])
                .body(reqwest::Body::from(file));
            let info: FileInfo = c.json(req).await?;
            output::print(json, &info, || println!("{} bytes -> {m}:{}", info.size, info.path));
        }
        (Some((m, path)), None) => {
            let req = c
                .request(Method::GET, &format!("{}/files/content", machine_path(app, m)))
                .query(&[("path", path)]);
            let resp = c.send(req).await?;
            let expected = resp.content_length();
            let tmp = format!("{dst}.hangar-part");
            let mut out = std::fs::File::create(&tmp).with_context(|| format!("creating {tmp}"))?;
            let mut body = resp.bytes_stream();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                n += chunk.len() as u64;
                out.write_all(&chunk)?;
            }
            if expected.is_some_and(|e| e != n) {
                let _ = std::fs::remove_file(&tmp);
                bail!("download of {m}:{path} was cut short ({n} bytes)");
            }
            out.sync_all()?;
            std::fs::rename(&tmp, dst)?;
            if !json {
                println!("{m}:{path} -> {dst} ({n} bytes)");
            }
        }
        _ => bail!("exactly one of SRC and DST must be MACHINE:/absolute/path"),
    }
    Ok(0)
}
