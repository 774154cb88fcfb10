//! Crash recovery: whatever the daemon was in the middle of when it died,
//! the next daemon finishes or undoes it, and loses nothing.

mod common;

use common::Daemon;
use hangar_api::MachineState;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Rewrites a machine's recorded state while the daemon is down, as if it
/// had crashed between recording an intent and finishing the work.
async fn crash_in_state(d: &mut Daemon, id: &str, state: MachineState) {
    d.stop_daemon(libc::SIGKILL);
    let store = hangar_store::Store::open(&d.data_dir.path().join("state.db"))
        .await
        .unwrap();
    let mut rec = store.get_machine(id).await.unwrap().unwrap();
    rec.state = state;
    store.update_machine(&rec, None).await.unwrap();
    drop(store);
    d.start_daemon();
}

#[tokio::test(flavor = "multi_thread")]
async fn unfinished_operations_are_finished_or_undone() {
    let mut d = Daemon::start();
    d.create_app("rec").await;

    // A create that never finished is undone completely, so a retry with
    // the same name succeeds.
    let m = d
        .ok(
            Method::POST,
            "/v1/apps/rec/machines",
            Some(json!({"name": "half", "skip_launch": true, "config": {"image": common::busybox_image()}})),
        )
        .await;
    let half = m["id"].as_str().unwrap().to_owned();
    crash_in_state(&mut d, &half, MachineState::Creating).await;
    let (status, _) = d
        .call(Method::GET, &format!("/v1/apps/rec/machines/{half}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!d.pool_dir.join(format!("machine-{half}")).exists());
    assert!(!d.data_dir.path().join("machines").join(&half).exists());
    d.ok(
        Method::POST,
        "/v1/apps/rec/machines",
        Some(json!({"name": "half", "config": {"image": common::busybox_image()}})),
    )
    .await;

    // A start whose sandbox came up is recorded as started.
    let m = d.machine("rec", json!({})).await;
    let starting = m["id"].as_str().unwrap().to_owned();
    d.sh("rec", &starting, "echo alive > /root/a").await;
    crash_in_state(&mut d, &starting, MachineState::Starting).await;
    assert_eq!(
        d.ok(Method::GET, &format!("/v1/apps/rec/machines/{starting}"), None)
            .await["state"],
        "started"
    );
    assert_eq!(d.sh("rec", &starting, "cat /root/a").await, "alive\n");

    // A stop that was interrupted is carried out.
    crash_in_state(&mut d, &starting, MachineState::Stopping).await;
    let m = d.wait_state("rec", &starting, "stopped").await;
    assert_eq!(m["last_exit"]["requested_stop"], true, "{m}");

    // A destroy that was interrupted is finished.
    crash_in_state(&mut d, &starting, MachineState::Destroying).await;
    assert_eq!(
        d.ok(Method::GET, &format!("/v1/apps/rec/machines/{starting}"), None)
            .await["state"],
        "destroyed"
    );
    assert!(!d.pool_dir.join(format!("machine-{starting}")).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_an_image_import_leaves_nothing_half_done() {
    let mut d = Daemon::start();
    d.create_app("imp").await;
    // An image big enough that its import is still running when we kill.
    let dir = common::import_tempdir();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "wc"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let mut f = std::fs::File::create(rootfs.join("data/big")).unwrap();
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..192 {
        for chunk in block.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &block).unwrap();
    }
    drop(f);
    let layout = dir.path().join("layout");
    let config = hangar_image::ImageConfig {
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    hangar_image::write_oci_layout(&layout, "big", &rootfs, &config).unwrap();
    let image = format!("oci:{}:big", layout.display());

    let req = {
        let (url, token, http) = (d.url.clone(), d.token.clone(), d.http.clone());
        let image = image.clone();
        tokio::spawn(async move {
            http.post(format!("{url}/v1/apps/imp/machines"))
                .bearer_auth(token)
                .json(&json!({"name": "big", "config": {"image": image, "init": {"cmd": ["x"]}}}))
                .send()
                .await
        })
    };
    // Kill once the import has visibly begun (its scratch space is in use).
    let tmp = d.data_dir.path().join("images/tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(&tmp).map(|mut r| r.next().is_none()).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "import never started");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    d.stop_daemon(libc::SIGKILL);
    assert!(req.await.unwrap().is_err(), "the request must not have been answered");
    d.start_daemon();

    // Nothing was acknowledged, so nothing exists; scratch space is clean;
    // the retry succeeds.
    assert!(
        d.ok(Method::GET, "/v1/apps/imp/machines", None)
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let m = d
        .ok(
            Method::POST,
            "/v1/apps/imp/machines",
            Some(json!({"name": "big", "config": {"image": image, "init": {"cmd": ["sleep", "1000"]}}})),
        )
        .await;
    let id = m["id"].as_str().unwrap();
    let sum = d.sh("imp", id, "wc -c < /data/big").await;
    assert_eq!(sum.trim(), (192 << 20).to_string());
}

/// A crash in the middle of a rollback's layer swap, or of a checkpoint
/// (with the machine frozen, or the snapshot made but not recorded): the
/// next daemon puts the machine's layer back, thaws it, and deletes
/// snapshots that no record names.
#[tokio::test(flavor = "multi_thread")]
async fn interrupted_checkpoints_and_rollbacks_are_cleaned_up() {
    let mut d = Daemon::start();
    d.create_app("swap").await;
    let m = d.machine("swap", json!({})).await;
    let id = m["id"].as_str().unwrap().to_owned();
    d.sh("swap", &id, "echo precious > /root/data").await;
    d.stop_daemon(libc::SIGKILL);

    let pool = d.pool_dir.clone();
    let live = pool.join(format!("machine-{id}"));
    // Crashed between the rollback's two renames: the live layer is moved
    // aside and the checkpoint's copy is not yet in place.
    std::fs::rename(&live, pool.join(format!("machine-{id}.outgoing"))).unwrap();
    let btrfs = |args: &[&str]| {
        let ok = std::process::Command::new("btrfs")
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "btrfs {args:?}");
    };
    let incoming = pool.join(format!("machine-{id}.incoming"));
    btrfs(&["-q", "subvolume", "create", incoming.to_str().unwrap()]);
    // A snapshot whose record was never written.
    let orphan = pool.join("checkpoint-0123456789abcd");
    btrfs(&["-q", "subvolume", "create", orphan.to_str().unwrap()]);
    // Frozen for a checkpoint that never finished.
    hangar_runtime::cgroup::set_frozen(&id, true).unwrap();

    d.start_daemon();
    assert!(live.exists() && !incoming.exists() && !orphan.exists());
    assert!(!pool.join(format!("machine-{id}.outgoing")).exists());
    let m = d.ok(Method::GET, &format!("/v1/apps/swap/machines/{id}"), None).await;
    assert_eq!(m["state"], "started");
    assert_eq!(d.sh("swap", &id, "cat /root/data").await, "precious\n");
    d.ok(Method::POST, &format!("/v1/apps/swap/machines/{id}/stop"), None)
        .await;
    d.ok(Method::POST, &format!("/v1/apps/swap/machines/{id}/start"), None)
        .await;
    assert_eq!(d.sh("swap", &id, "cat /root/data").await, "precious\n");
}

/// A daemon killed at any step of a start (or of a create's start) leaves,
/// once it is back, a started machine running its main process, with no
/// exit it never had; it then stops as usual.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_cut_at_any_step_is_finished() {
    // (where the daemon dies, with a prepared sandbox or cold)
    let steps = [
        ("start:starting-recorded", false),
        ("start:starting-recorded", true),
        ("start:sandbox-held", false),
        ("start:prepared-held", true),
        ("start:main-released", true),
    ];
    for (step, prepared) in steps {
        let args: &[&str] = if prepared { &[] } else { &["--prepared-limit", "0"] };
        let mut d = Daemon::start_with_env(args, &[("HANGAR_CRASH_AT", step)]);
        d.create_app("cut").await;
        let m = d
            .ok(
                Method::POST,
                "/v1/apps/cut/machines",
                Some(json!({"skip_launch": true, "config": {"image": common::busybox_image()}})),
            )
            .await;
        let id = m["id"].as_str().unwrap().to_owned();
        if prepared {
            // The next start's sandbox, held, is up.
            let root = d.data_dir.path().join("runtime/runc");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !std::process::Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["state", &id])
                .output()
                .unwrap()
                .status
                .success()
            {
                assert!(std::time::Instant::now() < deadline, "{step}: no prepared sandbox");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        let start = format!("{}/v1/apps/cut/machines/{id}/start", d.url);
        let cut = d.http.post(start).bearer_auth(&d.token).send().await;
        assert!(cut.is_err(), "{step}: the daemon answered: {cut:?}");
        d.stop_daemon(libc::SIGKILL);
        d.set_env(&[]);
        d.start_daemon();

        let m = d.wait_state("cut", &id, "started").await;
        assert_eq!(m["state"], "started", "{step}: {m}");
        assert!(m["last_exit"].is_null(), "{step}: an exit that never was: {m}");
        d.sh("cut", &id, "pidof sleep").await;
        d.ok(
            Method::POST,
            &format!("/v1/apps/cut/machines/{id}/stop"),
            Some(json!({})),
        )
        .await;
        let m = d.wait_state("cut", &id, "stopped").await;
        assert_eq!(m["last_exit"]["requested_stop"], true, "{step}: {m}");
    }
}

/// After a create or fork was cut: its machine, if any is left, is started
/// and runs its main process, with no exit it never had.
async fn cut_machine_finished_or_gone(d: &Daemon, step: &str, before: usize) {
    let list = d.ok(Method::GET, "/v1/apps/cut/machines", None).await;
    let machines = list.as_array().unwrap();
    assert!(machines.len() <= before + 1, "{step}: {machines:?}");
    for m in &machines[before..] {
        let id = m["id"].as_str().unwrap();
        let m = d.wait_state("cut", id, "started").await;
        assert_eq!(m["state"], "started", "{step}: {m}");
        assert!(m["last_exit"].is_null(), "{step}: an exit that never was: {m}");
        d.sh("cut", id, "pidof sleep").await;
    }
}

/// A create or fork killed at any step either finishes (a started machine)
/// or leaves nothing; never a machine marked failed or left stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_or_fork_cut_at_any_step_finishes_or_leaves_nothing() {
    let steps = [
        "create:creating-recorded",
        "create:laid-out",
        "start:starting-recorded",
        "start:sandbox-held",
        "fork:creating-recorded",
        "fork:copied",
    ];
    for step in steps {
        let mut d = Daemon::start_with_env(&["--prepared-limit", "0"], &[("HANGAR_CRASH_AT", step)]);
        d.create_app("cut").await;
        let (url, body, before) = if step.starts_with("fork") {
            let parent = d.machine("cut", json!({})).await;
            let url = format!("{}/v1/apps/cut/machines/{}/fork", d.url, parent["id"].as_str().unwrap());
            (url, json!({}), 1)
        } else {
            let url = format!("{}/v1/apps/cut/machines", d.url);
            (url, json!({"config": {"image": common::busybox_image()}}), 0)
        };
        let cut = d.http.post(url).bearer_auth(&d.token).json(&body).send().await;
        assert!(cut.is_err(), "{step}: the daemon answered: {cut:?}");
        d.stop_daemon(libc::SIGKILL);
        d.set_env(&[]);
        d.start_daemon();
        cut_machine_finished_or_gone(&d, step, before).await;
    }
}

/// A restarted daemon serves at once: while it recovers a machine (here
/// slowed on purpose), other requests are answered, and the machine's own
/// get a 503 that says why, until it is back.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_serves_while_machines_are_recovered() {
    let mut d = Daemon::start();
    d.create_app("rec").await;
    let id = d.machine("rec", json!({})).await["id"].as_str().unwrap().to_owned();
    d.stop_daemon(libc::SIGKILL);
    d.set_env(&[("HANGAR_TEST_RECOVERY_DELAY_MS", "3000")]);
    d.start_daemon_serving();
    assert!(!d.ready());
    d.ok(Method::GET, "/v1/apps", None).await;
    let exec = format!("/v1/apps/rec/machines/{id}/exec");
    let (status, body) = d.call(Method::POST, &exec, Some(json!({"command": ["true"]}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("being recovered"), "{body}");
    let (status, _) = d
        .call(
            Method::POST,
            &format!("/v1/apps/rec/machines/{id}/stop"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !d.ready() {
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(d.sh("rec", &id, "echo back").await, "back\n");
}
