//! Egress: the daemon's side of the gateway. Policies and secrets live in
//! the store; the gateway (its own process, see `hangar-egress`) holds the
//! keys and enforces. The daemon seals secret values to the gateway's
//! public key, gives machines placeholders and the proxy settings, and
//! keeps the gateway's set of machines in step with the sandboxes that
//! exist: it registers each new sandbox, and registers them all again
//! whenever the gateway restarts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use hangar_api::egress::gateway::{Info, MachineEgress, MachineSecret, MachineSet};
use hangar_api::egress::{
    CreateSecretRequest, EgressLog, EgressLogQuery, EgressPolicy, PLACEHOLDER_PREFIX, PROXY_PORT, SealedPayload, Secret,
};
use hangar_api::{MachineState, RuntimeKind};
use hangar_store::{MachineRecord, SecretRecord};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use crate::{Error, Manager, Result, now_ms, rfc3339};

/// Where machines find the gateway's CA and proxy settings (read-only).
pub const GUEST_DIR: &str = "/.hangar/egress";

/// How the daemon reaches (and, if need be, starts) the gateway.
#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    /// The gateway's directory (its keys, audit log and admin socket);
    /// `DATA_DIR/egress` if `None`.
    pub dir: Option<PathBuf>,
    /// The `hangar-egress` binary to start when none is running; `None`:
    /// never start one (an operator runs it).
    pub binary: Option<PathBuf>,
    /// Passed to a gateway the daemon starts.
    pub resolve: Vec<String>,
    pub upstream_cas: Vec<PathBuf>,
}

/// The gateway as the daemon knows it.
#[derive(Debug)]
pub(crate) struct Egress {
    dir: PathBuf,
    socket: PathBuf,
    /// Shared with every machine at [`GUEST_DIR`]: the CA and apt's config.
    public_dir: PathBuf,
    /// The seal key and the gateway run it belongs to, once known.
    known: std::sync::RwLock<Option<Info>>,
    /// Serialises registrations so a full sync and a single one can't
    /// interleave.
    sync_lock: tokio::sync::Mutex<()>,
    /// The key placeholders are derived with, read (or made) once.
    placeholder_key: tokio::sync::OnceCell<Vec<u8>>,
}

impl Egress {
    pub(crate) fn new(data_dir: &Path, cfg: &EgressConfig) -> Result<Egress> {
        let dir = cfg.dir.clone().unwrap_or_else(|| data_dir.join("egress"));
        let public_dir = data_dir.join("egress-public");
        std::fs::create_dir_all(&public_dir)
            .map_err(|e| Error::internal(&format!("creating {}", public_dir.display()), e))?;
        std::fs::write(
            public_dir.join("apt.conf"),
            format!(
                "Acquire::http::Proxy \"http://127.0.0.1:{PROXY_PORT}\";\n\
                 Acquire::https::Proxy \"http://127.0.0.1:{PROXY_PORT}\";\n\
                 Acquire::https::CaInfo \"{GUEST_DIR}/ca.pem\";\n"
            ),
        )
        .map_err(|e| Error::internal("writing the machines' apt.conf", e))?;
        Ok(Egress {
            socket: dir.join("admin.sock"),
            dir,
            public_dir,
            known: std::sync::RwLock::new(None),
            sync_lock: tokio::sync::Mutex::new(()),
            placeholder_key: tokio::sync::OnceCell::new(),
        })
    }

    pub(crate) fn public_dir(&self) -> &Path {
        &self.public_dir
    }

