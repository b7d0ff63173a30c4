//! cpr-transfer: a second QEMU takes the guest over, then the first is
//! killed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    clean_up, greeting_version, millis, paused_ms, remove_file, reset_mode, set_mode, wait_run_state, work_file,
    CprMode, Deadline, Hop, HopOptions, HopReport, LiveUpdateError, NextQemu, Running, Step,
};
use crate::migration::{wait_for_status, MigrationStatus, Side};
use crate::process::{ProcessHandle, QemuProcess};
use crate::qmp::QmpClient;

const MODE: CprMode = CprMode::CprTransfer;

/// The hop: parameters, the new QEMU waiting on both channels, `migrate`
/// with both, the new QEMU running the guest, the old one killed.
pub(super) fn run(
    mut qmp: QmpClient,
    running: &Running,
    next: &NextQemu,
    options: &HopOptions,
    on_step: &mut dyn FnMut(Step),
) -> Result<Hop, LiveUpdateError> {
    let deadline = Deadline::after(options.timeout);
    let (main, cpr) = (work_file(options, "cpr-main.sock")?, work_file(options, "cpr.sock")?);
    let channel = |kind: &str, path: &Path| {
        json!({
            "channel-type": kind,
            "addr": { "transport": "socket", "type": "unix", "path": path },
        })
    };
    let (main_channel, cpr_channel) = (channel("main", &main), channel("cpr", &cpr));
    let mut args = next.args.clone();
    args.extend([
        "-incoming".to_string(),
        format!("unix:{}", main.display()),
        "-incoming".to_string(),
        cpr_channel.to_string(),
    ]);

    set_mode(&mut qmp, running, MODE, json!({ "mode": MODE.as_str() }))?;
    // The new QEMU replaces the QMP socket file with its own as soon as it
    // has the cpr state; a link to the old one puts it back if the hop
    // fails and the guest stays where it is.
    let keep = match KeptSocket::new(&next.qmp) {
        Ok(keep) => keep,
        Err(e) => {
            reset_mode(&mut qmp);
            return Err(e);
        }
    };
    let started = QemuProcess::spawn_argv(&next.binary, &args, Some(&next.qmp), &options.spawn)
        .map_err(LiveUpdateError::from)
        .and_then(|mut new| {
            wait_listening(&mut new, &cpr, &deadline)?;
            Ok(new)
        });
    let mut new = match started {
        Ok(new) => new,
        Err(e) => {
            reset_mode(&mut qmp);
            keep.restore();
            return Err(e);
        }
    };
    on_step(Step::Started { pid: new.pid() });

    let began = Instant::now();
    let migrate = json!({ "channels": [main_channel, cpr_channel] });
    if let Err(source) = qmp.execute("migrate", migrate) {
        reset_mode(&mut qmp);
        keep.restore();
        return Err(LiveUpdateError::Refused { mode: MODE, source });
    }
    on_step(Step::Migrating);

    let taken_over = connect_new(&mut qmp, &mut new, &keep, &next.qmp, &deadline).and_then(|mut new_qmp| {
        let version = greeting_version(&new_qmp, "the new QEMU's QMP greeting")?;
        let at = wait_run_state(&mut new_qmp, &running.run_state, &deadline)?;
        Ok((new_qmp, version, at))
    });
    let (mut new_qmp, new_version, at) = match taken_over {
        Ok(taken) => taken,
        Err(e) => return Err(abandon(e, qmp, new, keep, options.timeout)),
    };
    let handover = at.duration_since(began);
    on_step(Step::Running { after: handover });

    // From here on the guest runs in the new QEMU. Nothing left may fail
    // the hop: the error would drop, that is kill, the new QEMU.
    let old_events = qmp.events().unwrap_or_default();
    let new_events = new_qmp.events().unwrap_or_default();
    let old = &running.handle;
    match stop_old(qmp, old, &deadline) {
        Ok(()) => on_step(Step::OldStopped { pid: old.pid() }),
        Err(e) => {
            log::error!("the guest runs in QEMU {}, but the old QEMU {} was not stopped: {e}", new.pid(), old.pid())
        }
    }
    keep.discard();
    clean_up(&main);
    clean_up(&cpr);
    Ok(Hop {
        report: HopReport {
            mode: MODE,
            old_pid: old.pid(),
            old_version: running.version,
            new_pid: new.pid(),
            new_version,
            handover_ms: millis(handover),
            paused_ms: paused_ms(&old_events, &new_events),
            qemu_downtime_ms: None,
        },
        qmp: new_qmp,
        spawned: Some(new),
    })
}

