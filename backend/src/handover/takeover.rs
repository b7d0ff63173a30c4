//! The new program's side of an exec upgrade: take everything the record
//! names, from duplicates of its fds, or go back to the previous program.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use gmem_protocol::{ErrorClass, ErrorReply, Reply, UpgradeInfo};

use super::record::HandoverRecord;
use crate::blk::{CacheMode, Disk, DiskError};
use crate::daemon::{Daemon, FrontendStatus};
use crate::memory::{RegionError, RegionSet};
use crate::record::ConnectionRecord;
use crate::vhost::{ConnectionThreads, FrontendConnection};

/// Why the new program cannot take over.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The environment variable is not `<fd>:<fd>`.
    #[error("${env} is {0:?}, not <record fd>:<program fd>", env = super::HANDOVER_ENV)]
    Envelope(String),
    /// The record cannot be read.
    #[error("{0}")]
    Record(String),
    /// An fd the record names is not open.
    #[error("{what} (fd {fd}) is not open: {source}")]
    Fd { what: String, fd: RawFd, source: std::io::Error },
    /// The regions cannot be taken.
    #[error(transparent)]
    Region(RegionError),
    /// The disk cannot be taken.
    #[error(transparent)]
    Disk(DiskError),
    /// A listening socket is not one.
    #[error("the {what} listening socket (fd {fd}) is not one: {why}")]
    Listener { what: &'static str, fd: RawFd, why: String },
    /// The daemon's own eventfds or threads cannot be made.
    #[error("setting up the daemon: {0}")]
    Daemon(std::io::Error),
    /// The pin ledger cannot be taken, or a region locked again.
    #[error(transparent)]
    Pins(crate::pins::PinsError),
    /// A connection cannot be carried on.
    #[error("frontend {id}: {why}")]
    Connection { id: u64, why: String },
    /// The new program does not take the old command line.
    #[error("the command line: {0}")]
    CommandLine(String),
    /// Test-only refusal.
    #[error("${env} is set", env = super::TEST_REFUSE_ENV)]
    TestRefusal,
}

/// A frontend connection rebuilt from its record, not yet running.
#[derive(Debug)]
pub struct Carried {
    status: Arc<FrontendStatus>,
    connection: FrontendConnection,
    socket: UnixStream,
    record: ConnectionRecord,
}

/// A handover this process was exec'd with.
#[derive(Debug)]
pub struct Takeover {
    record: HandoverRecord,
    record_file: File,
    previous_program: RawFd,
    /// Set when this is the previous program back: why the new one refused.
    refused: Option<String>,
}

impl Takeover {
    /// The handover this process was exec'd with, if it was. A record that
    /// cannot be read sends the process back to the previous program at
    /// once; only a malformed environment variable (no way back) is an error.
    pub fn from_env() -> Option<Result<Takeover, TakeoverError>> {
        let envelope = std::env::var(super::HANDOVER_ENV).ok()?;
        let Some((record_fd, previous_program)) = parse_envelope(&envelope) else {
            return Some(Err(TakeoverError::Envelope(envelope)));
        };
        // SAFETY: the previous program left this fd open for this process
        // alone; it is not used anywhere else.
        let record_file = unsafe { File::from_raw_fd(record_fd) };
        let refused = std::env::var(super::REFUSED_ENV).ok();
        let record = match HandoverRecord::from_file(&record_file) {
            Ok(record) => record,
            Err(why) => go_back(record_fd, previous_program, refused.is_some(), &TakeoverError::Record(why)),
        };
        let takeover = Takeover { record, record_file, previous_program, refused };
        if takeover.refused.is_none() && std::env::var_os(super::TEST_REFUSE_ENV).is_some() {
            takeover.refuse(&TakeoverError::TestRefusal);
        }
        Some(Ok(takeover))
    }

    /// Goes back to the previous program, which takes the handover again
    /// and tells the requester `why`. If this is the previous program
    /// already, there is nowhere to go: gmemd exits, and the frontends see
    /// a crash (which a restarted gmemd recovers from with the state file).
    pub fn refuse(self, why: &TakeoverError) -> ! {
        go_back(self.record_file.into_raw_fd(), self.previous_program, self.refused.is_some(), why)
    }

