//! [`Migration`]: an outgoing migration driven from the source's QMP.

use std::thread::sleep;
use std::time::{Duration, Instant};

use gmem_protocol::{ControlClient, MigrationInfo};
use serde_json::{json, Map, Value};

use super::{
    poll_until, query_capabilities, query_migrate, set_capabilities, wait_for_status, Endpoint, MigrationError,
    MigrationOptions, MigrationReport, MigrationStatus, Progress, QemuMigrationInfo, Side, SwitchToPostcopy,
    POLL_INTERVAL, POSTCOPY_PREEMPT, PREEMPT_STUCK_AFTER, STATE_CHANGE_TIMEOUT,
};
use crate::qmp::{QmpClient, QmpError};

/// A migration the source QEMU runs, from [`start`](Self::start) (or
/// [`attach`](Self::attach)) to [`wait`](Self::wait)'s report.
#[derive(Debug)]
pub struct Migration {
    options: MigrationOptions,
    /// When `migrate` was sent.
    started: Instant,
    /// When this process sent `migrate-start-postcopy`, after `started`.
    postcopy_requested: Option<Duration>,
    /// Whether a postcopy status has been seen.
    entered_postcopy: bool,
    /// `downtime` as first reported in a postcopy status; see
    /// [`MigrationReport::downtime_ms`].
    postcopy_downtime: Option<u64>,
    recoveries: u32,
    /// Whether the source runs it with `postcopy-preempt`.
    postcopy_preempt: bool,
}

impl Migration {
    /// Sets the source's capabilities and parameters and sends `migrate`.
    /// The destination must be ready ([`prepare_destination`](super::prepare_destination)
    /// with the same `options`: `postcopy-preempt` must be on both sides or
    /// on neither).
    pub fn start(src: &mut QmpClient, options: &MigrationOptions) -> Result<Self, MigrationError> {
        let side = Side::Source;
        let postcopy_preempt = options.preempts();
        set_capabilities(
            src,
            side,
            &[("postcopy-ram", options.postcopy.is_some()), (POSTCOPY_PREEMPT, postcopy_preempt)],
        )?;
        let mut parameters = Map::new();
        let mut set = |name: &str, value: Option<u64>| {
            if let Some(value) = value {
                parameters.insert(name.into(), value.into());
            }
        };
        set("max-bandwidth", options.max_bandwidth);
        set("max-postcopy-bandwidth", options.max_postcopy_bandwidth);
        set("downtime-limit", options.downtime_limit_ms);
        if !parameters.is_empty() {
            src.execute("migrate-set-parameters", Value::Object(parameters)).map_err(MigrationError::qmp(side))?;
        }
        let started = Instant::now();
        src.execute("migrate", json!({ "uri": options.connect_uri })).map_err(MigrationError::qmp(side))?;
        Ok(Migration {
            options: options.clone(),
            started,
            postcopy_requested: None,
            entered_postcopy: false,
            postcopy_downtime: None,
            recoveries: 0,
            postcopy_preempt,
        })
    }

    /// Takes over a migration the source is already running, e.g. one
    /// another process started that is now `postcopy-paused`. Its start
    /// time is taken from QEMU's `total-time`, and whether it runs with
    /// `postcopy-preempt` from the source's capabilities (not `options`).
    pub fn attach(src: &mut QmpClient, options: &MigrationOptions) -> Result<Self, MigrationError> {
        let info = query_migrate(src, Side::Source)?;
        let status = info.status();
        if status == MigrationStatus::None || status.is_finished() {
            return Err(MigrationError::WrongStatus { side: Side::Source, status, expected: "in progress".into() });
        }
        let postcopy_preempt = query_capabilities(src, Side::Source)?.get(POSTCOPY_PREEMPT) == Some(&true);
        let running_for = Duration::from_millis(info.total_time.unwrap_or(0));
        Ok(Migration {
            options: options.clone(),
            started: Instant::now().checked_sub(running_for).unwrap_or_else(Instant::now),
            postcopy_requested: None,
            entered_postcopy: status.is_postcopy(),
            postcopy_downtime: None,
            recoveries: 0,
            postcopy_preempt,
        })
    }

    /// Asks the source where the migration stands (gmemd figures are left
    /// empty; [`wait`](Self::wait) fills them in).
    pub fn poll(&mut self, src: &mut QmpClient) -> Result<Progress, MigrationError> {
        self.look(src).map(|(progress, _)| progress)
    }

