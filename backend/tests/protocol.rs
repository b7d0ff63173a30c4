//! vhost-user protocol tests against the real `gmemd` binary, without QEMU:
//! the test acts as the frontend (vhost crate's `Frontend`) and as the guest
//! driver (a split ring it writes by hand in gmemd's own RAM, mapped here
//! through the region's `/proc/<pid>/fd/<n>` path).

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use common::ring::{F_INDIRECT, F_NEXT, F_WRITE};
use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;

const DATA: u64 = 0x10_0000;
const BACK: u64 = 0x20_0000;
const KIB64: u32 = 64 << 10;

#[test]
fn handshake_then_write_flush_read_get_id() {
    let mut daemon = Gmemd::start(&[]);
    let (mut fe, mem, mut ring) = ready_frontend(&daemon);

    let (_, config) = fe.vu.get_config(0, 36, VhostUserConfigFlags::empty(), &[0u8; 36]).expect("GET_CONFIG");
    assert_eq!(u64::from_le_bytes(config[0..8].try_into().expect("8")), DISK_SIZE / 512, "capacity");
    assert_eq!(u16::from_le_bytes([config[34], config[35]]), 1, "num_queues");

    let data = pattern(KIB64 as usize, 7);
    mem.write(DATA, &data);
    assert_eq!(fe.write(&mem, &mut ring, 8, DATA, KIB64), (1, S_OK), "OUT");
    assert_eq!(fe.run(&mem, &mut ring, &[header(&mem, T_FLUSH, 0), status()]), (1, S_OK), "FLUSH");
    assert_eq!(daemon.disk_bytes(4096, data.len()), data, "the disk holds the pattern at sector 8");
    assert_eq!(daemon.disk_bytes(0, 4096), vec![0u8; 4096], "and nothing before it");

    mem.write(BACK, &vec![0u8; data.len()]);
    assert_eq!(fe.read(&mem, &mut ring, 8, BACK, KIB64), (KIB64 + 1, S_OK), "IN");
    assert_eq!(mem.read(BACK, data.len()), data, "read back into other guest buffers");

    // INDIRECT_DESC is offered: an indirect chain scattering 12 KiB over two buffers.
    let (table, scatter) = (0xa000, 0x30_0000);
    header(&mem, T_IN, 8);
    Ring::write_desc(&mem, table, 0, HDR, 16, F_NEXT, 1);
    Ring::write_desc(&mem, table, 1, scatter, 4096, F_NEXT | F_WRITE, 2);
    Ring::write_desc(&mem, table, 2, scatter + 0x10000, 8192, F_NEXT | F_WRITE, 3);
    Ring::write_desc(&mem, table, 3, STATUS, 1, F_WRITE, 0);
    let head = ring.take_desc();
    Ring::write_desc(&mem, ring.table(), head, table, 4 * 16, F_INDIRECT, 0);
    ring.publish(&mem, head);
    assert_eq!(fe.complete(&mem, &mut ring, head), (12288 + 1, S_OK), "indirect IN");
    assert_eq!(mem.read(scatter, 4096), data[..4096]);
    assert_eq!(mem.read(scatter + 0x10000, 8192), data[4096..12288]);

    let id = 0xb000;
    mem.write(id, &[0xaa; 20]);
    assert_eq!(fe.run(&mem, &mut ring, &[header(&mem, T_GET_ID, 0), Desc::w(id, 20), status()]), (21, S_OK));
    let mut serial = SERIAL.as_bytes().to_vec();
    serial.resize(20, 0);
    assert_eq!(mem.read(id, 20), serial, "GET_ID returns the serial, zero-padded");

    let device = daemon.device();
    assert_eq!((device.requests, device.errors), (5, 0), "{device:?}");
    let queue = &device.queues[0];
    assert!(queue.started);
    assert_eq!(queue.bytes_from_guest, u64::from(KIB64) + 5 * 16, "data written plus five headers");
    assert!(
        (u64::from(KIB64) + 12288 + 20..u64::from(KIB64) + 12288 + 20 + 8).contains(&queue.bytes_to_guest),
        "{queue:?}"
    );
    let status = daemon.status();
    assert_eq!(status.frontends.len(), 1);
    assert_eq!(status.frontends[0].pid, Some(std::process::id() as i32), "SO_PEERCRED names the test");
    assert_eq!((status.frontends[0].mapped_regions, status.frontends[0].started_queues), (1, 1));
    assert_eq!(daemon.region().mapped_by, 1);
    assert!(daemon.alive());
}

