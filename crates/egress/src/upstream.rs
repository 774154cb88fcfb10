//! The gateway's side towards the world: name resolution (the machine has
//! none), and kept-alive connections to upstreams.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::Body;

const DNS_TTL: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const IDLE_PER_UPSTREAM: usize = 32;

/// Which connections can serve a request: the same TLS-ness, name (the
/// certificate checked) and address (the one the policy approved).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub tls: bool,
    pub host: String,
    pub addr: SocketAddr,
}

/// A name's addresses, and when they were looked up.
type Resolved = (Instant, Arc<[IpAddr]>);
/// A kept-alive connection, and since when it has been idle.
type Idle = (Instant, SendRequest<Body>);

pub struct Upstream {
    tls: tokio_rustls::TlsConnector,
    /// Names the operator resolved by hand (`--resolve`). They are trusted
    /// even when they point at internal addresses.
    overrides: HashMap<String, IpAddr>,
    dns: Mutex<HashMap<String, Resolved>>,
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("TLS with {0}: {1}")]
    Tls(String, std::io::Error),
    #[error("HTTP with {0}: {1}")]
    Http(String, hyper::Error),
}

impl Upstream {
    pub fn new(client: Arc<rustls::ClientConfig>, overrides: HashMap<String, IpAddr>) -> Upstream {
        Upstream {
            tls: tokio_rustls::TlsConnector::from(client),
            overrides,
            dns: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_operator_name(&self, host: &str) -> bool {
        self.overrides.contains_key(&host.to_ascii_lowercase())
    }

    /// The addresses of `host` (itself, if it is an address literal).
    pub async fn resolve(&self, host: &str) -> Result<Arc<[IpAddr]>, UpstreamError> {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Arc::new([ip]));
        }
        if let Some(ip) = self.overrides.get(&host) {
            return Ok(Arc::new([*ip]));
        }
        if let Some((at, ips)) = self.dns.lock().expect("dns cache").get(&host)
            && at.elapsed() < DNS_TTL
        {
            return Ok(ips.clone());
        }
        let ips: Arc<[IpAddr]> = tokio::net::lookup_host((host.as_str(), 0))
            .await
            .map_err(|e| UpstreamError::Resolve(host.clone(), e))?
            .map(|a| a.ip())
            .collect();
        let mut cache = self.dns.lock().expect("dns cache");
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(host, (Instant::now(), ips.clone()));
        Ok(ips)
    }

    pub async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(addr))?
            .map_err(|e| UpstreamError::Connect(addr, e))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A connection ready for a request: a kept-alive one, or a new one.
    pub async fn checkout(&self, key: &Key) -> Result<SendRequest<Body>, UpstreamError> {
        loop {
            let candidate = {
                let mut idle = self.idle.lock().expect("pool");
                let list = idle.entry(key.clone()).or_default();
                list.retain(|(at, s)| at.elapsed() < IDLE_TIMEOUT && !s.is_closed());
                list.pop()
            };
            let Some((_, mut sender)) = candidate else { break };
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        self.connect(key).await
    }

    /// Returns a connection whose last response was read to the end.
    pub fn checkin(&self, key: Key, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool");
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_PER_UPSTREAM {
            list.push((Instant::now(), sender));
        }
    }

    async fn connect(&self, key: &Key) -> Result<SendRequest<Body>, UpstreamError> {
        let tcp = Self::connect_tcp(key.addr).await?;
        let http = |e| UpstreamError::Http(key.host.clone(), e);
        if key.tls {
            let name = ServerName::try_from(key.host.clone())
                .map_err(|e| UpstreamError::Tls(key.host.clone(), std::io::Error::other(e)))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| UpstreamError::Tls(key.host.clone(), e))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(http)?;
            tokio::spawn(conn);
            Ok(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(http)?;
            tokio::spawn(conn);
            Ok(sender)
        }
    }
}
