//! What each control command does.

use std::os::fd::RawFd;

use gmem_attributes::{Blocker, ConvertError};
use gmem_protocol::{
    Command, DeviceInfo, ErrorClass, ErrorReply, EventKind, ExtentInfo, MemoryAttributesInfo, QueueInfo, RegionInfo,
    RequestId, SetMemoryAttributesArgs, StatusInfo,
};
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
        Command::SetMemoryAttributes(args) => return set_memory_attributes(daemon, args),
        Command::QueryMemoryAttributes(args) => {
            let region = own_region(daemon, &args.region)?;
            let attributes = region.attributes();
            let extents = attributes
                .extents()
                .into_iter()
                .map(|e| ExtentInfo { offset: e.offset, size: e.size, private: e.private })
                .collect();
            serde_json::to_value(MemoryAttributesInfo {
                region: args.region.clone(),
                size: attributes.size(),
                page_size: attributes.page_size(),
                extents,
            })
        }
        Command::QueryPins => {
            let (ledger, reconciliation) = daemon.pins.report();
            let (reconciliation, reconciliation_error) = match reconciliation {
                Ok(reconciliation) => (Some(reconciliation), None),
                Err(error) => (None, Some(error)),
            };
            serde_json::to_value(gmem_protocol::PinsInfo { ledger, reconciliation, reconciliation_error })
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

/// Longest `wait-ms` honoured: the control client waits that long for its reply.
const MAX_CONVERSION_WAIT_MS: u64 = 10_000;

fn own_region<'d>(daemon: &'d Daemon, id: &str) -> Result<&'d crate::memory::GuestRegion, ErrorReply> {
    daemon.regions.get(id).map(|r| &**r).ok_or_else(|| {
        ErrorReply::new(ErrorClass::InvalidArguments, format!("no region {id:?} (query-regions lists them)"))
    })
}

/// Converts a range (the contract of KVM_SET_MEMORY_ATTRIBUTES2 on a
/// guest_memfd): to private only if no request or pin references it, else
/// EAGAIN with the first offending offset; its content is discarded. To
/// shared unconditionally.
fn set_memory_attributes(daemon: &Daemon, args: &SetMemoryAttributesArgs) -> Result<Value, ErrorReply> {
    let region = own_region(daemon, &args.region)?;
    let attributes = region.attributes();
    let result = if args.private {
        let wait = args.wait_ms.map(|ms| std::time::Duration::from_millis(ms.min(MAX_CONVERSION_WAIT_MS)));
        attributes.to_private(args.offset, args.size, wait)
    } else {
        attributes.to_shared(args.offset, args.size)
    };
    let range = format!("region {} [{:#x}, {:#x})", args.region, args.offset, args.offset.saturating_add(args.size));
    match result {
        Ok(()) => {}
        Err(ConvertError::Busy { error_offset, blocker }) => {
            let holder = match blocker {
                Blocker::Reference => "a request in flight",
                Blocker::Pin => "a pin",
            };
            return Err(ErrorReply::again(
                format!("{range}: {holder} holds offset {error_offset:#x}; try again"),
                error_offset,
            ));
        }
        Err(error) => return Err(ErrorReply::new(ErrorClass::InvalidArguments, format!("{range}: {error}"))),
    }
    // Content does not cross a conversion, either way: memory that turns
    // private loses what the host side had there, memory that turns shared
    // reads as zeroes, not as what the guest kept private.
    if let Err(error) = region.discard(args.offset, args.size) {
        let state = if args.private { "private" } else { "shared" };
        log::error!("{range} is {state}, but discarding its content failed: {error}");
        return Err(ErrorReply::new(
            ErrorClass::GenericError,
            format!("{range} is {state}, but discarding its content failed: {error}"),
        ));
    }
    daemon.events.emit(
        EventKind::MemoryAttributesChanged,
        serde_json::json!({ "region": args.region, "offset": args.offset, "size": args.size, "private": args.private }),
    );
    Ok(Value::Object(Default::default()))
}

fn status(daemon: &Daemon) -> StatusInfo {
    StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_ms: daemon.uptime_ms(),
        vhost_user_socket: daemon.options.vhost_socket.display().to_string(),
        frontends: daemon.frontend_infos(),
        guest_memfd: daemon.guest_memfd().clone(),
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
