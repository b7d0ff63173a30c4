//! Private/shared conversion of guest RAM against the real daemon: what
//! turns private the device never touches, its content is discarded either
//! way, a ring that turns private stops its queue, and every conversion is
//! announced.

mod common;

use std::time::Duration;

use common::ring::wait_readable;
use common::*;
use gmem_protocol::{
    ClientError, Command, ErrorClass, EventKind, ExtentInfo, MemoryAttributesInfo, QueryMemoryAttributesArgs,
    SetMemoryAttributesArgs,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The range converted: 64 KiB at 4 MiB.
const PRIVATE: u64 = 0x40_0000;
const LEN: u32 = 64 << 10;

fn set(daemon: &Gmemd, offset: u64, size: u64, private: bool) -> Result<serde_json::Value, ClientError> {
    let args = SetMemoryAttributesArgs { region: daemon.region().id, offset, size, private, wait_ms: None };
    daemon.ctl().execute(&Command::SetMemoryAttributes(args))
}

fn extents(daemon: &Gmemd) -> Vec<ExtentInfo> {
    let args = QueryMemoryAttributesArgs { region: daemon.region().id };
    daemon.ctl().execute::<MemoryAttributesInfo>(&Command::QueryMemoryAttributes(args)).expect("query").extents
}

#[test]
fn private_memory_is_never_touched_and_its_content_does_not_cross_a_conversion() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let mut events = daemon.ctl();
    mem.write(PRIVATE, &pattern(LEN as usize, 3));
    set(&daemon, PRIVATE, u64::from(LEN), true).expect("to private");
    assert_eq!(mem.read(PRIVATE, LEN as usize), vec![0; LEN as usize], "the shared content was not discarded");
    let size = daemon.region().size;
    assert_eq!(
        extents(&daemon),
        [
            ExtentInfo { offset: 0, size: PRIVATE, private: false },
            ExtentInfo { offset: PRIVATE, size: u64::from(LEN), private: true },
            ExtentInfo { offset: PRIVATE + u64::from(LEN), size: size - PRIVATE - u64::from(LEN), private: false },
        ]
    );
    // What the guest keeps there (written through our own mapping, as a
    // guest would): the device neither overwrites it nor reads it out.
    mem.write(PRIVATE, &vec![0xc3; LEN as usize]);
    std::fs::write(&daemon.disk, vec![0x11; DISK_SIZE as usize]).expect("disk");
    assert_eq!(fe.read(&mem, &mut ring, 0, PRIVATE, LEN), (1, S_IOERR), "a read into private memory");
    assert_eq!(fe.write(&mem, &mut ring, 0, PRIVATE, LEN), (1, S_IOERR), "a write from private memory");
    // Half in, half out: refused whole, nothing moved.
    assert_eq!(fe.read(&mem, &mut ring, 0, PRIVATE - 4096, 8192).1, S_IOERR);
    assert_eq!(mem.read(PRIVATE - 4096, 4096), vec![0; 4096], "the shared half was written");
    assert_eq!(mem.read(PRIVATE, LEN as usize), vec![0xc3; LEN as usize], "the device touched private memory");
    assert_eq!(daemon.disk_bytes(0, LEN as usize), vec![0x11; LEN as usize], "private memory reached the disk");

    set(&daemon, PRIVATE, u64::from(LEN), false).expect("to shared");
    assert_eq!(mem.read(PRIVATE, LEN as usize), vec![0; LEN as usize], "private content became shared");
    assert_eq!(fe.read(&mem, &mut ring, 0, PRIVATE, LEN), (LEN + 1, S_OK));
    assert_eq!(mem.read(PRIVATE, LEN as usize), vec![0x11; LEN as usize]);
    assert_eq!(extents(&daemon), [ExtentInfo { offset: 0, size, private: false }]);

    let mut seen = Vec::new();
    while let Some(event) = events.next_event(Duration::from_secs(1)).expect("events") {
        if event.event == EventKind::MemoryAttributesChanged {
            seen.push(event.data["private"].as_bool());
        }
    }
    assert_eq!(seen, [Some(true), Some(false)]);
}

#[test]
fn conversions_outside_the_rules_are_refused() {
    let daemon = Gmemd::start(&[]);
    let size = daemon.region().size;
    for (offset, len) in [(100, 4096), (0, 100), (0, 0), (size, 4096), (u64::MAX - 4095, 4096)] {
        match set(&daemon, offset, len, true) {
            Err(ClientError::Command(error)) => assert_eq!(error.class, ErrorClass::InvalidArguments, "{error:?}"),
            other => panic!("[{offset:#x}, +{len:#x}) converted: {other:?}"),
        }
    }
    let args = SetMemoryAttributesArgs { region: "nope".into(), offset: 0, size: 4096, private: true, wait_ms: None };
    assert!(daemon.ctl().execute::<serde_json::Value>(&Command::SetMemoryAttributes(args)).is_err());
    assert_eq!(extents(&daemon).len(), 1, "a refused conversion changed the map");
}

#[test]
fn a_ring_that_turns_private_stops_its_queue() {
    let mut daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    fe.vu.set_vring_err(0, &err).expect("SET_VRING_ERR");
    assert_eq!(fe.read(&mem, &mut ring, 0, 0x10_0000, 512), (513, S_OK));
    // The ring's descriptor table's page; the worker is idle, so it holds
    // no reference there now.
    set(&daemon, RING, 4096, true).expect("the idle ring's page goes private");
    ring.push(&mem, &[header(&mem, T_IN, 0), Desc::w(0x10_0000, 512), status()]);
    fe.kick.write(1).expect("kick");
    assert!(wait_readable(&err, TIMEOUT), "the ring's error eventfd is signalled");
    assert!(daemon.device().queues[0].broken, "query-device says the queue stopped");
    assert!(daemon.log().contains("is private memory"), "{}", daemon.log());
    drop(fe);
    assert!(daemon.alive(), "gmemd goes on");
}

