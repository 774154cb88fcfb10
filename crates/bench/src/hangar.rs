//! Hangar's lifecycle through its REST API, on a daemon this benchmark
//! spawns with its own data dir and its own directory in a btrfs pool (the
//! pull benchmark uses the same daemon).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::process::check_interrupt;
use crate::stats::timed;
use crate::{Op, Section};

pub(crate) const APP: &str = "bench";

/// What the bench's daemon needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub hangar: PathBuf,
    pub init_binary: PathBuf,
    /// A directory on btrfs; the daemon gets a fresh subdirectory of it.
    pub pool_root: PathBuf,
    /// More `hangar serve` arguments.
    pub serve_args: Vec<String>,
}

/// Measures create, start, exec and stop of machines from `image`
/// (`oci:/layout:latest`); one uncounted warm-up cycle first (it also
/// imports the image). `settle` is the idle time before the "settled" start.
pub fn bench(cfg: &Config, image: &str, iterations: usize, settle: Duration) -> Result<Section> {
    let daemon = Daemon::start(cfg)?;
    let result = measure(&daemon, image, iterations, settle);
    if result.is_err() && check_interrupt().is_ok() {
        daemon.print_log_tail();
    }
    result
}

fn measure(d: &Daemon, image: &str, iterations: usize, settle: Duration) -> Result<Section> {
    d.call(Method::POST, "/v1/apps", Some(json!({ "app_name": APP })))?;
    let mut section = Section::default();
    // How each timed start brought its sandbox up, from the start events.
    let mut paths: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for i in 0..=iterations {
        check_interrupt()?;
        let cycle = cycle(d, image, settle).with_context(|| format!("hangar lifecycle iteration {i}"))?;
        if i > 0 {
            for (op, t) in cycle.times {
                section.push(op, t);
            }
            *paths.entry(("settled", cycle.settled_path)).or_default() += 1;
            *paths.entry(("right after stop", cycle.after_stop_path)).or_default() += 1;
        }
    }
    let paths: Vec<String> = paths
        .iter()
        .map(|((when, path), n)| format!("{when}: {path} {n}"))
        .collect();
    section.notes.push(format!(
        "hangar start paths (from the start events): {}",
        paths.join(", ")
    ));

    // Exec round trips on one started machine, over the one kept-alive
    // connection every call here uses.
    let id = create(d, image)?;
    for i in 0..=iterations {
        check_interrupt()?;
        let ((), t) = timed(|| exec_true(d, &id))?;
        if i > 0 {
            section.push(Op::Exec, t);
        }
    }
    d.call(Method::DELETE, &format!("{}?force=true", machine(&id)), None)?;
    Ok(section)
}

struct Cycle {
    times: Vec<(Op, Duration)>,
    settled_path: String,
    after_stop_path: String,
}

/// create → stop → (settle) → start → first exec → stop → start at once →
/// first exec → stop → destroy, timed.
fn cycle(d: &Daemon, image: &str, settle: Duration) -> Result<Cycle> {
    let (id, t_create) = timed(|| create(d, image))?;
    let ((), t_stop) = timed(|| stop(d, &id))?;
    std::thread::sleep(settle);
    let (t_start, t_start_exec) = start_then_exec(d, &id)?;
    let settled_path = last_start_path(d, &id)?;
    stop(d, &id)?;
    let (_, t_after_stop) = start_then_exec(d, &id)?;
    let after_stop_path = last_start_path(d, &id)?;
    stop(d, &id)?;
    let (_, t_destroy) = timed(|| d.call(Method::DELETE, &format!("{}?force=true", machine(&id)), None))?;
    Ok(Cycle {
        times: vec![
            (Op::Create, t_create),
            (Op::Stop, t_stop),
            (Op::StartApi, t_start),
            (Op::StartToExec, t_start_exec),
            (Op::StartAfterStop, t_after_stop),
            (Op::Destroy, t_destroy),
        ],
        settled_path,
        after_stop_path,
    })
}

