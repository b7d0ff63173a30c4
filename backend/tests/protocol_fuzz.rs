//! A bounded protocol fuzzer against the real gmemd binary (issue 7).
//!
//! Batches of connections send mutated vhost-user message sequences, with
//! real fds of every kind attached (memfds of every size, sealed or not,
//! gmemd's own region, eventfds in every mode, pipes, sockets, /dev/null,
//! /dev/zero, directories, regular files), and scribble over the rings in
//! guest RAM they point gmemd at. After each batch: gmemd is alive, its
//! control socket answers, a well-behaved frontend gets correct reads and
//! writes, and its fd count, thread count and anonymous memory are back to
//! their baseline. At the end an idle connected gmemd uses under 1% of a
//! core.
//!
//! It runs for `GMEMD_FUZZ_SECS` (default 90) from seed `GMEMD_FUZZ_SEED`
//! (default: the time), printed so a failure can be replayed.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost::vhost_user::message::*;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK, EFD_SEMAPHORE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The frontend address the fuzzer's tables give guest address 0, so ring
/// addresses it sends can translate.
const FRONTEND_BASE: u64 = 0x7000_0000_0000;

/// Everything the fuzzer attaches to messages.
struct Palette {
    files: Vec<OwnedFd>,
    /// gmemd's own RAM, mapped here, to scribble rings into.
    ram: GuestMem,
}

impl Palette {
    fn new(daemon: &Gmemd) -> Self {
        let mut files: Vec<OwnedFd> = Vec::new();
        let memfd = |size: u64, flags: libc::c_uint, seals: libc::c_int| {
            // SAFETY: a valid name; a new fd that is ours.
            let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC | flags) };
            assert!(fd >= 0);
            // SAFETY: fresh fd.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(size).expect("size");
            if seals != 0 {
                // SAFETY: F_ADD_SEALS on our own memfd.
                unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) };
            }
            OwnedFd::from(file)
        };
        for size in [0, 4096, 65536, MIB, 16 * MIB, 64 * MIB, 128 * MIB] {
            files.push(memfd(size, libc::MFD_ALLOW_SEALING, 0));
            files.push(memfd(
                size,
                libc::MFD_ALLOW_SEALING,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            ));
            files.push(memfd(size, 0, 0));
        }
        let ram = daemon.map_ram();
        let region = std::fs::OpenOptions::new().read(true).write(true).open(daemon.region().fd_path).expect("region");
        files.push(OwnedFd::from(region));
        for flags in [0, EFD_NONBLOCK, EFD_SEMAPHORE, EFD_SEMAPHORE | EFD_NONBLOCK] {
            let eventfd = EventFd::new(flags).expect("eventfd");
            // SAFETY: into_raw_fd hands the fd over.
            files.push(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(eventfd)) });
        }
        let full = EventFd::new(0).expect("eventfd");
        full.write(0xffff_ffff_ffff_fffe).expect("fill");
        // SAFETY: as above.
        files.push(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(full)) });
        let (reader, writer) = std::io::pipe().expect("pipe");
        files.push(reader.into());
        files.push(writer.into());
        let (reader, writer) = std::io::pipe().expect("pipe");
        files.push(reader.into());
        drop(writer);
        let (a, b) = UnixStream::pair().expect("pair");
        files.push(a.into());
        files.push(b.into());
        for path in ["/dev/null", "/dev/zero", "/", "/proc/self/status"] {
            files.push(File::open(path).expect(path).into());
        }
        let regular = tempfile::tempfile().expect("tmp");
        regular.set_len(MIB).expect("size");
        files.push(regular.into());
        Palette { files, ram }
    }

    fn pick(&self, rng: &mut StdRng) -> RawFd {
        self.files[rng.gen_range(0..self.files.len())].as_raw_fd()
    }
}

fn plausible_addr(rng: &mut StdRng) -> u64 {
    match rng.gen_range(0..4) {
        0 => FRONTEND_BASE + u64::from(rng.gen_range(0u32..16)) * 0x1000,
        1 => FRONTEND_BASE + rng.gen_range(0..64 * MIB),
        2 => rng.gen(),
        _ => u64::from(rng.gen_range(0u32..64)) * 0x1000,
    }
}

fn region(rng: &mut StdRng) -> VhostUserMemoryRegion {
    let size = match rng.gen_range(0..4) {
        0 => 64 * MIB,
        1 => u64::from(rng.gen_range(1u32..64)) * MIB,
        2 => rng.gen_range(0..u64::MAX),
        _ => rng.gen_range(1..8192),
    };
    let gpa = if rng.gen_bool(0.7) { 0 } else { rng.gen() };
    let offset = if rng.gen_bool(0.7) { 0 } else { rng.gen_range(0..128 * MIB) };
    VhostUserMemoryRegion::new(gpa, size, FRONTEND_BASE.wrapping_add(gpa), offset)
}