#[test]
fn malformed_requests_complete_with_an_error_and_the_queue_goes_on() {
    let mut daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let sectors = DISK_SIZE / 512;
    let ram_end = mem.size();
    type Case = (&'static str, Box<dyn Fn(&GuestMem) -> Vec<Desc>>, u8);
    let cases: Vec<Case> = vec![
        ("data outside guest RAM", Box::new(|m| vec![header(m, T_IN, 0), Desc::w(1 << 40, 512), status()]), S_IOERR),
        (
            "data across the end of RAM",
            Box::new(move |m| vec![header(m, T_IN, 0), Desc::w(ram_end - 512, 1024), status()]),
            S_IOERR,
        ),
        (
            "read past the disk end",
            Box::new(move |m| vec![header(m, T_IN, sectors - 1), Desc::w(DATA, 1024), status()]),
            S_IOERR,
        ),
        (
            "write at the disk end",
            Box::new(move |m| vec![header(m, T_OUT, sectors), Desc::r(DATA, 512), status()]),
            S_IOERR,
        ),
        (
            "sector overflowing u64",
            Box::new(|m| vec![header(m, T_IN, u64::MAX), Desc::w(DATA, 512), status()]),
            S_IOERR,
        ),
        ("8-byte header", Box::new(|m| vec![Desc::r(header(m, T_IN, 0).addr, 8), status()]), S_IOERR),
        ("unknown request type", Box::new(|m| vec![header(m, 0x77, 0), status()]), S_UNSUPP),
        ("length not a multiple of 512", Box::new(|m| vec![header(m, T_IN, 0), Desc::w(DATA, 100), status()]), S_IOERR),
        (
            "readable after writable",
            Box::new(|m| vec![header(m, T_IN, 0), Desc::w(DATA, 512), status(), Desc::r(BACK, 16)]),
            S_IOERR,
        ),
        (
            "write with device-writable data",
            Box::new(|m| vec![header(m, T_OUT, 0), Desc::w(DATA, 512), status()]),
            S_IOERR,
        ),
    ];
    let good =
        |ring: &mut Ring| assert_eq!(fe.read(&mem, ring, 0, DATA, 512), (513, S_OK), "a good request after a bad one");
    for (name, descs, expected) in &cases {
        let (len, status) = fe.run(&mem, &mut ring, &descs(&mem));
        assert_eq!((len, status), (1, *expected), "{name}: used length 1 (the status byte) and status {expected}");
        good(&mut ring);
    }

    // A header whose `next` points back at itself: the chain has no
    // writable byte, so there is nowhere to put a status. It is returned
    // with length 0 and the status byte stays untouched.
    header(&mem, T_IN, 0);
    let head = ring.take_desc();
    Ring::write_desc(&mem, ring.table(), head, HDR, 16, F_NEXT, head);
    ring.publish(&mem, head);
    assert_eq!(fe.complete(&mem, &mut ring, head), (0, 0xff), "self-looping header");
    good(&mut ring);

    // A status descriptor looping to itself: the chain is cut after
    // queue-size descriptors (254 data bytes then the status), which is no
    // whole sector: IOERR.
    header(&mem, T_IN, 0);
    let (h, s) = (ring.take_desc(), ring.take_desc());
    Ring::write_desc(&mem, ring.table(), h, HDR, 16, F_NEXT, s);
    Ring::write_desc(&mem, ring.table(), s, STATUS, 1, F_NEXT | F_WRITE, s);
    ring.publish(&mem, h);
    assert_eq!(fe.complete(&mem, &mut ring, h), (1, S_IOERR), "self-looping status");
    good(&mut ring);

    // A `next` index past the descriptor table ends the chain there; an
    // indirect table outside guest RAM yields no descriptors at all.
    header(&mem, T_IN, 0);
    let h = ring.take_desc();
    Ring::write_desc(&mem, ring.table(), h, HDR, 16, F_NEXT, QUEUE_SIZE + 7);
    ring.publish(&mem, h);
    assert_eq!(fe.complete(&mem, &mut ring, h), (0, 0xff), "next out of range");
    let h = ring.take_desc();
    Ring::write_desc(&mem, ring.table(), h, 1 << 40, 4 * 16, F_INDIRECT, 0);
    ring.publish(&mem, h);
    assert_eq!(fe.complete(&mem, &mut ring, h), (0, 0xff), "indirect table outside RAM");
    good(&mut ring);

    let bad = cases.len() as u64 + 4;
    let device = daemon.device();
    assert_eq!(device.errors, bad, "{device:?}");
    assert_eq!(device.requests, 2 * bad - 1, "{device:?}");
    assert!(device.queues[0].started);
    assert!(daemon.alive());
}

#[test]
fn foreign_memory_is_refused_unless_allowed() {
    let mut daemon = Gmemd::start(&[]);
    let mut fe = daemon.frontend();
    fe.handshake(VhostUserProtocolFeatures::empty());
    let foreign = GuestMem::foreign(16 * MIB);
    assert!(fe.set_table(&[foreign.whole()]).is_err(), "a memfd gmemd does not own is nacked");
    assert_eq!(daemon.status().frontends[0].mapped_regions, 0);

    let mem = daemon.map_ram();
    fe.set_table(&[mem.range(0, 32 * MIB)]).expect("gmemd's own region is accepted on the same connection");
    let mut beyond = foreign.whole();
    beyond.guest_phys_addr = 64 * MIB;
    assert!(fe.set_table(&[mem.whole(), beyond]).is_err(), "a table with any foreign range is nacked as a whole");
    assert_eq!(daemon.status().frontends[0].mapped_regions, 1, "the previous table stays");
    assert_eq!(daemon.region().mapped_by, 1);
    let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
    fe.start_queue(&mem, &ring, 0).expect("start queue 0");
    mem.write(DATA, &pattern(4096, 1));
    assert_eq!(fe.write(&mem, &mut ring, 0, DATA, 4096), (1, S_OK));
    assert_eq!(fe.read(&mem, &mut ring, 0, 40 * MIB, 512), (1, S_IOERR), "40 MiB is not in the table");
    assert_eq!(daemon.disk_bytes(0, 4096), pattern(4096, 1));
    assert!(daemon.alive());

    // With --allow-foreign-memory the same memfd is accepted, and gmemd
    // serves requests whose rings and buffers live in it.
    let open = Gmemd::start(&["--allow-foreign-memory"]);
    let mut fe = open.frontend();
    fe.handshake(VhostUserProtocolFeatures::empty());
    fe.set_table(&[foreign.whole()]).expect("foreign memory accepted");
    assert_eq!((open.status().frontends[0].mapped_regions, open.region().mapped_by), (0, 0), "not gmemd's region");
    let mut ring = Ring::create(&foreign, RING, QUEUE_SIZE);
    fe.start_queue(&foreign, &ring, 0).expect("start queue 0 in foreign memory");
    foreign.write(DATA, &pattern(8192, 2));
    assert_eq!(fe.write(&foreign, &mut ring, 16, DATA, 8192), (1, S_OK));
    assert_eq!(open.disk_bytes(16 * 512, 8192), pattern(8192, 2));
    assert_eq!(fe.read(&foreign, &mut ring, 16, BACK, 8192), (8193, S_OK));
    assert_eq!(foreign.read(BACK, 8192), pattern(8192, 2));
}

#[test]
fn add_and_remove_mem_regions() {
    let mut daemon = Gmemd::start(&[]);
    let mut fe = daemon.frontend();
    fe.handshake(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    assert_eq!(fe.vu.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS"), 509);
    let mem = daemon.map_ram();
    // Two ranges of the one region, as QEMU splits RAM around a hole.
    let (low, high) = (mem.range(0, 32 * MIB), mem.range(32 * MIB, 32 * MIB));
    fe.vu.add_mem_region(&low).expect("ADD_MEM_REG low");
    fe.vu.add_mem_region(&high).expect("ADD_MEM_REG high");
    assert_eq!(daemon.region().mapped_by, 1);
    assert_eq!(daemon.status().frontends[0].mapped_regions, 1, "two ranges, one region");
    let foreign = GuestMem::foreign(MIB);
    let mut stray = foreign.whole();
    stray.guest_phys_addr = 64 * MIB;
    assert!(fe.vu.add_mem_region(&stray).is_err(), "a foreign ADD_MEM_REG is nacked");

    let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
    fe.start_queue(&mem, &ring, 0).expect("start queue 0");
    // A buffer straddling the two ranges.
    let straddle = 32 * MIB - 4096;
    mem.write(straddle, &pattern(8192, 3));
    assert_eq!(fe.write(&mem, &mut ring, 0, straddle, 8192), (1, S_OK));
    mem.write(straddle, &[0u8; 8192]);
    assert_eq!(fe.read(&mem, &mut ring, 0, straddle, 8192), (8193, S_OK));
    assert_eq!(mem.read(straddle, 8192), pattern(8192, 3));

    fe.vu.remove_mem_region(&high).expect("REM_MEM_REG high");
    assert_eq!(daemon.region().mapped_by, 1, "the low range still maps the region");
    assert_eq!(fe.read(&mem, &mut ring, 0, 40 * MIB, 512), (1, S_IOERR), "removed memory is no longer guest RAM");
    assert_eq!(fe.read(&mem, &mut ring, 0, DATA, 512), (513, S_OK));
    assert!(fe.vu.remove_mem_region(&high).is_err(), "removing it twice is nacked");
    fe.vu.remove_mem_region(&low).expect("REM_MEM_REG low");
    assert_eq!(daemon.region().mapped_by, 0);
    assert_eq!(daemon.status().frontends[0].mapped_regions, 0);
    assert!(daemon.alive());
}

#[test]
fn bad_messages_drop_only_their_connection() {
    let mut daemon = Gmemd::start(&[]);
    // Garbage on a connection whose queue runs: that connection is closed
    // and its queue released.
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    assert_eq!(fe.read(&mem, &mut ring, 0, DATA, 512), (513, S_OK));
    let mut stream = fe.stream.try_clone().expect("dup");
    stream.write_all(b"\xde\xad\xbe\xef this is not vhost-user at all").expect("send garbage");
    assert_closed_by_daemon(&mut stream);
    wait_until("the dropped frontend's queue is released", || {
        !daemon.device().queues[0].started && daemon.status().frontends.is_empty()
    });
    drop(fe);

    let oversized = raw_message(1, 1, 0xffff_ffff, &[]); // GET_FEATURES with a 4 GiB body
    let unknown = raw_message(9999, 1, 0, &[]);
    let wrong_size = raw_message(8, 1, 4, &[0; 4]); // SET_VRING_NUM with half a body
    let reply_flag = raw_message(1, 1 | 4, 0, &[]); // a "reply" sent to the backend
    for (name, bytes) in [
        ("garbage", &b"\xff\xff\xff\xffnonsense"[..]),
        ("oversized", &oversized),
        ("unknown code", &unknown),
        ("wrong body size", &wrong_size),
        ("reply flag", &reply_flag),
    ] {
        let mut stream = UnixStream::connect(&daemon.socket).expect("connect");
        stream.write_all(bytes).expect(name);
        assert_closed_by_daemon(&mut stream);
        assert!(daemon.alive(), "{name}");
    }
    // A header cut short, then a hang-up.
    let mut stream = UnixStream::connect(&daemon.socket).expect("connect");
    stream.write_all(&[1, 0, 0]).expect("partial");
    drop(stream);

    // Requests gmemd refuses are nacked and the connection carries on.
    let mut fe = daemon.frontend();
    fe.handshake(VhostUserProtocolFeatures::empty());
    assert!(fe.vu.set_vring_num(0, 3).is_err(), "queue size 3 is nacked");
    assert!(fe.vu.set_vring_kick(0, &fe.kick).is_err(), "an unconfigured queue cannot start");
    assert!(fe.vu.set_config(0, VhostUserConfigFlags::WRITABLE, &[1]).is_err(), "config space is read-only");
    let mem = daemon.map_ram();
    fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE");
    let mut bogus = Ring::create(&mem, RING, QUEUE_SIZE).config(&mem);
    bogus.desc_table_addr = 0x7000_0000_0000; // aligned (else the vhost crate drops the connection), not in the table
    assert!(fe.vu.set_vring_addr(0, &bogus).is_err(), "ring addresses outside the table are nacked");
    let mut ring = Ring::resume(&mem, RING, QUEUE_SIZE);
    fe.start_queue(&mem, &ring, ring.used_idx_in_ram(&mem)).expect("start queue 0 again");
    assert_eq!(fe.read(&mem, &mut ring, 0, DATA, 512), (513, S_OK), "a new frontend is served");
    wait_until("every bad connection is gone", || daemon.status().frontends.len() == 1);
    assert!(daemon.alive());
}

#[test]
fn second_frontend_takes_over_the_queue_after_get_vring_base() {
    let mut daemon = Gmemd::start(&[]);
    let (first, mem1, mut ring) = ready_frontend(&daemon);
    mem1.write(DATA, &pattern(8192, 4));
    assert_eq!(first.write(&mem1, &mut ring, 32, DATA, 8192), (1, S_OK));

    // The second frontend (a new QEMU in cpr-transfer) maps the same RAM at
    // its own address and handshakes while the first one runs the queue.
    let mut second = daemon.frontend();
    second.handshake(VhostUserProtocolFeatures::empty());
    let mem2 = daemon.map_ram();
    assert_ne!(mem1.va(0), mem2.va(0));
    second.set_table(&[mem2.whole()]).expect("the second SET_MEM_TABLE");
    assert_eq!(daemon.region().mapped_by, 2);
    // Two live frontends driving one queue: the second start waits for the
    // first to let go (5 s), then is nacked; the first goes on being served.
    assert!(second.start_queue(&mem2, &ring, 0).is_err(), "queue 0 is busy: SET_VRING_KICK nacked");
    assert!(daemon.log().contains("vring 0 is still run by frontend 1"), "{}", daemon.log());
    assert_eq!(first.read(&mem1, &mut ring, 32, BACK, 8192), (8193, S_OK), "the first frontend keeps being served");
    let started: Vec<u32> = daemon.status().frontends.iter().map(|f| f.started_queues).collect();
    assert_eq!(started, [1, 0]);

    // The first frontend is idle now, so its ring stops where it is; the
    // second asks for the queue and waits while the first still runs it
    // (QEMU's SET_VRING_KICK has no reply to carry a refusal), and gets it
    // as soon as the first stops it.
    let base = ring.avail_idx();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let second = std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            second.vu.set_vring_base(0, base).expect("SET_VRING_BASE");
            let kicked = second.vu.set_vring_kick(0, &second.kick);
            started_tx.send(()).expect("report");
            kicked.expect("the second frontend's start succeeds once the first stops the queue");
            second.vu.set_vring_enable(0, true).expect("enable");
            second
        });
        let early = started_rx.recv_timeout(std::time::Duration::from_millis(300));
        assert!(early.is_err(), "the second start waited for the first frontend");
        let base1 = first.vu.get_vring_base(0).expect("GET_VRING_BASE on the first");
        eprintln!("first frontend's GET_VRING_BASE: {base1}");
        assert_eq!(base1, u32::from(base), "the base is where the ring stopped");
        waiting.join().expect("second frontend thread")
    });
    assert_eq!(second.read(&mem2, &mut ring, 32, BACK + 0x10000, 8192), (8193, S_OK), "served on the same ring");
    assert_eq!(mem2.read(BACK + 0x10000, 8192), pattern(8192, 4));
    assert_eq!(mem1.read(BACK + 0x10000, 8192), pattern(8192, 4), "the same RAM, seen by the first mapping");
    assert_eq!(mem2.read(BACK, 8192), pattern(8192, 4), "the first frontend's read is in the second's view");
    let started: Vec<u32> = daemon.status().frontends.iter().map(|f| f.started_queues).collect();
    assert_eq!(started, [0, 1]);

    let base2 = second.vu.get_vring_base(0).expect("GET_VRING_BASE on the second");
    eprintln!("second frontend's GET_VRING_BASE: {base2}");
    assert_eq!(base2, u32::from(base) + 1);
    drop(first);
    wait_until("the first frontend is gone", || daemon.status().frontends.len() == 1);
    assert_eq!(daemon.region().mapped_by, 1);
    assert!(daemon.alive());
}

