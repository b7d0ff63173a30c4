//! The state file: what a gmemd restarted after a crash needs to know of
//! its previous life — which regions it had made (to adopt them back, see
//! [`GuestRegion::adopt`](crate::memory::GuestRegion::adopt)) and which
//! frontend processes mapped them (whether anyone still holds that RAM).
//! Written at start and whenever a frontend comes or goes, atomically,
//! mode 0600.
//!
//! The file is trusted only if gmemd's own user owns it and nobody else may
//! write it; even then it only says which fds to accept as the old regions,
//! and each fd must still prove it is one (same inode, size, seals, name
//! with its random token).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::memory::RegionRecord;

const VERSION: u32 = 1;

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing it failed.
    #[error("state file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// It is not gmemd's, or others may write it.
    #[error("state file {path} is owned by uid {uid} with mode {mode:o}; only a file of gmemd's own user that nobody else may write is trusted")]
    Untrusted { path: PathBuf, uid: u32, mode: u32 },
    /// It does not parse, or is of another version.
    #[error("state file {path}: {why}")]
    Malformed { path: PathBuf, why: String },
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Its pid.
    pub pid: i32,
    /// Its start time, in clock ticks since boot (/proc/<pid>/stat, field 22).
    pub start: u64,
}

impl Process {
    /// Process `pid` as it is now, if it exists.
    pub fn of(pid: i32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses: the
        // start time is the 20th of them.
        let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
        Some(Process { pid, start })
    }

    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        Process::of(self.pid) == Some(*self)
    }
}

/// What the file records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousLife {
    version: u32,
    /// The gmemd that wrote it.
    pub daemon: Process,
    /// Its regions.
    pub regions: Vec<RegionRecord>,
    /// The frontends connected when it last wrote.
    pub frontends: Vec<Process>,
    /// Its pin ledger: the budget its locked regions used, which a
    /// restarted gmemd takes back rather than charging again.
    #[serde(default)]
    pub pins: Option<gmem_pins::LedgerSnapshot>,
}

impl PreviousLife {
    /// Whether the RAM of that life may still be held: that gmemd is gone,
    /// and one of its frontends still runs (and so may still map it).
    pub fn ram_may_live(&self) -> bool {
        !self.daemon.alive() && self.frontends.iter().any(Process::alive)
    }
}

/// The state file at one path, and the processes it names as holding the
/// RAM.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// Frontends that mapped the regions, connected or not: a QEMU keeps
    /// the RAM mapped while it waits to reconnect. Dropped once they exit.
    holders: Vec<Process>,
}

impl StateFile {
    /// The state file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile { path: path.into(), holders: Vec::new() }
    }

    /// Goes on naming the frontends of a previous life as holders, so that
    /// a crash before they reconnect still leaves their RAM adoptable.
    pub fn carry_over(&mut self, previous: &PreviousLife) {
        self.holders.extend(previous.frontends.iter().copied());
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a previous gmemd recorded, if there is a file.
    pub fn load(&self) -> Result<Option<PreviousLife>, StateError> {
        let io = |source| StateError::Io { path: self.path.clone(), source };
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io(error)),
        };
        // SAFETY: geteuid has no preconditions.
        let own_uid = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != own_uid || meta.mode() & 0o022 != 0 {
            return Err(StateError::Untrusted { path: self.path.clone(), uid: meta.uid(), mode: meta.mode() & 0o7777 });
        }
        let text = std::fs::read_to_string(&self.path).map_err(io)?;
        let life: PreviousLife = serde_json::from_str(&text)
            .map_err(|e| StateError::Malformed { path: self.path.clone(), why: e.to_string() })?;
        if life.version != VERSION {
            let why = format!("version {}, this gmemd reads {VERSION}", life.version);
            return Err(StateError::Malformed { path: self.path.clone(), why });
        }
        Ok(Some(life))
    }

    /// Records this gmemd's regions and the frontends that hold them: those
    /// connected now (by pid) and earlier ones still running. Replaces the
    /// file whole.
    pub fn write(
        &mut self,
        regions: Vec<RegionRecord>,
        connected_pids: &[i32],
        pins: gmem_pins::LedgerSnapshot,
    ) -> Result<(), StateError> {
        let io = |source| StateError::Io { path: self.path.clone(), source };
        let daemon =
            Process::of(std::process::id() as i32).ok_or_else(|| io(std::io::Error::other("no /proc/self/stat")))?;
        for process in connected_pids.iter().filter_map(|pid| Process::of(*pid)) {
            if !self.holders.contains(&process) {
                self.holders.push(process);
            }
        }
        self.holders.retain(Process::alive);
        let life =
            PreviousLife { version: VERSION, daemon, regions, frontends: self.holders.clone(), pins: Some(pins) };
        let text = serde_json::to_string(&life).map_err(|e| io(std::io::Error::other(e)))?;
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".new");
        let new = self.path.with_file_name(name);
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&new).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        std::fs::rename(&new, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{RegionSet, RegionSpec};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_life_is_recorded_and_read_back_and_an_untrusted_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let mut state = StateFile::new(dir.path().join("s.state"));
        assert!(state.load().expect("no file").is_none());
        let regions = RegionSet::create(vec![RegionSpec::memfd("ram0", 1 << 20)]).expect("ram");
        let me = std::process::id() as i32;
        state.write(regions.records(), &[me], gmem_pins::PinLedger::new().snapshot()).expect("write");
        let life = state.load().expect("load").expect("a life");
        assert_eq!(life.regions, regions.records());
        assert_eq!(life.daemon.pid, me);
        assert!(!life.ram_may_live(), "the daemon that wrote it still runs");
        std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(matches!(state.load(), Err(StateError::Untrusted { .. })));
    }

    #[test]
    fn a_process_is_told_from_a_later_one_with_its_pid() {
        let me = Process::of(std::process::id() as i32).expect("self");
        assert!(me.alive());
        assert!(!Process { start: me.start + 1, ..me }.alive());
    }
}
