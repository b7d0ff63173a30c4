//! The vhost-user side: the listener, one `FrontendConnection` per frontend,
//! and the vring workers that run the device's queues.

mod connection;
mod server;
mod vring;

pub use connection::FrontendConnection;
pub use server::serve;
pub use vring::MAX_QUEUE_SIZE;
