//! Migration capabilities: reading and setting them, and whether a postcopy
//! can send requested pages on a channel of their own (`postcopy-preempt`).
//!
//! What QEMU 10.0.2 and 11.1.3 do with `postcopy-preempt` (measured on this
//! machine, see docs/migration.md):
//!
//! - it needs `postcopy-ram` in the same `migrate-set-capabilities`;
//! - on the destination it must be on before `migrate-incoming` ("Postcopy
//!   preempt must be set before incoming starts"); turning it *off* after
//!   that is accepted, and leaves the two sides disagreeing;
//! - `migrate` and `migrate-incoming` refuse a URI that cannot open a second
//!   connection (`fd:`, `exec:`): "Migration requires multi-channel URIs
//!   (e.g. tcp)";
//! - if only the source has it, the destination ignores the second
//!   connection ("Extra incoming migration connection; ignoring"), and the
//!   pages the source sends there never arrive: with a guest, the first
//!   requested page (a vCPU's) never came, the guest never ran on the
//!   destination, and its QMP stopped answering (the vCPU waits holding
//!   QEMU's lock); if only the destination has it, the destination waits
//!   for a channel that never comes, with the guest stopped on the source:
//!   postcopy stays `postcopy-active` and the guest runs nowhere. So both
//!   sides get the same setting, or neither;
//! - with a vhost-user device whose backend faults on missing pages (gmemd),
//!   the migration never completes: QEMU files the backend's page requests
//!   under the backend's address and looks them up under its own when the
//!   page arrives, so they are never marked served; without preempt that
//!   leaks, with it the destination waits for them at the end, forever
//!   (docs/migration.md has the trace). The guest runs on the destination,
//!   the source stays `postcopy-active`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{MigrationError, MigrationOptions, Side};
use crate::live_update::QemuVersion;
use crate::qmp::QmpClient;

/// QEMU's name of the capability.
pub const POSTCOPY_PREEMPT: &str = "postcopy-preempt";

/// The URI schemes over which QEMU opens more than one connection (QEMU's
/// socket transports); `fd:`, `exec:`, `file:` and `rdma:` carry one.
const MULTI_CHANNEL_SCHEMES: [&str; 3] = ["tcp", "unix", "vsock"];

/// Why a migration cannot use `postcopy-preempt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreemptUnavailable {
    /// A QEMU does not list the capability (QEMU 7.1 added it).
    NotInQemu {
        /// Which QEMU.
        side: Side,
        /// Its version, from its QMP greeting, if it said.
        version: Option<QemuVersion>,
    },
    /// A URI's transport carries a single connection.
    SingleChannel {
        /// The URI, e.g. `fd:migfd`.
        uri: String,
    },
    /// The destination has vhost-user devices: once their backend faults
    /// on a missing page, QEMU (10.0.2 and 11.1.3 at least) never completes
    /// a postcopy-preempt migration. QEMU accepts the capability; the
    /// migration hangs at its end.
    VhostUserDevices {
        /// Their QOM types, e.g. `vhost-user-blk-pci`.
        devices: Vec<String>,
    },
}

impl PreemptUnavailable {
    /// Whether QEMU refuses the capability or the URI outright; if not,
    /// turning it on anyway is possible, and hangs at the end.
    pub fn qemu_refuses(&self) -> bool {
        !matches!(self, PreemptUnavailable::VhostUserDevices { .. })
    }
}

impl fmt::Display for PreemptUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PreemptUnavailable::NotInQemu { side, version } => {
                write!(f, "the {side} QEMU")?;
                if let Some(version) = version {
                    write!(f, " ({version})")?;
                }
                write!(f, " has no {POSTCOPY_PREEMPT} capability")
            }
            PreemptUnavailable::SingleChannel { uri } => write!(
                f,
                "{uri} opens a single connection; {POSTCOPY_PREEMPT} needs a second one (tcp:, unix: or vsock:)"
            ),
            PreemptUnavailable::VhostUserDevices { devices } => write!(
                f,
                "the destination QEMU has vhost-user devices ({}), and QEMU (10.0.2 and 11.1.3 at least) never \
                 completes a {POSTCOPY_PREEMPT} migration once their backend faulted on a missing page",
                devices.join(", ")
            ),
        }
    }
}