/// Starts a stopped machine; returns the time until the start call returned
/// and until a first exec of `true` did.
fn start_then_exec(d: &Daemon, id: &str) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let m = d.call(Method::POST, &format!("{}/start", machine(id)), None)?;
    let t_start = t0.elapsed();
    expect_state(&m, "started", "start")?;
    exec_true(d, id)?;
    Ok((t_start, t0.elapsed()))
}

/// The `path` the daemon recorded on the machine's latest start event
/// (`prepared` or `cold`), or `unrecorded`.
fn last_start_path(d: &Daemon, id: &str) -> Result<String> {
    let events = d.call(Method::GET, &format!("{}/events", machine(id)), None)?;
    let path = events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "start" && e["status"] == "started")
        .max_by_key(|e| e["timestamp"].as_i64().unwrap_or(0))
        .and_then(|e| e["detail"]["path"].as_str())
        .unwrap_or("unrecorded");
    Ok(path.to_owned())
}

pub(crate) fn machine(id: &str) -> String {
    format!("/v1/apps/{APP}/machines/{id}")
}

/// Creates a machine and returns its id once it is started (waiting if the
/// create call answered before that).
pub(crate) fn create(d: &Daemon, image: &str) -> Result<String> {
    let m = d.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(json!({ "config": { "image": image }, "skip_launch": false })),
    )?;
    let id = m["id"].as_str().context("create answered without an id")?.to_owned();
    if m["state"] != "started" {
        let m = d.call(
            Method::GET,
            &format!("{}/wait?state=started&timeout=30", machine(&id)),
            None,
        )?;
        expect_state(&m, "started", "create")?;
    }
    Ok(id)
}

pub(crate) fn stop(d: &Daemon, id: &str) -> Result<()> {
    let m = d.call(Method::POST, &format!("{}/stop", machine(id)), Some(json!({})))?;
    expect_state(&m, "stopped", "stop")
}

fn exec_true(d: &Daemon, id: &str) -> Result<()> {
    let r = d.call(
        Method::POST,
        &format!("{}/exec", machine(id)),
        Some(json!({ "command": ["true"] })),
    )?;
    if r["exit_code"] != 0 {
        bail!("exec true in {id}: {r}");
    }
    Ok(())
}

pub(crate) fn expect_state(m: &Value, want: &str, what: &str) -> Result<()> {
    if m["state"] != want {
        bail!("{what} answered state {} (wanted {want}): {m}", m["state"]);
    }
    Ok(())
}

