//! [`LiveUpdateError`]: why a live update was refused or failed, and what
//! became of the guest.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use super::{CprMode, QemuVersion};
use crate::process::ProcessError;
use crate::qmp::QmpError;

/// Why a live update hop was refused or failed.
///
/// The variants up to [`Refused`](Self::Refused) are refusals before
/// anything changes: the guest keeps running where it was.
#[derive(Debug, thiserror::Error)]
pub enum LiveUpdateError {
    /// A QMP exchange failed.
    #[error("{during}: {source}")]
    Qmp {
        /// What was being done, e.g. "query-status on the running QEMU".
        during: &'static str,
        /// What went wrong.
        source: QmpError,
    },
    /// QEMU answered something this crate cannot read.
    #[error("{during}: unexpected reply {reply}")]
    Malformed {
        /// What was being asked.
        during: &'static str,
        /// The reply.
        reply: String,
    },
    /// The QMP peer's pid is not visible (another pid namespace): the
    /// running QEMU's command line and mappings cannot be checked, nor can
    /// a cpr-transfer stop it.
    #[error("cannot tell which process serves QMP at {qmp}: its pid is not visible here (another pid namespace?)")]
    NoPeerPid {
        /// The QMP socket.
        qmp: PathBuf,
    },
    /// Reading or signalling a process failed.
    #[error("process {pid}: {source}")]
    Process {
        /// The process.
        pid: u32,
        /// What went wrong.
        source: io::Error,
    },
    /// The guest is neither running nor paused.
    #[error("the guest's run state is {run_state}; a live update needs it running or paused")]
    NotRunning {
        /// QEMU's run state, e.g. `inmigrate` or `shutdown`.
        run_state: String,
    },
    /// Another migration is under way.
    #[error("QEMU has a migration in progress ({status}); let it finish or cancel it first")]
    MigrationInProgress {
        /// Its `query-migrate` status.
        status: String,
    },
    /// The running QEMU does not have the migration mode.
    #[error(
        "the running QEMU ({version}) does not offer migration mode {mode} ({qemu_says}); {mode} needs QEMU {} or later",
        mode.min_version()
    )]
    ModeUnsupported {
        /// The mode asked for.
        mode: CprMode,
        /// The running QEMU's version.
        version: QemuVersion,
        /// QEMU's refusal of `migrate-set-parameters`.
        qemu_says: String,
    },
    /// The new QEMU binary cannot be run or its version read.
    #[error("cannot use {binary} as the new QEMU: {why}")]
    BinaryUnusable {
        /// The binary.
        binary: PathBuf,
        /// Why.
        why: String,
    },
    /// The new QEMU binary is too old for the mode.
    #[error("{binary} is QEMU {version}; {mode} needs QEMU {} or later on the new side", mode.min_version())]
    BinaryTooOld {
        /// The binary.
        binary: PathBuf,
        /// Its version.
        version: QemuVersion,
        /// The mode.
        mode: CprMode,
    },
    /// A memory backend is private: the new QEMU would not see the guest's
    /// writes. QEMU 11 does not refuse this for cpr-exec, and the guest
    /// would be lost.
    #[error("memory backend {id} has share=off: the new QEMU would get the guest's RAM as it was before the guest's writes; use share=on")]
    PrivateMemory {
        /// The backend's id.
        id: String,
    },
    /// `aux-ram-share` is off: ROMs and ACPI tables live in QEMU's private
    /// memory and would be rebuilt, not carried over. QEMU 11 does not
    /// refuse this for cpr-exec.
    #[error("the machine runs without aux-ram-share=on: its ROMs and ACPI tables would not be carried over; start QEMU with -machine ...,aux-ram-share=on (gmemctl --aux-ram-share)")]
    NoAuxRamShare,
    /// The new QEMU would build another machine type than the guest runs
    /// on, and refuse its state.
    #[error(
        "the guest runs on machine type {running}, but the new QEMU would build {next} from -machine {requested}; \
         start guests meant for live update to another QEMU release with a versioned machine type \
         (gmemctl --machine-type {running})"
    )]
    MachineTypeMismatch {
        /// The running machine's type.
        running: String,
        /// What the new binary would build.
        next: String,
        /// What the new command line asks for.
        requested: String,
    },
    /// The new command line is not the running one: the new QEMU would
    /// build another machine and fail to load the guest's state.
    #[error(
        "the new command line differs from the running QEMU's at argument {index}: it has {}, the running QEMU {}; \
         give the same VM options as when it was started",
        quoted(next),
        quoted(running)
    )]
    CommandLineMismatch {
        /// Position in the new arguments (0: the first after the binary).
        index: usize,
        /// The new argument there.
        next: Option<String>,
        /// The running QEMU's argument there.
        running: Option<String>,
    },
    /// A `mem-path` of the new command line does not lead to memory the
    /// running QEMU has mapped: the new QEMU would not find the guest's RAM
    /// (e.g. gmemd was restarted; its `/proc/<pid>/fd/<n>` paths changed).
    #[error("memory backend {id}: {path} is not the memory the running QEMU maps ({why})")]
    RamNotReachable {
        /// The backend's id.
        id: String,
        /// Its `mem-path`.
        path: String,
        /// What was found instead.
        why: String,
    },
    /// The new command line has no QMP socket to reach the new QEMU by.
    #[error("the new command line has no -qmp socket")]
    NoQmpSocket,
    /// Setting up the hop's files failed.
    #[error("{what} {path}: {source}")]
    File {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// Starting the new QEMU failed.
    #[error("starting the new QEMU: {0}")]
    Spawn(#[from] ProcessError),
    /// The running QEMU refused the migration (a CPR blocker, say). The
    /// guest keeps running in it.
    #[error("the running QEMU refused to start {mode}: {source}; the guest keeps running in it")]
    Refused {
        /// The mode.
        mode: CprMode,
        /// QEMU's answer.
        source: QmpError,
    },
    /// The migration failed and the old QEMU resumed the guest (cpr-exec:
    /// the exec itself failed; cpr-transfer: the new QEMU did not take it).
    #[error("{mode} failed ({}); the guest runs on in the old QEMU, which is {run_state}", error.as_deref().unwrap_or("QEMU gave no reason"))]
    Failed {
        /// The mode.
        mode: CprMode,
        /// The old QEMU's `error-desc`.
        error: Option<String>,
        /// The old QEMU's run state afterwards.
        run_state: String,
    },
    /// The new QEMU exited during the hop. With cpr-exec this is the
    /// guest's QEMU: the guest is lost (gmemd keeps its RAM and disk).
    #[error("the new QEMU (pid {pid}) exited during the {mode} hop{}; its stderr says why", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    NewQemuExited {
        /// The mode.
        mode: CprMode,
        /// Its pid.
        pid: u32,
        /// Its exit status, when it was our child.
        status: Option<ExitStatus>,
    },
    /// The new QEMU loaded the guest but does not run it.
    #[error("the guest does not run in the new QEMU: its run state is {run_state}")]
    NewQemuState {
        /// Its run state, e.g. `internal-error`.
        run_state: String,
    },
    /// After a cpr-transfer the old QEMU is not `postmigrate`, so it is not
    /// killed.
    #[error("the old QEMU is {run_state}, not postmigrate: it is left alone")]
    OldNotHandedOver {
        /// Its run state.
        run_state: String,
    },
    /// A step did not happen in time.
    #[error("timed out after {seconds:.1} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        seconds: f64,
    },
}

fn quoted(arg: &Option<String>) -> String {
    arg.as_ref().map_or_else(|| "nothing more".to_string(), |a| format!("{a:?}"))
}

impl LiveUpdateError {
    /// A [`LiveUpdateError::Qmp`] mapper.
    pub(super) fn qmp(during: &'static str) -> impl Fn(QmpError) -> LiveUpdateError {
        move |source| LiveUpdateError::Qmp { during, source }
    }

    /// A [`LiveUpdateError::Process`] mapper.
    pub(super) fn process(pid: u32) -> impl Fn(io::Error) -> LiveUpdateError {
        move |source| LiveUpdateError::Process { pid, source }
    }
}