/// Whether `src` and `dst` can run `options`' postcopy with requested pages
/// on a channel of their own: both URIs ([`MigrationOptions::listen_uri`]
/// and [`connect_uri`](MigrationOptions::connect_uri)) can open a second
/// connection, both QEMUs list `postcopy-preempt`, and the destination has
/// no vhost-user device (`qom-list` of its peripherals). `None` when they
/// can; otherwise why not.
pub fn postcopy_preempt_unavailable(
    src: &mut QmpClient,
    dst: &mut QmpClient,
    options: &MigrationOptions,
) -> Result<Option<PreemptUnavailable>, MigrationError> {
    for uri in [&options.listen_uri, &options.connect_uri] {
        if !is_multi_channel(uri) {
            return Ok(Some(PreemptUnavailable::SingleChannel { uri: uri.clone() }));
        }
    }
    for (qmp, side) in [(src, Side::Source), (dst, Side::Destination)] {
        if !query_capabilities(qmp, side)?.contains_key(POSTCOPY_PREEMPT) {
            let version = QemuVersion::from_greeting(qmp.greeting());
            return Ok(Some(PreemptUnavailable::NotInQemu { side, version }));
        }
    }
    let devices = vhost_user_devices(dst, Side::Destination)?;
    if !devices.is_empty() {
        return Ok(Some(PreemptUnavailable::VhostUserDevices { devices }));
    }
    Ok(None)
}

/// Where QEMU keeps the devices of `-device` and `device_add`: with an
/// `id`, and without.
const PERIPHERALS: [&str; 2] = ["/machine/peripheral", "/machine/peripheral-anon"];

/// One entry of `qom-list`.
#[derive(Debug, Deserialize)]
struct QomProperty {
    #[serde(rename = "type")]
    kind: String,
}

/// The QOM types of `side`'s vhost-user devices, e.g. `vhost-user-blk-pci`.
/// A vhost-user netdev is not a device of its own and is not found.
fn vhost_user_devices(qmp: &mut QmpClient, side: Side) -> Result<Vec<String>, MigrationError> {
    let mut devices = Vec::new();
    for path in PERIPHERALS {
        let reply = qmp.execute("qom-list", json!({ "path": path })).map_err(MigrationError::qmp(side))?;
        let children: Vec<QomProperty> =
            serde_json::from_value(reply).map_err(|e| MigrationError::Malformed { side, why: e.to_string() })?;
        devices.extend(children.iter().filter_map(|child| vhost_user_type(&child.kind)));
    }
    Ok(devices)
}

/// `vhost-user-blk-pci` for the property type `child<vhost-user-blk-pci>`.
fn vhost_user_type(kind: &str) -> Option<String> {
    let device = kind.strip_prefix("child<")?.strip_suffix('>')?;
    device.starts_with("vhost-user-").then(|| device.to_owned())
}

/// Whether QEMU can open more than one connection for `uri`.
fn is_multi_channel(uri: &str) -> bool {
    uri.split_once(':').is_some_and(|(scheme, _)| MULTI_CHANNEL_SCHEMES.contains(&scheme))
}

/// One entry of `query-migrate-capabilities`.
#[derive(Debug, Deserialize)]
struct CapabilityStatus {
    capability: String,
    state: bool,
}

