//! gmemd killed while requests are in flight, started again, and the
//! frontend reconnecting as QEMU does (its inflight region and its RAM kept):
//! every request completes exactly once, also when they were completing out
//! of order.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};

/// Requests in flight at once: a FLUSH first, then reads of 32 KiB, each
/// into its own buffer at `DATA + 32 KiB * i` from the same offset on the
/// disk, each with its own header and status byte. The image holds tens of
/// MiB of dirty page cache when they start, so the FLUSH takes long, while
/// the reads are page-cache hits that complete at once: out of order, as
/// virtio-blk allows.
const REQUESTS: u64 = 8;
const DATA: u64 = 0x10_0000;
const READ: u32 = 32 << 10;
/// Dirty data past the device's capacity (the image file is larger than
/// the 4 MiB the device serves), for the FLUSH to write back.
const DIRTY: usize = 48 << 20;

/// Offset of descriptor `head`'s `inflight` byte in the inflight region
/// (after the 16-byte queue header, 16 bytes per descriptor; see the
/// spec's `QueueRegionSplit`).
fn inflight_flag(head: u16) -> u64 {
    16 + 16 * u64::from(head)
}

fn header_at(i: u64) -> u64 {
    HDR + 0x100 * i
}

fn status_at(i: u64) -> u64 {
    STATUS + i
}

/// Where the kills found the requests, summed over every attempt.
#[derive(Debug, Default)]
struct Outcomes {
    /// Not yet taken: the restarted gmemd finds them on the avail ring.
    waiting: u32,
    /// Taken and not completed: only the inflight region tells of them.
    in_flight: u32,
    /// Completed, used entry published: must not run again.
    done: u32,
    /// Kills that found later requests completed and an earlier one (the
    /// FLUSH) in flight.
    out_of_order: u32,
}

#[test]
fn requests_in_flight_when_gmemd_dies_run_exactly_once_after_restart() {
    let data: Vec<Vec<u8>> = (1..REQUESTS).map(|i| pattern(READ as usize, 0x50 + i as u8)).collect();
    let dirt = vec![0x5au8; DIRTY];
    let mut outcomes = Outcomes::default();
    let mut attempt = 0;
    while outcomes.out_of_order < 3 {
        attempt += 1;
        assert!(attempt <= 20, "too few kills found requests completed out of order: {outcomes:?}");
        let mut daemon = Gmemd::start(&[]);
        let disk = std::fs::OpenOptions::new().write(true).open(&daemon.disk).expect("the image");
        for (i, bytes) in (1..REQUESTS).zip(&data) {
            disk.write_all_at(bytes, u64::from(READ) * i).expect("fill the image");
        }
        disk.write_all_at(&dirt, DISK_SIZE).expect("dirty the page cache");
        let mut fe = daemon.frontend();
        fe.handshake(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let wanted = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QUEUE_SIZE };
        let (inflight, region) = fe.vu.get_inflight_fd(&wanted).expect("GET_INFLIGHT_FD");
        fe.vu.set_inflight_fd(&inflight, region.as_raw_fd()).expect("SET_INFLIGHT_FD");
        let mem = daemon.map_ram();
        fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE");
        let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
        fe.start_queue(&mem, &ring, 0).expect("start queue 0");

        let mut heads = Vec::new();
        for i in 0..REQUESTS {
            let kind = if i == 0 { T_FLUSH } else { T_IN };
            mem.put(header_at(i), kind.to_le());
            mem.put(header_at(i) + 4, 0u32);
            mem.put(header_at(i) + 8, (u64::from(READ) * i / 512).to_le());
            mem.put(status_at(i), 0xffu8);
            let chain = match i {
                0 => vec![Desc::r(header_at(i), 16), Desc::w(status_at(i), 1)],
                _ => {
                    mem.write(DATA + u64::from(READ) * i, &vec![0u8; READ as usize]);
                    vec![Desc::r(header_at(i), 16), Desc::w(DATA + u64::from(READ) * i, READ), Desc::w(status_at(i), 1)]
                }
            };
            heads.push(ring.push(&mem, &chain));
        }
        fe.kick.write(1).expect("kick");
        // The reads are done by now; the FLUSH, writing tens of MiB back,
        // most likely not.
        std::thread::sleep(Duration::from_millis(15));
        daemon.crash();
        drop(fe);

        let used_before = ring.used_idx_in_ram(&mem);
        let flag = |head: u16| {
            let mut flag = [0u8];
            region.read_exact_at(&mut flag, inflight.mmap_offset + inflight_flag(head)).expect("inflight");
            flag[0] == 1
        };
        let flagged = heads.iter().filter(|head| flag(**head)).count() as u32;
        outcomes.done += u32::from(used_before);
        outcomes.in_flight += flagged;
        outcomes.waiting += REQUESTS as u32 - u32::from(used_before) - flagged;
        outcomes.out_of_order += u32::from(used_before > 0 && flag(heads[0]));

        // What QEMU does after the backend went away: restart the queue at
        // the used idx, with the same inflight region and RAM.
        daemon.restart();
        let mut fe = daemon.frontend();
        fe.handshake(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        fe.vu.set_inflight_fd(&inflight, region.as_raw_fd()).expect("SET_INFLIGHT_FD again");
        fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE after the restart");
        fe.start_queue(&mem, &ring, used_before).expect("start queue 0 again");
        fe.kick.write(1).expect("kick");
        wait_until("every request is used", || ring.used_idx_in_ram(&mem) >= REQUESTS as u16);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ring.used_idx_in_ram(&mem), REQUESTS as u16, "a request ran twice: {outcomes:?}");
        for i in 0..REQUESTS {
            assert_eq!(mem.get::<u8>(status_at(i)), S_OK, "request {i} never completed: {outcomes:?}");
        }
        for (i, bytes) in (1..REQUESTS).zip(&data) {
            let got = mem.read(DATA + u64::from(READ) * i, READ as usize);
            assert!(got == *bytes, "read {i}'s data is not in guest RAM");
        }
    }
    eprintln!("{attempt} kills: {outcomes:?}");
}
