//! `hangar-bench ingress`: what a request pays for the ingress proxy.
//!
//! Steady state: wrk sends the same requests, in one run, to a server on a
//! machine's port three ways, taking turns for a number of rounds so that
//! the host's noise falls on all three (medians are reported): directly (wrk inside the machine's network
//! namespace), through nginx (also inside it, proxying to the port with
//! kept-alive upstream connections), and through Hangar's proxy (wrk on the
//! host, Host naming the machine). The server is the benchmark's own
//! hyper server, listening inside the machine's namespace, so all three
//! reach the same thing.
//!
//! Wake: a request for a stopped machine (busybox httpd as its process),
//! sent to the proxy, timed to the answer's first byte; beside it the same
//! machine started through the API, its port polled from inside its
//! namespace until it accepts, and the same request sent: the app's own
//! start time as a client without the proxy would see it. Both use the
//! prepared sandbox a stop leaves behind.
//!
//! CPU per request: the CPU time (user and system) nginx's processes and
//! Hangar's daemon used during their runs, over the requests wrk counted.
//! It moves less with the host's noise than requests/s does, since the
//! work a request costs does not depend on how long it waited for a core.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::json;

use crate::hangar::{APP, Daemon};
use crate::stats::Summary;
use crate::wrk::{Wrk, WrkResult};

#[derive(Debug, serde::Serialize)]
pub struct Share {
    pub connections: u32,
    /// Percent, one per round.
    pub per_round: Vec<f64>,
}

impl Share {
    fn median(&self) -> f64 {
        median(self.per_round.iter().copied())
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Debug, serde::Serialize)]
pub struct CpuPerRequest {
    pub connections: u32,
    pub nginx_us: Vec<f64>,
    pub hangar_us: Vec<f64>,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub command: Vec<String>,
    pub wrk: String,
    pub nginx: String,
    pub seconds: u32,
    pub rounds: usize,
    /// Each case's median over the rounds, field by field.
    pub throughput: Vec<WrkResult>,
    /// Hangar's requests/s as a share of nginx's, per round.
    pub shares: Vec<Share>,
    /// CPU µs per request, per round.
    pub cpu: Vec<CpuPerRequest>,
    /// Request to first byte through the proxy, machine stopped.
    pub wake: Summary,
    /// API start, port polled until it accepts, request to first byte.
    pub start_then_request: Summary,
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = format!(
            "ingress proxy, wrk {} s per case, {} rounds, medians ({}, {})\n\n{:<40} {:>5} {:>10} {:>10} {:>12}\n",
            self.seconds, self.rounds, self.wrk, self.nginx, "case", "conns", "p50 µs", "p99 µs", "req/s"
        );
        for r in &self.throughput {
            out += &format!(
                "{:<40} {:>5} {:>10.0} {:>10.0} {:>12.0}\n",
                r.case, r.connections, r.p50_us, r.p99_us, r.requests_per_sec
            );
        }
        out += "\nhangar proxy throughput as a share of nginx's (median; each round):\n";
        for share in &self.shares {
            let rounds: Vec<String> = share.per_round.iter().map(|p| format!("{p:.0}")).collect();
            out += &format!(
                "  {} connection(s): {:.0} % ({} %)\n",
                share.connections,
                share.median(),
                rounds.join(", ")
            );
        }
        out += "\nCPU per request (µs, median over the rounds; the daemon's whole process for hangar):\n";
        for cpu in &self.cpu {
            out += &format!(
                "  {} connection(s): nginx {:.1}, hangar {:.1}\n",
                cpu.connections,
                median(cpu.nginx_us.iter().copied()),
                median(cpu.hangar_us.iter().copied()),
            );
        }
        out += &format!(
            "\nwake on request ({} runs; ms)      p50 {:>8.2}  p99 {:>8.2}\n\
             start via API, then request      p50 {:>8.2}  p99 {:>8.2}\n\
             wake overhead (p50 difference)   {:.2} ms\n",
            self.wake.n,
            self.wake.p50_ms,
            self.wake.p99_ms,
            self.start_then_request.p50_ms,
            self.start_then_request.p99_ms,
            self.wake.p50_ms - self.start_then_request.p50_ms,
        );
        out
    }
}

