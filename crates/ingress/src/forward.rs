//! The forwarding path for HTTP/1.1, which nearly all requests take. One
//! task per client connection reads a request's head, routes it, writes it
//! to a connection to the machine's port, and relays the answer, its body
//! as it came (chunks and all). No second task, channel, header map or
//! body re-encoding per request: with hyper's server and client
//! dispatchers in its way, a request cost the proxy enough CPU to hold it
//! at about 80 % of nginx's throughput (docs/benchmarks.md).
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
use tokio::net::tcp::ReadHalf;

use crate::body::Body;
use crate::load::Busy;
use crate::metrics::RouteKind;
use crate::upstream::{Pooled, Wire};
use crate::wire::{self, BodyEnd, Framing, RequestHead, ResponseHead, WireError};
use crate::{
    Admitted, ClientConn, Ingress, REPLAY_BODY_LIMIT, REPLAY_HEADER, REPLAY_SOURCE_HEADER, Route, error_response,
    json_error, replay_field, replay_route,
};

/// Reads are at least this large.
const READ_SIZE: usize = 8 * 1024;
/// A request's head must arrive whole within this, once it has begun.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A client connection with no request under way is closed after this
/// (as nginx's `keepalive_timeout`).
const KEEP_ALIVE: Duration = Duration::from_secs(75);
/// When the proxy closes a connection of its own accord, what the client
/// still sends is read and dropped for up to this long (and 1 MiB), so
/// that the close does not reset the connection under an answer the client
/// has not read yet.
const LINGER: Duration = Duration::from_secs(2);

/// A client's connection on this path.
struct Client {
    stream: TcpStream,
    /// What has been read from it and not yet taken.
    buf: BytesMut,
    /// Connections to machines its requests used, for its next ones.
    held: Vec<Wire>,
    /// The request being answered is a HEAD: no answer to it has a body.
    head_only: bool,
    /// For waits on the client between requests ([`KEEP_ALIVE`]).
    between_requests: Patience,
    /// For waits on a machine's answer (the stream idle timeout).
    for_answers: Patience,
}

/// A limit on how long a connection's waits may take, kept by one timer
/// for all of them. `tokio::time::timeout` sets a timer and clears it
/// around every wait that has to wait, which costs a request on a
/// kept-alive connection about 3 µs of CPU (measured with `hangar-bench
/// ingress`); this one moves its timer only when it goes off, at most once
/// per limit.
struct Patience {
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// When the current wait began.
    since: tokio::time::Instant,
}

impl Patience {
    fn new(limit: Duration) -> Patience {
        Patience {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            since: tokio::time::Instant::now(),
        }
    }

    /// `op`'s outcome, or `None` if it waited longer than the limit.
    async fn wait<T>(&mut self, op: impl Future<Output = T>) -> Option<T> {
        self.since = tokio::time::Instant::now();
        tokio::pin!(op);
        loop {
            tokio::select! {
                biased;
                done = &mut op => return Some(done),
                () = &mut self.timer => {
                    let due = self.since + self.limit;
                    if tokio::time::Instant::now() >= due {
                        return None;
                    }
                    // Set for an earlier wait: this one has time left.
                    self.timer.as_mut().reset(due);
                }
            }
        }
    }
}

/// A request on its way to a machine.
struct Outgoing {
    /// Its head as the machine gets it.
    head: Bytes,
    body: Payload,
    idempotent: bool,
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
    /// The request's body, if the machine answered before all of it went:
    /// it goes on while the answer comes (a server that echoes as it
    /// reads needs both), and neither connection carries another request.
    upload: Option<Upload>,
}

/// Why an exchange with a machine failed.
enum Failed {
    /// The machine's side closed before any answer came. On a kept-alive
    /// connection that means its server closed it while idle, and an
    /// idempotent request may go again on a new one.
    Silent(String),
    /// The machine, or the way to it.
    Machine(String),
    /// No connection to the port (the machine's error, as it is).
    Connect(Error),
    /// The client's body broke off or was malformed.
    Client(String),
    /// The client closed its connection.
    ClientGone,
}

/// Which side a relay failed on.
enum RelayError {
    Source(String),
    Destination(String),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::Source(why) => write!(f, "reading: {why}"),
            RelayError::Destination(why) => write!(f, "writing: {why}"),
        }
    }
}

