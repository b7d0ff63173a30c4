//! The control listener and one thread per client.
//!
//! A client can send anything: garbage, half lines, lines of megabytes. Each
//! complete line gets exactly one reply; an over-long line gets an error and
//! is skipped up to its newline; nothing a client sends ends the daemon or
//! another client's session. Replies and events go through the client's
//! bounded outbox (`crate::events`), so a client that stops reading is
//! disconnected rather than held in memory.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use gmem_protocol::{Command, ErrorClass, ErrorReply, Reply, Request, MAX_LINE_BYTES};

use super::commands;
use crate::daemon::Daemon;
use crate::events::ControlPeer;
use crate::handover::Upgrader;
use crate::peers::PeerPolicy;

/// Control clients served at once; more are refused at accept.
pub const MAX_CLIENTS: usize = 64;

/// Serves control clients on `listener` until the daemon quits. Only root
/// and the daemon's own user may connect.
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener, upgrader: Arc<Upgrader>) -> io::Result<()> {
    crate::listener::accept_loop(&daemon, &listener, "control socket", &PeerPolicy::own_user(), |stream, peer| {
        if daemon.events.clients() >= MAX_CLIENTS {
            log::warn!("control socket: refused pid {}: {MAX_CLIENTS} clients are connected already", peer.pid);
            return;
        }
        let Ok(writer) = stream.try_clone() else {
            log::error!("control socket: cannot duplicate a new client's socket; closing it");
            return;
        };
        let peer = Arc::new(ControlPeer::new(writer));
        daemon.events.register(Arc::clone(&peer));
        let client_daemon = Arc::clone(&daemon);
        let upgrader = Arc::clone(&upgrader);
        let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
            if let Err(error) = serve_client(&client_daemon, &upgrader, &peer, stream) {
                log::debug!("control client ended: {error}");
            }
            client_daemon.events.unregister(&peer);
        });
        if let Err(error) = spawned {
            log::error!("control socket: cannot start a client thread: {error}");
        }
    })
}

fn serve_client(daemon: &Daemon, upgrader: &Upgrader, peer: &ControlPeer, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let socket = stream.as_raw_fd();
    let mut reader = LineReader::new(stream, MAX_LINE_BYTES);
    loop {
        let reply = match reader.read_line()? {
            ReadLine::Line(line) if line.trim().is_empty() => continue,
            ReadLine::Line(line) => match Request::parse(&line) {
                Ok(request) => {
                    let sender = commands::Sender { socket, id: request.id.as_ref() };
                    let reply = match commands::execute(daemon, upgrader, &request.command, sender) {
                        Ok(value) => Reply::Return { value, id: request.id.clone() },
                        Err(error) => Reply::Error { error, id: request.id.clone() },
                    };
                    if request.command == Command::Quit {
                        daemon.events.send(peer, &reply.to_line());
                        daemon.quit();
                        return Ok(());
                    }
                    reply
                }
                Err((error, id)) => Reply::Error { error, id },
            },
            ReadLine::TooLong => Reply::Error {
                error: ErrorReply::new(
                    ErrorClass::GenericError,
                    format!("request line longer than {MAX_LINE_BYTES} bytes; skipped"),
                ),
                id: None,
            },
            ReadLine::Eof => return Ok(()),
        };
        if !daemon.events.send(peer, &reply.to_line()) {
            return Ok(());
        }
    }
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
