//! gmemd killed while a request is in flight, started again, and the
//! frontend reconnecting as QEMU does (its inflight region and its RAM kept):
//! every request completes exactly once.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};

/// Where the write's data sits in guest RAM, and its length: long enough
/// that a kill often lands while gmemd runs it.
const DATA: u64 = 0x10_0000;
const LEN: u32 = 2 << 20;

/// Offset of descriptor 0's `inflight` byte in the inflight region (after
/// the 16-byte queue header; see the spec's `QueueRegionSplit`).
const DESC0_INFLIGHT: u64 = 16;

/// Where the kill found the request.
#[derive(Debug, Default)]
struct Outcomes {
    /// Not yet fetched: the restarted gmemd finds it on the avail ring.
    waiting: u32,
    /// Fetched and not completed: only the inflight region tells of it.
    in_flight: u32,
    /// Completed, its used entry published: must not run again.
    done: u32,
}

#[test]
fn a_request_in_flight_when_gmemd_dies_runs_exactly_once_after_restart() {
    let data = pattern(LEN as usize, 0x5a);
    let mut outcomes = Outcomes::default();
    let mut attempt: u64 = 0;
    while outcomes.in_flight < 3 {
        attempt += 1;
        assert!(attempt <= 200, "never caught a request in flight: {outcomes:?}");
        let mut daemon = Gmemd::start(&[]);
        let mut fe = daemon.frontend();
        fe.handshake(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let wanted = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QUEUE_SIZE };
        let (inflight, region) = fe.vu.get_inflight_fd(&wanted).expect("GET_INFLIGHT_FD");
        fe.vu.set_inflight_fd(&inflight, region.as_raw_fd()).expect("SET_INFLIGHT_FD");
        let mem = daemon.map_ram();
        fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE");
        let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
        fe.start_queue(&mem, &ring, 0).expect("start queue 0");

        mem.write(DATA, &data);
        ring.push(&mem, &[header(&mem, T_OUT, 0), Desc::r(DATA, LEN), status()]);
        fe.kick.write(1).expect("kick");
        // Somewhere in the request's life: before gmemd fetches it, while
        // it copies, or after it completed.
        std::thread::sleep(Duration::from_micros(attempt * 37 % 1500));
        daemon.crash();
        drop(fe);

        let mut flag = [0u8];
        region.read_exact_at(&mut flag, inflight.mmap_offset + DESC0_INFLIGHT).expect("read the inflight region");
        match (ring.used_idx_in_ram(&mem), flag[0]) {
            (0, 0) => outcomes.waiting += 1,
            (0, _) => outcomes.in_flight += 1,
            _ => outcomes.done += 1,
        }
        // What QEMU does after the backend went away: restart the queue at
        // the used idx, with the same inflight region and RAM.
        let used_before = ring.used_idx_in_ram(&mem);
        daemon.restart();
        let mut fe = daemon.frontend();
        fe.handshake(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        fe.vu.set_inflight_fd(&inflight, region.as_raw_fd()).expect("SET_INFLIGHT_FD again");
        fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE after the restart");
        fe.start_queue(&mem, &ring, used_before).expect("start queue 0 again");
        fe.kick.write(1).expect("kick");
        wait_until("the request is used", || ring.used_idx_in_ram(&mem) == 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ring.used_idx_in_ram(&mem), 1, "the request ran twice: {outcomes:?}");
        assert_eq!(mem.get::<u8>(STATUS), S_OK);
        assert_eq!(daemon.disk_bytes(0, LEN as usize), data, "the write is not on the disk");
    }
    eprintln!("{attempt} kills: {outcomes:?}");
}
