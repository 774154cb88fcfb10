//! wrk, the load generator of the egress and ingress benchmarks (one
//! thread, latency percentiles), and the small server they load.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use bytes::Bytes;

/// One wrk run's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrkResult {
    pub case: String,
    pub connections: u32,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests_per_sec: f64,
}

/// wrk, run for `seconds` per case.
pub struct Wrk {
    path: PathBuf,
    seconds: u32,
}

impl Wrk {
    pub fn find(seconds: u32) -> Result<Wrk> {
        let path = crate::process::which("wrk").context("wrk is not installed: apt-get install wrk")?;
        Ok(Wrk { path, seconds })
    }

    /// `wrk -v` prints its version and exits 1.
    pub fn version(&self) -> String {
        Command::new(&self.path)
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

    /// wrk with `connections`, run on the host or inside the network
    /// namespace of `netns_pid`; the URL (and script) are the caller's.
    pub fn command(&self, connections: u32, netns_pid: Option<u32>) -> Command {
        let mut c = match netns_pid {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", &pid.to_string(), "-n"]).arg(&self.path);
                c
            }
            None => Command::new(&self.path),
        };
        c.args([
            "--latency",
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{}s", self.seconds),
        ]);
        c
    }

    /// Runs one case and reads its numbers.
    pub fn measure(&self, bench: &str, case: &str, connections: u32, mut cmd: Command) -> Result<WrkResult> {
        crate::process::check_interrupt()?;
        eprintln!("{bench}: {case}, {connections} connection(s), {} s…", self.seconds);
        let out = crate::process::run(&mut cmd)?;
        parse(case, connections, &out)
    }
}

/// Serves "hello world" on `listener` (which may be bound in a machine's
/// network namespace), from a thread of its own with one worker.
pub fn serve_hello(listener: std::net::TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    spawn_server(move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve_hello_on(s));
        }
    });
    Ok(())
}

/// Runs a server on a one-worker runtime on a thread of its own, apart
/// from the benchmark's own work.
pub fn spawn_server<F: Future<Output = ()>>(serve: impl FnOnce() -> F + Send + 'static) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(serve());
    });
}

/// Answers every request on `stream` with "hello world".
pub async fn serve_hello_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(stream: S) {
    let service = hyper::service::service_fn(|_req| async {
        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from_static(
            b"hello world\n",
        ))))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// Reads wrk's `--latency` report: the 50 % and 99 % lines and Requests/sec.
fn parse(case: &str, connections: u32, out: &str) -> Result<WrkResult> {
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
        let r = super::parse("x", 1, out).unwrap();
        assert_eq!((r.p50_us, r.p99_us, r.requests_per_sec.round()), (82.0, 2500.0, 3999.0));
        assert!(super::parse("x", 1, "garbage").is_err());
    }
}
