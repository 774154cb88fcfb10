//! The ingress proxy. A request's Host picks the machine:
//! `{machine}.{app}.{domain}` one machine, `{port}-{machine}.{app}.{domain}`
//! another of its ports, `{app}.{domain}` the least loaded of the app's
//! machines. The proxy reaches the port from inside the machine's network
//! namespace (machines have no routable address), starts a stopped or
//! suspended machine first when its service says `autostart`, holds
//! requests above a machine's `hard_limit` in a bounded queue, and stops
//! (or suspends) machines whose service says `autostop` once they have
//! been idle for their timeout.

#![forbid(unsafe_code)]

mod autostop;
mod body;
mod forward;
mod load;
mod metrics;
mod route;
mod stream;
mod upstream;
mod wire;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hangar_api::{ConcurrencyKind, Machine, MachineService, MachineState};
use hangar_machine::{Error, Manager};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};

use load::{Busy, Count, Load};
use metrics::{MachineCounters, Metrics, RouteKind};
pub use route::Route;
use upstream::{Affinity, Upstream};

use body::Body;

/// How the proxy is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Hosts are `….{domain}`; `localhost` resolves to loopback everywhere.
    pub domain: String,
    /// How long a woken machine has to accept connections on its port.
    pub wake_timeout: Duration,
    /// Request headers that name a session (lowercase): a request carrying
    /// one reaches the machine whose answer issued it.
    pub session_headers: Vec<String>,
    /// Cookies that name a session, learned from `Set-Cookie`.
    pub session_cookies: Vec<String>,
    /// A streamed answer or upgraded connection with nothing passing for
    /// this long is cut off.
    pub stream_idle_timeout: Duration,
    /// Requests waiting for room, per machine (or per app, for app routes).
    pub queue_limit: usize,
    /// How long a request waits for room before its 503.
    pub queue_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            domain: "localhost".into(),
            wake_timeout: Duration::from_secs(30),
            // MCP's streamable HTTP transport names sessions with it, and
            // an MCP server keeps a session's state in its memory.
            session_headers: vec!["mcp-session-id".into()],
            session_cookies: Vec::new(),
            stream_idle_timeout: Duration::from_secs(3600),
            queue_limit: 100,
            queue_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct Ingress {
    mgr: Manager,
    cfg: Config,
    /// `cfg.session_headers`, parsed once.
    session_headers: Vec<HeaderName>,
    load: Arc<Load>,
    metrics: Metrics,
    /// Session key (`header:value` or `cookie=value`) → the (app, machine)
    /// that issued it.
    sessions: Mutex<HashMap<String, (String, String)>>,
    upstream: Upstream,
    views: Views,
}

/// Machines as routing last read them from the store, so that a request
/// costs no database read; their state is read live (see
/// [`Ingress::target`]).
#[derive(Debug, Default)]
struct Views {
    /// (app, machine name or id) → the machine.
    machines: Recent<(String, String), Arc<Machine>>,
    /// app → its machines.
    apps: Recent<String, Arc<[Arc<Machine>]>>,
}

/// Values read from the store, kept for [`VIEW_TTL`].
#[derive(Debug)]
struct Recent<K, V>(RwLock<HashMap<K, (Instant, V)>>);

