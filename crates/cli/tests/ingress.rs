//! The ingress proxy: routing by Host to a machine's service port (reached
//! from inside its network namespace), wake on request, autostop when idle.

mod common;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn get(d: &Daemon, host: &str, path: &str) -> (StatusCode, String) {
    let r = d
        .http
        .get(format!("{}{path}", d.proxy_url))
        .header("host", host)
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn metrics(d: &Daemon) -> String {
    let r = d
        .http
        .get(format!("{}/metrics", d.url))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    r.text().await.unwrap()
}

async fn starts(d: &Daemon, id: &str) -> usize {
    let events = d
        .ok(Method::GET, &format!("/v1/apps/shop/machines/{id}/events"), None)
        .await;
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == "started")
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_wakes_and_stops_idle_machines() {
    let d = Daemon::start_with(&["--proxy-listen", "127.0.0.1:0"]);
    d.create_app("shop").await;
    let mut config = json!({
        "image": common::busybox_image(),
        "init": { "cmd": ["httpd", "-f", "-p", "8080", "-h", "/srv/app"] },
        "services": [{ "internal_port": 8080, "autostop": "stop", "idle_timeout_s": 2 }],
    });
    let m = d
        .ok(
            Method::POST,
            "/v1/apps/shop/machines",
            Some(json!({ "name": "web", "config": config.clone() })),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();

    // By machine name, by port, by app.
    for host in ["web.shop.localhost", "8080-web.shop.localhost", "shop.localhost"] {
        let (status, body) = get(&d, host, "/from-image.txt").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "image layer\n"), "{host}");
    }
    let (status, body) = get(&d, "nope.localhost", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = get(&d, "example.com", "/").await;
    assert!(status == StatusCode::NOT_FOUND && body.contains("no_route"), "{body}");

    // Wake on request: a stopped machine is started and the request served,
    // with no error or retry for the client; concurrent requests share one start.
    d.ok(Method::POST, &format!("/v1/apps/shop/machines/{id}/stop"), None)
        .await;
    d.wait_state("shop", &id, "stopped").await;
    let before = starts(&d, &id).await;
    let mut requests = Vec::new();
    for _ in 0..5 {
        let (http, url) = (d.http.clone(), format!("{}/from-image.txt", d.proxy_url));
        requests.push(tokio::spawn(async move {
            let r = http.get(url).header("host", "web.shop.localhost").send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }));
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), (StatusCode::OK, "image layer\n".to_owned()));
    }
    assert_eq!(starts(&d, &id).await, before + 1, "one start for all five");

    // Autostop: idle for its timeout, the machine is stopped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let m = d.ok(Method::GET, &format!("/v1/apps/shop/machines/{id}"), None).await;
        if m["state"] == "stopped" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not stopped when idle: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // ... and wakes again on the next request.
    assert_eq!(get(&d, "web.shop.localhost", "/from-image.txt").await.0, StatusCode::OK);

    // Metrics: requests by machine and route, wakes (one per start) and their latency.
    let metrics = metrics(&d).await;
    let value = |name: &str, route: &str| -> f64 {
        let prefix = format!("{name}{{app=\"shop\",machine=\"{id}\",route=\"{route}\"}} ");
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{prefix}\n{metrics}"));
        line[prefix.len()..].parse().unwrap()
    };
    assert_eq!(value("hangar_proxy_requests_total", "machine"), 7.0, "{metrics}");
    assert_eq!(value("hangar_proxy_requests_total", "port"), 1.0);
    assert_eq!(
        value("hangar_proxy_wakes_total", "machine"),
        2.0,
        "one per start: {metrics}"
    );
    assert!(value("hangar_proxy_wake_seconds_sum", "machine") > 0.0);
    assert!(
        metrics.contains(&format!("hangar_proxy_active{{app=\"shop\",machine=\"{id}\"}} 0")),
        "{metrics}"
    );

    // No autostart: a clear error instead of a start.
    config["services"][0]["autostart"] = json!(false);
    config["services"][0]["autostop"] = json!("off");
    let m = d
        .ok(
            Method::POST,
            "/v1/apps/shop/machines",
            Some(json!({ "name": "manual", "config": config, "skip_launch": true })),
        )
        .await;
    let (status, body) = get(&d, "manual.shop.localhost", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("does not autostart"), "{body}");
    assert_eq!(m["state"], "created");

    // A machine without services has nothing to route to.
    d.machine("shop", json!({ "image": common::busybox_image() })).await;
    let plain = d.ok(Method::GET, "/v1/apps/shop/machines", None).await;
    let plain_id = plain
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["config"]["services"].is_null())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = get(&d, &format!("{plain_id}.shop.localhost"), "/").await;
    assert!(
        status == StatusCode::NOT_FOUND && body.contains("no services"),
        "{body}"
    );

    // Services by proxy port: a request on the second listener reaches the
    // service that names that port, on the first the one that names none.
    let second: u16 = d.proxy_urls[1].rsplit(':').next().unwrap().parse().unwrap();
    let m = d
        .machine(
            "shop",
            json!({
                "image": common::busybox_image(),
                "files": [{ "guest_path": "/srv/other/which.txt", "raw_value": base64_of("other\n") }],
                "init": { "cmd": ["sh", "-c", "httpd -p 8081 -h /srv/other; exec httpd -f -p 8080 -h /srv/app"] },
                "services": [
                    { "internal_port": 8081, "ports": [{ "port": second }] },
                    { "internal_port": 8080 },
                ],
            }),
        )
        .await;
    let host = format!("{}.shop.localhost", m["id"].as_str().unwrap());
    assert_eq!(get(&d, &host, "/from-image.txt").await.1, "image layer\n");
    let r = d
        .http
        .get(format!("{}/which.txt", d.proxy_urls[1]))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "other\n");

    // Bad services are refused and change nothing.
    let bad = json!({ "image": common::busybox_image(), "services": [{ "internal_port": 80,
        "concurrency": { "soft_limit": 5, "hard_limit": 2 } }] });
    let r = d
        .http
        .post(format!("{}/v1/apps/shop/machines", d.url))
        .bearer_auth(&d.token)
        .json(&json!({ "config": bad }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("soft_limit at most hard_limit"));
}

