//! cpr-transfer: a second QEMU takes the guest over, then the first is
//! killed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::{
    millis, paused_ms, remove_file, reset_mode, set_mode, wait_run_state, CprMode, Hop, HopOptions, HopReport,
    LiveUpdateError, NextQemu, QemuVersion, Running, Step, POLL_INTERVAL,
};
use crate::process::QemuProcess;
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
    let deadline = Instant::now() + options.timeout;
    let absolute = |name: &str| {
        std::path::absolute(options.work_dir.join(name)).map_err(|source| LiveUpdateError::File {
            what: "locating",
            path: options.work_dir.join(name),
            source,
        })
    };
    let (main, cpr) = (absolute("cpr-main.sock")?, absolute("cpr.sock")?);
    remove_file(&main)?;
    remove_file(&cpr)?;
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

    // The new QEMU replaces the QMP socket file with its own as soon as it
    // has the cpr state; a link to the old one puts it back if the hop
    // fails and the guest stays where it is.
    let keep = KeptSocket::new(&next.qmp)?;
    set_mode(&mut qmp, json!({ "mode": MODE.as_str() }))?;
    let started = QemuProcess::spawn_argv(&next.binary, &args, Some(&next.qmp), &options.spawn)
        .map_err(LiveUpdateError::from)
        .and_then(|mut new| {
            wait_listening(&mut new, &cpr, deadline, options)?;
            Ok(new)
        });
    let mut new = match started {
        Ok(new) => new,
        Err(e) => {
            reset_mode(&mut qmp);
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

    let taken_over = connect_new(&mut qmp, &mut new, &keep, &next.qmp, deadline, options).and_then(|mut new_qmp| {
        let at = wait_run_state(&mut new_qmp, &running.run_state, deadline, options.timeout)?;
        Ok((new_qmp, at))
    });
    let (mut new_qmp, at) = match taken_over {
        Ok(taken) => taken,
        Err(e) => return Err(abandon(e, qmp, new, keep)),
    };
    let handover = at.duration_since(began);
    on_step(Step::Running { after: handover });

    let old_events = qmp.events().unwrap_or_default();
    let new_events = new_qmp.events().unwrap_or_default();
    drop(qmp);
    // Killed, not quit: an orderly exit removes the socket files (QMP,
    // chardevs) and pidfile the old QEMU created, and the new QEMU has
    // re-created them at the same paths. In postmigrate it holds nothing
    // the guest needs.
    let old = &running.handle;
    old.kill().map_err(LiveUpdateError::process(old.pid()))?;
    if !old.wait_exit(options.timeout).map_err(LiveUpdateError::process(old.pid()))? {
        return Err(LiveUpdateError::Timeout {
            what: "the old QEMU to exit after SIGKILL",
            seconds: options.timeout.as_secs_f64(),
        });
    }
    on_step(Step::OldStopped { pid: old.pid() });
    keep.discard();
    remove_file(&main)?;
    remove_file(&cpr)?;
    let new_version = QemuVersion::from_greeting(new_qmp.greeting()).ok_or_else(|| LiveUpdateError::Malformed {
        during: "the new QEMU's QMP greeting",
        reply: new_qmp.greeting().to_string(),
    })?;
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

/// Waits until the new QEMU listens on the cpr channel's socket: `migrate`
/// fails if it connects earlier, and a probe connection of ours would be
/// taken for the channel. `/proc/<pid>/net/unix` lists listening sockets.
fn wait_listening(
    new: &mut QemuProcess,
    socket: &Path,
    deadline: Instant,
    options: &HopOptions,
) -> Result<(), LiveUpdateError> {
    let path = socket.to_string_lossy();
    loop {
        if let Some(status) = new.try_wait()? {
            return Err(LiveUpdateError::NewQemuExited { mode: MODE, pid: new.pid(), status: Some(status) });
        }
        let table = std::fs::read_to_string(format!("/proc/{}/net/unix", new.pid()))
            .map_err(LiveUpdateError::process(new.pid()))?;
        // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 is
        // __SO_ACCEPTCON: listening.
        let listening = table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(3) == Some(&"00010000") && fields.get(7) == Some(&path.as_ref())
        });
        if listening {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LiveUpdateError::Timeout {
                what: "the new QEMU to listen on the cpr channel",
                seconds: options.timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
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
    deadline: Instant,
    options: &HopOptions,
) -> Result<QmpClient, LiveUpdateError> {
    loop {
        if let Some(status) = new.try_wait()? {
            return Err(LiveUpdateError::NewQemuExited { mode: MODE, pid: new.pid(), status: Some(status) });
        }
        if keep.replaced() {
            let alive = || matches!(new.try_wait(), Ok(None));
            let left = deadline.saturating_duration_since(Instant::now());
            return QmpClient::connect_while(path, left, alive)
                .map_err(LiveUpdateError::qmp("connecting to the new QEMU's QMP"));
        }
        let info =
            old.execute("query-migrate", Value::Null).map_err(LiveUpdateError::qmp("query-migrate on the old QEMU"))?;
        if info["status"] == "failed" {
            return Err(LiveUpdateError::Failed {
                mode: MODE,
                error: info["error-desc"].as_str().map(str::to_owned),
                run_state: String::new(),
            });
        }
        if Instant::now() >= deadline {
            return Err(LiveUpdateError::Timeout {
                what: "the new QEMU's QMP socket",
                seconds: options.timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// After a failure once `migrate` was sent: if the old QEMU runs the guest
/// (it resumes it when the migration fails), the new one is killed and the
/// old QMP socket put back; otherwise the guest may be in the new QEMU,
/// which is left running (detached) for someone to look at.
fn abandon(error: LiveUpdateError, mut old: QmpClient, new: QemuProcess, keep: KeptSocket) -> LiveUpdateError {
    let run_state = old.query_status().unwrap_or_else(|e| format!("unknown ({e})"));
    if matches!(run_state.as_str(), "running" | "paused") {
        drop(new);
        keep.restore();
        reset_mode(&mut old);
        return match error {
            LiveUpdateError::Failed { error, .. } => LiveUpdateError::Failed { mode: MODE, error, run_state },
            other => other,
        };
    }
    let pid = new.detach();
    log::error!("{MODE} did not complete and the old QEMU is {run_state}: the new QEMU (pid {pid}) is left running");
    error
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

    /// Puts the old socket file back at the path.
    fn restore(self) {
        if let Some((kept, _)) = &self.kept {
            if let Err(e) = std::fs::rename(kept, &self.path) {
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
