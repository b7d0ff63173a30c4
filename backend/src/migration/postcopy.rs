//! `PostcopySession`: one frontend's postcopy on the destination, from
//! POSTCOPY_ADVISE to POSTCOPY_END.
//!
//! ```text
//!  ADVISE ──▶ Advised ──LISTEN──▶ Listening ──mem table + ack──▶ Registered ──END──▶ Ended
//!  (uffd to QEMU)                  (reply with our bases)   (MADV_NOHUGEPAGE,
//!                                                            UFFDIO_REGISTER)
//! ```
//!
//! Until guest RAM is registered, nothing in gmemd may touch it: a page read
//! through an unregistered mapping would be filled with zeros and QEMU's
//! later placement of the real page would fail with EEXIST. gmemd maps each
//! region once and the data path only reaches RAM through that mapping, and
//! vrings cannot start before the registration (the connection checks
//! [`PostcopySession::device_may_run`]).

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use gmem_protocol::MigrationState;

use super::userfault::{Userfault, UserfaultError};
use super::MigrationStats;

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyPhase {
    /// POSTCOPY_ADVISE done: QEMU holds the userfaultfd.
    Advised,
    /// POSTCOPY_LISTEN done.
    Listening,
    /// The memory table is registered; the device may run.
    Registered,
    /// POSTCOPY_END done.
    Ended,
}

