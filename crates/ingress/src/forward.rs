//! The forwarding path for HTTP/1.1, which nearly all requests take. One
//! task per client connection reads a request's head, routes it, writes it
//! to a connection to the machine's port, and relays the answer, its body
//! as it came (chunks and all). No second task, channel, header map or
//! body re-encoding per request: hyper's two dispatchers per request cost
//! a fifth of the throughput nginx has (docs/benchmarks.md).
//!
//! A connection whose request this path does not take (HTTP/2's preface,
//! HTTP/1.0, a target that is not a path) goes to hyper from that request
//! on, with what has been read so far.

use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hangar_machine::Error;
use hyper::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::body::Body;
use crate::load::Busy;
use crate::metrics::RouteKind;
use crate::upstream::{Pooled, Wire};
use crate::wire::{self, Framing, RequestHead, ResponseHead, WireError};
use crate::{
    Admitted, ClientConn, Ingress, REPLAY_BODY_LIMIT, REPLAY_HEADER, REPLAY_SOURCE_HEADER, Route, error_response,
    json_error, replay_field, replay_route,
};

/// Reads are at least this large.
const READ_SIZE: usize = 8 * 1024;
/// A request's head must arrive whole within this, once it has begun.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A client's connection on this path.
struct Client {
    stream: TcpStream,
    /// What has been read from it and not yet taken.
    buf: BytesMut,
    /// Connections to machines its requests used, for its next ones.
    held: Vec<Wire>,
}

/// A request on its way to a machine.
struct Outgoing {
    /// Its head as the machine gets it.
    head: Bytes,
    body: Payload,
    idempotent: bool,
    /// A HEAD request: its answer has no body, whatever its fields say.
    to_head: bool,
    upgrade: bool,
}

enum Payload {
    /// Read whole already: can be sent again.
    Whole(Bytes),
    /// Still to come from the client, framed so.
    Streamed(Framing),
}

/// A machine's answer, its body still to relay.
struct Answer {
    head: ResponseHead,
    wire: Wire,
    /// Counts the request against the machine until its answer is sent.
    busy: Busy,
    machine: Arc<hangar_api::Machine>,
    /// The request's body went out whole; if not, neither connection can
    /// carry another request.
    sent_whole: bool,
}

/// Why an exchange with a machine failed.
enum Failed {
    /// The machine's side closed before any answer came. On a kept-alive
    /// connection that means its server closed it while idle, and an
    /// idempotent request may go again on a new one.
    Silent(String),
    /// The machine, or the way to it.
    Machine(String),
    /// The client: a body that broke off or was malformed.
    Client(String),
}

/// Which side a relay failed on.
enum RelayError {
    Source(String),
    Destination(String),
}

