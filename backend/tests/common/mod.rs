//! Shared pieces of the protocol tests: the real `gmemd` process, a
//! vhost-user frontend built on the vhost crate, and virtio-blk requests.

#![allow(dead_code)]

pub mod ring;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gmem_protocol::{ControlClient, DeviceInfo, RegionInfo, StatusInfo};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[allow(unused_imports)]
pub use ring::{sealed_memfd, Desc, GuestMem, Ring};

pub const MIB: u64 = 1 << 20;
/// The disk every test daemon serves: 4 MiB of zeroes.
pub const DISK_SIZE: u64 = 4 * MIB;
pub const SERIAL: &str = "gmemd-test-serial";
/// How long any single condition may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(2);

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Where requests keep their header and status byte in guest RAM (one
/// request is in flight at a time), and where the ring lives.
pub const RING: u64 = 0x1000;
pub const QUEUE_SIZE: u16 = 256;
pub const HDR: u64 = 0x8000;
pub const STATUS: u64 = 0x9000;

/// Polls `condition` every few milliseconds until it holds or `TIMEOUT` passes.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `gmemd`, killed on drop; its log is printed if the test fails.
pub struct Gmemd {
    child: Child,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub disk: PathBuf,
    launch: Launch,
    args: Vec<String>,
}

impl Gmemd {
    /// Starts gmemd with 64 MiB of RAM, one queue and a zeroed disk, plus `extra` arguments.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(&Launch::default(), extra)
    }

    /// Like `start`, as user `uid` (no capabilities) when given: the test
    /// must run as root for that.
    pub fn start_as(uid: Option<u32>, extra: &[&str]) -> Self {
        Self::start_with(&Launch { uid, ..Launch::default() }, extra)
    }

    /// Like `start`, the way `launch` says.
    pub fn start_with(launch: &Launch, extra: &[&str]) -> Self {
        let mut daemon = Self::spawn(launch, extra);
        // The control socket is bound after the vhost-user one: once it
        // answers, both are ready.
        wait_until("gmemd answers on its control socket", || {
            assert!(daemon.alive(), "gmemd exited during start-up:\n{}", daemon.log());
            ControlClient::connect(&daemon.control).is_ok()
        });
        daemon
    }

    /// Starts gmemd without waiting for it; the test decides what to wait for.
    pub fn spawn(launch: &Launch, extra: &[&str]) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        if launch.uid.is_some() {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod the test dir");
        }
        let (socket, control, disk) =
            (dir.path().join("vhost.sock"), dir.path().join("control.sock"), dir.path().join("disk.raw"));
        File::create(&disk).and_then(|f| f.set_len(DISK_SIZE)).expect("create the disk");
        if launch.uid.is_some() {
            std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o666)).expect("chmod the disk");
        }
        let mut args: Vec<String> = Vec::new();
        for (flag, path) in [("--socket", &socket), ("--control", &control), ("--disk", &disk)] {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
        args.extend(["--memory", "64M", "--serial", SERIAL].map(String::from));
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let child = Self::command(launch, &args, dir.path());
        Gmemd { child, dir, socket, control, disk, launch: launch.clone(), args }
    }

    /// Runs the gmemd binary with `args`, appending its log to `dir`'s.
    fn command(launch: &Launch, args: &[String], dir: &std::path::Path) -> Child {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("gmemd.log")).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_gmemd"));
        if let Some(uid) = launch.uid {
            command.uid(uid).gid(uid);
        }
        if let Some(nofile) = launch.nofile {
            // SAFETY: setrlimit is async-signal-safe and only changes the
            // child's own limit, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command
            .args(args)
            .env("RUST_LOG", launch.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gmemd")
    }

    /// Kills gmemd with SIGKILL, as a crash would end it.
    pub fn crash(&mut self) {
        self.child.kill().expect("SIGKILL gmemd");
        self.child.wait().expect("reap gmemd");
    }

    /// Starts gmemd again with the same arguments and waits until it answers.
    pub fn restart(&mut self) {
        assert!(!self.alive(), "gmemd still runs");
        self.child = Self::command(&self.launch, &self.args, self.dir.path());
        wait_until("the restarted gmemd answers on its control socket", || {
            assert!(self.alive(), "gmemd exited during start-up:\n{}", self.log());
            ControlClient::connect(&self.control).is_ok()
        });
    }

    /// The scratch directory the daemon's files are in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// CPU time the daemon used so far (user + system).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat.rsplit_once(')').expect("comm").1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// The share of one core the daemon used over `window`.
    pub fn cpu_share_over(&self, window: Duration) -> f64 {
        let before = self.cpu_time();
        std::thread::sleep(window);
        (self.cpu_time() - before).as_secs_f64() / window.as_secs_f64()
    }

    /// (RSS in KiB, threads, open fds) of the daemon now.
    pub fn footprint(&self) -> (u64, u64, usize) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok())
                .expect(name)
        };
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("fds").count();
        (field("VmRSS:"), field("Threads:"), fds)
    }

    /// Bytes the daemon has logged so far.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(self.dir.path().join("gmemd.log")).map_or(0, |m| m.len())
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill with a live child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0, "kill");
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn exited_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gmemd.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn ctl(&self) -> ControlClient {
        ControlClient::connect(&self.control).expect("connect to the control socket")
    }

    pub fn status(&self) -> StatusInfo {
        self.ctl().query_status().expect("query-status")
    }

    pub fn region(&self) -> RegionInfo {
        self.ctl().query_regions().expect("query-regions").remove(0)
    }

    pub fn device(&self) -> DeviceInfo {
        self.ctl().query_device().expect("query-device")
    }

    /// Maps gmemd's first region in the test process, as QEMU would.
    pub fn map_ram(&self) -> GuestMem {
        GuestMem::open(&self.region().fd_path)
    }

    /// `len` bytes of the disk image at `offset`, read on the host.
    pub fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        File::open(&self.disk).and_then(|f| f.read_exact_at(&mut out, offset)).expect("read the disk image");
        out
    }

    /// A frontend connected to the vhost-user socket.
    pub fn frontend(&self) -> Fe {
        Fe::connect(UnixStream::connect(&self.socket).expect("connect to the vhost-user socket"))
    }
}