/// Every migration capability `side`'s QEMU has, and whether it is on
/// (`query-migrate-capabilities`).
pub fn query_capabilities(qmp: &mut QmpClient, side: Side) -> Result<BTreeMap<String, bool>, MigrationError> {
    let reply = qmp.execute("query-migrate-capabilities", Value::Null).map_err(MigrationError::qmp(side))?;
    parse_capabilities(reply).map_err(|e| MigrationError::Malformed { side, why: e.to_string() })
}

fn parse_capabilities(reply: Value) -> Result<BTreeMap<String, bool>, serde_json::Error> {
    let list: Vec<CapabilityStatus> = serde_json::from_value(reply)?;
    Ok(list.into_iter().map(|c| (c.capability, c.state)).collect())
}

/// Sets each named capability on or off in one `migrate-set-capabilities`
/// (QEMU checks them together: `postcopy-preempt` needs `postcopy-ram` in
/// the same set). A capability to be turned off that this QEMU does not
/// have is left out, so that an older QEMU is not asked about a newer one.
pub(super) fn set_capabilities(
    qmp: &mut QmpClient,
    side: Side,
    capabilities: &[(&str, bool)],
) -> Result<(), MigrationError> {
    let known = query_capabilities(qmp, side)?;
    let list: Vec<Value> = capabilities
        .iter()
        .filter(|(name, on)| *on || known.contains_key(*name))
        .map(|(name, on)| json!({ "capability": name, "state": on }))
        .collect();
    qmp.execute("migrate-set-capabilities", json!({ "capabilities": list })).map_err(MigrationError::qmp(side))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_transports_open_a_second_channel() {
        assert!(is_multi_channel("tcp:10.0.0.2:4444"));
        assert!(is_multi_channel("unix:/run/mig.sock"));
        assert!(is_multi_channel("vsock:3:4444"));
        assert!(!is_multi_channel("fd:migfd"));
        assert!(!is_multi_channel("exec:nc 10.0.0.2 4444"));
        assert!(!is_multi_channel("file:/tmp/vm.state"));
        assert!(!is_multi_channel("rdma:10.0.0.2:4444"));
        assert!(!is_multi_channel("/run/mig.sock"));
    }

    #[test]
    fn vhost_user_devices_are_told_by_their_type() {
        assert_eq!(vhost_user_type("child<vhost-user-blk-pci>").as_deref(), Some("vhost-user-blk-pci"));
        assert_eq!(vhost_user_type("child<vhost-user-fs-pci>").as_deref(), Some("vhost-user-fs-pci"));
        assert_eq!(vhost_user_type("child<virtio-blk-pci>"), None);
        assert_eq!(vhost_user_type("string"), None);
    }

    #[test]
    fn reasons_say_which_side_or_uri() {
        let old = PreemptUnavailable::NotInQemu { side: Side::Destination, version: Some(QemuVersion::new(7, 0, 0)) };
        assert_eq!(old.to_string(), "the destination QEMU (7.0.0) has no postcopy-preempt capability");
        let fd = PreemptUnavailable::SingleChannel { uri: "fd:mig".into() };
        assert!(fd.to_string().starts_with("fd:mig opens a single connection"), "{fd}");
        assert!(old.qemu_refuses() && fd.qemu_refuses());
        let vhost = PreemptUnavailable::VhostUserDevices { devices: vec!["vhost-user-blk-pci".into()] };
        assert!(vhost.to_string().contains("has vhost-user devices (vhost-user-blk-pci)"), "{vhost}");
        assert!(!vhost.qemu_refuses());
    }

    #[test]
    fn capabilities_parse_from_qemu_10_0() {
        // Abridged from QEMU 10.0.2's reply.
        let reply = json!([
            {"state": false, "capability": "xbzrle"},
            {"state": true, "capability": "postcopy-ram"},
            {"state": false, "capability": "postcopy-preempt"},
        ]);
        let map = parse_capabilities(reply).expect("parse");
        assert_eq!(map.get("postcopy-ram"), Some(&true));
        assert_eq!(map.get(POSTCOPY_PREEMPT), Some(&false));
    }
}
