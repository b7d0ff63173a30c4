//! Migration at the vhost-user level, against the real `gmemd` binary: the
//! test is the frontend and plays QEMU's part — it shares a dirty log for
//! precopy, and for postcopy it takes gmemd's userfaultfd, reads the device's
//! faults from it and resolves them as QEMU does (place the page through its
//! own mapping, then UFFDIO_WAKE on gmemd's fd).

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use gmem_protocol::MigrationState;
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_ior_nr;

/// Where request data goes: pages nobody has touched (missing in postcopy).
const BUF: u64 = 0x40_0000;
const OTHER: u64 = 0x80_0000;
/// Queue 1's ring, request header and status byte.
const RING1: u64 = 0x1_0000;
const HDR1: u64 = 0xa000;
const STATUS1: u64 = 0xb000;
const PAGE: u64 = 4096;

fn bit(log: &[u8], gpa: u64) -> bool {
    let page = gpa / PAGE;
    log[(page / 8) as usize] & (1 << (page % 8)) != 0
}

fn read_log(file: &File, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, 0).expect("read the log");
    out
}

#[test]
fn dirty_log_marks_every_page_the_device_writes_while_logging_is_on() {
    let daemon = Gmemd::start(&[]);
    let mut fe = daemon.frontend();
    let features = fe.handshake(VhostUserProtocolFeatures::LOG_SHMFD);
    assert_ne!(fe.vu.get_features().expect("features") & VhostUserVirtioFeatures::LOG_ALL.bits(), 0, "LOG_ALL offered");
    let mem = daemon.map_ram();
    fe.set_table(&[mem.whole()]).expect("table");
    let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
    fe.start_queue(&mem, &ring, 0).expect("start");
    let disk_data = pattern(8192, 7);
    mem.write(BUF, &disk_data);
    assert_eq!(fe.write(&mem, &mut ring, 0, BUF, 8192).1, S_OK);

    // One bit per 4 KiB page of the 64 MiB of RAM.
    let log_len = (64 * MIB / PAGE / 8) as usize;
    let log = sealed_memfd(c"dirty-log", log_len as u64);
    let region = VhostUserDirtyLogRegion { mmap_size: log_len as u64, mmap_offset: 0, mmap_handle: log.as_raw_fd() };
    fe.vu.set_log_base(0, Some(region)).expect("SET_LOG_BASE");
    // Logging is still off: a read into guest RAM marks nothing.
    assert_eq!(fe.read(&mem, &mut ring, 0, OTHER, 4096).1, S_OK);
    assert!(read_log(&log, log_len).iter().all(|b| *b == 0), "marks before LOG_ALL");

    fe.vu.set_features(features | VhostUserVirtioFeatures::LOG_ALL.bits()).expect("LOG_ALL on");
    let info = daemon.ctl().query_migration().expect("query-migration");
    assert_eq!(info.state, MigrationState::DirtyLogging);
    assert!(info.dirty_log.active);
    // Disk → guest across two pages, and guest → disk from another page.
    assert_eq!(fe.read(&mem, &mut ring, 0, BUF + PAGE / 2, 8192).1, S_OK);
    assert_eq!(mem.read(BUF + PAGE / 2, 8192), disk_data);
    assert_eq!(fe.write(&mem, &mut ring, 64, OTHER + 16 * PAGE, 4096).1, S_OK);
    let bits = read_log(&log, log_len);
    for (gpa, what) in [
        (BUF, "data, first page"),
        (BUF + PAGE, "data, second page"),
        (BUF + 2 * PAGE, "data, third page"),
        (STATUS, "status byte"),
        (ring.config(&mem).used_ring_addr - mem.va(0), "used ring"),
    ] {
        assert!(bit(&bits, gpa), "{what} at {gpa:#x} not marked");
    }
    assert!(!bit(&bits, OTHER + 16 * PAGE), "a page the device only read was marked");
    assert!(!bit(&bits, HDR), "the request header (read by the device) was marked");
    let info = daemon.ctl().query_migration().expect("query-migration");
    assert!(info.dirty_log.pages_marked >= 5, "{info:?}");
    assert_eq!(info.device_bytes_written, 8192 + 2, "data plus two status bytes: {info:?}");

    fe.vu.set_features(features).expect("LOG_ALL off");
    let log_before = read_log(&log, log_len);
    assert_eq!(fe.read(&mem, &mut ring, 0, OTHER + 32 * PAGE, 4096).1, S_OK);
    assert_eq!(read_log(&log, log_len), log_before, "marks after logging went off");
    assert_eq!(daemon.ctl().query_migration().expect("query").state, MigrationState::None);
}

