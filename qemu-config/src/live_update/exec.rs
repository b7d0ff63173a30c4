//! cpr-exec: the running QEMU execs the new binary in place.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use super::{
    is_disconnect, millis, paused_ms, remove_file, reset_mode, set_mode, wait_run_state, CprMode, Hop, HopOptions,
    HopReport, LiveUpdateError, NextQemu, QemuVersion, Running, Step, POLL_INTERVAL,
};
use crate::process::ProcessHandle;
use crate::qmp::QmpClient;

const MODE: CprMode = CprMode::CprExec;

/// The hop: parameters, `migrate file:STATE`, the connection's end at the
/// exec, a new connection to the same pid, the guest running again.
pub(super) fn run(
    mut qmp: QmpClient,
    running: &Running,
    next: &NextQemu,
    options: &HopOptions,
    on_step: &mut dyn FnMut(Step),
) -> Result<Hop, LiveUpdateError> {
    let deadline = Instant::now() + options.timeout;
    let state = std::path::absolute(options.work_dir.join("cpr-exec.state")).map_err(|source| {
        LiveUpdateError::File { what: "locating the state file", path: options.work_dir.clone(), source }
    })?;
    remove_file(&state)?;
    let uri = format!("file:{}", state.display());
    let mut command = vec![next.binary.to_string_lossy().into_owned()];
    command.extend(next.args.iter().cloned());
    command.extend(["-incoming".to_string(), uri.clone()]);
    set_mode(&mut qmp, json!({ "mode": MODE.as_str(), "cpr-exec-command": command }))?;

    let started = Instant::now();
    match qmp.execute("migrate", json!({ "uri": uri })) {
        Ok(_) => {}
        // Saving takes a few milliseconds: the exec may beat the reply.
        Err(e) if is_disconnect(&e) => {}
        Err(source) => {
            reset_mode(&mut qmp);
            return Err(LiveUpdateError::Refused { mode: MODE, source });
        }
    }
    on_step(Step::Migrating);
    wait_for_exec(&mut qmp, &running.handle, options, deadline)?;
    let old_events = qmp.events().unwrap_or_default();
    drop(qmp);
    on_step(Step::Execed);

    let pid = running.handle.pid();
    let mut new = reconnect(&next.qmp, &running.handle, deadline, options)?;
    if new.peer_pid().map_err(LiveUpdateError::qmp("reading the QMP peer's pid"))? != Some(pid) {
        return Err(LiveUpdateError::Malformed {
            during: "reconnecting after the exec",
            reply: format!("{} is served by another process than {pid}", next.qmp.display()),
        });
    }
    let now_running = wait_run_state(&mut new, &running.run_state, deadline, options.timeout)
        .map_err(|e| exited_or(e, &running.handle))?;
    let handover = now_running.duration_since(started);
    on_step(Step::Running { after: handover });
    let new_events = new.events().unwrap_or_default();
    remove_file(&state)?;
    let new_version = QemuVersion::from_greeting(new.greeting()).ok_or_else(|| LiveUpdateError::Malformed {
        during: "the QMP greeting after the exec",
        reply: new.greeting().to_string(),
    })?;
    Ok(Hop {
        report: HopReport {
            mode: MODE,
            old_pid: pid,
            old_version: running.version,
            new_pid: pid,
            new_version,
            handover_ms: millis(handover),
            paused_ms: paused_ms(&old_events, &new_events),
            qemu_downtime_ms: None,
        },
        qmp: new,
        spawned: None,
    })
}

/// Waits for the old image's QMP connection to end (the exec closes it),
/// asking `query-migrate` meanwhile: `failed` there means the exec itself
/// failed and the old image resumed the guest.
fn wait_for_exec(
    qmp: &mut QmpClient,
    handle: &ProcessHandle,
    options: &HopOptions,
    deadline: Instant,
) -> Result<(), LiveUpdateError> {
    loop {
        let info = match qmp.execute("query-migrate", Value::Null) {
            Err(e) if is_disconnect(&e) => return Ok(()),
            Err(source) => return Err(LiveUpdateError::Qmp { during: "query-migrate before the exec", source }),
            Ok(info) => info,
        };
        if info["status"] == "failed" {
            let run_state = qmp.query_status().unwrap_or_else(|e| format!("unknown ({e})"));
            return Err(LiveUpdateError::Failed {
                mode: MODE,
                error: info["error-desc"].as_str().map(str::to_owned),
                run_state,
            });
        }
        if Instant::now() >= deadline {
            return Err(exited_or(
                LiveUpdateError::Timeout {
                    what: "QEMU to exec the new binary",
                    seconds: options.timeout.as_secs_f64(),
                },
                handle,
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Connects to the new image's QMP socket. Until it has bound it, the path
/// is the old image's, whose listener the exec closed (connection refused),
/// or a socket that closes on us: retried until `deadline`.
fn reconnect(
    path: &Path,
    handle: &ProcessHandle,
    deadline: Instant,
    options: &HopOptions,
) -> Result<QmpClient, LiveUpdateError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let alive = || !handle.has_exited().unwrap_or(true);
        match QmpClient::connect_while(path, left, alive) {
            Ok(client) => return Ok(client),
            Err(e) if is_disconnect(&e) && !left.is_zero() => std::thread::sleep(POLL_INTERVAL),
            Err(source) => {
                let error = match left.is_zero() {
                    true => LiveUpdateError::Timeout {
                        what: "the new image's QMP socket",
                        seconds: options.timeout.as_secs_f64(),
                    },
                    false => LiveUpdateError::Qmp { during: "reconnecting to QMP after the exec", source },
                };
                return Err(exited_or(error, handle));
            }
        }
    }
}

/// `error`, unless the process has exited, which is what went wrong then:
/// the guest's only QEMU is gone.
fn exited_or(error: LiveUpdateError, handle: &ProcessHandle) -> LiveUpdateError {
    match handle.has_exited() {
        Ok(true) => LiveUpdateError::NewQemuExited { mode: MODE, pid: handle.pid(), status: None },
        _ => error,
    }
}
