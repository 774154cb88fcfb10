//! Connections to machines' ports, kept alive and reused. Machines have no
//! routable address: each connection is opened from inside the machine's
//! network namespace, and the pool knows a machine's port by the
//! authority `{id}.{app}:{port}`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hangar_machine::{Error, Manager, PortStream};
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::Body;

/// Opens connections to machines' ports, retrying while a woken machine's
/// process comes up to listen.
#[derive(Debug, Clone)]
struct Connector {
    mgr: Manager,
    /// How long a port has to accept connections.
    patience: Duration,
}

/// A machine's port, as the pool holds it.
struct MachineIo(PortStream);

impl tokio::io::AsyncRead for MachineIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for MachineIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for MachineIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<MachineIo>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let target = uri
                .host()
                .and_then(|h| h.split_once('.'))
                .zip(uri.port_u16())
                .map(|((id, app), port)| (id.to_owned(), app.to_owned(), port));
            let Some((id, app, port)) = target else {
                return Err(Error::internal("connecting to a machine", format!("bad target {uri}")));
            };
            this.connect(&app, &id, port).await.map(|s| TokioIo::new(MachineIo(s)))
        })
    }
}

impl Connector {
    async fn connect(&self, app: &str, id: &str, port: u16) -> Result<PortStream, Error> {
        let deadline = Instant::now() + self.patience;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.mgr.connect_port(app, id, port).await {
                Ok(s) => return Ok(s),
                Err(e @ (Error::BadRequest(_) | Error::NotFound(_))) => return Err(e),
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::Unavailable(format!(
                        "machine {id} did not accept connections on port {port} within {:?}: {e}",
                        self.patience
                    )));
                }
                Err(_) => {
                    // A woken process usually listens within milliseconds;
                    // refused loopback connects cost microseconds.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(4));
                }
            }
        }
    }
}

/// The pool of connections to machines.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    client: Client<Connector, Body>,
}

impl Upstream {
    pub(crate) fn new(mgr: Manager, patience: Duration) -> Upstream {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(Connector { mgr, patience });
        Upstream { client }
    }

    /// Sends `req` (its URI a path) to the machine's port.
    pub(crate) async fn send(
        &self,
        app: &str,
        id: &str,
        port: u16,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, Error> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{id}.{app}:{port}{path}")
            .parse()
            .map_err(|e| Error::BadRequest(format!("request target {path:?}: {e}")))?;
        self.client.request(req).await.map_err(|e| {
            // A connect error carries ours (the machine's state, the port's).
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if let Some(ours) = err.downcast_ref::<Error>() {
                    return match ours {
                        Error::BadRequest(m) => Error::BadRequest(m.clone()),
                        Error::NotFound(m) => Error::NotFound(m.clone()),
                        other => Error::Unavailable(other.to_string()),
                    };
                }
                source = err.source();
            }
            Error::Unavailable(format!("machine {id}: {e}"))
        })
    }
}
