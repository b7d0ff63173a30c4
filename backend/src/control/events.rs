//! `EventBus`: asynchronous event lines to every control client.
//!
//! Events are raised on threads that must not wait for a control client
//! (a frontend connecting, the signal thread), so `emit` only queues the
//! line; a delivery thread of the bus's own writes it to each client. A
//! client that stops reading delays the others' events by at most its write
//! timeout, and is then dropped; it never delays the daemon.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use gmem_protocol::{Event, EventKind, Reply, Timestamp};

/// A control client's write half; replies and events share it, one line at
/// a time.
pub type ClientWriter = Arc<Mutex<UnixStream>>;

type Subscribers = Arc<Mutex<Vec<ClientWriter>>>;

/// The subscribers of asynchronous events and the thread delivering them.
#[derive(Debug)]
pub struct EventBus {
    subscribers: Subscribers,
    /// Lines for the delivery thread; `None` once the bus is closed.
    queue: Mutex<Option<Sender<String>>>,
    delivery: Mutex<Option<JoinHandle<()>>>,
}

impl EventBus {
    /// A bus with its delivery thread running.
    pub fn new() -> std::io::Result<Self> {
        let subscribers = Subscribers::default();
        let (queue, lines) = channel();
        let delivery = {
            let subscribers = Arc::clone(&subscribers);
            std::thread::Builder::new().name("events".into()).spawn(move || deliver(&subscribers, lines))?
        };
        Ok(EventBus { subscribers, queue: Mutex::new(Some(queue)), delivery: Mutex::new(Some(delivery)) })
    }

    /// Adds a client.
    pub fn subscribe(&self, writer: ClientWriter) {
        lock(&self.subscribers).push(writer);
    }

    /// Removes a client.
    pub fn unsubscribe(&self, writer: &ClientWriter) {
        lock(&self.subscribers).retain(|w| !Arc::ptr_eq(w, writer));
    }

    /// Queues the event for every client; returns at once.
    pub fn emit(&self, kind: EventKind, data: serde_json::Value) {
        let line = Reply::Event(Event { event: kind, data, timestamp: Timestamp::now() }).to_line();
        if let Some(queue) = lock(&self.queue).as_ref() {
            let _ = queue.send(line);
        }
    }

    /// Delivers what is queued, then stops the delivery thread; later events
    /// are dropped. The daemon calls this last, so clients see `SHUTDOWN`.
    pub fn close(&self) {
        lock(&self.queue).take();
        if let Some(delivery) = lock(&self.delivery).take() {
            let _ = delivery.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single push, retain, take or send.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The delivery thread: each line to each client, outside the bus's lock.
fn deliver(subscribers: &Subscribers, lines: Receiver<String>) {
    for line in lines {
        let clients = lock(subscribers).clone();
        let failed: Vec<ClientWriter> = clients.into_iter().filter(|w| send_line(w, &line).is_err()).collect();
        if !failed.is_empty() {
            lock(subscribers).retain(|w| !failed.iter().any(|f| Arc::ptr_eq(f, w)));
        }
    }
}

/// Writes one line, newline included, under the client's write lock.
pub fn send_line(writer: &ClientWriter, line: &str) -> std::io::Result<()> {
    let mut stream = writer.lock().unwrap_or_else(|p| p.into_inner());
    stream.write_all(line.as_bytes())?;
    stream.write_all(b"\n")
}