#[test]
fn reconnect_after_a_frontend_vanishes_mid_run() {
    let mut daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    mem.write(DATA, &pattern(4096, 5));
    assert_eq!(fe.write(&mem, &mut ring, 64, DATA, 4096), (1, S_OK));
    assert_eq!(fe.read(&mem, &mut ring, 64, BACK, 4096), (4097, S_OK), "the device writes RAM");
    // One more request, kicked but not waited for, then the frontend and
    // its mapping vanish: the request completes exactly once, before or after.
    ring.push(&mem, &[header(&mem, T_IN, 64), Desc::w(BACK + 0x10000, 4096), status()]);
    fe.kick.write(1).expect("kick");
    drop(fe);
    drop(mem);
    wait_until("the frontend is gone and queue 0 released", || {
        daemon.status().frontends.is_empty() && !daemon.device().queues[0].started
    });
    assert_eq!(daemon.region().mapped_by, 0);

    // A new frontend maps the RAM afresh (at a new address), sees what the
    // device wrote for the old one, and resumes the ring from RAM. It
    // negotiates EVENT_IDX: completions must still be notified.
    let mut fe = daemon.frontend();
    fe.event_idx = true;
    fe.handshake(VhostUserProtocolFeatures::empty());
    let mem = daemon.map_ram();
    assert_eq!(mem.read(BACK, 4096), pattern(4096, 5), "RAM outlives the frontend");
    fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE");
    let ring = Ring::resume(&mem, RING, QUEUE_SIZE);
    let used = ring.used_idx_in_ram(&mem);
    assert!(ring.avail_idx() - used <= 1, "avail {} used {used}", ring.avail_idx());
    fe.start_queue(&mem, &ring, used).expect("start queue 0 from the used index");
    wait_until("the pending request completes", || ring.used_idx_in_ram(&mem) == ring.avail_idx());
    assert_eq!(mem.read(BACK + 0x10000, 4096), pattern(4096, 5));
    let mut ring = Ring::resume(&mem, RING, QUEUE_SIZE);
    assert_eq!(fe.write(&mem, &mut ring, 128, BACK, 4096), (1, S_OK), "write back what frontend 1's read put in RAM");
    assert_eq!(daemon.disk_bytes(128 * 512, 4096), pattern(4096, 5));
    for sector in [0, 8, 16] {
        assert_eq!(fe.read(&mem, &mut ring, sector, DATA, 4096), (4097, S_OK), "EVENT_IDX completion notified");
    }
    assert_eq!(daemon.device().requests, 7);
    assert_eq!(fe.vu.get_vring_base(0).expect("GET_VRING_BASE"), 7);
    assert!(daemon.alive());
}

