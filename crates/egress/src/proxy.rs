//! The proxy a machine talks to: plain HTTP in absolute form, and CONNECT,
//! whose TLS the gateway terminates (with a certificate from its CA) so it
//! can apply the same checks and substitutions to HTTPS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use hangar_api::egress::{EgressOutcome, SecretPlacement};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::audit::{Record, now_ms};
use crate::secrets::{Refusal, Substitution};
use crate::upstream::{Key, Upstream};
use crate::{Body, BoxError, Gateway, Rules};

/// Request bodies are read whole (to swap or find placeholders in them)
/// up to this size, for machines that hold secrets.
const BODY_SCAN_LIMIT: usize = 8 << 20;

type Cell = Arc<RwLock<Arc<Rules>>>;

fn current(cell: &Cell) -> Arc<Rules> {
    cell.read().expect("rules").clone()
}

/// Where a machine's connections arrive: inside its network namespace, or
/// on a unix socket its init relays to.
pub(crate) enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Lets a log line through at most once a second. Machines decide how
/// often what these lines report happens, and the gateway's log is a file
/// on the host: it must not grow at their pace. (The audit log has every
/// request.)
struct OncePerSecond(std::sync::atomic::AtomicU64);

impl OncePerSecond {
    const fn new() -> OncePerSecond {
        OncePerSecond(std::sync::atomic::AtomicU64::new(0))
    }

    fn allow(&self) -> bool {
        let second = now_ms() as u64 / 1000;
        self.0.swap(second, std::sync::atomic::Ordering::Relaxed) != second
    }
}

static ACCEPT_ERRORS: OncePerSecond = OncePerSecond::new();
static EXFILTRATION: OncePerSecond = OncePerSecond::new();

