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
    let gateway = UnixStream::connect(socket)?;
    let _ = client.set_nodelay(true);
    let (mut client_r, mut gateway_w) = (client.try_clone()?, gateway.try_clone()?);
    let upstream = thread::spawn(move || {
        let _ = io::copy(&mut client_r, &mut gateway_w);
        let _ = gateway_w.shutdown(Shutdown::Write);
    });
    let (mut gateway_r, mut client_w) = (gateway, client);
    let _ = io::copy(&mut gateway_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}