/// Chains that loop or whose `next` leaves the table are cut short by
/// virtio-queue without an error; gmemd must not run what is left as a valid
/// request (QEMU calls both a broken device: "Looped descriptor", "Desc next
/// is N"), but fail it with IOERR.
#[test]
fn looping_or_truncated_chains_are_errors() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    // header -> data (513 bytes) -> status (511 bytes) -> back to data: cut
    // after 256 descriptors, whose writable bytes add up to 255 sectors + 1.
    header(&mem, T_IN, 0);
    let (h, d, s) = (ring.take_desc(), ring.take_desc(), ring.take_desc());
    Ring::write_desc(&mem, ring.table(), h, HDR, 16, F_NEXT, d);
    Ring::write_desc(&mem, ring.table(), d, DATA, 513, F_NEXT | F_WRITE, s);
    Ring::write_desc(&mem, ring.table(), s, BACK, 511, F_NEXT | F_WRITE, d);
    ring.publish(&mem, h);
    fe.complete(&mem, &mut ring, h);
    // header -> data -> status whose `next` is past the table.
    header(&mem, T_IN, 0);
    let (h, d, s) = (ring.take_desc(), ring.take_desc(), ring.take_desc());
    Ring::write_desc(&mem, ring.table(), h, HDR, 16, F_NEXT, d);
    Ring::write_desc(&mem, ring.table(), d, DATA, 512, F_NEXT | F_WRITE, s);
    Ring::write_desc(&mem, ring.table(), s, STATUS, 1, F_NEXT | F_WRITE, QUEUE_SIZE + 1);
    ring.publish(&mem, h);
    assert_eq!(fe.complete(&mem, &mut ring, h), (1, S_IOERR), "next past the table");
    assert_eq!(daemon.device().errors, 2, "the looping chain failed too");
}

