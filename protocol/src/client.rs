//! A blocking client for the control socket, used by `gmemctl` and the tests.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::reply::{
    DeviceInfo, ErrorReply, Event, MigrationInfo, PinsInfo, RegionInfo, Reply, StatusInfo, UpgradeInfo,
};
use crate::{Command, UpgradeArgs};

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to or talking over the socket failed.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon closed the connection.
    #[error("the daemon closed the control connection")]
    Closed,
    /// The daemon sent a line that is not a reply.
    #[error("malformed reply from the daemon: {0}")]
    Malformed(String),
    /// The daemon answered with an error.
    #[error("{0}")]
    Command(#[from] ErrorReply),
}

/// A connection to `gmemd --control PATH`.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Event>,
}

impl ControlClient {
    /// Connects to the control socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(ControlClient { writer: stream.try_clone()?, reader: BufReader::new(stream), events: VecDeque::new() })
    }

    /// Sends a raw line (tests use this for malformed input) and returns the
    /// next reply that is not an event.
    pub fn send_raw(&mut self, line: &[u8]) -> Result<Reply, ClientError> {
        self.writer.write_all(line)?;
        self.writer.write_all(b"\n")?;
        loop {
            match self.read_line()? {
                Reply::Event(event) => self.events.push_back(event),
                reply => return Ok(reply),
            }
        }
    }

    /// Executes `command` and decodes its result.
    pub fn execute<T: DeserializeOwned>(&mut self, command: &Command) -> Result<T, ClientError> {
        match self.send_raw(command.to_line().as_bytes())? {
            Reply::Return { value, .. } => {
                serde_json::from_value(value).map_err(|e| ClientError::Malformed(format!("{}: {e}", command.name())))
            }
            Reply::Error { error, .. } => Err(error.into()),
            Reply::Event(_) => Err(ClientError::Malformed("event in place of a reply".into())),
        }
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<StatusInfo, ClientError> {
        self.execute(&Command::QueryStatus)
    }

    /// `query-regions`.
    pub fn query_regions(&mut self) -> Result<Vec<RegionInfo>, ClientError> {
        self.execute(&Command::QueryRegions)
    }

    /// `query-device`.
    pub fn query_device(&mut self) -> Result<DeviceInfo, ClientError> {
        self.execute(&Command::QueryDevice)
    }

    /// `query-migration`.
    pub fn query_migration(&mut self) -> Result<MigrationInfo, ClientError> {
        self.execute(&Command::QueryMigration)
    }

    /// `query-pins`.
    pub fn query_pins(&mut self) -> Result<PinsInfo, ClientError> {
        self.execute(&Command::QueryPins)
    }

    /// `upgrade`: gmemd execs `binary` (by default the program it was
    /// started from), which takes over and replies; or the old program
    /// replies why not, and goes on.
    pub fn upgrade(&mut self, binary: Option<&str>) -> Result<UpgradeInfo, ClientError> {
        self.execute(&Command::Upgrade(UpgradeArgs { binary: binary.map(str::to_owned) }))
    }

    /// `quit`: the daemon replies, then exits.
    pub fn quit(&mut self) -> Result<(), ClientError> {
        self.execute::<serde_json::Value>(&Command::Quit).map(drop)
    }

    /// The next event, waiting up to `timeout` for one to arrive.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let result = match self.read_line() {
            Ok(Reply::Event(event)) => Ok(Some(event)),
            Ok(_) => Err(ClientError::Malformed("reply with no request".into())),
            Err(ClientError::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        };
        self.reader.get_ref().set_read_timeout(Some(Duration::from_secs(30)))?;
        result
    }

    fn read_line(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Malformed(format!("{e}: {line}")))
    }
}
