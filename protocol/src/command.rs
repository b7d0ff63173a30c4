//! Commands a client may execute, and the strict parser the daemon uses.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::reply::{ErrorClass, ErrorReply};

/// One command with its typed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Version, pid, uptime and connected frontends.
    QueryStatus,
    /// The guest RAM regions the daemon owns.
    QueryRegions,
    /// The virtio-blk device: queues, requests served, errors.
    QueryDevice,
    /// Where a migration stands on gmemd's side: dirty logging, postcopy
    /// registration, the device's page faults and their latency.
    QueryMigration,
    /// Stop serving and exit; regions are unmapped and, unless file-backed, freed.
    Quit,
}

impl Command {
    /// Every command, for help texts and for tests that want to cover them all.
    pub const ALL: [Command; 5] =
        [Command::QueryStatus, Command::QueryRegions, Command::QueryDevice, Command::QueryMigration, Command::Quit];

    /// The wire name (`"execute"` value).
    pub fn name(&self) -> &'static str {
        match self {
            Command::QueryStatus => "query-status",
            Command::QueryRegions => "query-regions",
            Command::QueryDevice => "query-device",
            Command::QueryMigration => "query-migration",
            Command::Quit => "quit",
        }
    }

    fn from_name(name: &str, arguments: Option<Map<String, Value>>) -> Result<Self, ErrorReply> {
        let command = Command::ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| {
            ErrorReply::new(ErrorClass::CommandNotFound, format!("the command {name} has not been found"))
        })?;
        // None of today's commands takes arguments; reject any so that a
        // typo'd option is never silently ignored.
        NoArguments::parse(name, arguments)?;
        Ok(command)
    }

    /// Serialises the command as one request line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::json!({ "execute": self.name() }).to_string()
    }
}

/// The argument object of a command that takes none.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

impl NoArguments {
    fn parse(command: &str, arguments: Option<Map<String, Value>>) -> Result<Self, ErrorReply> {
        let arguments = arguments.unwrap_or_default();
        serde_json::from_value(Value::Object(arguments))
            .map_err(|e| ErrorReply::new(ErrorClass::InvalidArguments, format!("{command}: invalid arguments: {e}")))
    }
}

/// A parsed request line: the command and the optional `id` the reply echoes.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Echoed in the reply, as in QMP, so a client may pipeline requests.
    pub id: Option<Value>,
}

impl Request {
    /// Parses one line. On error the returned [`ErrorReply`] is what the
    /// daemon sends back; it carries the request's `id` when one was readable.
    pub fn parse(line: &str) -> Result<Request, (ErrorReply, Option<Value>)> {
        let value: Value = serde_json::from_str(line)
            .map_err(|e| (ErrorReply::new(ErrorClass::GenericError, format!("JSON parse error: {e}")), None))?;
        let Value::Object(mut object) = value else {
            return Err((
                ErrorReply::new(ErrorClass::GenericError, "a request must be a JSON object".to_string()),
                None,
            ));
        };
        let id = object.remove("id");
        let fail = |desc: String| (ErrorReply::new(ErrorClass::GenericError, desc), id.clone());
        let name = match object.remove("execute") {
            Some(Value::String(name)) => name,
            Some(other) => return Err(fail(format!("'execute' must be a string, not {other}"))),
            None => return Err(fail("the request has no 'execute' member".to_string())),
        };
        let arguments = match object.remove("arguments") {
            None => None,
            Some(Value::Object(arguments)) => Some(arguments),
            Some(other) => return Err(fail(format!("'arguments' must be an object, not {other}"))),
        };
        if let Some(key) = object.keys().next() {
            return Err(fail(format!("unexpected member '{key}' in the request")));
        }
        let command = Command::from_name(&name, arguments).map_err(|e| (e, id.clone()))?;
        Ok(Request { command, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command_with_and_without_arguments() {
        for command in Command::ALL {
            let plain = Request::parse(&command.to_line()).expect("plain");
            assert_eq!(plain.command, command);
            let line = format!(r#"{{"execute":"{}","arguments":{{}},"id":7}}"#, command.name());
            let with_id = Request::parse(&line).expect("with id");
            assert_eq!(with_id.command, command);
            assert_eq!(with_id.id, Some(Value::from(7)));
        }
    }

    #[test]
    fn rejects_bad_requests_with_the_right_class() {
        let cases = [
            ("not json", ErrorClass::GenericError),
            ("[1,2]", ErrorClass::GenericError),
            (r#"{"arguments":{}}"#, ErrorClass::GenericError),
            (r#"{"execute":5}"#, ErrorClass::GenericError),
            (r#"{"execute":"query-status","arguments":[]}"#, ErrorClass::GenericError),
            (r#"{"execute":"query-status","bogus":1}"#, ErrorClass::GenericError),
            (r#"{"execute":"frobnicate"}"#, ErrorClass::CommandNotFound),
            (r#"{"execute":"quit","arguments":{"now":true}}"#, ErrorClass::InvalidArguments),
        ];
        for (line, class) in cases {
            let (error, _) = Request::parse(line).expect_err(line);
            assert_eq!(error.class, class, "{line}: {}", error.desc);
            assert!(!error.desc.is_empty());
        }
    }

    #[test]
    fn error_keeps_the_id() {
        let (_, id) = Request::parse(r#"{"execute":"nope","id":"abc"}"#).expect_err("unknown");
        assert_eq!(id, Some(Value::from("abc")));
    }
}
