//! The old program's side of an exec upgrade: pause, record, exec; and
//! undo all three when the exec fails.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gmem_protocol::{RequestId, UpgradeArgs};

use super::record::{HandoverRecord, InheritedRegion, Requester, HANDOVER_VERSION};
use crate::daemon::{Daemon, QuiesceError};

/// How long the pause waits for every connection to finish the message,
/// and every ring the request, it is in.
const PAUSE_PATIENCE: Duration = Duration::from_secs(5);

/// Why an upgrade did not happen; the running program goes on unchanged.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Another upgrade is being made.
    #[error("an upgrade is already under way")]
    Underway,
    /// State that cannot cross an exec.
    #[error("cannot upgrade now: {0}")]
    NotNow(String),
    /// The program to exec is not usable.
    #[error("cannot exec {path}: {why}")]
    Program { path: PathBuf, why: String },
    /// Not every thread paused.
    #[error("the device did not pause: {0}")]
    Pause(#[from] QuiesceError),
    /// The record could not be written or its fds kept open.
    #[error("preparing the handover: {0}")]
    Prepare(std::io::Error),
    /// execve failed.
    #[error("exec of {path} failed: {source}")]
    Exec { path: PathBuf, source: std::io::Error },
}

/// What the running program is, for its own replacement: its command
/// line, itself (to go back to), and the listening sockets it serves.
#[derive(Debug)]
pub struct RunningImage {
    /// The command line, which the next program gets too.
    pub argv: Vec<OsString>,
    /// The path it was started from: what `upgrade` execs by default, so
    /// that a package upgrade that replaced the file is picked up.
    pub program: PathBuf,
    /// The program file itself, open: the way back if the new program
    /// refuses, even after the path was replaced.
    pub program_file: File,
    /// The vhost-user listening socket.
    pub vhost_listener: RawFd,
    /// The control listening socket.
    pub control_listener: Option<RawFd>,
}

impl RunningImage {
    /// This process's image, serving `vhost_listener` and `control_listener`.
    pub fn current(vhost_listener: RawFd, control_listener: Option<RawFd>) -> std::io::Result<Self> {
        let program = std::env::current_exe()?;
        // O_PATH is enough to exec through, and works on a file only
        // executable, not readable.
        let program_file = crate::sys::open_path(Path::new("/proc/self/exe"))?;
        Ok(RunningImage {
            argv: std::env::args_os().collect(),
            program,
            program_file,
            vhost_listener,
            control_listener,
        })
    }

    fn listeners(&self) -> u32 {
        1 + u32::from(self.control_listener.is_some())
    }
}

/// Upgrades the daemon by exec, one upgrade at a time.
#[derive(Debug)]
pub struct Upgrader {
    daemon: Arc<Daemon>,
    image: RunningImage,
    underway: Mutex<()>,
}

impl Upgrader {
    /// The upgrader of `daemon`, running as `image`.
    pub fn new(daemon: Arc<Daemon>, image: RunningImage) -> Self {
        Upgrader { daemon, image, underway: Mutex::new(()) }
    }