/// An upgraded connection (as a WebSocket's) passes through both ways and
/// keeps the machine busy while open.
#[tokio::test(flavor = "multi_thread")]
async fn upgrades_pass_through() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let d = Daemon::start();
    d.create_app("shop").await;
    // A server that answers any request with 101 and then echoes lines.
    let script = "cr=$(printf '\\r'); while read -r line; do [ \"${line%$cr}\" = \"\" ] && break; done; \
                  printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: echo\\r\\nConnection: Upgrade\\r\\n\\r\\n'; exec cat";
    let m = d
        .machine(
            "shop",
            json!({
                "image": common::busybox_image(),
                "files": [{ "guest_path": "/srv/echo.sh", "raw_value": base64_of(&format!("#!/bin/sh\n{script}\n")), "mode": 0o755 }],
                "init": { "cmd": ["nc", "-ll", "-p", "9000", "-e", "/srv/echo.sh"] },
                "services": [{ "internal_port": 9000 }],
            }),
        )
        .await;
    let name = m["id"].as_str().unwrap().to_owned();
    let addr = d.proxy_url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request =
        format!("GET /chat HTTP/1.1\r\nHost: {name}.shop.localhost\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    for word in ["ping\n", "pong\n"] {
        reader.get_mut().write_all(word.as_bytes()).await.unwrap();
        let mut echoed = String::new();
        reader.read_line(&mut echoed).await.unwrap();
        assert_eq!(echoed, word);
    }
}

/// A machine that cannot start gets a 502 that says why, and a request for
/// it does not hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_wake_is_a_502_with_the_reason() {
    let d = Daemon::start();
    d.create_app("bad").await;
    let (status, m) = d
        .call(
            Method::POST,
            "/v1/apps/bad/machines",
            Some(json!({ "name": "broken", "skip_launch": true, "config": {
                "image": common::busybox_image(),
                "init": { "cmd": ["/no/such/program"] },
                "services": [{ "internal_port": 8080 }],
            } })),
        )
        .await;
    assert!(status.is_success(), "{m}");
    let started = std::time::Instant::now();
    let (status, body) = get(&d, "broken.bad.localhost", "/").await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["code"], "machine_unavailable", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("is failed") && error.contains("/logs"), "{body}");
    // Not the 30 s a slow process gets to listen: it has already ended.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// A real WebSocket conversation (tungstenite on both ends) through the
