//! What the kernel says gmemd has pinned, and its comparison with the ledger.
//!
//! Three figures are visible from inside the process:
//! - `VmLck` in /proc/self/status: this mm's `locked_vm`, the mlocked
//!   bytes, counted per mapping (a range mapped twice and locked twice
//!   counts twice). Exec resets it to 0.
//! - `VmPin`: this mm's `pinned_vm`, where io_uring charges fixed buffers
//!   registered by this mm. Buffers registered by an earlier image stay
//!   pinned after an exec, charged to the dead mm, and are in no `VmPin`.
//! - The io_uring fd's fdinfo: `UserBufs:` and one line per buffer,
//!   `    <index>: 0x<user address>/<length>` (`<none>` for an empty slot
//!   of a sparse table). The kernel prints the lines only when it can take
//!   the ring's lock without waiting, so a busy ring can show the count
//!   without them. On Linux 6.18 the text is, for two buffers (a tab after
//!   each colon, shown here as spaces):
//!
//! ```text
//! UserFiles:    0
//! UserBufs:     2
//!     0: 0x7fc353e00000/2097152
//!     1: 0x7fc3542be000/8192
//! PollList:
//! ```
//!
//! `user->locked_vm`, where io_uring also charges its buffers (without
//! CAP_IPC_LOCK) and which survives exec, is not shown anywhere.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use crate::ledger::{Holder, PinKind, PinLedger, PinState, RingId};

/// The kernel's page size for the counts of `VmLck` and `VmPin`.
const PAGE_SIZE: u64 = 4096;

/// Why a kernel figure could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The /proc file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    /// A line had a form this parser does not know.
    #[error("{path}: unreadable line {line:?}")]
    Parse { path: String, line: String },
}

/// `VmLck` and `VmPin` of /proc/<pid>/status, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStatus {
    /// `VmLck`: mlocked bytes of this mm.
    pub vm_lck: Option<u64>,
    /// `VmPin`: pinned bytes charged to this mm.
    pub vm_pin: Option<u64>,
}

impl ProcStatus {
    /// Reads this process's status.
    pub fn read_self() -> Result<Self, KernelError> {
        let path = "/proc/self/status";
        let text = std::fs::read_to_string(path).map_err(|source| KernelError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|line| KernelError::Parse { path: path.into(), line })
    }

    /// Parses a status text; a malformed `VmLck`/`VmPin` line is returned as the error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut status = ProcStatus::default();
        for line in text.lines() {
            let (key, value) = match line.split_once(':') {
                Some((key @ ("VmLck" | "VmPin"), value)) => (key, value),
                _ => continue,
            };
            let kib = value
                .trim()
                .strip_suffix("kB")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .and_then(|n| n.checked_mul(1024))
                .ok_or_else(|| line.to_string())?;
            if key == "VmLck" {
                status.vm_lck = Some(kib);
            } else {
                status.vm_pin = Some(kib);
            }
        }
        Ok(status)
    }
}

/// One registered buffer as fdinfo lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingBuffer {
    /// Its slot in the ring's buffer table.
    pub index: u32,
    /// The user address it was registered at (in the mm that registered it).
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// The registered buffers of one io_uring fd, from its fdinfo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingFdinfo {
    /// `UserBufs:`, the size of the buffer table (empty slots included);
    /// `None` if the kernel printed no such line.
    pub table_size: Option<u32>,
    /// The buffers listed.
    pub buffers: Vec<RingBuffer>,
    /// Whether the listing is whole: the kernel listed one line per slot.
    /// It skips them when the ring's lock is busy.
    pub complete: bool,
}

impl RingFdinfo {
    /// Reads the fdinfo of this process's fd `fd`.
    pub fn read_self(fd: RawFd) -> Result<Self, KernelError> {
        let path = format!("/proc/self/fdinfo/{fd}");
        let text = std::fs::read_to_string(&path).map_err(|source| KernelError::Read { path: path.clone(), source })?;
        Self::parse(&text).map_err(|line| KernelError::Parse { path, line })
    }

