//! `EventBus`: every line gmemd sends to control clients — replies and
//! asynchronous events — goes through a bounded outbox per client, written
//! by one delivery thread with non-blocking sends.
//!
//! Events are raised on threads that must not wait for a control client (a
//! frontend connecting, the signal thread), and a client may stop reading
//! at any time. So nothing ever blocks on a client: a line is appended to
//! each client's outbox and the delivery thread sends what the socket
//! takes. A client whose outbox grows past [`MAX_PENDING_BYTES`] has fallen
//! behind for good and is disconnected; the others never notice it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem_protocol::{Event, EventKind, Reply, Timestamp};
use vmm_sys_util::eventfd::EventFd;

/// Bytes a client may leave unread before it is disconnected: a few
/// thousand events, far more than a client that reads ever lags.
pub const MAX_PENDING_BYTES: usize = 256 * 1024;

/// How long closing the bus waits for clients to take their last lines.
const FLUSH_PATIENCE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Outbox {
    lines: VecDeque<Vec<u8>>,
    /// Bytes of the front line already sent.
    sent: usize,
    pending: usize,
    /// Set when the client fell behind or its socket failed.
    dropped: bool,
    /// Set when the client's thread is done: the peer goes once its last
    /// lines are sent.
    closing: bool,
}

/// One control client's socket and outbox.
#[derive(Debug)]
pub struct ControlPeer {
    socket: UnixStream,
    outbox: Mutex<Outbox>,
}