    /// The guest RAM regions.
    pub fn regions(&self) -> Result<RegionSet, TakeoverError> {
        let mut regions = Vec::with_capacity(self.record.regions.len());
        for region in &self.record.regions {
            let fd = duplicate(region.fd, || format!("region {}", region.record.spec.id))?;
            regions.push((region.record.clone(), File::from(fd)));
        }
        RegionSet::inherit(regions).map_err(TakeoverError::Region)
    }

    /// The disk image, known as `path`.
    pub fn disk(&self, path: &Path, readonly: bool, cache: CacheMode) -> Result<Disk, TakeoverError> {
        let fd = duplicate(self.record.disk, || "the disk image".into())?;
        let disk = Disk::inherit(File::from(fd), path, readonly, cache).map_err(TakeoverError::Disk)?;
        disk.set_write_cache(self.record.write_cache);
        Ok(disk)
    }

    /// The pin ledger, its pins pending until their regions are locked again.
    pub fn pins(&self, vm_id: &str, limit: gmem_pins::Limit) -> Result<crate::pins::Pins, TakeoverError> {
        let restart = gmem_pins::Restart::Exec { inherited_rings: Default::default() };
        crate::pins::Pins::restore(vm_id, limit, self.record.pins.clone(), &restart).map_err(TakeoverError::Pins)
    }

    /// The vhost-user and control listening sockets.
    pub fn listeners(&self) -> Result<(UnixListener, Option<UnixListener>), TakeoverError> {
        let vhost = listener(self.record.vhost_listener, "vhost-user")?;
        let control = self.record.control_listener.map(|fd| listener(fd, "control")).transpose()?;
        Ok((vhost, control))
    }

    /// Every frontend connection, rebuilt with its rings stopped.
    pub fn connections(&self, daemon: &Arc<Daemon>) -> Result<Vec<Carried>, TakeoverError> {
        self.record.connections.iter().map(|record| carry(daemon, record)).collect()
    }

