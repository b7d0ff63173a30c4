//! What the daemon sends back: replies, errors, events and their payloads.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::command::RequestId;

/// One line from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// Success; the payload's type depends on the command.
    Return {
        /// The command's result.
        #[serde(rename = "return")]
        value: Value,
        /// The request's `id`, if it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// Failure; the connection stays open.
    Error {
        /// What went wrong.
        error: ErrorReply,
        /// The request's `id`, if one was readable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// Something happened that no request asked about.
    Event(Event),
}

impl Reply {
    /// Serialises as one line, without the newline.
    pub fn to_line(&self) -> String {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"error":{{"class":"GenericError","desc":"reply not serialisable: {e}"}}}}"#)
        })
    }
}

/// QMP-style error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Malformed request, or the command failed.
    GenericError,
    /// No command of that name.
    CommandNotFound,
    /// The command exists but its arguments are wrong.
    InvalidArguments,
    /// Not now: something in use blocks it (a conversion to private of a
    /// range a request or a pin holds); the reply's `error_offset` says
    /// where. The kernel's KVM_SET_MEMORY_ATTRIBUTES2 fails with EAGAIN in
    /// the same case.
    #[serde(rename = "EAGAIN")]
    Again,
}

/// The body of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class:?}: {desc}")]
pub struct ErrorReply {
    /// Machine-readable class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
    /// With [`ErrorClass::Again`]: the first offending byte offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_offset: Option<u64>,
}

impl ErrorReply {
    /// An error of `class` saying `desc`.
    pub fn new(class: ErrorClass, desc: String) -> Self {
        ErrorReply { class, desc, error_offset: None }
    }

    /// An [`ErrorClass::Again`] error at `error_offset`.
    pub fn again(desc: String, error_offset: u64) -> Self {
        ErrorReply { class: ErrorClass::Again, desc, error_offset: Some(error_offset) }
    }
}

/// Wall-clock time of an event, as QMP writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp { seconds: since_epoch.as_secs(), microseconds: since_epoch.subsec_micros() }
    }
}

/// What an event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// A vhost-user frontend connected; `data.id` names it.
    FrontendConnected,
    /// A vhost-user frontend went away; its queues were stopped, the RAM kept.
    FrontendDisconnected,
    /// The daemon is exiting.
    Shutdown,
    /// A range of a region turned private or shared; `data` is
    /// `{"region", "offset", "size", "private"}`.
    MemoryAttributesChanged,
}

/// An asynchronous event line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Which event.
    pub event: EventKind,
    /// Event-specific details.
    #[serde(default)]
    pub data: Value,
    /// When it happened.
    pub timestamp: Timestamp,
}

/// `query-status` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// gmemd's version.
    pub version: String,
    /// The daemon's pid (the `<pid>` in the regions' fd paths).
    pub pid: u32,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// The vhost-user socket frontends connect to.
    pub vhost_user_socket: String,
    /// vhost-user frontends connected now.
    pub frontends: Vec<FrontendInfo>,
    /// What the kernel offers of guest_memfd (probed when first asked): whether
    /// in-place conversion, whose contract `set-memory-attributes` keeps,
    /// could back guest RAM here.
    #[serde(default)]
    pub guest_memfd: gmem_attributes::guest_memfd::GuestMemfdSupport,
}

/// `query-pins` result: the pin ledger, and how it compares with what the
/// kernel reports of gmemd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinsInfo {
    /// Per uid and per owner (with regions): budget, use by kind, pending pins.
    pub ledger: gmem_pins::PinsReport,
    /// The ledger's figures next to /proc/self/status (VmLck, VmPin);
    /// `None` if the kernel's could not be read.
    pub reconciliation: Option<gmem_pins::kernel::Reconciliation>,
    /// Why the kernel's figures could not be read, if they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciliation_error: Option<String>,
}

/// `query-memory-attributes` result: one region's private/shared extents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryAttributesInfo {
    /// The region.
    pub region: String,
    /// Its size in bytes.
    pub size: u64,
    /// The granularity of conversions (4 KiB, or the huge page size).
    pub page_size: u64,
    /// Every extent, in order, covering the region.
    pub extents: Vec<ExtentInfo>,
}

/// One extent of [`MemoryAttributesInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentInfo {
    /// Start in the region, bytes.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// Whether the device may not touch it.
    pub private: bool,
}

/// `upgrade` result: the new program took over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeInfo {
    /// The version that handed over.
    pub from_version: String,
    /// The version now running.
    pub to_version: String,
    /// The program now running.
    pub binary: String,
    /// The daemon's pid, the same before and after.
    pub pid: u32,
    /// Frontend connections carried over.
    pub frontends: u32,
    /// How long the device was paused: from the last request the old
    /// program ran to the rings running again in the new one.
    pub paused_us: u64,
}

/// One connected vhost-user frontend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendInfo {
    /// Connection number, unique for the daemon's lifetime.
    pub id: u64,
    /// The peer's pid from SO_PEERCRED, when the kernel gave one.
    pub pid: Option<i32>,
    /// Guest memory regions this frontend's table maps (own regions only).
    pub mapped_regions: u32,
    /// Queues this frontend has started.
    pub started_queues: u32,
}