/// proxy: text, binary and ping frames come back, and a close is a clean
/// close both ways.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let d = Daemon::start();
    d.create_app("ws").await;
    let m = d
        .machine(
            "ws",
            json!({
                "image": common::busybox_image(),
                "init": { "cmd": ["sleep", "1000000"] },
                "services": [{ "internal_port": 9100 }],
            }),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    // The echo server listens inside the machine's namespace, where only
    // the proxy can reach it.
    let listener = d.listen_in_machine(&id, 9100);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });

    let request = format!("ws://{id}.ws.localhost/echo").into_client_request().unwrap();
    let proxy = tokio::net::TcpStream::connect(d.proxy_url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut ws, answer) = tokio_tungstenite::client_async(request, proxy).await.unwrap();
    assert_eq!(answer.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    let blob: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong(b"are you there".to_vec().into())
    );
    ws.close(None).await.unwrap();
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("after close: {other:?}"),
            Err(e) => panic!("not a clean close: {e}"),
        }
    }
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// MCP sessions stick to the machine that issued them, across many
/// requests and through a stop (the request wakes that machine, not another).
#[tokio::test(flavor = "multi_thread")]
async fn mcp_sessions_are_sticky() {
    let d = Daemon::start_with(&["--proxy-session-cookie", "sid"]);
    d.create_app("mcp").await;
    // Each machine issues sessions named after itself (its hostname is its id).
    let cgi = "#!/bin/sh\nid=$(hostname)\nprintf 'Content-Type: text/plain\\r\\nMcp-Session-Id: %s\\r\\nSet-Cookie: sid=%s; Path=/\\r\\n\\r\\n%s\\n' \"$id\" \"$id\" \"$id\"\n";
    let config = json!({
        "image": common::busybox_image(),
        "files": [{ "guest_path": "/srv/app/cgi-bin/mcp", "raw_value": base64_of(cgi), "mode": 0o755 }],
        "init": { "cmd": ["httpd", "-f", "-p", "8080", "-h", "/srv/app"] },
        "services": [{ "internal_port": 8080 }],
    });
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            d.machine("mcp", config.clone()).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let call = |session: Option<String>| {
        let (http, url) = (d.http.clone(), format!("{}/cgi-bin/mcp", d.proxy_url));
        async move {
            let mut req = http.get(url).header("host", "mcp.localhost");
            if let Some(s) = session {
                req = req.header("mcp-session-id", s);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let issued = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
            (issued, r.text().await.unwrap().trim().to_owned())
        }
    };
    let (session, served_by) = call(None).await;
    assert_eq!(session, served_by);
    assert!(ids.contains(&session));
    for _ in 0..10 {
        assert_eq!(
            call(Some(session.clone())).await.1,
            session,
            "every request of the session"
        );
    }
    d.ok(Method::POST, &format!("/v1/apps/mcp/machines/{session}/stop"), None)
        .await;
    d.wait_state("mcp", &session, "stopped").await;
    let (_, other) = call(None).await;
    assert_ne!(other, session, "without the session, the started machine serves");
    assert_eq!(call(Some(session.clone())).await.1, session, "woken, not moved");

    // A configured cookie names sessions too.
    for id in &ids {
        for _ in 0..3 {
            let r = d
                .http
                .get(format!("{}/cgi-bin/mcp", d.proxy_url))
                .header("host", "mcp.localhost")
                .header("cookie", format!("theme=dark; sid={id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.text().await.unwrap().trim(), id, "the cookie's machine");
        }
    }
}

/// Autostop leaves alone a machine with a stream open (an SSE response
/// lasting longer than the idle timeout), and one that said it is busy.
#[tokio::test(flavor = "multi_thread")]
async fn autostop_spares_open_streams_and_busy_machines() {
    let d = Daemon::start();
    d.create_app("shop").await;
    // An event stream: one event a second for 4 seconds.
    let sse = "#!/bin/sh\nprintf 'Content-Type: text/event-stream\\r\\n\\r\\n'\nfor i in 1 2 3 4; do printf 'data: %s\\n\\n' $i; sleep 1; done\n";
    let m = d
        .machine(
            "shop",
            json!({
                "image": common::busybox_image(),
                "files": [{ "guest_path": "/srv/app/cgi-bin/events", "raw_value": base64_of(sse), "mode": 0o755 }],
                "init": { "cmd": ["httpd", "-f", "-p", "8080", "-h", "/srv/app"] },
                "services": [{ "internal_port": 8080, "autostop": "stop", "idle_timeout_s": 1 }],
            }),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    let mut stream = d
        .http
        .get(format!("{}/cgi-bin/events", d.proxy_url))
        .header("host", format!("{id}.shop.localhost"))
        .send()
        .await
        .unwrap();
    let mut events = String::new();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        events.push_str(&String::from_utf8_lossy(&chunk));
        assert_eq!(state(&d, &id).await, "started", "stopped with a stream open");
    }
    assert_eq!(events.matches("data:").count(), 4, "{events}");

    // Busy: left alone past its idle timeout; idle again, it stops.
    d.sh("shop", &id, "/.hangar/init busy").await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(state(&d, &id).await, "started", "stopped while busy");
    d.sh("shop", &id, "/.hangar/init idle").await;
    d.wait_state("shop", &id, "stopped").await;
}

async fn state(d: &Daemon, id: &str) -> String {
    let m = d.ok(Method::GET, &format!("/v1/apps/shop/machines/{id}"), None).await;
    m["state"].as_str().unwrap().to_owned()
}

/// A machine can hand a request on to another with `hangar-replay`: the
/// proxy sends the same request (body included) there instead.
#[tokio::test(flavor = "multi_thread")]
async fn replay_hands_requests_on() {
    let d = Daemon::start();
    d.create_app("rp").await;
    // A machine with /srv/target replays to the machine named in it; one
    // without serves, echoing the request's body.
    let cgi = "#!/bin/sh\nbody=$(head -c \"${CONTENT_LENGTH:-0}\")\n\
               if [ -f /srv/target ]; then\n\
               printf 'Content-Type: text/plain\\r\\nhangar-replay: instance=%s;state=s1\\r\\n\\r\\nreplaying\\n' \"$(cat /srv/target)\"\n\
               else\n\
               printf 'Content-Type: text/plain\\r\\n\\r\\nserved by %s: %s\\n' \"$(hostname)\" \"$body\"\n\
               fi\n";
    let config = json!({
        "image": common::busybox_image(),
        "files": [{ "guest_path": "/srv/app/cgi-bin/route", "raw_value": base64_of(cgi), "mode": 0o755 }],
        "init": { "cmd": ["httpd", "-f", "-p", "8080", "-h", "/srv/app"] },
        "services": [{ "internal_port": 8080 }],
    });
    let front = d.machine("rp", config.clone()).await["id"].as_str().unwrap().to_owned();
    let back = d.machine("rp", config).await["id"].as_str().unwrap().to_owned();
    d.sh("rp", &front, &format!("echo {back} > /srv/target")).await;
    let r = d
        .http
        .post(format!("{}/cgi-bin/route", d.proxy_url))
        .header("host", format!("{front}.rp.localhost"))
        .body("the body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), format!("served by {back}: the body\n"));

    // A replay to a machine that doesn't exist: a clear error.
    d.sh("rp", &front, "echo nosuch > /srv/target").await;
    let (status, body) = get(&d, &format!("{front}.rp.localhost"), "/cgi-bin/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("nosuch"), "{body}");
}

/// A CGI that takes `?SECONDS` to answer, and says whether another request
/// was in flight on the machine meanwhile.
const SLOW_CGI: &str = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
                        if mkdir /tmp/inflight 2>/dev/null; then sleep \"${QUERY_STRING:-1}\"; rmdir /tmp/inflight; \
                        echo \"ok $(hostname)\"; else echo overlap; fi\n";

fn slow_machine(concurrency: serde_json::Value) -> serde_json::Value {
    json!({
        "image": common::busybox_image(),
        "files": [{ "guest_path": "/srv/app/cgi-bin/slow", "raw_value": base64_of(SLOW_CGI), "mode": 0o755 }],
        "init": { "cmd": ["httpd", "-f", "-p", "8080", "-h", "/srv/app"] },
        "services": [{ "internal_port": 8080, "concurrency": concurrency }],
    })
}

/// Above `hard_limit`, requests wait in a bounded queue, then get a clear
/// 503; an app route wakes a stopped machine rather than load one past its
/// `soft_limit`; a connection limit counts open client connections.
#[tokio::test(flavor = "multi_thread")]
async fn concurrency_limits_queue_then_refuse() {
    let d = Daemon::start_with(&["--proxy-queue-timeout", "3", "--proxy-queue-limit", "1"]);
    d.create_app("q").await;
    let limits = json!({ "type": "requests", "soft_limit": 1, "hard_limit": 1 });
    let one = d.machine("q", slow_machine(limits.clone())).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let send = |host: String, query: &'static str| {
        let (http, url) = (d.http.clone(), format!("{}/cgi-bin/slow?{query}", d.proxy_url));
        tokio::spawn(async move {
            let r = http.get(url).header("host", host).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    let host = format!("{one}.q.localhost");

    // Two at once: the second waits for the first, and both are served.
    let (a, b) = (send(host.clone(), "1"), send(host.clone(), "1"));
    for r in [a.await.unwrap(), b.await.unwrap()] {
        assert_eq!(r, (StatusCode::OK, format!("ok {one}\n")), "served one at a time");
    }

    // One in flight for 5 s: the next waits (queue depth 1), a third finds
    // the queue full at once, and the waiting one gives up after 3 s.
    let long = send(host.clone(), "5");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let waiting = send(host.clone(), "1");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let metrics = metrics(&d).await;
    assert!(
        metrics.contains(&format!("hangar_proxy_queue_depth{{app=\"q\",machine=\"{one}\"}} 1")),
        "{metrics}"
    );
    let started = std::time::Instant::now();
    let (status, body) = send(host.clone(), "1").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("already waiting") && body.contains("hard_limit"),
        "{body}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "a full queue answers at once"
    );
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("stayed at its concurrency hard_limit"), "{body}");
    assert_eq!(long.await.unwrap().0, StatusCode::OK);

    // By app: with `one` at its soft limit, a stopped machine is woken.
    let two = d.machine("q", slow_machine(limits)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok(Method::POST, &format!("/v1/apps/q/machines/{two}/stop"), None)
        .await;
    d.wait_state("q", &two, "stopped").await;
    let first = send("q.localhost".into(), "2");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, body) = send("q.localhost".into(), "0").await.unwrap();
    assert_eq!((status, body), (StatusCode::OK, format!("ok {two}\n")));
    assert_eq!(first.await.unwrap(), (StatusCode::OK, format!("ok {one}\n")));

    // A connection limit: an open keep-alive connection holds the machine's
    // only place until it closes.
    let three = d
        .machine("q", slow_machine(json!({ "type": "connections", "hard_limit": 1 })))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("{}/cgi-bin/slow?0", d.proxy_url);
    let host = format!("{three}.q.localhost");
    let mut holder = tokio::net::TcpStream::connect(d.proxy_url.trim_start_matches("http://"))
        .await
        .unwrap();
    let answer = exchange_on(&mut holder, &host, "/cgi-bin/slow?0").await;
    assert!(answer.contains(&format!("ok {three}")), "{answer}");
    let r = d.http.get(&url).header("host", &host).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the first connection is still open"
    );
    let answer = exchange_on(&mut holder, &host, "/cgi-bin/slow?0").await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the holding connection goes on: {answer}"
    );
    drop(holder);
    let r = d.http.get(&url).header("host", &host).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "closed, the place is free");
}

/// One request on a kept-alive connection; its chunked answer, whole.
async fn exchange_on(stream: &mut tokio::net::TcpStream, host: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    while !answer.ends_with(b"0\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(answer).unwrap()
}

/// HTTP/2 (prior knowledge) passes an event stream through as it comes;
/// a stream that passes nothing for the idle cut-off is closed.
#[tokio::test(flavor = "multi_thread")]
async fn http2_streams_and_idle_cutoff() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Daemon::start_with(&["--proxy-stream-idle-timeout", "2"]);
    d.create_app("shop").await;
    let sse = "#!/bin/sh\nprintf 'Content-Type: text/event-stream\\r\\n\\r\\n'\nfor i in 1 2 3; do printf 'data: %s\\n\\n' $i; sleep 1; done\n";
    let echo = "#!/bin/sh\ncr=$(printf '\\r'); while read -r line; do [ \"${line%$cr}\" = \"\" ] && break; done; \
                printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: echo\\r\\nConnection: Upgrade\\r\\n\\r\\n'; exec cat\n";
    let m = d
        .machine(
            "shop",
            json!({
                "image": common::busybox_image(),
                "files": [
                    { "guest_path": "/srv/app/cgi-bin/events", "raw_value": base64_of(sse), "mode": 0o755 },
                    { "guest_path": "/srv/echo.sh", "raw_value": base64_of(echo), "mode": 0o755 },
                ],
                "init": { "cmd": ["sh", "-c", "nc -ll -p 9000 -e /srv/echo.sh & exec httpd -f -p 8080 -h /srv/app"] },
                "services": [{ "internal_port": 8080 }],
            }),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();

    // Each event arrives about a second apart over HTTP/2: not buffered.
    let url = format!("{}/cgi-bin/events", d.proxy_url);
    let host = format!("Host: {id}.shop.localhost");
    let script = format!(
        "curl -sS -N --http2-prior-knowledge -H '{host}' -w 'version %{{http_version}}\\n' {url} | \
         while IFS= read -r line; do [ -n \"$line\" ] && echo \"$(date +%s.%N) $line\"; done"
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<(f64, &str)> = text
        .lines()
        .map(|l| {
            let (t, rest) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), rest)
        })
        .collect();
    let events: Vec<&(f64, &str)> = lines.iter().filter(|(_, l)| l.starts_with("data:")).collect();
    assert_eq!(events.len(), 3, "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(events[2].0 - events[0].0 > 1.5, "events streamed, not buffered: {text}");
    assert!(text.contains("version 2"), "{text}");

    // An upgraded connection quiet for longer than the cut-off is closed.
    let addr = d.proxy_url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request =
        format!("GET /chat HTTP/1.1\r\nHost: 9000-{id}.shop.localhost\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    stream.write_all(b"ping\n").await.unwrap();
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"ping\n");
    let quiet = std::time::Instant::now();
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("cut off")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    assert!(
        quiet.elapsed() >= std::time::Duration::from_millis(1900),
        "{:?}",
        quiet.elapsed()
    );
}

/// A gVisor machine's network stack is its own, out of the proxy's reach:
/// its init carries the proxy's connections. Kept-alive tunnels don't stop
/// autostop from suspending it, and a request resumes it.
#[tokio::test(flavor = "multi_thread")]
async fn reaches_gvisor_machines() {
    let d = Daemon::start();
    d.create_app("shop").await;
    let m = d
        .machine(
            "shop",
            json!({
                "image": common::busybox_image(),
                "runtime": "runsc",
                "init": { "cmd": ["httpd", "-f", "-p", "8080", "-h", "/srv/app"] },
                "services": [{ "internal_port": 8080, "autostop": "suspend", "idle_timeout_s": 1 }],
            }),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    let host = format!("{id}.shop.localhost");
    for _ in 0..3 {
        let (status, body) = get(&d, &host, "/from-image.txt").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "image layer\n"));
    }
    d.wait_state("shop", &id, "suspended").await;
    let (status, body) = get(&d, &host, "/from-image.txt").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "image layer\n"), "resumed");
}