/// Kills the old QEMU once it is `postmigrate` (it has handed the guest
/// over) and waits for it to exit. Killed, not quit: an orderly exit
/// removes the socket files (QMP, chardevs) and pidfile the old QEMU
/// created, and the new QEMU has re-created them at the same paths.
fn stop_old(mut qmp: QmpClient, old: &ProcessHandle, deadline: &Deadline) -> Result<(), LiveUpdateError> {
    let run_state = qmp.query_status().map_err(LiveUpdateError::qmp("query-status on the old QEMU"))?;
    if run_state != "postmigrate" {
        return Err(LiveUpdateError::OldNotHandedOver { run_state });
    }
    drop(qmp);
    old.kill().map_err(LiveUpdateError::process(old.pid()))?;
    match old.wait_exit(deadline.left()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(deadline.missed("the old QEMU to exit after SIGKILL")),
        Err(e) => Err(LiveUpdateError::Process { pid: old.pid(), source: e }),
    }
}

/// Waits until the new QEMU listens on the cpr channel's socket: `migrate`
/// fails if it connects earlier, and a probe connection of ours would be
/// taken for the channel. `/proc/<pid>/net/unix` lists listening sockets.
fn wait_listening(new: &mut QemuProcess, socket: &Path, deadline: &Deadline) -> Result<(), LiveUpdateError> {
    let path = socket.to_string_lossy();
    deadline.poll("the new QEMU to listen on the cpr channel", || {
        exited(new)?;
        let table = std::fs::read_to_string(format!("/proc/{}/net/unix", new.pid()))
            .map_err(LiveUpdateError::process(new.pid()))?;
        // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 is
        // __SO_ACCEPTCON: listening.
        let listening = table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(3) == Some(&"00010000") && fields.get(7) == Some(&path.as_ref())
        });
        Ok(listening.then_some(()))
    })
}

/// Fails if the new QEMU has exited.
fn exited(new: &mut QemuProcess) -> Result<(), LiveUpdateError> {
    match new.try_wait()? {
        Some(status) => Err(LiveUpdateError::NewQemuExited { mode: MODE, pid: new.pid(), status: Some(status) }),
        None => Ok(()),
    }
}

/// Waits for the new QEMU to replace the QMP socket file (it creates its
/// monitor only once it has read the cpr state) and connects to it; fails
/// early when the old QEMU reports the migration failed or the new one
/// exits.
fn connect_new(
    old: &mut QmpClient,
    new: &mut QemuProcess,
    keep: &KeptSocket,
    path: &Path,
    deadline: &Deadline,
) -> Result<QmpClient, LiveUpdateError> {
    deadline.poll("the new QEMU's QMP socket", || {
        exited(new)?;
        if keep.replaced() {
            let alive = || matches!(new.try_wait(), Ok(None));
            return QmpClient::connect_while(path, deadline.left(), alive)
                .map(Some)
                .map_err(LiveUpdateError::qmp("connecting to the new QEMU's QMP"));
        }
        let info =
            old.execute("query-migrate", Value::Null).map_err(LiveUpdateError::qmp("query-migrate on the old QEMU"))?;
        match info["status"] == "failed" {
            true => Err(LiveUpdateError::Failed {
                mode: MODE,
                error: info["error-desc"].as_str().map(str::to_owned),
                run_state: String::new(),
            }),
            false => Ok(None),
        }
    })
}

