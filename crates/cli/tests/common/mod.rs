//! Test harness: real daemons (the `hangar` binary) with real runc sandboxes
//! on a real btrfs pool, driven over HTTP.
//!
//! Needs root, runc, btrfs-progs, busybox-static and the static hangar-init
//! (`scripts/build.sh`); `scripts/test.sh` provides all of them.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub const HANGAR: &str = env!("CARGO_BIN_EXE_hangar");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests start real sandboxes and need root: run scripts/test.sh as root"
    );
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A btrfs filesystem shared by every test process (each daemon gets its
/// own directory in it). Made once per host, under a lock, and left mounted.
fn test_pool_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| shared_btrfs("/var/tmp/hangar-test-pool")).clone()
}

/// Volumes have a filesystem of their own (quotas are on there).
fn test_volume_pool_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| shared_btrfs("/var/tmp/hangar-test-volumes"))
        .clone()
}

/// A btrfs filesystem in an image file under `base`, mounted (once, and
/// left mounted) at `base/mnt`, that test daemons share, each in a
/// directory of its own.
fn shared_btrfs(base: &str) -> PathBuf {
    require_root();
    let base = PathBuf::from(base);
    let mnt = base.join("mnt");
    hangar_rootfs::pool::mount_image(&base.join("pool.img"), &mnt, 32 << 30).unwrap();
    mnt
}

/// The static hangar-init built by scripts/build.sh.
pub fn init_binary() -> PathBuf {
    if let Ok(p) = std::env::var("HANGAR_INIT_BINARY") {
        return p.into();
    }
    let p = workspace().join("target/x86_64-unknown-linux-gnu/debug/hangar-init");
    assert!(p.is_file(), "{} missing: run scripts/build.sh first", p.display());
    p
}

/// Where test daemons may import images from by path (`--import-dir`).
pub const IMPORTS: &str = "/var/tmp/hangar-test-imports";
/// The Debian image's directory (kept across runs; also an import dir).
const DEBIAN: &str = "/var/tmp/hangar-test-debian";

/// A new directory under [`IMPORTS`], for an image a test makes.
pub fn import_tempdir() -> tempfile::TempDir {
    std::fs::create_dir_all(IMPORTS).unwrap();
    tempfile::Builder::new().prefix("image").tempdir_in(IMPORTS).unwrap()
}

/// An OCI layout of busybox with image config exercising Entrypoint, Cmd,
/// Env and WorkingDir. Built once per test process.
pub fn busybox_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let dir = import_tempdir().keep();
            let rootfs = dir.join("rootfs");
            for d in [
                "bin",
                "etc",
                "root",
                "tmp",
                "srv/app",
                "home/alice",
                "proc",
                "sys",
                "dev",
                "run",
            ] {
                std::fs::create_dir_all(rootfs.join(d)).unwrap();
            }
            let busybox = which("busybox");
            std::fs::copy(&busybox, rootfs.join("bin/busybox")).unwrap();
            let applets = sh(Command::new(&busybox).arg("--list"));
            for applet in applets.lines() {
                let link = rootfs.join("bin").join(applet);
                if !link.exists() {
                    std::os::unix::fs::symlink("busybox", link).unwrap();
                }
            }
            std::fs::write(
                rootfs.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:alice:/home/alice:/bin/sh\n",
            )
            .unwrap();
            std::fs::write(rootfs.join("etc/group"), "root:x:0:\nalice:x:1000:\n").unwrap();
            std::fs::write(rootfs.join("srv/app/from-image.txt"), "image layer\n").unwrap();
            let config = hangar_image::ImageConfig {
                entrypoint: vec![],
                cmd: vec!["sleep".into(), "2147483647".into()],
                env: vec!["PATH=/bin".into(), "IMAGE_VAR=from-image".into()],
                working_dir: Some("/srv/app".into()),
                ..Default::default()
            };
            let layout = dir.join("layout");
            hangar_image::write_oci_layout(&layout, "latest", &rootfs, &config).unwrap();
            format!("oci:{}:latest", layout.display())
        })
        .clone()
}

/// A Debian bookworm image with apt, curl, git and ca-certificates (built
/// once per machine by scripts/debian-test-rootfs.sh, from the Debian
/// mirror), as an OCI layout.
pub fn debian_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let dir = PathBuf::from(DEBIAN);
            sh(Command::new(workspace().join("scripts/debian-test-rootfs.sh")).arg(&dir));
            let layout = dir.join("layout");
            if !layout.join("index.json").exists() {
                let tmp = dir.join("layout.tmp");
                let _ = std::fs::remove_dir_all(&tmp);
                let config = hangar_image::ImageConfig {
                    cmd: vec!["sleep".into(), "infinity".into()],
                    env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
                    ..Default::default()
                };
                hangar_image::write_oci_layout(&tmp, "latest", &dir.join("rootfs"), &config).unwrap();
                std::fs::rename(&tmp, &layout).unwrap();
            }
            format!("oci:{}:latest", layout.display())
        })
        .clone()
}