impl Drop for Gmemd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let mut log = String::new();
            let _ = File::open(self.dir.path().join("gmemd.log")).and_then(|mut f| f.read_to_string(&mut log));
            eprintln!("---- gmemd log ----\n{log}-------------------");
        }
    }
}

/// How to start a test gmemd.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Run as this user (and group), without capabilities.
    pub uid: Option<u32>,
    /// RLIMIT_NOFILE for the daemon.
    pub nofile: Option<u64>,
    /// RUST_LOG.
    pub log_level: &'static str,
}

impl Default for Launch {
    fn default() -> Self {
        Launch { uid: None, nofile: None, log_level: "info" }
    }
}

/// A vhost-user frontend: the vhost crate's `Frontend` asking for an ack on
/// every message (REPLY_ACK), plus the kick and call eventfds of queue 0.
pub struct Fe {
    pub vu: Frontend,
    /// A second handle on the socket, for raw writes.
    pub stream: UnixStream,
    pub kick: EventFd,
    pub call: EventFd,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX in `handshake`.
    pub event_idx: bool,
}

impl Fe {
    pub fn connect(stream: UnixStream) -> Self {
        Self::connect_queues(stream, 2)
    }

    /// A frontend that may drive up to `queues` queues.
    pub fn connect_queues(stream: UnixStream, queues: u64) -> Self {
        let vu = Frontend::from_stream(stream.try_clone().expect("dup socket"), queues);
        vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let eventfd = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
        Fe { vu, stream, kick: eventfd(), call: eventfd(), event_idx: false }
    }

