//! The control socket: a QMP-style JSON-lines server (see
//! `docs/control-protocol.md`), and the event bus that pushes events to
//! every connected client.

mod commands;
mod events;
mod server;

pub use events::EventBus;
pub use server::{peer_allowed, serve, LineReader, ReadLine};