/// Serves a client connection until it closes.
pub(crate) async fn serve(ing: Arc<Ingress>, conn: Arc<ClientConn>, stream: TcpStream) {
    let mut client = Client {
        stream,
        buf: BytesMut::with_capacity(READ_SIZE),
        held: Vec::new(),
    };
    let idle = ing.cfg.stream_idle_timeout;
    loop {
        let head = match client.next_head(idle).await {
            Ok(Some(head)) if takes(&head) => head,
            Ok(Some(head)) => {
                let mut read = BytesMut::from(&head.fields.bytes()[..]);
                read.extend_from_slice(&client.buf);
                hand_off(ing, conn, client, read.freeze()).await;
                return;
            }
            Ok(None) => break,
            Err(WireError::Version) => {
                let read = std::mem::take(&mut client.buf).freeze();
                hand_off(ing, conn, client, read).await;
                return;
            }
            Err(e) => {
                let status = match e {
                    WireError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                let message = format!("{e}: send an HTTP/1.1 request (RFC 9112)");
                client.answer(json_error(status, "bad_request", &message), true).await;
                break;
            }
        };
        if !ing.forward(&conn, &mut client, head).await {
            break;
        }
    }
    for wire in client.held {
        ing.upstream.wires.put(wire);
    }
}

/// Whether this path takes the request: HTTP/1.1 in origin form (a path),
/// and not CONNECT.
fn takes(head: &RequestHead) -> bool {
    head.minor == 1 && head.target().starts_with('/') && head.method() != "CONNECT"
}

/// Serves the rest of the connection with hyper, starting with `read`.
async fn hand_off(ing: Arc<Ingress>, conn: Arc<ClientConn>, client: Client, read: Bytes) {
    for wire in client.held {
        ing.upstream.wires.put(wire);
    }
    let io = Prefixed {
        read,
        stream: client.stream,
    };
    crate::serve_hyper(ing, conn, io).await;
}

impl Client {
    /// The next request's head; `None` if the client closed the
    /// connection between requests.
    async fn next_head(&mut self, idle: Duration) -> Result<Option<RequestHead>, WireError> {
        loop {
            if let Some(head) = wire::parse_request(&mut self.buf)? {
                return Ok(Some(head));
            }
            let wait = if self.buf.is_empty() { idle } else { HEAD_TIMEOUT };
            match fill(&mut self.stream, &mut self.buf, wait).await {
                Ok(0) | Err(_) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(WireError::Invalid("the connection closed in a request's head".into())),
                Err(e) => return Err(WireError::Invalid(format!("reading a request's head: {e}"))),
                Ok(_) => {}
            }
        }
    }

    /// Sends one of the proxy's own answers; says whether the connection
    /// can carry another request (not if `close`).
    async fn answer(&mut self, resp: Response<Body>, close: bool) -> bool {
        let out = encode(resp, close);
        self.stream.write_all(&out).await.is_ok() && !close
    }

    /// Reads a body of `n` bytes whole.
    async fn read_body(&mut self, n: usize, idle: Duration) -> io::Result<Bytes> {
        self.buf.reserve(n.saturating_sub(self.buf.len()));
        while self.buf.len() < n {
            if fill(&mut self.stream, &mut self.buf, idle).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    fn take_held(&mut self, id: &str, port: u16) -> Option<Wire> {
        let i = self.held.iter().position(|w| w.is(id, port))?;
        let wire = self.held.swap_remove(i);
        (!wire.is_closed()).then_some(wire)
    }
}

impl Ingress {
    /// Forwards one request and relays its answer; says whether the
    /// client's connection can carry another.
    async fn forward(&self, conn: &ClientConn, client: &mut Client, head: RequestHead) -> bool {
        let idle = self.cfg.stream_idle_timeout;
        let framing = match wire::request_framing(&head.fields) {
            Ok(f) => f,
            Err(e) => {
                return client
                    .answer(json_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()), true)
                    .await;
            }
        };
        // The client asked to close after this answer; and until the body
        // has been read, an answer must close the connection too, or the
        // body's bytes would be taken for a request.
        let close = head.fields.lists("connection", "close");
        let closing = close || framing != Framing::Empty;
        let host = {
            let mut hosts = head.fields.all("host");
            (hosts.next().map(std::str::from_utf8), hosts.next())
        };
        let host = match host {
            (Some(Ok(host)), None) => host,
            _ => {
                let message = "a request needs exactly one Host field, of text: {machine}.{app}.DOMAIN";
                return client
                    .answer(json_error(StatusCode::BAD_REQUEST, "bad_request", message), true)
                    .await;
            }
        };
        let Some(route) = Route::parse(host, &self.cfg.domain) else {
            return client.answer(self.no_route(host), closing).await;
        };
        let session = self.session_of(&head.fields);
        let admitted = match self.admit(&route, session.as_deref(), conn).await {
            Ok(a) => a,
            Err(resp) => return client.answer(resp, closing).await,
        };
        let upgrade = head.fields.has("upgrade");
        let expects_continue = head.fields.lists("expect", "100-continue");
        let body = match framing {
            Framing::Empty => Payload::Whole(Bytes::new()),
            // Kept whole, for a replay; a client that waits for 100
            // Continue sends it only once the machine asks.
            Framing::Length(n) if n <= REPLAY_BODY_LIMIT as u64 && !expects_continue => {
                match client.read_body(n as usize, idle).await {
                    Ok(body) => Payload::Whole(body),
                    Err(_) => return false,
                }
            }
            framing => Payload::Streamed(framing),
        };
        let may_replay =
            matches!(body, Payload::Whole(_)) && !upgrade && !head.fields.has(REPLAY_SOURCE_HEADER.as_str());
        let req = Outgoing {
            head: self.request_head(&head, conn, upgrade).freeze(),
            body,
            idempotent: head.idempotent(),
            to_head: head.method() == "HEAD",
            upgrade,
        };
        drop(head);
        let closing = close || matches!(req.body, Payload::Streamed(_));
        let answer = match self
            .call_machine(admitted, route.port(), route.kind(), &req, client)
            .await
        {
            Ok(a) => a,
            Err(resp) => return client.answer(resp, closing).await,
        };
        let replay = answer
            .head
            .fields
            .get(REPLAY_HEADER.as_str())
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned);
        let answer = match replay {
            None => answer,
            Some(replay) if may_replay => match Box::pin(self.replay(answer, &replay, conn, client, &req)).await {
                Ok(a) => a,
                Err(resp) => return client.answer(resp, close).await,
            },
            Some(_) => {
                let message = "the machine asked for a replay, but the request can't be replayed (a body over 1 MiB, \
                               an upgrade, or a replay already)";
                return client
                    .answer(json_error(StatusCode::BAD_GATEWAY, "replay_refused", message), closing)
                    .await;
            }
        };
        self.deliver(answer, client, &req, close).await
    }

    /// Sends the request to the machine `replay` names, as the first one's
    /// answer asked.
    async fn replay(
        &self,
        first: Answer,
        replay: &str,
        conn: &ClientConn,
        client: &mut Client,
        req: &Outgoing,
    ) -> Result<Answer, Response<Body>> {
        let from = first.machine.clone();
        // Its body is not wanted: its connection goes rather than be drained.
        drop(first);
        let target = replay_route(&from.app, &from.id, replay).map_err(|e| error_response(&e))?;
        let admitted = self.admit(&target, None, conn).await?;
        let mut source = format!("instance={}", from.id);
        if let Some(state) = replay_field(replay, "state") {
            source += &format!(";state={state}");
        }
        // The head with one more field, before its final empty line.
        let mut head = BytesMut::from(&req.head[..req.head.len() - 2]);
        wire::put_field(&mut head, REPLAY_SOURCE_HEADER.as_str(), source.as_bytes());
        head.put_slice(b"\r\n");
        let Payload::Whole(body) = &req.body else {
            unreachable!("only whole requests are replayed")
        };
        let again = Outgoing {
            head: head.freeze(),
            body: Payload::Whole(body.clone()),
            ..*req
        };
        self.call_machine(admitted, None, RouteKind::Replay, &again, client)
            .await
    }

    /// The request's head for the machine: its own fields but for the
    /// hop-by-hop ones, and the `X-Forwarded-*` ones.
    fn request_head(&self, head: &RequestHead, conn: &ClientConn, upgrade: bool) -> BytesMut {
        let mut out = BytesMut::with_capacity(head.fields.bytes().len() + 128);
        out.put_slice(head.method().as_bytes());
        out.put_u8(b' ');
        out.put_slice(head.target().as_bytes());
        out.put_slice(b" HTTP/1.1\r\n");
        wire::put_fields(&mut out, &head.fields, |name| {
            name.eq_ignore_ascii_case("x-forwarded-host") || name.eq_ignore_ascii_case("x-forwarded-proto")
        });
        if let Some(host) = head.fields.get("host") {
            wire::put_field(&mut out, "x-forwarded-host", host);
        }
        if let Some(peer) = &conn.forwarded_for {
            wire::put_field(&mut out, "x-forwarded-for", peer.as_bytes());
        }
        wire::put_field(&mut out, "x-forwarded-proto", b"http");
        // Trailers pass as they are: the client's wish for them holds for
        // the machine too.
        if head.fields.lists("te", "trailers") {
            wire::put_field(&mut out, "te", b"trailers");
        }
        if upgrade {
            for value in head.fields.all("upgrade") {
                wire::put_field(&mut out, "upgrade", value);
            }
            wire::put_field(&mut out, "connection", b"upgrade");
        }
        out.put_slice(b"\r\n");
        out
    }

    /// Sends one request to a machine's service (woken if need be) and
    /// reads its answer's head.
    async fn call_machine(
        &self,
        admitted: Admitted,
        port: Option<u16>,
        route_kind: RouteKind,
        req: &Outgoing,
        client: &mut Client,
    ) -> Result<Answer, Response<Body>> {
        let Admitted { target, busy } = admitted;
        let call = self.call(&target, port, route_kind).await?;
        let machine = target.machine;
        match self.send_on_wire(client, &machine, call.port, req).await {
            Ok((head, wire, sent_whole)) => {
                call.answered();
                Ok(Answer {
                    head,
                    wire,
                    busy,
                    machine,
                    sent_whole,
                })
            }
            Err(e) => {
                call.failed();
                Err(match e {
                    Failed::Client(why) => json_error(StatusCode::BAD_REQUEST, "bad_request", &why),
                    Failed::Silent(why) | Failed::Machine(why) => error_response(&Error::Unavailable(format!(
                        "machine {} port {}: {why}",
                        machine.id, call.port
                    ))),
                })
            }
        }
    }

    /// Writes the request to a connection to the port and reads the head
    /// of the answer, relaying interim answers (100 Continue) to the
    /// client. A whole request that found a kept-alive connection closed
    /// goes again on another.
    async fn send_on_wire(
        &self,
        client: &mut Client,
        machine: &hangar_api::Machine,
        port: u16,
        req: &Outgoing,
    ) -> Result<(ResponseHead, Wire, bool), Failed> {
        let idle = self.cfg.stream_idle_timeout;
        loop {
            let reused = client
                .take_held(&machine.id, port)
                .or_else(|| self.upstream.wires.take(&machine.id, port));
            let fresh = reused.is_none();
            let mut wire = match reused {
                Some(wire) => wire,
                // Boxed: rare, and its future is large.
                None => Box::pin(self.upstream.connect_wire(&machine.app, &machine.id, port))
                    .await
                    .map_err(|e| Failed::Machine(e.to_string()))?,
            };
            let sent = match &req.body {
                Payload::Whole(body) => {
                    let written = wire
                        .stream
                        .write_all_buf(&mut req.head.clone().chain(body.clone()))
                        .await
                        .map_err(|e| Failed::Silent(format!("writing the request: {e}")));
                    match written {
                        Ok(()) => answer_head(&mut wire.stream, &mut wire.buf, &mut client.stream, idle)
                            .await
                            .map(|head| (head, true)),
                        Err(e) => Err(e),
                    }
                }
                Payload::Streamed(framing) => streamed(&mut wire, client, &req.head, *framing, idle).await,
            };
            match sent {
                Ok((head, sent_whole)) => return Ok((head, wire, sent_whole)),
                Err(Failed::Silent(_)) if !fresh && req.idempotent && matches!(req.body, Payload::Whole(_)) => {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Relays the answer's head and body to the client (or, for a 101,
    /// both ways until either side closes); says whether the client's
    /// connection can carry another request.
    async fn deliver(&self, answer: Answer, client: &mut Client, req: &Outgoing, close: bool) -> bool {
        let Answer {
            head,
            mut wire,
            busy,
            machine,
            sent_whole,
        } = answer;
        let idle = self.cfg.stream_idle_timeout;
        if head.code == 101 {
            if !req.upgrade {
                let message = format!("machine {} switched protocols without being asked to", machine.id);
                return client
                    .answer(
                        json_error(StatusCode::BAD_GATEWAY, "machine_unavailable", &message),
                        true,
                    )
                    .await;
            }
            let out = response_head(&head, true, &[]);
            let _busy = busy;
            // What either side sent past its head belongs to the new protocol.
            let relayed = async {
                client.stream.write_all(&out).await?;
                client.stream.write_all(&wire.buf).await?;
                wire.stream.write_all(&client.buf).await
            };
            if relayed.await.is_ok() {
                crate::stream::tunnel(&mut client.stream, &mut wire.stream, idle).await;
            }
            return false;
        }
        let framing = match wire::response_framing(&head, req.to_head) {
            Ok(f) => f,
            Err(e) => {
                let message = format!("machine {}'s answer: {e}", machine.id);
                return client
                    .answer(
                        json_error(StatusCode::BAD_GATEWAY, "machine_unavailable", &message),
                        true,
                    )
                    .await;
            }
        };
        self.learn_session(&head.fields, &machine);
        // A body that ends with the machine's connection goes on chunked,
        // unless it has a coding of its own already.
        let rechunk = framing == Framing::UntilClose && !head.fields.has("transfer-encoding");
        let close = close || !sent_whole || (framing == Framing::UntilClose && !rechunk);
        let mut extra: Vec<(&str, &[u8])> = Vec::new();
        if rechunk {
            extra.push(("transfer-encoding", b"chunked"));
        }
        if close {
            extra.push(("connection", b"close"));
        }
        let out = response_head(&head, false, &extra);
        let relayed = relay(
            &mut wire.stream,
            &mut wire.buf,
            &mut client.stream,
            out,
            framing,
            rechunk,
            idle,
        )
        .await;
        drop(busy);
        if relayed.is_err() {
            return false;
        }
        let reusable = sent_whole
            && framing != Framing::UntilClose
            && head.minor == 1
            && !head.fields.lists("connection", "close");
        if reusable {
            client.held.push(wire);
        }
        !close
    }
}

/// The answer's head for the client: its status and fields but for the
/// hop-by-hop ones, then `extra`.
fn response_head(head: &ResponseHead, upgrade: bool, extra: &[(&str, &[u8])]) -> BytesMut {
    let mut out = BytesMut::with_capacity(head.fields.bytes().len() + 32);
    let _ = write!(out, "HTTP/1.1 {} ", head.code);
    out.put_slice(head.reason());
    out.put_slice(b"\r\n");
    wire::put_fields(&mut out, &head.fields, |_| false);
    if upgrade {
        for value in head.fields.all("upgrade") {
            wire::put_field(&mut out, "upgrade", value);
        }
        wire::put_field(&mut out, "connection", b"upgrade");
    }
    for (name, value) in extra {
        wire::put_field(&mut out, name, value);
    }
    out.put_slice(b"\r\n");
    out
}

/// One of the proxy's own answers, on the wire.
fn encode(resp: Response<Body>, close: bool) -> BytesMut {
    let (parts, body) = resp.into_parts();
    let body = match body {
        Body::Full(bytes) => bytes.unwrap_or_default(),
        _ => Bytes::new(),
    };
    let mut out = BytesMut::with_capacity(256 + body.len());
    let status = parts.status;
    out.put_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &parts.headers {
        wire::put_field(&mut out, name.as_str(), value.as_bytes());
    }
    wire::put_field(&mut out, "content-length", body.len().to_string().as_bytes());
    if close {
        wire::put_field(&mut out, "connection", b"close");
    }
    out.put_slice(b"\r\n");
    out.put_slice(&body);
    out
}

/// Reads into `buf` (at least [`READ_SIZE`] of room), waiting at most
/// `idle`; 0 at the end of the stream.
async fn fill<R: AsyncRead + Unpin>(src: &mut R, buf: &mut BytesMut, idle: Duration) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
    match tokio::time::timeout(idle, src.read_buf(buf)).await {
        Ok(read) => read,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("nothing came for {idle:?}"),
        )),
    }
}

/// Reads the head of the machine's final answer, relaying interim ones to
/// the client as they come.
async fn answer_head<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    client: &mut W,
    idle: Duration,
) -> Result<ResponseHead, Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut heard = false;
    loop {
        match wire::parse_response(buf) {
            Ok(Some(head)) if head.interim() => {
                heard = true;
                let out = response_head(&head, false, &[]);
                client
                    .write_all(&out)
                    .await
                    .map_err(|e| Failed::Client(format!("writing to the client: {e}")))?;
                continue;
            }
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(e) => return Err(Failed::Machine(format!("its answer: {e}"))),
        }
        let silent = !heard && buf.is_empty();
        match fill(src, buf, idle).await {
            Ok(0) if silent => return Err(Failed::Silent("closed the connection without an answer".into())),
            Ok(0) => return Err(Failed::Machine("closed the connection in its answer's head".into())),
            Err(e) if silent && e.kind() != io::ErrorKind::TimedOut => {
                return Err(Failed::Silent(format!("reading its answer: {e}")));
            }
            Err(e) => return Err(Failed::Machine(format!("reading its answer: {e}"))),
            Ok(_) => {}
        }
    }
}

