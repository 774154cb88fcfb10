//! Hangar's egress gateway: the only way out of a machine.
//!
//! Machines have no routable network. For each one the daemon registers,
//! the gateway binds a proxy listener inside the machine's network
//! namespace (127.0.0.1:3128) and connects upstream from its own. Every
//! request is checked against the machine's policy (deny by default;
//! internal addresses only where a rule names them; the daemon's own
//! addresses never), secret placeholders are swapped for values only on
//! requests to the hosts each secret is bound to, and every request is
//! written to the audit log.
//!
//! The gateway holds the private key secrets are sealed to and the CA key
//! that signs the certificates machines see for HTTPS; both live in its own
//! directory, which no machine can reach. The daemon only ever gets the
//! public halves, over an admin socket in the same directory ([`admin`]).
//!
//! The gateway keeps no machine state on disk: if it restarts, its boot id
//! changes and the daemon registers every machine again.

pub mod admin;
pub mod audit;
mod proxy;
mod secrets;
pub mod tls;
mod tokenizer;
mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use bytes::Bytes;
use hangar_api::egress::EgressPolicy;
use hangar_api::egress::gateway::{MachineEgress, SOCKET_NAME, socket_dir};

/// Request and response bodies as they pass through.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the gateway is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Keys, CA, audit log and admin socket.
    pub dir: PathBuf,
    /// Never reachable, whatever a policy says: the daemon's own listening
    /// addresses. An unspecified address (0.0.0.0) stands for every address
    /// with that port.
    pub deny: Vec<SocketAddr>,
    /// Names the operator resolves by hand (like curl's `--resolve`); they
    /// may point at internal addresses.
    pub resolve: HashMap<String, IpAddr>,
    /// CAs trusted for upstreams besides the system's.
    pub upstream_cas: Vec<PathBuf>,
    /// How long, and how many, audit log entries are kept.
    pub audit_retention: audit::Retention,
}

/// One machine's rules as the next request sees them. Replaced whole on
/// each update, so a request uses one consistent version.
#[derive(Debug)]
pub(crate) struct Rules {
    pub machine_id: String,
    pub app: String,
    pub policy: EgressPolicy,
    pub secrets: secrets::Secrets,
}

#[derive(Debug)]
struct Registered {
    instance: String,
    rules: Arc<RwLock<Arc<Rules>>>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Dropping the listener's task closes it, which releases the
        // machine's network namespace.
        self.listener.abort();
    }
}