/// A server in the machine for the HTTP/1.1 semantics below: `/echo`
/// answers with the body's length and SHA-256 and how it was framed,
/// `/headers` with the request's fields, `/chunked` with a chunked body and
/// a trailer, `/big` with 100 000 bytes, `/204` with nothing, `/duplex`
/// with the body as it comes, and `/hang` never.
fn serve_semantics(listener: tokio::net::TcpListener) {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Bytes, Frame};
    use sha2::Digest;
    type Answer = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;
    async fn answer(req: hyper::Request<hyper::body::Incoming>) -> Result<hyper::Response<Answer>, hyper::Error> {
        let full = |s: String| Full::new(Bytes::from(s)).map_err(|never| match never {}).boxed();
        let resp = match req.uri().path() {
            "/echo" => {
                let framing = req
                    .headers()
                    .get("transfer-encoding")
                    .map_or("length".to_owned(), |v| v.to_str().unwrap().to_owned());
                let body = req.into_body().collect().await?.to_bytes();
                let sha = hex::encode(sha2::Sha256::digest(&body));
                hyper::Response::new(full(format!("{} {sha} {framing}", body.len())))
            }
            "/headers" => {
                let mut text = String::new();
                for (name, value) in req.headers() {
                    text += &format!("{name}: {}\n", value.to_str().unwrap());
                }
                hyper::Response::new(full(text))
            }
            "/chunked" => {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("x-sum", "3".parse().unwrap());
                let frames = ["one ", "two ", "three"]
                    .map(|s| Ok::<_, hyper::Error>(Frame::data(Bytes::from(s))))
                    .into_iter()
                    .chain([Ok(Frame::trailers(trailers))]);
                let mut resp = hyper::Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
                // hyper sends only the trailers an answer declares.
                resp.headers_mut().insert("trailer", "x-sum".parse().unwrap());
                resp
            }
            "/big" => hyper::Response::new(full("x".repeat(100_000))),
            // Echoes the body as it comes: full duplex.
            "/duplex" => hyper::Response::new(req.into_body().boxed()),
            // Never answers.
            "/hang" => {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                unreachable!()
            }
            "/204" => {
                let mut resp = hyper::Response::new(full(String::new()));
                *resp.status_mut() = hyper::StatusCode::NO_CONTENT;
                resp
            }
            _ => panic!("no such path: {}", req.uri()),
        };
        Ok(resp)
    }
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), hyper::service::service_fn(answer)),
            );
        }
    });
}

