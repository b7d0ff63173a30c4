//! Live migration between two QEMUs over QMP: precopy, postcopy, and
//! postcopy recovery, as QEMU 10.0 does them.
//!
//! The QMP sequence:
//!
//! 0. Optionally, [`postcopy_preempt_unavailable`] asks both QEMUs
//!    (`query-migrate-capabilities`) and looks at both URIs to say whether
//!    postcopy can send requested pages on a channel of their own
//!    ([`MigrationOptions::postcopy_preempt`]).
//! 1. Destination, started with `-incoming defer` ([`prepare_destination`]):
//!    `migrate-set-capabilities` (`postcopy-ram`, `postcopy-preempt`, and
//!    `postcopy-blocktime` so that QEMU measures how long vCPUs wait for
//!    missing pages), then `migrate-incoming {uri}`. Capabilities must be
//!    set before the destination listens, which is why `-incoming URI` will
//!    not do.
//! 2. Source ([`Migration::start`]): `migrate-set-capabilities`
//!    (`postcopy-ram`, `postcopy-preempt`), `migrate-set-parameters`
//!    (`max-bandwidth`, `max-postcopy-bandwidth`, `downtime-limit`),
//!    `migrate {uri}`.
//! 3. [`Migration::wait`]: `query-migrate` on the source every
//!    [`POLL_INTERVAL`]; `migrate-start-postcopy` when
//!    [`MigrationOptions::postcopy`] says so; once the source is
//!    `completed`, `query-migrate` and `query-status` on the destination
//!    until it is `completed` and no longer `inmigrate`.
//! 4. Postcopy recovery, after the source reached `postcopy-paused`
//!    (connection lost, or [`Migration::pause`]): [`Migration::recover`]
//!    (`migrate-recover {uri}` on the destination, out of band, which QEMU
//!    accepts only once the destination is `postcopy-paused`),
//!    then [`Migration::resume`] (`migrate {uri, resume: true}` on the
//!    source, which must be `postcopy-paused` too), then `wait` again.
//!
//! A precopy migration can be cancelled ([`Migration::cancel`]); a postcopy
//! one cannot, because the guest already runs on the destination.

use std::thread::sleep;
use std::time::{Duration, Instant};

use gmem_protocol::ControlClient;
use serde_json::{json, Value};

use crate::qmp::QmpClient;
use capabilities::set_capabilities;

mod capabilities;
mod driver;
mod error;
mod info;
mod report;

pub use capabilities::{postcopy_preempt_unavailable, query_capabilities, PreemptUnavailable, POSTCOPY_PREEMPT};
pub use driver::Migration;
pub use error::{MigrationError, Side};
pub use info::{MigrationStatus, QemuMigrationInfo, RamStats};
pub use report::{MigrationReport, Progress};

/// How often [`Migration::wait`] and the state waits ask QEMU.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long a recovery step waits for a side to reach the status it needs.
pub const STATE_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Migration::wait`] lets a postcopy with `postcopy-preempt` sit
/// with nothing left to send before it reports
/// [`MigrationError::PostcopyPreemptStuck`]. A postcopy that completes does
/// so within a second of sending its last page here, stuck ones never do.
pub const PREEMPT_STUCK_AFTER: Duration = Duration::from_secs(10);

/// [`MigrationOptions::timeout`] unless set otherwise.
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// How a migration is to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOptions {
    /// Where the destination listens, e.g. `tcp:10.231.1.2:4444` or
    /// `unix:/run/mig.sock` (`migrate-incoming`, `migrate-recover`).
    pub listen_uri: String,
    /// Where the source connects (`migrate`); differs from
    /// [`listen_uri`](Self::listen_uri) when a relay sits in between.
    pub connect_uri: String,
    /// Whether and when to switch to postcopy; `None` is precopy only.
    pub postcopy: Option<SwitchToPostcopy>,
    /// With [`postcopy`](Self::postcopy): send the pages the destination
    /// asks for on a connection of their own (`postcopy-preempt`, set on
    /// both QEMUs), instead of queueing them behind the pages streamed in
    /// the background. Needs the capability in both QEMUs and a URI that
    /// can open a second connection; [`postcopy_preempt_unavailable`] says
    /// whether they have it. Off unless set.
    pub postcopy_preempt: bool,
    /// Precopy bandwidth cap, bytes/s (`max-bandwidth`); `None` keeps
    /// QEMU's, which is 128 MiB/s unless changed.
    pub max_bandwidth: Option<u64>,
    /// Postcopy bandwidth cap for the pages pushed in the background,
    /// bytes/s (`max-postcopy-bandwidth`); `None` keeps QEMU's (0: unlimited).
    pub max_postcopy_bandwidth: Option<u64>,
    /// The downtime precopy aims for, ms (`downtime-limit`); `None` keeps
    /// QEMU's (300 ms).
    pub downtime_limit_ms: Option<u64>,
    /// How long the whole migration may take, from `migrate` until the
    /// destination's guest runs.
    pub timeout: Duration,
}

impl MigrationOptions {
    /// Precopy to `uri` (the same address on both sides) with QEMU's
    /// default bandwidth and downtime and [`DEFAULT_MIGRATION_TIMEOUT`].
    pub fn new(uri: impl Into<String>) -> Self {
        let uri = uri.into();
        MigrationOptions {
            connect_uri: uri.clone(),
            listen_uri: uri,
            postcopy: None,
            postcopy_preempt: false,
            max_bandwidth: None,
            max_postcopy_bandwidth: None,
            downtime_limit_ms: None,
            timeout: DEFAULT_MIGRATION_TIMEOUT,
        }
    }

    /// Whether `postcopy-preempt` is to be on: asked for, with postcopy.
    fn preempts(&self) -> bool {
        self.postcopy.is_some() && self.postcopy_preempt
    }
}

/// When [`Migration::wait`] sends `migrate-start-postcopy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchToPostcopy {
    /// Once precopy has sent every page once (QEMU's second dirty sync).
    AfterFirstPass,
    /// This long after `migrate` (at once if zero).
    After(Duration),
}

