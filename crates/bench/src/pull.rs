//! Pulling one image of a few hundred MB from a registry on loopback:
//! Hangar's `POST /v1/images/pull` beside `skopeo copy` of the same image to
//! a directory (as `dir:` and as `oci:`), taking turns in one run. The image
//! is a few layers of random bytes: incompressible, as most of a real
//! image's bytes nearly are, and several, so that downloading layers at once
//! matters.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::hangar::{self, Daemon};
use crate::process::{check_interrupt, run_quiet, which};
use crate::stats::{mib, timed};
use crate::{Op, Section};

/// Layers of the image, one file of random bytes each.
const LAYERS: u64 = 3;
/// The image's repository in the registry (tag `latest`).
const REPO: &str = "big";

/// The image every pull fetches.
#[derive(Debug, serde::Serialize)]
pub struct PulledImage {
    /// `127.0.0.1:PORT/big:latest`.
    pub reference: String,
    pub layers: u64,
    /// Random bytes in each layer (its one file).
    pub layer_bytes: u64,
    /// The layer blobs (gzip'd tars) in all: what a pull downloads.
    pub compressed_bytes: u64,
}

/// Starts a registry, pushes an image of `size` bytes to it and starts a
/// daemon, then times `iterations` pulls by Hangar and as many `skopeo
/// copy`s of each kind, after one uncounted warm-up of each.
pub fn bench(cfg: &hangar::Config, size: u64, iterations: usize) -> Result<(Section, PulledImage)> {
    for (program, package) in [("docker-registry", "docker-registry"), ("skopeo", "skopeo")] {
        if which(program).is_none() {
            bail!("{program} not found on PATH (Debian: apt-get install {package})");
        }
    }
    let registry = Registry::start()?;
    eprintln!(
        "pull: pushing a {:.0} MiB image in {LAYERS} layers to {}…",
        mib(size),
        registry.addr
    );
    let image = push_image(&registry.addr, size).context("pushing the image to the registry")?;
    let daemon = Daemon::start(cfg)?;
    eprintln!("pull: {iterations} pulls by hangar and by skopeo, taking turns (after a warm-up)…");
    let result = measure(&daemon, &image.reference, iterations);
    if result.is_err() && check_interrupt().is_ok() {
        daemon.print_log_tail();
        eprintln!("registry log (tail):\n{}", registry.log_tail(20));
    }
    Ok((result?, image))
}

fn measure(d: &Daemon, reference: &str, iterations: usize) -> Result<Section> {
    let mut section = Section::default();
    let mut disk_bytes = 0;
    for i in 0..=iterations {
        check_interrupt()?;
        // Turn about, so that whatever else the shared host does falls on
        // all three alike.
        let (t_hangar, image) = hangar_pull(d, reference).with_context(|| format!("hangar pull, iteration {i}"))?;
        let t_dir = skopeo_copy(reference, "dir").with_context(|| format!("skopeo copy to dir:, iteration {i}"))?;
        let t_oci = skopeo_copy(reference, "oci").with_context(|| format!("skopeo copy to oci:, iteration {i}"))?;
        if i > 0 {
            section.push(Op::Pull, t_hangar);
            section.push(Op::SkopeoCopyDir, t_dir);
            section.push(Op::SkopeoCopyOci, t_oci);
        }
        disk_bytes = image["disk_bytes"].as_u64().unwrap_or(0);
    }
    section.notes.push(format!(
        "hangar's pull verifies every blob, decompresses and unpacks every layer (verifying its diff_id) and syncs \
         blobs and layers to disk ({:.1} MiB on disk after a pull); skopeo only stores (and syncs) the compressed \
         blobs",
        mib(disk_bytes)
    ));
    Ok(section)
}

/// One timed pull through the daemon; then a prune removes the image (no
/// machine uses it) with its blobs and layers, so that the next pull
/// downloads and unpacks everything again. Returns the pull's answer too.
fn hangar_pull(d: &Daemon, reference: &str) -> Result<(Duration, Value)> {
    let (image, t) = timed(|| d.call(Method::POST, "/v1/images/pull", Some(json!({ "image": reference }))))?;
    let pruned = d.call(Method::POST, "/v1/images/prune", None)?;
    if !pruned["removed"]
        .as_array()
        .is_some_and(|r| r.contains(&image["reference"]))
    {
        bail!("the prune after the pull kept the image: {pruned}");
    }
    Ok((t, image))
}

/// One timed `skopeo copy` of the image into a fresh directory, as
/// `transport` (`dir` or `oci`); the directory is removed afterwards.
fn skopeo_copy(reference: &str, transport: &str) -> Result<Duration> {
    let dest = tempfile::Builder::new()
        .prefix("hangar-bench-skopeo")
        .tempdir()
        .context("creating skopeo's destination")?;
    let ((), t) = timed(|| {
        run_quiet(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{reference}"))
                .arg(format!("{transport}:{}", dest.path().display())),
        )
    })?;
    Ok(t)
}

