//! `hangar-bench egress`: what a request pays for going through the egress
//! gateway. wrk runs the same requests against one loopback upstream twice
//! in one run: directly from the host, and from inside a machine through
//! the gateway (policy check, audit record, and for HTTPS the placeholder
//! swapped for the secret and TLS to the upstream).
//!
//! wrk can't tunnel through CONNECT, so the HTTPS case sends the gateway an
//! absolute `https://` URL over plain HTTP: the gateway's TLS to the
//! upstream is measured, the client's TLS to the gateway (its per-host
//! certificate) is not.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use reqwest::Method;
use serde_json::json;

use crate::hangar::{APP, Daemon};
use crate::process::run;

/// One wrk run's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrkResult {
    pub case: String,
    pub connections: u32,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests_per_sec: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub command: Vec<String>,
    pub wrk: String,
    pub seconds: u32,
    pub results: Vec<WrkResult>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = format!(
            "egress gateway overhead, wrk {} s per case ({})\n\n{:<46} {:>5} {:>10} {:>10} {:>12}\n",
            self.seconds, self.wrk, "case", "conns", "p50 µs", "p99 µs", "req/s"
        );
        for r in &self.results {
            out += &format!(
                "{:<46} {:>5} {:>10.0} {:>10.0} {:>12.0}\n",
                r.case, r.connections, r.p50_us, r.p99_us, r.requests_per_sec
            );
        }
        let find = |case: &str, c: u32| self.results.iter().find(|r| r.case == case && r.connections == c);
        out += "\nadded p50 (gateway − direct), one connection:\n";
        for (gw, direct) in [
            ("http via gateway", "http direct"),
            ("https via gateway, secret swapped in", "https direct"),
        ] {
            if let (Some(g), Some(d)) = (find(gw, 1), find(direct, 1)) {
                out += &format!("  {gw}: {:.0} µs\n", g.p50_us - d.p50_us);
            }
        }
        out
    }
}

/// A loopback upstream answering every request with a short body, over
/// HTTP and HTTPS (a self-signed certificate for `name`).
fn start_upstream(name: &str, ca_path: &Path) -> Result<(SocketAddr, SocketAddr)> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])?.self_signed(&key)?;
    std::fs::write(ca_path, cert.pem())?;
    let tls = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(anyhow::Error::msg)?,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let http = std::net::TcpListener::bind("127.0.0.1:0")?;
    let https = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addrs = (http.local_addr()?, https.local_addr()?);
    http.set_nonblocking(true)?;
    https.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let http = tokio::net::TcpListener::from_std(http).expect("listener");
            let https = tokio::net::TcpListener::from_std(https).expect("listener");
            loop {
                tokio::select! {
                    Ok((s, _)) = http.accept() => { tokio::spawn(serve(s)); }
                    Ok((s, _)) = https.accept() => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(s).await {
                                serve(tls).await;
                            }
                        });
                    }
                }
            }
        });
    });
    Ok(addrs)
}

/// Serves "hello world" on `listener` (which may be bound in a machine's
/// network namespace), from a thread of its own.
pub fn serve_hello(listener: std::net::TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve(s));
            }
        });
    });
    Ok(())
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(stream: S) {
    let service = hyper::service::service_fn(|_req| async {
        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from_static(
            b"hello world\n",
        ))))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