/// What comes next on a client connection.
enum Next {
    Request(RequestHead),
    /// A request for hyper: it serves the connection from here, starting
    /// with these bytes.
    HandOff(Bytes),
    /// The client closed the connection, or left it idle.
    Closed,
    /// A head the proxy answers itself, and then closes.
    Refused(Response<Body>),
}

/// Serves a client connection until it closes.
pub(crate) async fn serve(ing: Arc<Ingress>, conn: Arc<ClientConn>, stream: TcpStream) {
    let mut client = Client {
        stream,
        buf: BytesMut::with_capacity(READ_SIZE),
        held: Vec::new(),
        head_only: false,
        between_requests: Patience::new(KEEP_ALIVE),
        for_answers: Patience::new(ing.cfg.stream_idle_timeout),
    };
    /// How the connection ends here.
    enum End {
        /// Hyper serves the rest, starting with what was read.
        HandOff(Bytes),
        /// The client closed it.
        Closed,
        /// The proxy closes it.
        Closing,
    }
    let end = loop {
        match client.next_head().await {
            Next::Request(head) => {
                if !ing.forward(&conn, &mut client, head).await {
                    break End::Closing;
                }
            }
            Next::HandOff(read) => break End::HandOff(read),
            Next::Closed => break End::Closed,
            Next::Refused(resp) => {
                client.answer(resp, true).await;
                break End::Closing;
            }
        }
    };
    for wire in std::mem::take(&mut client.held) {
        ing.upstream.wires.put(wire);
    }
    match end {
        End::HandOff(read) => {
            let io = Prefixed {
                read,
                stream: client.stream,
            };
            crate::serve_hyper(ing, conn, io).await;
        }
        End::Closed => {}
        End::Closing => client.linger().await,
    }
}

/// Whether this path takes the request: HTTP/1.1 in origin form (a path),
/// and not CONNECT.
fn takes(head: &RequestHead) -> bool {
    head.minor == 1 && head.target().starts_with('/') && head.method() != "CONNECT"
}

