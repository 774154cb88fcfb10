//! `hangar-egress`: the egress gateway process. `hangar serve` starts one
//! if none is running on its directory; it outlives daemon restarts, so
//! machines keep their way out while the daemon is down.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "hangar-egress", about = "Hangar's egress gateway")]
struct Args {
    /// Holds the seal key, the CA, the audit log and the admin socket.
    #[arg(long, default_value = "/var/lib/hangar/egress")]
    dir: PathBuf,
    /// An address machines may never reach (the daemon's); repeatable.
    /// 0.0.0.0:PORT stands for every address with that port.
    #[arg(long = "deny")]
    deny: Vec<SocketAddr>,
    /// HOST=IP: resolve HOST to IP (trusted even if internal); repeatable.
    #[arg(long = "resolve", value_parser = parse_resolve)]
    resolve: Vec<(String, IpAddr)>,
    /// A CA (PEM) trusted for upstream TLS besides the system roots; repeatable.
    #[arg(long = "upstream-ca")]
    upstream_ca: Vec<PathBuf>,
    /// Days audit log entries are kept.
    #[arg(long, default_value_t = 30)]
    audit_retention_days: u64,
    /// The most audit log entries kept (the newest); about 300 bytes each.
    #[arg(long, default_value_t = 1_000_000)]
    audit_max_entries: u64,
}

fn parse_resolve(s: &str) -> Result<(String, IpAddr), String> {
    let (host, ip) = s.split_once('=').ok_or("expected HOST=IP")?;
    Ok((host.to_owned(), ip.parse().map_err(|e| format!("{ip}: {e}"))?))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HANGAR_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    // One gateway per directory; the lock goes when the process does.
    let lock = std::fs::File::create(args.dir.join("lock"))?;
    // SAFETY: flock on a descriptor this function owns for the process's life.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!("another hangar-egress is running on {}", args.dir.display());
    }
    let gw = hangar_egress::Gateway::new(hangar_egress::Config {
        dir: args.dir.clone(),
        deny: args.deny,
        resolve: args.resolve.into_iter().collect::<HashMap<_, _>>(),
        upstream_cas: args.upstream_ca,
        audit_retention: hangar_egress::audit::Retention {
            age: std::time::Duration::from_secs(args.audit_retention_days * 86_400),
            max_entries: args.audit_max_entries,
        },
    })?;
    std::fs::write(args.dir.join("pid"), std::process::id().to_string())?;
    let socket = args.dir.join("admin.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(dir = %args.dir.display(), seal_key = %gw.seal_key_hex(), "egress gateway ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = hangar_egress::admin::serve(gw, listener) => {}
        _ = term.recv() => tracing::info!("stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    drop(lock);
    Ok(())
}
