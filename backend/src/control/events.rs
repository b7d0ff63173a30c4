//! `EventBus`: asynchronous event lines to every control client.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use gmem_protocol::{Event, EventKind, Reply, Timestamp};

/// A control client's write half; replies and events share it, one line at
/// a time.
pub type ClientWriter = Arc<Mutex<UnixStream>>;

/// The subscribers of asynchronous events.
#[derive(Debug, Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<ClientWriter>>,
}

impl EventBus {
    /// Adds a client.
    pub fn subscribe(&self, writer: ClientWriter) {
        self.lock().push(writer);
    }

    /// Removes a client.
    pub fn unsubscribe(&self, writer: &ClientWriter) {
        self.lock().retain(|w| !Arc::ptr_eq(w, writer));
    }

    /// Sends the event to every client. A client that cannot take it (gone,
    /// or too slow for the write timeout) is dropped from the bus.
    pub fn emit(&self, kind: EventKind, data: serde_json::Value) {
        let line = Reply::Event(Event { event: kind, data, timestamp: Timestamp::now() }).to_line();
        self.lock().retain(|writer| send_line(writer, &line).is_ok());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ClientWriter>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes one line, newline included, under the client's write lock.
pub fn send_line(writer: &ClientWriter, line: &str) -> std::io::Result<()> {
    let mut stream = writer.lock().unwrap_or_else(|p| p.into_inner());
    stream.write_all(line.as_bytes())?;
    stream.write_all(b"\n")
}