/// The flat apt repository (one package, `hangar-hello`) of
/// scripts/debian-test-rootfs.sh.
pub fn apt_repo() -> PathBuf {
    let dir = PathBuf::from("/var/tmp/hangar-test-apt-repo");
    sh(Command::new(workspace().join("scripts/debian-test-rootfs.sh"))
        .arg("--apt-repo")
        .arg(&dir));
    dir
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{name} not found on PATH: apt-get install busybox-static"))
}

/// A running daemon with its own data dir and pool directory.
pub struct Daemon {
    pub data_dir: tempfile::TempDir,
    pub pool_dir: PathBuf,
    pub volume_pool_dir: PathBuf,
    pub url: String,
    /// The ingress proxy (its first listener).
    pub proxy_url: String,
    /// Every listener of the ingress proxy.
    pub proxy_urls: Vec<String>,
    pub token: String,
    child: Option<Child>,
    serve_args: Vec<String>,
    /// Environment for the daemon's next start (see [`Daemon::set_env`]).
    serve_env: Vec<(String, String)>,
    pub http: reqwest::Client,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// With extra `hangar serve` arguments.
    pub fn start_with(args: &[&str]) -> Daemon {
        Daemon::start_with_env(args, &[])
    }

    /// With extra `hangar serve` arguments and environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        require_root();
        let data_dir = tempfile::Builder::new().prefix("hangar-test").tempdir().unwrap();
        let pool_dir = test_pool_root().join(data_dir.path().file_name().unwrap());
        let volume_pool_dir = test_volume_pool_root().join(data_dir.path().file_name().unwrap());
        let mut d = Daemon {
            data_dir,
            pool_dir,
            volume_pool_dir,
            url: String::new(),
            proxy_url: String::new(),
            proxy_urls: Vec::new(),
            token: String::new(),
            child: None,
            serve_args: args.iter().map(|a| a.to_string()).collect(),
            serve_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            http: {
                hangar_image::install_crypto_provider();
                reqwest::Client::builder().no_proxy().build().unwrap()
            },
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.spawn_and(true);
    }

