//! The host side of isolation: what a host user who is not root, or an API
//! caller, can reach through Hangar. Each test plays the attacker of one
//! finding: a setuid binary a machine planted, a device node an image
//! carried, a host file named as an image, an error that quotes too much.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Runs `script` on the host as `nobody`: (whether it succeeded, its
/// output). Through a shell, so every path is looked up as nobody (setpriv
/// finds the program it runs before it drops root).
fn as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg(script)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The per-mount options of every mount at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<(String, String)> {
    let dir = std::fs::canonicalize(dir).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (point, options) = (fields[4], fields[5]);
            Path::new(point)
                .starts_with(&dir)
                .then(|| (point.to_owned(), options.to_owned()))
        })
        .collect()
}

/// A daemon with an app `app` and a machine in it (busybox, as configured).
async fn daemon_with_machine(app: &str) -> (Daemon, String) {
    let d = Daemon::start();
    d.create_app(app).await;
    let id = d.machine(app, json!({})).await["id"].as_str().unwrap().to_owned();
    (d, id)
}

/// An image whose one layer holds a world-writable character device (the
/// host's /dev/null, harmless to open, so the test can tell "opened").
fn image_with_a_device_node() -> String {
    let dir = common::import_tempdir().keep();
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).unwrap();
    let node = rootfs.join("node");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &node,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    set_mode(&node, 0o666);
    // Owned by a user the host may have: the layer's copy must still be root's.
    std::os::unix::fs::lchown(&node, Some(1000), Some(1000)).unwrap();
    let config = hangar_image::ImageConfig {
        cmd: vec!["/bin/sleep".into(), "infinity".into()],
        ..Default::default()
    };
    let layout = dir.join("layout");
    hangar_image::write_oci_layout(&layout, "latest", &rootfs, &config).unwrap();
    format!("oci:{}:latest", layout.display())
}

/// A host user can't read Hangar's files, run a setuid binary a machine
/// planted, or open a device node an image carried: the data dir and the
/// pool are 0700 and, behind that, every mount is nosuid,nodev.
#[tokio::test(flavor = "multi_thread")]
async fn host_users_reach_nothing_through_the_data_dir() {
    let (d, id) = daemon_with_machine("host").await;
    // The machine plants a setuid-root copy of the host's `id`.
    let resp = d
        .http
        .put(format!(
            "{}/v1/apps/host/machines/{id}/files/content?path=/root/id",
            d.url
        ))
        .bearer_auth(&d.token)
        .body(std::fs::read("/usr/bin/id").unwrap())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    d.sh("host", &id, "chmod 4755 /root/id").await;
    let dev = d.machine("host", json!({"image": image_with_a_device_node()})).await;
    let dev_id = dev["id"].as_str().unwrap();

    let data = d.data_dir.path().to_owned();
    let planted = [
        data.join(format!("machines/{id}/rootfs/root/id")),
        d.pool_dir.join(format!("machine-{id}/upper/root/id")),
    ];
    let device = data.join(format!("machines/{dev_id}/rootfs/node"));
    let layer_devices: Vec<PathBuf> = std::fs::read_dir(data.join("images/layers"))
        .unwrap()
        .map(|e| e.unwrap().path().join("node"))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    assert_eq!(layer_devices.len(), 1, "the image's layer holds the node");

    // Fence one: only root may enter.
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&d.pool_dir), 0o700);
    assert_eq!(mode(&data.join("state.db")), 0o600);
    for path in [
        &data.join("state.db"),
        &data.join("api-token"),
        &device,
        &layer_devices[0],
    ] {
        let (ok, out) = as_nobody(&format!("cat {}", path.display()));
        assert!(!ok, "nobody read {}: {out}", path.display());
    }
    for binary in &planted {
        let (ok, out) = as_nobody(&format!("{} -u", binary.display()));
        assert!(!ok, "nobody ran {}: {out}", binary.display());
    }

    // Fence two, with the first taken down: setuid bits and device nodes
    // mean nothing on Hangar's mounts, and a layer's device is root's.
    use std::os::unix::fs::MetadataExt;
    let layer_node = std::fs::symlink_metadata(&layer_devices[0]).unwrap();
    assert_eq!(
        (layer_node.uid(), layer_node.mode() & 0o777),
        (0, 0o600),
        "the layer's device node"
    );
    // The machines' root filesystems and run directories, and the pool.
    let mounts: Vec<_> = mounts_under(&data)
        .into_iter()
        .chain(mounts_under(d.pool_dir.parent().unwrap()))
        .collect();
    assert!(mounts.len() >= 5, "{mounts:?}");
    for mount in mounts {
        let opts: Vec<&str> = mount.1.split(',').collect();
        assert!(opts.contains(&"nosuid") && opts.contains(&"nodev"), "{mount:?}");
    }
    set_mode(&data, 0o755);
    set_mode(&d.pool_dir, 0o755);
    let outcome = std::panic::catch_unwind(|| {
        for binary in &planted {
            let (ok, out) = as_nobody(&format!("{} -u", binary.display()));
            assert!(ok, "{out}");
            assert_eq!(out.trim(), "65534", "{} ran as root", binary.display());
        }
        for node in [&device, &layer_devices[0]] {
            let (ok, out) = as_nobody(&format!("echo x > {}", node.display()));
            assert!(!ok, "nobody opened {}: {out}", node.display());
        }
    });
    set_mode(&data, 0o700);
    set_mode(&d.pool_dir, 0o700);
    outcome.unwrap();
}

