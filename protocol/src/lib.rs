//! The control protocol spoken on `gmemd --control PATH`.
//!
//! It is QMP-shaped, one JSON object per line in both directions:
//!
//! ```text
//! -> {"execute": "query-regions"}
//! <- {"return": [{"id": "ram0", "size": 1073741824, ...}]}
//! -> {"execute": "nope"}
//! <- {"error": {"class": "CommandNotFound", "desc": "the command nope has not been found"}}
//! <- {"event": "FRONTEND_CONNECTED", "data": {"id": 1}, "timestamp": {...}}
//! ```
//!
//! The daemon parses with [`Request::parse`], answers with [`Reply`] and
//! announces [`Event`]s; clients use [`ControlClient`]. Every type here is
//! shared by both ends, so a field renamed on one side cannot silently stop
//! matching on the other.

mod client;
mod command;
mod reply;
mod size;
mod strict;

pub use client::{ClientError, ControlClient};
pub use command::{Command, QueryMemoryAttributesArgs, Request, RequestId, SetMemoryAttributesArgs, UpgradeArgs};
pub use reply::{
    DeviceInfo, DeviceIoWindow, DirtyLogInfo, ErrorClass, ErrorReply, Event, EventKind, ExtentInfo, FrontendInfo,
    LatencySummary, MemoryAttributesInfo, MigrationInfo, MigrationState, PinsInfo, PostcopyInfo, QueueInfo, RegionInfo,
    Reply, StatusInfo, Timestamp, UpgradeInfo,
};
pub use size::{parse_size, SizeError};

/// Longest line either end accepts, newline excluded. A peer that sends a
/// longer one gets an error reply and the rest of that line is skipped.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