/// QEMU's side of a postcopy fault: the messages gmemd's threads raise on the
/// userfaultfd, and the wake-up once the page is in place.
struct FaultService {
    uffd: File,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

ioctl_ior_nr!(UFFDIO_WAKE, 0xAA, 0x02, UffdioRange);

impl FaultService {
    /// The address of the next missing-page fault, waiting up to `timeout`.
    fn next_fault(&self, timeout: Duration) -> Option<u64> {
        if !common::ring::wait_readable(&self.uffd, timeout) {
            return None;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into `msg`.
        let n = unsafe { libc::read(self.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        assert_eq!(n, 32, "one uffd_msg: {}", std::io::Error::last_os_error());
        // struct uffd_msg: event (u8) at 0; pagefault.address at 16.
        assert_eq!(msg[0], 0x12, "UFFD_EVENT_PAGEFAULT");
        Some(u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes")))
    }

    /// Wakes gmemd's threads waiting on the page at `addr`.
    fn wake(&self, addr: u64) {
        let range = UffdioRange { start: addr & !(PAGE - 1), len: PAGE };
        // SAFETY: UFFDIO_WAKE reads one uffdio_range.
        let ret = unsafe { ioctl_with_ref(&self.uffd, UFFDIO_WAKE(), &range) };
        assert_eq!(ret, 0, "UFFDIO_WAKE: {}", std::io::Error::last_os_error());
    }
}

const POSTCOPY: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::PAGEFAULT.union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);

/// The VmFlags of gmemd's mapping at `addr` (/proc/PID/smaps): `um` is a
/// userfaultfd missing-mode registration, `nh` MADV_NOHUGEPAGE, `hg` MADV_HUGEPAGE.
fn vm_flags(pid: u32, addr: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
            let (start, end) = range.split_once('-').expect("range");
            let (start, end) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16));
            inside = matches!((start, end), (Ok(s), Ok(e)) if (s..e).contains(&addr));
        } else if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
            return flags.split_whitespace().map(str::to_string).collect();
        }
    }
    panic!("no mapping at {addr:#x} in gmemd");
}

/// Queue 1 on its own ring, kick and call, to show it runs while queue 0
/// waits on a page.
fn start_queue_1(fe: &mut Fe, mem: &GuestMem, ring: &Ring, kick: &EventFd, call: &EventFd) {
    fe.vu.set_vring_num(1, ring.size()).expect("num");
    fe.vu.set_vring_base(1, 0).expect("base");
    fe.vu.set_vring_addr(1, &ring.config(mem)).expect("addr");
    fe.vu.set_vring_call(1, call).expect("call");
    fe.vu.set_vring_kick(1, kick).expect("kick");
    fe.vu.set_vring_enable(1, true).expect("enable");
}

