//! Images through the daemon: pulls from a real registry on loopback over
//! the API and the CLI, machines created from registry references,
//! concurrent pulls sharing one download, and the errors a client sees.

mod common;
#[path = "../../image/tests/support/registry.rs"]
mod registry;

use common::Daemon;
use registry::{Registry, busybox_layout};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Machine config for the registry test image (busybox alone, no applet
/// links), running `busybox sleep`.
fn sleeping(image: &str) -> Value {
    json!({"image": image, "init": {"cmd": ["busybox", "sleep", "1000"]}})
}

/// The NDJSON answer of a pull, whole.
async fn streamed_pull(d: &Daemon, image: &str) -> String {
    d.http
        .post(format!("{}/v1/images/pull", d.url))
        .bearer_auth(&d.token)
        .header("accept", "application/x-ndjson")
        .json(&json!({"image": image}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn machines_run_registry_images_and_concurrent_pulls_share_one_download() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), &[("etc/hello", b"from the registry\n")]);
    reg.push(&layout, "team/bb:v1", &[]);
    let reference = format!("{}/team/bb:v1", reg.addr);
    let d = Daemon::start();

    // Two pulls at once: both get the image, the layer is fetched once.
    let pull = || d.call(Method::POST, "/v1/images/pull", Some(json!({"image": reference})));
    let ((s1, a), (s2, b)) = tokio::join!(pull(), pull());
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{a} {b}");
    assert_eq!(a, b);
    assert_eq!(a["reference"], reference);
    let layer = a["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(reg.blob_gets(layer), 1, "layer {layer} fetched more than once");

    // A machine from the reference uses the pulled image: no new download.
    d.create_app("reg").await;
    let m = d.machine("reg", sleeping(&reference)).await;
    assert_eq!(m["state"], "started", "{m}");
    assert_eq!(m["image_ref"]["digest"], a["digest"], "{m}");
    let id = m["id"].as_str().unwrap();
    assert_eq!(d.sh("reg", id, "busybox cat /etc/hello").await, "from the registry\n");
    assert_eq!(reg.blob_gets(layer), 1);

    // A machine from a reference not pulled yet pulls it, and reports the
    // pull as its events.
    reg.push(&layout, "team/bb:v2", &[]);
    let v2 = format!("{}/team/bb:v2", reg.addr);
    let m2 = d.machine("reg", sleeping(&v2)).await;
    assert_eq!(m2["state"], "started", "{m2}");
    let events = d
        .ok(
            Method::GET,
            &format!("/v1/apps/reg/machines/{}/events", m2["id"].as_str().unwrap()),
            None,
        )
        .await;
    let pulled = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "pull" && e["detail"]["phase"] == "pulled")
        .unwrap_or_else(|| panic!("no pull event: {events}"));
    assert_eq!(pulled["status"], "creating", "{pulled}");
    assert_eq!(pulled["detail"]["reference"], v2, "{pulled}");
    assert_eq!(pulled["detail"]["layers"].as_array().unwrap().len(), 1, "{pulled}");

    let listed = d.ok(Method::GET, "/v1/images", None).await;
    assert!(
        listed["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["reference"] == reference),
        "{listed}"
    );

    // The CLI, quiet and machine-readable with --json.
    let out = d.cli(&["--json", "image", "pull", &reference]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["digest"], a["digest"]);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["image", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&reference) && text.contains("REFERENCE"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_pulls_report_progress_then_the_image() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let noise: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    reg.push(&busybox_layout(work.path(), &[("noise", &noise)]), "bb:big", &[]);
    let d = Daemon::start();
    let reference = format!("{}/bb:big", reg.addr);
    let body = streamed_pull(&d, &reference).await;
    let events: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = events.last().unwrap();
    assert_eq!(last["image"]["reference"], reference, "{body}");
    assert!(events.len() >= 2, "no progress before the image: {body}");
    for e in &events[..events.len() - 1] {
        assert_eq!(e["progress"]["reference"], reference, "{e}");
        assert_eq!(e["progress"]["layers"].as_array().unwrap().len(), 1, "{e}");
    }
    // Streamed errors come as a last line with the same body as a plain one.
    let body = streamed_pull(&d, &format!("{}/bb:missing", reg.addr)).await;
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "not_found", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_errors_say_what_went_wrong() {
    registry::require();
    let reg = Registry::start_with(registry::Options {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    reg.push(&busybox_layout(work.path(), &[]), "private/bb:latest", &[]);
    let auth_file = work.path().join("auth.json");
    let d = Daemon::start_with(&["--registry-auth-file", auth_file.to_str().unwrap()]);
    let d = &d;
    let pull = |image: String| async move {
        d.call(Method::POST, "/v1/images/pull", Some(json!({"image": image})))
            .await
    };

    let (status, e) = pull(format!("{}/private/bb:latest", reg.addr)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{e}");
    assert_eq!(e["code"], "upstream_unauthorized");
    assert!(e["error"].as_str().unwrap().contains("needs credentials"), "{e}");

    // Credentials are read at each pull: fixing the file fixes the pull.
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        &auth_file,
        json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let (status, image) = pull(format!("{}/private/bb:latest", reg.addr)).await;
    assert_eq!(status, StatusCode::OK, "{image}");

    let (status, e) = pull(format!("{}/private/bb:nope", reg.addr)).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{e}"
    );
    let (status, e) = pull("127.0.0.1:9/x/y:z".into()).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("upstream")),
        "{e}"
    );
    assert!(e["error"].as_str().unwrap().contains("cannot connect"), "{e}");
    let (status, e) = pull("Not A Reference".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");

    // A machine from an image that cannot be pulled leaves nothing behind.
    d.create_app("e").await;
    let (status, e) = d
        .call(
            Method::POST,
            "/v1/apps/e/machines",
            Some(json!({"config": {"image": format!("{}/private/bb:nope", reg.addr)}})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
    let machines = d.ok(Method::GET, "/v1/apps/e/machines", None).await;
    assert_eq!(machines.as_array().unwrap().len(), 0, "{machines}");
}

/// `/v1/images/{image}` with the reference URL-encoded into one segment.
fn image_path(reference: &str) -> String {
    let encoded: String = reference
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    format!("/v1/images/{encoded}")
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_and_prune_free_exactly_what_no_machine_uses() {
    registry::require();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let used = busybox_layout(&work.path().join("used"), &[("etc/which", b"used\n")]);
    let spare = busybox_layout(&work.path().join("spare"), &[("etc/which", b"spare\n")]);
    reg.push(&used, "used:v1", &[]);
    reg.push(&used, "alias:v1", &[]);
    reg.push(&spare, "spare:v1", &[]);
    let [used, alias, spare] = ["used:v1", "alias:v1", "spare:v1"].map(|r| format!("{}/{r}", reg.addr));
    let d = Daemon::start();
    for r in [&used, &alias, &spare] {
        d.ok(Method::POST, "/v1/images/pull", Some(json!({"image": r}))).await;
    }
    d.create_app("gc").await;
    let m = d.machine("gc", sleeping(&used)).await;
    let id = m["id"].as_str().unwrap().to_owned();

    // Usage: the alias shares everything with the image it names; the
    // total counts their layer once.
    let list = d.ok(Method::GET, "/v1/images", None).await;
    let by_ref = |r: &str| {
        list["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["reference"] == r)
            .unwrap()
            .clone()
    };
    let (u, a, s) = (by_ref(&used), by_ref(&alias), by_ref(&spare));
    assert_eq!(u["digest"], a["digest"]);
    assert_eq!(
        (u["machines"].as_u64(), s["machines"].as_u64()),
        (Some(1), Some(0)),
        "{list}"
    );
    assert!(s["unique_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    assert_eq!(s["unique_bytes"], s["disk_bytes"], "{s}");
    assert_eq!(
        list["total_disk_bytes"].as_u64().unwrap(),
        u["disk_bytes"].as_u64().unwrap() + s["disk_bytes"].as_u64().unwrap(),
        "{list}"
    );
    let inspected = d.ok(Method::GET, &image_path(&spare), None).await;
    assert_eq!(inspected["layers"][0]["shared_by"], 1, "{inspected}");
    let (status, e) = d
        .call(Method::GET, &image_path(&format!("{}/nope:v1", reg.addr)), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");

    // In use: refused, and nothing changes. The alias can go: the machine's
    // image is still named by the other reference.
    let (status, e) = d.call(Method::DELETE, &image_path(&alias), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{e}");
    let (status, e) = d.call(Method::DELETE, &image_path(&used), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{e}");
    assert!(e["error"].as_str().unwrap().contains(&id), "{e}");

    let layers = d.data_dir.path().join("images/layers");
    let count = || std::fs::read_dir(&layers).unwrap().count();
    assert_eq!(count(), 2);
    let pruned = d.ok(Method::POST, "/v1/images/prune", Some(json!({}))).await;
    assert_eq!(pruned["removed"], json!([spare]), "{pruned}");
    assert!(
        pruned["freed_bytes"].as_u64().unwrap() >= s["disk_bytes"].as_u64().unwrap(),
        "{pruned}"
    );
    assert_eq!(count(), 1);
    // The machine never noticed, across a stop and start too.
    assert_eq!(d.sh("gc", &id, "busybox cat /etc/which").await, "used\n");
    d.ok(
        Method::POST,
        &format!("/v1/apps/gc/machines/{id}/stop"),
        Some(json!({})),
    )
    .await;
    d.ok(Method::POST, &format!("/v1/apps/gc/machines/{id}/start"), None)
        .await;
    assert_eq!(d.sh("gc", &id, "busybox cat /etc/which").await, "used\n");

    d.ok(Method::DELETE, &format!("/v1/apps/gc/machines/{id}?force=true"), None)
        .await;
    let pruned = d.ok(Method::POST, "/v1/images/prune", Some(json!({}))).await;
    assert_eq!(pruned["removed"], json!([used]), "{pruned}");
    assert_eq!(count(), 0);
    assert!(
        std::fs::read_dir(d.data_dir.path().join("images/blobs/sha256"))
            .unwrap()
            .next()
            .is_none()
    );
    let list = d.ok(Method::GET, "/v1/images", None).await;
    assert_eq!(list, json!({"images": [], "total_disk_bytes": 0}));
}

/// An export pushed to a registry (with credentials) comes back from it
/// byte for byte, and runs.
#[tokio::test(flavor = "multi_thread")]
async fn an_exported_machine_is_pushed_and_pulled_back() {
    registry::require();
    let reg = Registry::start_with(registry::Options {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let auth_file = work.path().join("auth.json");
    std::fs::write(
        &auth_file,
        json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let d = Daemon::start_with(&["--registry-auth-file", auth_file.to_str().unwrap()]);
    d.create_app("push").await;
    let m = d.machine("push", json!({})).await;
    let id = m["id"].as_str().unwrap().to_owned();
    d.sh("push", &id, "echo pushed > /root/p").await;

    let target = format!("{}/exported/app:v1", reg.addr);
    let url = format!("/v1/apps/push/machines/{id}/export");
    let out = d
        .ok(Method::POST, &url, Some(json!({"name": "out", "push": target})))
        .await;
    let digest = out["digest"].as_str().unwrap();
    assert_eq!(out["pushed"], format!("{target}@{digest}"));

    let pulled = d
        .ok(Method::POST, "/v1/images/pull", Some(json!({"image": target})))
        .await;
    assert_eq!(pulled["digest"], digest, "the registry holds exactly what was exported");
    let again = d
        .ok(
            Method::POST,
            "/v1/apps/push/machines",
            Some(json!({"config": {"image": target}})),
        )
        .await;
    let again = again["id"].as_str().unwrap();
    assert_eq!(d.sh("push", again, "cat /root/p").await, "pushed\n");

    // A second push only sends the manifest again: every blob is there.
    d.ok(Method::POST, &url, Some(json!({"name": "out", "push": target})))
        .await;
    for bad in ["oci:/tmp/x:y", &format!("{target}@sha256:{}", "0".repeat(64))] {
        let (status, v) = d
            .call(Method::POST, &url, Some(json!({"name": "out2", "push": bad})))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
}