/// Pushes `REPO:latest`, of `LAYERS` layers of `size / LAYERS` random bytes
/// each, to the registry at `addr`. Each layer is the one layer of an OCI
/// layout that `hangar_image::write_oci_layout` writes (gzip'd, as Hangar
/// makes its own images); the config and manifest that list all of them
/// are made here.
fn push_image(addr: &str, size: u64) -> Result<PulledImage> {
    hangar_image::install_crypto_provider();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let layer_bytes = size / LAYERS;
    let (mut layers, mut diff_ids, mut config) = (Vec::new(), Vec::new(), Value::Null);
    for i in 0..LAYERS {
        check_interrupt()?;
        // One layer at a time, so that the scratch space is one layer's.
        let tmp = tempfile::Builder::new()
            .prefix("hangar-bench-layer")
            .tempdir()
            .context("creating a scratch directory")?;
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir(&rootfs)?;
        let mut random = File::open("/dev/urandom")?.take(layer_bytes);
        std::io::copy(&mut random, &mut File::create(rootfs.join(format!("random-{i}")))?)
            .context("writing random bytes")?;
        let layout = tmp.path().join("layout");
        let manifest = hangar_image::write_oci_layout(&layout, "latest", &rootfs, &Default::default())?;
        let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        let manifest: Value = serde_json::from_slice(&std::fs::read(blob(&manifest))?)?;
        config = serde_json::from_slice(&std::fs::read(blob(text(&manifest["config"]["digest"])?))?)?;
        diff_ids.push(config["rootfs"]["diff_ids"][0].clone());
        let layer = manifest["layers"][0].clone();
        let digest = text(&layer["digest"])?;
        rt.block_on(put_blob(&http, addr, digest, std::fs::read(blob(digest))?))?;
        layers.push(layer);
    }

    // The last layout's config, with every layer's diff_id, bottom-most
    // first.
    config["rootfs"]["diff_ids"] = Value::Array(diff_ids);
    let config = serde_json::to_vec(&config)?;
    let config_digest = format!("sha256:{:x}", sha2::Sha256::digest(&config));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers,
    });
    rt.block_on(async {
        put_blob(&http, addr, &config_digest, config).await?;
        let put = http
            .put(format!("http://{addr}/v2/{REPO}/manifests/latest"))
            .header(header::CONTENT_TYPE, "application/vnd.oci.image.manifest.v1+json")
            .body(serde_json::to_vec(&manifest)?)
            .send()
            .await?;
        expect(put, StatusCode::CREATED, "pushing the manifest").await
    })?;
    Ok(PulledImage {
        reference: format!("{addr}/{REPO}:latest"),
        layers: LAYERS,
        layer_bytes,
        compressed_bytes: layers.iter().filter_map(|l| l["size"].as_u64()).sum(),
    })
}

fn text(v: &Value) -> Result<&str> {
    v.as_str()
        .with_context(|| format!("not a string in a written layout: {v}"))
}

/// Uploads a blob in one piece (POST, then PUT with its digest).
async fn put_blob(http: &reqwest::Client, addr: &str, digest: &str, bytes: Vec<u8>) -> Result<()> {
    let started = http
        .post(format!("http://{addr}/v2/{REPO}/blobs/uploads/"))
        .send()
        .await?;
    let started = expect(started, StatusCode::ACCEPTED, "starting an upload").await?;
    let location = started
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("the registry started an upload without a Location")?;
    // Relative or absolute, as the registry is configured.
    let url = if location.starts_with("http") {
        location.to_owned()
    } else {
        format!("http://{addr}{location}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let done = http
        .put(format!("{url}{sep}digest={digest}"))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(bytes)
        .send()
        .await?;
    expect(done, StatusCode::CREATED, "uploading a blob").await?;
    Ok(())
}

/// `resp` if it has status `want`, else an error with its body.
async fn expect(resp: reqwest::Response, want: StatusCode, what: &str) -> Result<reqwest::Response> {
    let status = resp.status();
    if status != want {
        bail!(
            "{what}: the registry answered {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(resp)
}

/// Debian's `docker-registry` (distribution 2.8) on 127.0.0.1, at a port
/// the kernel picks, storing into a directory of its own. Dropping it stops
/// the registry and removes the directory.
struct Registry {
    dir: tempfile::TempDir,
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
}

impl Registry {
    fn start() -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("hangar-bench-registry")
            .tempdir()
            .context("creating the registry's directory")?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n\
                 http: {{addr: \"127.0.0.1:0\", secret: hangar-bench}}\n",
                dir.path().join("storage").display()
            ),
        )?;
        let log = File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group, as the daemon's: a Ctrl-C at the
            // terminal reaches the bench, which then stops it.
            .process_group(0)
            .spawn()
            .context("spawning docker-registry")?;
        let mut r = Registry {
            dir,
            child,
            addr: String::new(),
        };
        // It says where it listens once it does.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = r.log_tail(usize::MAX);
            if let Some(i) = log.find("listening on 127.0.0.1:") {
                let rest = &log[i + "listening on ".len()..];
                let end = rest.find(|c: char| c == '"' || c.is_whitespace()).unwrap_or(rest.len());
                r.addr = rest[..end].to_owned();
                return Ok(r);
            }
            if let Some(status) = r.child.try_wait()? {
                bail!("docker-registry exited with {status} at start:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not come up in 20 s:\n{log}");
            }
            check_interrupt()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
