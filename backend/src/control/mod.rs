//! The control socket: a QMP-style JSON-lines server (see
//! `docs/control-protocol.md`).

mod commands;
mod server;

pub use server::{serve, LineReader, ReadLine, MAX_CLIENTS};
