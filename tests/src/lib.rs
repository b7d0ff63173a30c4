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
