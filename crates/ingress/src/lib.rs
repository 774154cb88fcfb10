//! The ingress proxy. A request's Host picks the machine:
//! `{machine}.{app}.{domain}` one machine, `{port}-{machine}.{app}.{domain}`
//! another of its ports, `{app}.{domain}` the least busy of the app's
//! machines. The proxy reaches the port from inside the machine's network
//! namespace (machines have no routable address), starts a stopped or
//! suspended machine first when its service says `autostart`, and stops
//! (or suspends) machines whose service says `autostop` once they have
//! been idle for their timeout.

mod route;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hangar_api::{Autostop, Machine, MachineService, MachineState, StopRequest};
use hangar_machine::{Error, Manager};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

pub use route::Route;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// How the proxy is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Hosts are `….{domain}`; `localhost` resolves to loopback everywhere.
    pub domain: String,
    /// How long a woken machine has to accept connections on its port.
    pub wake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            domain: "localhost".into(),
            wake_timeout: Duration::from_secs(30),
        }
    }
}

/// Traffic to one machine, for load balancing and autostop.
#[derive(Debug)]
struct Activity {
    /// Requests and upgraded connections in flight.
    active: usize,
    /// When the last one ended (or the machine was first seen idle).
    last: Instant,
}

#[derive(Debug)]
struct Ingress {
    mgr: Manager,
    cfg: Config,
    activity: Mutex<HashMap<String, Activity>>,
    metrics: Mutex<BTreeMap<MetricKey, Counters>>,
    /// MCP sessions: `Mcp-Session-Id` → the (app, machine) that issued it.
    /// An MCP server keeps a session's state in memory, so every request
    /// of the session must reach the machine that holds it.
    sessions: Mutex<HashMap<String, (String, String)>>,
}