/// A control client that never reads its events must not hold up the daemon:
/// events are delivered by a thread of their own, so frontends connecting
/// (each announced as an event) are served at once while that client's
/// socket buffer is full.
#[test]
fn a_control_client_that_does_not_read_delays_no_frontend() {
    let daemon = Gmemd::start(&[]);
    let _stuck = UnixStream::connect(&daemon.control).expect("control connection that is never read");
    let mut slowest = std::time::Duration::ZERO;
    // A few hundred events fill the stuck client's socket buffer.
    for _ in 0..400 {
        let started = std::time::Instant::now();
        let fe = daemon.frontend();
        fe.vu.get_features().expect("GET_FEATURES");
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("slowest connect + GET_FEATURES: {slowest:?}");
    assert!(slowest < std::time::Duration::from_secs(2), "a frontend waited {slowest:?} for a control client");
}

/// A driver that keeps adding requests while the device drains the ring:
/// gmemd read the available index twice, and when an entry was added in
/// between it took the ring for corrupt and stopped the queue (found by
/// the protocol fuzzer; it hung a guest's disk under load).
#[test]
fn a_ring_filled_while_it_drains_keeps_running() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let (mut completed, mut pushed) = (0u16, 0u32);
    // Up to 64 requests in flight, kicked one by one, for 50000 requests.
    while pushed < 50_000 || completed != ring.avail_idx() {
        while ring.avail_idx().wrapping_sub(completed) < 64 && pushed < 50_000 {
            ring.push(&mem, &[header(&mem, T_FLUSH, 0), status()]);
            fe.kick.write(1).expect("kick");
            pushed += 1;
        }
        assert!(
            common::ring::wait_readable(&fe.call, TIMEOUT),
            "no completion after {completed}: {:?}",
            daemon.device().queues[0]
        );
        let _ = fe.call.read();
        completed = ring.used_idx_in_ram(&mem);
    }
    assert_eq!(daemon.device().requests, 50_000);
    assert!(!daemon.device().queues[0].broken);
}