#[test]
fn postcopy_registers_after_the_fdless_add_mem_reg_ack_faults_and_ends() {
    let daemon = Gmemd::start(&["--queues", "2"]);
    let mut fe = daemon.frontend();
    fe.handshake(POSTCOPY);
    let mem = daemon.map_ram();
    // What precopy delivered before the switch: the ring and request pages.
    let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
    let mut ring1 = Ring::create(&mem, RING1, QUEUE_SIZE);
    header(&mem, T_IN, 0);
    mem.write(HDR1, &[0u8; 16]); // T_IN, sector 0
    mem.put(STATUS1, 0xffu8);
    let disk = pattern(4096, 3);
    std::fs::write(&daemon.disk, [disk.clone(), vec![0; (DISK_SIZE - 4096) as usize]].concat()).expect("disk");

    let uffd = fe.vu.postcopy_advise().expect("POSTCOPY_ADVISE gives a userfaultfd");
    let service = FaultService { uffd };
    assert_eq!(daemon.ctl().query_migration().expect("query").state, MigrationState::PostcopyAdvised);
    fe.vu.postcopy_listen().expect("POSTCOPY_LISTEN");
    let base = fe.vu.add_mem_region(&mem.whole()).expect("ADD_MEM_REG").expect("gmemd's base in the reply");
    // Before the ack, a vring must not start.
    let early = fe.start_queue(&mem, &ring, 0);
    assert!(early.is_err(), "a vring started before the registration");
    // The ack: ADD_MEM_REG with a u64 0 and no fd (libvhost-user dies here).
    fe.vu.postcopy_ack_mem_regions(FrontendReq::ADD_MEM_REG).expect("ack");
    wait_until("guest RAM is registered", || {
        daemon.ctl().query_migration().expect("query").state == MigrationState::PostcopyRunning
    });
    assert_eq!(daemon.ctl().query_migration().expect("query").postcopy.registered_bytes, 64 * MIB);
    let flags = vm_flags(daemon.pid(), base);
    assert!(flags.iter().any(|f| f == "um") && flags.iter().any(|f| f == "nh"), "registered, THP off: {flags:?}");
    fe.start_queue(&mem, &ring, 0).expect("start after the ack");
    let (kick1, call1) = (EventFd::new(EFD_NONBLOCK).expect("kick"), EventFd::new(EFD_NONBLOCK).expect("call"));
    start_queue_1(&mut fe, &mem, &ring1, &kick1, &call1);

    // A read into a page that has not arrived: the worker faults on it.
    assert!(!mem.resident(BUF));
    let head = ring.push(&mem, &[Desc::r(HDR, 16), Desc::w(BUF, 4096), status()]);
    fe.kick.write(1).expect("kick");
    let fault = service.next_fault(TIMEOUT).expect("the device faulted on the missing page");
    assert_eq!(fault & !(PAGE - 1), base + BUF, "fault address is gmemd's own mapping of BUF");
    // While that worker waits, the control socket and the message loop answer.
    let info = daemon.ctl().query_migration().expect("query-migration during a fault");
    assert_eq!(info.postcopy.device_faults, 0, "not resolved yet");
    fe.vu.get_features().expect("message loop answers during a fault");
    // Another queue serves a request into a page that has arrived.
    mem.write(OTHER, &[0u8; 512]);
    ring1.push(&mem, &[Desc::r(HDR1, 16), Desc::w(OTHER, 512), Desc::w(STATUS1, 1)]);
    kick1.write(1).expect("kick queue 1");
    ring1.wait_used(&mem, &call1, TIMEOUT).expect("queue 1 served while queue 0 waits");
    assert_eq!((mem.get::<u8>(STATUS1), mem.read(OTHER, 512)), (S_OK, disk[..512].to_vec()));
    assert!(ring.wait_used(&mem, &fe.call, Duration::from_millis(100)).is_none(), "completed before the page arrived");
    // QEMU places the page (here: arrived content through our own,
    // unregistered mapping) and wakes gmemd; the worker has been waiting
    // through the 100 ms above.
    mem.write(BUF, &vec![0x5a; 4096]);
    service.wake(fault);
    let (id, _) = ring.wait_used(&mem, &fe.call, TIMEOUT).expect("completed after the wake");
    assert_eq!(id, u32::from(head));
    assert_eq!(mem.get::<u8>(STATUS), S_OK);
    assert_eq!(mem.read(BUF, 4096), disk, "the device's read landed on the placed page");
    let info = daemon.ctl().query_migration().expect("query");
    assert_eq!(info.postcopy.device_faults, 1, "{info:?}");
    assert!(info.postcopy.fault_latency.p50_us >= 20_000, "the wait is in the latency: {info:?}");
    assert_eq!(info.device_bytes_written, (4096 + 1) + (512 + 1), "both queues' data and status");
    // gmemd touched nothing else: pages no request named are still missing.
    for gpa in [OTHER + PAGE, BUF + PAGE, 32 * MIB] {
        assert!(!mem.resident(gpa), "gmemd populated {gpa:#x} behind QEMU's back");
    }

    fe.vu.postcopy_end().expect("POSTCOPY_END");
    let info = daemon.ctl().query_migration().expect("query");
    assert_eq!((info.state, info.postcopy.registered_bytes), (MigrationState::PostcopyEnded, 0));
    let flags = vm_flags(daemon.pid(), base);
    assert!(!flags.iter().any(|f| f == "um" || f == "nh"), "unregistered, THP policy back: {flags:?}");
    // Unregistered: a missing page is now just a hole, read without a fault.
    assert_eq!(fe.read(&mem, &mut ring, 0, OTHER + 2 * PAGE, 4096).1, S_OK);
    assert!(service.next_fault(Duration::from_millis(50)).is_none());
}