/// One end of a migration as [`Migration::wait`] sees it: its QEMU's QMP
/// connection and, when its RAM is gmemd's, that gmemd's control connection.
#[derive(Debug)]
pub struct Endpoint<'a> {
    /// The QEMU.
    pub qmp: &'a mut QmpClient,
    /// The gmemd owning its RAM, asked for `query-migration`.
    pub gmemd: Option<&'a mut ControlClient>,
}

impl<'a> Endpoint<'a> {
    /// A QEMU without a gmemd to ask.
    pub fn new(qmp: &'a mut QmpClient) -> Self {
        Endpoint { qmp, gmemd: None }
    }

    /// Also asks `gmemd` for its side of the migration.
    pub fn with_gmemd(mut self, gmemd: &'a mut ControlClient) -> Self {
        self.gmemd = Some(gmemd);
        self
    }
}

/// Readies the destination, which must run with `-incoming defer` and not
/// be listening yet: sets its capabilities and starts listening on
/// [`MigrationOptions::listen_uri`].
pub fn prepare_destination(dst: &mut QmpClient, options: &MigrationOptions) -> Result<(), MigrationError> {
    let side = Side::Destination;
    let run_state = dst.query_status().map_err(MigrationError::qmp(side))?;
    if run_state != "inmigrate" {
        return Err(MigrationError::NotIncoming { run_state });
    }
    if let Some(status) = query_migrate(dst, side)?.status {
        return Err(MigrationError::AlreadyIncoming { status });
    }
    let postcopy = options.postcopy.is_some();
    let capabilities =
        [("postcopy-ram", postcopy), (POSTCOPY_PREEMPT, options.preempts()), ("postcopy-blocktime", postcopy)];
    set_capabilities(dst, side, &capabilities)?;
    dst.execute("migrate-incoming", json!({ "uri": options.listen_uri })).map_err(MigrationError::qmp(side))?;
    Ok(())
}

/// `query-migrate` on `side`'s QEMU, parsed.
pub fn query_migrate(qmp: &mut QmpClient, side: Side) -> Result<QemuMigrationInfo, MigrationError> {
    let reply = qmp.execute("query-migrate", Value::Null).map_err(MigrationError::qmp(side))?;
    serde_json::from_value(reply).map_err(|e| MigrationError::Malformed { side, why: e.to_string() })
}

/// Waits up to `timeout` for `side`'s QEMU to reach one of `wanted` and
/// returns its `query-migrate` then. Fails with
/// [`MigrationError::WrongStatus`] on timeout, or at once when the
/// migration has finished in another status.
pub fn wait_for_status(
    qmp: &mut QmpClient,
    side: Side,
    wanted: &[MigrationStatus],
    timeout: Duration,
) -> Result<QemuMigrationInfo, MigrationError> {
    let mut status = MigrationStatus::None;
    let wrong = |status| MigrationError::WrongStatus {
        side,
        status,
        expected: wanted.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" or "),
    };
    let reached = poll_until(timeout, || {
        let info = query_migrate(qmp, side)?;
        status = info.status();
        if wanted.contains(&status) {
            Ok(Some(info))
        } else if status.is_finished() {
            Err(wrong(status))
        } else {
            Ok(None)
        }
    })?;
    reached.ok_or_else(|| wrong(status))
}

/// Calls `check` every [`POLL_INTERVAL`] until it returns a value, or
/// returns `None` once `timeout` has passed. `check` runs at least once.
fn poll_until<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>, MigrationError>,
) -> Result<Option<T>, MigrationError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests;