    /// Where the gateway listens for a runsc machine (see
    /// `hangar_api::egress::gateway::socket_dir`); made here so that it can
    /// be mounted before the gateway binds its socket in it.
    pub(crate) fn socket_dir(&self, machine_id: &str) -> Result<PathBuf> {
        let dir = hangar_api::egress::gateway::socket_dir(&self.dir, machine_id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::internal(&format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }

    async fn call<R: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<R> {
        let unavailable =
            |e: &dyn std::fmt::Display| Error::Unavailable(format!("the egress gateway is not answering: {e}"));
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| unavailable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(&e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "egress")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a valid request");
        let resp = sender.send_request(req).await.map_err(|e| unavailable(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(&e))?
            .to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<hangar_api::egress::gateway::AdminError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(if status.as_u16() == 422 {
                Error::BadRequest(format!("egress gateway: {msg}"))
            } else {
                Error::Internal(format!("egress gateway: {status}: {msg}"))
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::internal("reading the egress gateway's answer", e))
    }

    fn seal_key(&self) -> Result<crypto_box::PublicKey> {
        let known = self.known.read().expect("egress info");
        let info = known.as_ref().ok_or_else(|| {
            Error::Unavailable("the egress gateway has not started yet; try again in a moment".into())
        })?;
        let bytes = hex::decode(&info.seal_key).map_err(|e| Error::internal("the gateway's seal key", e))?;
        crypto_box::PublicKey::from_slice(&bytes).map_err(|e| Error::internal("the gateway's seal key", e))
    }

    /// Starts the gateway binary on our directory, detached so it outlives
    /// a daemon restart, and waits until it answers.
    async fn start_gateway(&self, cfg: &EgressConfig, deny: &[SocketAddr]) -> Result<()> {
        let Some(binary) = &cfg.binary else {
            return Err(Error::Unavailable(
                "no egress gateway answers (start hangar-egress --dir DATA_DIR/egress)".into(),
            ));
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::internal("creating the gateway's directory", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))
            .map_err(|e| Error::internal("opening the gateway's log", e))?;
        let mut cmd = std::process::Command::new(binary);
        cmd.arg("--dir").arg(&self.dir);
        for d in deny {
            cmd.arg("--deny").arg(d.to_string());
        }
        for r in &cfg.resolve {
            cmd.arg("--resolve").arg(r);
        }
        for ca in &cfg.upstream_cas {
            cmd.arg("--upstream-ca").arg(ca);
        }
        use std::os::unix::process::CommandExt;
        cmd.process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| Error::internal("gateway log", e))?)
            .stderr(log);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::internal(&format!("starting {}", binary.display()), e))?;
        // Reaped here if it ends while we run; otherwise it outlives us.
        std::thread::spawn(move || child.wait());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match self.call::<Info>(Method::GET, "/v1/info", None).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(Error::Unavailable(format!(
                        "the egress gateway did not start (see DATA_DIR/egress/gateway.log): {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }
}

/// The placeholder a machine sees for one secret: unguessable, the same
/// across the machine's restarts, different in every other machine.
fn placeholder(key: &[u8], machine_id: &str, secret: &str) -> String {
    use sha2::{Digest, Sha256};
    // HMAC-SHA256(key, machine_id NUL secret).
    let mut block = [0u8; 64];
    block[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(machine_id.as_bytes())
        .chain_update([0])
        .chain_update(secret.as_bytes())
        .finalize();
    let mac = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    format!("{PLACEHOLDER_PREFIX}{}", &hex::encode(mac)[..40])
}

impl Manager {
    /// Connects to the gateway (starting it if need be), tells it which
    /// addresses are the daemon's, registers every live sandbox, and keeps
    /// doing so whenever the gateway restarts. Machines run without a
    /// gateway too, with no way out; secrets can't be sealed until it
    /// answers.
    pub async fn start_egress(&self, deny: Vec<SocketAddr>) {
        if let Err(e) = self.ensure_gateway(&deny).await {
            tracing::error!("egress gateway: {e}; machines have no egress until it answers");
        }
        self.inner
            .egress_asked
            .store(true, std::sync::atomic::Ordering::Release);
        let mgr = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if let Err(e) = mgr.ensure_gateway(&deny).await {
                    tracing::warn!("egress gateway: {e}");
                }
            }
        });
    }

    async fn ensure_gateway(&self, deny: &[SocketAddr]) -> Result<()> {
        let egress = &self.inner.egress;
        let info = match egress.call::<Info>(Method::GET, "/v1/info", None).await {
            Ok(info) => info,
            Err(_) => {
                egress.start_gateway(&self.inner.cfg.egress, deny).await?;
                egress.call::<Info>(Method::GET, "/v1/info", None).await?
            }
        };
        let known = egress
            .known
            .read()
            .expect("egress info")
            .as_ref()
            .map(|i| i.boot_id.clone());
        if known.as_deref() == Some(info.boot_id.as_str()) {
            return Ok(());
        }
        tracing::info!(boot_id = %info.boot_id, "egress gateway found; registering machines");
        crate::sandbox::write_atomic(&egress.public_dir.join("ca.pem"), info.ca_pem.as_bytes())
            .map_err(|e| Error::internal("writing the egress CA for machines", e))?;
        let deny_body = serde_json::to_vec(&serde_json::json!({ "deny": deny })).expect("serializes");
        egress
            .call::<serde_json::Value>(Method::PUT, "/v1/config", Some(deny_body))
            .await?;
        *egress.known.write().expect("egress info") = Some(info);
        self.sync_egress().await
    }

    /// Registers exactly the machines that have a sandbox.
    async fn sync_egress(&self) -> Result<()> {
        let _sync = self.inner.egress.sync_lock.lock().await;
        let mut set = MachineSet::default();
        let slots: Vec<(String, Arc<crate::Slot>)> = self
            .inner
            .slots
            .read()
            .expect("slots")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, slot) in slots {
            let sandbox = slot.sandbox();
            let Some(sandbox) = sandbox else { continue };
            let Some(rec) = self.inner.store.get_machine(&id).await? else {
                continue;
            };
            let m = self.machine_egress(&rec, sandbox.pid, &sandbox.instance_id).await?;
            set.machines.insert(id, m);
        }
        let body = serde_json::to_vec(&set).expect("serializes");
        let answer: serde_json::Value = self.inner.egress.call(Method::PUT, "/v1/machines", Some(body)).await?;
        if let Some(failed) = answer["failed"].as_array().filter(|f| !f.is_empty()) {
            tracing::warn!("egress gateway refused machines: {failed:?}");
        }
        Ok(())
    }

    /// What the gateway needs to know about one sandbox of a machine.
    /// gVisor's network stack is its own, so a listener in a runsc
    /// sandbox's namespace would not be reachable: there the gateway
    /// listens on a unix socket instead, which the init relays to.
    async fn machine_egress(&self, rec: &MachineRecord, pid: u32, instance: &str) -> Result<MachineEgress> {
        let pid = (self.runtime(rec.config.runtime).kind == RuntimeKind::Runc).then_some(pid);
        let policy = match &rec.config.egress {
            Some(p) => p.clone(),
            None => self.inner.store.get_egress_policy(&rec.app).await?.unwrap_or_default(),
        };
        let key = self.placeholder_key().await?;
        let mut secrets = Vec::new();
        for name in &rec.config.secrets {
            // A secret deleted since the machine was made is simply gone.
            if let Some(s) = self.inner.store.get_secret(&rec.app, name).await? {
                secrets.push(MachineSecret {
                    name: name.clone(),
                    placeholder: placeholder(key, &rec.id, name),
                    sealed: s.sealed,
                });
            }
        }
        Ok(MachineEgress {
            app: rec.app.clone(),
            instance: instance.to_owned(),
            pid,
            policy,
            secrets,
        })
    }

    /// Registers a sandbox with the gateway (again, to update its rules). A
    /// gateway that is down doesn't stop the machine: it registers it when
    /// it is back.
    pub(crate) async fn egress_attach(&self, rec: &MachineRecord, pid: u32, instance: &str) {
        let result = async {
            let m = self.machine_egress(rec, pid, instance).await?;
            let _sync = self.inner.egress.sync_lock.lock().await;
            let body = serde_json::to_vec(&m).expect("serializes");
            self.inner
                .egress
                .call::<serde_json::Value>(Method::PUT, &format!("/v1/machines/{}", rec.id), Some(body))
                .await
                .map(drop)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(machine = %rec.id, "registering with the egress gateway: {e}");
        }
    }

    /// Tells the gateway a sandbox is gone (only that one: a newer sandbox
    /// of the same machine keeps its registration).
    pub(crate) async fn egress_detach(&self, id: &str, instance: &str) {
        let _sync = self.inner.egress.sync_lock.lock().await;
        let path = format!("/v1/machines/{id}?instance={instance}");
        if let Err(e) = self
            .inner
            .egress
            .call::<serde_json::Value>(Method::DELETE, &path, None)
            .await
        {
            tracing::debug!(machine = %id, "unregistering from the egress gateway: {e}");
        }
    }

    /// Pushes current rules to the gateway for the app's live machines.
    async fn refresh_egress(&self, app: &str) {
        let machines = match self.inner.store.list_machines(Some(app)).await {
            Ok(m) => m,
            Err(e) => return tracing::warn!("listing machines to update egress: {e}"),
        };
        for rec in machines {
            if matches!(rec.state, MachineState::Destroyed) {
                continue;
            }
            let slot = self.slot(&rec.id, rec.state);
            let sandbox = slot.sandbox();
            if let Some(sandbox) = sandbox {
                self.egress_attach(&rec, sandbox.pid, &sandbox.instance_id).await;
            }
        }
    }

    /// Read from the store once (every start needs it), made on first use.
    async fn placeholder_key(&self) -> Result<&[u8]> {
        let key = self
            .inner
            .egress
            .placeholder_key
            .get_or_try_init(|| async {
                if let Some(k) = self.inner.store.get_setting("placeholder_key").await? {
                    return hex::decode(k).map_err(|e| Error::internal("the placeholder key", e));
                }
                let key: [u8; 32] = rand::random();
                self.inner
                    .store
                    .put_setting("placeholder_key", &hex::encode(key))
                    .await?;
                Ok(key.to_vec())
            })
            .await?;
        Ok(key)
    }

    /// The environment egress adds to a machine: proxy settings and the CA
    /// everywhere common tools look, and one placeholder per secret.
    pub(crate) async fn egress_env(&self, rec: &MachineRecord) -> Result<crate::launch::EgressEnv> {
        let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
        let ca = format!("{GUEST_DIR}/ca.pem");
        let mut defaults: Vec<(String, String)> = Vec::new();
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            defaults.push((k.into(), proxy.clone()));
        }
        for k in ["NO_PROXY", "no_proxy"] {
            defaults.push((k.into(), "localhost,127.0.0.1,::1".into()));
        }
        for k in [
            "SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "GIT_SSL_CAINFO",
            "PIP_CERT",
            "CARGO_HTTP_CAINFO",
            "AWS_CA_BUNDLE",
        ] {
            defaults.push((k.into(), ca.clone()));
        }
        defaults.push(("APT_CONFIG".into(), format!("{GUEST_DIR}/apt.conf")));
        let key = self.placeholder_key().await?;
        let secrets = rec
            .config
            .secrets
            .iter()
            .map(|name| (name.clone(), placeholder(key, &rec.id, name)))
            .collect();
        Ok(crate::launch::EgressEnv { defaults, secrets })
    }

    // ---- the API's operations ----

    /// The gateway's public key, hex.
    pub fn seal_key(&self) -> Result<String> {
        Ok(hex::encode(self.inner.egress.seal_key()?.as_bytes()))
    }

    pub async fn get_egress_policy(&self, app: &str) -> Result<EgressPolicy> {
        self.get_app(app).await?;
        Ok(self.inner.store.get_egress_policy(app).await?.unwrap_or_default())
    }

    /// Replaces the app's policy; live machines follow on their next request.
    pub async fn put_egress_policy(&self, app: &str, policy: EgressPolicy) -> Result<EgressPolicy> {
        policy.validate().map_err(Error::BadRequest)?;
        self.get_app(app).await?;
        self.inner.store.put_egress_policy(app, &policy, now_ms()).await?;
        self.refresh_egress(app).await;
        Ok(policy)
    }

    /// Sets (or with `None`, removes) a machine's own policy.
    pub async fn put_machine_egress_policy(
        &self,
        app: &str,
        id: &str,
        policy: Option<EgressPolicy>,
    ) -> Result<hangar_api::Machine> {
        if let Some(p) = &policy {
            p.validate().map_err(Error::BadRequest)?;
        }
        let rec = self.record(app, id).await?;
        let slot = self.slot(&rec.id, rec.state);
        let _op = slot.op.lock().await;
        let mut rec = self.record(app, &rec.id).await?;
        rec.config.egress = policy;
        rec.updated_at_ms = now_ms();
        self.inner.store.update_machine(&rec, None).await?;
        let sandbox = slot.sandbox();
        if let Some(sandbox) = sandbox {
            self.egress_attach(&rec, sandbox.pid, &sandbox.instance_id).await;
        }
        Ok(crate::ops::machine_view(&rec))
    }

    pub async fn list_secrets(&self, app: &str) -> Result<Vec<Secret>> {
        self.get_app(app).await?;
        Ok(self
            .inner
            .store
            .list_secrets(app)
            .await?
            .iter()
            .map(secret_view)
            .collect())
    }

    pub async fn get_secret(&self, app: &str, name: &str) -> Result<Secret> {
        self.get_app(app).await?;
        let s = self.inner.store.get_secret(app, name).await?;
        s.as_ref()
            .map(secret_view)
            .ok_or_else(|| Error::NotFound(format!("secret {name} in app {app}")))
    }

    /// Creates a secret, or with `rotate`, replaces an existing one's value
    /// and bindings. Only the sealed value is stored.
    pub async fn put_secret(&self, app: &str, req: CreateSecretRequest, rotate: bool) -> Result<Secret> {
        req.validate().map_err(Error::BadRequest)?;
        self.get_app(app).await?;
        let existing = self.inner.store.get_secret(app, &req.name).await?;
        match (&existing, rotate) {
            (Some(_), false) => {
                return Err(Error::Conflict(format!(
                    "secret {} already exists in app {app}: rotate it with PUT /v1/apps/{app}/secrets/{}",
                    req.name, req.name
                )));
            }
            (None, true) => {
                return Err(Error::NotFound(format!(
                    "secret {} in app {app} (create it with POST /v1/apps/{app}/secrets)",
                    req.name
                )));
            }
            _ => {}
        }
        let payload = SealedPayload {
            app: app.to_owned(),
            name: req.name.clone(),
            value: req.value,
            allowed_hosts: req.allowed_hosts.clone(),
            allowed_in: req.allowed_in.clone(),
            inject: req.inject.clone(),
        };
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(&payload).expect("serializes"));
        drop(zeroize::Zeroizing::new(payload.value));
        let sealed = self
            .inner
            .egress
            .seal_key()?
            .seal(&mut crypto_box::aead::OsRng, &plain)
            .map_err(|e| Error::internal("sealing the secret", e))?;
        let now = now_ms();
        let rec = SecretRecord {
            app: app.to_owned(),
            name: req.name,
            sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
            allowed_hosts: req.allowed_hosts,
            allowed_in: req.allowed_in,
            inject: req.inject,
            version: existing.as_ref().map_or(1, |e| e.version + 1),
            created_at_ms: existing.as_ref().map_or(now, |e| e.created_at_ms),
            updated_at_ms: now,
        };
        self.inner.store.put_secret(&rec).await?;
        if rotate {
            self.refresh_egress(app).await;
        }
        Ok(secret_view(&rec))
    }