/// Writes the head, then relays the body from the client while reading the
/// answer: a machine may answer before the body is done (an error, or 100
/// Continue that the client waits for). Says whether the body went whole.
async fn streamed(
    wire: &mut Wire,
    client: &mut Client,
    head: &Bytes,
    framing: Framing,
    idle: Duration,
) -> Result<(ResponseHead, bool), Failed> {
    wire.stream
        .write_all(head)
        .await
        .map_err(|e| Failed::Machine(format!("writing the request: {e}")))?;
    let (mut from_client, mut to_client) = client.stream.split();
    let (mut from_machine, mut to_machine) = tokio::io::split(&mut wire.stream);
    let upload = relay(
        &mut from_client,
        &mut client.buf,
        &mut to_machine,
        BytesMut::new(),
        framing,
        false,
        idle,
    );
    let answer = answer_head(&mut from_machine, &mut wire.buf, &mut to_client, idle);
    tokio::pin!(upload, answer);
    tokio::select! {
        biased;
        uploaded = &mut upload => match uploaded {
            Ok(()) => Ok(((&mut answer).await?, true)),
            Err(RelayError::Source(e)) => Err(Failed::Client(format!("reading the request's body: {e}"))),
            // It may have stopped reading because it has answered.
            Err(RelayError::Destination(e)) => match (&mut answer).await {
                Ok(head) => Ok((head, false)),
                Err(_) => Err(Failed::Machine(format!("writing the request's body: {e}"))),
            },
        },
        head = &mut answer => Ok((head?, false)),
    }
}