pub fn bench(cfg: &crate::hangar::Config, image: &str, seconds: u32) -> Result<Report> {
    let wrk = crate::process::which("wrk").context("wrk is not installed: apt-get install wrk")?;
    let work = tempfile::tempdir()?;
    let ca = work.path().join("upstream.pem");
    let name = "upstream.bench";
    let (http, https) = start_upstream(name, &ca)?;
    let mut cfg = cfg.clone();
    cfg.serve_args = vec![
        "--egress-upstream-ca".into(),
        ca.display().to_string(),
        "--egress-resolve".into(),
        format!("{name}=127.0.0.1"),
    ];
    let d = Daemon::start(&cfg)?;
    d.call(Method::POST, "/v1/apps", Some(json!({ "app_name": APP })))?;
    d.call(
        Method::POST,
        &format!("/v1/apps/{APP}/secrets"),
        Some(json!({ "name": "TOKEN", "value": "real-secret-value", "allowed_hosts": [name] })),
    )?;
    d.call(
        Method::PUT,
        &format!("/v1/apps/{APP}/egress-policy"),
        Some(json!({ "allow": [name] })),
    )?;
    let m = d.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(json!({ "config": { "image": image, "secrets": ["TOKEN"] } })),
    )?;
    let id = m["id"].as_str().context("machine id")?.to_owned();
    let env = d.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{id}/exec"),
        Some(json!({ "command": ["sh", "-c", "echo $TOKEN"] })),
    )?;
    let placeholder = env["stdout"].as_str().unwrap_or("").trim().to_owned();
    if placeholder.is_empty() {
        bail!("the machine has no placeholder for TOKEN: {env}");
    }
    let pid = d.machine_pid(&id)?.to_string();

    let script = |path: &str, auth: bool| -> Result<std::path::PathBuf> {
        let file = work.path().join(format!("{}.lua", results_key(path)));
        let mut lua = format!("wrk.path = \"{path}\"\n");
        if auth {
            lua += &format!("wrk.headers[\"Authorization\"] = \"Bearer {placeholder}\"\n");
        }
        std::fs::write(&file, lua)?;
        Ok(file)
    };
    let http_path = format!("http://{name}:{}/", http.port());
    let https_path = format!("https://{name}:{}/", https.port());
    let (http_lua, https_lua) = (script(&http_path, false)?, script(&https_path, true)?);
    let mut results = Vec::new();
    for connections in [1u32, 16] {
        let wrk_args = |c: &mut Command| {
            c.args([
                "--latency",
                "-t",
                "1",
                "-c",
                &connections.to_string(),
                "-d",
                &format!("{seconds}s"),
            ]);
        };
        let cases: Vec<(&str, Command)> = vec![
            ("http direct", {
                let mut c = Command::new(&wrk);
                wrk_args(&mut c);
                c.arg(format!("http://127.0.0.1:{}/", http.port()));
                c
            }),
            ("http via gateway", {
                let mut c = Command::new("nsenter");
                c.args(["-t", &pid, "-n"]).arg(&wrk);
                wrk_args(&mut c);
                c.arg("-s").arg(&http_lua).arg("http://127.0.0.1:3128");
                c
            }),
            ("https direct", {
                let mut c = Command::new(&wrk);
                wrk_args(&mut c);
                c.arg(format!("https://127.0.0.1:{}/", https.port()));
                c
            }),
            ("https via gateway, secret swapped in", {
                let mut c = Command::new("nsenter");
                c.args(["-t", &pid, "-n"]).arg(&wrk);
                wrk_args(&mut c);
                c.arg("-s").arg(&https_lua).arg("http://127.0.0.1:3128");
                c
            }),
        ];
        for (case, mut cmd) in cases {
            crate::process::check_interrupt()?;
            eprintln!("egress: {case}, {connections} connection(s), {seconds} s…");
            let out = run(&mut cmd)?;
            results.push(parse_wrk(case, connections, &out)?);
        }
    }
    Ok(Report {
        command: std::env::args().collect(),
        wrk: wrk_version(&wrk),
        seconds,
        results,
    })
}

/// `wrk -v` prints its version and exits 1.
pub fn wrk_version(wrk: &Path) -> String {
    Command::new(wrk)
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

fn results_key(path: &str) -> &'static str {
    if path.starts_with("https") { "https" } else { "http" }
}

/// Reads wrk's `--latency` report: the 50 % and 99 % lines and Requests/sec.
pub fn parse_wrk(case: &str, connections: u32, out: &str) -> Result<WrkResult> {
    let us = |v: &str| -> Option<f64> {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            _ => return None,
        })
    };
    let pct = |p: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p).map(str::trim))
            .and_then(us)
    };
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok());
    if out.contains("Non-2xx") {
        bail!("{case}: some answers were not 2xx:\n{out}");
    }
    match (pct("50%"), pct("99%"), rps) {
        (Some(p50_us), Some(p99_us), Some(requests_per_sec)) => Ok(WrkResult {
            case: case.to_owned(),
            connections,
            p50_us,
            p99_us,
            requests_per_sec,
        }),
        _ => bail!("{case}: cannot read wrk's output:\n{out}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_wrk() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n  Latency Distribution\n     50%   82.00us\n     75%  90.00us\n     90%  1.20ms\n     99%    2.50ms\n  4000 requests in 1.00s\nRequests/sec:   3999.21\nTransfer/sec: 1MB\n";
        let r = super::parse_wrk("x", 1, out).unwrap();
        assert_eq!((r.p50_us, r.p99_us, r.requests_per_sec.round()), (82.0, 2500.0, 3999.0));
        assert!(super::parse_wrk("x", 1, "garbage").is_err());
    }
}