    pub async fn delete_secret(&self, app: &str, name: &str) -> Result<()> {
        self.get_app(app).await?;
        if !self.inner.store.delete_secret(app, name).await? {
            return Err(Error::NotFound(format!("secret {name} in app {app}")));
        }
        self.refresh_egress(app).await;
        Ok(())
    }

    /// The audit log, newest first.
    pub async fn egress_log(&self, app: &str, q: &EgressLogQuery) -> Result<EgressLog> {
        self.get_app(app).await?;
        let ms = |what: &str, t: &Option<String>| -> Result<Option<i64>> {
            t.as_deref()
                .map(|t| {
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                        .map_err(|e| Error::BadRequest(format!("{what}: {t:?} is not an RFC 3339 time: {e}")))
                })
                .transpose()
        };
        let mut query: BTreeMap<&str, String> = BTreeMap::new();
        query.insert("app", app.to_owned());
        if let Some(m) = &q.machine {
            query.insert("machine", self.record(app, m).await?.id);
        }
        if let Some(t) = ms("since", &q.since)? {
            query.insert("since_ms", t.to_string());
        }
        if let Some(t) = ms("until", &q.until)? {
            query.insert("until_ms", t.to_string());
        }
        query.insert("limit", q.limit.unwrap_or(100).clamp(1, 1000).to_string());
        let qs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        self.inner
            .egress
            .call(Method::GET, &format!("/v1/audit?{}", qs.join("&")), None)
            .await
    }

