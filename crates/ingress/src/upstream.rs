//! Connections to machines' ports, kept alive and reused. Machines have no
//! routable address: each connection is opened from inside the machine's
//! network namespace (or through its init, under gVisor).
//!
//! A client connection keeps the machine connections it used (hyper's in
//! an [`Affinity`], the forwarding path's [`Wire`]s in its own list), so
//! its next request to the same port goes straight out on the same
//! connection: no pool lookup, no lock shared with other clients. When the
//! client goes, they join the shared idle [`Pool`] for the next client.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hangar_api::MachineState;
use hangar_machine::{Error, Manager, PortStream};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::body::Body;

/// An open HTTP/1.1 connection to one port of one machine.
struct Conn {
    id: String,
    port: u16,
    sender: SendRequest<Body>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id, self.port)
    }
}

/// The machine connections one client connection has used.
#[derive(Default)]
pub(crate) struct Affinity(Mutex<Vec<Conn>>);

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Affinity")
    }
}

/// A connection to a machine's port for the forwarding path (see
/// [`crate::forward`]): the stream, and what has been read from it but not
/// yet taken.
#[derive(Debug)]
pub(crate) struct Wire {
    pub(crate) id: String,
    pub(crate) port: u16,
    pub(crate) stream: PortStream,
    pub(crate) buf: bytes::BytesMut,
}

/// A connection a pool can hold.
pub(crate) trait Pooled {
    fn is(&self, id: &str, port: u16) -> bool;
    fn id(&self) -> &str;
    /// Closed by the machine, or unusable for another reason.
    fn is_closed(&self) -> bool;
    /// Free for a request now.
    fn is_ready(&self) -> bool;
}

impl Pooled for Conn {
    fn is(&self, id: &str, port: u16) -> bool {
        self.port == port && self.id == id
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
    fn is_ready(&self) -> bool {
        self.sender.is_ready()
    }
}

impl Pooled for Wire {
    fn is(&self, id: &str, port: u16) -> bool {
        self.port == port && self.id == id
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn is_closed(&self) -> bool {
        // Bytes nobody asked for: the connection is out of step.
        !self.buf.is_empty() || self.stream.is_closed()
    }
    fn is_ready(&self) -> bool {
        true
    }
}

/// Connections to machines no client holds, by machine id.
#[derive(Debug)]
pub(crate) struct Pool<C>(Mutex<HashMap<String, Vec<(Instant, C)>>>);

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool(Mutex::new(HashMap::new()))
    }
}

impl<C: Pooled> Pool<C> {
    pub(crate) fn take(&self, id: &str, port: u16) -> Option<C> {
        let mut idle = self.0.lock().expect("upstream pool");
        let conns = idle.get_mut(id)?;
        loop {
            // The most recently used first: the least likely to have been
            // closed by the machine's server.
            let i = conns.iter().rposition(|(_, c)| c.is(id, port) && c.is_ready())?;
            let (_, conn) = conns.remove(i);
            if !conn.is_closed() {
                return Some(conn);
            }
        }
    }

    pub(crate) fn put(&self, conn: C) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.0.lock().expect("upstream pool");
        idle.entry(conn.id().to_owned())
            .or_default()
            .push((Instant::now(), conn));
    }

    /// Closes connections idle for [`IDLE_TIMEOUT`].
    fn prune(&self) {
        let mut idle = self.0.lock().expect("upstream pool");
        for conns in idle.values_mut() {
            conns.retain(|(since, c)| since.elapsed() < IDLE_TIMEOUT && !c.is_closed());
        }
        idle.retain(|_, conns| !conns.is_empty());
    }
}

/// Connections to machines' ports: opened (waiting while a woken machine
/// comes up to listen), and pooled when no client holds them.
#[derive(Debug)]
pub(crate) struct Upstream {
    mgr: Manager,
    /// How long a port has to accept connections.
    patience: Duration,
    /// hyper's, for HTTP/2 and HTTP/1.0 clients.
    idle: Pool<Conn>,
    /// The forwarding path's.
    pub(crate) wires: Pool<Wire>,
}