    /// Commits: closes the fds of the previous program (only duplicates are
    /// used from here on), registers and restarts every connection on
    /// `threads`, and answers the requester.
    pub fn finish(self, daemon: &Arc<Daemon>, carried: Vec<Carried>, threads: &mut ConnectionThreads) {
        let requester_socket = self.record.requester.as_ref().and_then(|r| crate::sys::duplicate(r.fd).ok());
        for fd in self.record.fds().into_iter().chain([self.previous_program]) {
            // SAFETY: these fds were left open for this process and are
            // used by nothing but the duplicates taken above.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        daemon.continue_frontend_ids(self.record.next_frontend_id);
        for (queue, counters) in daemon.device.queues().iter().zip(&self.record.queue_counters) {
            queue.carry_on(counters);
        }
        let frontends = u32::try_from(carried.len()).unwrap_or(u32::MAX);
        for Carried { status, mut connection, socket, record } in carried {
            // As many as the previous program had, so within --max-frontends.
            let _ = daemon.frontend_connected(status);
            connection.resume(&record);
            threads.spawn(daemon, connection, socket);
        }
        let paused_us = crate::sys::monotonic_ns().saturating_sub(self.record.paused_at_ns) / 1000;
        let (Some(requester), Some(socket)) = (&self.record.requester, requester_socket) else { return };
        let reply = match &self.refused {
            None => {
                log::info!(
                    "took over from gmemd {} after a pause of {paused_us} µs: {frontends} frontend connections",
                    self.record.from_version
                );
                let info = UpgradeInfo {
                    from_version: self.record.from_version.clone(),
                    to_version: env!("CARGO_PKG_VERSION").to_string(),
                    binary: requester.program.clone(),
                    pid: std::process::id(),
                    frontends,
                    paused_us,
                };
                Reply::Return { value: serde_json::to_value(info).unwrap_or_default(), id: requester.id.clone() }
            }
            Some(why) => {
                let desc = format!(
                    "{} refused the handover: {why}; gmemd {} goes on (paused {paused_us} µs)",
                    requester.program,
                    env!("CARGO_PKG_VERSION")
                );
                log::warn!("upgrade: {desc}");
                Reply::Error { error: ErrorReply::new(ErrorClass::GenericError, desc), id: requester.id.clone() }
            }
        };
        answer(UnixStream::from(socket), &reply);
    }
}

/// Parses `<record fd>:<program fd>`.
fn parse_envelope(text: &str) -> Option<(RawFd, RawFd)> {
    let (record, program) = text.split_once(':')?;
    Some((record.parse().ok().filter(|fd| *fd >= 0)?, program.parse().ok().filter(|fd| *fd >= 0)?))
}

/// Execs the previous program through `previous_program` with the record
/// at `record_fd`, telling it `why`; exits if that cannot be done.
fn go_back(record_fd: RawFd, previous_program: RawFd, returned: bool, why: &TakeoverError) -> ! {
    if returned {
        log::error!("cannot take back the handover this gmemd made: {why}; exiting");
        std::process::exit(1);
    }
    log::error!("refusing the handover: {why}; going back to the previous gmemd");
    let why = why.to_string();
    let handover = format!("{record_fd}:{previous_program}");
    let env = super::exec_environment(&[(super::HANDOVER_ENV, &handover), (super::REFUSED_ENV, &why)]);
    let argv = super::exec_arguments(&std::env::args_os().collect::<Vec<_>>());
    // SAFETY: the pointer arrays are NULL-terminated over CStrings that
    // outlive the call; an empty path with AT_EMPTY_PATH execs the file
    // `previous_program` is open on. execveat only returns on failure.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            previous_program,
            c"".as_ptr(),
            super::pointers(&argv).as_ptr(),
            super::pointers(&env).as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    log::error!("cannot exec the previous gmemd again: {}; exiting", std::io::Error::last_os_error());
    std::process::exit(1);
}

/// A close-on-exec duplicate of `fd`, which stays the previous program's
/// until [`Takeover::finish`].
fn duplicate(fd: RawFd, what: impl FnOnce() -> String) -> Result<OwnedFd, TakeoverError> {
    crate::sys::duplicate(fd).map_err(|source| TakeoverError::Fd { what: what(), fd, source })
}

fn listener(fd: RawFd, what: &'static str) -> Result<UnixListener, TakeoverError> {
    let listener = UnixListener::from(duplicate(fd, || format!("the {what} listening socket"))?);
    crate::sys::check_listening(&listener).map_err(|e| TakeoverError::Listener { what, fd, why: e.to_string() })?;
    Ok(listener)
}

fn carry(daemon: &Arc<Daemon>, record: &ConnectionRecord) -> Result<Carried, TakeoverError> {
    let id = record.id;
    let fail = |why: String| TakeoverError::Connection { id, why };
    let mut duplicates = Vec::new();
    let dup_record = record
        .map_fds(|fd| {
            let owned = crate::sys::duplicate(fd)?;
            let raw = owned.as_raw_fd();
            duplicates.push(owned);
            Ok(raw)
        })
        .map_err(|e| fail(format!("an fd of its record is not open: {e}")))?;
    let socket = FrontendConnection::check_socket(duplicates.remove(0).into_raw_fd()).map_err(fail)?;
    let handle = socket.try_clone().map_err(|e| fail(format!("duplicating its socket: {e}")))?;
    let status = Arc::new(FrontendStatus::new(id, record.pid, handle));
    // Ownership of every other duplicate passes to the connection.
    for fd in duplicates {
        let _ = fd.into_raw_fd();
    }
    // SAFETY: every fd `dup_record` names (its socket aside) is a fresh
    // duplicate owned by nothing else, one per place the record names it,
    // and of the kind the previous program checked it to be.
    let connection = unsafe { FrontendConnection::from_record(Arc::clone(daemon), Arc::clone(&status), &dup_record) }
        .map_err(fail)?;
    Ok(Carried { status, connection, socket, record: dup_record })
}

/// Sends `reply` on the requester's control socket and closes it. The
/// reply is small; a client that does not read it loses it, and nothing waits.
fn answer(mut stream: UnixStream, reply: &Reply) {
    let _ = stream.set_nonblocking(true);
    let mut line = reply.to_line();
    line.push('\n');
    if let Err(error) = stream.write_all(line.as_bytes()) {
        log::warn!("upgrade: the requester did not take its reply: {error}");
    }
}
