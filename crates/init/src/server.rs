//! The daemon-facing socket: one thread per connection, serving one request
//! at a time. The daemon keeps a few connections open between requests.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hangar_init_protocol::{ErrorKind, ErrorReply, FrameKind, Reply, Request, decode_json, read_frame, write_json};

use crate::exec::{self, ExecSpec};
use crate::state::{Init, kill};
use crate::{files, ps};

/// How long a new connection may take to send its first request frame.
/// After that the connection only carries data the request asked for,
/// which may be slow, and then waits (untimed) for the next request: only
/// the daemon keeps connections open, and it closes them when done.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a detach waits for requests in progress to finish.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening side, shared by the accept loop and the connections.
#[derive(Debug)]
pub struct Endpoint {
    /// Where the listener is bound, when init binds it itself (runsc);
    /// only such an init can detach.
    path: Option<PathBuf>,
    /// Open connections.
    connections: AtomicUsize,
    /// A detach was asked for: the accept loop lets go of the listener.
    detaching: AtomicBool,
    /// The listener is closed.
    detached: AtomicBool,
    /// Connections carrying a tunnel (`Request::Connect`), by number: a
    /// detach closes them.
    tunnels: Mutex<HashMap<u64, UnixStream>>,
    next_tunnel: AtomicU64,
    /// Written to wake the accept loop (a connection to our own socket
    /// would do on Linux, but not in gVisor, where the socket is the
    /// host's).
    wake: (io::PipeReader, io::PipeWriter),
}

impl Endpoint {
    pub fn new(path: Option<PathBuf>) -> io::Result<Endpoint> {
        Ok(Endpoint {
            path,
            connections: AtomicUsize::new(0),
            detaching: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            tunnels: Mutex::new(HashMap::new()),
            next_tunnel: AtomicU64::new(0),
            wake: io::pipe()?,
        })
    }

    /// Waits until the listener has a connection (`true`) or the loop was
    /// woken (`false`).
    fn wait(&self, listener: &UnixListener) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if fds[1].revents != 0 {
            let _ = io::Read::read(&mut &self.wake.0, &mut [0u8; 16]);
            return Ok(false);
        }
        Ok(true)
    }
}

/// Accepts connections forever (or until the listener breaks).
pub fn serve(init: &'static Init, endpoint: &'static Endpoint, mut listener: UnixListener) {
    loop {
        if endpoint.detaching.load(Ordering::SeqCst) {
            drop(listener);
            endpoint.detached.store(true, Ordering::SeqCst);
            listener = wait_for_attach(endpoint);
            continue;
        }
        match endpoint.wait(&listener) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("hangar-init: cannot wait for connections, no longer serving: {e}");
                return;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let spare = stream.try_clone();
                endpoint.connections.fetch_add(1, Ordering::SeqCst);
                let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
                    handle(init, endpoint, stream);
                    endpoint.connections.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    endpoint.connections.fetch_sub(1, Ordering::SeqCst);
                    // Most likely the machine's processes took every pid
                    // (threads count): say so rather than just hanging up.
                    eprintln!("hangar-init: cannot start connection thread: {e}");
                    if let Ok(s) = spare {
                        let message =
                            format!("cannot start a thread in the machine ({e}); is it at its process limit?");
                        let _ = send_error(&s, ErrorReply::new(ErrorKind::Io, message));
                    }
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK) => {
                    eprintln!("hangar-init: listening socket unusable, no longer serving: {e}");
                    return;
                }
                // EMFILE, ENOMEM, ECONNABORTED...: transient, back off.
                _ => thread::sleep(Duration::from_millis(50)),
            },
        }
    }
}

/// Waits, with no host socket open, until the daemon says to listen again
/// (the attach file beside the socket) or the detach is called off, then
/// binds the listener again.
fn wait_for_attach(endpoint: &Endpoint) -> UnixListener {
    let path = endpoint.path.as_ref().expect("only a bound endpoint detaches");
    let attach = path.with_file_name(hangar_init_protocol::ATTACH_FILE);
    loop {
        if !endpoint.detaching.load(Ordering::SeqCst) || std::fs::remove_file(&attach).is_ok() {
            if let Some(listener) = crate::bind_listener(path) {
                endpoint.detached.store(false, Ordering::SeqCst);
                endpoint.detaching.store(false, Ordering::SeqCst);
                return listener;
            }
            thread::sleep(Duration::from_millis(100));
        }
        // Time stands still while the sandbox is checkpointed; after the
        // restore this notices the file within a few milliseconds.
        thread::sleep(Duration::from_millis(2));
    }
}

