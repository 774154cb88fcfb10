//! The egress proxy's listener inside a machine whose network stack the
//! gateway can't enter (gVisor's is its own): the init listens on the
//! proxy's address and relays each connection to the gateway's unix socket,
//! bind-mounted into the machine.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;

/// Listens on 127.0.0.1:`port` and relays to `socket`, in threads of its
/// own. A failure to listen is reported and leaves the machine without
/// egress, nothing worse.
pub fn start(port: u16, socket: PathBuf) {
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hangar-init: egress proxy: listening on 127.0.0.1:{port}: {e}");
            return;
        }
    };
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let socket = socket.clone();
            thread::spawn(move || {
                if let Err(e) = relay(conn, &socket) {
                    eprintln!("hangar-init: egress proxy: {}: {e}", socket.display());
                }
            });
        }
    });
}

fn relay(client: TcpStream, socket: &PathBuf) -> io::Result<()> {
    splice(client, UnixStream::connect(socket)?)
}

/// Carries bytes both ways between a TCP connection in the machine and a
/// host socket until both directions have ended.
pub fn splice(tcp: TcpStream, unix: UnixStream) -> io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let outward = thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(Shutdown::Write);
    });
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    let _ = io::copy(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = outward.join();
    Ok(())
}