const DIRECT: &str = "direct to the machine's port";
const NGINX: &str = "via nginx (in the machine's netns)";
const HANGAR: &str = "via hangar's proxy";

pub fn bench(cfg: &crate::hangar::Config, image: &str, seconds: u32, rounds: usize, wakes: usize) -> Result<Report> {
    let wrk = Wrk::find(seconds)?;
    let nginx = crate::process::which("nginx").context("nginx is not installed: apt-get install nginx-light")?;
    let d = Daemon::start(cfg)?;
    d.call(Method::POST, "/v1/apps", Some(json!({ "app_name": APP })))?;
    let proxy = d.proxy_addr()?;

    // Steady state: the benchmark's server on port 8080 of a machine that
    // otherwise sleeps.
    let m = d.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(json!({ "name": "steady", "config": {
            "image": image,
            "init": { "cmd": ["sleep", "1000000"] },
            "services": [{ "internal_port": 8080 }],
        } })),
    )?;
    let id = m["id"].as_str().context("machine id")?.to_owned();
    let pid = d.machine_pid(&id)?;
    let listener = in_netns(pid, || std::net::TcpListener::bind("127.0.0.1:8080"))?;
    crate::wrk::serve_hello(listener)?;
    let work = tempfile::tempdir()?;
    let nginx_in_netns = NginxInNetns::start(&nginx, pid, work.path())?;
    let nginx_pids = nginx_in_netns.pids();
    let daemon_pids = Vec::from_iter(d.pid());

    let (mut throughput, mut shares, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for connections in [1u32, 16] {
        let in_machine = |url: &str| {
            let mut c = wrk.command(connections, Some(pid));
            c.arg(url);
            c
        };
        let through_proxy = || {
            let mut c = wrk.command(connections, None);
            c.args(["-H", &format!("Host: steady.{APP}.localhost")]);
            c.arg(format!("http://{proxy}/"));
            c
        };
        let mut runs: Vec<WrkResult> = Vec::new();
        let mut per_round = Vec::new();
        let mut per_request = CpuPerRequest {
            connections,
            nginx_us: Vec::new(),
            hangar_us: Vec::new(),
        };
        for _ in 0..rounds {
            let before = cpu_us(&nginx_pids)?;
            let nginx = wrk.measure("ingress", NGINX, connections, in_machine("http://127.0.0.1:8081/"))?;
            let nginx_cpu = cpu_us(&nginx_pids)? - before;
            let before = cpu_us(&daemon_pids)?;
            let hangar = wrk.measure("ingress", HANGAR, connections, through_proxy())?;
            let hangar_cpu = cpu_us(&daemon_pids)? - before;
            let direct = wrk.measure("ingress", DIRECT, connections, in_machine("http://127.0.0.1:8080/"))?;
            per_round.push(100.0 * hangar.requests_per_sec / nginx.requests_per_sec);
            let requests = |r: &WrkResult| r.requests_per_sec * f64::from(seconds);
            per_request.nginx_us.push(nginx_cpu / requests(&nginx));
            per_request.hangar_us.push(hangar_cpu / requests(&hangar));
            runs.extend([direct, nginx, hangar]);
        }
        cpu.push(per_request);
        for case in [DIRECT, NGINX, HANGAR] {
            let of_case = || runs.iter().filter(|r| r.case == case);
            throughput.push(WrkResult {
                case: case.to_owned(),
                connections,
                p50_us: median(of_case().map(|r| r.p50_us)),
                p99_us: median(of_case().map(|r| r.p99_us)),
                requests_per_sec: median(of_case().map(|r| r.requests_per_sec)),
            });
        }
        shares.push(Share { connections, per_round });
    }

    // Wake: busybox httpd as the machine's process.
    let m = d.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(json!({ "name": "wake", "config": {
            "image": image,
            "files": [{ "guest_path": "/srv/index.html", "raw_value": "b2sK" }],
            "init": { "cmd": ["httpd", "-f", "-p", "8090", "-h", "/srv"] },
            "services": [{ "internal_port": 8090 }],
        } })),
    )?;
    let id = m["id"].as_str().context("machine id")?.to_owned();
    let (mut woken, mut started) = (Vec::new(), Vec::new());
    for i in 0..wakes {
        crate::process::check_interrupt()?;
        eprintln!("ingress: wake {}/{wakes}…", i + 1);
        stop_and_prepare(&d, &id)?;
        let t0 = Instant::now();
        first_byte(TcpStream::connect(proxy)?, &format!("wake.{APP}.localhost"))?;
        woken.push(t0.elapsed());

        let pid = stop_and_prepare(&d, &id)?;
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        let t0 = Instant::now();
        d.call(Method::POST, &format!("/v1/apps/{APP}/machines/{id}/start"), None)?;
        let stream = in_netns_fd(ns, || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match TcpStream::connect("127.0.0.1:8090") {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_micros(500)),
                }
            }
        })?;
        first_byte(stream, "wake")?;
        started.push(t0.elapsed());
    }
    Ok(Report {
        command: std::env::args().collect(),
        wrk: wrk.version(),
        // `nginx -v` prints its version on stderr.
        nginx: Command::new(&nginx)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default(),
        seconds,
        rounds,
        throughput,
        shares,
        cpu,
        wake: Summary::of(&woken).context("no wake samples")?,
        start_then_request: Summary::of(&started).context("no start samples")?,
    })
}