impl Client {
    async fn next_head(&mut self) -> Next {
        // What of `buf` has been looked at for the head's end.
        let mut seen = 0;
        let mut deadline = None;
        loop {
            // The first bytes are parsed at once, so that what is not HTTP
            // is refused at once.
            if (seen == 0 && !self.buf.is_empty()) || wire::may_end_head(&self.buf, seen) {
                match wire::parse_request(&mut self.buf) {
                    Ok(Some(head)) if takes(&head) => return Next::Request(head),
                    Ok(Some(head)) => {
                        let mut read = BytesMut::from(&head.fields.bytes()[..]);
                        read.extend_from_slice(&self.buf);
                        self.buf.clear();
                        return Next::HandOff(read.freeze());
                    }
                    Ok(None) => {}
                    Err(WireError::Version) => return Next::HandOff(std::mem::take(&mut self.buf).freeze()),
                    Err(e) => return Next::Refused(refusal(&e)),
                }
            }
            if self.buf.len() > wire::MAX_HEAD {
                return Next::Refused(refusal(&WireError::TooLarge));
            }
            seen = self.buf.len();
            room(&mut self.buf);
            if self.buf.is_empty() {
                match self.between_requests.wait(self.stream.read_buf(&mut self.buf)).await {
                    Some(Ok(n)) if n > 0 => continue,
                    _ => return Next::Closed,
                }
            }
            let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + HEAD_TIMEOUT);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) => return Next::Closed,
                Ok(Ok(_)) => {}
                Err(_) => {
                    let message = format!("the request's head did not arrive whole within {HEAD_TIMEOUT:?}");
                    return Next::Refused(json_error(StatusCode::REQUEST_TIMEOUT, "timeout", &message));
                }
            }
        }
    }

    /// Sends one of the proxy's own answers; says whether the connection
    /// can carry another request (not if `close`).
    async fn answer(&mut self, resp: Response<Body>, close: bool) -> bool {
        let mut out = encode(resp, close, self.head_only);
        send(&mut self.stream, &mut out, HEAD_TIMEOUT).await.is_ok() && !close
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

    /// Closes the connection: the write side first, then what the client
    /// still sends is read and dropped for a moment (see [`LINGER`]).
    async fn linger(mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut sink = [0u8; 8192];
        let mut drained = 0;
        while drained < 1 << 20 {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

/// The answer to a head the proxy can't take.
fn refusal(e: &WireError) -> Response<Body> {
    match e {
        WireError::TooLarge => json_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "head_too_large",
            &format!("{e}: send fewer or smaller fields"),
        ),
        _ => json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("{e}: send an HTTP/1.1 request (RFC 9112)"),
        ),
    }
}

impl Ingress {
    /// Forwards one request and relays its answer; says whether the
    /// client's connection can carry another.
    async fn forward(&self, conn: &ClientConn, client: &mut Client, head: RequestHead) -> bool {
        let idle = self.cfg.stream_idle_timeout;
        client.head_only = head.method() == "HEAD";
        let framing = match wire::request_framing(&head.fields) {
            Ok(f) => f,
            Err(e) => {
                let resp = json_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string());
                return client.answer(resp, true).await;
            }
        };
        // The client asked to close after this answer; and until the body
        // has been read, an answer must close the connection too, or the
        // body's bytes would be taken for a request.
        let close = head.fields.lists("connection", "close");
        let mut closing = close || framing != Framing::Empty;
        let host = {
            let mut hosts = head.fields.all("host");
            (hosts.next().map(std::str::from_utf8), hosts.next())
        };
        let host = match host {
            (Some(Ok(host)), None) => host,
            _ => {
                let message = format!(
                    "a request needs exactly one Host field, of text: {{machine}}.{{app}}.{}",
                    self.cfg.domain
                );
                let resp = json_error(StatusCode::BAD_REQUEST, "bad_request", &message);
                return client.answer(resp, true).await;
            }
        };
        let Some(route) = Route::parse(host, &self.cfg.domain) else {
            return client.answer(self.no_route(host), closing).await;
        };
        // A small body is read whole before the request takes a place at
        // the machine, and kept for a replay. The proxy says 100 Continue
        // itself to a client that waits for it.
        let expects_continue = head.fields.lists("expect", "100-continue");
        let body = match framing {
            Framing::Empty => Payload::Whole(Bytes::new()),
            Framing::Length(n) if n <= REPLAY_BODY_LIMIT as u64 => {
                if expects_continue
                    && send(&mut client.stream, &mut &b"HTTP/1.1 100 Continue\r\n\r\n"[..], idle)
                        .await
                        .is_err()
                {
                    return false;
                }
                match client.read_body(n as usize, idle).await {
                    Ok(body) => Payload::Whole(body),
                    Err(_) => return false,
                }
            }
            framing => Payload::Streamed(framing),
        };
        closing = close || matches!(body, Payload::Streamed(_));
        let session = self.session_of(&head.fields);
        let admitted = match self.admit(&route, session.as_deref(), conn).await {
            Ok(a) => a,
            Err(resp) => return client.answer(resp, closing).await,
        };
        let upgrade = head.fields.has("upgrade") && head.fields.lists("connection", "upgrade");
        let may_replay =
            matches!(body, Payload::Whole(_)) && !upgrade && !head.fields.has(REPLAY_SOURCE_HEADER.as_str());
        let answered_continue = expects_continue && matches!(body, Payload::Whole(_));
        let req = Outgoing {
            head: self
                .request_head(&head, conn, framing, upgrade, answered_continue)
                .freeze(),
            body,
            idempotent: head.idempotent(),
            upgrade,
        };
        drop(head);
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
                let message = "the machine asked for a replay, but the request can't be replayed (a body over 1 MiB \
                               or chunked, an upgrade, or a replay already)";
                let resp = json_error(StatusCode::BAD_GATEWAY, "replay_refused", message);
                return client.answer(resp, true).await;
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
    /// hop-by-hop ones, its framing written anew, and the proxy's
    /// `X-Forwarded-*`.
    fn request_head(
        &self,
        head: &RequestHead,
        conn: &ClientConn,
        framing: Framing,
        upgrade: bool,
        answered_continue: bool,
    ) -> BytesMut {
        let mut out = BytesMut::with_capacity(head.fields.bytes().len() + 128);
        out.put_slice(head.method().as_bytes());
        out.put_u8(b' ');
        out.put_slice(head.target().as_bytes());
        out.put_slice(b" HTTP/1.1\r\n");
        wire::put_fields(&mut out, &head.fields, |name| {
            [
                "x-forwarded-host",
                "x-forwarded-proto",
                "content-length",
                "transfer-encoding",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
                || (answered_continue && name.eq_ignore_ascii_case("expect"))
        });
        match framing {
            Framing::Length(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            Framing::Chunked => wire::put_field(&mut out, "transfer-encoding", b"chunked"),
            Framing::Empty | Framing::UntilClose => {}
        }
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
            wire::put_upgrade(&mut out, &head.fields);
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
        let failed = match self.send_on_wire(client, &machine, call.port, req).await {
            Ok((head, wire, upload)) => {
                call.answered();
                return Ok(Answer {
                    head,
                    wire,
                    busy,
                    machine,
                    upload,
                });
            }
            Err(failed) => failed,
        };
        Err(match failed {
            // Not the machine's doing: not counted as its failure.
            Failed::Client(why) => json_error(StatusCode::BAD_REQUEST, "bad_request", &why),
            Failed::ClientGone => json_error(
                StatusCode::BAD_REQUEST,
                "client_closed",
                "the client closed its connection before the answer",
            ),
            Failed::Connect(e) => {
                call.failed();
                error_response(&e)
            }
            Failed::Silent(why) | Failed::Machine(why) => {
                call.failed();
                error_response(&Error::Unavailable(format!(
                    "machine {} port {}: {why}",
                    machine.id, call.port
                )))
            }
        })
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
    ) -> Result<(ResponseHead, Wire, Option<Upload>), Failed> {
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
                    .map_err(Failed::Connect)?,
            };
            let sent = match &req.body {
                Payload::Whole(body) => whole(&mut wire, client, &req.head, body, idle).await,
                Payload::Streamed(framing) => streamed(&mut wire, client, &req.head, *framing, idle).await,
            };
            match sent {
                Ok((head, upload)) => return Ok((head, wire, upload)),
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
            mut upload,
        } = answer;
        let idle = self.cfg.stream_idle_timeout;
        if head.code == 101 {
            if !req.upgrade || upload.is_some() {
                let message = format!("machine {} switched protocols without being asked to", machine.id);
                let resp = json_error(StatusCode::BAD_GATEWAY, "machine_unavailable", &message);
                return client.answer(resp, true).await;
            }
            let mut out = status_and_fields(&head, |_| false);
            wire::put_upgrade(&mut out, &head.fields);
            out.put_slice(b"\r\n");
            let _busy = busy;
            // What either side sent past its head belongs to the new protocol.
            let relayed = async {
                send(&mut client.stream, &mut out.chain(&wire.buf[..]), idle).await?;
                send(&mut wire.stream, &mut &client.buf[..], idle).await
            };
            if relayed.await.is_ok() {
                crate::stream::tunnel(&mut client.stream, &mut wire.stream, idle).await;
            }
            return false;
        }
        let framing = match wire::response_framing(&head, client.head_only) {
            Ok(f) => f,
            Err(e) => {
                let message = format!("machine {}'s answer: {e}", machine.id);
                let resp = json_error(StatusCode::BAD_GATEWAY, "machine_unavailable", &message);
                return client.answer(resp, true).await;
            }
        };
        self.learn_session(&head.fields, &machine);
        // A body that ends with the machine's connection goes on chunked,
        // unless it has a coding of its own already.
        let rechunk = framing == Framing::UntilClose && !head.fields.has("transfer-encoding");
        let close = close || upload.is_some() || (framing == Framing::UntilClose && !rechunk);
        let out = final_head(&head, framing, rechunk, close);
        let relayed = match &mut upload {
            // Watching the client meanwhile: one that goes frees the machine.
            None => {
                let (from_client, mut to_client) = client.stream.split();
                let answer = relay(
                    &mut wire.stream,
                    &mut wire.buf,
                    &mut to_client,
                    out,
                    framing,
                    rechunk,
                    idle,
                );
                tokio::select! {
                    biased;
                    relayed = answer => relayed,
                    () = gone(&from_client, &mut client.buf) => Err(RelayError::Destination("the client went".into())),
                }
            }
            Some(upload) => {
                let (mut from_client, mut to_client) = client.stream.split();
                let (mut from_machine, mut to_machine) = tokio::io::split(&mut wire.stream);
                let answer = relay(
                    &mut from_machine,
                    &mut wire.buf,
                    &mut to_client,
                    out,
                    framing,
                    rechunk,
                    idle,
                );
                let sending = upload.run(&mut from_client, &mut client.buf, &mut to_machine, idle);
                tokio::pin!(answer, sending);
                let mut sent = false;
                loop {
                    tokio::select! {
                        biased;
                        relayed = &mut answer => break relayed,
                        _ = &mut sending, if !sent => sent = true,
                    }
                }
            }
        };
        drop(busy);
        if let Err(e) = &relayed {
            tracing::debug!(machine = %machine.id, "answer cut off, {e}");
        }
        let relayed = relayed.is_ok();
        let reusable = relayed
            && upload.is_none()
            && framing != Framing::UntilClose
            && head.minor == 1
            && !head.fields.lists("connection", "close");
        if reusable {
            client.held.push(wire);
        }
        relayed && !close
    }
}

/// Sends a whole request and reads its answer's head, watching the client
/// meanwhile.
async fn whole(
    wire: &mut Wire,
    client: &mut Client,
    head: &Bytes,
    body: &Bytes,
    idle: Duration,
) -> Result<(ResponseHead, Option<Upload>), Failed> {
    // A write to a kept-alive connection the machine has closed.
    send(&mut wire.stream, &mut head.clone().chain(body.clone()), idle)
        .await
        .map_err(|e| Failed::Silent(format!("writing the request: {e}")))?;
    let (from_client, mut to_client) = client.stream.split();
    tokio::select! {
        biased;
        head = answer_head(&mut wire.stream, &mut wire.buf, &mut to_client, &mut client.for_answers) => Ok((head?, None)),
        () = gone(&from_client, &mut client.buf) => Err(Failed::ClientGone),
    }
}

/// Writes the head, then relays the body from the client while reading the
/// answer: a machine may answer before the body is done (an error, 100
/// Continue that the client waits for, or an echo), and then the body goes
/// on with the answer (see [`Answer::upload`]).
async fn streamed(
    wire: &mut Wire,
    client: &mut Client,
    head: &Bytes,
    framing: Framing,
    idle: Duration,
) -> Result<(ResponseHead, Option<Upload>), Failed> {
    send(&mut wire.stream, &mut head.clone(), idle)
        .await
        .map_err(|e| Failed::Machine(format!("writing the request: {e}")))?;
    let mut upload = Upload::new(framing);
    let head = {
        let (mut from_client, mut to_client) = client.stream.split();
        let (mut from_machine, mut to_machine) = tokio::io::split(&mut wire.stream);
        let sending = upload.run(&mut from_client, &mut client.buf, &mut to_machine, idle);
        let answer = answer_head(
            &mut from_machine,
            &mut wire.buf,
            &mut to_client,
            &mut client.for_answers,
        );
        tokio::pin!(sending, answer);
        let mut sent = false;
        loop {
            tokio::select! {
                biased;
                uploaded = &mut sending, if !sent => match uploaded {
                    Ok(()) => sent = true,
                    Err(RelayError::Source(e)) => return Err(Failed::Client(format!("reading the request's body: {e}"))),
                    // It may have stopped reading because it has answered.
                    Err(RelayError::Destination(_)) => sent = true,
                },
                head = &mut answer => break head?,
            }
        }
    };
    Ok((head, (!upload.end.done()).then_some(upload)))
}

/// A request's body on its way from the client to the machine. Its state
/// lives here rather than in a future, and each wait is one read or one
/// write, so waiting on it can stop while the answer's head comes and go
/// on while the answer's body does, losing nothing.
struct Upload {
    end: BodyEnd,
    /// Taken from the client, not yet written to the machine.
    pending: Bytes,
    /// The machine stopped taking it.
    broken: bool,
}

impl Upload {
    fn new(framing: Framing) -> Upload {
        Upload {
            end: BodyEnd::new(framing),
            pending: Bytes::new(),
            broken: false,
        }
    }

    /// Sends the body on, as it comes, until all of it has gone.
    async fn run<R, W>(
        &mut self,
        src: &mut R,
        buf: &mut BytesMut,
        dst: &mut W,
        idle: Duration,
    ) -> Result<(), RelayError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.broken {
                return Err(RelayError::Destination("the machine stopped taking the body".into()));
            }
            // `send` keeps what it has written out of `pending` after
            // each write, so stopping it in between loses nothing.
            if let Err(e) = send(dst, &mut self.pending, idle).await {
                self.broken = true;
                return Err(RelayError::Destination(e.to_string()));
            }
            if self.end.done() {
                return Ok(());
            }
            let n = self.end.take(buf).map_err(|e| RelayError::Source(e.to_string()))?;
            if n > 0 {
                self.pending = buf.split_to(n).freeze();
                continue;
            }
            match fill(src, buf, idle).await {
                Ok(0) => {
                    return Err(RelayError::Source(
                        "the client closed the connection before the body's end".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(RelayError::Source(e.to_string())),
            }
        }
    }
}

/// Resolves when the client closes its connection (or it fails), keeping
/// what it sends meanwhile, a pipelined request, in `buf`, up to a bound.
async fn gone(from_client: &ReadHalf<'_>, buf: &mut BytesMut) {
    while buf.len() < wire::MAX_HEAD {
        if from_client.readable().await.is_err() {
            return;
        }
        room(buf);
        match from_client.try_read_buf(buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    std::future::pending().await
}

/// An answer's status line and fields for the client, but for the
/// hop-by-hop ones and those `skip` refuses; the caller ends the head.
fn status_and_fields(head: &ResponseHead, skip: impl Fn(&str) -> bool) -> BytesMut {
    let mut out = BytesMut::with_capacity(head.fields.bytes().len() + 64);
    let _ = write!(out, "HTTP/1.1 {} ", head.code);
    out.put_slice(head.reason());
    out.put_slice(b"\r\n");
    wire::put_fields(&mut out, &head.fields, skip);
    out
}

/// A final answer's head for the client, its framing written anew: the
/// length the proxy counts, the codings as they were (without a length
/// beside them, RFC 9112 §6.3), or chunked where the proxy chunks.
fn final_head(head: &ResponseHead, framing: Framing, rechunk: bool, close: bool) -> BytesMut {
    let reframed = framing != Framing::Empty;
    let mut out = status_and_fields(head, |name| {
        name.eq_ignore_ascii_case("transfer-encoding") || (reframed && name.eq_ignore_ascii_case("content-length"))
    });
    // A length frames the body alone: codings beside it (only empty ones
    // can be, see `wire::response_framing`) do not go on.
    if !matches!(framing, Framing::Length(_)) {
        for value in head.fields.all("transfer-encoding") {
            wire::put_field(&mut out, "transfer-encoding", value);
        }
    }
    if rechunk {
        wire::put_field(&mut out, "transfer-encoding", b"chunked");
    }
    if let Framing::Length(n) = framing {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    if close {
        wire::put_field(&mut out, "connection", b"close");
    }
    out.put_slice(b"\r\n");
    out
}

/// One of the proxy's own answers, on the wire; without its body if it
/// answers a HEAD.
fn encode(resp: Response<Body>, close: bool, head_only: bool) -> BytesMut {
    let (parts, body) = resp.into_parts();
    let body = match body {
        Body::Full(bytes) => bytes.unwrap_or_default(),
        _ => Bytes::new(),
    };
    let mut out = BytesMut::with_capacity(256 + body.len());
    let status = parts.status;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        wire::put_field(&mut out, name.as_str(), value.as_bytes());
    }
    let _ = write!(out, "content-length: {}\r\n", body.len());
    if close {
        wire::put_field(&mut out, "connection", b"close");
    }
    out.put_slice(b"\r\n");
    if !head_only {
        out.put_slice(&body);
    }
    out
}

/// Makes room in `buf` for a read of at least half of [`READ_SIZE`].
fn room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
}

/// Reads into `buf` (see [`room`]), waiting at most `idle`; 0 at the end
/// of the stream.
async fn fill<R: AsyncRead + Unpin>(src: &mut R, buf: &mut BytesMut, idle: Duration) -> io::Result<usize> {
    room(buf);
    match tokio::time::timeout(idle, src.read_buf(buf)).await {
        Ok(read) => read,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("nothing came for {idle:?}"),
        )),
    }
}

/// Writes all of `data`, giving the peer at most `idle` to take each part.
async fn send<W: AsyncWrite + Unpin, B: Buf>(dst: &mut W, data: &mut B, idle: Duration) -> io::Result<()> {
    while data.has_remaining() {
        match tokio::time::timeout(idle, dst.write_buf(data)).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer took nothing for {idle:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// Reads the head of the machine's final answer, relaying interim ones to
/// the client as they come.
async fn answer_head<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    client: &mut W,
    patience: &mut Patience,
) -> Result<ResponseHead, Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut heard = false;
    let mut seen = 0;
    loop {
        if (seen == 0 && !buf.is_empty()) || wire::may_end_head(buf, seen) {
            match wire::parse_response(buf) {
                Ok(Some(head)) if head.interim() => {
                    heard = true;
                    seen = 0;
                    let mut out = status_and_fields(&head, |_| false);
                    out.put_slice(b"\r\n");
                    send(client, &mut out, patience.limit)
                        .await
                        .map_err(|_| Failed::ClientGone)?;
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(Failed::Machine(format!("its answer: {e}"))),
            }
        }
        if buf.len() > wire::MAX_HEAD {
            return Err(Failed::Machine(format!("its answer: {}", WireError::TooLarge)));
        }
        seen = buf.len();
        let silent = !heard && buf.is_empty();
        room(buf);
        match patience.wait(src.read_buf(buf)).await {
            Some(Ok(0)) if silent => return Err(Failed::Silent("closed the connection without an answer".into())),
            Some(Ok(0)) => return Err(Failed::Machine("closed the connection in its answer's head".into())),
            Some(Err(e)) if silent => return Err(Failed::Silent(format!("reading its answer: {e}"))),
            Some(Err(e)) => return Err(Failed::Machine(format!("reading its answer: {e}"))),
            None => {
                return Err(Failed::Machine(format!(
                    "no answer within {:?} (--proxy-stream-idle-timeout)",
                    patience.limit
                )));
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Copies one answer's body, as it is on the wire, from `src` (starting
/// with what `buf` holds) to `dst`, after `prefix` (its head, so that a
/// small answer goes in one write). With `rechunk`, a body that ends when
/// its sender closes goes out chunked instead, so that the client's
/// connection can stay open.
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
    let rechunk = rechunk && framing == Framing::UntilClose;
    let mut end = BodyEnd::new(framing);
    loop {
        let n = end.take(buf).map_err(|e| RelayError::Source(e.to_string()))?;
        let piece = buf.split_to(n).freeze();
        let mut out = std::mem::take(&mut prefix);
        let piece = if rechunk && !piece.is_empty() {
            let _ = write!(out, "{n:x}\r\n");
            piece.chain(Bytes::from_static(b"\r\n"))
        } else {
            piece.chain(Bytes::new())
        };
        let mut out = out.chain(piece);
        if rechunk && end.done() {
            // The source has closed, so the piece is empty: the last chunk.
            out.first_mut().put_slice(b"0\r\n\r\n");
        }
        send(dst, &mut out, idle)
            .await
            .map_err(|e| RelayError::Destination(e.to_string()))?;
        if end.done() {
            return Ok(());
        }
        match fill(src, buf, idle).await {
            Ok(0) if end.close() => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> ResponseHead {
        wire::parse_response(&mut BytesMut::from(text)).unwrap().unwrap()
    }

    #[test]
    fn final_heads_carry_only_the_framing_the_proxy_follows() {
        let framed = |text: &str, close: bool| {
            let head = answer(text);
            let framing = wire::response_framing(&head, false).unwrap();
            let rechunk = framing == Framing::UntilClose && !head.fields.has("transfer-encoding");
            String::from_utf8(final_head(&head, framing, rechunk, close).to_vec()).unwrap()
        };
        assert_eq!(
            framed(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nContent-Length: 3\r\nX: 1\r\n\r\n",
                false
            ),
            "HTTP/1.1 200 OK\r\nX: 1\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(
            framed(
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false
            ),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
        );
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\n\r\n", false),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "a close-delimited body goes on chunked"
        );
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n", true),
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn patience_counts_from_each_wait_with_one_timer() {
        let limit = Duration::from_millis(200);
        let mut patience = Patience::new(limit);
        let quick = tokio::time::sleep(Duration::from_millis(50));
        assert!(patience.wait(quick).await.is_some());
        // The timer was set for the first wait; this one starts later and
        // outlasts it, within its own limit.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let started = tokio::time::Instant::now();
        let longer = tokio::time::sleep(Duration::from_millis(150));
        assert!(
            patience.wait(longer).await.is_some(),
            "cut off by an earlier wait's timer"
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        let started = tokio::time::Instant::now();
        assert!(patience.wait(std::future::pending::<()>()).await.is_none());
        let waited = started.elapsed();
        assert!(waited >= limit && waited < limit * 3, "{waited:?}");
    }
}