/// [`Request::Detach`], asked on `stream`.
fn detach(endpoint: &Endpoint) -> Result<Reply, ErrorReply> {
    if endpoint.path.is_none() {
        return Err(ErrorReply::invalid(
            "this init was handed its socket and cannot bind it again: only an init listening at a path detaches",
        ));
    }
    endpoint.detaching.store(true, Ordering::SeqCst);
    // A tunnel is a kept-alive proxy connection: the proxy opens another.
    for (_, tunnel) in endpoint.tunnels.lock().expect("tunnels").drain() {
        let _ = tunnel.shutdown(Shutdown::Both);
    }
    let _ = io::Write::write(&mut &endpoint.wake.1, &[1]);
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let others = endpoint.connections.load(Ordering::SeqCst).saturating_sub(1);
        if endpoint.detached.load(Ordering::SeqCst) && others == 0 {
            return Ok(Reply::Ok);
        }
        if Instant::now() > deadline {
            // Called off: the accept loop binds again.
            endpoint.detaching.store(false, Ordering::SeqCst);
            return Err(ErrorReply::new(
                ErrorKind::Io,
                format!("cannot detach: {others} other request(s) still in progress after {DETACH_TIMEOUT:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Serves one connection: requests one after the other, until the client
/// closes it or a request leaves it in no state for another.
pub fn handle(init: &Init, endpoint: &Endpoint, stream: UnixStream) {
    let mut timeout = Some(REQUEST_TIMEOUT);
    while let Ok(true) = serve_one(init, endpoint, &stream, timeout) {
        timeout = None;
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Serves one request. `Ok(true)`: it was answered in full and the
/// connection can carry another.
fn serve_one(init: &Init, endpoint: &Endpoint, stream: &UnixStream, timeout: Option<Duration>) -> io::Result<bool> {
    let mut w = stream;
    stream.set_read_timeout(timeout)?;
    let request = match read_frame(&mut w) {
        Ok(Some((FrameKind::Request, payload))) => match decode_json::<Request>(&payload) {
            Ok(r) => r,
            Err(e) => return send_error(stream, ErrorReply::invalid(format!("bad request: {e}"))).map(|()| false),
        },
        Ok(Some((kind, _))) => {
            return send_error(
                stream,
                ErrorReply::invalid(format!("expected a Request frame, got {kind:?}")),
            )
            .map(|()| false);
        }
        Ok(None) => return Ok(false),
        Err(e) => return send_error(stream, ErrorReply::invalid(format!("bad frame: {e}"))).map(|()| false),
    };
    stream.set_read_timeout(None)?;
    let answered = match request {
        Request::Exec {
            argv,
            env,
            cwd,
            user,
            timeout_ms,
            stdin,
        } => {
            // With stdin, a feeder thread may still be reading this
            // connection: it can't carry another request.
            let finished = exec::run(
                init,
                stream,
                ExecSpec {
                    argv,
                    env,
                    cwd,
                    user,
                    timeout_ms,
                    stdin,
                },
            )?;
            return Ok(finished && !stdin);
        }
        Request::ReadFile { path } => files::read_file(&path, &mut w),
        Request::WriteFile {
            path,
            mode,
            make_parents,
        } => reply(stream, files::write_file(&path, mode, make_parents, &mut w)),
        Request::Stat { path } => reply(stream, files::stat(&path)),
        Request::List { path } => reply(stream, files::list(&path)),
        Request::Mkdir { path, mode, parents } => reply(stream, files::mkdir(&path, mode, parents)),
        Request::Remove { path, recursive } => reply(stream, files::remove(&path, recursive)),
        Request::Ps => reply(stream, ps::list().map(|processes| Reply::Processes { processes })),
        Request::Signal { signal } => reply(stream, signal_main(init, signal)),
        Request::Status => reply(
            stream,
            Ok(Reply::Status {
                main_pid: init.main_pid(),
                exited: init.main_exit(),
            }),
        ),
        Request::Start => {
            // Answer first: the daemon's start is done once the init has the
            // order, and the main process's fork and exec (about half a
            // millisecond) happen while the answer travels. A main process
            // that can't be started is reported like any other early exit:
            // through the exit file and init's own exit code.
            let answered = reply(stream, Ok(Reply::Ok));
            if let Err(code) = init.release_main() {
                init.shut_down(code, crate::terminate_all)
            }
            answered
        }
        // The connection closes after the answer: it is a host socket too.
        Request::Detach => return reply(stream, detach(endpoint)).map(|()| false),
        Request::Connect { port } => {
            let tcp = match TcpStream::connect(("127.0.0.1", port)) {
                Ok(tcp) => tcp,
                Err(e) => return reply(stream, Err(ErrorReply::from_io(&e, format!("port {port}")))).map(|()| true),
            };
            reply(stream, Ok(Reply::Ok))?;
            tunnel(endpoint, tcp, stream)?;
            return Ok(false);
        }
    };
    answered.map(|()| true)
}

/// Carries a `Connect` tunnel until it ends, or a detach closes it.
fn tunnel(endpoint: &Endpoint, tcp: TcpStream, stream: &UnixStream) -> io::Result<()> {
    let n = endpoint.next_tunnel.fetch_add(1, Ordering::SeqCst);
    endpoint.tunnels.lock().expect("tunnels").insert(n, stream.try_clone()?);
    let carried = crate::forward::splice(tcp, stream.try_clone()?);
    endpoint.tunnels.lock().expect("tunnels").remove(&n);
    carried
}

fn signal_main(init: &Init, signal: i32) -> Result<Reply, ErrorReply> {
    if !(0..=64).contains(&signal) {
        return Err(ErrorReply::invalid(format!("invalid signal {signal}")));
    }
    if init.main_exit().is_some() {
        return Err(ErrorReply::invalid("the main process has already exited"));
    }
    let Some(pid) = init.main_pid() else {
        return Err(ErrorReply::invalid("the main process has not been started"));
    };
    kill(pid as i32, signal).map_err(|e| ErrorReply::from_io(&e, "signal main process"))?;
    Ok(Reply::Ok)
}

fn reply(mut w: &UnixStream, result: Result<Reply, ErrorReply>) -> io::Result<()> {
    match result {
        Ok(r) => write_json(&mut w, FrameKind::Reply, &r),
        Err(e) => write_json(&mut w, FrameKind::Error, &e),
    }
}

fn send_error(mut w: &UnixStream, e: ErrorReply) -> io::Result<()> {
    write_json(&mut w, FrameKind::Error, &e)
}