/// Copies one body, as it is on the wire, from `src` (starting with what
/// `buf` holds) to `dst`, after `prefix`; leaves in `buf` what follows it.
/// With `rechunk`, a body that ends when its sender closes goes out
/// chunked instead, so that the receiver's connection can stay open.
async fn relay<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    mut prefix: BytesMut,
    framing: Framing,
    rechunk: bool,
    idle: Duration,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let rechunk = rechunk && framing == Framing::UntilClose;
    let mut chunks = wire::Chunks::default();
    let mut ended = false;
    loop {
        let n = match framing {
            Framing::Empty => 0,
            Framing::Length(_) => left.min(buf.len() as u64) as usize,
            Framing::Chunked => chunks.advance(buf).map_err(|e| RelayError::Source(e.to_string()))?,
            Framing::UntilClose => buf.len(),
        };
        let piece = buf.split_to(n).freeze();
        if let Framing::Length(_) = framing {
            left -= n as u64;
        }
        let mut out = std::mem::take(&mut prefix);
        let piece = if rechunk && !piece.is_empty() {
            out.put_slice(format!("{n:x}\r\n").as_bytes());
            piece.chain(Bytes::from_static(b"\r\n"))
        } else {
            piece.chain(Bytes::new())
        };
        let mut out = out.chain(piece);
        if ended && rechunk {
            // The source has closed, so the piece is empty: the last chunk.
            out.first_mut().put_slice(b"0\r\n\r\n");
        }
        // The head and the first of the body in one write.
        dst.write_all_buf(&mut out)
            .await
            .map_err(|e| RelayError::Destination(e.to_string()))?;
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(_) => left == 0,
            Framing::Chunked => chunks.done(),
            Framing::UntilClose => ended,
        };
        if done {
            return Ok(());
        }
        match fill(src, buf, idle).await {
            Ok(0) if framing == Framing::UntilClose => ended = true,
            Ok(0) => return Err(RelayError::Source("the connection closed before the body's end".into())),
            Ok(_) => {}
            Err(e) => return Err(RelayError::Source(e.to_string())),
        }
    }
}

/// A client's stream with what was read from it before it went to hyper.
pub(crate) struct Prefixed {
    read: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
