//! Machine lifecycle against real runc sandboxes: create, start, stop,
//! persistence across stop/start and daemon restarts (graceful and
//! `kill -9`), restart policies, auto_destroy, OOM, metering.

mod common;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::json;

fn path(app: &str, id: &str) -> String {
    format!("/v1/apps/{app}/machines/{id}")
}

#[tokio::test(flavor = "multi_thread")]
async fn create_start_stop_and_illegal_transitions() {
    let d = Daemon::start();
    d.create_app("life").await;
    let created = d
        .ok(
            Method::POST,
            "/v1/apps/life/machines",
            Some(json!({ "name": "web", "skip_launch": true, "config": { "image": common::busybox_image(), "metadata": {"role": "web"} } })),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["state"], "created");
    assert_eq!(created["name"], "web");
    assert_eq!(id.len(), 14);

    // Stopping a machine that never ran is illegal, and says the state.
    let (status, err) = d.call(Method::POST, &format!("{}/stop", path("life", &id)), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["state"], "created");
    assert!(err["error"].as_str().unwrap().contains("created"), "{err}");

    let started = d.ok(Method::POST, &format!("{}/start", path("life", &id)), None).await;
    assert_eq!(started["state"], "started");
    let (status, err) = d
        .call(Method::POST, &format!("{}/start", path("life", &id)), None)
        .await;
    assert_eq!((status, err["state"].clone()), (StatusCode::CONFLICT, json!("started")));

    // Destroying a started machine needs force.
    let (status, _) = d.call(Method::DELETE, &path("life", &id), None).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Lookup by name works too, and the list filters by state and metadata.
    assert_eq!(d.ok(Method::GET, &path("life", "web"), None).await["id"], id);
    let listed = d
        .ok(
            Method::GET,
            "/v1/apps/life/machines?state=started&metadata.role=web",
            None,
        )
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let listed = d.ok(Method::GET, "/v1/apps/life/machines?metadata.role=db", None).await;
    assert!(listed.as_array().unwrap().is_empty());

    // Restart: a new sandbox instance over the same filesystem.
    d.sh("life", &id, "echo kept > /root/kept").await;
    let restarted = d
        .ok(Method::POST, &format!("{}/restart", path("life", &id)), None)
        .await;
    assert_eq!(restarted["state"], "started");
    assert_ne!(restarted["instance_id"], started["instance_id"]);
    assert_eq!(d.sh("life", &id, "cat /root/kept").await, "kept\n");

    let stopped = d
        .ok(
            Method::POST,
            &format!("{}/stop", path("life", &id)),
            Some(json!({"timeout": "5s"})),
        )
        .await;
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["last_exit"]["requested_stop"], true);
    // Stop released the sandbox: nothing of the machine runs. What may
    // remain is the idle hangar-init of a sandbox prepared for the next
    // start (holding the main process back), and nothing else.
    let (status, _) = d
        .call(
            Method::POST,
            &format!("{}/exec", path("life", &id)),
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let procs = format!("/sys/fs/cgroup/memory/hangar/{id}/cgroup.procs");
    for pid in std::fs::read_to_string(&procs).unwrap_or_default().lines() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(
            comm.trim(),
            "init",
            "machine process {pid} ({comm}) still alive after stop"
        );
    }

    let events = d.ok(Method::GET, &format!("{}/events", path("life", &id)), None).await;
    let kinds: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}:{}", e["type"].as_str().unwrap(), e["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            "create:creating",
            "pull:creating",
            "create:created",
            "start:starting",
            "start:started",
            // the restart: a stop and a start
            "stop:stopping",
            "exit:stopped",
            "start:starting",
            "start:started",
            "stop:stopping",
            "exit:stopped",
        ]
    );

    d.ok(Method::DELETE, &path("life", &id), None).await;
    let gone = d.ok(Method::GET, &path("life", &id), None).await;
    assert_eq!(gone["state"], "destroyed");
    assert!(!d.data_dir.path().join("machines").join(&id).exists());
    assert!(!d.pool_dir.join(format!("machine-{id}")).exists());
    // A destroyed machine frees its name.
    d.machine("life", json!({})).await;
    let (status, _) = d
        .call(
            Method::POST,
            "/v1/apps/life/machines",
            Some(json!({"name": "web", "config": {"image": common::busybox_image()}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = d
        .call(
            Method::POST,
            "/v1/apps/life/machines",
            Some(json!({"name": "web", "config": {"image": common::busybox_image()}})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "duplicate live name");
}

#[tokio::test(flavor = "multi_thread")]
async fn filesystem_persists_across_stop_start_and_daemon_restarts() {
    let mut d = Daemon::start();
    d.create_app("keep").await;
    let m = d.machine("keep", json!({})).await;
    let id = m["id"].as_str().unwrap().to_owned();
    // What an agent does: install a "package", edit a file, add a service
    // file, delete something from the image.
    d.sh(
        "keep",
        &id,
        "mkdir -p /opt/pkg/bin && echo tool > /opt/pkg/bin/tool && chmod 755 /opt/pkg/bin/tool && \
         echo edited >> /etc/passwd && mkdir -p /etc/services.d && echo svc > /etc/services.d/web && \
         rm /srv/app/from-image.txt && ln -s /opt/pkg/bin/tool /bin/tool",
    )
    .await;
    let check = "cat /opt/pkg/bin/tool; stat -c %a /opt/pkg/bin/tool; tail -1 /etc/passwd; cat /etc/services.d/web; \
                 test ! -e /srv/app/from-image.txt && echo deleted; readlink /bin/tool";
    let expected = "tool\n755\nedited\nsvc\ndeleted\n/opt/pkg/bin/tool\n";

    d.ok(Method::POST, &format!("{}/stop", path("keep", &id)), None).await;
    d.ok(Method::POST, &format!("{}/start", path("keep", &id)), None).await;
    assert_eq!(d.sh("keep", &id, check).await, expected);

    // Graceful daemon restart: the machine keeps running and is re-attached.
    let pid_before = d
        .sh("keep", &id, "echo $$ > /tmp/marker; cat /proc/1/stat | cut -d' ' -f22")
        .await;
    d.restart(libc::SIGTERM);
    let m = d.ok(Method::GET, &path("keep", &id), None).await;
    assert_eq!(m["state"], "started");
    assert_eq!(
        d.sh("keep", &id, "cat /proc/1/stat | cut -d' ' -f22").await,
        pid_before,
        "same sandbox"
    );
    assert_eq!(d.sh("keep", &id, check).await, expected);

    // kill -9 of the daemon: same.
    d.restart(libc::SIGKILL);
    assert_eq!(d.sh("keep", &id, check).await, expected);
    assert!(d.log().contains("reattached: 1"), "{}", d.log());
    // And the re-attached machine still stops cleanly and starts again.
    let stopped = d.ok(Method::POST, &format!("{}/stop", path("keep", &id)), None).await;
    assert_eq!(stopped["state"], "stopped");
    d.ok(Method::POST, &format!("{}/start", path("keep", &id)), None).await;
    assert_eq!(d.sh("keep", &id, check).await, expected);

    // A machine that ends while no daemon watches is found on restart.
    d.ok(Method::POST, &format!("{}/stop", path("keep", &id)), None).await;
    d.restart(libc::SIGKILL);
    let m = d.ok(Method::GET, &path("keep", &id), None).await;
    assert_eq!(m["state"], "stopped");
    d.ok(Method::POST, &format!("{}/start", path("keep", &id)), None).await;
    assert_eq!(d.sh("keep", &id, check).await, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn main_process_exit_restart_policies_and_auto_destroy() {
    let d = Daemon::start();
    d.create_app("pol").await;

    // Policy no, exit 0 -> stopped; exit non-zero -> failed.
    let ok = d.machine("pol", json!({"init": {"cmd": ["true"]}})).await;
    let ok = d.wait_state("pol", ok["id"].as_str().unwrap(), "stopped").await;
    assert_eq!(ok["last_exit"]["exit_code"], 0);
    let bad = d.machine("pol", json!({"init": {"cmd": ["sh", "-c", "exit 3"]}})).await;
    let bad = d.wait_state("pol", bad["id"].as_str().unwrap(), "failed").await;
    assert_eq!(bad["last_exit"]["exit_code"], 3);
    assert_eq!(bad["last_exit"]["requested_stop"], false);

    // on-failure: retries up to max_retries, then stays failed.
    let flaky = d
        .machine(
            "pol",
            json!({"init": {"cmd": ["sh", "-c", "echo run >> /root/runs; exit 1"]}, "restart": {"policy": "on-failure", "max_retries": 2}}),
        )
        .await;
    let fid = flaky["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let events = d.ok(Method::GET, &format!("{}/events", path("pol", &fid)), None).await;
        let exits = events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "exit")
            .count();
        if exits == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "expected 3 runs: {events}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let m = d.wait_state("pol", &fid, "failed").await;
    assert_eq!(m["state"], "failed");

    // always: the machine comes back after its process is killed.
    let always = d.machine("pol", json!({"restart": {"policy": "always"}})).await;
    let aid = always["id"].as_str().unwrap().to_owned();
    let first_instance = always["instance_id"].clone();
    d.ok(
        Method::POST,
        &format!("{}/signal", path("pol", &aid)),
        Some(json!({"signal": "SIGKILL"})),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = d.ok(Method::GET, &path("pol", &aid), None).await;
        if m["state"] == "started" && m["instance_id"] != first_instance {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "machine was not restarted: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A user stop is not undone by the policy.
    d.ok(Method::POST, &format!("{}/stop", path("pol", &aid)), None).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(d.ok(Method::GET, &path("pol", &aid), None).await["state"], "stopped");

    // auto_destroy.
    let once = d
        .machine("pol", json!({"init": {"cmd": ["true"]}, "auto_destroy": true}))
        .await;
    d.wait_state("pol", once["id"].as_str().unwrap(), "destroyed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_oom_is_reported_and_cpu_limit_is_set() {
    let d = Daemon::start();
    d.create_app("oom").await;
    let m = d
        .machine(
            "oom",
            json!({"guest": {"cpus": 1, "memory_mb": 32}, "init": {"cmd": ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]}}),
        )
        .await;
    let m = d.wait_state("oom", m["id"].as_str().unwrap(), "failed").await;
    assert_eq!(m["last_exit"]["oom_killed"], true, "{m}");
    assert_eq!(m["last_exit"]["signal"], 9, "{m}");

    let m = d
        .machine("oom", json!({"guest": {"cpus": 2, "memory_mb": 64, "pids_limit": 50}}))
        .await;
    let id = m["id"].as_str().unwrap();
    let cg = format!("/sys/fs/cgroup/memory/hangar/{id}/memory.limit_in_bytes");
    if std::path::Path::new(&cg).exists() {
        assert_eq!(std::fs::read_to_string(cg).unwrap().trim(), (64u64 << 20).to_string());
        let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/hangar/{id}/cpu.cfs_quota_us")).unwrap();
        assert_eq!(quota.trim(), "200000");
    }
    // The pids limit holds inside the machine: the shell can't fork them
    // all, or (if the machine's processes took every pid first) the exec
    // itself is refused with a message that says why.
    let (status, r) = d
        .call(
            Method::POST,
            &format!("{}/exec", path("oom", id)),
            Some(json!({"command": ["sh", "-c", "for i in $(seq 1 80); do sleep 5 & done; wait"]})),
        )
        .await;
    if status.is_success() {
        assert!(
            r["stderr"].as_str().unwrap().contains("fork") || r["exit_code"] != 0,
            "{r}"
        );
    } else {
        assert!(r["error"].as_str().unwrap().contains("process limit"), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metering_counts_running_time_only() {
    let d = Daemon::start();
    d.create_app("meter").await;
    let m = d.machine("meter", json!({})).await;
    let id = m["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let stopped = d.ok(Method::POST, &format!("{}/stop", path("meter", &id)), None).await;
    let ran = stopped["run_seconds"].as_f64().unwrap();
    assert!(ran >= 0.3, "{stopped}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let later = d.ok(Method::GET, &path("meter", &id), None).await;
    assert_eq!(
        later["run_seconds"].as_f64().unwrap(),
        ran,
        "a stopped machine must not accrue time"
    );
    d.ok(Method::POST, &format!("{}/start", path("meter", &id)), None).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let running = d.ok(Method::GET, &path("meter", &id), None).await;
    assert!(running["run_seconds"].as_f64().unwrap() >= ran + 0.2, "{running}");
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_and_wait() {
    let d = Daemon::start();
    d.create_app("logs").await;
    let m = d
        .machine(
            "logs",
            json!({"init": {"cmd": ["sh", "-c", "echo out-line; echo err-line >&2; sleep 2147483647"]}}),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    // Follow: the stream delivers what the machine writes, as it writes it.
    let resp = d
        .http
        .get(format!("{}{}/logs?follow=true", d.url, path("logs", &id)))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut wrote = false;
    while !seen.contains("later-line") {
        if !wrote && seen.contains("err-line") {
            // Through the main process's stdout (init's own is not
            // reachable: it is not dumpable).
            d.sh("logs", &id, "echo later-line >> /proc/$(pidof sleep)/fd/1").await;
            wrote = true;
        }
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("log follow stalled after {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
    }
    assert!(seen.contains("out-line") && seen.contains("err-line"), "{seen}");

    // Wait times out with 408 while the state is not reached.
    let (status, err) = d
        .call(
            Method::GET,
            &format!("{}/wait?state=stopped&timeout=1", path("logs", &id)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{err}");
    let waiter = {
        let (url, token, http, p) = (d.url.clone(), d.token.clone(), d.http.clone(), path("logs", &id));
        tokio::spawn(async move {
            http.get(format!("{url}{p}/wait?state=stopped&timeout=30"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    d.ok(Method::POST, &format!("{}/stop", path("logs", &id)), None).await;
    assert_eq!(waiter.await.unwrap(), 200);
}

/// gVisor: the same machine, with a user-space kernel between it and the
/// host. A smoke test of the whole path: create, exec, files, stop/start
/// persistence, destroy.
#[tokio::test(flavor = "multi_thread")]
async fn runsc_machines_work_end_to_end() {
    let d = Daemon::start();
    d.create_app("gv").await;
    let m = d.machine("gv", json!({"runtime": "runsc"})).await;
    let id = m["id"].as_str().unwrap().to_owned();
    assert_eq!(m["state"], "started");
    // gVisor answers with its own kernel, not the host's.
    let uname = d.sh("gv", &id, "uname -r").await;
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(uname.trim(), host.trim(), "runsc machine runs on the host kernel");
    d.sh("gv", &id, "echo kept > /root/kept").await;
    let r = d.exec("gv", &id, &["sh", "-c", "exit 9"]).await;
    assert_eq!(r["exit_code"], 9);
    d.ok(Method::POST, &format!("{}/stop", path("gv", &id)), None).await;
    d.ok(Method::POST, &format!("{}/start", path("gv", &id)), None).await;
    assert_eq!(d.sh("gv", &id, "cat /root/kept").await, "kept\n");
    d.ok(Method::DELETE, &format!("{}?force=true", path("gv", &id)), None)
        .await;
    assert_eq!(d.ok(Method::GET, &path("gv", &id), None).await["state"], "destroyed");
}

/// What runc says of a machine's sandbox (`null` if it has none).
fn runtime_state(d: &Daemon, id: &str) -> serde_json::Value {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(d.data_dir.path().join("runtime/runc"))
        .args(["state", id])
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map(|v| v["status"].clone())
        .unwrap_or_default()
}

/// Waits until a stopped machine holds a prepared (running, held) sandbox.
async fn wait_prepared(d: &Daemon, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while runtime_state(d, id) != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "the stopped machine was never prepared"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A stopped machine's next start is prepared in the background (the
/// sandbox booted, hangar-init holding the main process back), so the start
/// itself is one message. The start event says which path it took.
#[tokio::test(flavor = "multi_thread")]
async fn stopped_machines_are_prepared_for_a_fast_start() {
    let d = Daemon::start();
    d.create_app("warm").await;
    let m = d
        .machine(
            "warm",
            json!({"files": [{"guest_path": "/etc/seed", "raw_value": "djE=", "mode": 420}]}),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    d.sh("warm", &id, "echo v2 > /etc/seed").await;
    d.ok(Method::POST, &format!("{}/stop", path("warm", &id)), None).await;

    wait_prepared(&d, &id).await;
    // Prepared, but the machine is stopped: its process isn't running and
    // nothing can reach inside.
    assert_eq!(d.ok(Method::GET, &path("warm", &id), None).await["state"], "stopped");
    let (status, _) = d
        .call(
            Method::POST,
            &format!("{}/exec", path("warm", &id)),
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let started = d.ok(Method::POST, &format!("{}/start", path("warm", &id)), None).await;
    assert_eq!(started["state"], "started");
    // Config files are placed on every start, on either path.
    assert_eq!(d.sh("warm", &id, "cat /etc/seed").await, "v1");
    let events = d.ok(Method::GET, &format!("{}/events", path("warm", &id)), None).await;
    let paths: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "start" && e["status"] == "started")
        .map(|e| e["detail"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["cold", "prepared"]);

    // Destroying a stopped, prepared machine leaves no sandbox behind.
    d.ok(Method::POST, &format!("{}/stop", path("warm", &id)), None).await;
    wait_prepared(&d, &id).await;
    d.ok(Method::DELETE, &path("warm", &id), None).await;
    assert_eq!(runtime_state(&d, &id), serde_json::Value::Null);
    assert!(!std::path::Path::new(&format!("/sys/fs/cgroup/memory/hangar/{id}")).exists());
}

/// `--prepared-limit` holds however many machines stop at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_prepared_limit_holds_under_concurrent_stops() {
    let d = Daemon::start_with(&["--prepared-limit", "2"]);
    d.create_app("many").await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(d.machine("many", json!({})).await["id"].as_str().unwrap().to_owned());
    }
    let urls: Vec<String> = ids.iter().map(|id| format!("{}/stop", path("many", id))).collect();
    let stops = urls.iter().map(|url| d.ok(Method::POST, url, Some(json!({}))));
    futures_util::future::join_all(stops).await;
    // Let every stop's preparing run its course.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let prepared = || ids.iter().filter(|id| runtime_state(&d, id) == "running").count();
    while prepared() < 2 {
        assert!(std::time::Instant::now() < deadline, "fewer than 2 prepared");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(prepared(), 2);
}

/// While a machine's main process exits on its own, requests for inside it
/// answer as they did or 409 (it is stopping), never 500.
#[tokio::test(flavor = "multi_thread")]
async fn requests_racing_an_exit_get_409_not_500() {
    let d = Daemon::start();
    d.create_app("race").await;
    for _ in 0..3 {
        let m = d
            .machine("race", json!({"init": {"cmd": ["sh", "-c", "sleep 0.3"]}}))
            .await;
        let id = m["id"].as_str().unwrap().to_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            let exec = d
                .call(
                    Method::POST,
                    &format!("{}/exec", path("race", &id)),
                    Some(json!({"command": ["true"]})),
                )
                .await;
            let ps = d.call(Method::GET, &format!("{}/ps", path("race", &id)), None).await;
            for (status, body) in [exec, ps] {
                assert!(
                    status.is_success() || status == StatusCode::CONFLICT,
                    "{status}: {body}"
                );
            }
        }
    }
}

/// A stop sent the moment a start returns (init answers the start before
/// it spawns the main process, here 300 ms before) is not lost: it ends
/// the machine at once, never after the whole stop timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_right_after_a_start_is_not_lost() {
    let d = Daemon::start();
    d.create_app("quick").await;
    let m = d
        .machine("quick", json!({"env": {"HANGAR_TEST_DELAY_MAIN_MS": "300"}}))
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    let (start, stop) = (
        format!("{}/start", path("quick", &id)),
        format!("{}/stop", path("quick", &id)),
    );
    d.ok(Method::POST, &stop, Some(json!({}))).await;
    for i in 0..3 {
        d.ok(Method::POST, &start, None).await;
        let t = std::time::Instant::now();
        let stopped = d.ok(Method::POST, &stop, Some(json!({"timeout": "5s"}))).await;
        assert!(
            t.elapsed() < std::time::Duration::from_secs(3),
            "cycle {i}: the stop took {:?}",
            t.elapsed()
        );
        assert_eq!(stopped["state"], "stopped");
        assert_ne!(
            stopped["last_exit"]["signal"], 9,
            "cycle {i}: killed, not stopped: {stopped}"
        );
    }
}
