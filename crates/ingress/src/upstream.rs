//! Connections to machines' ports, kept alive and reused. Machines have no
//! routable address: each connection is opened from inside the machine's
//! network namespace (or through its init, under gVisor).
//!
//! A client connection keeps the machine connections it used
//! ([`Affinity`]), so its next request to the same port goes straight out
//! on the same connection: no pool lookup, no lock shared with other
//! clients. When the client goes, they join the shared idle pool for the
//! next client.

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

impl Conn {
    fn is(&self, id: &str, port: u16) -> bool {
        self.port == port && self.id == id
    }
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

/// Connections to machines no client holds, by machine id.
#[derive(Debug)]
pub(crate) struct Upstream {
    mgr: Manager,
    /// How long a port has to accept connections.
    patience: Duration,
    idle: Mutex<HashMap<String, Vec<(Instant, Conn)>>>,
}

/// Idle connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Upstream {
    pub(crate) fn new(mgr: Manager, patience: Duration) -> Upstream {
        Upstream {
            mgr,
            patience,
            idle: Mutex::new(HashMap::new()),
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
                self.put_idle(conn);
            }
        }
        let mut idle = self.idle.lock().expect("upstream pool");
        let conns = idle.get_mut(id)?;
        conns.retain(|(_, c)| !c.sender.is_closed());
        let i = conns.iter().position(|(_, c)| c.port == port && c.sender.is_ready())?;
        Some(conns.swap_remove(i).1)
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
                self.put_idle(older);
            }
        }
        resp
    }

    /// The client went: its connections are for anyone now.
    pub(crate) fn release(&self, held: &Affinity) {
        let conns = std::mem::take(&mut *held.0.lock().expect("affinity"));
        for conn in conns {
            self.put_idle(conn);
        }
    }

    fn put_idle(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("upstream pool");
        idle.entry(conn.id.clone()).or_default().push((Instant::now(), conn));
    }

    /// Closes connections idle for [`IDLE_TIMEOUT`], every few seconds.
    pub(crate) async fn prune(&self) {
        loop {
            tokio::time::sleep(IDLE_TIMEOUT / 6).await;
            let mut idle = self.idle.lock().expect("upstream pool");
            for conns in idle.values_mut() {
                conns.retain(|(since, c)| since.elapsed() < IDLE_TIMEOUT && !c.sender.is_closed());
            }
            idle.retain(|_, conns| !conns.is_empty());
        }
    }

    /// A new connection, retrying while a woken machine's process comes up
    /// to listen.
    async fn connect(&self, app: &str, id: &str, port: u16) -> Result<Conn, Error> {
        let deadline = Instant::now() + self.patience;
        let mut pause = Duration::from_millis(1);
        let stream = loop {
            match self.mgr.connect_port(app, id, port).await {
                Ok(s) => break s,
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
        };
        let sender = match stream {
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