    /// Sends `migrate-start-postcopy`: the source stops the guest, sends
    /// its device state, and the guest resumes on the destination, which
    /// fetches missing pages on demand. Needs [`MigrationOptions::postcopy`].
    pub fn switch_to_postcopy(&mut self, src: &mut QmpClient) -> Result<(), MigrationError> {
        src.execute("migrate-start-postcopy", Value::Null).map_err(MigrationError::qmp(Side::Source))?;
        self.postcopy_requested = Some(self.started.elapsed());
        Ok(())
    }

    /// Polls the source every [`POLL_INTERVAL`], calling `on_progress`
    /// each time, switches to postcopy when due, and once the source has
    /// completed waits for the destination to complete and run its guest.
    ///
    /// Fails with [`MigrationError::PostcopyPaused`] when the source
    /// pauses in postcopy (recover with [`recover`](Self::recover) and
    /// [`resume`](Self::resume), then call `wait` again), with
    /// [`MigrationError::PostcopyPreemptStuck`] when a postcopy with
    /// `postcopy-preempt` has had nothing left to send for
    /// [`PREEMPT_STUCK_AFTER`], and with [`MigrationError::Timeout`] after
    /// [`MigrationOptions::timeout`] (the migration goes on; see
    /// [`cancel`](Self::cancel)).
    pub fn wait(
        &mut self,
        source: Endpoint<'_>,
        destination: Endpoint<'_>,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<MigrationReport, MigrationError> {
        let Endpoint { qmp: src, gmemd: mut src_gmemd } = source;
        let Endpoint { qmp: dst, gmemd: mut dst_gmemd } = destination;
        let deadline = self.started + self.options.timeout;
        let mut all_sent_since: Option<Instant> = None;
        let (progress, src_info, stuck) = loop {
            let (mut progress, info) = self.look(src)?;
            progress.source_gmemd = gmemd_migration(&mut src_gmemd, Side::Source)?;
            progress.destination_gmemd = gmemd_migration(&mut dst_gmemd, Side::Destination)?;
            on_progress(&progress);
            match progress.status {
                MigrationStatus::Completed => break (progress, info, None),
                MigrationStatus::Failed => {
                    // The destination may say more (e.g. why loading failed);
                    // by default it exits when an incoming migration fails.
                    let destination_error = match query_migrate(dst, Side::Destination) {
                        Ok(info) => info.error_desc,
                        Err(_) => Some("no answer on QMP; if it exited, its stderr says why".into()),
                    };
                    return Err(MigrationError::Failed { source_error: info.error_desc, destination_error });
                }
                MigrationStatus::Cancelled => return Err(MigrationError::Cancelled),
                MigrationStatus::PostcopyPaused => {
                    return Err(MigrationError::PostcopyPaused { error_desc: info.error_desc })
                }
                _ => {}
            }
            if self.postcopy_preempt
                && progress.status == MigrationStatus::PostcopyActive
                && progress.ram.remaining == 0
            {
                let since = *all_sent_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= PREEMPT_STUCK_AFTER {
                    break (progress, info, Some(since.elapsed()));
                }
            } else {
                all_sent_since = None;
            }
            if self.postcopy_due(&progress) {
                self.switch_to_postcopy(src)?;
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::Timeout { status: progress.status, elapsed: progress.elapsed });
            }
            sleep(POLL_INTERVAL);
        };
        // The destination completes a moment after the source (precopy: it
        // still loads the device state); give it a little time even when
        // the overall deadline has passed.
        let grace = deadline.saturating_duration_since(Instant::now()).max(STATE_CHANGE_TIMEOUT);
        let (dst_info, destination_run_state) = match stuck {
            None => (destination_completion(dst, grace)?, destination_run_state(dst, grace)?),
            // The guest runs on the destination; whatever state it is in is
            // part of the report, not a reason to fail.
            Some(_) => (
                query_migrate(dst, Side::Destination)?,
                dst.query_status().map_err(MigrationError::qmp(Side::Destination))?,
            ),
        };
        let source_gmemd = gmemd_migration(&mut src_gmemd, Side::Source)?;
        let destination_gmemd = destination_io_resumed(&mut dst_gmemd, source_gmemd.as_ref())?;
        let report = MigrationReport {
            elapsed_ms: millis(self.started.elapsed()),
            total_time_ms: src_info.total_time.unwrap_or(0),
            downtime_ms: self.postcopy_downtime.or(src_info.downtime).unwrap_or(0),
            setup_time_ms: src_info.setup_time.unwrap_or(0),
            postcopy: self.entered_postcopy || progress.ram.postcopy_bytes > 0,
            postcopy_switch_ms: self.postcopy_requested.map(millis),
            postcopy_preempt: self.postcopy_preempt,
            recoveries: self.recoveries,
            ram: progress.ram,
            postcopy_blocktime_ms: dst_info.postcopy_blocktime,
            postcopy_vcpu_blocktime_ms: dst_info.postcopy_vcpu_blocktime,
            destination_run_state,
            device_io_gap_us: device_io_gap_us(source_gmemd.as_ref(), destination_gmemd.as_ref()),
            source_gmemd,
            destination_gmemd,
        };
        match stuck {
            None => Ok(report),
            Some(sent_all_for) => Err(MigrationError::PostcopyPreemptStuck { sent_all_for, report: Box::new(report) }),
        }
    }

    /// Pauses a postcopy migration on purpose: waits for the guest to run
    /// on the destination (a pause before that makes the destination fail
    /// instead of pausing), sends `migrate-pause` to the source (which
    /// must be `postcopy-active` or `postcopy-recover`), and waits for it
    /// to be `postcopy-paused`. The destination is not asked: its main loop
    /// may be blocked on a page by then ([`recover`](Self::recover) waits
    /// for it out of band).
    pub fn pause(&self, src: &mut QmpClient, dst: &mut QmpClient) -> Result<(), MigrationError> {
        let status = query_migrate(src, Side::Source)?.status();
        if !matches!(status, MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover) {
            return Err(MigrationError::WrongStatus {
                side: Side::Source,
                status,
                expected: "postcopy-active or postcopy-recover".into(),
            });
        }
        destination_run_state(dst, STATE_CHANGE_TIMEOUT)?;
        src.execute("migrate-pause", Value::Null).map_err(MigrationError::qmp(Side::Source))?;
        let paused = [MigrationStatus::PostcopyPaused];
        wait_for_status(src, Side::Source, &paused, STATE_CHANGE_TIMEOUT)?;
        Ok(())
    }

    /// The destination's half of a postcopy recovery: `migrate-recover`,
    /// so that it listens on `uri` for the source's [`resume`](Self::resume).
    /// With `postcopy-preempt` the source opens both connections anew, so
    /// `uri` must be able to carry two (tcp:, unix:).
    ///
    /// Sent out of band when the monitor allows it. A paused destination's
    /// main loop can be blocked until the stream resumes: a vCPU that holds
    /// QEMU's big lock faults on a page only the resumed stream can bring
    /// (TCG delivers interrupts that way, writing the guest's stack), and
    /// then only the monitor thread answers. The destination notices the
    /// lost connection a moment after the source, so the command is
    /// repeated while QEMU says postcopy is not paused yet.
    pub fn recover(&self, dst: &mut QmpClient, uri: &str) -> Result<(), MigrationError> {
        let side = Side::Destination;
        let arguments = json!({ "uri": uri });
        if !dst.oob() {
            wait_for_status(dst, side, &[MigrationStatus::PostcopyPaused], STATE_CHANGE_TIMEOUT)?;
            dst.execute("migrate-recover", arguments).map_err(MigrationError::qmp(side))?;
            return Ok(());
        }
        let deadline = Instant::now() + STATE_CHANGE_TIMEOUT;
        loop {
            match dst.execute_oob("migrate-recover", arguments.clone()) {
                Ok(_) => return Ok(()),
                Err(QmpError::Command { desc, .. })
                    if desc.contains("postcopy is paused") && Instant::now() < deadline =>
                {
                    sleep(POLL_INTERVAL);
                }
                Err(error) => return Err(MigrationError::qmp(side)(error)),
            }
        }
    }

    /// The source's half of a postcopy recovery, after
    /// [`recover`](Self::recover): waits for the source to be
    /// `postcopy-paused`, then `migrate` with `resume` to `uri`. Follow
    /// with [`wait`](Self::wait).
    pub fn resume(&mut self, src: &mut QmpClient, uri: &str) -> Result<(), MigrationError> {
        let side = Side::Source;
        wait_for_status(src, side, &[MigrationStatus::PostcopyPaused], STATE_CHANGE_TIMEOUT)?;
        src.execute("migrate", json!({ "uri": uri, "resume": true })).map_err(MigrationError::qmp(side))?;
        self.recoveries += 1;
        Ok(())
    }

    /// Cancels a migration still in precopy (`migrate_cancel`; QEMU
    /// refuses in postcopy) and waits until it is `cancelled`: the guest
    /// keeps running on the source.
    pub fn cancel(&self, src: &mut QmpClient) -> Result<(), MigrationError> {
        src.execute("migrate_cancel", Value::Null).map_err(MigrationError::qmp(Side::Source))?;
        wait_for_status(src, Side::Source, &[MigrationStatus::Cancelled], STATE_CHANGE_TIMEOUT)?;
        Ok(())
    }

    /// The source's `query-migrate`, as a [`Progress`] and whole.
    fn look(&mut self, src: &mut QmpClient) -> Result<(Progress, QemuMigrationInfo), MigrationError> {
        let info = query_migrate(src, Side::Source)?;
        let status = info.status();
        if status.is_postcopy() {
            self.entered_postcopy = true;
            self.postcopy_downtime = self.postcopy_downtime.or(info.downtime);
        }
        let progress = Progress {
            elapsed: self.started.elapsed(),
            status,
            ram: info.ram.clone().unwrap_or_default(),
            expected_downtime_ms: info.expected_downtime,
            source_gmemd: None,
            destination_gmemd: None,
        };
        Ok((progress, info))
    }

    /// Whether [`MigrationOptions::postcopy`] says to switch now.
    fn postcopy_due(&self, progress: &Progress) -> bool {
        if self.postcopy_requested.is_some() || progress.status != MigrationStatus::Active {
            return false;
        }
        match self.options.postcopy {
            None => false,
            Some(SwitchToPostcopy::AfterFirstPass) => progress.ram.dirty_sync_count >= 2,
            Some(SwitchToPostcopy::After(delay)) => progress.elapsed >= delay,
        }
    }
}

