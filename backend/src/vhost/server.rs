//! The vhost-user listener: accepts any number of frontends, each on a
//! thread of its own, and keeps listening when they go. Two frontends at
//! once is the normal case during a QEMU live update (cpr-transfer), when
//! the new QEMU handshakes while the old one still runs the guest.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::dispatch;
use super::FrontendConnection;
use crate::daemon::{Daemon, FrontendStatus};

/// The connection threads, joined when the daemon exits.
#[derive(Debug, Default)]
pub struct ConnectionThreads(Vec<JoinHandle<()>>);

impl ConnectionThreads {
    /// Starts the thread serving `connection` over `socket`; `status` is
    /// already registered with the daemon.
    pub fn spawn(&mut self, daemon: &Arc<Daemon>, connection: FrontendConnection, socket: UnixStream) {
        self.0.retain(|c| !c.is_finished());
        let id = connection.id();
        let daemon = Arc::clone(daemon);
        let spawned = std::thread::Builder::new().name(format!("frontend-{id}")).spawn(move || {
            dispatch::serve(&daemon, connection, socket);
            // The connection was dropped at the end of `serve`: its workers
            // have stopped and its queues are released.
            daemon.frontend_disconnected(id);
            log::info!("frontend {id} disconnected; guest RAM kept");
        });
        match spawned {
            Ok(thread) => self.0.push(thread),
            Err(error) => log::error!("frontend {id}: cannot start its thread: {error}"),
        }
    }

    /// Waits for every connection thread (after the daemon quit).
    pub fn join(self) {
        for thread in self.0 {
            let _ = thread.join();
        }
    }
}

/// Serves frontends on `listener` until the daemon quits; returns once every
/// connection thread has ended (and so every vring worker has stopped).
/// `threads` holds connections a previous gmemd image handed over.
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener, mut threads: ConnectionThreads) -> io::Result<()> {
    let policy = daemon.options.frontend_policy.clone();
    let accepted = crate::listener::accept_loop(&daemon, &listener, "vhost-user socket", &policy, |stream, peer| {
        let Ok(handle) = stream.try_clone() else {
            log::error!("vhost-user socket: cannot duplicate a new connection's socket; closing it");
            return;
        };
        let id = daemon.next_frontend_id();
        let status = Arc::new(FrontendStatus::new(id, Some(peer.pid), handle));
        let Some(status) = daemon.frontend_connected(status) else {
            log::warn!(
                "vhost-user socket: refused pid {}: {} frontends are connected already (--max-frontends)",
                peer.pid,
                daemon.options.max_frontends
            );
            return;
        };
        log::info!("frontend {id} connected (pid {})", peer.pid);
        threads.spawn(&daemon, FrontendConnection::new(Arc::clone(&daemon), status), stream);
    });
    threads.join();
    accepted
}
