//! gmemd: an out-of-process guest-memory backend for QEMU.
//!
//! The daemon owns the guest's RAM (memfd regions it creates, seals and maps;
//! QEMU maps the same memory) and serves a vhost-user-blk device whose data
//! path reads and writes that RAM. See `docs/architecture.md`.

pub mod blk;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod memory;
pub mod migration;
pub mod sys;
pub mod vhost;