/// Errors of the postcopy flow.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// userfaultfd failed.
    #[error(transparent)]
    Userfault(#[from] UserfaultError),
    /// A message arrived in the wrong phase.
    #[error("{message} is out of order: postcopy is {phase:?}")]
    OutOfOrder { message: &'static str, phase: PostcopyPhase },
    /// madvise on guest RAM failed.
    #[error("madvise({advice}) on {len:#x} bytes at {addr:#x}: {source}")]
    Madvise { advice: &'static str, addr: u64, len: u64, source: std::io::Error },
}

/// A range of gmemd's own mapping of guest RAM to register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// gmemd's address of its first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether gmemd asked for transparent huge pages on it (given back at the end).
    pub hugepage: bool,
}

/// One postcopy, destination side.
#[derive(Debug)]
pub struct PostcopySession {
    uffd: Userfault,
    phase: PostcopyPhase,
    registered: Vec<HostRange>,
    stats: Arc<MigrationStats>,
}

impl PostcopySession {
    /// POSTCOPY_ADVISE: a new userfaultfd and the fd QEMU gets for it.
    pub fn advise(stats: Arc<MigrationStats>, hugetlb: bool) -> Result<(Self, File), PostcopyError> {
        let uffd = Userfault::open(hugetlb)?;
        let for_qemu = uffd.share().map_err(|e| UserfaultError::Api(format!("duplicating the fd: {e}")))?;
        stats.set_state(MigrationState::PostcopyAdvised);
        Ok((PostcopySession { uffd, phase: PostcopyPhase::Advised, registered: Vec::new(), stats }, for_qemu))
    }

    /// The current phase.
    pub fn phase(&self) -> PostcopyPhase {
        self.phase
    }

    /// Whether vrings may run: never between ADVISE and the registration,
    /// when any touch of guest RAM would break QEMU's page placement.
    pub fn device_may_run(&self) -> bool {
        matches!(self.phase, PostcopyPhase::Registered | PostcopyPhase::Ended)
    }

    /// Whether memory-table messages are in postcopy mode (answered with
    /// gmemd's bases, then acked).
    pub fn listening(&self) -> bool {
        matches!(self.phase, PostcopyPhase::Listening | PostcopyPhase::Registered)
    }

    /// POSTCOPY_LISTEN.
    pub fn listen(&mut self) -> Result<(), PostcopyError> {
        self.expect("POSTCOPY_LISTEN", PostcopyPhase::Advised)?;
        self.phase = PostcopyPhase::Listening;
        self.stats.set_state(MigrationState::PostcopyListening);
        Ok(())
    }

    /// QEMU's ack of the memory table: registers every view not registered
    /// yet for missing-page faults, after turning THP off on it (a collapse
    /// would fill missing pages behind QEMU's back).
    pub fn register(&mut self, ranges: &[HostRange]) -> Result<(), PostcopyError> {
        if !self.listening() {
            return Err(PostcopyError::OutOfOrder { message: "the memory-table ack", phase: self.phase });
        }
        for range in ranges {
            if self.registered.iter().any(|r| r.addr == range.addr && r.len == range.len) {
                continue;
            }
            madvise(range.addr, range.len, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
            self.uffd.register_missing(range.addr, range.len)?;
            self.registered.push(*range);
        }
        self.phase = PostcopyPhase::Registered;
        self.stats.set_registered(self.registered_bytes());
        self.stats.set_state(MigrationState::PostcopyRunning);
        log::info!("postcopy: {} bytes of guest RAM registered for missing-page faults", self.registered_bytes());
        Ok(())
    }

    fn registered_bytes(&self) -> u64 {
        self.registered.iter().map(|r| r.len).sum()
    }

    /// POSTCOPY_END: every page has arrived; drop the registration and give
    /// THP back where gmemd had asked for it.
    pub fn end(&mut self) -> Result<(), PostcopyError> {
        if !self.listening() {
            return Err(PostcopyError::OutOfOrder { message: "POSTCOPY_END", phase: self.phase });
        }
        let result = self.unregister_all();
        self.phase = PostcopyPhase::Ended;
        self.stats.set_state(MigrationState::PostcopyEnded);
        result
    }

    /// Drops the registration of a postcopy that will not complete (its
    /// frontend is gone): every worker waiting on a missing page wakes up.
    pub fn abort(&mut self) -> Result<(), PostcopyError> {
        let result = self.unregister_all();
        self.phase = PostcopyPhase::Ended;
        self.stats.set_state(MigrationState::PostcopyAborted);
        result
    }

    fn unregister_all(&mut self) -> Result<(), PostcopyError> {
        let mut first_error = None;
        for registration in self.registered.drain(..) {
            let undone =
                self.uffd.unregister(registration.addr, registration.len).map_err(PostcopyError::from).and_then(|()| {
                    if registration.hugepage {
                        madvise(registration.addr, registration.len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")
                    } else {
                        Ok(())
                    }
                });
            if let Err(error) = undone {
                log::error!("postcopy end: {error}");
                first_error.get_or_insert(error);
            }
        }
        self.stats.set_registered(0);
        first_error.map_or(Ok(()), Err)
    }

    fn expect(&self, message: &'static str, phase: PostcopyPhase) -> Result<(), PostcopyError> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(PostcopyError::OutOfOrder { message, phase: self.phase })
        }
    }

    /// Whether guest RAM is registered now.
    pub fn registered(&self) -> bool {
        !self.registered.is_empty()
    }
}

fn madvise(addr: u64, len: u64, advice: i32, name: &'static str) -> Result<(), PostcopyError> {
    // SAFETY: the range is a view of a guest-RAM mapping gmemd keeps for its
    // lifetime; MADV_(NO)HUGEPAGE only changes the VMA's THP policy, never
    // its content.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    if ret < 0 {
        return Err(PostcopyError::Madvise { advice: name, addr, len, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Faults in, one by one, the pages of `iovecs` that are missing, through
/// the registered mapping, timing each wait: that is the device's
/// fault-to-wake latency (QEMU fetches the page from the source, places it
/// and wakes us). Called by the data path only while faults are possible.
///
/// MADV_POPULATE_READ faults like a read would, but reports failure as an
/// error rather than SIGBUS, so a userfaultfd that goes away under a waiting
/// worker fails that request instead of killing the daemon. While the
/// registration is orphaned (its frontend is gone) no page will ever
/// arrive: a missing page then fails the request at once.
pub fn fault_in(iovecs: &[libc::iovec], stats: &MigrationStats) -> Result<(), MissingPage> {
    const PAGE: usize = 4096;
    let mut residency = Vec::new();
    for iov in iovecs.iter().filter(|iov| iov.iov_len > 0) {
        let start = iov.iov_base as usize & !(PAGE - 1);
        let end = (iov.iov_base as usize + iov.iov_len).next_multiple_of(PAGE);
        let pages = (end - start) / PAGE;
        residency.clear();
        residency.resize(pages, 0u8);
        // SAFETY: mincore only reads page-table state for the range (whole
        // pages of a live guest-RAM mapping) and writes `pages` bytes into
        // `residency`, which has exactly that length.
        let ret = unsafe { libc::mincore(start as *mut libc::c_void, end - start, residency.as_mut_ptr()) };
        if ret < 0 {
            continue;
        }
        for (index, _) in residency.iter().enumerate().filter(|(_, r)| **r & 1 == 0) {
            let page = start + index * PAGE;
            // Placing one page may have placed this one too: a hugetlb page
            // covers 512 of these, and QEMU may have streamed it meanwhile.
            let mut now = 0u8;
            // SAFETY: as above, for one page and a one-byte vector.
            if unsafe { libc::mincore(page as *mut libc::c_void, PAGE, &mut now) } == 0 && now & 1 == 1 {
                continue;
            }
            if stats.orphaned() {
                return Err(MissingPage::Orphaned);
            }
            let started = Instant::now();
            // SAFETY: one whole page of the same live mapping; populating
            // reads it in (through QEMU's resolution of the fault) and does
            // not change its content.
            let ret = unsafe { libc::madvise(page as *mut libc::c_void, PAGE, libc::MADV_POPULATE_READ) };
            if ret != 0 {
                return Err(MissingPage::Fault(std::io::Error::last_os_error()));
            }
            stats.fault_resolved(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(())
}

/// Why a page the device needs did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum MissingPage {
    /// The postcopy's frontend is gone; nobody will place the page.
    #[error("a guest page has not arrived and its postcopy frontend is gone")]
    Orphaned,
    /// Faulting the page in failed.
    #[error("faulting in a guest page that has not arrived: {0}")]
    Fault(std::io::Error),
}
