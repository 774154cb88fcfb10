//! The API's edges: authentication, bad input (clear JSON errors that change
//! nothing), apps, and the served OpenAPI document.

mod common;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn every_call_needs_the_token() {
    let d = Daemon::start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.data_dir.path().join("api-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(d.token.len(), 64);

    for auth in [None, Some("Bearer wrong"), Some("Basic abc")] {
        let mut req = d.http.get(format!("{}/v1/apps", d.url));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
    }
    // The token survives a restart unchanged.
    let mut d = d;
    let token = d.token.clone();
    d.restart(libc::SIGTERM);
    assert_eq!(d.token, token);
    d.ok(Method::GET, "/v1/apps", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apps() {
    let d = Daemon::start();
    let created = d.ok(Method::POST, "/v1/apps", Some(json!({"app_name": "alpha"}))).await;
    assert_eq!(created["name"], "alpha");
    let (status, err) = d
        .call(Method::POST, "/v1/apps", Some(json!({"app_name": "alpha"})))
        .await;
    assert_eq!((status, err["code"].clone()), (StatusCode::CONFLICT, json!("conflict")));
    for bad in ["Alpha", "-x", "a_b", "", "a.b"] {
        let (status, err) = d.call(Method::POST, "/v1/apps", Some(json!({"app_name": bad}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err}");
    }
    let list = d.ok(Method::GET, "/v1/apps", None).await;
    assert_eq!(list["total_apps"], 1);

    d.machine("alpha", json!({})).await;
    let (status, err) = d.call(Method::DELETE, "/v1/apps/alpha", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    let (status, _) = d.call(Method::DELETE, "/v1/apps/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Every bad request gets a 4xx JSON error that says what was wrong, and
/// leaves no machine, volume or directory behind.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let d = Daemon::start();
    d.create_app("bad").await;
    let image = common::busybox_image();
    let raw = |body: &'static str| {
        d.http
            .post(format!("{}/v1/apps/bad/machines", d.url))
            .bearer_auth(&d.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = raw("{not json").await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(
        resp.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );

    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({"config": {}}), StatusCode::BAD_REQUEST, "image"),
        (
            json!({"config": {"image": "oci:relative/path"}}),
            StatusCode::BAD_REQUEST,
            "absolute",
        ),
        (
            json!({"config": {"image": format!("oci:{}/nonexistent/layout", common::IMPORTS)}}),
            StatusCode::NOT_FOUND,
            "/nonexistent/layout",
        ),
        (
            json!({"config": {"image": format!("{image}-nosuchtag")}}),
            StatusCode::NOT_FOUND,
            "nosuchtag",
        ),
        (
            json!({"config": {"image": "Busy Box:latest"}}),
            StatusCode::BAD_REQUEST,
            "invalid image reference",
        ),
        (
            json!({"config": {"image": image, "guest": {"cpus": 0}}}),
            StatusCode::BAD_REQUEST,
            "cpus",
        ),
        (
            json!({"config": {"image": image, "env": {"A=B": "x"}}}),
            StatusCode::BAD_REQUEST,
            "environment",
        ),
        (
            json!({"config": {"image": image, "files": [{"guest_path": "/../etc/x", "raw_value": ""}]}}),
            StatusCode::BAD_REQUEST,
            "..",
        ),
        (
            json!({"config": {"image": image, "imagee": 1}}),
            StatusCode::BAD_REQUEST,
            "imagee",
        ),
        (
            json!({"name": "Bad Name", "config": {"image": image}}),
            StatusCode::BAD_REQUEST,
            "machine name",
        ),
        (
            json!({"config": {"image": image, "init": {"exec": ["/no/such/binary"]}}}),
            StatusCode::OK,
            "",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, v) = d.call(Method::POST, "/v1/apps/bad/machines", Some(body.clone())).await;
        assert_eq!(got, status, "{body} -> {v}");
        if !needle.is_empty() {
            assert!(
                v["error"].as_str().unwrap().contains(needle),
                "{body}: error should mention {needle:?}: {v}"
            );
        }
    }
    // Only the last (valid, if doomed) machine exists.
    let ms = d.ok(Method::GET, "/v1/apps/bad/machines", None).await;
    assert_eq!(ms.as_array().unwrap().len(), 1, "{ms}");
    let doomed = ms[0]["id"].as_str().unwrap().to_owned();
    let m = d.wait_state("bad", &doomed, "failed").await;
    assert_eq!(m["last_exit"]["exit_code"], 127);
    let dirs: Vec<_> = std::fs::read_dir(d.data_dir.path().join("machines")).unwrap().collect();
    assert_eq!(dirs.len(), 1);

    // Unknown app / machine / endpoint / method; huge body; bad signal.
    let (status, v) = d.call(Method::GET, "/v1/apps/ghost/machines", None).await;
    assert_eq!((status, v["code"].clone()), (StatusCode::NOT_FOUND, json!("not_found")));
    let (status, _) = d.call(Method::GET, "/v1/apps/bad/machines/00000000000000", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = d.call(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!((status, v["code"].clone()), (StatusCode::NOT_FOUND, json!("not_found")));
    let (status, v) = d.call(Method::PUT, "/v1/apps", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    assert!(v["error"].is_string());
    let huge = json!({"config": {"image": image, "env": {"BIG": "x".repeat(2 << 20)}}});
    // A fresh connection: the server closes this one without reading the
    // rest of the body, which a pooled client would trip over next.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/v1/apps/bad/machines", d.url))
        .bearer_auth(&d.token)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "payload_too_large");
    let (status, _) = d
        .call(
            Method::POST,
            &format!("/v1/apps/bad/machines/{doomed}/stop"),
            Some(json!({"signal": "SIGWHAT"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = d.call(Method::GET, "/v1/apps/bad/machines?state=running", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        d.ok(Method::GET, "/v1/apps/bad/machines", None)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_is_served() {
    let d = Daemon::start();
    let doc: Value = d
        .http
        .get(format!("{}/v1/openapi.json", d.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/v1/apps/{app}/machines/{id}/exec",
        "/v1/apps/{app}/machines/{id}/files/content",
        "/v1/apps/{app}/machines/{id}/wait",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }
}
