//! gmemd: an out-of-process guest-memory backend for QEMU.
//!
//! The daemon owns the guest's RAM (memfd regions it creates, seals and maps;
//! QEMU maps the same memory) and serves a vhost-user-blk device whose data
//! path reads and writes that RAM. See `docs/architecture.md`.
//!
//! Modules, from the bottom up: `sys`, `logging`, `peers` (process-level
//! helpers); `migration` (dirty log, userfaultfd, figures); `memory`
//! (regions, tables, the checked data path); `blk` (the device); `record`
//! (serialisable connection state); `events` and `daemon` (what every
//! thread shares); `listener`, `vhost` and `control` (the two sockets);
//! `pins` (locked regions in the pin ledger) sits beside `daemon`;
//! `handover` (exec upgrade, above them all).

pub mod blk;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod events;
pub mod handover;
pub mod listener;
pub mod logging;
pub mod memory;
pub mod migration;
pub mod peers;
pub mod pins;
pub mod record;
pub mod state_file;
pub mod sys;
pub mod vhost;
