//! The serialisable state of a frontend connection: what a new gmemd image
//! needs to carry on a connection exactly where the old image paused it
//! (docs/live-update.md).
//!
//! These are plain data. File descriptors appear as numbers: the records
//! travel through `execve`, which keeps the fds they name open at the same
//! numbers. The live objects behind them (eventfds, mappings, workers) are
//! rebuilt from a record by the modules that own them.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use crate::memory::MemRegionDesc;

/// Guest-physical addresses of a split ring's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// What the frontend negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    /// SET_OWNER was sent.
    pub owner: bool,
    /// Acked virtio features (SET_FEATURES).
    pub features: u64,
    /// Acked protocol features (SET_PROTOCOL_FEATURES).
    pub protocol_features: u64,
}

/// One vring, stopped between two requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringRecord {
    /// Queue index.
    pub index: u16,
    /// SET_VRING_NUM (0: not set).
    pub size: u16,
    /// SET_VRING_ADDR, translated to guest-physical addresses.
    pub addrs: Option<RingAddrs>,
    /// Next available entry to take.
    pub next_avail: u16,
    /// Next used entry to write.
    pub next_used: u16,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
    /// Whether a worker ran it when it was paused.
    pub started: bool,
    /// Kick eventfd.
    pub kick: Option<RawFd>,
    /// Call eventfd.
    pub call: Option<RawFd>,
    /// Error eventfd.
    pub err: Option<RawFd>,
}

/// One memory-table entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableEntryRecord {
    /// A range of one of gmemd's regions, by region id.
    Own {
        /// The frontend's description.
        desc: MemRegionDesc,
        /// The region's id.
        region: String,
    },
    /// Memory gmemd does not own (`--allow-foreign-memory`), by its fd.
    Foreign {
        /// The frontend's description.
        desc: MemRegionDesc,
        /// The frontend's fd for it.
        fd: RawFd,
    },
}

/// The inflight region (INFLIGHT_SHMFD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightRecord {
    /// Its memfd.
    pub fd: RawFd,
    /// Bytes mapped.
    pub mmap_size: u64,
    /// Offset in the fd.
    pub mmap_offset: u64,
    /// Queues it covers.
    pub num_queues: u16,
    /// Descriptors per queue it covers.
    pub queue_size: u16,
}

/// QEMU's dirty log (SET_LOG_BASE) and whether logging is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyLogRecord {
    /// The log's memfd.
    pub fd: RawFd,
    /// Bytes mapped.
    pub size: u64,
    /// Offset in the fd.
    pub offset: u64,
}

/// One frontend connection, paused between two messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// The connection id, kept by the new image.
    pub id: u64,
    /// The peer's pid from SO_PEERCRED.
    pub pid: Option<i32>,
    /// The connection's socket.
    pub socket: RawFd,
    /// Features.
    pub negotiated: Negotiated,
    /// The memory table.
    pub table: Vec<TableEntryRecord>,
    /// Every vring of the device.
    pub vrings: Vec<VringRecord>,
    /// The inflight region, if the frontend set one.
    pub inflight: Option<InflightRecord>,
    /// The dirty log, if the frontend set one.
    pub dirty_log: Option<DirtyLogRecord>,
}

impl ConnectionRecord {
    /// The same record with each place that names an fd renamed by `map`,
    /// called once per place, the socket first.
    pub fn map_fds(&self, mut map: impl FnMut(RawFd) -> std::io::Result<RawFd>) -> std::io::Result<Self> {
        let mut record = self.clone();
        record.socket = map(record.socket)?;
        for entry in &mut record.table {
            if let TableEntryRecord::Foreign { fd, .. } = entry {
                *fd = map(*fd)?;
            }
        }
        for vring in &mut record.vrings {
            for fd in [&mut vring.kick, &mut vring.call, &mut vring.err].into_iter().flatten() {
                *fd = map(*fd)?;
            }
        }
        if let Some(inflight) = &mut record.inflight {
            inflight.fd = map(inflight.fd)?;
        }
        if let Some(log) = &mut record.dirty_log {
            log.fd = map(log.fd)?;
        }
        Ok(record)
    }

    /// Every fd the record names, each once.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.socket];
        fds.extend(self.table.iter().filter_map(|e| match e {
            TableEntryRecord::Foreign { fd, .. } => Some(*fd),
            TableEntryRecord::Own { .. } => None,
        }));
        for vring in &self.vrings {
            fds.extend([vring.kick, vring.call, vring.err].into_iter().flatten());
        }
        fds.extend(self.inflight.map(|i| i.fd));
        fds.extend(self.dirty_log.map(|l| l.fd));
        fds.sort_unstable();
        fds.dedup();
        fds
    }
}
