//! The accept loop both of gmemd's sockets run: peer check, back-off when
//! the process or system is out of fds, a pause for an exec upgrade, quit.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::daemon::Daemon;
use crate::peers::PeerPolicy;
use crate::sys::{peer_credentials, poll_readable_for, PeerCredentials};

/// The first wait after accept fails for want of fds; it doubles up to
/// [`MAX_BACKOFF`] while the failures go on.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` until the daemon quits, handing each
/// one whose peer `policy` allows to `accepted`. `name` names the socket
/// in the log.
pub fn accept_loop(
    daemon: &Daemon,
    listener: &UnixListener,
    name: &str,
    policy: &PeerPolicy,
    mut accepted: impl FnMut(UnixStream, PeerCredentials),
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut backoff: Option<Duration> = None;
    loop {
        // While backing off, the listener is not polled: it stays readable
        // with the connection that could not be taken, and polling it would spin.
        let (ready, timeout) = match backoff {
            Some(delay) => (
                poll_readable_for([daemon.quit_event(), daemon.quiesce.event()], Some(delay))
                    .map(|[q, p]| [q, p, true])?,
                true,
            ),
            None => (poll_readable_for([daemon.quit_event(), daemon.quiesce.event(), listener], None)?, false),
        };
        let [quit, pause, readable] = ready;
        if quit {
            return Ok(());
        }
        if pause && daemon.quiesce.pausing() {
            daemon.quiesce.park_listener();
            continue;
        }
        if !readable && !timeout {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                backoff = None;
                match peer_credentials(&stream) {
                    Ok(peer) if policy.allows(&peer) => accepted(stream, peer),
                    Ok(peer) => log::warn!(
                        "{name}: refused pid {} uid {} gids {:?}: only {} may connect",
                        peer.pid,
                        peer.uid,
                        peer.gids,
                        policy.describe()
                    ),
                    Err(error) => log::warn!("{name}: refused a peer whose credentials cannot be read: {error}"),
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => backoff = None,
            Err(error) => {
                let delay = backoff.map_or(FIRST_BACKOFF, |d| (d * 2).min(MAX_BACKOFF));
                backoff = Some(delay);
                log::error!("{name}: accept: {error}; trying again in {delay:?}");
            }
        }
    }
}