impl ControlPeer {
    /// A peer writing to `socket` (a clone of the client's connection).
    pub fn new(socket: UnixStream) -> Self {
        ControlPeer { socket, outbox: Mutex::default() }
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // Every critical section only pushes, pops or counts.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the peer was disconnected for falling behind or failing.
    pub fn dropped(&self) -> bool {
        self.outbox().dropped
    }

    /// Whether the bus is done with the peer: dropped, or closing with
    /// nothing left to send.
    fn finished(&self) -> bool {
        let outbox = self.outbox();
        outbox.dropped || (outbox.closing && outbox.pending == 0)
    }

    /// Queues `line` (a newline is added); false when the peer is gone.
    fn push(&self, line: &str) -> bool {
        let mut outbox = self.outbox();
        if outbox.dropped || outbox.closing {
            return false;
        }
        if outbox.pending + line.len() + 1 > MAX_PENDING_BYTES {
            outbox.dropped = true;
            drop(outbox);
            log::warn!(
                "control client fell behind by {MAX_PENDING_BYTES} bytes of unread replies and events; disconnected"
            );
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
            return false;
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        outbox.pending += bytes.len();
        outbox.lines.push_back(bytes);
        true
    }

    fn has_pending(&self) -> bool {
        let outbox = self.outbox();
        !outbox.dropped && outbox.pending > 0
    }

    /// Sends what the socket takes without blocking.
    fn send_some(&self) {
        let mut outbox = self.outbox();
        loop {
            let (n, line_len) = {
                let Some(front) = outbox.lines.front() else { return };
                let rest = &front[outbox.sent..];
                // SAFETY: `rest` is valid for reads of its length;
                // MSG_DONTWAIT makes this one call non-blocking without
                // changing the socket, whose reading side the client's own
                // thread uses blocking.
                let n = unsafe {
                    libc::send(
                        self.socket.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                (n, front.len())
            };
            if n < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::WouldBlock || error.kind() == io::ErrorKind::Interrupted {
                    return;
                }
                outbox.dropped = true;
                drop(outbox);
                log::debug!("control client: {error}; disconnected");
                let _ = self.socket.shutdown(std::net::Shutdown::Both);
                return;
            }
            // 0 <= n <= what was left of the line.
            outbox.pending -= n as usize;
            outbox.sent += n as usize;
            if outbox.sent == line_len {
                outbox.lines.pop_front();
                outbox.sent = 0;
            }
        }
    }
}

type Peers = Arc<Mutex<Vec<Arc<ControlPeer>>>>;

/// The control clients and the thread delivering their lines.
#[derive(Debug)]
pub struct EventBus {
    peers: Peers,
    wake: EventFd,
    closing: Arc<std::sync::atomic::AtomicBool>,
    delivery: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a push, retain, clone or take.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventBus {
    /// A bus with its delivery thread running.
    pub fn new() -> io::Result<Self> {
        let peers = Peers::default();
        let wake = crate::sys::eventfd()?;
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delivery = {
            let (peers, wake, closing) = (Arc::clone(&peers), wake.try_clone()?, Arc::clone(&closing));
            std::thread::Builder::new().name("events".into()).spawn(move || deliver(&peers, &wake, &closing))?
        };
        Ok(EventBus { peers, wake, closing, delivery: Mutex::new(Some(delivery)) })
    }

    /// Adds a client: it gets every event from now on.
    pub fn register(&self, peer: Arc<ControlPeer>) {
        lock(&self.peers).push(peer);
    }

    /// The client's thread is done with it: it is removed once the lines
    /// queued for it (the reply to `quit`, say) are sent.
    pub fn unregister(&self, peer: &Arc<ControlPeer>) {
        peer.outbox().closing = true;
        let _ = self.wake.write(1);
    }

    /// How many clients are registered.
    pub fn clients(&self) -> usize {
        lock(&self.peers).len()
    }

    /// Queues a reply line for one client; false when it is gone.
    pub fn send(&self, peer: &ControlPeer, line: &str) -> bool {
        let queued = peer.push(line);
        let _ = self.wake.write(1);
        queued
    }

    /// Queues the event for every client; returns at once.
    pub fn emit(&self, kind: EventKind, data: serde_json::Value) {
        let line = Reply::Event(Event { event: kind, data, timestamp: Timestamp::now() }).to_line();
        let peers = lock(&self.peers).clone();
        for peer in &peers {
            peer.push(&line);
        }
        let _ = self.wake.write(1);
    }

    /// Delivers what is queued (waiting up to a second for slow clients),
    /// then stops the delivery thread. The daemon calls this last, so
    /// clients see `SHUTDOWN`.
    pub fn close(&self) {
        self.closing.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(delivery) = lock(&self.delivery).take() {
            let _ = delivery.join();
        }
    }
}

/// The delivery thread: waits until a client with pending lines can take
/// more, or new lines arrive, and sends.
fn deliver(peers: &Peers, wake: &EventFd, closing: &std::sync::atomic::AtomicBool) {
    let mut flush_deadline = None;
    loop {
        let busy: Vec<Arc<ControlPeer>> = lock(peers).iter().filter(|p| p.has_pending()).cloned().collect();
        for peer in &busy {
            peer.send_some();
        }
        lock(peers).retain(|p| !p.finished());
        let busy: Vec<Arc<ControlPeer>> = busy.into_iter().filter(|p| p.has_pending()).collect();
        if closing.load(std::sync::atomic::Ordering::Acquire) {
            let deadline = *flush_deadline.get_or_insert_with(|| Instant::now() + FLUSH_PATIENCE);
            if busy.is_empty() || Instant::now() >= deadline {
                return;
            }
        }
        let mut pollfds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .chain(busy.iter().map(|p| libc::pollfd { fd: p.socket.as_raw_fd(), events: libc::POLLOUT, revents: 0 }))
            .collect();
        let timeout = if flush_deadline.is_some() { 20 } else { -1 };
        // The list holds at most one entry per client plus one.
        let count = pollfds.len() as libc::nfds_t;
        // SAFETY: `pollfds` is a valid array of `count` pollfds for the call.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), count, timeout) };
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            log::error!("event delivery: poll: {}", io::Error::last_os_error());
            return;
        }
        if pollfds[0].revents != 0 {
            let _ = wake.read();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn a_client_that_does_not_read_is_dropped_and_others_keep_getting_events() {
        let bus = EventBus::new().expect("bus");
        let (stuck_ours, stuck_theirs) = UnixStream::pair().expect("pair");
        let (reader_ours, reader_theirs) = UnixStream::pair().expect("pair");
        let stuck = Arc::new(ControlPeer::new(stuck_ours));
        let reader = Arc::new(ControlPeer::new(reader_ours));
        bus.register(Arc::clone(&stuck));
        bus.register(Arc::clone(&reader));
        let mut lines = BufReader::new(reader_theirs);
        let payload = serde_json::Value::String("x".repeat(1000));
        let mut line = String::new();
        for _ in 0..(4 * MAX_PENDING_BYTES / 1000) {
            bus.emit(EventKind::FrontendConnected, payload.clone());
            line.clear();
            lines.read_line(&mut line).expect("the reading client gets every event");
            assert!(line.contains("FRONTEND_CONNECTED"));
        }
        assert!(stuck.dropped(), "the client that never read was dropped");
        assert_eq!(bus.clients(), 1);
        drop(stuck_theirs);
        bus.close();
    }
}