/// Waits for the destination's `query-migrate` to say `completed`.
fn destination_completion(dst: &mut QmpClient, timeout: Duration) -> Result<QemuMigrationInfo, MigrationError> {
    let side = Side::Destination;
    let mut status = MigrationStatus::None;
    let completed = poll_until(timeout, || {
        let info = query_migrate(dst, side)?;
        status = info.status();
        match status {
            MigrationStatus::Completed => Ok(Some(info)),
            MigrationStatus::Failed => {
                Err(MigrationError::Failed { source_error: None, destination_error: info.error_desc })
            }
            _ => Ok(None),
        }
    })?;
    completed.ok_or_else(|| MigrationError::WrongStatus {
        side,
        status,
        expected: MigrationStatus::Completed.to_string(),
    })
}

/// Waits for the destination to leave `inmigrate` (in postcopy: for the
/// guest to have started there) and returns its run state, which must be
/// `running` (or `paused`, when started with `-S`).
fn destination_run_state(dst: &mut QmpClient, timeout: Duration) -> Result<String, MigrationError> {
    let mut run_state = String::new();
    poll_until(timeout, || {
        run_state = dst.query_status().map_err(MigrationError::qmp(Side::Destination))?;
        Ok((run_state != "inmigrate").then_some(()))
    })?;
    match run_state.as_str() {
        "running" | "paused" => Ok(run_state),
        _ => Err(MigrationError::DestinationNotRunning { run_state }),
    }
}

