//! Thin wrappers over the Linux calls that more than one part of the daemon makes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// A non-blocking eventfd of gmemd's own (a wake-up or quit signal),
/// closed on exec: a new gmemd image makes its own.
pub fn eventfd() -> io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// The credentials the kernel recorded for the peer of a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Peer process id.
    pub pid: i32,
    /// Peer user id.
    pub uid: u32,
    /// Peer primary group id and supplementary groups (SO_PEERGROUPS).
    pub gids: Vec<u32>,
}

/// SO_PEERCRED and SO_PEERGROUPS of `stream`.
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
    let mut gids = vec![cred.gid];
    // A peer has at most NGROUPS_MAX (65536) groups; ask with a buffer
    // that fits them all, so the call never needs a second try.
    let mut groups = vec![0 as libc::gid_t; 65536];
    let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `groups` is valid for `len` bytes of writes; the kernel writes
    // at most that many and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 {
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        gids.extend(groups.iter().take(count).filter(|g| **g != cred.gid));
    }
    Ok(PeerCredentials { pid: cred.pid, uid: cred.uid, gids })
}

/// Waits until at least one of `fds` is readable, or `timeout` passes
/// (`None`: forever); returns which are readable. Retries on EINTR.
pub fn poll_readable_for<const N: usize>(fds: [&dyn AsRawFd; N], timeout: Option<Duration>) -> io::Result<[bool; N]> {
    let mut pollfds = fds.map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    let count = libc::nfds_t::try_from(N).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(deadline) => {
                // Rounded up, so a wait of under a millisecond still waits.
                let left = deadline.saturating_duration_since(Instant::now());
                libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `pollfds` is a valid array of N pollfds that outlives the call.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), count, ms) };
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

/// Waits until at least one of `fds` is readable; returns which are.
pub fn poll_readable<const N: usize>(fds: [&dyn AsRawFd; N]) -> io::Result<[bool; N]> {
    poll_readable_for(fds, None)
}

/// Waits until `socket` is readable (true) or `quit` fires (false).
pub fn wait_readable(socket: &impl AsRawFd, quit: &EventFd) -> io::Result<bool> {
    let [_, quitting] = poll_readable([socket, quit])?;
    Ok(!quitting)
}

