//! The vhost-user side: the listener, one `FrontendConnection` per frontend
//! with its own message loop, and the vring workers that run the device's
//! queues.

mod chain;
mod connection;
mod dispatch;
mod inflight;
mod server;
mod vring;
mod wire;
mod worker;

pub use chain::DescChain;
pub use connection::{FrontendConnection, Refusal};
pub use dispatch::serve as serve_connection;
pub use inflight::{InflightError, InflightRegion};
pub use server::{serve, ConnectionThreads};
pub use vring::MAX_QUEUE_SIZE;
pub use wire::{Header, Message, Wire, WireError, MAX_FDS};
