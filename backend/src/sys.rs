//! Thin wrappers over the Linux calls that more than one part of the daemon makes.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use vmm_sys_util::eventfd::EventFd;

/// The credentials the kernel recorded for the peer of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Peer process id.
    pub pid: i32,
    /// Peer user id.
    pub uid: u32,
}

/// SO_PEERCRED of `stream`.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and sized for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCredentials { pid: cred.pid, uid: cred.uid })
}

/// Waits until at least one of `fds` is readable; returns which are.
/// Retries on EINTR.
pub fn poll_readable<const N: usize>(fds: [&dyn AsRawFd; N]) -> io::Result<[bool; N]> {
    let mut pollfds = fds.map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    let count = libc::nfds_t::try_from(N).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: `pollfds` is a valid array of N pollfds that outlives the call.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), count, -1) };
        if rc >= 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(pollfds.map(|p| p.revents != 0))
}

/// Waits until `socket` is readable (true) or `quit` fires (false).
pub fn wait_readable(socket: &impl AsRawFd, quit: &EventFd) -> io::Result<bool> {
    let [_, quitting] = poll_readable([socket, quit])?;
    Ok(!quitting)
}

/// SIGTERM and SIGINT, blocked in the calling thread and every thread it
/// starts afterwards, to be taken with [`TerminationSignals::wait`].
#[derive(Debug)]
pub struct TerminationSignals {
    set: libc::sigset_t,
}

/// Blocks SIGTERM and SIGINT; call before starting any thread.
pub fn block_termination_signals() -> io::Result<TerminationSignals> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset and pthread_sigmask
    // only read and write that set and the thread's own mask.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        set
    };
    Ok(TerminationSignals { set })
}

impl TerminationSignals {
    /// Waits for one of the signals; returns its number.
    pub fn wait(&self) -> Option<i32> {
        let mut signal = 0;
        // SAFETY: `self.set` is an initialised sigset and `signal` is writable.
        let rc = unsafe { libc::sigwait(&self.set, &mut signal) };
        (rc == 0).then_some(signal)
    }
}

/// Binds a unix socket at `path` with mode 0600, replacing a stale socket
/// (one nobody listens on any more), but never a live one (another gmemd's:
/// taking it over would cut that daemon's frontends off from it) nor another
/// kind of file.
pub fn bind_private_socket(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket (a gmemd already running?); stop it or choose another path",
                ));
            }
            std::fs::remove_file(path)?;
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        drop(bind_private_socket(&path).expect("first bind"));
        // Nobody listens on the path any more: replaced.
        let live = bind_private_socket(&path).expect("bind over a stale socket");
        let error = bind_private_socket(&path).expect_err("bind over a live socket");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse, "{error}");
        assert!(error.to_string().contains("another process is listening"), "{error}");
        // The live listener still owns the path.
        let _client = UnixStream::connect(&path).expect("connect");
        live.accept().expect("the first listener gets the connection");
    }

    #[test]
    fn another_kind_of_file_is_never_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        std::fs::write(&path, b"keep me").expect("write");
        assert!(bind_private_socket(&path).is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"keep me");
    }
}