/// Accepts the machine's connections until the machine is unregistered.
pub(crate) async fn serve(gw: Arc<Gateway>, listener: Listener, cell: Cell) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                if ACCEPT_ERRORS.allow() {
                    tracing::warn!("accepting a machine's connection: {e}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let (gw, cell) = (gw.clone(), cell.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(gw.clone(), cell.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// Where a request goes.
#[derive(Debug, Clone)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
}

impl Target {
    fn of(authority: &hyper::http::uri::Authority, tls: bool, default_port: u16) -> Target {
        Target {
            tls,
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(default_port),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

async fn handle(gw: Arc<Gateway>, cell: Cell, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::CONNECT {
        return Ok(connect(gw, cell, req).await);
    }
    let uri = req.uri();
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Ok(json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "this is the machine's egress proxy: send requests with an absolute URL (set HTTP_PROXY), \
             or CONNECT for HTTPS",
        ));
    };
    let tls = match scheme {
        "http" => false,
        "https" => true,
        other => {
            return Ok(json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("the egress proxy speaks http and https, not {other}"),
            ));
        }
    };
    let mut target = Target::of(authority, tls, if tls { 443 } else { 80 });
    let rules = current(&cell);
    if !req.headers().contains_key(crate::tokenizer::HEADER) {
        return Ok(forward(&gw, &rules, &target, req, Vec::new()).await);
    }
    // Fly tokenizer's shape: plain HTTP to the proxy, HTTPS to the upstream
    // (port 80 becomes 443, any other keeps its number).
    let start = Instant::now();
    let rec = record(&rules, req.method().as_str(), &target, req.uri().path());
    if tls || authority.port_u16() == Some(443) {
        let r = Refused::failed(
            StatusCode::BAD_REQUEST,
            "with Proxy-Tokenizer, send the request as http://host/ (the gateway uses HTTPS upstream)".into(),
        );
        return Ok(refuse(&gw, rec, start, r));
    }
    let host_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(authority.as_str())
        .to_owned();
    let (mut parts, body) = req.into_parts();
    match crate::tokenizer::apply(&gw.seal_key, &mut parts.headers, &host_header) {
        Ok(labels) => {
            target.tls = true;
            if target.port == 80 {
                target.port = 443;
            }
            Ok(forward(&gw, &rules, &target, Request::from_parts(parts, body), labels).await)
        }
        Err(e) => Ok(refuse(&gw, rec, start, Refused::denied(e.reason).with_status(e.status))),
    }
}

/// Why the gateway answers a request itself.
struct Refused {
    status: StatusCode,
    outcome: EgressOutcome,
    reason: String,
    secret: Option<String>,
}

impl Refused {
    fn denied(reason: String) -> Refused {
        Refused {
            status: StatusCode::FORBIDDEN,
            outcome: EgressOutcome::Denied,
            reason,
            secret: None,
        }
    }

    fn with_status(self, status: StatusCode) -> Refused {
        Refused { status, ..self }
    }

    fn failed(status: StatusCode, reason: String) -> Refused {
        Refused {
            status,
            outcome: EgressOutcome::Allowed,
            reason,
            secret: None,
        }
    }
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Refused {
        match r {
            Refusal::Exfiltration { secret, reason } => Refused {
                status: StatusCode::FORBIDDEN,
                outcome: EgressOutcome::Exfiltration,
                reason,
                secret,
            },
            Refusal::Placement { secret, reason } => Refused {
                status: StatusCode::FORBIDDEN,
                outcome: EgressOutcome::Denied,
                reason,
                secret: Some(secret),
            },
        }
    }
}

/// The policy's verdict on a destination: the rule that allows it and the
/// address to connect to.
async fn approve(gw: &Gateway, rules: &Rules, target: &Target) -> Result<(String, SocketAddr), Refused> {
    let Some(rule) = rules.policy.allowing(&target.host, target.port) else {
        return Err(Refused::denied(format!(
            "egress to {}:{} is denied: no rule of the egress policy allows it (deny by default). \
             Allow it with PUT /v1/apps/{}/egress-policy",
            target.host, target.port, rules.app
        )));
    };
    let ips = gw
        .upstream
        .resolve(&target.host)
        .await
        .map_err(|e| Refused::failed(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let mut why = None;
    for ip in ips.iter() {
        let addr = SocketAddr::new(*ip, target.port);
        if gw.is_denied(addr) {
            why.get_or_insert_with(|| {
                format!("{addr} is the Hangar daemon's own address, never reachable from machines")
            });
        } else if hangar_api::egress::is_internal(*ip)
            && !rules.policy.names_address(*ip, target.port)
            && !gw.upstream.is_operator_name(&target.host)
        {
            why.get_or_insert_with(|| {
                format!(
                    "{} resolves to {ip}, an internal (loopback, private or link-local) address; rule {rule:?} \
                     allows the name but not the address: add \"{}\" to the policy to allow it",
                    target.host,
                    if ip.is_ipv6() {
                        format!("[{ip}]:{}", target.port)
                    } else {
                        format!("{ip}:{}", target.port)
                    }
                )
            });
        } else {
            return Ok((rule.to_owned(), addr));
        }
    }
    Err(Refused::denied(
        why.unwrap_or_else(|| format!("{} has no addresses", target.host)),
    ))
}

fn record(rules: &Rules, method: &str, target: &Target, path: &str) -> Record {
    Record {
        at_ms: now_ms(),
        machine_id: rules.machine_id.clone(),
        app: rules.app.clone(),
        method: method.to_owned(),
        scheme: target.scheme(),
        host: target.host.clone(),
        port: target.port,
        path: path.to_owned(),
        status: 0,
        outcome: EgressOutcome::Allowed,
        reason: None,
        rule: None,
        secrets: Vec::new(),
        bytes_sent: 0,
        bytes_received: 0,
        duration_us: 0,
    }
}

/// Answers a refused or failed request, and logs it.
fn refuse(gw: &Gateway, mut rec: Record, start: Instant, r: Refused) -> Response<Body> {
    let code = match r.outcome {
        EgressOutcome::Exfiltration => "egress_exfiltration",
        EgressOutcome::Denied => "egress_denied",
        EgressOutcome::Allowed => "egress_upstream_failed",
    };
    if r.outcome == EgressOutcome::Exfiltration && EXFILTRATION.allow() {
        tracing::warn!(machine = %rec.machine_id, host = %rec.host, "exfiltration attempt refused: {}", r.reason);
    }
    rec.status = r.status.as_u16();
    rec.outcome = r.outcome;
    rec.secrets.extend(r.secret);
    rec.duration_us = start.elapsed().as_micros() as u64;
    let response = json_error(r.status, code, &r.reason);
    rec.reason = Some(r.reason);
    gw.audit.record(rec);
    response
}

pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = hangar_api::ErrorBody::new(code, message).to_json();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Headers that belong to one hop, not to the request or response.
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Sends one request upstream, with the policy checked and placeholders
/// swapped, and streams the answer back. `injected` names secrets already
/// put in (tokenizer's), for the audit log.
async fn forward(
    gw: &Arc<Gateway>,
    rules: &Rules,
    target: &Target,
    req: Request<Incoming>,
    injected: Vec<String>,
) -> Response<Body> {
    let start = Instant::now();
    let mut rec = record(rules, req.method().as_str(), target, req.uri().path());
    let (rule, addr) = match approve(gw, rules, target).await {
        Ok(ok) => ok,
        Err(r) => return refuse(gw, rec, start, r),
    };
    rec.rule = Some(rule);
    let (mut parts, body) = req.into_parts();
    let mut sub = Substitution::new(&rules.secrets, &target.host, target.port);
    let prepared = prepare(&mut sub, &mut parts, body).await;
    rec.secrets = sub.used.iter().cloned().chain(injected).collect();
    let (body, sent, caught) = match prepared {
        Ok(ok) => ok,
        Err(r) => return refuse(gw, rec, start, r),
    };
    if !parts.headers.contains_key(header::HOST) {
        let host = match (target.tls, target.port) {
            (false, 80) | (true, 443) => target.host.clone(),
            (_, port) => format!("{}:{port}", target.host),
        };
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let key = Key {
        tls: target.tls,
        host: target.host.clone(),
        addr,
    };
    let mut sender = match gw.upstream.checkout(&key).await {
        Ok(s) => s,
        Err(e) => return refuse(gw, rec, start, Refused::failed(StatusCode::BAD_GATEWAY, e.to_string())),
    };
    let response = sender.send_request(Request::from_parts(parts, body)).await;
    let response = match response {
        Ok(r) => r,
        Err(_) if caught.load(Ordering::Relaxed) => {
            let reason = format!(
                "a secret placeholder in a request body over {} MiB (streamed, so nothing can be swapped \
                 in): the request was cut off",
                BODY_SCAN_LIMIT >> 20
            );
            return refuse(gw, rec, start, Refused::denied(reason));
        }
        Err(e) => {
            return refuse(
                gw,
                rec,
                start,
                Refused::failed(StatusCode::BAD_GATEWAY, format!("{}: {e}", target.host)),
            );
        }
    };
    let (mut rparts, rbody) = response.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    rec.status = rparts.status.as_u16();
    let mut redactor = rules.secrets.redactor(&sub.used);
    if let Some(r) = &mut redactor {
        // The body's length may change; it goes out chunked instead.
        rparts.headers.remove(header::CONTENT_LENGTH);
        for value in rparts.headers.values_mut() {
            let redacted = r.redact(value.as_bytes());
            if redacted != value.as_bytes()
                && let Ok(v) = HeaderValue::from_bytes(&redacted)
            {
                *value = v;
            }
        }
    }
    let metered = Metered {
        inner: rbody,
        redactor,
        received: 0,
        finish: Some(Finish {
            gw: gw.clone(),
            rec,
            start,
            sent,
            conn: Some((key, sender)),
        }),
    };
    Response::from_parts(rparts, metered.boxed_unsync())
}

/// Checks and rewrites the URL, headers and body of a request. Returns the
/// body to send, a counter of the bytes sent, and a flag raised if a
/// streamed body was cut off for carrying a placeholder.
async fn prepare(
    sub: &mut Substitution<'_>,
    parts: &mut hyper::http::request::Parts,
    mut body: Incoming,
) -> Result<(Body, Arc<AtomicU64>, Arc<AtomicBool>), Refused> {
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    let path_and_query = match sub.rewrite(path_and_query.as_bytes(), SecretPlacement::Url)? {
        Some(v) => {
            String::from_utf8(v).map_err(|_| Refused::denied("a secret's value is not valid in a URL".into()))?
        }
        None => path_and_query,
    };
    parts.uri = path_and_query
        .parse()
        .map_err(|e| Refused::denied(format!("the URL with the secret swapped in is not valid: {e}")))?;

    strip_hop_by_hop(&mut parts.headers);
    for (name, value) in parts.headers.iter_mut() {
        if let Some(v) = sub.rewrite_header(name.as_str(), value.as_bytes())? {
            let mut v = HeaderValue::from_bytes(&v)
                .map_err(|_| Refused::denied(format!("a secret's value is not valid in header {name}")))?;
            v.set_sensitive(true);
            *value = v;
        }
    }
    for (name, value) in sub.injections() {
        let (Ok(name), Ok(mut value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&value))
        else {
            continue;
        };
        value.set_sensitive(true);
        parts.headers.entry(name).or_insert(value);
    }

    let sent = Arc::new(AtomicU64::new(0));
    if !sub.has_secrets() {
        let counter = sent.clone();
        let body = body
            .map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                f
            })
            .map_err(BoxError::from)
            .boxed_unsync();
        return Ok((body, sent, Arc::default()));
    }
    // A machine with secrets: read the body whole (up to a limit) so a
    // placeholder can be swapped in (where allowed) or caught (where not)
    // before anything is sent.
    let mut head = Vec::new();
    let complete = loop {
        match body.frame().await {
            None => break true,
            Some(Err(e)) => {
                return Err(Refused::failed(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {e}"),
                ));
            }
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    head.extend_from_slice(d);
                }
                if head.len() > BODY_SCAN_LIMIT {
                    break false;
                }
            }
        }
    };
    if complete {
        let bytes = match sub.rewrite(&head, SecretPlacement::Body)? {
            Some(v) => {
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(v.len()));
                v
            }
            None => head,
        };
        sent.store(bytes.len() as u64, Ordering::Relaxed);
        return Ok((full(bytes), sent, Arc::default()));
    }
    // Too large to hold: stream it on, cut off where a placeholder shows
    // (a value can't be swapped into a stream of known length).
    if crate::secrets::has_placeholder(&head) {
        return Err(Refused::denied(format!(
            "a secret placeholder in a request body over {} MiB: secrets are swapped into bodies \
             only up to that size",
            BODY_SCAN_LIMIT >> 20
        )));
    }
    sent.store(head.len() as u64, Ordering::Relaxed);
    let caught = Arc::new(AtomicBool::new(false));
    let keep = hangar_api::egress::PLACEHOLDER_LEN - 1;
    let mut tail = head[head.len() - keep..].to_vec();
    let (counter, flag) = (sent.clone(), caught.clone());
    let rest = http_body_util::BodyStream::new(body).map(move |frame| {
        let frame = frame.map_err(BoxError::from)?;
        if let Some(d) = frame.data_ref() {
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(d);
            if crate::secrets::has_placeholder(&window) {
                flag.store(true, Ordering::Relaxed);
                return Err(BoxError::from("a secret placeholder in a streamed request body"));
            }
            tail = window[window.len().saturating_sub(keep)..].to_vec();
            counter.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Ok(frame)
    });
    let stream = futures_util::stream::once(async move { Ok(Frame::data(Bytes::from(head))) }).chain(rest);
    Ok((http_body_util::StreamBody::new(stream).boxed_unsync(), sent, caught))
}

