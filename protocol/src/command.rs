//! Commands a client may execute, and the strict parser the daemon uses.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::strict::{MemberNames, UniqueKeys};

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
    /// Drop a postcopy registration whose destination QEMU disconnected
    /// before the migration ended (gmemd keeps it for
    /// `--postcopy-orphan-timeout`): requests waiting on its missing pages
    /// fail instead of waiting.
    PostcopyAbort,
    /// Make a range of a region private (the device may no longer touch it,
    /// its content is discarded) or shared again, with the contract of the
    /// kernel's KVM_SET_MEMORY_ATTRIBUTES2 (docs/pins-and-conversion.md).
    SetMemoryAttributes(SetMemoryAttributesArgs),
    /// A region's private/shared extents.
    QueryMemoryAttributes(QueryMemoryAttributesArgs),
    /// The pin ledger: locked guest RAM per owner and user, budgets, and
    /// the kernel's own figures next to it.
    QueryPins,
    /// Replace gmemd's program by exec, keeping the guest's RAM, the disk,
    /// both sockets and every frontend connection (docs/live-update.md).
    Upgrade(UpgradeArgs),
    /// Stop serving and exit; regions are unmapped and, unless file-backed, freed.
    Quit,
}

/// `set-memory-attributes`' arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetMemoryAttributesArgs {
    /// The region's id.
    pub region: String,
    /// Start in the region, bytes; a multiple of its page size.
    pub offset: u64,
    /// Length in bytes; a non-zero multiple of its page size.
    pub size: u64,
    /// Private (true) or shared (false).
    pub private: bool,
    /// Going private: instead of failing at once while requests use the
    /// range, hold new ones off and wait up to this long for those in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// `query-memory-attributes`' arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMemoryAttributesArgs {
    /// The region's id.
    pub region: String,
}

/// `upgrade`'s arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeArgs {
    /// The gmemd program to exec; by default the path this gmemd was
    /// started from (which a package upgrade replaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
}

impl Command {
    /// Every command, for help texts and for tests that want to cover them all.
    pub const ALL: [Command; 10] = [
        Command::QueryStatus,
        Command::QueryRegions,
        Command::QueryDevice,
        Command::QueryMigration,
        Command::PostcopyAbort,
        Command::SetMemoryAttributes(SetMemoryAttributesArgs {
            region: String::new(),
            offset: 0,
            size: 0,
            private: false,
            wait_ms: None,
        }),
        Command::QueryMemoryAttributes(QueryMemoryAttributesArgs { region: String::new() }),
        Command::QueryPins,
        Command::Upgrade(UpgradeArgs { binary: None }),
        Command::Quit,
    ];

    /// The wire name (`"execute"` value).
    pub fn name(&self) -> &'static str {
        match self {
            Command::QueryStatus => "query-status",
            Command::QueryRegions => "query-regions",
            Command::QueryDevice => "query-device",
            Command::QueryMigration => "query-migration",
            Command::PostcopyAbort => "postcopy-abort",
            Command::SetMemoryAttributes(_) => "set-memory-attributes",
            Command::QueryMemoryAttributes(_) => "query-memory-attributes",
            Command::QueryPins => "query-pins",
            Command::Upgrade(_) => "upgrade",
            Command::Quit => "quit",
        }
    }

    fn from_name(name: &str, arguments: Option<Map<String, Value>>) -> Result<Self, ErrorReply> {
        let command = Command::ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| {
            ErrorReply::new(ErrorClass::CommandNotFound, format!("the command {name} has not been found"))
        })?;
        // Unknown arguments are refused, so that a typo'd option is never
        // silently ignored.
        Ok(match command {
            Command::Upgrade(_) => Command::Upgrade(parse_arguments(name, arguments)?),
            Command::SetMemoryAttributes(_) => Command::SetMemoryAttributes(parse_arguments(name, arguments)?),
            Command::QueryMemoryAttributes(_) => Command::QueryMemoryAttributes(parse_arguments(name, arguments)?),
            other => {
                parse_arguments::<NoArguments>(name, arguments)?;
                other
            }
        })
    }

    /// Serialises the command as one request line (without the newline).
    pub fn to_line(&self) -> String {
        let mut line = serde_json::json!({ "execute": self.name() });
        let arguments = match self {
            Command::Upgrade(args) if *args != UpgradeArgs::default() => serde_json::to_value(args).ok(),
            Command::SetMemoryAttributes(args) => serde_json::to_value(args).ok(),
            Command::QueryMemoryAttributes(args) => serde_json::to_value(args).ok(),
            _ => None,
        };
        if let Some(arguments) = arguments {
            line["arguments"] = arguments;
        }
        line.to_string()
    }
}

/// The argument object of a command that takes none.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

fn parse_arguments<T: serde::de::DeserializeOwned>(
    command: &str,
    arguments: Option<Map<String, Value>>,
) -> Result<T, ErrorReply> {
    serde_json::from_value(Value::Object(arguments.unwrap_or_default()))
        .map_err(|e| ErrorReply::new(ErrorClass::InvalidArguments, format!("{command}: invalid arguments: {e}")))
}

/// A request's `id`, kept as the exact JSON text the client sent, so the
/// reply echoes it unchanged (a number is not rewritten as a float, nor a
/// big one rounded).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RequestId(Box<RawValue>);

