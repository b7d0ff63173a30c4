//! [`QmpClient`]: a small blocking client for QEMU's QMP monitor.
//!
//! QMP is one JSON object per line. The server greets first; the client must
//! send `qmp_capabilities` before anything else. Replies come in request
//! order, and asynchronous events (`{"event": ..}`) may arrive between them:
//! the client keeps those in a queue for [`wait_event`](QmpClient::wait_event)
//! and [`events`](QmpClient::events).

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a command may take before [`QmpError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between connection attempts while QEMU has not created its socket.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to before the deadline.
    #[error("connecting to QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The last attempt's error.
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O: {0}")]
    Io(#[from] io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// QEMU sent something that is not QMP.
    #[error("malformed QMP message: {0}")]
    Malformed(String),
    /// [`QmpClient::execute_oob`] on a monitor without out-of-band support.
    #[error("{0}: this QMP monitor does not offer out-of-band execution")]
    OobUnavailable(String),
    /// QEMU answered a command with an error.
    #[error("{command}: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP's error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A QMP connection that has completed capabilities negotiation.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line cut short by a read timeout, completed by the next read.
    partial: Vec<u8>,
    events: VecDeque<Value>,
    greeting: Value,
    timeout: Duration,
    next_id: u64,
    /// Out-of-band execution enabled (QEMU offers it on socket monitors).
    oob: bool,
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, retrying while it does not exist
    /// or refuses connections until `connect_timeout` has passed (QEMU
    /// creates it a moment after starting), then negotiates capabilities.
    pub fn connect(path: impl AsRef<Path>, connect_timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_while(path, connect_timeout, || true)
    }

    /// Like [`connect`](Self::connect), but stops retrying as soon as
    /// `keep_trying` returns false (e.g. because QEMU has exited).
    pub fn connect_while(
        path: impl AsRef<Path>,
        connect_timeout: Duration,
        mut keep_trying: impl FnMut() -> bool,
    ) -> Result<Self, QmpError> {
        let path = path.as_ref();
        let deadline = Instant::now() + connect_timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Self::handshake(stream),
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline
                        && keep_trying() =>
                {
                    sleep(RETRY_INTERVAL);
                }
                Err(source) => {
                    return Err(QmpError::Connect { path: path.to_owned(), source });
                }
            }
        }
    }

    /// Reads the greeting from an already connected `stream` and sends
    /// `qmp_capabilities`.
    pub fn handshake(stream: UnixStream) -> Result<Self, QmpError> {
        let mut client = QmpClient {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            partial: Vec::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            timeout: DEFAULT_TIMEOUT,
            next_id: 1,
            oob: false,
        };
        let deadline = Instant::now() + client.timeout;
        let greeting = client.read_message(deadline)?.ok_or_else(|| QmpError::Timeout("the QMP greeting".into()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Malformed(format!("expected a greeting, got {greeting}")));
        }
        let offered = &greeting["QMP"]["capabilities"];
        let oob = offered.as_array().is_some_and(|c| c.contains(&json!("oob")));
        client.greeting = greeting;
        let enable = if oob { json!({ "enable": ["oob"] }) } else { Value::Null };
        client.execute("qmp_capabilities", enable)?;
        client.oob = oob;
        Ok(client)
    }

    /// The server's greeting, `{"QMP": {"version": .., "capabilities": ..}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The pid of the QEMU at the other end (SO_PEERCRED: the process that
    /// created the listening socket). `None` if it lives in a pid namespace
    /// we cannot see into, where the kernel reports 0.
    pub fn peer_pid(&self) -> Result<Option<u32>, QmpError> {
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes and `len` holds the
        // size of `cred`, so the kernel writes at most that many bytes.
        let rc = unsafe {
            libc::getsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                std::ptr::addr_of_mut!(cred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(u32::try_from(cred.pid).ok().filter(|&pid| pid > 0))
    }

    /// Sets how long [`execute`](Self::execute) waits for a reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `command` and returns its `return` value. `arguments` is sent
    /// as given unless it is `Value::Null`, which means "no arguments".
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.request("execute", command, arguments)
    }

    /// Whether out-of-band execution is enabled on this connection.
    pub fn oob(&self) -> bool {
        self.oob
    }

    /// Runs `command` out of band (`exec-oob`): QEMU's monitor thread
    /// answers it even while the main loop is blocked, as it is when a vCPU
    /// holding the big lock faults on a page a paused postcopy cannot
    /// deliver. Only commands QEMU marks allow-oob qualify (`migrate-recover`,
    /// `migrate-pause`).
    pub fn execute_oob(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        if !self.oob {
            return Err(QmpError::OobUnavailable(command.to_owned()));
        }
        self.request("exec-oob", command, arguments)
    }

    fn request(&mut self, kind: &str, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ kind: command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        log::debug!("QMP -> {request}");
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(mut message) = self.read_message(deadline)? else {
                return Err(QmpError::Timeout(format!("the reply to {command}")));
            };
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            let reply_to = message.get("id").and_then(Value::as_u64);
            if reply_to.is_some_and(|earlier| earlier < id) {
                // The late reply to a command that timed out.
                log::warn!("QMP: dropping a late reply: {message}");
                continue;
            }
            if reply_to != Some(id) {
                return Err(QmpError::Malformed(format!("{message} is not the reply to {command}")));
            }
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            let error = message
                .get("error")
                .ok_or_else(|| QmpError::Malformed(format!("reply with neither return nor error: {message}")))?;
            let field = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
            return Err(QmpError::Command { command: command.to_owned(), class: field("class"), desc: field("desc") });
        }
    }

    /// Waits up to `timeout` for the event `name` (e.g. `"SHUTDOWN"`) and
    /// returns it whole (`event`, `data`, `timestamp`). Earlier events of
    /// other names stay queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        let is_it = |event: &Value| event.get("event").and_then(Value::as_str) == Some(name);
        if let Some(index) = self.events.iter().position(is_it) {
            if let Some(event) = self.events.remove(index) {
                return Ok(event);
            }
        }
        let deadline = Instant::now() + timeout;
        while let Some(message) = self.read_message(deadline)? {
            if is_it(&message) {
                return Ok(message);
            }
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else {
                log::warn!("QMP: ignoring a reply nobody waits for: {message}");
            }
        }
        Err(QmpError::Timeout(format!("the event {name}")))
    }

    /// Every event received so far, oldest first, including those already
    /// sitting unread in the socket; the queue is left empty.
    pub fn events(&mut self) -> Result<Vec<Value>, QmpError> {
        // A deadline that has already passed makes read_message() only take
        // what is buffered or immediately readable. A closed connection still
        // yields what QEMU said before exiting (e.g. SHUTDOWN).
        loop {
            match self.read_message(Instant::now()) {
                Ok(Some(message)) if message.get("event").is_some() => {
                    self.events.push_back(message);
                }
                Ok(Some(message)) => {
                    log::warn!("QMP: ignoring a reply nobody waits for: {message}")
                }
                Ok(None) | Err(QmpError::Closed) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.events.drain(..).collect())
    }

    /// The VM's run state from `query-status`, e.g. `"running"`, `"prelaunch"`.
    pub fn query_status(&mut self) -> Result<String, QmpError> {
        let status = self.execute("query-status", Value::Null)?;
        status
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Malformed(format!("query-status returned {status}")))
    }

    /// Asks QEMU to exit. QEMU may close the socket right after replying, or
    /// even before the reply is read; both count as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", Value::Null) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The next message, or `None` once `deadline` passes without one. A
    /// passed deadline still returns a message that can be read at once.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Value>, QmpError> {
        loop {
            if !self.reader.buffer().contains(&b'\n') {
                // A zero timeout is invalid, so poll with the shortest one.
                let left = deadline.saturating_duration_since(Instant::now());
                self.reader.get_ref().set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            }
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if !self.partial.ends_with(b"\n") => return Err(QmpError::Closed),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let line = std::mem::take(&mut self.partial);
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            log::debug!("QMP <- {}", text.trim_end());
            return serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| QmpError::Malformed(format!("{e}: {}", text.trim_end())));
        }
    }
}

#[cfg(test)]
mod tests;
