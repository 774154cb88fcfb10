//! Pulls from a real registry (Debian's `docker-registry`, distribution
//! 2.8) on loopback, with images pushed by `skopeo` and, for the shapes
//! skopeo cannot make, by hand over the registry API. Needs root (layers
//! unpack with owners and xattrs) and the two programs; skips otherwise.

#[path = "support/registry.rs"]
mod registry;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hangar_image::{ImageError, ImageStore, LayerStatus, PullProgress, RegistryClient, RegistryConfig};
use registry::{Options, Registry, busybox_layout, sha};
use serde_json::json;

struct Pulled {
    store: Arc<ImageStore>,
    _dir: tempfile::TempDir,
}

fn new_store() -> Pulled {
    let dir = tempfile::tempdir().unwrap();
    Pulled {
        store: Arc::new(ImageStore::open(&dir.path().join("images")).unwrap()),
        _dir: dir,
    }
}

fn client() -> RegistryClient {
    RegistryClient::new(&RegistryConfig::default()).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_oci_docker_and_zstd_images_and_unpacks_them() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), &[("etc/hello", b"hi\n")]);
    reg.push(&layout, "bb:latest", &[]);
    reg.push(&layout, "bb-docker:latest", &["--format", "v2s2"]);
    let zstd_layout = format!("oci:{}:latest", work.path().join("zstd").display());
    let out = Command::new("skopeo")
        .args(["copy", "-q", "--dest-compress-format", "zstd", &layout, &zstd_layout])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    reg.push(&zstd_layout, "bb-zstd:latest", &[]);

    let p = new_store();
    let client = client();
    let seen: Arc<Mutex<Vec<PullProgress>>> = Arc::default();
    let sink = {
        let seen = seen.clone();
        Arc::new(move |p: &PullProgress| seen.lock().unwrap().push(p.clone()))
    };
    let image = p
        .store
        .pull(&client, &reg.reference("bb:latest"), Some(sink))
        .await
        .unwrap();
    assert_eq!(image.reference, format!("{}/bb:latest", reg.addr));
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.layers.len(), 1);
    let layer_dir = p.store.layer_path(&image.layers[0].diff_id);
    assert_eq!(std::fs::read(layer_dir.join("etc/hello")).unwrap(), b"hi\n");
    assert!(layer_dir.join("bin/busybox").is_file());
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let last = seen.last().unwrap();
    assert_eq!(last.layers[0].status, LayerStatus::Done);
    assert_eq!(last.bytes(), (image.layers[0].size, image.layers[0].size));
    assert!(
        seen.iter()
            .any(|p| p.layers.first().is_some_and(|l| l.status == LayerStatus::Downloading))
    );
    assert!(entries(&p.store.root().join("partial")).is_empty());

    // The Docker v2s2 form of the same image: same layer content, so the
    // unpacked layer is shared; a second pull of the first finds everything.
    let docker = p
        .store
        .pull(&client, &reg.reference("bb-docker:latest"), None)
        .await
        .unwrap();
    assert_eq!(docker.layers[0].diff_id, image.layers[0].diff_id);
    assert_eq!(
        docker.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let again = p.store.pull(&client, &reg.reference("bb:latest"), None).await.unwrap();
    assert_eq!(again, image);

    let zstd = p
        .store
        .pull(&client, &reg.reference("bb-zstd:latest"), None)
        .await
        .unwrap();
    assert_eq!(zstd.layers[0].media_type, "application/vnd.oci.image.layer.v1.tar+zstd");
    assert_eq!(zstd.layers[0].diff_id, image.layers[0].diff_id);

    // By digest, too.
    let pinned = reg.reference(&format!("bb@{}", image.manifest_digest));
    assert_eq!(
        p.store.pull(&client, &pinned, None).await.unwrap().manifest_digest,
        image.manifest_digest
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_resolves_to_linux_amd64() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), &[]);
    reg.push(&layout, "multi:amd64", &[]);
    // The amd64 manifest as the registry has it.
    let http = reqwest::Client::new();
    let amd64 = http
        .get(format!("http://{}/v2/multi/manifests/amd64", reg.addr))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // An arm64 image whose one layer says so.
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "platform", &b"arm64\n"[..]).unwrap();
    let layer = tar.into_inner().unwrap();
    let layer_digest = reg.push_blob("multi", &layer).await;
    let config = json!({"architecture": "arm64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}});
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = reg.push_blob("multi", &config_bytes).await;
    let arm = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}]});
    let (arm_digest, arm_size) = reg
        .push_manifest("multi", "arm64", "application/vnd.oci.image.manifest.v1+json", &arm)
        .await;
    let index = |platforms: &[(&str, &str, u64, &str)]| {
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": platforms.iter().map(|(digest, arch, size, variant)| json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
                "platform": {"os": "linux", "architecture": arch, "variant": variant}})).collect::<Vec<_>>()})
    };
    let amd64_digest = sha(&amd64);
    reg.push_manifest(
        "multi",
        "latest",
        "application/vnd.oci.image.index.v1+json",
        &index(&[
            (&arm_digest, "arm64", arm_size, "v8"),
            (&amd64_digest, "amd64", amd64.len() as u64, ""),
        ]),
    )
    .await;
    reg.push_manifest(
        "multi",
        "arm-only",
        "application/vnd.oci.image.index.v1+json",
        &index(&[(&arm_digest, "arm64", arm_size, "v8")]),
    )
    .await;

    let p = new_store();
    let image = p
        .store
        .pull(&client(), &reg.reference("multi:latest"), None)
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, amd64_digest);
    assert!(
        p.store
            .layer_path(&image.layers[0].diff_id)
            .join("bin/busybox")
            .exists()
    );

    match p.store.pull(&client(), &reg.reference("multi:arm-only"), None).await {
        Err(e @ ImageError::UnsupportedPlatform { .. }) => {
            assert!(e.to_string().contains("linux/arm64/v8"), "{e}");
        }
        other => panic!("expected UnsupportedPlatform, got {other:?}"),
    }
    // A lone arm64 manifest is refused by its config, after fetching only that.
    match p.store.pull(&client(), &reg.reference("multi:arm64"), None).await {
        Err(e @ ImageError::UnsupportedPlatform { .. }) => assert!(e.to_string().contains("linux/arm64"), "{e}"),
        other => panic!("expected UnsupportedPlatform, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_uses_the_auth_file_and_says_when_credentials_are_missing_or_wrong() {
    registry::require();
    let reg = Registry::start_with(Options {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), &[]);
    reg.push(&layout, "private/bb:latest", &[]);
    let r = reg.reference("private/bb:latest");
    let p = new_store();

    let auth_file = work.path().join("auth.json");
    let with = |user: &str, password: &str| {
        let auth = base64_encode(&format!("{user}:{password}"));
        std::fs::write(
            &auth_file,
            json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string(),
        )
        .unwrap();
        RegistryClient::new(&RegistryConfig {
            auth_file: Some(auth_file.clone()),
            ..Default::default()
        })
        .unwrap()
    };

    let anonymous = RegistryClient::new(&RegistryConfig {
        auth_file: Some(work.path().join("no-such-auth.json")),
        ..Default::default()
    })
    .unwrap();
    match p.store.pull(&anonymous, &r, None).await {
        Err(e @ ImageError::Unauthorized { .. }) => assert!(e.to_string().contains("needs credentials"), "{e}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    match p.store.pull(&with("alice", "wrong"), &r, None).await {
        Err(e @ ImageError::Unauthorized { .. }) => assert!(e.to_string().contains("\"alice\""), "{e}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(entries(&p.store.root().join("blobs/sha256")).is_empty());
    let image = p.store.pull(&with("alice", "s3cret"), &r, None).await.unwrap();
    assert!(
        p.store
            .layer_path(&image.layers[0].diff_id)
            .join("bin/busybox")
            .exists()
    );
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_names_and_unreachable_registries_are_clear_errors() {
    registry::require();
    let mut reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    reg.push(&busybox_layout(work.path(), &[]), "bb:latest", &[]);
    let p = new_store();
    for missing in ["bb:nope", "nobody/here:latest"] {
        match p.store.pull(&client(), &reg.reference(missing), None).await {
            Err(e @ ImageError::NotFound { .. }) => assert!(e.to_string().contains("404"), "{e}"),
            other => panic!("{missing}: expected NotFound, got {other:?}"),
        }
    }
    let r = reg.reference("bb:latest");
    reg.kill();
    match p.store.pull(&client(), &r, None).await {
        Err(e @ ImageError::Registry { .. }) => assert!(e.to_string().contains("cannot connect"), "{e}"),
        other => panic!("expected Registry, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_blob_is_refused_and_leaves_nothing_behind() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), &[("corrupt-me", b"x")]);
    reg.push(&layout, "bad:latest", &[]);
    let p = new_store();
    // Find the layer through a first, good pull into another store.
    let good = new_store();
    let image = good
        .store
        .pull(&client(), &reg.reference("bad:latest"), None)
        .await
        .unwrap();
    let blob = reg.blob_file(&image.layers[0].digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();

    match p.store.pull(&client(), &reg.reference("bad:latest"), None).await {
        Err(e @ ImageError::DigestMismatch { .. }) => {
            assert!(e.to_string().contains(&image.layers[0].digest), "{e}");
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(entries(&p.store.root().join("blobs/sha256")).is_empty());
    assert!(entries(&p.store.root().join("layers")).is_empty());
    assert!(entries(&p.store.root().join("partial")).is_empty());

    // Truncated: the registry serves fewer bytes, with no error of its own.
    std::fs::write(&blob, &bytes[..middle]).unwrap();
    match p.store.pull(&client(), &reg.reference("bad:latest"), None).await {
        Err(e @ ImageError::Registry { .. }) => assert!(e.to_string().contains("truncated"), "{e}"),
        other => panic!("expected Registry, got {other:?}"),
    }
    assert!(entries(&p.store.root().join("layers")).is_empty());
    assert!(entries(&p.store.root().join("partial")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_pull_resumes_where_it_stopped() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    // Incompressible, so the layer blob is that big.
    let noise = noise(48 << 20);
    let layout = busybox_layout(work.path(), &[("noise", &noise)]);
    reg.push(&layout, "big:latest", &[]);
    let r = reg.reference("big:latest");
    let p = new_store();

    // Kill the registry once 8 MiB of the layer have arrived.
    let registry = Arc::new(Mutex::new(reg));
    let killed = Arc::new(AtomicBool::new(false));
    let sink = {
        let (registry, killed) = (registry.clone(), killed.clone());
        Arc::new(move |p: &PullProgress| {
            if p.layers.first().is_some_and(|l| l.downloaded > 8 << 20) && !killed.swap(true, Ordering::SeqCst) {
                registry.lock().unwrap().kill();
            }
        })
    };
    let started = Instant::now();
    let err = p.store.pull(&client(), &r, Some(sink)).await.unwrap_err();
    assert!(killed.load(Ordering::SeqCst));
    assert!(matches!(err, ImageError::Registry { .. }), "{err:?}");
    let partial = entries(&p.store.root().join("partial"));
    assert_eq!(partial.len(), 1, "{partial:?}");
    let kept = std::fs::metadata(p.store.root().join("partial").join(&partial[0]))
        .unwrap()
        .len();
    assert!(kept >= 8 << 20, "{kept}");
    assert!(entries(&p.store.root().join("layers")).is_empty());
    eprintln!("interrupted after {:?} with {kept} bytes kept", started.elapsed());

    // Same port, same storage: the next pull asks only for the rest.
    registry.lock().unwrap().run();
    let first_seen: Arc<Mutex<Option<u64>>> = Arc::default();
    let sink = {
        let first_seen = first_seen.clone();
        Arc::new(move |p: &PullProgress| {
            if let Some(l) = p.layers.first()
                && l.status == LayerStatus::Downloading
                && l.downloaded > 0
            {
                first_seen.lock().unwrap().get_or_insert(l.downloaded);
            }
        })
    };
    let image = p.store.pull(&client(), &r, Some(sink)).await.unwrap();
    let first = first_seen.lock().unwrap().unwrap();
    assert!(first > kept, "resumed at {first}, had {kept}");
    assert_eq!(
        std::fs::read(p.store.layer_path(&image.layers[0].diff_id).join("noise")).unwrap(),
        noise
    );
    assert!(entries(&p.store.root().join("partial")).is_empty());
}

/// A token server that hands out one pre-minted token to `alice:s3cret`,
/// and counts the requests it gets.
struct TokenServer {
    url: String,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenServer {
    async fn start(token: String) -> TokenServer {
        use base64::Engine as _;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let want = format!(
            "authorization: basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
        )
        .to_lowercase();
        let counter = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (token, want, counter) = (token.clone(), want.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let answer = if head.lines().any(|l| l.trim() == want) {
                        let body = json!({"token": token, "expires_in": 3600}).to_string();
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
                    };
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        TokenServer { url, requests }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_come_from_the_registrys_token_server() {
    registry::require();
    let work = tempfile::tempdir().unwrap();
    let (token, cert) = registry::mint_token(work.path(), "private/bb");
    let server = TokenServer::start(token).await;
    let reg = Registry::start_with(Options {
        token: Some((server.url.clone(), cert)),
        ..Default::default()
    });
    reg.push(
        &busybox_layout(&work.path().join("image"), &[]),
        "private/bb:latest",
        &["--dest-creds=alice:s3cret"],
    );
    let r = reg.reference("private/bb:latest");
    let p = new_store();

    let anonymous = RegistryClient::new(&RegistryConfig {
        auth_file: Some(work.path().join("none.json")),
        ..Default::default()
    })
    .unwrap();
    match p.store.pull(&anonymous, &r, None).await {
        Err(e @ ImageError::Unauthorized { .. }) => assert!(e.to_string().contains("needs credentials"), "{e}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }

    let auth_file = work.path().join("auth.json");
    let auth = base64_encode("alice:s3cret");
    std::fs::write(
        &auth_file,
        json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let client = RegistryClient::new(&RegistryConfig {
        auth_file: Some(auth_file),
        ..Default::default()
    })
    .unwrap();
    let before = server.requests.load(Ordering::SeqCst);
    let image = p.store.pull(&client, &r, None).await.unwrap();
    assert!(
        p.store
            .layer_path(&image.layers[0].diff_id)
            .join("bin/busybox")
            .exists()
    );
    // One token served the manifest, the config and the layer.
    assert_eq!(server.requests.load(Ordering::SeqCst) - before, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn https_registries_are_trusted_through_a_configured_ca() {
    registry::require();
    let work = tempfile::tempdir().unwrap();
    let (ca, cert, key) = registry::tls_fixtures(work.path());
    let reg = Registry::start_with(Options {
        tls: Some((cert, key)),
        ..Default::default()
    });
    reg.push(&busybox_layout(&work.path().join("image"), &[]), "bb:latest", &[]);
    let r = reg.reference("bb:latest");
    let p = new_store();

    match p.store.pull(&client(), &r, None).await {
        Err(e @ ImageError::Registry { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("not trusted") && msg.contains("--registry-ca-file"),
                "{msg}"
            );
        }
        other => panic!("expected Registry, got {other:?}"),
    }
    let trusting = RegistryClient::new(&RegistryConfig {
        ca_file: Some(ca),
        ..Default::default()
    })
    .unwrap();
    let image = p.store.pull(&trusting, &r, None).await.unwrap();
    assert!(
        p.store
            .layer_path(&image.layers[0].diff_id)
            .join("bin/busybox")
            .exists()
    );

    // A CA file that holds no certificate is refused when the client is made.
    let junk = work.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = RegistryClient::new(&RegistryConfig {
        ca_file: Some(junk),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, ImageError::Config { .. }), "{e:?}");
}

/// `len` pseudo-random bytes (xorshift): incompressible.
fn noise(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    let mut state = 0x9e3779b97f4a7c15u64;
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    bytes
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {out:?}");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_a_clear_error_and_leaves_nothing_behind() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    reg.push(
        &busybox_layout(work.path(), &[("noise", &noise(8 << 20))]),
        "big:latest",
        &[],
    );
    let disk = SmallDisk::new("4m");
    let store = Arc::new(ImageStore::open(&disk.0.path().join("images")).unwrap());
    match store.pull(&client(), &reg.reference("big:latest"), None).await {
        Err(ImageError::Io { source, .. }) if source.raw_os_error() == Some(28) => {}
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    for dir in ["partial", "blobs/sha256", "layers", "tmp"] {
        assert!(entries(&store.root().join(dir)).is_empty(), "{dir} is not empty");
    }
}
