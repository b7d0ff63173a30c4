//! What each control command does.

use std::os::fd::RawFd;

use gmem_protocol::{Command, DeviceInfo, ErrorClass, ErrorReply, QueueInfo, RegionInfo, RequestId, StatusInfo};
use serde_json::Value;

use crate::daemon::Daemon;
use crate::handover::Upgrader;

/// Who sent a command: the control connection's socket and the request's id.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    /// The client's socket (an upgrade is answered on it by the program
    /// that ends up running).
    pub socket: RawFd,
    /// The request's id.
    pub id: Option<&'a RequestId>,
}

/// Runs `command` and returns its `return` value.
pub fn execute(daemon: &Daemon, upgrader: &Upgrader, command: &Command, sender: Sender) -> Result<Value, ErrorReply> {
    let value = match command {
        Command::QueryStatus => serde_json::to_value(status(daemon)),
        Command::QueryRegions => serde_json::to_value(regions(daemon)),
        Command::QueryDevice => serde_json::to_value(device(daemon)),
        Command::QueryMigration => {
            let mut info = daemon.migration.info();
            info.postcopy.unavailable = daemon.postcopy_unavailable().map(str::to_owned);
            serde_json::to_value(info)
        }
        Command::PostcopyAbort => {
            let dropped = daemon.abort_postcopy("the postcopy-abort command");
            Ok(serde_json::json!({ "dropped": dropped }))
        }
        Command::Upgrade(args) => {
            // Returns only when the upgrade did not happen.
            let error = upgrader.upgrade(args, sender.socket, sender.id);
            log::warn!("upgrade refused: {error}");
            return Err(ErrorReply::new(ErrorClass::GenericError, error.to_string()));
        }
        Command::Quit => Ok(Value::Object(Default::default())),
    };
    value.map_err(|e| ErrorReply::new(ErrorClass::GenericError, format!("cannot encode the reply: {e}")))
}

fn status(daemon: &Daemon) -> StatusInfo {
    StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_ms: daemon.uptime_ms(),
        vhost_user_socket: daemon.options.vhost_socket.display().to_string(),
        frontends: daemon.frontend_infos(),
    }
}

fn regions(daemon: &Daemon) -> Vec<RegionInfo> {
    daemon
        .regions
        .slots()
        .map(|(spec, region)| RegionInfo {
            id: spec.id.clone(),
            size: spec.size,
            fd_path: region.map(|r| r.fd_path().display().to_string()).unwrap_or_default(),
            backing: spec.backing.to_string(),
            populated_bytes: region.map_or(0, |r| r.populated_bytes()),
            mapped_by: daemon.frontends_mapping(&spec.id),
            awaiting_adoption: region.is_none(),
        })
        .collect()
}

fn device(daemon: &Daemon) -> DeviceInfo {
    let device = &daemon.device;
    let queues: Vec<QueueInfo> = device
        .queues()
        .iter()
        .enumerate()
        .map(|(index, q)| QueueInfo {
            index: u16::try_from(index).unwrap_or(u16::MAX),
            started: q.started(),
            broken: q.broken(),
            requests: q.requests.load(std::sync::atomic::Ordering::Relaxed),
            errors: q.errors.load(std::sync::atomic::Ordering::Relaxed),
            bytes_from_guest: q.access.bytes_from_guest(),
            bytes_to_guest: q.access.bytes_to_guest(),
        })
        .collect();
    DeviceInfo {
        kind: "virtio-blk".to_string(),
        disk: device.disk().path().display().to_string(),
        capacity_bytes: device.disk().capacity_bytes(),
        readonly: device.disk().readonly(),
        cache: device.disk().cache().to_string(),
        write_cache: device.disk().write_cache(),
        aio: device.aio().0.to_string(),
        aio_fallback: device.aio().1.map(str::to_owned),
        requests: queues.iter().map(|q| q.requests).sum(),
        errors: queues.iter().map(|q| q.errors).sum(),
        queues,
    }
}
