//! Reaching inside a machine: exec (buffered and streamed), files, ps, and
//! the sandbox's hardening, each checked from inside a real machine.

mod common;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn path(id: &str) -> String {
    format!("/v1/apps/in/machines/{id}")
}

async fn machine(d: &Daemon, config: Value) -> String {
    d.create_app("in").await;
    d.machine("in", config).await["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_commands_with_the_machine_environment() {
    let d = Daemon::start();
    let id = machine(&d, json!({"env": {"CONFIG_VAR": "from-config"}})).await;

    let r = d.exec("in", &id, &["sh", "-c", "echo out; echo err >&2; exit 7"]).await;
    assert_eq!(
        (r["exit_code"].clone(), r["stdout"].clone(), r["stderr"].clone()),
        (json!(7), json!("out\n"), json!("err\n"))
    );

    // Image Env, config env, per-exec env; image WorkingDir; stdin.
    let r = d
        .ok(
            Method::POST,
            &format!("{}/exec", path(&id)),
            Some(json!({"command": ["sh", "-c", "echo $IMAGE_VAR $CONFIG_VAR $EXEC_VAR; pwd; cat"], "env": {"EXEC_VAR": "x"}, "stdin": "piped"})),
        )
        .await;
    assert_eq!(r["stdout"], "from-image from-config x\n/srv/app\npiped", "{r}");
    let r = d
        .ok(
            Method::POST,
            &format!("{}/exec", path(&id)),
            Some(json!({"command": ["id", "-u"], "user": "alice", "cwd": "/tmp"})),
        )
        .await;
    assert_eq!(r["stdout"], "1000\n");

    // The timeout kills the command's whole process group; no hidden default.
    let r = d
        .ok(
            Method::POST,
            &format!("{}/exec", path(&id)),
            Some(json!({"command": ["sh", "-c", "sleep 100 & sleep 100"], "timeout": 1})),
        )
        .await;
    assert_eq!(r["timed_out"], true, "{r}");
    let long = d.exec("in", &id, &["sh", "-c", "sleep 3; echo done"]).await;
    assert_eq!(long["stdout"], "done\n");
    assert!(!d.sh("in", &id, "ps").await.contains("sleep 100"));

    let (status, err) = d
        .call(
            Method::POST,
            &format!("{}/exec", path(&id)),
            Some(json!({"command": ["no-such-cmd"]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["error"].as_str().unwrap().contains("no-such-cmd"), "{err}");
    let (status, _) = d
        .call(
            Method::POST,
            &format!("{}/exec", path(&id)),
            Some(json!({"command": []})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A machine is reachable only through its own app.
    d.create_app("other").await;
    let (status, _) = d
        .call(
            Method::POST,
            &format!("/v1/apps/other/machines/{id}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Streaming: chunks arrive before the command ends, then the exit line.
    let resp = d
        .http
        .post(format!("{}{}/exec/stream", d.url, path(&id)))
        .bearer_auth(&d.token)
        .json(&json!({"command": ["sh", "-c", "echo first; sleep 1; echo second >&2; exit 4"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let body = resp.text().await.unwrap();
    let lines: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0], json!({"type": "stdout", "data": "first\n"}));
    assert_eq!(lines[1], json!({"type": "stderr", "data": "second\n"}));
    assert_eq!(
        lines[2],
        json!({"type": "exit", "exit_code": 4, "exit_signal": null, "timed_out": false})
    );

    let ps = d.ok(Method::GET, &format!("{}/ps", path(&id)), None).await;
    let cmds: Vec<&str> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["command"].as_str().unwrap())
        .collect();
    assert!(cmds.iter().any(|c| c.starts_with("/.hangar/init")), "{cmds:?}");
    assert!(cmds.contains(&"sleep 2147483647"), "{cmds:?}");
    assert_eq!(ps[0]["pid"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn files_are_binary_safe_atomic_and_confined() {
    let d = Daemon::start();
    let id = machine(
        &d,
        json!({"files": [{"guest_path": "/etc/app/seeded.conf", "raw_value": "c2VlZGVk", "mode": 384}]}),
    )
    .await;
    let url = |op: &str, q: &str| format!("{}{}/files/{op}?{q}", d.url, path(&id));

    // Config files were placed before the start, with their mode.
    assert_eq!(
        d.sh("in", &id, "cat /etc/app/seeded.conf; stat -c %a /etc/app/seeded.conf")
            .await,
        "seeded600\n"
    );

    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let resp = d
        .http
        .put(url("content", "path=/data/blob.bin&mode=640&parents=true"))
        .bearer_auth(&d.token)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let info: Value = resp.json().await.unwrap();
    assert_eq!(
        (info["size"].clone(), info["mode"].clone(), info["kind"].clone()),
        (json!(300_000), json!(0o640), json!("file"))
    );
    let back = d
        .http
        .get(url("content", "path=/data/blob.bin"))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    assert_eq!(back.headers()["x-hangar-mode"], "640");
    assert_eq!(back.bytes().await.unwrap().as_ref(), &data[..]);
    assert_eq!(
        d.sh("in", &id, "md5sum < /data/blob.bin | cut -d' ' -f1")
            .await
            .trim()
            .len(),
        32
    );

    let stat = d
        .ok(
            Method::GET,
            &format!("{}/files/stat?path=/data/blob.bin", path(&id)),
            None,
        )
        .await;
    assert_eq!(stat["size"], 300_000);
    d.ok(
        Method::POST,
        &format!("{}/files/mkdir?path=/data/sub/deeper&parents=true&mode=700", path(&id)),
        None,
    )
    .await;
    let list = d
        .ok(Method::GET, &format!("{}/files/list?path=/data", path(&id)), None)
        .await;
    let names: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["/data/blob.bin", "/data/sub"]);
    let (status, _) = d
        .call(Method::DELETE, &format!("{}/files?path=/data", path(&id)), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "non-empty dir without recursive");
    let (status, _) = d
        .call(
            Method::DELETE,
            &format!("{}/files?path=/data&recursive=true", path(&id)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, err) = d
        .call(Method::GET, &format!("{}/files/stat?path=/data", path(&id)), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");

    // Traversal is refused outright, and symlinks resolve inside the machine:
    // /escape -> / reads the machine's passwd, never the host's.
    for bad in ["../etc/passwd", "/tmp/../../etc/passwd", "etc/passwd", ""] {
        let (status, err) = d
            .call(Method::GET, &format!("{}/files/stat?path={bad}", path(&id)), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err}");
    }
    d.sh("in", &id, "ln -s / /escape && ln -s ../../../../../../etc /up")
        .await;
    for via in ["/escape/etc/passwd", "/up/passwd"] {
        let text = d
            .http
            .get(url("content", &format!("path={via}")))
            .bearer_auth(&d.token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("alice:x:1000"), "{via} read the host's file: {text}");
    }
    let resp = d
        .http
        .put(url("content", "path=/escape/tmp/written-through-link"))
        .bearer_auth(&d.token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!std::path::Path::new("/tmp/written-through-link").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_is_hardened() {
    let d = Daemon::start();
    let id = machine(&d, json!({})).await;
    let status = d
        .sh(
            "in",
            &id,
            "grep -E '^(NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/self/status",
        )
        .await;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    // No CAP_SYS_ADMIN (bit 21), CAP_SYS_PTRACE (19), CAP_SYS_MODULE (16).
    let capbnd = status
        .lines()
        .find(|l| l.starts_with("CapBnd"))
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap();
    let bits = u64::from_str_radix(capbnd, 16).unwrap();
    // And no CAP_NET_RAW (13): no raw or packet sockets, unless asked for.
    for cap in [13, 16, 19, 21] {
        assert_eq!(bits & (1 << cap), 0, "capability {cap} in bounding set {capbnd}");
    }
    let r = d.exec("in", &id, &["ping", "-c1", "-W1", "127.0.0.1"]).await;
    assert_ne!(r["exit_code"], 0, "a raw socket without NET_RAW: {r}");
    let raw = d.machine("in", json!({"guest": {"cap_add": ["NET_RAW"]}})).await;
    let raw = raw["id"].as_str().unwrap();
    let out = d
        .sh("in", raw, "grep CapBnd /proc/self/status; ping -c1 -W1 127.0.0.1")
        .await;
    let bits = u64::from_str_radix(out.lines().next().unwrap().split('\t').nth(1).unwrap(), 16).unwrap();
    assert_ne!(bits & (1 << 13), 0, "{out}");
    let (status, v) = d
        .call(
            Method::POST,
            "/v1/apps/in/machines",
            Some(json!({"config": {"image": common::busybox_image(), "guest": {"cap_add": ["SYS_ADMIN"]}}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    let refused = [
        // New user namespaces (seccomp, EPERM), and with them new caps.
        "unshare -U true",
        "unshare -m true",
        "mount -t tmpfs none /mnt",
        // hangar-init is read-only.
        "echo x > /.hangar/init",
        // Masked /proc paths read as empty.
        "test -s /proc/kcore",
        // Read-only /proc/sys.
        "echo 1 > /proc/sys/kernel/panic",
        // Only loopback: nothing to route to.
        "ping -c1 -W1 10.0.0.1",
    ];
    for cmd in refused {
        let r = d.exec("in", &id, &["sh", "-c", cmd]).await;
        assert_ne!(r["exit_code"], 0, "{cmd} succeeded: {r}");
    }
    let ifaces = d.sh("in", &id, "ls /sys/class/net").await;
    assert_eq!(ifaces.trim(), "lo");
    // The daemon's data dir, socket and token are not visible.
    let data = d.data_dir.path().display().to_string();
    let r = d
        .exec("in", &id, &["sh", "-c", &format!("ls {data}; cat {data}/api-token")])
        .await;
    assert_ne!(r["exit_code"], 0, "{r}");
    // Nothing of the daemon's is open in the machine: the main process has
    // exactly stdio, and init holds no descriptor naming a daemon file.
    let fds = d
        .sh("in", &id, "ls /proc/$(pidof sleep)/fd | sort -n | tr '\\n' ' '")
        .await;
    assert_eq!(fds.trim(), "0 1 2", "{fds}");
    let init_fds = d.sh("in", &id, "ls -l /proc/1/fd").await;
    for secret in ["state.db", "api-token", "daemon.log", "pool", "tcp"] {
        assert!(!init_fds.contains(secret), "init holds {secret}: {init_fds}");
    }
    // setuid binaries gain nothing (no_new_privs): a setuid-root program
    // that prints its effective uid, run by alice, stays alice.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("euid.c"),
        "#include <stdio.h>\n#include <unistd.h>\nint main(void){printf(\"%d\\n\", geteuid());return 0;}\n",
    )
    .unwrap();
    common::sh(
        std::process::Command::new("gcc")
            .args(["-static", "-o"])
            .arg(dir.path().join("euid"))
            .arg(dir.path().join("euid.c")),
    );
    let binary = std::fs::read(dir.path().join("euid")).unwrap();
    let put = d
        .http
        .put(format!("{}{}/files/content?path=/tmp/euid&mode=4755", d.url, path(&id)))
        .bearer_auth(&d.token)
        .body(binary)
        .send()
        .await
        .unwrap();
    assert_eq!(put.json::<Value>().await.unwrap()["mode"], 0o4755);
    assert_eq!(d.sh("in", &id, "/tmp/euid").await, "0\n");
    assert_eq!(d.sh("in", &id, "su alice -c /tmp/euid").await, "1000\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_main_process_runs_as_the_configured_user() {
    let d = Daemon::start();
    let id = machine(&d, json!({"init": {"user": "alice"}})).await;
    let ps = d.ok(Method::GET, &format!("{}/ps", path(&id)), None).await;
    let main = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["command"] == "sleep 2147483647")
        .unwrap();
    assert_eq!(main["uid"], 1000, "{ps}");
    // Init itself stays root, so exec and file operations keep working.
    assert_eq!(ps[0]["uid"], 0);
    assert_eq!(d.sh("in", &id, "id -u").await, "0\n");
    // The main process got alice's HOME from the machine's passwd (only
    // alice may read her process's environment: root in a machine has no
    // CAP_SYS_PTRACE).
    let r = d
        .ok(
            Method::POST,
            &format!("{}/exec", path(&id)),
            Some(json!({"command": ["sh", "-c", "tr '\\0' '\\n' < /proc/$(pidof sleep)/environ | grep ^HOME="], "user": "alice"})),
        )
        .await;
    assert_eq!(r["stdout"], "HOME=/home/alice\n", "{r}");
}