#[test]
fn an_advised_postcopy_that_completed_in_precopy_lets_the_device_run() {
    // QEMU sends ADVISE whenever postcopy-ram is on, but LISTEN and END only
    // if it really switches to postcopy.
    let daemon = Gmemd::start(&[]);
    let mut fe = daemon.frontend();
    fe.handshake(POSTCOPY);
    let _uffd = fe.vu.postcopy_advise().expect("advise");
    let mem = daemon.map_ram();
    fe.set_table(&[mem.whole()]).expect("table");
    let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
    fe.start_queue(&mem, &ring, 0).expect("the guest runs: the device starts");
    assert_eq!(fe.read(&mem, &mut ring, 0, BUF, 512).1, S_OK);
    assert_eq!(daemon.ctl().query_migration().expect("query").state, MigrationState::None);
    // And the next migration may use postcopy again.
    let mut next = daemon.frontend();
    next.handshake(POSTCOPY);
    next.vu.postcopy_advise().expect("a later postcopy");
}

#[test]
fn postcopy_with_set_mem_table_replies_with_gmemd_bases() {
    let daemon = Gmemd::start(&[]);
    assert_eq!(daemon.ctl().query_migration().expect("query").postcopy.unavailable, None, "root may use userfaultfd");
    let mut fe = daemon.frontend();
    fe.handshake(VhostUserProtocolFeatures::PAGEFAULT);
    let mem = daemon.map_ram();
    let _uffd = fe.vu.postcopy_advise().expect("advise");
    fe.vu.postcopy_listen().expect("listen");
    // Two ranges of the region, as QEMU splits RAM around the PCI hole.
    let bases = fe.vu.set_mem_table(&[mem.range(0, 16 * MIB), mem.range(32 * MIB, 16 * MIB)]).expect("table");
    let bases = bases.expect("bases in the reply");
    assert_eq!(bases[1] - bases[0], 32 * MIB, "both bases are in gmemd's one mapping of the region");
    assert_ne!(bases[0], mem.va(0), "gmemd's address, not ours");
    fe.vu.postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE).expect("ack");
    wait_until("registered", || daemon.ctl().query_migration().expect("query").postcopy.registered_bytes == 32 * MIB);
    fe.vu.postcopy_end().expect("end");
    assert_eq!(daemon.ctl().query_migration().expect("query").postcopy.registered_bytes, 0);
}

/// A message the vhost crate refuses in this state closes only this
/// connection; a new one is served.
fn assert_connection_dropped_and_daemon_serves(daemon: &mut Gmemd, mut fe: Fe, what: &str) {
    assert_closed_by_daemon(&mut fe.stream);
    assert!(daemon.alive(), "gmemd died on {what}");
    let (fe, mem, mut ring) = ready_frontend(daemon);
    assert_eq!(fe.read(&mem, &mut ring, 0, BUF, 512).1, S_OK, "served after {what}");
}

#[test]
fn out_of_order_and_repeated_postcopy_messages_are_refused() {
    let mut daemon = Gmemd::start(&[]);

    let mut fe = daemon.frontend();
    fe.handshake(POSTCOPY);
    assert!(fe.vu.postcopy_listen().is_err(), "LISTEN before ADVISE");
    assert_connection_dropped_and_daemon_serves(&mut daemon, fe, "LISTEN before ADVISE");

    let mut fe = daemon.frontend();
    fe.handshake(POSTCOPY);
    assert!(fe.vu.postcopy_end().is_err(), "END before LISTEN");
    assert_connection_dropped_and_daemon_serves(&mut daemon, fe, "END before ADVISE");

    let mut fe = daemon.frontend();
    fe.handshake(POSTCOPY);
    let _uffd = fe.vu.postcopy_advise().expect("advise");
    // A second frontend cannot start a postcopy on the same RAM meanwhile.
    let mut other = daemon.frontend();
    other.handshake(POSTCOPY);
    assert!(other.vu.postcopy_advise().is_err(), "a second concurrent postcopy");
    assert!(daemon.log().contains("is in postcopy on the same guest RAM"), "{}", daemon.log());
    drop(other);
    // The fd-less ack while not listening is not an ack but a malformed ADD_MEM_REG.
    assert!(fe.vu.postcopy_advise().is_err(), "ADVISE twice");
    assert_connection_dropped_and_daemon_serves(&mut daemon, fe, "a repeated ADVISE");

    // The dropped connection released its claim: a new postcopy may start.
    let mut fe = daemon.frontend();
    fe.handshake(POSTCOPY);
    fe.vu.postcopy_advise().expect("advise after the earlier frontend went away");
}

