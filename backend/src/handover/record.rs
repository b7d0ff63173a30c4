//! What one gmemd program hands the next: plain data, with fds as numbers
//! that stay open at the same numbers across the exec.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::RawFd;

use gmem_protocol::RequestId;
use serde::{Deserialize, Serialize};

use crate::blk::QueueCounters;
use crate::memory::RegionRecord;
use crate::record::ConnectionRecord;

/// The record's format; a program that reads another refuses the handover
/// (and the old program goes on).
pub const HANDOVER_VERSION: u32 = 1;

/// A region and the fd its memory is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InheritedRegion {
    /// What the region is, checked against `fd` on the way in.
    pub record: RegionRecord,
    /// The region's file.
    pub fd: RawFd,
}

/// The control client that asked for the upgrade: the program that ends
/// up running answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requester {
    /// Its control socket.
    pub fd: RawFd,
    /// The request's id, echoed in the reply.
    pub id: Option<RequestId>,
    /// The program asked for.
    pub program: String,
}

/// Everything a gmemd program holds that the next one carries on with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoverRecord {
    /// [`HANDOVER_VERSION`] of the program that wrote it.
    pub version: u32,
    /// That program's release.
    pub from_version: String,
    /// Guest RAM.
    pub regions: Vec<InheritedRegion>,
    /// The open disk image.
    pub disk: RawFd,
    /// The vhost-user listening socket.
    pub vhost_listener: RawFd,
    /// The control listening socket, if there is one.
    pub control_listener: Option<RawFd>,
    /// The id the next frontend connection gets: ids are never reused.
    pub next_frontend_id: u64,
    /// Each frontend connection, paused between two messages.
    pub connections: Vec<ConnectionRecord>,
    /// Who asked.
    pub requester: Option<Requester>,
    /// Each device queue's counters, so that `query-device` goes on.
    pub queue_counters: Vec<QueueCounters>,
    /// Whether the guest has the device's write cache on (WCE).
    pub write_cache: bool,
    /// The pin ledger: locked regions stay charged while the next program
    /// locks them again (mlocks do not survive exec).
    pub pins: gmem_pins::LedgerSnapshot,
    /// CLOCK_MONOTONIC nanoseconds when the pause began (the clock goes on
    /// across exec).
    pub paused_at_ns: u64,
}

impl HandoverRecord {
    /// Every fd the record names, each once.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.regions.iter().map(|r| r.fd).collect();
        fds.extend([self.disk, self.vhost_listener]);
        fds.extend(self.control_listener);
        fds.extend(self.connections.iter().flat_map(ConnectionRecord::fds));
        fds.extend(self.requester.as_ref().map(|r| r.fd));
        fds.sort_unstable();
        fds.dedup();
        fds
    }

    /// Writes the record into a new memfd (close-on-exec; the caller
    /// clears that for the exec).
    pub fn to_memfd(&self) -> std::io::Result<File> {
        let mut file = crate::sys::memfd("gmemd-handover", 0)?;
        file.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        Ok(file)
    }

    /// Reads a record [`to_memfd`](Self::to_memfd) wrote.
    pub fn from_file(mut file: &File) -> Result<Self, String> {
        let mut text = Vec::new();
        file.rewind().and_then(|()| file.read_to_end(&mut text)).map_err(|e| format!("reading the record: {e}"))?;
        // The version is read first, so that a record of another format
        // is reported as that, not as whatever field fails to parse.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let version: Version = serde_json::from_slice(&text).map_err(|e| format!("the record does not parse: {e}"))?;
        if version.version != HANDOVER_VERSION {
            return Err(format!(
                "the record is of format {}, this gmemd reads format {HANDOVER_VERSION}",
                version.version
            ));
        }
        serde_json::from_slice(&text).map_err(|e| format!("the record does not parse: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{RegionSet, RegionSpec};

    #[test]
    fn a_record_goes_through_a_memfd_and_names_each_fd_once() {
        let regions = RegionSet::create(vec![RegionSpec::memfd("ram0", 1 << 20)]).expect("ram");
        let region = regions.iter().next().expect("region");
        let record = HandoverRecord {
            version: HANDOVER_VERSION,
            from_version: "0.0.0".into(),
            regions: vec![InheritedRegion { record: region.record(), fd: region.raw_fd() }],
            disk: 7,
            vhost_listener: 8,
            control_listener: Some(7),
            next_frontend_id: 3,
            connections: Vec::new(),
            requester: Some(Requester { fd: 9, id: Some(RequestId::from(12)), program: "/bin/gmemd".into() }),
            queue_counters: vec![QueueCounters { requests: 3, errors: 1, bytes_to_guest: 4096, bytes_from_guest: 512 }],
            write_cache: false,
            pins: gmem_pins::PinLedger::new().snapshot(),
            paused_at_ns: 1,
        };
        let file = record.to_memfd().expect("memfd");
        assert_eq!(HandoverRecord::from_file(&file).expect("read back"), record);
        assert_eq!(
            record.fds(),
            [7, 8, 9, region.raw_fd()]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );

        let mut other = serde_json::to_value(&record).expect("json");
        other["version"] = (HANDOVER_VERSION + 1).into();
        let mut newer = crate::sys::memfd("t", 0).expect("memfd");
        newer.write_all(other.to_string().as_bytes()).expect("write");
        let error = HandoverRecord::from_file(&newer).expect_err("another format");
        assert!(error.contains(&format!("format {}", HANDOVER_VERSION + 1)), "{error}");
    }
}