impl<K, V> Default for Recent<K, V> {
    fn default() -> Self {
        Recent(RwLock::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq, V: Clone> Recent<K, V> {
    /// The value kept for `key` if it is recent enough, else what `read`
    /// gives, kept from now on.
    async fn get_or_read<F>(&self, key: K, read: impl FnOnce() -> F) -> Result<V, Error>
    where
        F: Future<Output = Result<V, Error>>,
    {
        if let Some((at, v)) = self.0.read().expect("views").get(&key)
            && at.elapsed() < VIEW_TTL
        {
            return Ok(v.clone());
        }
        // Boxed: rare (once a second), and every request's future would
        // carry its size.
        let v = Box::pin(read()).await?;
        let mut kept = self.0.write().expect("views");
        if kept.len() > 10_000 {
            kept.clear();
        }
        kept.insert(key, (Instant::now(), v.clone()));
        Ok(v)
    }
}

/// How long a machine's config (its services) may be out of date for
/// routing; a new machine joins its app's routing within this time.
const VIEW_TTL: Duration = Duration::from_secs(1);

/// Sessions remembered; beyond it the oldest knowledge is dropped whole.
const MAX_SESSIONS: usize = 100_000;

/// The proxy: serve it on listeners; read its metrics.
#[derive(Debug, Clone)]
pub struct Proxy {
    ing: Arc<Ingress>,
}

impl Proxy {
    pub fn new(mgr: Manager, cfg: Config) -> Proxy {
        Proxy {
            ing: Arc::new(Ingress {
                upstream: Upstream::new(mgr.clone(), cfg.wake_timeout),
                session_headers: cfg
                    .session_headers
                    .iter()
                    .filter_map(|name| match HeaderName::from_bytes(name.as_bytes()) {
                        Ok(name) => Some(name),
                        Err(e) => {
                            tracing::warn!("ignoring session header {name:?}: {e}");
                            None
                        }
                    })
                    .collect(),
                mgr,
                cfg,
                load: Arc::default(),
                metrics: Metrics::default(),
                sessions: Mutex::new(HashMap::new()),
                views: Views::default(),
            }),
        }
    }

    /// Serves the proxy on `listeners` (HTTP/1.1, and HTTP/2 with prior
    /// knowledge), and runs autostop, until the task ends.
    pub async fn serve(self, listeners: Vec<tokio::net::TcpListener>) {
        tokio::spawn(autostop::run(self.ing.clone()));
        let ing = self.ing.clone();
        tokio::spawn(async move { ing.upstream.prune().await });
        let mut accepting = tokio::task::JoinSet::new();
        for listener in listeners {
            accepting.spawn(accept(self.ing.clone(), listener));
        }
        while accepting.join_next().await.is_some() {}
    }

    /// Per machine and route kind: requests, failures, wakes and their
    /// latency, requests in flight and queued, in Prometheus's text format.
    pub fn metrics(&self) -> String {
        self.ing.metrics.render(&self.ing.load)
    }
}

/// A client's connection to the proxy.
#[derive(Debug)]
struct ClientConn {
    /// The proxy port it came in on: picks the machine's service.
    listen_port: u16,
    /// The peer's address, for `X-Forwarded-For`.
    forwarded_for: Option<HeaderValue>,
    /// Connections to machines this one's requests went to.
    upstream: Affinity,
    /// Machines this connection counts against (services with
    /// `concurrency.type = connections`), until it closes.
    holds: Mutex<HashMap<String, Busy>>,
}

async fn accept(ing: Arc<Ingress>, listener: tokio::net::TcpListener) {
    let listen_port = listener.local_addr().map_or(0, |a| a.port());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ClientConn {
            listen_port,
            forwarded_for: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            upstream: Affinity::default(),
            holds: Mutex::new(HashMap::new()),
        });
        tokio::spawn(forward::serve(ing.clone(), conn, stream));
    }
}

/// Serves a client connection with hyper: HTTP/2, HTTP/1.0, and requests
/// the forwarding path leaves to it.
async fn serve_hyper<I>(ing: Arc<Ingress>, conn: Arc<ClientConn>, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn({
        let (ing, conn) = (ing.clone(), conn.clone());
        move |req| {
            let (ing, conn) = (ing.clone(), conn.clone());
            async move { Ok::<_, Infallible>(ing.handle(req, &conn).await) }
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await;
    ing.upstream.release(&conn.upstream);
}

/// A machine's answer that sends the request on: `instance=ID` or
/// `app=NAME`, optionally `;state=…` passed to the target (as Fly's
/// `fly-replay`).
const REPLAY_HEADER: HeaderName = HeaderName::from_static("hangar-replay");
/// On a replayed request: `instance=ID[;state=…]` of the machine that
/// asked for the replay.
const REPLAY_SOURCE_HEADER: HeaderName = HeaderName::from_static("hangar-replay-src");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Requests are kept for a replay up to this size.
const REPLAY_BODY_LIMIT: usize = 1 << 20;

/// The length of a request's body if it is small enough to keep for a
/// replay: its Content-Length up to the limit, or 0 for an HTTP/1.1
/// request that has no body.
fn small_body_len(parts: &hyper::http::request::Parts) -> Option<usize> {
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match length {
        Some(n) if n <= REPLAY_BODY_LIMIT => Some(n),
        Some(_) => None,
        None if parts.headers.contains_key(header::TRANSFER_ENCODING) => None,
        None if parts.version == Version::HTTP_2 => None,
        // HTTP/1.1 without a length or chunks: no body.
        None => Some(0),
    }
}

fn clone_parts(parts: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    *builder.headers_mut().expect("a fresh builder") = parts.headers.clone();
    builder.body(()).expect("parts of a valid request").into_parts().0
}

/// `key=value` out of `a=1;b=2`.
fn replay_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
}

/// Headers about one hop, not the request: not passed on (the same as
/// the forwarding path's, [`wire::HOP_BY_HOP`]), and the body's framing,
/// which hyper makes anew. An upgrade's `Connection` and `Upgrade` pass,
/// since they ask for the upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let fixed = wire::HOP_BY_HOP.iter().map(|name| HeaderName::from_static(name));
    let framing = [header::TRANSFER_ENCODING, header::TRAILER];
    for name in named.into_iter().chain(fixed).chain(framing) {
        if !(upgrade && (name == header::UPGRADE || name == header::CONNECTION)) {
            headers.remove(name);
        }
    }
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = hangar_api::ErrorBody::new(code, message).to_json();
    let mut resp = Response::new(Body::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &Error) -> Response<Body> {
    let (status, code) = match e {
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        _ => (StatusCode::BAD_GATEWAY, "machine_unavailable"),
    };
    json_error(status, code, &e.public_message())
}

fn over_capacity(message: String) -> Response<Body> {
    let mut resp = json_error(StatusCode::SERVICE_UNAVAILABLE, "over_capacity", &message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// A machine as routing sees it: its config as last read (at most
/// [`VIEW_TTL`] ago), its state as of now.
#[derive(Debug, Clone)]
struct Target {
    machine: Arc<Machine>,
    state: MachineState,
    /// The index of its service for the proxy port the request came in on.
    service: Option<usize>,
}

impl Target {
    fn service(&self) -> Option<&MachineService> {
        self.service.map(|i| &self.machine.config.services[i])
    }
}

/// A machine that has room for one more request, and the guard that
/// counts it.
struct Admitted {
    target: Target,
    busy: Busy,
}

/// A request on its way to a machine's port, counted in the metrics.
struct Call {
    port: u16,
    counters: Arc<MachineCounters>,
    kind: RouteKind,
    /// When the request came, if the machine was not started then.
    arrived: Option<Instant>,
    /// This request started the machine.
    woke: bool,
}

impl Call {
    fn counters(&self) -> &metrics::Counters {
        self.counters.route(self.kind)
    }

    /// The machine answered: a wake this request caused counts, with its
    /// time to the answer.
    fn answered(&self) {
        if let Some(arrived) = self.arrived.filter(|_| self.woke) {
            self.counters().wake(arrived.elapsed());
        }
    }

    fn failed(&self) {
        self.counters().failure();
    }
}

/// What a service's load is counted in.
fn count_of(service: Option<&MachineService>) -> Count {
    match service.and_then(|s| s.concurrency.as_ref()).map(|c| c.kind) {
        Some(ConcurrencyKind::Connections) => Count::Connection,
        _ => Count::Request,
    }
}

impl Ingress {
    async fn handle(self: &Arc<Self>, mut req: Request<Incoming>, conn: &ClientConn) -> Response<Body> {
        // HTTP/2 names the host in the URI's authority.
        let host = match req.headers().get(header::HOST) {
            Some(host) => host.clone(),
            None => req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or(HeaderValue::from_static("")),
        };
        let Some(route) = host.to_str().ok().and_then(|h| Route::parse(h, &self.cfg.domain)) else {
            return self.no_route(&String::from_utf8_lossy(host.as_bytes()));
        };
        let session = self.session_of(req.headers());
        let admitted = match self.admit(&route, session.as_deref(), conn).await {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        let client_upgrade = req
            .headers()
            .contains_key(header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
        parts.headers.insert(header::HOST, host.clone());
        parts.headers.insert(X_FORWARDED_HOST, host);
        if let Some(v) = &conn.forwarded_for {
            parts.headers.append(X_FORWARDED_FOR, v.clone());
        }
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        parts.version = Version::HTTP_11;
        // A small request is kept, so that the machine can hand it on with
        // `hangar-replay`; a replayed one is not replayed again.
        let may_replay = client_upgrade.is_none() && !parts.headers.contains_key(REPLAY_SOURCE_HEADER);
        let (body, kept) = match may_replay.then(|| small_body_len(&parts)).flatten() {
            Some(0) => (Body::full(Bytes::new()), Some(Bytes::new())),
            Some(limit) => match http_body_util::Limited::new(body, limit).collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    (Body::full(bytes.clone()), Some(bytes))
                }
                Err(e) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        &format!("reading the body: {e}"),
                    );
                }
            },
            None => (Body::Incoming(body), None),
        };
        let copy = kept.map(|bytes| (clone_parts(&parts), bytes));
        let from = admitted.target.machine.clone();
        let resp = self
            .exchange(
                admitted,
                conn,
                route.port(),
                route.kind(),
                Request::from_parts(parts, body),
                client_upgrade,
            )
            .await;
        let Some(replay) = resp
            .headers()
            .get(REPLAY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return resp;
        };
        let Some((mut parts, bytes)) = copy else {
            return json_error(
                StatusCode::BAD_GATEWAY,
                "replay_refused",
                "the machine asked for a replay, but the request can't be replayed (a body over 1 MiB, an \
                 upgrade, or a replay already)",
            );
        };
        let target = match replay_route(&from.app, &from.id, &replay) {
            Ok(route) => route,
            Err(e) => return error_response(&e),
        };
        let admitted = match Box::pin(self.admit(&target, None, conn)).await {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        let mut source = format!("instance={}", from.id);
        if let Some(state) = replay_field(&replay, "state") {
            source += &format!(";state={state}");
        }
        if let Ok(v) = HeaderValue::from_str(&source) {
            parts.headers.insert(REPLAY_SOURCE_HEADER, v);
        }
        let req = Request::from_parts(parts, Body::full(bytes));
        // Boxed: rare, and it would double the size of every request's future.
        Box::pin(self.exchange(admitted, conn, None, RouteKind::Replay, req, None)).await
    }

    /// A machine with room for the request: the one the route names (or
    /// that issued its session), else the least loaded of the app's. When
    /// none has room, the request waits in the queue, then gets a 503.
    async fn admit(&self, route: &Route, session: Option<&str>, conn: &ClientConn) -> Result<Admitted, Response<Body>> {
        let mut queued = None;
        let deadline = tokio::time::Instant::now() + self.cfg.queue_timeout;
        // Set before an attempt, so that a release between that attempt and
        // the wait is not missed; not before the first, which usually
        // succeeds.
        let mut listening = None;
        loop {
            match self.try_admit(route, session, conn).await {
                Ok(Some(admitted)) => return Ok(admitted),
                Ok(None) => {}
                Err(e) => return Err(error_response(&e)),
            }
            let Some(released) = listening.take() else {
                listening = Some(self.load.released());
                continue;
            };
            let target = route
                .machine()
                .map_or_else(|| format!("app {}", route.app()), |m| format!("machine {m}"));
            if queued.is_none() {
                let key = (route.app().to_owned(), route.machine().unwrap_or("*").to_owned());
                queued = Some(self.metrics.enqueue(key, self.cfg.queue_limit).ok_or_else(|| {
                    over_capacity(format!(
                        "{target} is at its concurrency hard_limit and {} requests are already waiting: retry \
                         later, or raise services.concurrency.hard_limit or add machines",
                        self.cfg.queue_limit
                    ))
                })?);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(over_capacity(format!(
                    "{target} stayed at its concurrency hard_limit for {:?} while this request waited: retry \
                     later, or raise services.concurrency.hard_limit or add machines",
                    self.cfg.queue_timeout
                )));
            }
        }
    }

    /// `None` when every machine the request may go to is at its hard limit.
    async fn try_admit(
        &self,
        route: &Route,
        session: Option<&str>,
        conn: &ClientConn,
    ) -> Result<Option<Admitted>, Error> {
        let app = route.app();
        if let Some(name) = route.machine() {
            let target = self.target(self.machine(app, name).await?, conn.listen_port);
            if target.service.is_none() && route.port().is_none() {
                return Err(Error::NotFound(format!(
                    "machine {} has no services for proxy port {}: set config.services [{{\"internal_port\": …}}]",
                    target.machine.id, conn.listen_port
                )));
            }
            return Ok(self.try_take(target, conn));
        }
        if let Some(machine) = self.session_holder(app, session).await {
            return Ok(self.try_take(self.target(machine, conn.listen_port), conn));
        }
        let mut candidates: Vec<Target> = self
            .app_machines(app)
            .await?
            .iter()
            .map(|m| self.target(m.clone(), conn.listen_port))
            .filter(|t| t.state != MachineState::Destroyed && t.service.is_some())
            .collect();
        if candidates.is_empty() {
            return Err(Error::NotFound(format!(
                "app {app} has no machine with services for proxy port {}",
                conn.listen_port
            )));
        }
        let load = |t: &Target| self.load.of(&t.machine.id, count_of(t.service()));
        candidates.sort_by_cached_key(load);
        let (started, stopped): (Vec<_>, Vec<_>) =
            candidates.into_iter().partition(|t| t.state == MachineState::Started);
        let below_soft = |t: &Target| {
            let soft = t
                .service()
                .and_then(|s| s.concurrency.as_ref())
                .and_then(|c| c.soft_limit);
            soft.is_none_or(|soft| load(t) < soft as usize)
        };
        // A connection that already counts against a machine stays there.
        let held = |t: &Target| conn.holds.lock().expect("holds").contains_key(&t.machine.id);
        let order = started
            .iter()
            .filter(|t| held(t))
            .chain(started.iter().filter(|t| below_soft(t)))
            // Wake a stopped machine rather than load one past its soft limit.
            .chain(stopped.iter().filter(|t| t.service().is_some_and(|s| s.autostart)))
            .chain(started.iter());
        for target in order {
            if let Some(admitted) = self.try_take(target.clone(), conn) {
                return Ok(Some(admitted));
            }
        }
        if started.is_empty() {
            return Err(Error::Unavailable(format!(
                "app {app}'s machines are all stopped and none autostarts: start one, or set services \
                 autostart"
            )));
        }
        Ok(None)
    }

    async fn machine(&self, app: &str, name: &str) -> Result<Arc<Machine>, Error> {
        let key = (app.to_owned(), name.to_owned());
        let read = || async { self.mgr.get_machine(app, name).await.map(Arc::new) };
        self.views.machines.get_or_read(key, read).await
    }

    async fn app_machines(&self, app: &str) -> Result<Arc<[Arc<Machine>]>, Error> {
        let read = || async {
            let machines = self.mgr.list_machines(app, &[], &Default::default(), false).await?;
            Ok(machines.into_iter().map(Arc::new).collect())
        };
        self.views.apps.get_or_read(app.to_owned(), read).await
    }

    /// The machine with its state as of now, and its service for the
    /// proxy port.
    fn target(&self, machine: Arc<Machine>, listen_port: u16) -> Target {
        let state = self.mgr.live_state(&machine.id).unwrap_or(machine.state);
        let service = machine.config.services.iter().position(|s| s.takes(listen_port));
        Target {
            machine,
            state,
            service,
        }
    }

    /// Counts the request (and the connection, for connection limits)
    /// against the machine, unless that takes it past its hard limit.
    fn try_take(&self, target: Target, conn: &ClientConn) -> Option<Admitted> {
        let id = &target.machine.id;
        let limits = target.service().and_then(|s| s.concurrency.as_ref());
        let hard = limits.and_then(|c| c.hard_limit);
        let busy = match limits.map(|c| c.kind) {
            Some(ConcurrencyKind::Connections) => {
                let mut holds = conn.holds.lock().expect("holds");
                if !holds.contains_key(id) {
                    let held = self.load.try_begin(id, Count::Connection, hard)?;
                    holds.insert(id.clone(), held);
                }
                self.load.begin(id)
            }
            Some(ConcurrencyKind::Requests) => self.load.try_begin(id, Count::Request, hard)?,
            None => self.load.begin(id),
        };
        Some(Admitted { target, busy })
    }

    /// Sends one request to a machine's service (woken if need be) and
    /// passes its answer on.
    async fn exchange(
        &self,
        admitted: Admitted,
        conn: &ClientConn,
        port: Option<u16>,
        route_kind: RouteKind,
        req: Request<Body>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        let Admitted { target, busy } = admitted;
        let machine = &target.machine;
        let call = match self.call(&target, port, route_kind).await {
            Ok(call) => call,
            Err(resp) => return resp,
        };
        let sent = self
            .upstream
            .send(&conn.upstream, &machine.app, &machine.id, call.port, req)
            .await;
        let mut resp = match sent {
            Ok(resp) => {
                call.answered();
                resp
            }
            Err(e) => {
                call.failed();
                return error_response(&e);
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            // WebSocket and the like: relay both ways for as long as they last.
            let machine_upgrade = hyper::upgrade::on(&mut resp);
            let idle = self.cfg.stream_idle_timeout;
            tokio::spawn(async move {
                let _busy = busy;
                if let (Ok(client), Ok(machine)) = (client_upgrade.await, machine_upgrade.await) {
                    stream::tunnel(TokioIo::new(client), TokioIo::new(machine), idle).await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, Body::full(Bytes::new()));
        }
        self.learn_session(resp.headers(), machine);
        strip_hop_by_hop(resp.headers_mut(), false);
        let (parts, body) = resp.into_parts();
        let body = stream::Tracked::new(body, busy, self.cfg.stream_idle_timeout);
        Response::from_parts(parts, Body::Tracked(body))
    }

    /// Counts a request to the machine's service (or `port`), and wakes
    /// the machine if need be.
    async fn call(&self, target: &Target, port: Option<u16>, kind: RouteKind) -> Result<Call, Response<Body>> {
        let machine = &target.machine;
        let Some(port) = port.or(target.service().map(|s| s.internal_port)) else {
            return Err(self.no_service(&machine.id));
        };
        let call = Call {
            port,
            counters: self.metrics.machine(&machine.app, &machine.id),
            kind,
            arrived: (target.state != MachineState::Started).then(Instant::now),
            woke: false,
        };
        call.counters().request();
        match self.wake(target).await {
            Ok(woke) => Ok(Call { woke, ..call }),
            Err(e) => {
                call.failed();
                Err(error_response(&e))
            }
        }
    }

    /// Starts a stopped or suspended machine whose service autostarts;
    /// says whether this request started it.
    async fn wake(&self, target: &Target) -> Result<bool, Error> {
        let machine = &target.machine;
        if target.state == MachineState::Started {
            return Ok(false);
        }
        if !target.service().is_some_and(|s| s.autostart) {
            return Err(Error::Unavailable(format!(
                "machine {} is {} and its service does not autostart: start it first",
                machine.id, target.state
            )));
        }
        // Boxed: a start's future is large, and every request's would carry it.
        Ok(Box::pin(self.mgr.wake_machine(&machine.app, &machine.id, "proxy"))
            .await?
            .1)
    }

    fn no_route(&self, host: &str) -> Response<Body> {
        json_error(
            StatusCode::NOT_FOUND,
            "no_route",
            &format!(
                "no route for host {host:?}: use {{machine}}.{{app}}.{d}, {{port}}-{{machine}}.{{app}}.{d} or \
                 {{app}}.{d}",
                d = self.cfg.domain
            ),
        )
    }

    fn no_service(&self, machine: &str) -> Response<Body> {
        json_error(
            StatusCode::NOT_FOUND,
            "no_service",
            &format!("machine {machine} has no services: set config.services [{{\"internal_port\": …}}]"),
        )
    }

    /// The request's session, as `header:value` or `cookie=value`, from
    /// its fields (names in any case).
    fn session_of(&self, fields: &impl Fields) -> Option<String> {
        if let Some(session) = self.header_sessions(fields).next() {
            return Some(session);
        }
        if self.cfg.session_cookies.is_empty() {
            return None;
        }
        let cookies = fields
            .each()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='));
        for (name, value) in cookies {
            if self.cfg.session_cookies.iter().any(|c| c == name) {
                return Some(format!("{name}={value}"));
            }
        }
        None
    }

    /// `header:value` for each session header the fields carry, in the
    /// order the headers are configured.
    fn header_sessions<'a>(&'a self, fields: &'a impl Fields) -> impl Iterator<Item = String> + 'a {
        self.session_headers.iter().filter_map(move |name| {
            let value = fields
                .each()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())?;
            Some(format!("{name}:{value}"))
        })
    }

    /// Remembers the sessions an answer issues, from its fields.
    fn learn_session(&self, fields: &impl Fields, machine: &Machine) {
        let mut issued: Vec<String> = self.header_sessions(fields).collect();
        if !self.cfg.session_cookies.is_empty() {
            let set = fields
                .each()
                .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
                .filter_map(|(_, v)| std::str::from_utf8(v).ok())
                .filter_map(|v| v.split(';').next()?.trim().split_once('='));
            for (name, value) in set {
                if !value.is_empty() && self.cfg.session_cookies.iter().any(|c| c == name) {
                    issued.push(format!("{name}={value}"));
                }
            }
        }
        if issued.is_empty() {
            return;
        }
        let mut sessions = self.sessions.lock().expect("sessions");
        if sessions.len() + issued.len() > MAX_SESSIONS {
            sessions.clear();
        }
        for key in issued {
            sessions.insert(key, (machine.app.clone(), machine.id.clone()));
        }
    }

    /// The machine that issued the session, if it is the app's and still
    /// exists.
    async fn session_holder(&self, app: &str, session: Option<&str>) -> Option<Arc<Machine>> {
        let session = session?;
        let (holder_app, id) = self.sessions.lock().expect("sessions").get(session).cloned()?;
        if holder_app != app {
            return None;
        }
        match self.machine(app, &id).await {
            Ok(m) if self.mgr.live_state(&m.id).unwrap_or(m.state) != MachineState::Destroyed => Some(m),
            _ => {
                self.sessions.lock().expect("sessions").remove(session);
                None
            }
        }
    }
}

/// A head's fields, as hyper holds them or as the forwarding path does.
trait Fields {
    /// Names (compare them without case) and values.
    fn each(&self) -> impl Iterator<Item = (&str, &[u8])>;
}

impl Fields for HeaderMap {
    fn each(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.iter().map(|(name, value)| (name.as_str(), value.as_bytes()))
    }
}

impl Fields for wire::Fields {
    fn each(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.iter()
    }
}

/// Where a `hangar-replay` answer sends a request: `instance=ID` (a
/// machine of the same app) or `app=NAME` (any of that app's).
fn replay_route(from_app: &str, from_id: &str, replay: &str) -> Result<Route, Error> {
    if let Some(id) = replay_field(replay, "instance") {
        return Ok(Route::Machine {
            app: from_app.to_owned(),
            machine: id.to_owned(),
            port: None,
        });
    }
    if let Some(app) = replay_field(replay, "app") {
        return Ok(Route::App { app: app.to_owned() });
    }
    Err(Error::BadRequest(format!(
        "machine {from_id} answered hangar-replay {replay:?}: name instance=ID or app=NAME"
    )))
}