/// What to do when a response has been passed on: log the request and,
/// if the response was read to its end, keep the connection.
struct Finish {
    gw: Arc<Gateway>,
    rec: Record,
    start: Instant,
    sent: Arc<AtomicU64>,
    conn: Option<(Key, SendRequest<Body>)>,
}

/// A response body on its way to the machine, counted, and redacted
/// when the request used secrets.
struct Metered {
    inner: Incoming,
    redactor: Option<crate::secrets::Redactor>,
    received: u64,
    finish: Option<Finish>,
}

impl Metered {
    fn finish(&mut self, complete: bool) {
        let Some(mut f) = self.finish.take() else { return };
        f.rec.bytes_received = self.received;
        f.rec.bytes_sent = f.sent.load(Ordering::Relaxed);
        f.rec.duration_us = f.start.elapsed().as_micros() as u64;
        if !complete {
            f.rec.reason = Some("the response was cut short".into());
        }
        f.gw.audit.record(f.rec);
        if complete && let Some((key, sender)) = f.conn.take() {
            f.gw.upstream.checkin(key, sender);
        }
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(p) => p,
        };
        match polled {
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        self.received += data.len() as u64;
                        match &mut self.redactor {
                            Some(r) => Frame::data(Bytes::from(r.feed(&data))),
                            None => Frame::data(data),
                        }
                    }
                    Err(other) => other,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                self.finish(true);
                // What the redactor held back (then, polled again, the end).
                match self.redactor.as_mut().map(|r| r.finish()).filter(|t| !t.is_empty()) {
                    Some(tail) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail))))),
                    None => Poll::Ready(None),
                }
            }
            Some(Err(e)) => {
                self.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.redactor.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.redactor {
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let complete = hyper::body::Body::is_end_stream(&self.inner);
        self.finish(complete);
    }
}

