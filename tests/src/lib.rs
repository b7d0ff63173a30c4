//! Test harness: the real gmemd, real QEMU and a real Linux guest; for
//! migration tests, two simulated hosts.

pub mod console;
pub mod daemon;
pub mod guest;
pub mod migration;
pub mod net;
pub mod seqio;
pub mod vm;

pub use console::{ProgressClock, ProgressTimeline};
pub use daemon::{binaries, Gmemd, GmemdOptions};
pub use guest::{agent_append, AgentResults, GuestImage};
pub use migration::{MigrationOptions, MigrationPair};
pub use net::{DelayRelay, HostPair};
pub use vm::{qemu_next, Vm, VmOptions};

/// Polls `probe` every 50 ms until it gives a value, for up to `timeout`.
pub fn poll_until<T>(
    what: &str,
    timeout: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Fails unless `count` 2 MiB huge pages are free for hugetlb guest RAM
/// (scripts/setup-host reserves them).
pub fn require_huge_pages(count: u64) -> anyhow::Result<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| {
        meminfo.lines().find_map(|line| line.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok())
    };
    anyhow::ensure!(
        field("Hugepagesize:") == Some(2048),
        "the default huge page size is not 2 MiB: {:?} kB",
        field("Hugepagesize:")
    );
    let free = field("HugePages_Free:").unwrap_or(0);
    let reserved = field("HugePages_Rsvd:").unwrap_or(0);
    anyhow::ensure!(
        free.saturating_sub(reserved) >= count,
        "needs {count} free 2 MiB huge pages, has {free} free of which {reserved} promised; run scripts/setup-host as root"
    );
    Ok(())
}