pub struct Gateway {
    pub cfg: Config,
    /// `cfg.deny`, and what the daemon adds at run time (its listening
    /// addresses are known only once it has bound them).
    deny: RwLock<Vec<SocketAddr>>,
    pub boot_id: String,
    seal_key: crypto_box::SecretKey,
    pub ca: tls::Ca,
    upstream: upstream::Upstream,
    pub audit: audit::AuditLog,
    machines: Mutex<HashMap<String, Registered>>,
    /// The gateway's own network namespace, which a machine's must differ from.
    own_netns: u64,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("boot_id", &self.boot_id)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(cfg: Config) -> Result<Arc<Gateway>> {
        std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.dir, std::fs::Permissions::from_mode(0o700))?;
        let seal_key = load_or_create_seal_key(&cfg.dir.join("seal-key"))?;
        let ca = tls::Ca::load_or_create(&cfg.dir)?;
        let client = tls::client_config(&cfg.upstream_cas)?;
        let upstream = upstream::Upstream::new(
            client,
            cfg.resolve.iter().map(|(k, v)| (k.to_ascii_lowercase(), *v)).collect(),
        );
        let audit = audit::AuditLog::open(&cfg.dir.join("audit.db"), cfg.audit_retention)?;
        let own_netns = netns_inode(Path::new("/proc/self/ns/net"))?;
        Ok(Arc::new(Gateway {
            deny: RwLock::new(cfg.deny.clone()),
            cfg,
            boot_id: hex::encode(rand::random::<[u8; 8]>()),
            seal_key,
            ca,
            upstream,
            audit,
            machines: Mutex::new(HashMap::new()),
            own_netns,
        }))
    }

    pub fn seal_key_hex(&self) -> String {
        hex::encode(self.seal_key.public_key().as_bytes())
    }

    /// Places (or updates) a machine's listener and rules. The new rules
    /// apply from the next request.
    pub async fn register(self: &Arc<Self>, id: &str, m: MachineEgress) -> Result<(), String> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("bad machine id {id:?}"));
        }
        m.policy.validate()?;
        let rules = Arc::new(Rules {
            machine_id: id.to_owned(),
            app: m.app.clone(),
            policy: m.policy,
            secrets: secrets::open(&self.seal_key, &m.app, &m.secrets)?,
        });
        {
            let machines = self.machines.lock().expect("machines");
            if let Some(r) = machines.get(id)
                && r.instance == m.instance
                && !r.listener.is_finished()
            {
                *r.rules.write().expect("rules") = rules;
                return Ok(());
            }
        }
        let listener = match m.pid {
            Some(pid) => proxy::Listener::Tcp(self.bind_in_machine(pid).await?),
            None => proxy::Listener::Unix(self.bind_socket(id)?),
        };
        let shared = Arc::new(RwLock::new(rules));
        let task = tokio::spawn(proxy::serve(self.clone(), listener, shared.clone()));
        let old = self.machines.lock().expect("machines").insert(
            id.to_owned(),
            Registered {
                instance: m.instance,
                rules: shared,
                listener: task,
            },
        );
        drop(old);
        Ok(())
    }

    /// Drops a machine's listener; with `instance`, only if it is that
    /// sandbox's (a newer sandbox of the machine keeps its own).
    pub fn unregister(&self, id: &str, instance: Option<&str>) {
        let mut machines = self.machines.lock().expect("machines");
        if machines
            .get(id)
            .is_some_and(|r| instance.is_none_or(|i| i == r.instance))
        {
            machines.remove(id);
            let _ = std::fs::remove_file(socket_dir(&self.cfg.dir, id).join(SOCKET_NAME));
        }
    }

    /// Adds addresses machines may never reach.
    pub fn add_deny(&self, addrs: &[SocketAddr]) {
        let mut deny = self.deny.write().expect("deny");
        for a in addrs {
            if !deny.contains(a) {
                deny.push(*a);
            }
        }
    }

    /// Makes the registered set exactly `set`.
    pub async fn sync(self: &Arc<Self>, set: hangar_api::egress::gateway::MachineSet) -> Vec<(String, String)> {
        let stale: Vec<String> = {
            let machines = self.machines.lock().expect("machines");
            machines
                .keys()
                .filter(|id| !set.machines.contains_key(*id))
                .cloned()
                .collect()
        };
        for id in stale {
            self.unregister(&id, None);
        }
        let mut failed = Vec::new();
        for (id, m) in set.machines {
            if let Err(e) = self.register(&id, m).await {
                failed.push((id, e));
            }
        }
        failed
    }

    pub fn machine_count(&self) -> usize {
        self.machines.lock().expect("machines").len()
    }

    /// A listener on 127.0.0.1:3128 inside the network namespace of `pid`.
    /// A socket stays in the namespace it was made in, so one thread enters
    /// the namespace, binds, and ends.
    async fn bind_in_machine(&self, pid: u32) -> Result<tokio::net::TcpListener, String> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let ns = std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let inode = netns_inode(&path).map_err(|e| e.to_string())?;
        if inode == self.own_netns {
            return Err(format!(
                "process {pid} shares the gateway's network namespace: refusing to listen there"
            ));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], hangar_api::egress::PROXY_PORT));
        let std_listener = std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| "the binding thread panicked".to_string())?
        .map_err(|e| format!("listening on {addr} in process {pid}'s network namespace: {e}"))?;
        tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())
    }

    /// The unix socket a machine's init relays to (see [`socket_dir`]).
    fn bind_socket(&self, id: &str) -> Result<tokio::net::UnixListener, String> {
        let dir = socket_dir(&self.cfg.dir, id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&path);
        tokio::net::UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))
    }

    /// Whether `addr` reaches one of the daemon's own listeners: on one of
    /// their ports, their address or any address of this host (0.0.0.0
    /// and :: reach a local listener as loopback does).
    fn is_denied(&self, addr: SocketAddr) -> bool {
        let ip = hangar_api::egress::canonical(addr.ip());
        let deny = self.deny.read().expect("deny");
        let mut ours = deny.iter().filter(|d| d.port() == addr.port());
        ours.any(|d| hangar_api::egress::canonical(d.ip()) == ip || is_host_address(ip))
    }
}

/// Whether a connection to `ip` stays on this host.
fn is_host_address(ip: std::net::IpAddr) -> bool {
    ip.is_unspecified() || ip.is_loopback() || interface_addresses().contains(&ip)
}

/// The addresses of this host's interfaces, read afresh (they change).
fn interface_addresses() -> Vec<std::net::IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own into `list`, to be freed
    // with freeifaddrs, which we do below and only on success.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        // Unknown: treat nothing more as local; loopback and the
        // unspecified addresses are still refused by the caller.
        tracing::warn!("getifaddrs: {}", std::io::Error::last_os_error());
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs gave us, not yet
        // freed; `ifa_addr` is null or points to a sockaddr whose family
        // says which struct it is.
        unsafe {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(hangar_api::egress::canonical(
                            std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                        ));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: `list` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

fn netns_inode(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .ino())
}

fn load_or_create_seal_key(path: &Path) -> Result<crypto_box::SecretKey> {
    if !path.exists() {
        let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        write_private(path, hex::encode(key.to_bytes()).as_bytes())?;
    }
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?);
    let bytes = zeroize::Zeroizing::new(hex::decode(text.trim()).context("the seal key is not hex")?);
    crypto_box::SecretKey::from_slice(&bytes).map_err(|_| anyhow::anyhow!("the seal key is not 32 bytes"))
}

/// Writes a file only root can read, atomically.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod host_address_tests {
    use super::*;

    #[test]
    fn this_hosts_addresses_are_its_own() {
        for ip in [
            "0.0.0.0",
            "::",
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
        ] {
            let ip = hangar_api::egress::canonical(ip.parse().unwrap());
            assert!(is_host_address(ip), "{ip}");
        }
        // The host's interfaces have loopback at least.
        assert!(interface_addresses().iter().any(|ip| ip.is_loopback()));
        assert!(!is_host_address("192.0.2.1".parse().unwrap()));
    }
}