/// A `hangar serve` child with its own data dir and pool directory. Dropping
/// it destroys every machine of the bench app, stops the daemon, and removes
/// both directories.
pub struct Daemon {
    data_dir: tempfile::TempDir,
    pool_dir: PathBuf,
    child: Option<Child>,
    url: String,
    token: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Daemon {
    pub fn start(cfg: &Config) -> Result<Daemon> {
        let data_dir = tempfile::Builder::new()
            .prefix("hangar-bench-daemon")
            .tempdir()
            .context("creating the daemon's data dir")?;
        let pool_root = pool_root(&cfg.pool_root)?;
        let pool_dir = pool_root.join(data_dir.path().file_name().context("data dir has no name")?);
        let mut d = Daemon {
            data_dir,
            pool_dir,
            child: None,
            url: String::new(),
            token: String::new(),
            // One idle connection: every call reuses it (keep-alive).
            http: {
                hangar_image::install_crypto_provider();
                reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(1)
                    .build()?
            },
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        };
        let log = File::create(d.data_dir.path().join("daemon.log"))?;
        let child = Command::new(&cfg.hangar)
            .arg("serve")
            .arg("--data-dir")
            .arg(d.data_dir.path())
            .args(["--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--pool-dir"])
            .arg(&d.pool_dir)
            .arg("--init-binary")
            .arg(&cfg.init_binary)
            .args(&cfg.serve_args)
            .env(
                "HANGAR_LOG",
                std::env::var("HANGAR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C at the terminal reaches the
            // bench, which then destroys the machines through this daemon.
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {} serve", cfg.hangar.display()))?;
        d.child = Some(child);
        d.wait_ready()?;
        Ok(d)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let about = self.data_dir.path().join("daemon.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&about)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && let Some(url) = v["url"].as_str()
            {
                self.url = url.to_owned();
                break;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("hangar serve exited with {status} at start:\n{}", self.log_tail(40));
            }
            if Instant::now() > deadline {
                bail!("hangar serve did not come up in 30 s:\n{}", self.log_tail(40));
            }
            check_interrupt()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        self.token = std::fs::read_to_string(self.data_dir.path().join("api-token"))
            .context("reading the daemon's api-token")?
            .trim()
            .to_owned();
        Ok(())
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.data_dir.path().join("daemon.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Where the API is, and its token (for clients of the caller's own).
    pub fn endpoint(&self) -> (&str, &str) {
        (&self.url, &self.token)
    }

    /// The daemon's directory in the btrfs pool.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn pool_dir(&self) -> &Path {
        &self.pool_dir
    }

    /// For a run that failed: what the daemon said last.
    pub fn print_log_tail(&self) {
        eprintln!("hangar daemon log (tail):\n{}", self.log_tail(40));
    }

    /// The ingress proxy's address.
    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn proxy_addr(&self) -> Result<std::net::SocketAddr> {
        let about: Value = serde_json::from_str(&std::fs::read_to_string(self.data_dir.path().join("daemon.json"))?)?;
        let url = about["proxy_url"].as_str().context("daemon.json has no proxy_url")?;
        url.trim_start_matches("http://")
            .parse()
            .with_context(|| format!("proxy_url {url}"))
    }

    /// The pid of the machine's sandbox init: running, or created (a
    /// sandbox prepared for the next start).
    pub fn machine_pid(&self, id: &str) -> Result<u32> {
        let state = crate::process::run(
            Command::new("runc")
                .arg("--root")
                .arg(self.data_dir().join("runtime/runc"))
                .args(["state", id]),
        )?;
        let state: Value = serde_json::from_str(&state)?;
        match (state["status"].as_str(), state["pid"].as_u64()) {
            (Some("created" | "running"), Some(pid)) if pid > 0 => Ok(pid as u32),
            _ => bail!("machine {id} has no live sandbox: {state}"),
        }
    }

    /// One API call; a non-2xx answer is an error carrying the body.
    pub fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.rt.block_on(async {
            let resp = req.send().await.with_context(|| format!("{method} {path}"))?;
            let status = resp.status();
            let text = resp.text().await?;
            if !status.is_success() {
                bail!("{method} {path} -> {status}: {text}");
            }
            Ok(if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).with_context(|| format!("{method} {path}: unreadable answer"))?
            })
        })
    }

    fn destroy_all(&self) {
        let Ok(list) = self.call(Method::GET, &format!("/v1/apps/{APP}/machines"), None) else {
            return;
        };
        for m in list.as_array().into_iter().flatten() {
            if let Some(id) = m["id"].as_str()
                && let Err(e) = self.call(Method::DELETE, &format!("{}?force=true", machine(id)), None)
            {
                eprintln!("warning: destroying machine {id}: {e:#}");
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.url.is_empty() {
            self.destroy_all();
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid, which it still is
            // (not yet waited for).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The egress gateway the daemon started outlives it by design.
        if let Some(pid) = std::fs::read_to_string(self.data_dir.path().join("egress/pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) on the gateway this daemon started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if self.pool_dir.exists()
            && let Err(e) = std::fs::remove_dir(&self.pool_dir)
        {
            eprintln!("warning: removing pool dir {}: {e}", self.pool_dir.display());
        }
    }
}

/// Makes sure `root` is on btrfs. The default root is the test harness's
/// shared pool (crates/cli/tests/common): a sparse image file loop-mounted
/// at /var/tmp/hangar-test-pool/mnt, made once per host under a lock and
/// left mounted for the next user.
fn pool_root(root: &Path) -> Result<PathBuf> {
    if !hangar_rootfs::pool::is_btrfs(root).unwrap_or(false) {
        let base = root
            .parent()
            .context("the pool root must have a parent directory for its image file")?;
        hangar_rootfs::pool::mount_image(&base.join("pool.img"), root, 32 << 30)?;
    }
    Ok(root.to_owned())
}
