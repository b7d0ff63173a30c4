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
pub use vm::{Vm, VmOptions};

/// Polls `probe` every 50 ms until it gives a value, for up to `timeout`.
pub fn poll_until<T>(what: &str, timeout: std::time::Duration, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