    /// Parses an io_uring fdinfo text; a malformed buffer line is returned
    /// as the error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut info = RingFdinfo::default();
        let mut lines = text.lines().skip_while(|line| !line.starts_with("UserBufs:"));
        let Some(header) = lines.next() else { return Ok(info) };
        let size = header["UserBufs:".len()..].trim().parse::<u32>().map_err(|_| header.to_string())?;
        info.table_size = Some(size);
        let mut slots = 0u32;
        // The buffer lines are indented `<index>: ...`; the next section
        // (`Personalities:`, `PollList:`) starts at the margin.
        for line in lines.take_while(|line| line.starts_with(' ')) {
            let (index, rest) = line.trim().split_once(": ").ok_or_else(|| line.to_string())?;
            let index = index.parse::<u32>().map_err(|_| line.to_string())?;
            slots = slots.saturating_add(1);
            if rest == "<none>" {
                continue;
            }
            let (addr, len) = rest
                .strip_prefix("0x")
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(addr, len)| Some((u64::from_str_radix(addr, 16).ok()?, len.parse::<u64>().ok()?)))
                .ok_or_else(|| line.to_string())?;
            info.buffers.push(RingBuffer { index, addr, len });
        }
        info.complete = slots == size;
        Ok(info)
    }

    /// Bytes of the listed buffers.
    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(|buffer| buffer.len).fold(0, u64::saturating_add)
    }
}

/// What the kernel says, gathered for [`PinLedger::reconcile`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// /proc/self/status.
    pub status: ProcStatus,
    /// The fdinfo of each ring gmemd has open.
    pub rings: BTreeMap<RingId, RingFdinfo>,
}

impl Observed {
    /// Reads /proc/self/status and the fdinfo of each ring in `rings`
    /// (its id and fd).
    pub fn read_self(rings: impl IntoIterator<Item = (RingId, RawFd)>) -> Result<Self, KernelError> {
        let status = ProcStatus::read_self()?;
        let rings = rings
            .into_iter()
            .map(|(id, fd)| Ok((id, RingFdinfo::read_self(fd)?)))
            .collect::<Result<_, KernelError>>()?;
        Ok(Observed { status, rings })
    }
}

/// How a figure compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Ledger and kernel agree.
    Match,
    /// They disagree.
    Mismatch,
    /// The kernel did not say.
    Unknown,
}

/// One figure, as the ledger expects it and as the kernel shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What is compared.
    pub what: String,
    /// The ledger's figure.
    pub expected: u64,
    /// The kernel's, if it said.
    pub observed: Option<u64>,
    /// The comparison.
    pub verdict: Verdict,
}

impl Check {
    fn new(what: String, expected: u64, observed: Option<u64>) -> Self {
        let verdict = match observed {
            None => Verdict::Unknown,
            Some(observed) if observed == expected => Verdict::Match,
            Some(_) => Verdict::Mismatch,
        };
        Check { what, expected, observed, verdict }
    }
}

/// The ledger against the kernel, for `query-pins`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    /// Every figure compared.
    pub checks: Vec<Check>,
    /// Fixed-buffer bytes charged to earlier images' dead mms: in no
    /// `VmPin`, only in the rings' fdinfo.
    pub dead_mm_bytes: u64,
}

impl Reconciliation {
    /// The checks that disagree.
    pub fn mismatches(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|check| check.verdict == Verdict::Mismatch)
    }
}

/// The bytes of the pages `[offset, offset + len)` touches: what the kernel
/// counts for a pin of that range.
fn page_span(offset: u64, len: u64) -> u64 {
    let start = offset - offset % PAGE_SIZE;
    let end = offset.saturating_add(len).div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
    end - start
}