#[test]
fn unprivileged_gmemd_does_not_offer_postcopy_and_says_why() {
    // SAFETY: getuid has no preconditions.
    assert_eq!(unsafe { libc::getuid() }, 0, "this test starts gmemd as another user, which needs root");
    let mut daemon = Gmemd::start_as(Some(65534), &[]);
    let why = "postcopy needs gmemd to run as root, with CAP_SYS_PTRACE";
    let log = daemon.log();
    assert!(log.contains("postcopy migration unavailable, so not offered to QEMU") && log.contains(why), "{log}");

    // PAGEFAULT is not offered, so QEMU refuses postcopy-ram up front.
    let mut fe = daemon.frontend();
    fe.handshake(VhostUserProtocolFeatures::empty());
    let offered = fe.vu.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(!offered.contains(VhostUserProtocolFeatures::PAGEFAULT), "{offered:?}");

    // A frontend that acks it anyway is told why, and the features it asked
    // for are not in effect: an ADVISE after that breaks the protocol and
    // ends only that connection.
    let protocol = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ | POSTCOPY;
    assert!(fe.vu.set_protocol_features(protocol).is_err(), "PAGEFAULT acked although not offered");
    let log = daemon.log();
    assert!(log.contains("were not offered (postcopy: cannot create a userfaultfd"), "{log}");
    fe.vu.postcopy_advise().expect_err("no userfaultfd for an unprivileged gmemd");
    assert_closed_by_daemon(&mut fe.stream);
    assert!(daemon.log().contains("POSTCOPY_ADVISE needs protocol feature"), "{}", daemon.log());
    let mut fe = daemon.frontend();
    fe.handshake(VhostUserProtocolFeatures::empty());
    let info = daemon.ctl().query_migration().expect("query");
    assert_eq!(info.state, MigrationState::None);
    assert!(info.postcopy.unavailable.as_deref().is_some_and(|r| r.contains(why)), "{info:?}");
    let mem = daemon.map_ram();
    fe.set_table(&[mem.whole()]).expect("table");
    let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
    fe.start_queue(&mem, &ring, 0).expect("start");
    assert_eq!(fe.read(&mem, &mut ring, 0, BUF, 512).1, S_OK);
    assert!(daemon.alive());
}

/// The reference protocol of private/shared conversion, deterministically:
/// a request waiting for a postcopy page holds a reference on its buffer,
/// so a conversion of that range fails with EAGAIN naming the offset, also
/// after waiting; a range nobody references converts; once the request is
/// done, its range converts too.
#[test]
fn a_request_in_flight_holds_its_buffer_against_conversion() {
    let daemon = Gmemd::start(&[]);
    let mut fe = daemon.frontend();
    fe.handshake(POSTCOPY);
    let mem = daemon.map_ram();
    let mut ring = Ring::create(&mem, RING, QUEUE_SIZE);
    header(&mem, T_IN, 0);
    let uffd = fe.vu.postcopy_advise().expect("advise");
    let service = FaultService { uffd };
    fe.vu.postcopy_listen().expect("listen");
    fe.vu.add_mem_region(&mem.whole()).expect("ADD_MEM_REG");
    fe.vu.postcopy_ack_mem_regions(FrontendReq::ADD_MEM_REG).expect("ack");
    fe.start_queue(&mem, &ring, 0).expect("start");
    let head = ring.push(&mem, &[Desc::r(HDR, 16), Desc::w(BUF, 4096), status()]);
    fe.kick.write(1).expect("kick");
    let fault = service.next_fault(TIMEOUT).expect("the device waits on the missing page");

    let region = daemon.region().id;
    let convert = |offset: u64, wait_ms: Option<u64>| {
        daemon.ctl().execute::<serde_json::Value>(&gmem_protocol::Command::SetMemoryAttributes(
            gmem_protocol::SetMemoryAttributesArgs {
                region: region.clone(),
                offset,
                size: PAGE,
                private: true,
                wait_ms,
            },
        ))
    };
    for wait_ms in [None, Some(200)] {
        match convert(BUF, wait_ms) {
            Err(gmem_protocol::ClientError::Command(error)) => {
                assert_eq!(
                    (error.class, error.error_offset),
                    (gmem_protocol::ErrorClass::Again, Some(BUF)),
                    "{error:?}"
                )
            }
            other => panic!("a range a request holds went private (wait {wait_ms:?}): {other:?}"),
        }
    }
    convert(OTHER, None).expect("a range nobody references converts");

    mem.write(BUF, &vec![0x5a; 4096]);
    service.wake(fault);
    let (id, _) = ring.wait_used(&mem, &fe.call, TIMEOUT).expect("completed after the wake");
    assert_eq!((id, mem.get::<u8>(STATUS)), (u32::from(head), S_OK));
    convert(BUF, None).expect("the request is done: its range converts");
}
