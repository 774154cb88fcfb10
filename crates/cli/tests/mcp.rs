//! The MCP server, driven by clients nobody here wrote: the official MCP
//! Python SDK over stdio (`hangar mcp`) and over streamable HTTP (the
//! daemon's `/mcp`), each through a whole agent session
//! (`tests/mcp/scenario.py`).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Daemon;

/// The venv `scripts/install-deps.sh --test` makes, with the pinned SDK.
fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-tools/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/install-deps.sh --test",
        venv.display()
    );
    venv
}

fn scenario(d: &Daemon, args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/scenario.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .env("HANGAR_URL", &d.url)
        .env("HANGAR_TOKEN", &d.token)
        .env("HANGAR_IMAGE", common::busybox_image())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("scenario passed"),
        "scenario {args:?} failed ({}):\n{stdout}\n{stderr}\ndaemon log:\n{}",
        out.status,
        d.log()
    );
}

#[test]
fn python_sdk_over_stdio() {
    let d = Daemon::start();
    scenario(&d, &["stdio", common::HANGAR]);
    scenario(&d, &["stdio", common::HANGAR, "--mode", "legacy"]);
}

#[test]
fn python_sdk_over_streamable_http() {
    let d = Daemon::start();
    let url = format!("{}/mcp", d.url);
    scenario(&d, &["http", &url]);
    scenario(&d, &["http", &url, "--mode", "legacy"]);
}

/// `/mcp` is behind the API token like the rest of the API, and refuses a
/// Host that is not the daemon's own (DNS rebinding).
#[tokio::test]
async fn mcp_endpoint_needs_the_token_and_its_own_host() {
    let d = Daemon::start();
    let init = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}
    });
    let post = |token: Option<&str>, host: Option<&str>| {
        let mut req = d
            .http
            .post(format!("{}/mcp", d.url))
            .header("accept", "application/json, text/event-stream")
            .json(&init);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(h) = host {
            req = req.header("host", h);
        }
        req.send()
    };
    let resp = post(None, None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized", "{body}");
    assert_eq!(post(Some("wrong"), None).await.unwrap().status(), 401);
    let resp = post(Some(&d.token), Some("evil.example")).await.unwrap();
    assert_eq!(resp.status(), 403, "a foreign Host is refused");
    let mut resp = post(Some(&d.token), None).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The answer is an SSE stream that stays open: read until the result.
    let mut text = String::new();
    while !text.contains("\"serverInfo\"") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), resp.chunk())
            .await
            .expect("the initialize result within 10 s")
            .unwrap()
            .expect("the stream ended before the result");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("\"name\":\"hangar\""), "{text}");
}
