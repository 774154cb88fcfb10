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

/// Fails the test, saying what to do, unless it runs as root with the
/// registry tools installed: a pull test that quietly skipped would pass
/// without testing anything.
pub fn require() {
    hangar_image::install_crypto_provider();
    assert!(
        rustix::process::geteuid().is_root(),
        "pull tests unpack layers with owners and xattrs and need root: run scripts/test.sh as root"
    );
    for program in ["docker-registry", "skopeo", "htpasswd", "openssl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{program} is not installed: run scripts/install-deps.sh --test");
    }
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
    options: Options,
}

/// How a registry is set up. The default is anonymous plain HTTP.
#[derive(Default, Clone)]
pub struct Options {
    /// Basic auth for `user:password` (bcrypt htpasswd).
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Token auth: the token server's URL and the certificate whose key
    /// signs its tokens.
    pub token: Option<(String, PathBuf)>,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        if let Some((user, password)) = &options.htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .unwrap();
            assert!(out.status.success(), "htpasswd: {out:?}");
            std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
        }
        let mut r = Registry {
            dir,
            child: None,
            addr: "127.0.0.1:0".into(),
            options,
        };
        r.run();
        r
    }

    /// Starts the registry process (again, on the same port and storage).
    pub fn run(&mut self) {
        let auth = match (&self.options.htpasswd, &self.options.token) {
            (Some(_), _) => format!(
                "auth: {{htpasswd: {{realm: hangar-test, path: {}}}}}\n",
                self.dir.path().join("htpasswd").display()
            ),
            (None, Some((realm, cert))) => format!(
                "auth: {{token: {{realm: \"{realm}\", service: hangar-test-registry, issuer: hangar-test-issuer, \
                 rootcertbundle: {}}}}}\n",
                cert.display()
            ),
            (None, None) => String::new(),
        };
        let tls = match &self.options.tls {
            Some((cert, key)) => format!(", tls: {{certificate: {}, key: {}}}", cert.display(), key.display()),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog: {{level: info, accesslog: {{disabled: false}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n\
             http: {{addr: \"{}\", secret: hangar-test{tls}}}\n{auth}",
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
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                    .unwrap();
                self.addr = rest[..end].to_owned();
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
        if let Some((u, p)) = &self.options.htpasswd {
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

/// Runs openssl, failing the test on error.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh RSA key and a self-signed certificate for it, valid two days:
/// `NAME.key` and `NAME.crt` in `dir`.
fn self_signed(dir: &Path, name: &str, subject: &str, extra: &[&str]) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    let mut args = vec![
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &crt, "-days", "2", "-subj", subject,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

/// A private CA and a server certificate it signed for 127.0.0.1 and
/// localhost, in `dir`: returns (ca.crt, server.crt, server.key).
pub fn tls_fixtures(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    self_signed(
        dir,
        "ca",
        "/CN=hangar-test-ca",
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    (dir.join("ca.crt"), dir.join("server.crt"), dir.join("server.key"))
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A registry token (RS256 JWT) granting pull and push on `repository`,
/// signed by a fresh key whose self-signed certificate the registry must
/// trust: returns (token, cert.pem).
pub fn mint_token(dir: &Path, repository: &str) -> (String, PathBuf) {
    use base64::Engine as _;
    self_signed(dir, "token", "/CN=hangar-test-token", &[]);
    let pem = std::fs::read_to_string(dir.join("token.crt")).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(&b64).unwrap();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [base64::engine::general_purpose::STANDARD.encode(der)]});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "hangar-test-issuer", "sub": "alice", "aud": "hangar-test-registry",
        "exp": now + 86400, "nbf": now - 60, "iat": now, "jti": "t1",
        "access": [{"type": "repository", "name": repository, "actions": ["pull", "push"]}],
    });
    let signing_input = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    std::fs::write(dir.join("signing-input"), &signing_input).unwrap();
    openssl(
        dir,
        &[
            "dgst",
            "-sha256",
            "-sign",
            "token.key",
            "-out",
            "signature",
            "signing-input",
        ],
    );
    let signature = std::fs::read(dir.join("signature")).unwrap();
    (
        format!("{signing_input}.{}", base64url(&signature)),
        dir.join("token.crt"),
    )
}