/// (app, machine, route kind).
type MetricKey = (String, String, &'static str);

#[derive(Debug, Default)]
struct Counters {
    requests: u64,
    /// Answered by the proxy with a 5xx (the machine could not be reached).
    failures: u64,
    wakes: u64,
    /// Request to port accepting, summed over wakes.
    wake_seconds: f64,
}

/// The header MCP's streamable HTTP transport names sessions with.
const SESSION_HEADER: &str = "mcp-session-id";
/// Sessions remembered; beyond it the oldest knowledge is dropped whole.
const MAX_SESSIONS: usize = 100_000;

/// The proxy: serve it on a listener; read its metrics.
#[derive(Debug, Clone)]
pub struct Proxy {
    ing: Arc<Ingress>,
}

impl Proxy {
    pub fn new(mgr: Manager, cfg: Config) -> Proxy {
        Proxy {
            ing: Arc::new(Ingress {
                mgr,
                cfg,
                activity: Mutex::new(HashMap::new()),
                metrics: Mutex::new(BTreeMap::new()),
                sessions: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Serves the proxy on `listener`, and runs autostop, until the task ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        serve(self.ing, listener).await
    }

    /// Per machine and route kind: requests, failures, wakes and their
    /// latency, and requests in flight, in Prometheus's text format.
    pub fn metrics(&self) -> String {
        let metrics = self.ing.metrics.lock().expect("metrics");
        let activity = self.ing.activity.lock().expect("activity");
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for l in lines {
                out += &format!("{name}{l}\n");
            }
        };
        let each = |f: &dyn Fn(&Counters) -> String, with_route: bool| -> Vec<String> {
            let mut seen = std::collections::BTreeSet::new();
            metrics
                .iter()
                .filter(|((app, machine, _), _)| with_route || seen.insert((app.clone(), machine.clone())))
                .map(|((app, machine, route), c)| {
                    let labels = if with_route {
                        format!("{{app=\"{app}\",machine=\"{machine}\",route=\"{route}\"}}")
                    } else {
                        format!("{{app=\"{app}\",machine=\"{machine}\"}}")
                    };
                    format!("{labels} {}", f(c))
                })
                .collect()
        };
        family(
            "hangar_proxy_requests_total",
            "counter",
            "Requests the ingress proxy routed to a machine.",
            each(&|c| c.requests.to_string(), true),
        );
        family(
            "hangar_proxy_failures_total",
            "counter",
            "Requests the proxy answered itself with a 5xx: the machine could not be woken or reached.",
            each(&|c| c.failures.to_string(), true),
        );
        family(
            "hangar_proxy_wakes_total",
            "counter",
            "Starts (or resumes) of a stopped or suspended machine for a request.",
            each(&|c| c.wakes.to_string(), true),
        );
        family(
            "hangar_proxy_wake_seconds_sum",
            "counter",
            "Seconds from the request that started a machine to its port accepting, summed.",
            each(&|c| format!("{:.6}", c.wake_seconds), true),
        );
        let mut active: Vec<String> = Vec::new();
        for ((app, machine, _), _) in metrics.iter() {
            let line = format!(
                "{{app=\"{app}\",machine=\"{machine}\"}} {}",
                activity.get(machine).map_or(0, |a| a.active)
            );
            if !active.contains(&line) {
                active.push(line);
            }
        }
        family(
            "hangar_proxy_active",
            "gauge",
            "Requests and upgraded connections in flight to a machine.",
            active,
        );
        out
    }
}

async fn serve(ing: Arc<Ingress>, listener: tokio::net::TcpListener) {
    tokio::spawn(autostop_loop(ing.clone()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ing = ing.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let ing = ing.clone();
                async move { Ok::<_, Infallible>(ing.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// A machine's answer that sends the request on: `instance=ID` or
/// `app=NAME`, optionally `;state=…` passed to the target (as Fly's
/// `fly-replay`).
const REPLAY_HEADER: &str = "hangar-replay";
/// On a replayed request: `instance=ID[;state=…]` of the machine that
/// asked for the replay.
const REPLAY_SOURCE_HEADER: &str = "hangar-replay-src";
/// Requests are kept for a replay up to this size.
const REPLAY_BODY_LIMIT: usize = 1 << 20;

/// The body limit to keep a request for a replay with, if it is small
/// enough: a known length up to the limit, or no body at all.
fn small_body_len(parts: &hyper::http::request::Parts) -> Option<usize> {
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match length {
        Some(n) if n <= REPLAY_BODY_LIMIT => Some(REPLAY_BODY_LIMIT),
        Some(_) => None,
        None if parts.headers.contains_key(header::TRANSFER_ENCODING) => None,
        None => Some(REPLAY_BODY_LIMIT),
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

fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message, "code": code }).to_string();
    let mut resp = Response::new(full(Bytes::from(body)));
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
    json_error(status, code, &e.to_string())
}

impl Ingress {
    async fn handle(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host())
            .unwrap_or("")
            .to_owned();
        let Some(route) = Route::parse(&host, &self.cfg.domain) else {
            return json_error(
                StatusCode::NOT_FOUND,
                "no_route",
                &format!(
                    "no route for host {host:?}: use {{machine}}.{{app}}.{d}, {{port}}-{{machine}}.{{app}}.{d} \
                     or {{app}}.{d}",
                    d = self.cfg.domain
                ),
            );
        };
        let session = req
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let machine = match self.pick(&route, session.as_deref()).await {
            Ok(m) => m,
            Err(e) => return error_response(&e),
        };
        let client_upgrade = req
            .headers()
            .contains_key(header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .expect("a path is a valid URI");
        // A small request is kept, so that the machine can hand it on with
        // `hangar-replay`; a replayed one is not replayed again.
        let may_replay = client_upgrade.is_none() && !parts.headers.contains_key(REPLAY_SOURCE_HEADER);
        let (body, kept) = match may_replay.then(|| small_body_len(&parts)).flatten() {
            Some(limit) => match http_body_util::Limited::new(body, limit).collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    (full(bytes.clone()), Some(bytes))
                }
                Err(e) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        &format!("reading the body: {e}"),
                    );
                }
            },
            None => (body.map_err(Into::into).boxed_unsync(), None),
        };
        let copy = kept.map(|bytes| (clone_parts(&parts), bytes));
        let resp = self
            .exchange(
                &machine,
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
        let target = match self.replay_target(&machine, &replay).await {
            Ok(m) => m,
            Err(e) => return error_response(&e),
        };
        let mut source = format!("instance={}", machine.id);
        if let Some(state) = replay_field(&replay, "state") {
            source += &format!(";state={state}");
        }
        if let Ok(v) = HeaderValue::from_str(&source) {
            parts.headers.insert(REPLAY_SOURCE_HEADER, v);
        }
        self.exchange(&target, None, "replay", Request::from_parts(parts, full(bytes)), None)
            .await
    }

    /// Where a `hangar-replay` answer sends a request: `instance=ID` (a
    /// machine of the same app) or `app=NAME` (the least busy of that app's).
    async fn replay_target(&self, from: &Machine, replay: &str) -> Result<Machine, Error> {
        if let Some(id) = replay_field(replay, "instance") {
            return self.mgr.get_machine(&from.app, id).await;
        }
        if let Some(app) = replay_field(replay, "app") {
            return self.pick(&Route::App { app: app.to_owned() }, None).await;
        }
        Err(Error::BadRequest(format!(
            "machine {} answered hangar-replay {replay:?}: name instance=ID or app=NAME",
            from.id
        )))
    }

    /// Sends one request to a machine's service (woken if need be) and
    /// passes its answer on.
    async fn exchange(
        self: &Arc<Self>,
        machine: &Machine,
        port: Option<u16>,
        route_kind: &'static str,
        req: Request<Body>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        let service = machine.config.services.first().cloned();
        let Some(port) = port.or(service.as_ref().map(|s| s.internal_port)) else {
            return json_error(
                StatusCode::NOT_FOUND,
                "no_service",
                &format!(
                    "machine {} has no services: set config.services [{{\"internal_port\": …}}]",
                    machine.id
                ),
            );
        };
        let _busy = self.begin(&machine.id);
        let key: MetricKey = (machine.app.clone(), machine.id.clone(), route_kind);
        self.count(&key, |c| c.requests += 1);
        let arrived = Instant::now();
        let stream = match self.reach(machine, service.as_ref(), port).await {
            Ok((stream, woke)) => {
                if woke {
                    let took = arrived.elapsed().as_secs_f64();
                    self.count(&key, |c| {
                        c.wakes += 1;
                        c.wake_seconds += took;
                    });
                }
                stream
            }
            Err(e) => {
                self.count(&key, |c| c.failures += 1);
                return error_response(&e);
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(ok) => ok,
            Err(e) => return json_error(StatusCode::BAD_GATEWAY, "machine_unavailable", &e.to_string()),
        };
        tokio::spawn(conn.with_upgrades());
        let mut resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                return json_error(
                    StatusCode::BAD_GATEWAY,
                    "machine_unavailable",
                    &format!("machine {}: {e}", machine.id),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            // WebSocket and the like: relay both ways for as long as they last.
            let machine_upgrade = hyper::upgrade::on(&mut resp);
            let busy = self.begin(&machine.id);
            tokio::spawn(async move {
                let _busy = busy;
                if let (Ok(client), Ok(machine)) = (client_upgrade.await, machine_upgrade.await) {
                    let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(machine));
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, full(Bytes::new()));
        }
        if let Some(issued) = resp.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
            let mut sessions = self.sessions.lock().expect("sessions");
            if sessions.len() >= MAX_SESSIONS {
                sessions.clear();
            }
            sessions.insert(issued.to_owned(), (machine.app.clone(), machine.id.clone()));
        }
        let (parts, body) = resp.into_parts();
        let tracked = Tracked {
            inner: body,
            _busy: self.begin(&machine.id),
        };
        Response::from_parts(parts, tracked.boxed_unsync())
    }

    /// The machine a route names; for an app route, the machine that
    /// issued the request's MCP session, else the least busy of its started
    /// machines with services (a stopped one if none is).
    async fn pick(&self, route: &Route, session: Option<&str>) -> Result<Machine, Error> {
        let app = route.app();
        if let Some(name) = route.machine() {
            return self.mgr.get_machine(app, name).await;
        }
        let holder = session.and_then(|s| self.sessions.lock().expect("sessions").get(s).cloned());
        if let Some((session_app, id)) = holder
            && session_app == app
        {
            match self.mgr.get_machine(app, &id).await {
                Ok(m) if m.state != MachineState::Destroyed => return Ok(m),
                _ => {
                    self.sessions
                        .lock()
                        .expect("sessions")
                        .remove(session.unwrap_or_default());
                }
            }
        }
        let machines = self.mgr.list_machines(app, &[], &BTreeMap::new(), false).await?;
        let with_services = machines.into_iter().filter(|m| !m.config.services.is_empty());
        let activity = self.activity.lock().expect("activity");
        let load = |m: &Machine| activity.get(&m.id).map_or(0, |a| a.active);
        let (started, idle): (Vec<Machine>, Vec<Machine>) =
            with_services.partition(|m| m.state == MachineState::Started);
        if let Some(m) = started.into_iter().min_by_key(load) {
            return Ok(m);
        }
        idle.into_iter()
            .find(|m| m.config.services.iter().any(|s| s.autostart))
            .ok_or_else(|| Error::NotFound(format!("app {app} has no machine with services to route to")))
    }

    /// A connection to the machine's port: woken first if need be, and
    /// retried until the port accepts (a woken process takes a moment to
    /// listen). Says whether this request started the machine.
    async fn reach(
        &self,
        machine: &Machine,
        service: Option<&MachineService>,
        port: u16,
    ) -> Result<(tokio::net::TcpStream, bool), Error> {
        let mut woke = false;
        if machine.state != MachineState::Started {
            if !service.is_some_and(|s| s.autostart) {
                return Err(Error::Unavailable(format!(
                    "machine {} is {} and its service does not autostart: start it first",
                    machine.id, machine.state
                )));
            }
            woke = self.mgr.wake_machine(&machine.app, &machine.id, "proxy").await?.1;
        }
        let deadline = Instant::now() + self.cfg.wake_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.mgr.connect_port(&machine.app, &machine.id, port).await {
                Ok(s) => return Ok((s, woke)),
                Err(e @ (Error::BadRequest(_) | Error::NotFound(_))) => return Err(e),
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::Unavailable(format!(
                        "machine {} did not accept connections on port {port} within {:?}: {e}",
                        machine.id, self.cfg.wake_timeout
                    )));
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    fn count(&self, key: &MetricKey, f: impl FnOnce(&mut Counters)) {
        f(self.metrics.lock().expect("metrics").entry(key.clone()).or_default());
    }

    /// Marks traffic to a machine until the guard is dropped.
    fn begin(self: &Arc<Self>, id: &str) -> Busy {
        let mut activity = self.activity.lock().expect("activity");
        let a = activity.entry(id.to_owned()).or_insert(Activity {
            active: 0,
            last: Instant::now(),
        });
        a.active += 1;
        Busy {
            ing: self.clone(),
            id: id.to_owned(),
        }
    }
}

/// Traffic in flight to a machine.
struct Busy {
    ing: Arc<Ingress>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(a) = self.ing.activity.lock().expect("activity").get_mut(&self.id) {
            a.active = a.active.saturating_sub(1);
            a.last = Instant::now();
        }
    }
}

/// A response body on its way out; the machine counts as busy until it ends.
struct Tracked {
    inner: Incoming,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Once a second: stops (or suspends) machines whose service asks for it
/// and that have had no traffic for their idle timeout, never leaving
/// fewer of the app's machines running than `min_machines_running`, and
/// never a machine that said it is busy.
async fn autostop_loop(ing: Arc<Ingress>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(e) = autostop_once(&ing).await {
            tracing::warn!("autostop: {e}");
        }
    }
}

async fn autostop_once(ing: &Arc<Ingress>) -> Result<(), Error> {
    for app in ing.mgr.list_apps().await? {
        let machines = ing.mgr.list_machines(&app.name, &[], &BTreeMap::new(), false).await?;
        let mut running = machines
            .iter()
            .filter(|m| m.state == MachineState::Started && !m.config.services.is_empty())
            .count();
        for m in &machines {
            let Some(service) = m.config.services.first() else {
                continue;
            };
            if service.autostop == Autostop::Off || m.state != MachineState::Started {
                continue;
            }
            let idle_for = Duration::from_secs(service.idle_timeout_s.unwrap_or(300));
            let idle = {
                let mut activity = ing.activity.lock().expect("activity");
                let a = activity.entry(m.id.clone()).or_insert(Activity {
                    active: 0,
                    last: Instant::now(),
                });
                a.active == 0 && a.last.elapsed() >= idle_for
            };
            if !idle
                || running <= service.min_machines_running as usize
                || ing.mgr.machine_is_busy(&app.name, &m.id).await?
            {
                continue;
            }
            let result = match service.autostop {
                Autostop::Suspend => ing.mgr.suspend_machine(&app.name, &m.id).await,
                _ => ing.mgr.stop_machine(&app.name, &m.id, StopRequest::default()).await,
            };
            match result {
                Ok(_) => {
                    tracing::info!(machine = %m.id, "autostop: idle for {idle_for:?}");
                    running -= 1;
                }
                Err(e) => tracing::warn!(machine = %m.id, "autostop: {e}"),
            }
        }
    }
    Ok(())
}