    /// Starts the daemon; with `wait_ready`, returns once it has recovered
    /// its machines.
    fn spawn_and(&mut self, wait_ready: bool) {
        let about = self.data_dir.path().join("daemon.json");
        let _ = std::fs::remove_file(&about);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.data_dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(HANGAR)
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(["--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--pool-dir"])
            .arg(&self.pool_dir)
            .arg("--volume-pool-dir")
            .arg(&self.volume_pool_dir)
            .arg("--init-binary")
            .arg(init_binary())
            .args(["--import-dir", IMPORTS, "--import-dir", DEBIAN, "--pool-simple-quotas"])
            .args(&self.serve_args)
            .envs(self.serve_env.iter().map(|(k, v)| (k, v)))
            .env("HANGAR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&about)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                self.url = v["url"].as_str().unwrap().to_owned();
                self.proxy_url = v["proxy_url"].as_str().unwrap().to_owned();
                self.proxy_urls = serde_json::from_value(v["proxy_urls"].clone()).unwrap();
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {status} at start:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.token = std::fs::read_to_string(self.data_dir.path().join("api-token"))
            .unwrap()
            .trim()
            .to_owned();
        if wait_ready {
            while !self.ready() {
                assert!(
                    Instant::now() < deadline,
                    "the daemon never recovered its machines:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Whether the daemon has recovered every machine (`GET /readyz`).
    pub fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://");
        let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        let _ = conn.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
    }

    /// The egress gateway's pid, while it runs.
    pub fn gateway_pid(&self) -> Option<i32> {
        let dir = self.data_dir.path().join("egress");
        let pid: i32 = std::fs::read_to_string(dir.join("pid")).ok()?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("egress/gateway.log")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM (graceful) or SIGKILL, and starts it
    /// again on the same data dir.
    pub fn restart(&mut self, signal: i32) {
        self.stop_daemon(signal);
        self.start_daemon();
    }

    /// Stops the daemon process (machines keep running).
    pub fn stop_daemon(&mut self, signal: i32) {
        let mut child = self.child.take().unwrap();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap();
    }

    /// Sets the environment the daemon starts with from its next start on.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.serve_env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// Starts the daemon again on the same data dir, returning as soon as
    /// it serves (it may still be recovering machines).
    pub fn start_daemon_serving(&mut self) {
        self.spawn_and(false);
    }

    /// Starts the daemon again on the same data dir.
    pub fn start_daemon(&mut self) {
        self.spawn();
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Like [`Daemon::call`], asserting a 2xx answer.
    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method.clone(), path, body).await;
        // An internal error's detail is only in the daemon's log.
        let detail = match v["error"].as_str().and_then(|e| e.split("(id ").nth(1)) {
            Some(rest) => {
                let id = rest.split(')').next().unwrap_or_default();
                self.log()
                    .lines()
                    .filter(|l| l.contains(id))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            None => String::new(),
        };
        assert!(status.is_success(), "{method} {path} -> {status}: {v}\n{detail}");
        v
    }

    /// Runs the `hangar` CLI against this daemon, found through its data
    /// dir (not `HANGAR_URL`/`HANGAR_TOKEN` from the environment).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(HANGAR)
            .args(args)
            .env("HANGAR_DATA_DIR", self.data_dir.path())
            .env_remove("HANGAR_URL")
            .env_remove("HANGAR_TOKEN")
            .output()
            .unwrap()
    }

    pub async fn create_app(&self, name: &str) {
        self.ok(Method::POST, "/v1/apps", Some(json!({ "app_name": name })))
            .await;
    }

    /// Creates (and starts) a busybox machine with extra config merged in.
    /// The host pid of a (runc) machine's init, from the runtime.
    pub fn machine_pid(&self, id: &str) -> u32 {
        let root = self.data_dir.path().join("runtime/runc");
        let out = Command::new("runc")
            .arg("--root")
            .arg(root)
            .args(["state", id])
            .output()
            .unwrap();
        let state: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
        state["pid"].as_u64().expect("a pid") as u32
    }

    /// Runs `f` on a thread inside a (runc) machine's network namespace.
    fn in_machine_netns<T: Send + 'static>(&self, id: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = File::open(format!("/proc/{}/ns/net", self.machine_pid(id))).unwrap();
        // A thread of its own: it stays in the namespace it entered.
        std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// A listener on `127.0.0.1:port` inside a (runc) machine's network
    /// namespace, for a server the test itself runs.
    pub fn listen_in_machine(&self, id: &str, port: u16) -> tokio::net::TcpListener {
        let listener = self.in_machine_netns(id, move || std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
        listener.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(listener).unwrap()
    }

    /// A connection to `127.0.0.1:port` made from inside a (runc)
    /// machine's network namespace, as a process of the machine would.
    pub fn connect_in_machine(&self, id: &str, port: u16) -> std::net::TcpStream {
        self.in_machine_netns(id, move || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
    }

    pub async fn machine(&self, app: &str, config: Value) -> Value {
        let mut cfg = json!({ "image": busybox_image() });
        merge(&mut cfg, config);
        self.ok(
            Method::POST,
            &format!("/v1/apps/{app}/machines"),
            Some(json!({ "config": cfg })),
        )
        .await
    }

    pub async fn exec(&self, app: &str, id: &str, cmd: &[&str]) -> Value {
        self.ok(
            Method::POST,
            &format!("/v1/apps/{app}/machines/{id}/exec"),
            Some(json!({ "command": cmd })),
        )
        .await
    }

    /// Runs `sh -c SCRIPT` and returns its stdout, asserting exit code 0.
    pub async fn sh(&self, app: &str, id: &str, script: &str) -> String {
        let r = self.exec(app, id, &["sh", "-c", script]).await;
        assert_eq!(r["exit_code"], 0, "{script}: {r}");
        r["stdout"].as_str().unwrap().to_owned()
    }

    pub async fn wait_state(&self, app: &str, id: &str, state: &str) -> Value {
        self.ok(
            Method::GET,
            &format!("/v1/apps/{app}/machines/{id}/wait?state={state}&timeout=30"),
            None,
        )
        .await
    }
}

pub fn merge(base: &mut Value, extra: Value) {
    if let (Value::Object(b), Value::Object(e)) = (base, extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Destroy every machine so sandboxes, mounts and subvolumes don't
        // outlive the test, then stop the daemon.
        if self.child.is_some() && !self.url.is_empty() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (url, token, http) = (self.url.clone(), self.token.clone(), self.http.clone());
            std::thread::spawn(move || {
                rt.block_on(async move {
                    let Ok(apps) = http.get(format!("{url}/v1/apps")).bearer_auth(&token).send().await else {
                        return;
                    };
                    let apps: Value = apps.json().await.unwrap_or_default();
                    for app in apps["apps"].as_array().cloned().unwrap_or_default() {
                        let name = app["name"].as_str().unwrap_or_default().to_owned();
                        let Ok(r) = http
                            .get(format!("{url}/v1/apps/{name}/machines"))
                            .bearer_auth(&token)
                            .send()
                            .await
                        else {
                            continue;
                        };
                        let ms: Value = r.json().await.unwrap_or_default();
                        for m in ms.as_array().cloned().unwrap_or_default() {
                            let id = m["id"].as_str().unwrap_or_default();
                            let _ = http
                                .delete(format!("{url}/v1/apps/{name}/machines/{id}?force=true"))
                                .bearer_auth(&token)
                                .send()
                                .await;
                        }
                    }
                })
            })
            .join()
            .ok();
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        // The egress gateway the daemon started outlives it by design.
        if let Some(pid) = self.gateway_pid() {
            // SAFETY: kill(2) on the gateway this test's daemon started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = std::fs::remove_dir(&self.pool_dir);
        // Volumes outlive machines: delete what the test left.
        if let Ok(entries) = std::fs::read_dir(&self.volume_pool_dir) {
            let pool = hangar_rootfs::BtrfsPool::open(&self.volume_pool_dir).unwrap();
            for entry in entries.flatten() {
                let _ = hangar_rootfs::Pool::delete(&pool, &entry.file_name().to_string_lossy());
            }
        }
        let _ = std::fs::remove_dir(&self.volume_pool_dir);
    }
}