/// CONNECT: checks the destination, then either terminates TLS and proxies
/// the requests inside, or (for anything but TLS) relays bytes.
async fn connect(gw: Arc<Gateway>, cell: Cell, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let Some(authority) = req.uri().authority().cloned() else {
        return json_error(StatusCode::BAD_REQUEST, "bad_request", "CONNECT needs host:port");
    };
    let target = Target::of(&authority, true, 443);
    let rules = current(&cell);
    let rec = record(&rules, "CONNECT", &target, "");
    let addr = match approve(&gw, &rules, &target).await {
        Ok((_, addr)) => addr,
        Err(r) => return refuse(&gw, rec, start, r),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                if let Err(e) = tunnel(gw, cell, target, addr, rec, TokioIo::new(upgraded)).await {
                    tracing::debug!("tunnel ended: {e}");
                }
            }
            Err(e) => tracing::debug!("CONNECT upgrade failed: {e}"),
        }
    });
    Response::new(full(Bytes::new()))
}

async fn tunnel(
    gw: Arc<Gateway>,
    cell: Cell,
    target: Target,
    addr: SocketAddr,
    mut rec: Record,
    mut io: TokioIo<hyper::upgrade::Upgraded>,
) -> anyhow::Result<()> {
    let mut first = [0u8; 1];
    if io.read(&mut first).await? == 0 {
        return Ok(());
    }
    let io = Prefixed {
        prefix: Some(first[0]),
        inner: io,
    };
    // 0x16: a TLS handshake record, which is how every TLS client starts.
    if first[0] == 0x16 {
        let config = gw.ca.server_config(&target.host)?;
        let tls = tokio_rustls::TlsAcceptor::from(config).accept(io).await?;
        let service = hyper::service::service_fn(move |req| {
            let (gw, cell, target) = (gw.clone(), cell.clone(), target.clone());
            async move { Ok::<_, Infallible>(forward(&gw, &current(&cell), &target, req, Vec::new()).await) }
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades()
            .await?;
        return Ok(());
    }
    // Not TLS: relay the bytes as they are (nothing to swap in).
    let start = Instant::now();
    rec.scheme = "tcp";
    let result = async {
        let mut upstream = Upstream::connect_tcp(addr).await?;
        let mut io = io;
        Ok::<_, anyhow::Error>(tokio::io::copy_bidirectional(&mut io, &mut upstream).await?)
    }
    .await;
    match &result {
        Ok((sent, received)) => {
            rec.bytes_sent = *sent;
            rec.bytes_received = *received;
            rec.status = 200;
        }
        Err(e) => {
            rec.status = 502;
            rec.reason = Some(e.to_string());
        }
    }
    rec.duration_us = start.elapsed().as_micros() as u64;
    gw.audit.record(rec);
    result.map(drop)
}

/// A stream with one byte already read from it put back in front.
struct Prefixed<T> {
    prefix: Option<u8>,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(b) = self.prefix.take() {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
