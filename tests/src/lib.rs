//! Test harness: the real gmemd, real QEMU and a real Linux guest.

pub mod daemon;
pub mod guest;
pub mod vm;

pub use daemon::{binaries, Gmemd, GmemdOptions};
pub use guest::{agent_append, AgentResults, GuestImage};
pub use vm::Vm;
