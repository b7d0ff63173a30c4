//! [`MigrationError`]: why a migration step failed.

use std::fmt;
use std::time::Duration;

use gmem_protocol::ClientError;

use super::{MigrationReport, MigrationStatus};
use crate::qmp::QmpError;

/// One of the two ends of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The QEMU (and gmemd) the guest leaves.
    Source,
    /// The QEMU (and gmemd) the guest moves to.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Talking QMP to one side failed, or QEMU refused a command.
    #[error("{side} QEMU: {source}")]
    Qmp {
        /// Which QEMU.
        side: Side,
        /// What went wrong.
        source: QmpError,
    },
    /// A gmemd control socket failed.
    #[error("{side} gmemd: {source}")]
    Gmemd {
        /// Which gmemd.
        side: Side,
        /// What went wrong.
        source: ClientError,
    },
    /// `query-migrate` returned something that does not parse.
    #[error("{side} QEMU: unexpected query-migrate reply: {why}")]
    Malformed {
        /// Which QEMU.
        side: Side,
        /// The parse error.
        why: String,
    },
    /// The destination is not a QEMU waiting for an incoming migration.
    #[error(
        "the destination QEMU is not waiting for an incoming migration (its run state is \
         {run_state}); start it with -incoming defer"
    )]
    NotIncoming {
        /// Its run state, e.g. `running`.
        run_state: String,
    },
    /// The destination already listens (`-incoming URI` or an earlier
    /// `migrate-incoming`), so its capabilities can no longer be chosen.
    #[error(
        "the destination QEMU already has an incoming migration ({status}); start it with \
         -incoming defer (not -incoming URI), so capabilities can be set before it listens"
    )]
    AlreadyIncoming {
        /// Its incoming migration's status, e.g. `setup`.
        status: MigrationStatus,
    },
    /// QEMU reported `failed`.
    #[error("migration failed: {}{}", reason(source_error), destination_reason(destination_error))]
    Failed {
        /// The source's `error-desc`.
        source_error: Option<String>,
        /// The destination's `error-desc`, if it could still be asked.
        destination_error: Option<String>,
    },
    /// QEMU reported `cancelled`; the guest keeps running on the source.
    #[error("migration cancelled; the guest keeps running on the source")]
    Cancelled,
    /// The source reached `postcopy-paused`: the guest runs on the
    /// destination but waits for pages that have not arrived. Recover with
    /// [`Migration::recover`](super::Migration::recover) and
    /// [`Migration::resume`](super::Migration::resume), then wait again.
    #[error("postcopy paused: {}", reason(error_desc))]
    PostcopyPaused {
        /// The source's `error-desc`, e.g. "Postcopy migration is paused by the user".
        error_desc: Option<String>,
    },
    /// A step needs one side in another migration status than it is.
    #[error("the {side} QEMU's migration is {status}, but this needs it {expected}")]
    WrongStatus {
        /// Which QEMU.
        side: Side,
        /// Its status when we gave up waiting.
        status: MigrationStatus,
        /// What was needed, e.g. "postcopy-paused".
        expected: String,
    },
    /// Postcopy with `postcopy-preempt` has sent all of RAM but does not
    /// complete: the destination waits for page requests of vhost-user
    /// backends that QEMU never marks as served (QEMU 10.0.2 and 11.1.3;
    /// see [`PreemptUnavailable::VhostUserDevices`](super::PreemptUnavailable::VhostUserDevices)).
    /// The guest runs on the destination; the source stays `postcopy-active`.
    #[error(
        "postcopy sent all of RAM {} ago but does not complete: with postcopy-preempt, the destination \
         QEMU waits forever for page requests its vhost-user backends made (a QEMU bug seen in 10.0.2 and \
         11.1.3; docs/migration.md); the guest runs on the destination, the source QEMU stays postcopy-active",
        seconds(*sent_all_for)
    )]
    PostcopyPreemptStuck {
        /// How long the source had had nothing left to send.
        sent_all_for: Duration,
        /// Both QEMUs' and gmemds' figures as they stood then; `total_time_ms`
        /// is the time so far.
        report: Box<MigrationReport>,
    },
    /// The migration did not finish in time.
    #[error("migration still {status} after {}", seconds(*elapsed))]
    Timeout {
        /// The source's status then.
        status: MigrationStatus,
        /// How long it had run.
        elapsed: Duration,
    },
    /// The destination's guest should run by now but does not.
    #[error("the destination QEMU's guest does not run: its run state is {run_state}")]
    DestinationNotRunning {
        /// Its run state, e.g. `internal-error`.
        run_state: String,
    },
}

impl MigrationError {
    /// A [`MigrationError::Qmp`] mapper for `side`.
    pub(super) fn qmp(side: Side) -> impl Fn(QmpError) -> MigrationError {
        move |source| MigrationError::Qmp { side, source }
    }

    /// A [`MigrationError::Gmemd`] mapper for `side`.
    pub(super) fn gmemd(side: Side) -> impl Fn(ClientError) -> MigrationError {
        move |source| MigrationError::Gmemd { side, source }
    }
}

fn reason(desc: &Option<String>) -> &str {
    desc.as_deref().unwrap_or("QEMU gave no reason")
}

fn destination_reason(desc: &Option<String>) -> String {
    desc.as_ref().map(|d| format!(" (destination: {d})")).unwrap_or_default()
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}