/// A daemon restarted on a data dir from before this hardening makes it
/// private again, and its machines keep their files.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_data_dir_is_made_private_on_start() {
    let mut d = Daemon::start();
    d.create_app("old").await;
    let id = d.machine("old", json!({})).await["id"].as_str().unwrap().to_owned();
    d.sh("old", &id, "echo kept > /root/note").await;
    d.stop_daemon(libc::SIGTERM);
    let data = d.data_dir.path().to_owned();
    for (path, m) in [(&data, 0o755), (&d.pool_dir, 0o755), (&data.join("state.db"), 0o644)] {
        set_mode(path, m);
    }
    d.start_daemon();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&d.pool_dir), 0o700);
    assert_eq!(mode(&data.join("state.db")), 0o600);
    assert_eq!(d.sh("old", &id, "cat /root/note").await, "kept\n");
}

fn error_text(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_owned()
}

/// An API caller can name as an image only files under the import
/// directory, learns nothing of other files (not even whether they exist),
/// and no error carries a host path or a file's contents.
#[tokio::test(flavor = "multi_thread")]
async fn api_callers_read_no_host_files() {
    let d = Daemon::start();
    d.create_app("api").await;
    let data = d.data_dir.path().display().to_string();
    let create = |image: String| {
        let d = &d;
        async move {
            d.call(
                Method::POST,
                "/v1/apps/api/machines",
                Some(json!({"config": {"image": image}})),
            )
            .await
        }
    };
    let outside = [
        "oci-archive:/etc/shadow".to_owned(),
        "oci-archive:/etc/passwd".to_owned(),
        "oci:/etc".to_owned(),
        "oci:/nonexistent/layout".to_owned(),
        format!("oci-archive:{}/../../etc/shadow", common::IMPORTS),
        format!("oci:{data}/exports/../machines"),
    ];
    let mut messages = Vec::new();
    for image in &outside {
        let (status, v) = create(image.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{image}: {v}");
        let text = error_text(&v);
        assert!(text.contains("import directory"), "{text}");
        assert!(!text.contains("root:"), "{image}: a file's contents in {text}");
        messages.push(text.replace(image.as_str(), "IMAGE"));
    }
    // The same answer whether or not the path exists.
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:#?}");
    let (status, v) = d
        .call(
            Method::POST,
            "/v1/images/pull",
            Some(json!({"image": "oci-archive:/etc/shadow"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // A symlink in the import directory doesn't lead out of it.
    let dir = common::import_tempdir();
    std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.path().join("shadow.tar")).unwrap();
    for image in [
        format!("oci:{}/etc", dir.path().display()),
        format!("oci-archive:{}/shadow.tar", dir.path().display()),
    ] {
        let (status, v) = create(image.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{image}: {v}");
        assert!(!error_text(&v).contains("root:"), "{v}");
    }

    // Nor does a link inside a layout.
    let layout = dir.path().join("linked");
    std::fs::create_dir_all(&layout).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", layout.join("index.json")).unwrap();
    let (status, v) = create(format!("oci:{}", layout.display())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("symbolic link"), "{v}");

    // Inside it, a file that is no image is refused for what it is, with
    // neither its bytes nor the daemon's paths in the answer.
    std::fs::copy("/etc/shadow", dir.path().join("copy.tar")).unwrap();
    std::fs::write(dir.path().join("zeros.tar"), vec![0u8; 10_000]).unwrap();
    std::fs::write(dir.path().join("short.tar"), b"not a tar at all").unwrap();
    for name in ["copy.tar", "zeros.tar", "short.tar"] {
        let image = format!("oci-archive:{}/{name}", dir.path().display());
        let (status, v) = create(image.clone()).await;
        assert!(status.is_client_error(), "{image}: {status} {v}");
        let text = error_text(&v);
        assert!(!text.contains("root:") && !text.contains(&data), "{image}: {text}");
    }
}

/// A machine's log keeps only its newest output (here 1 MiB of 5 MB
/// written), drops the oldest first, and says that it did.
#[tokio::test(flavor = "multi_thread")]
async fn a_machines_log_is_capped() {
    let d = Daemon::start_with(&["--machine-log-mb", "1"]);
    d.create_app("log").await;
    let script = "yes hangar-log-line | head -c 5000000; printf '\\nEND\\n'; exec sleep infinity";
    let m = d.machine("log", json!({"init": {"cmd": ["sh", "-c", script]}})).await;
    let id = m["id"].as_str().unwrap();
    let logs = |query: &'static str| {
        let d = &d;
        async move {
            let url = format!("{}/v1/apps/log/machines/{id}/logs{query}", d.url);
            d.http
                .get(url)
                .bearer_auth(&d.token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let text = logs("").await;
        if text.ends_with("\nEND\n") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no END in the log: {} bytes",
            text.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        text.starts_with("[hangar: older output was dropped"),
        "{}",
        &text[..100]
    );
    assert!(text.len() <= 1 << 20, "{} bytes kept", text.len());
    assert!(text.len() >= 1 << 19, "{} bytes kept", text.len());
    let on_disk: u64 = ["a", "b"]
        .iter()
        .map(|s| {
            let path = d.data_dir.path().join(format!("machines/{id}/output-{s}.log"));
            std::fs::metadata(path).unwrap().len()
        })
        .sum();
    assert!(on_disk <= (1 << 20) + 128, "{on_disk} bytes on disk");
    let tail = logs("?tail_bytes=20").await;
    assert!(tail.ends_with("\nEND\n") && tail.len() == 20, "{tail:?}");
}

/// A machine can't reach the daemon or the ingress proxy through the
/// gateway, whatever the policy allows: not at 0.0.0.0, ::, other loopback
/// addresses, or the host's own addresses. Other ports still pass.
#[tokio::test(flavor = "multi_thread")]
async fn egress_never_reaches_the_daemon_or_the_proxy() {
    let (d, id) = daemon_with_machine("eg").await;
    // A server of our own on loopback: what the policy lets through.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in other.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nother");
        }
    });
    let port_of = |url: &str| url.rsplit(':').next().unwrap().to_owned();
    let (daemon_port, proxy_port) = (port_of(&d.url), port_of(&d.proxy_url));
    // The host's own non-loopback address, if it has one (a UDP connect
    // sends nothing; it only picks the source address).
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let host_ip = udp
        .connect("192.0.2.1:9")
        .ok()
        .and_then(|()| udp.local_addr().ok())
        .map(|a| a.ip().to_string());

    // A request through the gateway (its proxy inside the machine), raw,
    // so the refusal's body shows.
    let through_gateway = |target: String| {
        use std::io::{Read, Write};
        let mut conn = d.connect_in_machine(&id, 3128);
        let request = format!("GET http://{target}/healthz HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        answer
    };
    let mut everywhere = vec![
        "0.0.0.0",
        "127.0.0.1",
        "127.0.0.2",
        "[::]",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ];
    everywhere.extend(host_ip.as_deref());
    let policies = [
        (json!(["0.0.0.0/0", "::/0"]), everywhere),
        (
            json!(["0.0.0.0", "::", "127.0.0.0/8", "localhost"]),
            vec!["0.0.0.0", "[::]", "127.0.0.1", "127.0.0.2", "localhost"],
        ),
    ];
    for (allow, hosts) in policies {
        d.ok(
            Method::PUT,
            "/v1/apps/eg/egress-policy",
            Some(json!({ "allow": allow })),
        )
        .await;
        for port in [&daemon_port, &proxy_port] {
            for host in &hosts {
                let target = format!("{host}:{port}");
                let out = through_gateway(target.clone());
                assert!(out.starts_with("HTTP/1.1 403"), "{target} with {allow}: {out}");
                assert!(out.contains("daemon's own address"), "{target}: {out}");
            }
        }
        let out = through_gateway(format!("127.0.0.1:{other_port}"));
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("other"),
            "{allow}: {out}"
        );
    }
}

/// The CLI on the daemon's host still takes an image from any path it can
/// read: it copies the image into the import directory first.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_brings_local_images_to_the_import_directory() {
    let d = Daemon::start();
    let image = common::busybox_image();
    let layout = image.trim_start_matches("oci:").trim_end_matches(":latest");
    let elsewhere = tempfile::tempdir().unwrap();
    common::sh(Command::new("cp").arg("-a").arg(layout).arg(elsewhere.path()));
    let outside = format!("oci:{}/layout:latest", elsewhere.path().display());
    for _ in 0..2 {
        let out = d.cli(&["image", "pull", &outside]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = d.cli(&["machine", "run", &outside, "--name", "staged"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["machine", "exec", "staged", "--", "cat", "/srv/app/from-image.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "image layer\n");
    // Copied once, under the import directory.
    let copies: Vec<_> = std::fs::read_dir(common::IMPORTS)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("cli-"))
        .collect();
    assert!(!copies.is_empty());
}

fn cgroup_file(controller: &str, id: &str, file: &str) -> String {
    std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}/hangar/{id}/{file}")).unwrap_or_default()
}

/// A fork bomb fills its machine's memory and pids, but the OOM killer
/// takes the bomb's processes, never init: the machine stays started and
/// stops when asked. And all machines together can't take every pid of the
/// host.
#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_leaves_its_machine_standing() {
    let (d, plain) = daemon_with_machine("bomb").await;
    // What an exec starts goes first, then the main process, then init.
    let scores = d
        .sh(
            "bomb",
            &plain,
            "cat /proc/self/oom_score_adj /proc/$(pidof sleep)/oom_score_adj /proc/1/oom_score_adj",
        )
        .await;
    let scores: Vec<i32> = scores.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(scores[0] > scores[1] && scores[1] > scores[2], "{scores:?}");
    assert_eq!(cgroup_file("pids", &plain, "pids.max").trim(), "1024");
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let budget: u64 = std::fs::read_to_string("/sys/fs/cgroup/pids/hangar/pids.max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(budget <= pid_max / 2, "machines may take {budget} of {pid_max} pids");

    // Small processes by the hundred, each smaller than init: on memory
    // alone, init would be the OOM killer's choice.
    let m = d.machine("bomb", json!({"guest": {"memory_mb": 64}})).await;
    let id = m["id"].as_str().unwrap();
    d.sh("bomb", id, "setsid sh -c 'b(){ b|b& }; b' </dev/null >/dev/null 2>&1 &")
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cgroup_file("memory", id, "memory.oom_control").contains("oom_kill ")
        || cgroup_file("memory", id, "memory.oom_control").contains("oom_kill 0")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the bomb never ran the machine out of memory"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (_, now) = d.call(Method::GET, &format!("/v1/apps/bomb/machines/{id}"), None).await;
    assert_eq!(now["state"], "started", "{now}");
    d.ok(
        Method::POST,
        &format!("/v1/apps/bomb/machines/{id}/stop"),
        Some(json!({})),
    )
    .await;
    let stopped = d.wait_state("bomb", id, "stopped").await;
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let (_, events) = d
        .call(Method::GET, &format!("/v1/apps/bomb/machines/{id}/events"), None)
        .await;
    assert!(!events.to_string().contains("\"failed\""), "{events}");
}

/// The columns of the quota group of a machine's layer, as `btrfs qgroup
/// show -r --raw` prints them: id, referenced, exclusive, limit, path.
fn quota_group_of(d: &Daemon, id: &str) -> Vec<String> {
    let volume = d.pool_dir.join(format!("machine-{id}"));
    let out = common::sh(
        Command::new("btrfs")
            .args(["qgroup", "show", "-r", "--raw", "-f"])
            .arg(&volume),
    );
    out.lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A machine writes at most its `disk_gb` to its root filesystem, and a
/// few bytes to its run directory: the kernel says no inside, and nothing
/// outside notices. Its forks and rollbacks are limited as it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_cannot_fill_the_hosts_disk() {
    let mut d = Daemon::start();
    d.create_app("disk").await;
    let m = d.machine("disk", json!({"guest": {"disk_gb": 1}})).await;
    let id = m["id"].as_str().unwrap().to_owned();
    let fill = "dd if=/dev/zero of=/root/fill bs=1M count=1500 2>&1; sync; du -m /root/fill";
    let check = |out: &str| {
        assert!(out.contains("Disk quota exceeded"), "{out}");
        let mb: u64 = out
            .lines()
            .last()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((900..=1024).contains(&mb), "{mb} MiB written: {out}");
    };
    let r = d.exec("disk", &id, &["sh", "-c", fill]).await;
    check(r["stdout"].as_str().unwrap());
    let r = d
        .exec(
            "disk",
            &id,
            &["sh", "-c", "dd if=/dev/zero of=/.hangar/run/fill bs=1M count=16 2>&1"],
        )
        .await;
    assert_ne!(r["exit_code"], 0, "{r}");
    assert!(r["stdout"].as_str().unwrap().contains("No space left"), "{r}");
    d.sh("disk", &id, "rm -f /root/fill /.hangar/run/fill").await;

    // A fork and a rolled-back machine live in new subvolumes: limited too.
    let cp = d
        .ok(
            Method::POST,
            &format!("/v1/apps/disk/machines/{id}/checkpoints"),
            Some(json!({})),
        )
        .await;
    let fork = d
        .ok(
            Method::POST,
            &format!("/v1/apps/disk/machines/{id}/fork"),
            Some(json!({})),
        )
        .await;
    // (Their limits read back, rather than a GiB written into each.)
    let limit_of = |id: &str| quota_group_of(&d, id)[3].clone();
    assert_eq!(limit_of(fork["id"].as_str().unwrap()), (1u64 << 30).to_string());
    let cp_id = cp["id"].as_str().unwrap();
    d.ok(
        Method::POST,
        &format!("/v1/apps/disk/machines/{id}/checkpoints/{cp_id}/restore"),
        Some(json!({})),
    )
    .await;
    assert_eq!(limit_of(&id), (1u64 << 30).to_string());

    let (status, v) = d
        .call(
            Method::POST,
            "/v1/apps/disk/machines",
            Some(json!({"config": {"image": common::busybox_image(), "guest": {"disk_gb": 0}}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // A destroyed machine's limited quota group is not left behind for
    // good: the next daemon start removes it once it holds nothing.
    let qgroup = quota_group_of(&d, &id)[0].clone();
    d.ok(Method::DELETE, &format!("/v1/apps/disk/machines/{id}?force=true"), None)
        .await;
    let mount = d.pool_dir.parent().unwrap().to_owned();
    common::sh(Command::new("btrfs").args(["subvolume", "sync"]).arg(&mount));
    d.restart(libc::SIGTERM);
    let left = common::sh(Command::new("btrfs").args(["qgroup", "show", "--raw"]).arg(&mount));
    assert!(
        !left
            .lines()
            .any(|l| l.split_whitespace().next() == Some(qgroup.as_str())),
        "{qgroup} left: {left}"
    );
}