/// One message: bytes, and how many palette fds to attach.
fn message(rng: &mut StdRng) -> (Vec<u8>, usize) {
    let request: u32 = if rng.gen_bool(0.95) { rng.gen_range(1..=44) } else { rng.gen() };
    let index = if rng.gen_bool(0.8) { rng.gen_range(0..3) } else { rng.gen() };
    let body: Vec<u8> = match FrontendReq::try_from(request) {
        Ok(FrontendReq::SET_FEATURES | FrontendReq::SET_PROTOCOL_FEATURES) => {
            let value: u64 = if rng.gen_bool(0.5) { (1 << 30) | (1 << 32) | 0x1ffff } else { rng.gen() };
            value.to_ne_bytes().to_vec()
        }
        Ok(FrontendReq::SET_VRING_KICK | FrontendReq::SET_VRING_CALL | FrontendReq::SET_VRING_ERR) => {
            let value = u64::from(index & 0xff) | if rng.gen_bool(0.2) { 0x100 } else { 0 };
            value.to_ne_bytes().to_vec()
        }
        Ok(FrontendReq::SET_VRING_NUM | FrontendReq::SET_VRING_BASE | FrontendReq::GET_VRING_BASE)
        | Ok(FrontendReq::SET_VRING_ENABLE) => {
            let num = if rng.gen_bool(0.6) { 1u32 << rng.gen_range(0..11) } else { rng.gen() };
            VhostUserVringState::new(index, num).as_slice().to_vec()
        }
        Ok(FrontendReq::SET_VRING_ADDR) => {
            let base = plausible_addr(rng) & !0xfff;
            let flags =
                if rng.gen_bool(0.9) { VhostUserVringAddrFlags::empty() } else { VhostUserVringAddrFlags::all() };
            VhostUserVringAddr::new(index, flags, base, base + 0x2000, base + 0x1000, 0).as_slice().to_vec()
        }
        Ok(FrontendReq::SET_MEM_TABLE) => {
            let count = rng.gen_range(0..10u32);
            let mut bytes = VhostUserMemory::new(count).as_slice().to_vec();
            for _ in 0..count {
                bytes.extend_from_slice(region(rng).as_slice());
            }
            bytes
        }
        Ok(FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG) => {
            let r = region(rng);
            VhostUserSingleMemoryRegion::new(r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset)
                .as_slice()
                .to_vec()
        }
        Ok(FrontendReq::SET_LOG_BASE) => {
            let size = if rng.gen_bool(0.5) { 2048 } else { rng.gen() };
            VhostUserLog::new(size, if rng.gen_bool(0.8) { 0 } else { rng.gen() }).as_slice().to_vec()
        }
        Ok(FrontendReq::GET_INFLIGHT_FD | FrontendReq::SET_INFLIGHT_FD) => {
            let (queues, size) = if rng.gen_bool(0.6) { (1, 256) } else { (rng.gen(), rng.gen()) };
            let mmap = if rng.gen_bool(0.5) { 4160 } else { rng.gen() };
            VhostUserInflight::new(mmap, 0, queues, size).as_slice().to_vec()
        }
        Ok(FrontendReq::GET_CONFIG | FrontendReq::SET_CONFIG) => {
            let size = rng.gen_range(0..300u32);
            let mut bytes =
                VhostUserConfig::new(rng.gen_range(0..300), size, VhostUserConfigFlags::empty()).as_slice().to_vec();
            bytes.extend(std::iter::repeat_n(0u8, size as usize));
            bytes
        }
        _ => (0..rng.gen_range(0..24)).map(|_| rng.gen()).collect(),
    };
    let mut body = body;
    // Mutations: truncate, extend, flip.
    match rng.gen_range(0..10) {
        0 if !body.is_empty() => body.truncate(rng.gen_range(0..body.len())),
        1 => body.extend((0..rng.gen_range(1..16)).map(|_| rng.gen::<u8>())),
        2 if !body.is_empty() => {
            let at = rng.gen_range(0..body.len());
            body[at] ^= 1 << rng.gen_range(0..8);
        }
        _ => {}
    }
    let flags: u32 = match rng.gen_range(0..10) {
        0 => rng.gen(),
        1..=5 => 1 | 8,
        _ => 1,
    };
    let size = if rng.gen_bool(0.97) { body.len() as u32 } else { rng.gen() };
    let fds = match FrontendReq::try_from(request) {
        Ok(FrontendReq::SET_MEM_TABLE) if body.len() >= 8 => {
            u32::from_ne_bytes(body[..4].try_into().expect("4")).min(9) as usize + rng.gen_range(0..2)
        }
        _ if rng.gen_bool(0.6) => rng.gen_range(0..2),
        _ => rng.gen_range(0..12),
    };
    (raw_message(request, flags, size, &body), fds)
}