/// The protocol under load: four queues read the disk into buffers spread
/// over a range while another thread converts chunks of that range to
/// private and back. Each chunk that went private is filled with a canary
/// right away (the guest's private data); when it is made shared again the
/// canary must be whole: no device write landed in a range after its
/// conversion returned.
#[test]
fn conversions_under_four_queues_of_io_never_let_a_device_write_into_private_memory() {
    const QUEUES: u16 = 4;
    const AREA: u64 = 0x100_0000; // 16 MiB in
    const CHUNK: u64 = 64 << 10;
    const CHUNKS: u64 = 64; // 4 MiB of buffers
    let daemon = Gmemd::start(&["--queues", "4"]);
    std::fs::write(&daemon.disk, vec![0x77; DISK_SIZE as usize]).expect("disk");
    let socket = std::os::unix::net::UnixStream::connect(&daemon.socket).expect("connect");
    let mut fe = Fe::connect_queues(socket, u64::from(QUEUES));
    fe.handshake(vhost::vhost_user::VhostUserProtocolFeatures::empty());
    let mem = std::sync::Arc::new(daemon.map_ram());
    fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE");
    let mut queues = Vec::new();
    for q in 0..QUEUES {
        let ring = Ring::create(&mem, 0x2_0000 + u64::from(q) * 0x4000, 64);
        let (kick, call) = (EventFd::new(EFD_NONBLOCK).expect("kick"), EventFd::new(EFD_NONBLOCK).expect("call"));
        let index = usize::from(q);
        fe.vu.set_vring_num(index, ring.size()).expect("num");
        fe.vu.set_vring_base(index, 0).expect("base");
        fe.vu.set_vring_addr(index, &ring.config(&mem)).expect("addr");
        fe.vu.set_vring_call(index, &call).expect("call");
        fe.vu.set_vring_kick(index, &kick).expect("kick");
        fe.vu.set_vring_enable(index, true).expect("enable");
        queues.push((q, ring, kick));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = queues
        .into_iter()
        .map(|(q, mut ring, kick)| {
            let (mem, stop) = (std::sync::Arc::clone(&mem), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let (hdr, status) = (0x4_0000 + u64::from(q) * 0x100, 0x4_8000 + u64::from(q));
                let (mut ok, mut refused, mut i) = (0u64, 0u64, u64::from(q));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let buf = AREA + (i * 7919 % CHUNKS) * CHUNK + (i % 16) * 4096;
                    mem.put(hdr, T_IN.to_le());
                    mem.put(hdr + 4, 0u32);
                    mem.put(hdr + 8, 0u64);
                    mem.put(status, 0xffu8);
                    ring.push(&mem, &[Desc::r(hdr, 16), Desc::w(buf, 4096), Desc::w(status, 1)]);
                    let target = ring.avail_idx();
                    kick.write(1).expect("kick");
                    while ring.used_idx_in_ram(&mem) != target {
                        std::thread::yield_now();
                    }
                    match mem.get::<u8>(status) {
                        S_OK => ok += 1,
                        _ => refused += 1,
                    }
                    i += 1;
                }
                (ok, refused)
            })
        })
        .collect();

    let mut control = daemon.ctl();
    let region = daemon.region().id;
    let set = |control: &mut gmem_protocol::ControlClient, chunk: u64, private: bool| {
        let args = SetMemoryAttributesArgs {
            region: region.clone(),
            offset: AREA + chunk * CHUNK,
            size: CHUNK,
            private,
            wait_ms: None,
        };
        control.execute::<serde_json::Value>(&Command::SetMemoryAttributes(args))
    };
    let (mut converted, mut busy) = (0u32, 0u32);
    let mut latencies = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let mut n = 0u64;
    while std::time::Instant::now() < deadline {
        let chunk = n * 31 % CHUNKS;
        n += 1;
        let asked = std::time::Instant::now();
        match set(&mut control, chunk, true) {
            Ok(_) => {
                latencies.push(asked.elapsed());
                converted += 1;
                let at = AREA + chunk * CHUNK;
                mem.write(at, &vec![0xc3; CHUNK as usize]);
                std::thread::sleep(Duration::from_micros(500));
                let now = mem.read(at, CHUNK as usize);
                if let Some(bad) = now.iter().position(|b| *b != 0xc3) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    panic!("the device wrote {:#x} into private memory after its conversion", at + bad as u64);
                }
                set(&mut control, chunk, false).expect("back to shared");
            }
            Err(ClientError::Command(error)) if error.class == ErrorClass::Again => busy += 1,
            Err(error) => panic!("conversion failed otherwise: {error}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut refused) = (0, 0);
    for worker in workers {
        let (o, r) = worker.join().expect("queue thread");
        ok += o;
        refused += r;
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)));
    eprintln!(
        "{converted} conversions (control round trip p50 {:?}, p99 {:?}), {busy} EAGAIN; requests: {ok} ok, {refused} \
         refused (private)",
        at(0.5),
        at(0.99)
    );
    assert!(converted > 50 && ok > 1000 && refused > 0, "too little happened to prove anything");
}