/// A buffer that runs past the end of the guest-physical address space:
/// the device put the status byte at the wrapped-around address, in guest
/// RAM outside every buffer of the chain (found by fuzz/desc_chain).
#[test]
fn a_buffer_that_wraps_the_address_space_writes_nothing() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    mem.write(0, &[0xcc; 64]);
    let wrapping = Desc::w(0xffff_ffff_ffff_fff0, 0x20);
    let head = ring.push(&mem, &[header(&mem, T_IN, 0), wrapping]);
    let (len, _) = fe.complete(&mem, &mut ring, head);
    assert_eq!(len, 0, "nothing was written");
    assert_eq!(mem.read(0, 64), vec![0xcc; 64], "guest RAM at the wrapped-around address is untouched");
    assert_eq!(fe.read(&mem, &mut ring, 0, DATA, 512), (513, S_OK), "the queue goes on");
}

/// A cpr-transfer's new QEMU sends RESET_DEVICE on its own connection while
/// the old QEMU still runs the guest: only the new connection's (not yet
/// started) rings are reset, and the old connection's queue keeps running.
#[test]
fn reset_device_on_a_second_connection_leaves_the_first_ones_queue_running() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let data = pattern(KIB64 as usize, 4);
    mem.write(DATA, &data);
    assert_eq!(fe.write(&mem, &mut ring, 0, DATA, KIB64), (1, S_OK));

    let mut second = daemon.frontend();
    second.handshake(VhostUserProtocolFeatures::RESET_DEVICE);
    second.set_table(&[mem.whole()]).expect("the second connection's table");
    second.vu.reset_device().expect("RESET_DEVICE");
    second.vu.reset_device().expect("RESET_DEVICE again, as QEMU 11 sends it");

    assert!(daemon.device().queues[0].started, "the first connection's queue stopped");
    assert_eq!(fe.read(&mem, &mut ring, 0, BACK, KIB64), (KIB64 + 1, S_OK));
    assert_eq!(mem.read(BACK, KIB64 as usize), data);
}

/// Both disk engines serve the same requests, with and without polling;
/// `query-device` says which engine runs.
#[test]
fn both_disk_engines_serve_and_say_which_runs() {
    let cases = [(&[][..], "io_uring"), (&["--aio", "sync"][..], "sync"), (&["--poll-us", "50"][..], "io_uring")];
    for (args, engine) in cases {
        let daemon = Gmemd::start(args);
        let (fe, mem, mut ring) = ready_frontend(&daemon);
        let data = pattern(KIB64 as usize, 7);
        mem.write(DATA, &data);
        assert_eq!(fe.write(&mem, &mut ring, 8, DATA, KIB64), (1, S_OK));
        assert_eq!(fe.read(&mem, &mut ring, 8, BACK, KIB64), (KIB64 + 1, S_OK));
        assert_eq!(mem.read(BACK, KIB64 as usize), data, "{engine}");
        let device = daemon.device();
        assert_eq!((device.aio.as_str(), device.aio_fallback), (engine, None));
    }
}