/// gmemd's `query-migration`, when there is a gmemd to ask.
fn gmemd_migration(
    gmemd: &mut Option<&mut ControlClient>,
    side: Side,
) -> Result<Option<MigrationInfo>, MigrationError> {
    gmemd.as_deref_mut().map(|client| client.query_migration().map_err(MigrationError::gmemd(side))).transpose()
}

/// How long the report waits for the destination device's first request,
/// for [`MigrationReport::device_io_gap_us`], when the source's device was
/// busy: QEMU says the guest runs a moment before its I/O resumes.
const IO_RESUME_WAIT: Duration = Duration::from_secs(2);

/// The destination gmemd's figures, once its device has completed a request
/// (or [`IO_RESUME_WAIT`] has passed, or the source's device was idle).
fn destination_io_resumed(
    gmemd: &mut Option<&mut ControlClient>,
    source: Option<&MigrationInfo>,
) -> Result<Option<MigrationInfo>, MigrationError> {
    let source_busy = source.is_some_and(|s| s.device_io.last_completion_us > 0);
    let deadline = Instant::now() + IO_RESUME_WAIT;
    loop {
        let info = gmemd_migration(gmemd, Side::Destination)?;
        let resumed = info.as_ref().is_none_or(|i| i.device_io.first_completion_us > 0);
        if resumed || !source_busy || Instant::now() >= deadline {
            return Ok(info);
        }
        sleep(POLL_INTERVAL / 10);
    }
}

/// The time between the source gmemd's last request completion and the
/// destination gmemd's first, when both exist in that order.
fn device_io_gap_us(source: Option<&MigrationInfo>, destination: Option<&MigrationInfo>) -> Option<u64> {
    let last = source?.device_io.last_completion_us;
    let first = destination?.device_io.first_completion_us;
    (last > 0 && first > last).then(|| first - last)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
