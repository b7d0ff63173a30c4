//! `--qemu-nodelay`: TCP_NODELAY on QEMU's migration connections, set from
//! outside, to see what Nagle's algorithm costs a postcopy page request.
//!
//! QEMU 10.0 sets TCP_NODELAY on its multifd connections only, not on the
//! main migration connection (whose reverse direction carries the page
//! requests) or the postcopy-preempt one. This takes a duplicate of each of
//! those sockets from the running QEMU (`pidfd_getfd(2)`, which needs
//! ptrace rights: root) and sets the option on it; a socket option belongs
//! to the socket, so QEMU's own descriptor has it from then on. An
//! experiment, not something to run in production.

use std::collections::HashSet;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// TCP states in `/proc/<pid>/net/tcp`: 01 is ESTABLISHED.
const ESTABLISHED: &str = "01";

/// The inodes of `pid`'s network namespace's established TCP sockets
/// with `port` at either end.
fn socket_inodes(pid: u32, port: u16) -> Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, local, remote, state, ..] = fields.as_slice() else { continue };
            let port_of = |address: &str| address.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == ESTABLISHED && (port_of(local) == Some(port) || port_of(remote) == Some(port)) {
                if let Some(inode) = fields.get(9).and_then(|i| i.parse::<u64>().ok()) {
                    inodes.insert(inode);
                }
            }
        }
    }
    Ok(inodes)
}

/// `pid`'s descriptors that are sockets among `inodes`.
fn socket_fds(pid: u32, inodes: &HashSet<u64>) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else { continue };
        let inode = target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok());
        if inode.is_some_and(|i| inodes.contains(&i)) {
            if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                fds.push(fd);
            }
        }
    }
    Ok(fds)
}

/// A syscall's result as a descriptor we own.
fn owned(result: libc::c_long, what: &str) -> Result<OwnedFd> {
    if result < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_owned());
    }
    let fd = i32::try_from(result).context("descriptor out of range")?;
    // SAFETY: the kernel just returned this descriptor to us and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets TCP_NODELAY on `pid`'s socket `fd`.
fn set_nodelay(pid: u32, fd: i32) -> Result<()> {
    // SAFETY: pidfd_open takes a pid and flags by value and touches no
    // memory of ours.
    let pidfd = owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) }, "pidfd_open")?;
    // SAFETY: pidfd_getfd takes two descriptors and flags by value; `pidfd`
    // is open for the call.
    let socket = owned(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) }, "pidfd_getfd")?;
    let on: libc::c_int = 1;
    // SAFETY: `socket` is open, and the option value is a live c_int whose
    // size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt TCP_NODELAY");
    }
    Ok(())
}

/// How often [`set_on_migration_sockets`] looks for new connections: QEMU
/// 10.0 opens the postcopy-preempt one at the switch to postcopy, when the
/// first page requests follow at once.
const POLL: Duration = Duration::from_millis(2);

/// Sets TCP_NODELAY on each established TCP socket of `pid` with `port` at
/// one end as it appears, until there have been `count`; gives up after
/// `timeout`. Returns how many it set.
pub fn set_on_migration_sockets(pid: u32, port: u16, count: usize, timeout: Duration) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut done = HashSet::new();
    loop {
        for fd in socket_fds(pid, &socket_inodes(pid, port)?)? {
            if done.insert(fd) {
                set_nodelay(pid, fd).with_context(|| format!("QEMU {pid}'s descriptor {fd}"))?;
            }
        }
        if done.len() >= count {
            return Ok(done.len());
        }
        if Instant::now() >= deadline {
            bail!("QEMU {pid} had {} connections with port {port} in {timeout:?}, not {count}", done.len());
        }
        sleep(POLL);
    }
}
