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