    /// Checks a new machine's egress settings against its app.
    pub(crate) async fn validate_egress(&self, app: &str, config: &hangar_api::MachineConfig) -> Result<()> {
        if let Some(p) = &config.egress {
            p.validate().map_err(Error::BadRequest)?;
        }
        for name in &config.secrets {
            if self.inner.store.get_secret(app, name).await?.is_none() {
                return Err(Error::BadRequest(format!(
                    "config.secrets: no secret {name} in app {app}; create it first (POST /v1/apps/{app}/secrets)"
                )));
            }
        }
        Ok(())
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn secret_view(s: &SecretRecord) -> Secret {
    Secret {
        name: s.name.clone(),
        app: s.app.clone(),
        allowed_hosts: s.allowed_hosts.clone(),
        allowed_in: s.allowed_in.clone(),
        inject: s.inject.clone(),
        version: s.version,
        created_at: rfc3339(s.created_at_ms),
        updated_at: rfc3339(s.updated_at_ms),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_differ_per_machine_and_secret() {
        let key = [7u8; 32];
        let a = super::placeholder(&key, "m1", "GH");
        assert_eq!(a, super::placeholder(&key, "m1", "GH"));
        assert_ne!(a, super::placeholder(&key, "m2", "GH"));
        assert_ne!(a, super::placeholder(&key, "m1", "GL"));
        assert_ne!(a, super::placeholder(&[8u8; 32], "m1", "GH"));
        assert_eq!(a.len(), hangar_api::egress::PLACEHOLDER_LEN);
    }
}