    /// SET_OWNER, features (all offered, EVENT_IDX only if `event_idx`),
    /// protocol features (REPLY_ACK, MQ, CONFIG plus `extra`). Returns the
    /// acked virtio features.
    pub fn handshake(&mut self, extra: VhostUserProtocolFeatures) -> u64 {
        self.vu.set_owner().expect("SET_OWNER");
        let offered = self.vu.get_features().expect("GET_FEATURES");
        assert_ne!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0, "PROTOCOL_FEATURES offered");
        let event_idx = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        assert_ne!(offered & event_idx, 0, "EVENT_IDX offered");
        // LOG_ALL is acked only while migrating, as QEMU does.
        let offered = offered & !VhostUserVirtioFeatures::LOG_ALL.bits();
        let acked = if self.event_idx { offered } else { offered & !event_idx };
        self.vu.set_features(acked).expect("SET_FEATURES");
        let protocol = self.vu.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let wanted = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | extra;
        assert!(protocol.contains(wanted), "offered protocol features {protocol:?} lack {wanted:?}");
        self.vu.set_protocol_features(wanted).expect("SET_PROTOCOL_FEATURES");
        acked
    }

    pub fn set_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> vhost::Result<()> {
        self.vu.set_mem_table(regions).map(drop)
    }

    /// Configures queue 0 on `ring` from `base` and starts it (SET_VRING_KICK
    /// starts the worker), then enables it.
    pub fn start_queue(&mut self, mem: &GuestMem, ring: &Ring, base: u16) -> vhost::Result<()> {
        self.vu.set_vring_num(0, ring.size())?;
        self.vu.set_vring_base(0, base)?;
        self.vu.set_vring_addr(0, &ring.config(mem))?;
        self.vu.set_vring_call(0, &self.call)?;
        self.vu.set_vring_kick(0, &self.kick)?;
        self.vu.set_vring_enable(0, true)
    }

    /// Submits one request, kicks, and waits for its completion. Returns
    /// (used length, status byte at `STATUS`).
    pub fn run(&self, mem: &GuestMem, ring: &mut Ring, descs: &[Desc]) -> (u32, u8) {
        let head = ring.push(mem, descs);
        self.complete(mem, ring, head)
    }

    /// Kicks and waits for the chain headed by `head` to be used.
    pub fn complete(&self, mem: &GuestMem, ring: &mut Ring, head: u16) -> (u32, u8) {
        self.kick.write(1).expect("kick");
        let (id, len) = ring.wait_used(mem, &self.call, TIMEOUT).expect("request completed and notified in time");
        assert_eq!(id, u32::from(head), "used entry names the chain's head");
        (len, mem.get::<u8>(STATUS))
    }

    /// Reads `len` bytes at `sector` into guest RAM at `gpa`.
    pub fn read(&self, mem: &GuestMem, ring: &mut Ring, sector: u64, gpa: u64, len: u32) -> (u32, u8) {
        self.run(mem, ring, &[header(mem, T_IN, sector), Desc::w(gpa, len), status()])
    }

    /// Writes `len` bytes of guest RAM at `gpa` to `sector`.
    pub fn write(&self, mem: &GuestMem, ring: &mut Ring, sector: u64, gpa: u64, len: u32) -> (u32, u8) {
        self.run(mem, ring, &[header(mem, T_OUT, sector), Desc::r(gpa, len), status()])
    }
}

/// Writes a request header (type, sector) at `HDR`, resets the status byte
/// to 0xff, and returns the header's descriptor.
pub fn header(mem: &GuestMem, kind: u32, sector: u64) -> Desc {
    mem.put(HDR, kind.to_le());
    mem.put(HDR + 4, 0u32);
    mem.put(HDR + 8, sector.to_le());
    mem.put(STATUS, 0xffu8);
    Desc::r(HDR, 16)
}

/// The status byte's descriptor.
pub fn status() -> Desc {
    Desc::w(STATUS, 1)
}

/// A recognisable, position-dependent pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

/// A fully set-up frontend: handshake, gmemd's region as the table, queue 0
/// running on a fresh ring at `RING`.
pub fn ready_frontend(daemon: &Gmemd) -> (Fe, GuestMem, Ring) {
    let mut fe = daemon.frontend();
    fe.handshake(VhostUserProtocolFeatures::empty());
    let mem = daemon.map_ram();
    fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE");
    let ring = Ring::create(&mem, RING, QUEUE_SIZE);
    fe.start_queue(&mem, &ring, 0).expect("start queue 0");
    (fe, mem, ring)
}

/// Asserts the daemon closes `stream` (EOF or reset) within `TIMEOUT`.
pub fn assert_closed_by_daemon(stream: &mut UnixStream) {
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue, // a reply to something before; keep reading
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("gmemd did not close the connection: {e}"),
        }
    }
}

/// A raw vhost-user message: header (request, flags, size) and body.
pub fn raw_message(request: u32, flags: u32, size: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len());
    for word in [request, flags, size] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(body);
    out
}
