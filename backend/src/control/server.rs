//! The control listener and one thread per client.
//!
//! A client can send anything: garbage, half lines, lines of megabytes. Each
//! complete line gets exactly one reply; an over-long line gets an error and
//! is skipped up to its newline; nothing a client sends ends the daemon or
//! another client's session.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gmem_protocol::{Command, ErrorClass, ErrorReply, Reply, Request, MAX_LINE_BYTES};

use super::commands;
use super::events::{send_line, ClientWriter};
use crate::daemon::Daemon;
use crate::sys::{peer_credentials, wait_readable};

/// Whether a peer with `peer_uid` may use a daemon running as `daemon_uid`:
/// the same user, or root.
pub fn peer_allowed(peer_uid: u32, daemon_uid: u32) -> bool {
    peer_uid == daemon_uid || peer_uid == 0
}

/// Serves control clients on `listener` until the daemon quits.
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let daemon_uid = unsafe { libc::geteuid() };
    while wait_readable(&listener, daemon.quit_event())? {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                log::error!("control: accept: {error}");
                continue;
            }
        };
        match peer_credentials(&stream) {
            Ok(peer) if peer_allowed(peer.uid, daemon_uid) => {}
            Ok(peer) => {
                log::warn!(
                    "control: refused pid {} uid {} (only uid {daemon_uid} or root may connect)",
                    peer.pid,
                    peer.uid
                );
                continue;
            }
            Err(error) => {
                log::warn!("control: refused a client whose credentials cannot be read: {error}");
                continue;
            }
        }
        let daemon = Arc::clone(&daemon);
        let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
            if let Err(error) = serve_client(&daemon, stream) {
                log::debug!("control client ended: {error}");
            }
        });
        if let Err(error) = spawned {
            log::error!("control: cannot start a client thread: {error}");
        }
    }
    Ok(())
}

fn serve_client(daemon: &Daemon, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // A client that stops reading must not block event delivery to others.
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let writer: ClientWriter = Arc::new(Mutex::new(stream.try_clone()?));
    daemon.events.subscribe(Arc::clone(&writer));
    let mut reader = LineReader::new(stream, MAX_LINE_BYTES);
    let result = loop {
        let reply = match reader.read_line() {
            Ok(ReadLine::Line(line)) if line.trim().is_empty() => continue,
            Ok(ReadLine::Line(line)) => match Request::parse(&line) {
                Ok(request) => {
                    let id = request.id.clone();
                    let reply = match commands::execute(daemon, &request.command) {
                        Ok(value) => Reply::Return { value, id },
                        Err(error) => Reply::Error { error, id },
                    };
                    if request.command == Command::Quit {
                        let _ = send_line(&writer, &reply.to_line());
                        daemon.quit();
                        break Ok(());
                    }
                    reply
                }
                Err((error, id)) => Reply::Error { error, id },
            },
            Ok(ReadLine::TooLong) => Reply::Error {
                error: ErrorReply::new(
                    ErrorClass::GenericError,
                    format!("request line longer than {MAX_LINE_BYTES} bytes; skipped"),
                ),
                id: None,
            },
            Ok(ReadLine::Eof) => break Ok(()),
            Err(error) => break Err(error),
        };
        if let Err(error) = send_line(&writer, &reply.to_line()) {
            break Err(error);
        }
    };
    daemon.events.unsubscribe(&writer);
    result
}

/// One read from a [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum ReadLine {
    /// A complete line, without its newline (invalid UTF-8 replaced).
    Line(String),
    /// A line over the limit, consumed up to and including its newline.
    TooLong,
    /// The peer closed; an unterminated last line is dropped.
    Eof,
}

/// Reads newline-terminated lines of bounded length.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: BufReader<R>,
    max: usize,
}

impl<R: Read> LineReader<R> {
    /// Lines from `inner`, at most `max` bytes each.
    pub fn new(inner: R, max: usize) -> Self {
        LineReader { reader: BufReader::new(inner), max }
    }

    /// The next line; memory use stays bounded by `max` whatever arrives.
    pub fn read_line(&mut self) -> io::Result<ReadLine> {
        let mut line = Vec::new();
        let mut too_long = false;
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                return Ok(ReadLine::Eof);
            }
            let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], Some(i + 1)),
                None => (available, None),
            };
            if !too_long && line.len() + chunk.len() <= self.max {
                line.extend_from_slice(chunk);
            } else {
                too_long = true;
                line.clear();
            }
            let consumed = found.unwrap_or(available.len());
            self.reader.consume(consumed);
            if found.is_some() {
                return Ok(if too_long {
                    ReadLine::TooLong
                } else {
                    ReadLine::Line(String::from_utf8_lossy(&line).into_owned())
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_user_or_root_may_connect() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(1000, 0));
        assert!(peer_allowed(0, 0));
    }

    #[test]
    fn lines_are_bounded_and_resync_after_an_overlong_one() {
        let mut input = b"{\"a\":1}\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nshort\n\xff\xfe\nhalf");
        let mut reader = LineReader::new(&input[..], 16);
        assert_eq!(reader.read_line().expect("1"), ReadLine::Line("{\"a\":1}".into()));
        assert_eq!(reader.read_line().expect("2"), ReadLine::TooLong);
        assert_eq!(reader.read_line().expect("3"), ReadLine::Line("short".into()));
        assert!(matches!(reader.read_line().expect("4"), ReadLine::Line(_)));
        assert_eq!(reader.read_line().expect("5"), ReadLine::Eof);
    }
}
