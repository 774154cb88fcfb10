//! Suspend keeps a machine's memory: its processes continue where they
//! stopped, across a daemon crash too, and a suspended machine is not
//! billed as running.

mod common;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// A counter kept only in the shell's memory, written out as it goes.
const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /root/c.new; mv /root/c.new /root/count; sleep 0.02; done";

async fn count(d: &Daemon, app: &str, id: &str) -> u64 {
    d.sh(app, id, "cat /root/count").await.trim().parse().unwrap()
}

/// The machine's latest `started` event, and all its events (to show when
/// an assertion fails).
async fn last_start(d: &Daemon, url: &str) -> (serde_json::Value, serde_json::Value) {
    let events = d.ok(Method::GET, &format!("{url}/events"), None).await;
    let start = events
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["status"] == "started")
        .unwrap()
        .clone();
    (start, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_runc_machine_continues_where_it_stopped() {
    continues_where_it_stopped("runc", "frozen").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runsc_machine_checkpointed_to_disk_continues_where_it_stopped() {
    continues_where_it_stopped("runsc", "checkpointed").await;
}

async fn continues_where_it_stopped(runtime: &str, how: &str) {
    let mut d = Daemon::start();
    d.create_app("sus").await;
    let config = json!({"runtime": runtime, "init": {"cmd": ["sh", "-c", COUNTER]}});
    let m = d.machine("sus", config).await;
    let id = m["id"].as_str().unwrap().to_owned();
    let url = format!("/v1/apps/sus/machines/{id}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let before = count(&d, "sus", &id).await;
    let m = d.ok(Method::POST, &format!("{url}/suspend"), None).await;
    assert_eq!(m["state"], "suspended");
    let events = d.ok(Method::GET, &format!("{url}/events"), None).await;
    let suspended = events.as_array().unwrap().last().unwrap();
    assert_eq!(suspended["detail"]["how"], how, "{events}");
    let billed = m["run_seconds"].as_f64().unwrap();

    // Nothing runs: no exec, no progress, no billing.
    let (status, v) = d
        .call(Method::POST, &format!("{url}/exec"), Some(json!({"command": ["true"]})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["error"].as_str().unwrap().contains("suspended"), "{v}");
    let (status, v) = d.call(Method::DELETE, &url, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    // The counter's file is on disk: it stopped moving.
    let counter_file = d.pool_dir.join(format!("machine-{id}/upper/root/count"));
    let on_disk = || {
        let text = std::fs::read_to_string(&counter_file).unwrap();
        text.trim().parse::<u64>().unwrap()
    };
    let frozen_at = on_disk();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(on_disk(), frozen_at, "a suspended machine must not run");
    assert!(frozen_at <= before + 3);
    let m = d.ok(Method::GET, &url, None).await;
    assert_eq!(m["run_seconds"].as_f64().unwrap(), billed);

    // Its filesystem can be checkpointed (nothing to pause) but not rolled
    // back under its memory.
    let cp = d.ok(Method::POST, &format!("{url}/checkpoints"), None).await;
    assert_eq!(cp["timing"]["paused_ms"], 0.0);
    let restore = format!("{url}/checkpoints/{}/restore", cp["id"].as_str().unwrap());
    let (status, v) = d.call(Method::POST, &restore, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["error"].as_str().unwrap().contains("start or stop it first"), "{v}");

    // A daemon crash does not lose it.
    d.restart(libc::SIGKILL);
    let m = d.ok(Method::GET, &url, None).await;
    assert_eq!(m["state"], "suspended");
    assert_eq!(on_disk(), frozen_at);

    // Start resumes it: the same process, counting on from where it was
    // (a cold start would begin again at 1).
    let m = d.ok(Method::POST, &format!("{url}/start"), None).await;
    assert_eq!(m["state"], "started");
    let resumed = count(&d, "sus", &id).await;
    assert!(
        resumed >= frozen_at && resumed <= frozen_at + 5,
        "{frozen_at} -> {resumed}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(count(&d, "sus", &id).await > resumed + 3, "it keeps counting");
    let (start, events) = last_start(&d, &url).await;
    assert_eq!(start["detail"]["path"], "resumed", "{events}");

    // A suspended machine stops like a started one, and then starts cold.
    d.ok(Method::POST, &format!("{url}/suspend"), None).await;
    let m = d
        .ok(Method::POST, &format!("{url}/stop"), Some(json!({"timeout": 1})))
        .await;
    assert_eq!(m["state"], "stopped");
    d.ok(Method::POST, &format!("{url}/start"), None).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(count(&d, "sus", &id).await < frozen_at, "a fresh process counts from 1");

    // Only a started machine suspends.
    d.ok(Method::POST, &format!("{url}/stop"), None).await;
    let (status, v) = d.call(Method::POST, &format!("{url}/suspend"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["state"], "stopped");
}

/// A resume that fails (here: the runsc checkpoint image is corrupt) starts
/// the machine cold from its filesystem and says so: it is never lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_resume_starts_cold_and_says_why() {
    let d = Daemon::start();
    d.create_app("cold").await;
    let config = json!({"runtime": "runsc", "init": {"cmd": ["sh", "-c", COUNTER]}});
    let id = d.machine("cold", config).await["id"].as_str().unwrap().to_owned();
    let url = format!("/v1/apps/cold/machines/{id}");
    d.sh("cold", &id, "echo kept > /root/file").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    d.ok(Method::POST, &format!("{url}/suspend"), None).await;

    let image = d
        .data_dir
        .path()
        .join(format!("machines/{id}/suspend-image/checkpoint.img"));
    let len = std::fs::metadata(&image).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let m = d.ok(Method::POST, &format!("{url}/start"), None).await;
    assert_eq!(m["state"], "started");
    let (start, events) = last_start(&d, &url).await;
    assert_eq!(start["detail"]["path"], "cold", "{events}");
    assert!(
        start["detail"]["resume_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{events}"
    );
    // Its filesystem is all there; its memory (the counter) is not.
    assert_eq!(d.sh("cold", &id, "cat /root/file").await, "kept\n");
    assert!(!image.exists(), "the broken image is gone");
}