/// Reads from `stream` until `done` says the bytes so far are whole.
async fn read_until(stream: &mut tokio::net::TcpStream, done: impl Fn(&[u8]) -> bool) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = [0; 65536];
    while !done(&answer) {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no whole answer in 10 s: {:?}", String::from_utf8_lossy(&answer)))
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(answer).unwrap()
}

/// A request's head off `stream`, read a byte at a time so that nothing
/// after it is taken; `None` at the end of the stream.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8(head).unwrap())
}

/// The proxy's own HTTP/1.1 path keeps the protocol's rules: bodies of
/// every framing pass whole (curl's 100-continue and chunked uploads),
/// chunked answers keep their trailers, HEAD and 204 answers have no body,
/// pipelined requests are answered in order, hop-by-hop fields stop at the
/// proxy, a request that could be read two ways is refused, HTTP/1.0 is
/// served, and a machine that closes kept-alive connections silently or
/// answers before reading the body is handled.
#[tokio::test(flavor = "multi_thread")]
async fn http11_forwarding_keeps_the_protocol() {
    use sha2::Digest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Daemon::start();
    d.create_app("h1").await;
    let m = d
        .machine(
            "h1",
            json!({
                "image": common::busybox_image(),
                "init": { "cmd": ["sleep", "1000000"] },
                "services": [{ "internal_port": 9200 }],
            }),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    serve_semantics(d.listen_in_machine(&id, 9200));
    let host = format!("{id}.h1.localhost");
    let proxy = d.proxy_url.trim_start_matches("http://").to_owned();

    // curl: a 3 MiB body with Expect: 100-continue, then chunked.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    let body: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &body).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&body));
    let curl = |extra: &[&str]| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--fail-with-body",
                "-H",
                &format!("Host: {host}"),
                "--data-binary",
            ])
            .arg(format!("@{}", file.display()))
            .args(extra)
            .arg(format!("{}/echo", d.proxy_url))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(curl(&["-v"]), format!("{} {sha} length", body.len()));
    assert_eq!(
        curl(&["-H", "Transfer-Encoding: chunked"]),
        format!("{} {sha} chunked", body.len())
    );
    let out = std::process::Command::new("curl")
        .args(["-sSv", "-H", &format!("Host: {host}"), "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(format!("{}/echo", d.proxy_url))
        .output()
        .unwrap();
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(
        trace.contains("Expect: 100-continue") && trace.contains("HTTP/1.1 100 Continue"),
        "curl asked for 100 Continue and the machine's came through: {trace}"
    );

    // A chunked answer passes as it came, its trailer too.
    let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let request = format!("GET /chunked HTTP/1.1\r\nHost: {host}\r\nTE: trailers\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, |a| a.ends_with(b"\r\n0\r\nx-sum: 3\r\n\r\n")).await;
    assert!(
        answer.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "{answer}"
    );
    assert!(answer.contains("\r\n4\r\none \r\n"), "{answer}");

    // Pipelined on the same connection: HEAD (a length but no body), 204,
    // then the whole body; in order.
    let pipelined = format!(
        "HEAD /big HTTP/1.1\r\nHost: {host}\r\n\r\nGET /204 HTTP/1.1\r\nHost: {host}\r\n\r\nGET /big HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, |a| a.ends_with(&[b'x'; 100_000])).await;
    let statuses: Vec<&str> = answer.lines().filter(|l| l.starts_with("HTTP/1.1")).collect();
    assert_eq!(
        statuses,
        ["HTTP/1.1 200 OK", "HTTP/1.1 204 No Content", "HTTP/1.1 200 OK"],
        "{answer:.400}"
    );
    assert_eq!(
        answer.len() - answer.trim_end_matches('x').len(),
        100_000,
        "one body only"
    );

    // Hop-by-hop fields stop here; X-Forwarded-* are the proxy's.
    let request = format!(
        "GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
         X-Forwarded-Proto: https\r\nX-Kept: 2\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, |a| a.ends_with(b"x-forwarded-proto: http\n")).await;
    let seen = answer.split("\r\n\r\n").nth(1).unwrap();
    assert!(
        seen.contains("x-kept: 2\n") && seen.contains("x-forwarded-for: 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains(&format!("x-forwarded-host: {host}\n")), "{seen}");
    assert!(!seen.contains("x-secret") && !seen.contains("keep-alive"), "{seen}");
    assert_eq!(seen.matches("x-forwarded-proto").count(), 1, "{seen}");

    // Connection can't name the fields that frame a body: the machine
    // gets the length, so the next request stays one.
    let request = format!(
        "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\nhello\
         GET /headers HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, |a| a.ends_with(b"x-forwarded-proto: http\n")).await;
    let hello = hex::encode(sha2::Sha256::digest(b"hello"));
    assert!(answer.contains(&format!("\r\n\r\n5 {hello} length")), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");

    // The proxy's own answer to a HEAD has no body: the next answer on the
    // connection starts where it should.
    let request =
        format!("HEAD / HTTP/1.1\r\nHost: nowhere.localhost\r\n\r\nGET /204 HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, |a| {
        a.ends_with(b"\r\n\r\n") && a.windows(7).any(|w| w == b" 204 No")
    })
    .await;
    let (first, second) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        first.starts_with("HTTP/1.1 404") && first.contains("content-length: "),
        "{answer}"
    );
    assert!(
        second.starts_with("HTTP/1.1 204 No Content"),
        "no body between: {answer}"
    );

    // Full duplex: each chunk's echo comes back before the next is sent.
    let request = format!("POST /duplex HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    for word in ["hello", "world"] {
        stream.write_all(format!("5\r\n{word}\r\n").as_bytes()).await.unwrap();
        read_until(&mut stream, |a| a.windows(5).any(|w| w == word.as_bytes())).await;
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    read_until(&mut stream, |a| a.ends_with(b"0\r\n\r\n")).await;

    // A client that goes while its request waits frees the machine.
    let mut waiting = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let request = format!("GET /hang HTTP/1.1\r\nHost: {host}\r\n\r\n");
    waiting.write_all(request.as_bytes()).await.unwrap();
    let active = format!("hangar_proxy_active{{app=\"h1\",machine=\"{id}\"}} ");
    let in_flight = async || {
        let metrics = metrics(&d).await;
        let line = metrics.lines().find(|l| l.starts_with(&active)).unwrap().to_owned();
        line[active.len()..].parse::<u32>().unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while in_flight().await == 0 {
        assert!(std::time::Instant::now() < deadline, "the request never counted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(waiting);
    while in_flight().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still counted after the client went"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A length and chunks together could be read two ways: refused, and
    // the connection closed, so nothing after it is taken as a request.
    let smuggle = format!(
        "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         GET /headers HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    stream.write_all(smuggle.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
    assert!(
        answer.contains("\"code\":\"bad_request\"") && answer.contains("both Content-Length and Transfer-Encoding"),
        "{answer}"
    );
    assert_eq!(
        answer.matches("HTTP/1.1").count(),
        1,
        "one answer, then closed: {answer}"
    );
    // Two Hosts could route one way and be served another.
    let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let request = format!("GET /headers HTTP/1.1\r\nHost: {host}\r\nHost: other.h1.localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("exactly one Host"),
        "{answer}"
    );

    // HTTP/1.0 goes to hyper, and is served.
    let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let request = format!("GET /big HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 200 OK") && answer.ends_with(&"x".repeat(100_000)),
        "{answer:.300}"
    );

    // A server that closes connections without saying so: after one answer
    // (`/quiet`), or on a kept-alive connection's second request without
    // answering it (`/flaky`: as a server that closes an idle connection
    // just as a request arrives); and one that answers before it has read
    // the body (`/early`).
    let raw = d.listen_in_machine(&id, 9201);
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = raw.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                for served in 0.. {
                    let Some(head) = read_head(&mut stream).await else {
                        return;
                    };
                    if head.starts_with("POST /early") {
                        let answer =
                            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\nConnection: close\r\n\r\nno way";
                        stream.write_all(answer.as_bytes()).await.unwrap();
                        // Reads the rest, so that closing sends no reset.
                        let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                        return;
                    }
                    if head.contains(" /flaky ") && served > 0 {
                        return;
                    }
                    if head.starts_with("POST") {
                        let mut byte = [0];
                        stream.read_exact(&mut byte).await.unwrap();
                    }
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                    if head.contains(" /quiet ") {
                        return;
                    }
                }
            });
        }
    });
    let accepted = move || accepted.load(std::sync::atomic::Ordering::SeqCst);
    let raw_host = format!("9201-{id}.h1.localhost");
    let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    for _ in 0..3 {
        let request = format!("GET /quiet HTTP/1.1\r\nHost: {raw_host}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until(&mut stream, |a| a.ends_with(b"\r\n\r\nok")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(accepted(), 3, "a new connection each time");
    // The second GET meets the silent close and goes again on a new
    // connection; a POST, which may not be sent twice, gets a 502.
    for _ in 0..2 {
        let request = format!("GET /flaky HTTP/1.1\r\nHost: {raw_host}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until(&mut stream, |a| a.ends_with(b"\r\n\r\nok")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    }
    assert_eq!(accepted(), 5, "the retry's own connection");
    let request = format!("POST /flaky HTTP/1.1\r\nHost: {raw_host}\r\nContent-Length: 1\r\n\r\nx");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut stream, |a| a.ends_with(b"}")).await;
    assert!(
        answer.starts_with("HTTP/1.1 502") && answer.contains("machine_unavailable"),
        "{answer}"
    );
    assert_eq!(accepted(), 5, "not sent again");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "-",
            "-w",
            " %{http_code}",
            "-H",
            &format!("Host: {raw_host}"),
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(format!("{}/early", d.proxy_url))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "no way 401",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
