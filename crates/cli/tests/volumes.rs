//! Volumes through the API and the CLI, with real machines: they outlive
//! machines, belong to one machine at a time, hold no more than their
//! size, and snapshot, restore, fork and come back from deletion.

mod common;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

async fn machine_with(d: &Daemon, app: &str, volume: &str) -> (StatusCode, Value) {
    let config = json!({"image": common::busybox_image(), "mounts": [{"volume": volume, "path": "/data"}]});
    d.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(json!({ "config": config })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_outlives_its_machine_and_belongs_to_one_at_a_time() {
    let mut d = Daemon::start_with(&["--volume-retention-hours", "0"]);
    d.create_app("vol").await;
    let v = d
        .ok(
            Method::POST,
            "/v1/apps/vol/volumes",
            Some(json!({"name": "data", "size_gb": 1})),
        )
        .await;
    assert_eq!(v["state"], "created");
    let vid = id(&v);
    let vurl = format!("/v1/apps/vol/volumes/{vid}");

    let (status, m1) = machine_with(&d, "vol", "data").await;
    assert_eq!(status, StatusCode::OK, "{m1}");
    let m1 = id(&m1);
    assert_eq!(d.ok(Method::GET, &vurl, None).await["attached_machine_id"], m1.as_str());
    d.sh("vol", &m1, "echo kept > /data/file && mkdir /data/dir").await;

    // One machine at a time: a second claim is refused and leaves nothing.
    let (status, v409) = machine_with(&d, "vol", &vid).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v409}");
    assert!(v409["error"].as_str().unwrap().contains(&m1), "{v409}");
    let (status, _) = d.call(Method::DELETE, &vurl, None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let list = d.ok(Method::GET, "/v1/apps/vol/machines", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    // The kernel holds it to its size; extending lifts the limit at once.
    let r = d
        .exec(
            "vol",
            &m1,
            &["sh", "-c", "dd if=/dev/zero of=/data/big bs=1M count=1200"],
        )
        .await;
    assert_ne!(r["exit_code"], 0, "a 1 GB volume took 1200 MB: {r}");
    assert!(r["stderr"].as_str().unwrap().contains("quota"), "{r}");
    d.sh("vol", &m1, "rm /data/big").await;
    let v = d
        .ok(Method::PUT, &format!("{vurl}/extend"), Some(json!({"size_gb": 2})))
        .await;
    assert_eq!(v["size_gb"], 2);
    d.sh(
        "vol",
        &m1,
        "dd if=/dev/zero of=/data/big bs=1M count=1200 2>/dev/null && rm /data/big",
    )
    .await;

    // Snapshot, break, restore (not while a started machine mounts it).
    let snap = id(&d.ok(Method::POST, &format!("{vurl}/snapshots"), None).await);
    d.sh("vol", &m1, "echo broken > /data/file && rmdir /data/dir").await;
    let restore = format!("{vurl}/snapshots/{snap}/restore");
    let (status, v) = d.call(Method::POST, &restore, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    d.ok(Method::POST, &format!("/v1/apps/vol/machines/{m1}/stop"), None)
        .await;
    d.ok(Method::POST, &restore, None).await;
    d.ok(Method::POST, &format!("/v1/apps/vol/machines/{m1}/start"), None)
        .await;
    assert_eq!(
        d.sh("vol", &m1, "cat /data/file; ls -d /data/dir").await,
        "kept\n/data/dir\n"
    );

    // A fork of the volume: its own copy.
    let fork = d
        .ok(Method::POST, &format!("{vurl}/fork"), Some(json!({"name": "copy"})))
        .await;
    assert_eq!(fork["size_gb"], 2);
    assert!(fork.get("attached_machine_id").is_none());

    // A fork of the machine mounts a fork of its volume.
    let mf = d
        .ok(
            Method::POST,
            &format!("/v1/apps/vol/machines/{m1}/fork"),
            Some(json!({})),
        )
        .await;
    let mf = id(&mf);
    d.sh("vol", &mf, "echo fork > /data/file").await;
    assert_eq!(d.sh("vol", &m1, "cat /data/file").await, "kept\n");

    // Destroying the machine releases the volume, which keeps its data.
    d.ok(Method::DELETE, &format!("/v1/apps/vol/machines/{m1}?force=true"), None)
        .await;
    assert!(
        d.ok(Method::GET, &vurl, None)
            .await
            .get("attached_machine_id")
            .is_none()
    );
    let (status, m2) = machine_with(&d, "vol", "data").await;
    assert_eq!(status, StatusCode::OK, "{m2}");
    let m2 = id(&m2);
    assert_eq!(d.sh("vol", &m2, "cat /data/file").await, "kept\n");
    d.ok(Method::DELETE, &format!("/v1/apps/vol/machines/{m2}?force=true"), None)
        .await;

    // Deleted softly: hidden, recoverable, then purged once its retention
    // (0 here) has passed and the daemon purges.
    let v = d.ok(Method::DELETE, &vurl, None).await;
    assert_eq!(v["state"], "pending_destroy");
    let names: Vec<Value> = d
        .ok(Method::GET, "/v1/apps/vol/volumes", None)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert!(!names.contains(&json!("data")), "{names:?}");
    let (status, _) = machine_with(&d, "vol", &vid).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        d.ok(Method::POST, &format!("{vurl}/undelete"), None).await["state"],
        "created"
    );
    d.ok(Method::DELETE, &vurl, None).await;
    d.restart(libc::SIGTERM);
    let (status, _) = d.call(Method::GET, &vurl, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!d.volume_pool_dir.join(format!("volume-{vid}")).exists());
    assert!(!d.volume_pool_dir.join(format!("volsnap-{snap}")).exists());
    // Classic quota groups are on for volumes only, never in the machines'
    // pool, where they would slow every snapshot several times: its
    // machines' disk limits are simple quotas, which cost snapshots nothing.
    let quota_mode = |pool: &std::path::Path| {
        // The test pools are directories in the root of their filesystem.
        let out = common::sh(
            std::process::Command::new("btrfs")
                .args(["filesystem", "show"])
                .arg(pool.parent().unwrap()),
        );
        let uuid = out
            .split("uuid: ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        std::fs::read_to_string(format!("/sys/fs/btrfs/{uuid}/qgroups/mode")).unwrap_or_default()
    };
    assert_eq!(quota_mode(&d.volume_pool_dir).trim(), "qgroup");
    assert_eq!(
        quota_mode(&d.pool_dir).trim(),
        "squota",
        "classic quotas in the machines' pool"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_requests_are_checked() {
    let d = Daemon::start();
    d.create_app("vbad").await;
    d.ok(
        Method::POST,
        "/v1/apps/vbad/volumes",
        Some(json!({"name": "v", "size_gb": 1})),
    )
    .await;
    let cases = [
        (json!({"name": "w", "size_gb": 0}), StatusCode::BAD_REQUEST),
        (json!({"name": "bad name", "size_gb": 1}), StatusCode::BAD_REQUEST),
        (json!({"name": "v", "size_gb": 1}), StatusCode::CONFLICT),
        (json!({"name": "w"}), StatusCode::BAD_REQUEST),
    ];
    for (body, want) in cases {
        let (status, v) = d.call(Method::POST, "/v1/apps/vbad/volumes", Some(body.clone())).await;
        assert_eq!(status, want, "{body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    for (volume, path, want) in [
        ("v", "/proc/x", StatusCode::BAD_REQUEST),
        ("v", "data", StatusCode::BAD_REQUEST),
        ("v", "/", StatusCode::BAD_REQUEST),
        ("ghost", "/data", StatusCode::NOT_FOUND),
    ] {
        let config = json!({"image": common::busybox_image(), "mounts": [{"volume": volume, "path": path}]});
        let (status, v) = d
            .call(
                Method::POST,
                "/v1/apps/vbad/machines",
                Some(json!({ "config": config })),
            )
            .await;
        assert_eq!(status, want, "{volume} at {path}: {v}");
    }
    assert_eq!(d.ok(Method::GET, "/v1/apps/vbad/machines", None).await, json!([]));
    let (status, _) = d
        .call(
            Method::PUT,
            "/v1/apps/vbad/volumes/v/extend",
            Some(json!({"size_gb": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "volumes do not shrink or stay");
    let (status, _) = d.call(Method::DELETE, "/v1/apps/vbad", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "an app with volumes stays");

    // Through the CLI.
    let out = d.cli(&["volume", "ls", "-a", "vbad", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "v");
}