/// Idle connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Upstream {
    pub(crate) fn new(mgr: Manager, patience: Duration) -> Upstream {
        Upstream {
            mgr,
            patience,
            idle: Pool::default(),
            wires: Pool::default(),
        }
    }

    /// Sends `req` (its Host set) to the machine's port, on a connection
    /// `held` has, an idle one, or a new one.
    pub(crate) async fn send(
        &self,
        held: &Affinity,
        app: &str,
        id: &str,
        port: u16,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, Error> {
        // HTTP/2 requests carry an absolute URI; HTTP/1.1 wants the path.
        if req.uri().authority().is_some() {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = path
                .parse()
                .map_err(|e| Error::BadRequest(format!("request target {path:?}: {e}")))?;
        }
        while let Some(mut conn) = self.reuse(held, id, port) {
            match conn.sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.keep(held, conn, resp)),
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request went out
                    // (the machine's server dropped it idle): another one.
                    Some(unsent) => req = unsent,
                    None => {
                        return Err(Error::Unavailable(format!(
                            "machine {id} port {port}: {}",
                            e.into_error()
                        )));
                    }
                },
            }
        }
        // Boxed: rare, and its future is large.
        let mut conn = Box::pin(self.connect(app, id, port)).await?;
        let resp = conn
            .sender
            .send_request(req)
            .await
            .map_err(|e| Error::Unavailable(format!("machine {id} port {port}: {e}")))?;
        Ok(self.keep(held, conn, resp))
    }

    /// A connection to the port that can take a request now.
    fn reuse(&self, held: &Affinity, id: &str, port: u16) -> Option<Conn> {
        {
            let mut held = held.0.lock().expect("affinity");
            if let Some(i) = held.iter().position(|c| c.is(id, port)) {
                let conn = held.swap_remove(i);
                if conn.sender.is_ready() {
                    return Some(conn);
                }
                drop(held);
                // Busy with another of this client's requests (HTTP/2).
                self.idle.put(conn);
            }
        }
        self.idle.take(id, port)
    }

    /// Gives the connection back to the client that used it, unless the
    /// answer took it over (an upgrade).
    fn keep(&self, held: &Affinity, conn: Conn, resp: Response<Incoming>) -> Response<Incoming> {
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let mut held = held.0.lock().expect("affinity");
            let older = held
                .iter()
                .position(|c| c.is(&conn.id, conn.port))
                .map(|i| held.swap_remove(i));
            held.push(conn);
            drop(held);
            if let Some(older) = older {
                self.idle.put(older);
            }
        }
        resp
    }

    /// The client went: its connections are for anyone now.
    pub(crate) fn release(&self, held: &Affinity) {
        let conns = std::mem::take(&mut *held.0.lock().expect("affinity"));
        for conn in conns {
            self.idle.put(conn);
        }
    }

    /// Closes connections idle for [`IDLE_TIMEOUT`], every few seconds.
    pub(crate) async fn prune(&self) {
        loop {
            tokio::time::sleep(IDLE_TIMEOUT / 6).await;
            self.idle.prune();
            self.wires.prune();
        }
    }

    /// A new connection for hyper's client.
    async fn connect(&self, app: &str, id: &str, port: u16) -> Result<Conn, Error> {
        let sender = match self.open(app, id, port).await? {
            PortStream::Tcp(s) => handshake(TokioIo::new(s)).await,
            PortStream::Tunnel(s) => handshake(TokioIo::new(s)).await,
        }
        .map_err(|e| Error::Unavailable(format!("machine {id} port {port}: {e}")))?;
        Ok(Conn {
            id: id.to_owned(),
            port,
            sender,
        })
    }

    /// A new connection for the forwarding path.
    pub(crate) async fn connect_wire(&self, app: &str, id: &str, port: u16) -> Result<Wire, Error> {
        Ok(Wire {
            id: id.to_owned(),
            port,
            stream: self.open(app, id, port).await?,
            buf: bytes::BytesMut::new(),
        })
    }

    /// A connection to the port, retrying while a woken machine's process
    /// comes up to listen.
    async fn open(&self, app: &str, id: &str, port: u16) -> Result<PortStream, Error> {
        let deadline = Instant::now() + self.patience;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.mgr.connect_port(app, id, port).await {
                Ok(s) => return Ok(s),
                Err(e @ (Error::BadRequest(_) | Error::NotFound(_))) => return Err(e),
                Err(e) => {
                    let live = self.mgr.live_state(id);
                    // Its process ended (a bad command, a crash): no use waiting.
                    if let Some(state) = live.filter(|s| !matches!(s, MachineState::Started | MachineState::Starting)) {
                        return Err(Error::Unavailable(format!(
                            "machine {id} is {state}: its process ended before it listened on port {port} ({e}); \
                             read its logs (GET /v1/apps/{app}/machines/{id}/logs), fix its config, and start it \
                             again"
                        )));
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Unavailable(format!(
                            "machine {id} did not accept connections on port {port} within {:?}: {e}",
                            self.patience
                        )));
                    }
                    // A woken process usually listens within milliseconds;
                    // refused loopback connects cost microseconds.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(4));
                }
            }
        }
    }
}

/// Starts HTTP/1.1 on a connection, driven by a task of its own until
/// either side closes it (or an upgrade takes it over).
async fn handshake<T>(io: T) -> hyper::Result<SendRequest<Body>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    sender.ready().await?;
    Ok(sender)
}
