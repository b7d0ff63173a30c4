//! [`ProcessHandle`]: a process that need not be our child (the QEMU a
//! `gmemctl launch` started, say), held through a pidfd, so that signalling
//! it or waiting for it can never hit another process that later got the
//! same pid.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A process, by pidfd (Linux 5.3 or later).
#[derive(Debug)]
pub struct ProcessHandle {
    pid: u32,
    fd: OwnedFd,
}

impl ProcessHandle {
    /// Takes hold of process `pid`. Fails if there is none.
    pub fn open(pid: u32) -> io::Result<ProcessHandle> {
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))?;
        // SAFETY: pidfd_open takes a pid and flags by value and returns a
        // new descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(io::Error::other)?;
        // SAFETY: pidfd_open just returned this descriptor and nothing
        // else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ProcessHandle { pid, fd })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits up to `timeout` for the process to exit (a zombie counts: its
    /// parent reaps it); whether it has.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let mut poll = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: `poll` is one valid pollfd that outlives the call.
            let ready = unsafe { libc::poll(&mut poll, 1, ms) };
            match ready {
                0 => return Ok(false),
                n if n > 0 => return Ok(true),
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> io::Result<bool> {
        self.wait_exit(Duration::ZERO)
    }

    /// Sends SIGKILL; a process that has already exited is not an error.
    pub fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes the pidfd and signal by value; a
        // null siginfo is allowed and means "as kill(2) would send it".
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ESRCH) {
                return Err(error);
            }
        }
        Ok(())
    }

    /// `/proc/<pid>/<name>` as text. Checked against the pidfd afterwards:
    /// had the process exited meanwhile, the pid might name another one.
    pub fn proc_file(&self, name: &str) -> io::Result<String> {
        let path = format!("/proc/{}/{name}", self.pid);
        let bytes = fs::read(&path)?;
        if self.has_exited()? {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("process {} has exited", self.pid)));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The process's arguments, from `/proc/<pid>/cmdline`.
    pub fn cmdline(&self) -> io::Result<Vec<String>> {
        let text = self.proc_file("cmdline")?;
        Ok(text.strip_suffix('\0').unwrap_or(&text).split('\0').map(str::to_owned).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn kills_and_sees_the_exit() {
        let mut child = Command::new("sleep").args(["60", "30"]).stdin(Stdio::null()).spawn().expect("sleep");
        let handle = ProcessHandle::open(child.id()).expect("pidfd");
        // The kernel may show an empty command line until the exec is done.
        let mut cmdline = handle.cmdline().expect("cmdline");
        for _ in 0..1000 {
            if cmdline != [""] {
                break;
            }
            std::thread::yield_now();
            cmdline = handle.cmdline().expect("cmdline");
        }
        assert_eq!(cmdline, ["sleep", "60", "30"]);
        assert!(!handle.has_exited().expect("poll"));
        handle.kill().expect("kill");
        assert!(handle.wait_exit(Duration::from_secs(10)).expect("poll"));
        assert!(handle.proc_file("cmdline").is_err(), "a zombie's files are not read");
        child.wait().expect("reap");
        handle.kill().expect("a second kill of a gone process is fine");
    }
}