    /// Replaces this program by `args.binary` (by default the path it was
    /// started from). Returns only if that did not happen; then everything
    /// goes on as before. Once the exec is made, the program that ends up
    /// running answers the request on `requester` (with `id`).
    pub fn upgrade(&self, args: &UpgradeArgs, requester: RawFd, id: Option<&RequestId>) -> UpgradeError {
        let Ok(_one) = self.underway.try_lock() else { return UpgradeError::Underway };
        if let Some(why) = self.obstacle() {
            return UpgradeError::NotNow(why);
        }
        let program = args.binary.as_ref().map_or_else(|| self.image.program.clone(), PathBuf::from);
        if let Err(why) = check_program(&program) {
            return UpgradeError::Program { path: program, why };
        }
        let paused_at_ns = crate::sys::monotonic_ns();
        if !self.daemon.quiesce.begin() {
            return UpgradeError::Underway;
        }
        let error = match self.daemon.quiesce.wait_parked(
            self.image.listeners(),
            || self.daemon.frontend_ids(),
            PAUSE_PATIENCE,
        ) {
            Ok(connections) => {
                let record = HandoverRecord {
                    version: HANDOVER_VERSION,
                    from_version: env!("CARGO_PKG_VERSION").to_string(),
                    regions: self
                        .daemon
                        .regions
                        .iter()
                        .map(|region| InheritedRegion { record: region.record(), fd: region.raw_fd() })
                        .collect(),
                    disk: self.daemon.device.disk().file().as_raw_fd(),
                    vhost_listener: self.image.vhost_listener,
                    control_listener: self.image.control_listener,
                    next_frontend_id: self.daemon.peek_next_frontend_id(),
                    connections,
                    requester: Some(Requester {
                        fd: requester,
                        id: id.cloned(),
                        program: program.display().to_string(),
                    }),
                    queue_counters: self.daemon.device.queues().iter().map(|q| q.counters()).collect(),
                    write_cache: self.daemon.device.disk().write_cache(),
                    pins: self.daemon.pins.snapshot(),
                    paused_at_ns,
                };
                self.exec(&program, &record)
            }
            Err(error) => error.into(),
        };
        self.daemon.quiesce.end();
        error
    }

    /// What keeps an upgrade from being made now, if anything.
    fn obstacle(&self) -> Option<String> {
        if self.daemon.quitting() {
            return Some("gmemd is shutting down".into());
        }
        if let Some(frontend) = self.daemon.postcopy_owner() {
            return Some(format!(
                "frontend {frontend} is in postcopy: its userfaultfd registration does not survive an exec; \
                 upgrade after the migration"
            ));
        }
        if self.daemon.migration.orphaned() {
            return Some("a postcopy registration outlives its frontend; upgrade after postcopy-abort".into());
        }
        let waiting: Vec<&str> =
            self.daemon.regions.slots().filter(|(_, live)| live.is_none()).map(|(spec, _)| spec.id.as_str()).collect();
        if !waiting.is_empty() {
            return Some(format!("regions {waiting:?} still wait to be taken back from their frontend"));
        }
        None
    }

    /// Execs `program` with `record`; returns only on failure, having
    /// closed on exec again what it opened up.
    fn exec(&self, program: &Path, record: &HandoverRecord) -> UpgradeError {
        let memfd = match record.to_memfd() {
            Ok(memfd) => memfd,
            Err(error) => return UpgradeError::Prepare(error),
        };
        let mut kept = record.fds();
        kept.extend([memfd.as_raw_fd(), self.image.program_file.as_raw_fd()]);
        let restore = |fds: &[RawFd]| {
            for fd in fds {
                let _ = crate::sys::set_cloexec(*fd, true);
            }
        };
        for (done, fd) in kept.iter().enumerate() {
            if let Err(error) = crate::sys::set_cloexec(*fd, false) {
                restore(&kept[..done]);
                return UpgradeError::Prepare(error);
            }
        }
        let handover = format!("{}:{}", memfd.as_raw_fd(), self.image.program_file.as_raw_fd());
        let env = super::exec_environment(&[(super::HANDOVER_ENV, &handover)]);
        let mut argv = vec![program.as_os_str().to_owned()];
        argv.extend(self.image.argv.iter().skip(1).cloned());
        let argv = super::exec_arguments(&argv);
        let path = CString::new(program.as_os_str().as_bytes()).unwrap_or_default();
        log::info!("upgrade: exec {} ({} connections paused)", program.display(), record.connections.len());
        // SAFETY: every pointer array is NULL-terminated over CStrings that
        // outlive the call; execve only returns on failure.
        unsafe { libc::execve(path.as_ptr(), super::pointers(&argv).as_ptr(), super::pointers(&env).as_ptr()) };
        let source = std::io::Error::last_os_error();
        restore(&kept);
        UpgradeError::Exec { path: program.to_path_buf(), source }
    }
}

/// Whether `path` is a file this process may execute.
fn check_program(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}