impl<'de> Deserialize<'de> for RequestId {
    /// Through a `Value`: replies are an untagged enum, whose buffering a
    /// `RawValue` cannot be read from. (The daemon reads ids verbatim in
    /// [`Request::parse`]; a client only compares them.)
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        RawValue::from_string(value.to_string()).map(RequestId).map_err(serde::de::Error::custom)
    }
}

impl RequestId {
    /// The id's JSON text.
    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl From<u64> for RequestId {
    fn from(id: u64) -> Self {
        // A u64's text is always a valid JSON number.
        RequestId(RawValue::from_string(id.to_string()).unwrap_or_else(|_| RawValue::NULL.to_owned()))
    }
}

/// A parsed request line: the command and the optional `id` the reply echoes.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Echoed in the reply, as in QMP, so a client may pipeline requests.
    pub id: Option<RequestId>,
}

impl Request {
    /// Parses one line. On error the returned [`ErrorReply`] is what the
    /// daemon sends back; it carries the request's `id` when one was readable.
    pub fn parse(line: &str) -> Result<Request, (ErrorReply, Option<RequestId>)> {
        let generic = |desc: String| ErrorReply::new(ErrorClass::GenericError, desc);
        let value: Value = serde_json::from_str(line).map_err(|e| (generic(format!("JSON parse error: {e}")), None))?;
        if !value.is_object() {
            return Err((generic("a request must be a JSON object".to_string()), None));
        }
        // An object, so this parses too; members given twice keep the last.
        let mut members: BTreeMap<String, Box<RawValue>> =
            serde_json::from_str(line).map_err(|e| (generic(format!("JSON parse error: {e}")), None))?;
        let id = members.remove("id").map(RequestId);
        let fail = |desc: String| (generic(desc), id.clone());
        if let Err(error) = serde_json::from_str::<UniqueKeys>(line) {
            let names = serde_json::from_str::<MemberNames>(line).map(|n| n.0).unwrap_or_default();
            let id = if names.iter().filter(|n| *n == "id").count() > 1 { None } else { id.clone() };
            return Err((generic(format!("{error}: refused, since which one counts would be a guess")), id));
        }
        let name = match members.remove("execute").map(|raw| serde_json::from_str::<Value>(raw.get())) {
            Some(Ok(Value::String(name))) => name,
            Some(Ok(other)) => return Err(fail(format!("'execute' must be a string, not {other}"))),
            Some(Err(e)) => return Err(fail(format!("'execute': {e}"))),
            None => return Err(fail("the request has no 'execute' member".to_string())),
        };
        let arguments = match members.remove("arguments").map(|raw| serde_json::from_str::<Value>(raw.get())) {
            None => None,
            Some(Ok(Value::Object(arguments))) => Some(arguments),
            Some(Ok(other)) => return Err(fail(format!("'arguments' must be an object, not {other}"))),
            Some(Err(e)) => return Err(fail(format!("'arguments': {e}"))),
        };
        if let Some(key) = members.keys().next() {
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
            let mut line: Value = serde_json::from_str(&command.to_line()).expect("json");
            line["id"] = 7.into();
            let with_id = Request::parse(&line.to_string()).expect("with id");
            assert_eq!(with_id.command, command);
            assert_eq!(with_id.id, Some(RequestId::from(7)));
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
            (r#"{"execute":"upgrade","arguments":{"binary":5}}"#, ErrorClass::InvalidArguments),
            (r#"{"execute":"upgrade","arguments":{"bianry":"/x"}}"#, ErrorClass::InvalidArguments),
            (
                r#"{"execute":"set-memory-attributes","arguments":{"region":"r","offset":0}}"#,
                ErrorClass::InvalidArguments,
            ),
            (r#"{"execute":"query-memory-attributes"}"#, ErrorClass::InvalidArguments),
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
        assert_eq!(id.map(|id| id.json().to_string()), Some(r#""abc""#.to_string()));
    }

    #[test]
    fn ids_come_back_exactly_as_sent() {
        for id in ["7", "18446744073709551616", "-0", "1e3", "1.50", r#""x""#, r#"{"a":[1,2]}"#] {
            let request = Request::parse(&format!(r#"{{"execute":"query-status","id":{id}}}"#)).expect(id);
            let reply = crate::Reply::Return { value: Value::Null, id: request.id };
            assert_eq!(reply.to_line(), format!(r#"{{"return":null,"id":{id}}}"#));
        }
    }

    #[test]
    fn a_member_given_twice_is_refused() {
        let (error, id) = Request::parse(r#"{"execute":"query-status","execute":"quit","id":5}"#).expect_err("twice");
        assert!(error.desc.contains("'execute' is given twice"), "{}", error.desc);
        assert_eq!(id, Some(RequestId::from(5)));
        let (_, id) = Request::parse(r#"{"execute":"quit","id":1,"id":2}"#).expect_err("id twice");
        assert_eq!(id, None, "no guess at which id to echo");
        let (_, id) = Request::parse(r#"{"execute":"x","arguments":{"id":1,"id":2},"id":3}"#).expect_err("nested");
        assert_eq!(id, Some(RequestId::from(3)), "a nested id is not the request's");
        assert!(Request::parse(r#"{"execute":"quit","arguments":{"a":1,"a":2}}"#).is_err());
    }
}