/// Writes random bytes over the first pages of guest RAM, where the
/// fuzzer's ring addresses point.
fn scribble(rng: &mut StdRng, ram: &GuestMem) {
    for _ in 0..rng.gen_range(0..8) {
        let at = u64::from(rng.gen_range(0u32..16 * 4096));
        let bytes: Vec<u8> = (0..rng.gen_range(1..64)).map(|_| rng.gen()).collect();
        ram.write(at, &bytes);
    }
}

fn one_connection(daemon: &Gmemd, palette: &Palette, rng: &mut StdRng) {
    let Ok(stream) = UnixStream::connect(&daemon.socket) else { return };
    stream.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
    let mut sink = [0u8; 4096];
    for _ in 0..rng.gen_range(1..40) {
        let (bytes, fd_count) = message(rng);
        let fds: Vec<RawFd> = (0..fd_count).map(|_| palette.pick(rng)).collect();
        if stream.send_with_fds(&[&bytes[..]], &fds).is_err() {
            return;
        }
        if rng.gen_bool(0.3) {
            scribble(rng, &palette.ram);
        }
        // Take what gmemd answered, without waiting for answers it owes
        // none: this is not a frontend that follows the protocol.
        if let Ok(0) = (&stream).read(&mut sink) {
            return;
        }
    }
}

fn anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status.lines().find_map(|l| l.strip_prefix("RssAnon:")?.split_whitespace().next()?.parse().ok()).expect("RssAnon")
}

/// Waits up to 10 s for the daemon's fds and threads to come back to the
/// baseline (connections wind down asynchronously).
fn settles(daemon: &Gmemd, baseline: (u64, u64, usize)) -> (u64, u64, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = daemon.footprint();
        if (now.1 <= baseline.1 && now.2 <= baseline.2) || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fuzzed_message_sequences_neither_kill_nor_wedge_nor_leak() {
    let seconds: u64 = std::env::var("GMEMD_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(90);
    let seed: u64 = std::env::var("GMEMD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs());
    eprintln!("protocol fuzzer: GMEMD_FUZZ_SEED={seed} GMEMD_FUZZ_SECS={seconds}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut daemon = Gmemd::start(&["--allow-foreign-memory", "--queues", "2", "--postcopy-orphan-timeout", "1"]);
    let palette = Palette::new(&daemon);
    // The baseline is taken with the queues' workers and a well-behaved
    // frontend having run once.
    let check = |daemon: &mut Gmemd, sector: u64| {
        wait_until("the fuzzed connections are gone", || daemon.status().frontends.is_empty());
        let (fe, mem, mut ring) = ready_frontend(daemon);
        let data = pattern(8192, sector as u8);
        mem.write(0x100_0000, &data);
        assert_eq!(fe.write(&mem, &mut ring, sector, 0x100_0000, 8192), (1, S_OK), "a well-behaved write");
        mem.write(0x100_0000, &[0u8; 8192]);
        assert_eq!(fe.read(&mem, &mut ring, sector, 0x100_0000, 8192), (8193, S_OK), "a well-behaved read");
        assert_eq!(mem.read(0x100_0000, 8192), data);
        assert_eq!(daemon.disk_bytes(sector * 512, 8192), data);
    };
    check(&mut daemon, 0);
    let baseline = settles(&daemon, daemon.footprint());
    let anon_baseline = anon_kib(daemon.pid());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut batches, mut connections) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..20 {
            one_connection(&daemon, &palette, &mut rng);
            connections += 1;
        }
        batches += 1;
        assert!(daemon.alive(), "gmemd died in batch {batches} (seed {seed}):\n{}", daemon.log());
        check(&mut daemon, 8 * (batches % 64));
        let now = settles(&daemon, baseline);
        assert!(
            now.1 <= baseline.1 && now.2 <= baseline.2,
            "after batch {batches} (seed {seed}): threads {} fds {} vs baseline threads {} fds {}",
            now.1,
            now.2,
            baseline.1,
            baseline.2
        );
        let anon = anon_kib(daemon.pid());
        assert!(
            anon < anon_baseline + 16 * 1024,
            "after batch {batches}: anonymous memory {anon} KiB, baseline {anon_baseline}"
        );
    }
    // Idle, with a frontend connected and its queue started: no spin.
    let (_fe, _mem, _ring) = ready_frontend(&daemon);
    let share = daemon.cpu_share_over(Duration::from_secs(2));
    eprintln!("protocol fuzzer: {batches} batches, {connections} connections; idle CPU {:.2}%", share * 100.0);
    assert!(share < 0.01, "an idle gmemd used {:.1}% of a core", share * 100.0);
}