/// `query-regions` result entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// The region's id, as given by `--region id=..` (`ram0`.. by default).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// The path QEMU maps: `/proc/<gmemd pid>/fd/<n>`.
    pub fd_path: String,
    /// `memfd`, `memfd-hugetlb` or `file:<path>`.
    pub backing: String,
    /// Bytes of the region backed by pages now (from `lseek(SEEK_DATA)`).
    pub populated_bytes: u64,
    /// Frontends whose memory table maps this region now.
    pub mapped_by: u32,
    /// gmemd restarted after a crash and waits for the frontend that still
    /// maps this region to send it back (its fd then proves it is the
    /// region); until then it has no `fd_path`.
    #[serde(default)]
    pub awaiting_adoption: bool,
}

/// `query-device` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `virtio-blk`.
    pub kind: String,
    /// The backing image.
    pub disk: String,
    /// Size of the disk in bytes.
    pub capacity_bytes: u64,
    /// Whether the device is read-only.
    pub readonly: bool,
    /// The cache mode (`--cache`): writeback, writethrough, none, directsync.
    #[serde(default)]
    pub cache: String,
    /// Whether the volatile write cache is on now (the guest may toggle it).
    #[serde(default)]
    pub write_cache: bool,
    /// The disk engine the queues use: `io_uring` or `sync`.
    #[serde(default)]
    pub aio: String,
    /// Why the engine is not the one asked for, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio_fallback: Option<String>,
    /// Requests completed, all queues.
    pub requests: u64,
    /// Requests completed with an error status or dropped as malformed.
    pub errors: u64,
    /// Per-queue figures.
    pub queues: Vec<QueueInfo>,
}

/// One virtqueue's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Queue index.
    pub index: u16,
    /// Whether a worker is running the queue now.
    pub started: bool,
    /// Whether the queue stopped because its ring could not be processed
    /// (corrupt, or no longer in guest RAM) until the frontend restarts it.
    #[serde(default)]
    pub broken: bool,
    /// Requests completed on this queue.
    pub requests: u64,
    /// Requests that failed on this queue.
    pub errors: u64,
    /// Bytes the device read from guest RAM (guest writes to disk).
    pub bytes_from_guest: u64,
    /// Bytes the device wrote into guest RAM (guest reads from disk).
    pub bytes_to_guest: u64,
}

/// `query-migration` result: gmemd's side of a live migration.
///
/// The source gmemd logs the pages its device writes (precopy); the
/// destination gmemd registers its RAM with userfaultfd (postcopy) and its
/// device faults on pages that have not arrived yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// Where the migration stands now.
    pub state: MigrationState,
    /// Bytes the device wrote into guest RAM since the current or last
    /// migration began (dirty logging switched on, or POSTCOPY_ADVISE).
    pub device_bytes_written: u64,
    /// Precopy dirty logging.
    pub dirty_log: DirtyLogInfo,
    /// Postcopy: the device's faults on missing pages.
    pub postcopy: PostcopyInfo,
    /// When the device completed requests, for the I/O gap at switchover.
    pub device_io: DeviceIoWindow,
}

/// The states of [`MigrationInfo::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// No migration runs through this daemon.
    None,
    /// The source side: the device marks every page it writes in QEMU's log.
    DirtyLogging,
    /// POSTCOPY_ADVISE: a userfaultfd exists and QEMU holds it.
    PostcopyAdvised,
    /// POSTCOPY_LISTEN: the guest is about to run on this side.
    PostcopyListening,
    /// Guest RAM is registered for missing-page faults; the device runs and
    /// faults on pages that have not arrived.
    PostcopyRunning,
    /// POSTCOPY_END: registration dropped, normal operation restored.
    PostcopyEnded,
    /// The postcopy's frontend disconnected before POSTCOPY_END and its
    /// registration was dropped (timeout or `postcopy-abort`): guest RAM
    /// holds zeros where pages never arrived.
    PostcopyAborted,
}

/// Precopy dirty-log figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyLogInfo {
    /// Whether a frontend has logging on (VHOST_F_LOG_ALL) with a log mapped.
    pub active: bool,
    /// Size of the log QEMU shared (SET_LOG_BASE), 0 when none.
    pub log_bytes: u64,
    /// Page marks the device made while logging (a page written twice counts twice).
    pub pages_marked: u64,
}

/// Postcopy figures of the device, destination side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyInfo {
    /// Bytes of guest RAM registered with userfaultfd now.
    pub registered_bytes: u64,
    /// Pages the device found missing and faulted on.
    pub device_faults: u64,
    /// Time from the device's fault to QEMU's wake-up, per page.
    pub fault_latency: LatencySummary,
    /// Why this gmemd cannot serve postcopy (it could not create a
    /// userfaultfd at start-up, so it does not offer PAGEFAULT); absent
    /// when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// A latency distribution, in microseconds (percentiles within 1/8 of the value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

/// Wall-clock times of the device's request completions (microseconds since
/// the epoch, 0 when none yet). The source's last and the destination's
/// first completion bound the I/O gap the guest sees at switchover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIoWindow {
    /// The first request this daemon ever completed.
    pub first_completion_us: u64,
    /// The latest request completed.
    pub last_completion_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let replies = [
            Reply::Return { value: serde_json::json!({"a": 1}), id: None },
            Reply::Return { value: serde_json::json!({}), id: Some(crate::RequestId::from(3)) },
            Reply::Error { error: ErrorReply::new(ErrorClass::CommandNotFound, "x".into()), id: None },
            Reply::Event(Event {
                event: EventKind::FrontendConnected,
                data: serde_json::json!({"id": 1}),
                timestamp: Timestamp::now(),
            }),
        ];
        for reply in replies {
            let line = reply.to_line();
            assert!(!line.contains('\n'));
            let back: Reply = serde_json::from_str(&line).expect(&line);
            assert_eq!(back, reply);
        }
    }
}