impl PinLedger {
    /// Compares the ledger with what the kernel says.
    ///
    /// - `VmLck` must equal the page-rounded mlocks this image holds;
    /// - `VmPin` the page-rounded fixed buffers this image registered;
    /// - each ring's fdinfo the number and bytes of its fixed buffers,
    ///   whichever image registered them.
    ///
    /// The expectations assume each region is mapped once in gmemd and
    /// nothing else in the process is locked or pinned; anything else shows
    /// as a mismatch, which is what `query-pins` is for.
    pub fn reconcile(&self, observed: &Observed) -> Reconciliation {
        let current = Holder::Image(self.image());
        let mut locked = 0u64;
        let mut pinned = 0u64;
        let mut dead_mm_bytes = 0u64;
        let mut rings: BTreeMap<RingId, (u64, u64)> = BTreeMap::new();
        for record in self.pins().filter(|record| record.state == PinState::Held) {
            let span = page_span(record.offset, record.len);
            match record.kind {
                PinKind::Mlock if record.holder == current => locked = locked.saturating_add(span),
                PinKind::FixedBuffer => {
                    if record.holder == current {
                        pinned = pinned.saturating_add(span);
                    } else if matches!(record.holder, Holder::Image(_)) {
                        dead_mm_bytes = dead_mm_bytes.saturating_add(record.len);
                    }
                    if let Some(ring) = record.ring {
                        let (count, bytes) = rings.entry(ring).or_default();
                        *count = count.saturating_add(1);
                        *bytes = bytes.saturating_add(record.len);
                    }
                }
                _ => {}
            }
        }
        let mut checks = vec![
            Check::new("VmLck".into(), locked, observed.status.vm_lck),
            Check::new("VmPin".into(), pinned, observed.status.vm_pin),
        ];
        for ring in rings.keys().chain(observed.rings.keys()).copied().collect::<std::collections::BTreeSet<_>>() {
            let (count, bytes) = rings.get(&ring).copied().unwrap_or_default();
            let info = observed.rings.get(&ring).filter(|info| info.complete);
            checks.push(Check::new(format!("{ring} buffers"), count, info.map(|info| info.buffers.len() as u64)));
            checks.push(Check::new(format!("{ring} bytes"), bytes, info.map(RingFdinfo::bytes)));
        }
        Reconciliation { checks, dead_mm_bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_in_bytes() {
        let text = "Name:\tgmemd\nVmPeak:\t  1000 kB\nVmLck:\t   65536 kB\nVmPin:\t    2056 kB\nVmHWM:\t 9 kB\n";
        assert_eq!(ProcStatus::parse(text), Ok(ProcStatus { vm_lck: Some(64 << 20), vm_pin: Some(2056 * 1024) }));
        assert_eq!(ProcStatus::parse("Name:\tx\n"), Ok(ProcStatus::default()));
        assert!(ProcStatus::parse("VmLck:\t lots\n").is_err());
    }

    #[test]
    fn fdinfo_of_linux_6_18() {
        // As printed here for two buffers (see the module documentation).
        let text = "pos:\t0\nflags:\t02000002\nSqThread:\t-1\nUserFiles:\t0\nUserBufs:\t2\n    0: 0x7fc353e00000/2097152\n    1: 0x7fc3542be000/8192\nPollList:\nCqOverflowList:\nNAPI:\tdisabled\n";
        let info = RingFdinfo::parse(text).expect("parse");
        assert_eq!(info.table_size, Some(2));
        assert!(info.complete);
        assert_eq!(
            info.buffers,
            vec![
                RingBuffer { index: 0, addr: 0x7fc3_53e0_0000, len: 2 << 20 },
                RingBuffer { index: 1, addr: 0x7fc3_542b_e000, len: 8192 }
            ]
        );
        assert_eq!(info.bytes(), (2 << 20) + 8192);
    }

    #[test]
    fn fdinfo_sparse_and_unlisted() {
        let sparse = "UserBufs:\t3\n    0: <none>\n    1: 0x1000/4096\n    2: <none>\nPollList:\n";
        let info = RingFdinfo::parse(sparse).expect("parse");
        assert!(info.complete);
        assert_eq!(info.buffers, vec![RingBuffer { index: 1, addr: 0x1000, len: 4096 }]);
        // The ring's lock was busy: the count without the lines.
        let busy = RingFdinfo::parse("UserBufs:\t2\nPollList:\n").expect("parse");
        assert_eq!(busy.table_size, Some(2));
        assert!(!busy.complete);
        assert_eq!(RingFdinfo::parse("pos:\t0\n").expect("parse"), RingFdinfo::default());
        assert!(RingFdinfo::parse("UserBufs:\t1\n    0: garbage\n").is_err());
    }

    #[test]
    fn spans_are_whole_pages() {
        assert_eq!(page_span(0, 4096), 4096);
        assert_eq!(page_span(100, 10), 4096);
        assert_eq!(page_span(4000, 200), 8192);
    }
}
