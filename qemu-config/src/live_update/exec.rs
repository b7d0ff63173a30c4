//! cpr-exec: the running QEMU execs the new binary in place.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use super::{
    clean_up, greeting_version, is_disconnect, millis, paused_ms, reset_mode, set_mode, wait_run_state, work_file,
    CprMode, Deadline, Hop, HopOptions, HopReport, LiveUpdateError, NextQemu, Running, Step,
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
    let deadline = Deadline::after(options.timeout);
    let state = work_file(options, "cpr-exec.state")?;
    let uri = format!("file:{}", state.display());
    let mut command = vec![next.binary.to_string_lossy().into_owned()];
    command.extend(next.args.iter().cloned());
    command.extend(["-incoming".to_string(), uri.clone()]);
    set_mode(&mut qmp, running, MODE, json!({ "mode": MODE.as_str(), "cpr-exec-command": command }))?;

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
    wait_for_exec(&mut qmp, &running.handle, &deadline)?;
    let old_events = qmp.events().unwrap_or_default();
    drop(qmp);
    on_step(Step::Execed);

    let pid = running.handle.pid();
    let mut new = reconnect(&next.qmp, &running.handle, &deadline)?;
    if new.peer_pid().map_err(LiveUpdateError::qmp("reading the QMP peer's pid"))? != Some(pid) {
        return Err(LiveUpdateError::Malformed {
            during: "reconnecting after the exec",
            reply: format!("{} is served by another process than {pid}", next.qmp.display()),
        });
    }
    let new_version = greeting_version(&new, "the QMP greeting after the exec")?;
    let now_running =
        wait_run_state(&mut new, &running.run_state, &deadline).map_err(|e| exited_or(e, &running.handle))?;
    let handover = now_running.duration_since(started);
    on_step(Step::Running { after: handover });
    let new_events = new.events().unwrap_or_default();
    clean_up(&state);
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
fn wait_for_exec(qmp: &mut QmpClient, handle: &ProcessHandle, deadline: &Deadline) -> Result<(), LiveUpdateError> {
    let exec = deadline.poll("QEMU to exec the new binary", || {
        let info = match qmp.execute("query-migrate", Value::Null) {
            Err(e) if is_disconnect(&e) => return Ok(Some(())),
            Err(source) => return Err(LiveUpdateError::Qmp { during: "query-migrate before the exec", source }),
            Ok(info) => info,
        };
        if info["status"] != "failed" {
            return Ok(None);
        }
        let run_state = qmp.query_status().unwrap_or_else(|e| format!("unknown ({e})"));
        Err(LiveUpdateError::Failed { mode: MODE, error: info["error-desc"].as_str().map(str::to_owned), run_state })
    });
    exec.map_err(|e| exited_or(e, handle))
}

/// Connects to the new image's QMP socket. Until it has bound it, the path
/// is the old image's, whose listener the exec closed (connection refused),
/// or a socket that closes on us: retried until `deadline`.
fn reconnect(path: &Path, handle: &ProcessHandle, deadline: &Deadline) -> Result<QmpClient, LiveUpdateError> {
    let alive = || !handle.has_exited().unwrap_or(true);
    let connected =
        deadline.poll("the new image's QMP socket", || match QmpClient::connect_while(path, deadline.left(), alive) {
            Ok(client) => Ok(Some(client)),
            Err(e) if is_disconnect(&e) => Ok(None),
            Err(source) => Err(LiveUpdateError::Qmp { during: "reconnecting to QMP after the exec", source }),
        });
    connected.map_err(|e| exited_or(e, handle))
}

/// `error`, unless the process has exited, which is what went wrong then:
/// the guest's only QEMU is gone.
fn exited_or(error: LiveUpdateError, handle: &ProcessHandle) -> LiveUpdateError {
    match handle.has_exited() {
        Ok(true) => LiveUpdateError::NewQemuExited { mode: MODE, pid: handle.pid(), status: None },
        _ => error,
    }
}
