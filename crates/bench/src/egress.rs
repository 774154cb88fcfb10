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
use reqwest::Method;
use serde_json::json;

use crate::hangar::{APP, Daemon};
use crate::wrk::{Wrk, WrkResult};

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
    crate::wrk::spawn_server(move || async move {
        let http = tokio::net::TcpListener::from_std(http).expect("listener");
        let https = tokio::net::TcpListener::from_std(https).expect("listener");
        loop {
            tokio::select! {
                Ok((s, _)) = http.accept() => { tokio::spawn(crate::wrk::serve_hello_on(s)); }
                Ok((s, _)) = https.accept() => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(s).await {
                            crate::wrk::serve_hello_on(tls).await;
                        }
                    });
                }
            }
        }
    });
    Ok(addrs)
}

pub fn bench(cfg: &crate::hangar::Config, image: &str, seconds: u32) -> Result<Report> {
    let wrk = Wrk::find(seconds)?;
    let work = tempfile::tempdir()?;
    let ca = work.path().join("upstream.pem");
    let name = "upstream.bench";
    let (http, https) = start_upstream(name, &ca)?;
    let mut cfg = cfg.clone();
    cfg.serve_args.extend([
        "--egress-upstream-ca".into(),
        ca.display().to_string(),
        "--egress-resolve".into(),
        format!("{name}=127.0.0.1"),
    ]);
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
    let pid = d.machine_pid(&id)?;

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
        let in_machine = |lua: &Path| {
            let mut c = wrk.command(connections, Some(pid));
            c.arg("-s").arg(lua).arg("http://127.0.0.1:3128");
            c
        };
        let from_host = |url: String| {
            let mut c = wrk.command(connections, None);
            c.arg(url);
            c
        };
        let cases: Vec<(&str, Command)> = vec![
            ("http direct", from_host(format!("http://127.0.0.1:{}/", http.port()))),
            ("http via gateway", in_machine(&http_lua)),
            (
                "https direct",
                from_host(format!("https://127.0.0.1:{}/", https.port())),
            ),
            ("https via gateway, secret swapped in", in_machine(&https_lua)),
        ];
        for (case, cmd) in cases {
            results.push(wrk.measure("egress", case, connections, cmd)?);
        }
    }
    Ok(Report {
        command: std::env::args().collect(),
        wrk: wrk.version(),
        seconds,
        results,
    })
}

fn results_key(path: &str) -> &'static str {
    if path.starts_with("https") { "https" } else { "http" }
}