/// Stops the machine and waits for the prepared sandbox its next start
/// will use; returns that sandbox's pid.
fn stop_and_prepare(d: &Daemon, id: &str) -> Result<u32> {
    d.call(Method::POST, &format!("/v1/apps/{APP}/machines/{id}/stop"), None)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(pid) = d.machine_pid(id) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("machine {id} has no prepared sandbox 30 s after its stop");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a GET for `/` and reads the answer's first byte.
fn first_byte(mut stream: TcpStream, host: &str) -> Result<()> {
    write!(stream, "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut byte = [0u8; 1];
    if stream.read(&mut byte)? != 1 {
        bail!("the answer was empty");
    }
    Ok(())
}

fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    in_netns_fd(ns, f)
}

/// Runs `f` on a thread of its own that has entered the network namespace
/// (sockets made there stay in it).
fn in_netns_fd<T: Send + 'static>(
    ns: std::fs::File,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    .context("inside the machine's network namespace")
}

/// The CPU time (user and system) the processes have used so far, in µs.
fn cpu_us(pids: &[u32]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
        // After the command's `(…)`: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("/proc stat")?
            .1
            .split_whitespace()
            .collect();
        for i in [11, 12] {
            ticks += fields.get(i).context("/proc stat")?.parse::<u64>()?;
        }
    }
    Ok(ticks as f64 * 1e6 / ticks_per_s)
}

/// nginx in a machine's network namespace: 127.0.0.1:8081 proxies to the
/// machine's port 8080 over kept-alive connections.
struct NginxInNetns(Child);

impl NginxInNetns {
    fn start(nginx: &std::path::Path, pid: u32, dir: &std::path::Path) -> Result<NginxInNetns> {
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  upstream machine {{ server 127.0.0.1:8080; keepalive 64; }}\n\
                 server {{\n    listen 127.0.0.1:8081;\n    location / {{\n      proxy_pass http://machine;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
                dir = dir.display()
            ),
        )?;
        let child = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n"])
            .arg(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let up = NginxInNetns(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_netns(pid, || TcpStream::connect("127.0.0.1:8081")).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nginx did not listen within 10 s: {}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(up)
    }
}

impl NginxInNetns {
    /// Its master and worker processes, once the workers have started.
    fn pids(&self) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.processes();
            if pids.len() > 1 || Instant::now() > deadline {
                return pids;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn processes(&self) -> Vec<u32> {
        let master = self.0.id();
        let mut pids = vec![master];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // After the command's `(…)`: state, then the parent's pid.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent == Some(master.to_string().as_str()) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for NginxInNetns {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; nginx's master stops its workers on SIGTERM.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