/// Sets or clears O_NONBLOCK on `fd`'s open file description.
pub fn set_nonblocking(fd: &impl AsRawFd, nonblocking: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid fd with integer arguments.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if nonblocking { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
        if libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets or clears FD_CLOEXEC on `fd`: an fd that must survive gmemd's exec
/// of its own new image has it cleared just before, and set again if the
/// exec fails.
pub fn set_cloexec(fd: RawFd, cloexec: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on an fd number with integer arguments; an
    // invalid number fails with EBADF.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if cloexec { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A close-on-exec duplicate of `fd`.
pub fn duplicate(fd: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd number; an invalid one fails with
    // EBADF, and a new fd is owned by nothing else.
    unsafe {
        let new = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
        if new < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(std::os::fd::OwnedFd::from_raw_fd(new))
    }
}

/// Opens `path` with O_PATH (close-on-exec): enough to exec the file
/// through, and allowed on a file that may be executed but not read.
pub fn open_path(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(path)
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock before and after an exec.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Checks that `listener` is a listening socket (SO_ACCEPTCONN).
pub fn check_listening(listener: &UnixListener) -> io::Result<()> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if accepting == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the socket is not listening"));
    }
    Ok(())
}

/// What `/proc/self/fd/<fd>` links to: `anon_inode:[eventfd]`,
/// `/memfd:name (deleted)`, `pipe:[123]`, a path...
pub fn fd_target(fd: &impl AsRawFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Why an fd a frontend sent is not the eventfd gmemd needs.
#[derive(Debug, thiserror::Error)]
pub enum EventFdError {
    /// Another kind of file (a pipe, /dev/zero, a socket...).
    #[error("not an eventfd but {0}")]
    NotEventFd(String),
    /// An EFD_SEMAPHORE eventfd: one read takes one count, so a counter
    /// near 2^64 would read as a kick forever.
    #[error("a semaphore-mode eventfd (EFD_SEMAPHORE), which would read as a kick forever")]
    Semaphore,
    /// /proc could not be read.
    #[error("cannot inspect it: {0}")]
    Io(#[from] io::Error),
}

/// Takes `file` as an eventfd after checking it is one, in counter (not
/// semaphore) mode, and makes it non-blocking: a frontend may send any fd
/// in the place of an eventfd, and a pipe or a blocking eventfd at its
/// maximum count would otherwise spin or block the thread using it.
/// O_NONBLOCK is set on the open file description the frontend shares;
/// QEMU creates its eventfds non-blocking already.
pub fn checked_eventfd(file: File) -> Result<EventFd, EventFdError> {
    let target = fd_target(&file)?;
    if target.as_os_str() != "anon_inode:[eventfd]" {
        return Err(EventFdError::NotEventFd(target.display().to_string()));
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd()))?;
    let semaphore =
        info.lines().any(|l| l.split_once(':').is_some_and(|(k, v)| k == "eventfd-semaphore" && v.trim() == "1"));
    if semaphore {
        return Err(EventFdError::Semaphore);
    }
    set_nonblocking(&file, true)?;
    use std::os::fd::IntoRawFd;
    // SAFETY: `file` owned the fd, which is an eventfd (checked above);
    // ownership moves to the EventFd.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

/// A new memfd named `name`, close-on-exec plus `flags`. It is created
/// no-exec where the kernel can (Linux 6.3+): nothing in it is ever
/// executed from the host side.
pub fn memfd(name: &str, flags: libc::c_uint) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let base = libc::MFD_CLOEXEC | flags;
    for flags in [base | libc::MFD_NOEXEC_SEAL, base] {
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create does
        // not keep the pointer.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: memfd_create returned a new fd that nothing else owns.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) || flags == base {
            return Err(error);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

/// The seals of a memfd (F_GET_SEALS); an error for files that take none.
pub fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS on an owned fd; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// Adds `seals` to a memfd (F_ADD_SEALS).
pub fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on an owned fd with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why shared memory a frontend sent cannot be mapped safely.
#[derive(Debug, thiserror::Error)]
pub enum SharedFileError {
    /// fstat failed.
    #[error("fstat: {0}")]
    Stat(io::Error),
    /// The file is shorter than the range the frontend names.
    #[error("the file holds {len:#x} bytes, less than the {end:#x} the range needs")]
    Short { len: u64, end: u64 },
    /// The file could shrink later, which would turn gmemd's accesses into SIGBUS.
    #[error("it can shrink under gmemd (no F_SEAL_SHRINK, and it cannot be added: {0}); send a memfd sealed against shrinking (QEMU's memory-backend-memfd does this by default)")]
    Unsealable(io::Error),
}

/// Whether a shared file can shrink under gmemd.
#[derive(Debug)]
pub enum SizePin {
    /// Sealed against shrinking (gmemd added the seal if it was missing).
    Sealed,
    /// No seal can be added: the file may be truncated later.
    Unsealable(io::Error),
}

/// Makes sure `file` covers `[0, end)`, and seals it against shrinking if
/// it is not sealed yet and allows it, so that a later truncation cannot
/// turn gmemd's accesses into SIGBUS. Says whether it could.
pub fn pin_shared_file_size(file: &File, end: u64) -> Result<SizePin, SharedFileError> {
    let pin = match seals(file) {
        Ok(current) if current & libc::F_SEAL_SHRINK != 0 => SizePin::Sealed,
        Ok(_) => match add_seals(file, libc::F_SEAL_SHRINK) {
            Ok(()) => SizePin::Sealed,
            Err(error) => SizePin::Unsealable(error),
        },
        Err(error) => SizePin::Unsealable(error),
    };
    // Measured after sealing, when the size can no longer go down.
    let len = file.metadata().map_err(SharedFileError::Stat)?.len();
    if len < end {
        return Err(SharedFileError::Short { len, end });
    }
    Ok(pin)
}

/// Like [`pin_shared_file_size`], for memory gmemd only accepts sealed.
pub fn require_sealed_size(file: &File, end: u64) -> Result<(), SharedFileError> {
    match pin_shared_file_size(file, end)? {
        SizePin::Sealed => Ok(()),
        SizePin::Unsealable(error) => Err(SharedFileError::Unsealable(error)),
    }
}

/// SIGTERM, SIGINT and SIGHUP, blocked in the calling thread and every
/// thread it starts afterwards, to be taken with [`TerminationSignals::wait`].
#[derive(Debug)]
pub struct TerminationSignals {
    set: libc::sigset_t,
}

/// Blocks SIGTERM, SIGINT and SIGHUP; call before starting any thread.
pub fn block_termination_signals() -> io::Result<TerminationSignals> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset and pthread_sigmask
    // only read and write that set and the thread's own mask.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
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

/// How a listening socket's file is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Group to give the socket file, if not the daemon's.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess { mode: 0o600, group: None }
    }
}

/// Binds a unix socket at `path` with `access`, replacing a stale socket
/// (one nobody listens on any more), but never a live one (another gmemd's:
/// taking it over would cut that daemon's frontends off from it) nor another
/// kind of file.
pub fn bind_socket(path: &Path, access: SocketAccess) -> io::Result<UnixListener> {
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
    let finish = || {
        if let Some(gid) = access.group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
    };
    if let Err(error) = finish() {
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EFD_SEMAPHORE};

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        drop(bind_socket(&path, SocketAccess::default()).expect("first bind"));
        // Nobody listens on the path any more: replaced.
        let live = bind_socket(&path, SocketAccess::default()).expect("bind over a stale socket");
        let error = bind_socket(&path, SocketAccess::default()).expect_err("bind over a live socket");
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
        assert!(bind_socket(&path, SocketAccess::default()).is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"keep me");
    }

    #[test]
    fn socket_mode_is_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.sock");
        let _listener = bind_socket(&path, SocketAccess { mode: 0o660, group: None }).expect("bind");
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o660);
    }

    #[test]
    fn only_counter_mode_eventfds_are_taken() {
        use std::os::fd::IntoRawFd;
        // SAFETY: into_raw_fd hands over the fd, which the File then owns.
        let file_of = |eventfd: EventFd| unsafe { File::from_raw_fd(eventfd.into_raw_fd()) };
        let counter = EventFd::new(0).expect("eventfd");
        let file = file_of(counter.try_clone().expect("dup"));
        let taken = checked_eventfd(file).expect("a counter eventfd");
        taken.write(3).expect("write");
        assert_eq!(counter.read().expect("read"), 3, "the same eventfd");
        let semaphore = EventFd::new(EFD_SEMAPHORE | EFD_NONBLOCK).expect("eventfd");
        let file = file_of(semaphore);
        assert!(matches!(checked_eventfd(file), Err(EventFdError::Semaphore)));
        let (reader, _writer) = std::io::pipe().expect("pipe");
        let file = File::from(std::os::fd::OwnedFd::from(reader));
        assert!(matches!(checked_eventfd(file), Err(EventFdError::NotEventFd(t)) if t.starts_with("pipe:")));
    }

    #[test]
    fn shared_files_are_sealed_against_shrinking_and_measured() {
        let sealable = memfd("t", libc::MFD_ALLOW_SEALING).expect("memfd");
        sealable.set_len(8192).expect("size");
        require_sealed_size(&sealable, 8192).expect("sealed by gmemd");
        assert!(sealable.set_len(4096).is_err(), "shrinking is refused from now on");
        assert!(matches!(pin_shared_file_size(&sealable, 8193), Err(SharedFileError::Short { .. })));
        let unsealable = tempfile::tempfile().expect("a file that takes no seals");
        unsealable.set_len(8192).expect("size");
        assert!(matches!(pin_shared_file_size(&unsealable, 4096), Ok(SizePin::Unsealable(_))));
        assert!(matches!(require_sealed_size(&unsealable, 4096), Err(SharedFileError::Unsealable(_))));
    }
}
