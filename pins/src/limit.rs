//! Budgets, and the default one the kernel would apply to gmemd.

use std::io;

use serde::{Deserialize, Serialize};

/// A budget of pinned bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Limit {
    /// No budget (CAP_IPC_LOCK, or `RLIMIT_MEMLOCK` infinite).
    Unlimited,
    /// At most this many bytes.
    Bytes(u64),
}

/// Why the default budget could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// getrlimit failed.
    #[error("getrlimit(RLIMIT_MEMLOCK): {0}")]
    Rlimit(io::Error),
    /// /proc/self/status could not be read.
    #[error("reading /proc/self/status: {0}")]
    Status(io::Error),
    /// /proc/self/status has no readable CapEff line.
    #[error("/proc/self/status has no readable CapEff line")]
    NoCapEff,
}

/// The bit of CAP_IPC_LOCK in a capability mask (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

impl Limit {
    /// Whether `total` bytes fit.
    pub fn allows(self, total: u64) -> bool {
        match self {
            Limit::Unlimited => true,
            Limit::Bytes(budget) => total <= budget,
        }
    }

    /// The budget in bytes, `None` when unlimited.
    pub fn bytes(self) -> Option<u64> {
        match self {
            Limit::Unlimited => None,
            Limit::Bytes(budget) => Some(budget),
        }
    }

    /// The budget the kernel applies to this process's mlocks and io_uring
    /// buffers: none with CAP_IPC_LOCK in the effective set, else the soft
    /// `RLIMIT_MEMLOCK`. This is `--memlock-limit`'s default.
    pub fn probe_default() -> Result<Limit, LimitError> {
        let status = std::fs::read_to_string("/proc/self/status").map_err(LimitError::Status)?;
        let capabilities = cap_eff(&status).ok_or(LimitError::NoCapEff)?;
        Ok(Self::from_parts(capabilities, memlock_rlimit()?))
    }

    /// The default budget given the effective capability mask and the soft
    /// `RLIMIT_MEMLOCK` (`None` for RLIM_INFINITY).
    pub fn from_parts(cap_eff: u64, rlimit: Option<u64>) -> Limit {
        if cap_eff & (1 << CAP_IPC_LOCK) != 0 {
            return Limit::Unlimited;
        }
        rlimit.map_or(Limit::Unlimited, Limit::Bytes)
    }
}

/// The `CapEff:` mask of a /proc/<pid>/status text.
pub(crate) fn cap_eff(status: &str) -> Option<u64> {
    let value = status.lines().find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(value.trim(), 16).ok()
}

/// The soft RLIMIT_MEMLOCK, `None` when infinite.
fn memlock_rlimit() -> Result<Option<u64>, LimitError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively
    // borrowed `limit` and keeps no pointer to it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 {
        return Err(LimitError::Rlimit(io::Error::last_os_error()));
    }
    Ok((limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_ipc_lock_means_unlimited() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let mask = cap_eff(status);
        assert_eq!(mask, Some(0x1ff_ffff_ffff));
        assert_eq!(Limit::from_parts(0x1ff_ffff_ffff, Some(8 << 20)), Limit::Unlimited);
        assert_eq!(Limit::from_parts(1 << CAP_IPC_LOCK, Some(8 << 20)), Limit::Unlimited);
    }

    #[test]
    fn without_the_capability_the_soft_rlimit_applies() {
        assert_eq!(cap_eff("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(Limit::from_parts(!(1 << CAP_IPC_LOCK), Some(8 << 20)), Limit::Bytes(8 << 20));
        assert_eq!(Limit::from_parts(0, None), Limit::Unlimited);
        assert_eq!(cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn probe_reads_this_process() {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let mask = cap_eff(&status).expect("CapEff");
        let probed = Limit::probe_default().expect("probe");
        if mask & (1 << CAP_IPC_LOCK) != 0 {
            assert_eq!(probed, Limit::Unlimited);
        }
    }

    #[test]
    fn allows_is_inclusive() {
        assert!(Limit::Bytes(10).allows(10));
        assert!(!Limit::Bytes(10).allows(11));
        assert!(Limit::Unlimited.allows(u64::MAX));
    }
}
