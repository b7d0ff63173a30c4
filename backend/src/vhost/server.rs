//! The vhost-user listener: accepts any number of frontends, each on a thread
//! of its own, and keeps listening when they go. Two frontends at once is the
//! normal case during a QEMU live update (cpr-transfer), when the new QEMU
//! handshakes while the old one still runs the guest.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::FrontendConnection;
use crate::daemon::{Daemon, FrontendStatus};
use crate::sys::{peer_credentials, wait_readable};

/// Serves frontends on `listener` until the daemon quits; returns once every
/// connection thread has ended (and so every vring worker has stopped).
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while wait_readable(&listener, daemon.quit_event())? {
        match listener.accept() {
            Ok((stream, _)) => {
                connections.retain(|c| !c.is_finished());
                match spawn_connection(Arc::clone(&daemon), stream) {
                    Ok(handle) => connections.push(handle),
                    Err(error) => log::error!("cannot start a frontend connection: {error}"),
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => log::error!("accepting a frontend: {error}"),
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
    Ok(())
}

fn spawn_connection(daemon: Arc<Daemon>, stream: UnixStream) -> io::Result<JoinHandle<()>> {
    stream.set_nonblocking(false)?;
    let id = daemon.next_frontend_id();
    let pid = peer_credentials(&stream).ok().map(|c| c.pid);
    let status = Arc::new(FrontendStatus::new(id, pid, stream.try_clone()?));
    std::thread::Builder::new().name(format!("frontend-{id}")).spawn(move || {
        log::info!("frontend {id} connected (pid {pid:?})");
        daemon.frontend_connected(Arc::clone(&status));
        let connection = Arc::new(Mutex::new(FrontendConnection::new(Arc::clone(&daemon), status)));
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&connection));
        loop {
            match handler.handle_request() {
                Ok(()) => {}
                // The handler already nacked it; the frontend decides.
                Err(VhostError::ReqHandlerError(error)) => log::warn!("frontend {id}: request failed: {error}"),
                Err(VhostError::Disconnected) | Err(VhostError::PartialMessage) => break,
                Err(error) if daemon.quitting() => {
                    log::debug!("frontend {id}: closed for shutdown ({error})");
                    break;
                }
                Err(error) => {
                    log::error!("frontend {id}: {error}; closing this connection (gmemd keeps serving)");
                    break;
                }
            }
        }
        // Dropping the last reference stops the connection's vring workers.
        drop(handler);
        drop(connection);
        daemon.frontend_disconnected(id);
        log::info!("frontend {id} disconnected; guest RAM kept");
    })
}
