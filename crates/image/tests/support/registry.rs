//! A real OCI registry for tests: Debian's `docker-registry` (distribution
//! 2.8) on 127.0.0.1, filled with `skopeo` or over its API. Shared by the
//! image crate's pull tests and the daemon's (`#[path]`-included).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hangar_image::{ImageConfig, ImageRef, RegistryRef, write_oci_layout};
use serde_json::Value;

/// Root, `docker-registry` and `skopeo` are all there (else says why not).
pub fn usable() -> bool {
    hangar_image::install_crypto_provider();
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: pull tests need root");
        return false;
    }
    for program in ["docker-registry", "skopeo"] {
        if !have(program) {
            eprintln!("skipping: {program} is not installed (scripts/install-deps.sh --test)");
            return false;
        }
    }
    true
}

pub fn sha(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// A `docker-registry` on 127.0.0.1, stopped on drop.
pub struct Registry {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub addr: String,
    htpasswd: Option<(String, String)>,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// With basic auth for `user:password` (bcrypt htpasswd).
    pub fn start_with(htpasswd: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry {
            dir,
            child: None,
            addr: "127.0.0.1:0".into(),
            htpasswd: htpasswd.map(|(u, p)| (u.to_owned(), p.to_owned())),
        };
        if let Some((user, password)) = &r.htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .unwrap();
            assert!(out.status.success(), "htpasswd: {out:?}");
            std::fs::write(r.dir.path().join("htpasswd"), out.stdout).unwrap();
        }
        r.run();
        r
    }

    /// Starts the registry process (again, on the same port and storage).
    pub fn run(&mut self) {
        let auth = match self.htpasswd {
            Some(_) => format!(
                "auth: {{htpasswd: {{realm: hangar-test, path: {}}}}}\n",
                self.dir.path().join("htpasswd").display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog: {{level: info, accesslog: {{disabled: false}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n\
             http: {{addr: \"{}\", secret: hangar-test}}\n{auth}",
            self.dir.path().join("store").display(),
            self.addr
        );
        let config_path = self.dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = self.dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(i) = text.find("listening on 127.0.0.1:") {
                let rest = &text[i + "listening on ".len()..];
                self.addr = rest[..rest.find(|c: char| c == '"' || c.is_whitespace()).unwrap()].to_owned();
                break;
            }
            assert!(Instant::now() < deadline, "registry did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// How many times the blob was asked for (from the access log).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .count()
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("store/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn reference(&self, repo_tag: &str) -> RegistryRef {
        match format!("{}/{repo_tag}", self.addr).parse::<ImageRef>().unwrap() {
            ImageRef::Registry(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// `skopeo copy` of a local layout into this registry.
    pub fn push(&self, layout: &str, repo_tag: &str, extra: &[&str]) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--dest-tls-verify=false"]).args(extra);
        if let Some((u, p)) = &self.htpasswd {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = cmd
            .arg(layout)
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Uploads a blob over the registry API (monolithic POST + PUT).
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let http = reqwest::Client::new();
        let digest = sha(bytes);
        let started = http
            .post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 202, "{:?}", started.text().await);
        let location = started.headers()["location"].to_str().unwrap().to_owned();
        let url = if location.starts_with("http") {
            location
        } else {
            format!("http://{}{location}", self.addr)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let done = http
            .put(format!("{url}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 201, "{:?}", done.text().await);
        digest
    }

    pub async fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &Value) -> (String, u64) {
        let bytes = serde_json::to_vec(body).unwrap();
        let r = reqwest::Client::new()
            .put(format!("http://{}/v2/{repo}/manifests/{reference}", self.addr))
            .header("content-type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        (sha(&bytes), bytes.len() as u64)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A one-layer image of busybox (from the host's busybox-static) plus
/// `extra` files, written as an OCI layout `oci:DIR:latest`.
pub fn busybox_layout(dir: &Path, extra: &[(&str, &[u8])]) -> String {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    for (path, content) in extra {
        let p = rootfs.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::File::create(p).unwrap().write_all(content).unwrap();
    }
    let layout = dir.join("layout");
    let config = ImageConfig {
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    write_oci_layout(&layout, "latest", &rootfs, &config).unwrap();
    format!("oci:{}:latest", layout.display())
}