/// After a failure once `migrate` was sent, finds out where the guest is:
///
/// - the new QEMU exited: the old one has the only copy of the device
///   state. It resumes the guest by itself when the migration fails
///   midway; when it had completed its side (`postmigrate`, the new QEMU
///   failed to load), `cont` resumes it: nothing else touches the guest's
///   RAM or disk any more.
/// - the old QEMU runs the guest: the new one is killed.
///
/// Either way the old QMP socket file is put back and the mode reset. If
/// the new QEMU lives and the old one does not run the guest, the guest
/// may be in the new QEMU, which is left running (detached).
fn abandon(
    error: LiveUpdateError,
    mut old: QmpClient,
    mut new: QemuProcess,
    keep: KeptSocket,
    timeout: Duration,
) -> LiveUpdateError {
    // The old QEMU notices a dead peer a moment after it dies.
    let finished = [MigrationStatus::Completed, MigrationStatus::Failed, MigrationStatus::Cancelled];
    let outgoing = wait_for_status(&mut old, Side::Source, &finished, timeout).map(|info| info.status());
    let (error, exited) = match exited(&mut new) {
        Err(exit) => (exit, true),
        Ok(()) => (error, false),
    };
    let mut run_state = old.query_status().unwrap_or_else(|e| format!("unknown ({e})"));
    if exited && run_state == "postmigrate" && old.execute("cont", Value::Null).is_ok() {
        run_state = old.query_status().unwrap_or_else(|e| format!("unknown ({e})"));
        log::warn!("{MODE}: the new QEMU died after the old one had sent everything; resumed the guest in the old QEMU with cont");
    }
    if !matches!(run_state.as_str(), "running" | "paused") {
        if !exited {
            let pid = new.detach();
            log::error!(
                "{MODE} did not complete and the old QEMU is {run_state} (migration: {outgoing:?}): \
                 the new QEMU (pid {pid}) is left running"
            );
        }
        return error;
    }
    drop(new);
    keep.restore();
    reset_mode(&mut old);
    let error = match error {
        LiveUpdateError::Failed { error, .. } => error,
        other => Some(other.to_string()),
    };
    LiveUpdateError::Failed { mode: MODE, error, run_state }
}

/// A second name for the running QEMU's QMP socket file.
#[derive(Debug)]
struct KeptSocket {
    path: PathBuf,
    kept: Option<(PathBuf, u64)>,
}

impl KeptSocket {
    /// Links `path` to `path.cpr-old`. A missing socket file is no error:
    /// then there is nothing to put back.
    fn new(path: &Path) -> Result<Self, LiveUpdateError> {
        let mut kept_path = path.as_os_str().to_owned();
        kept_path.push(".cpr-old");
        let kept_path = PathBuf::from(kept_path);
        remove_file(&kept_path)?;
        let kept = match std::fs::hard_link(path, &kept_path) {
            Ok(()) => {
                let meta = std::fs::metadata(&kept_path).map_err(|source| LiveUpdateError::File {
                    what: "reading",
                    path: kept_path.clone(),
                    source,
                })?;
                Some((kept_path, meta.ino()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(LiveUpdateError::File { what: "linking the QMP socket", path: path.to_owned(), source })
            }
        };
        Ok(KeptSocket { path: path.to_owned(), kept })
    }

    /// Whether another socket file is at the path now.
    fn replaced(&self) -> bool {
        let now = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        match &self.kept {
            Some((_, ino)) => now.is_some_and(|now| now != *ino),
            None => now.is_some(),
        }
    }

    /// Puts the old socket file back at the path if another took its
    /// place, and drops the second name.
    fn restore(self) {
        if let Some((kept, _)) = &self.kept {
            let put_back = match self.replaced() {
                true => std::fs::rename(kept, &self.path),
                false => std::fs::remove_file(kept),
            };
            if let Err(e) = put_back {
                log::warn!(
                    "could not put the old QMP socket back at {}: {e}; it is at {}",
                    self.path.display(),
                    kept.display()
                );
            }
        }
    }

    /// Drops the second name.
    fn discard(self) {
        if let Some((kept, _)) = &self.kept {
            if let Err(e) = std::fs::remove_file(kept) {
                log::warn!("could not remove {}: {e}", kept.display());
            }
        }
    }
}
