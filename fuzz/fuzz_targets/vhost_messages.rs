//! gmemd's vhost-user message handling, in process: the input is a
//! sequence of messages, each with fds picked from a palette (memfds of
//! several sizes, sealed or not, gmemd's own region, eventfds in every
//! mode, pipes, sockets, /dev/null, a directory, a file). They go through a
//! socket pair to a connection served by the real dispatch loop until the
//! fuzzer's end closes; nothing may panic, and the daemon must still serve
//! the next input.
//!
//! Postcopy messages are left out: a registration nobody serves makes a
//! worker wait for a page by design (the real-binary protocol fuzzer and
//! tests/hardening.rs cover how gmemd bounds that).

#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gmemd::blk::aio::AioKind;
use gmemd::blk::{BlkDevice, CacheMode, DeviceOptions};
use gmemd::daemon::{Daemon, DaemonOptions, FrontendStatus};
use gmemd::memory::{Backing, RegionSet, RegionSpec};
use gmemd::peers::PeerPolicy;
use gmemd::pins::Pins;
use gmemd::vhost::{serve_connection, FrontendConnection};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK, EFD_SEMAPHORE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

struct World {
    daemon: Arc<Daemon>,
    palette: Vec<OwnedFd>,
    _disk: tempfile::NamedTempFile,
}

fn memfd(size: u64, flags: libc::c_uint, seals: libc::c_int) -> OwnedFd {
    // SAFETY: a valid name; the fd returned is new and ours.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC | flags) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).expect("size");
    if seals != 0 {
        // SAFETY: F_ADD_SEALS on our own memfd.
        unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) };
    }
    file.into()
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let regions = RegionSet::create(vec![RegionSpec {
            id: "ram0".into(),
            size: 16 << 20,
            backing: Backing::Memfd,
            lock: false,
            owner: None,
        }])
        .expect("ram");
        let own = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(regions.iter().next().expect("region").fd_path())
            .expect("open");
        let disk = tempfile::NamedTempFile::new().expect("disk");
        disk.as_file().set_len(1 << 20).expect("size");
        let device = BlkDevice::new(&DeviceOptions {
            disk: disk.path().to_path_buf(),
            readonly: false,
            queues: 2,
            serial: "fuzz".into(),
            cache: CacheMode::Writeback,
            aio: AioKind::IoUring,
        })
        .expect("device");
        let options = DaemonOptions {
            vhost_socket: "/nonexistent".into(),
            allow_foreign_memory: true,
            frontend_policy: PeerPolicy::own_user(),
            max_frontends: 4,
            postcopy_orphan_timeout: Duration::ZERO,
            queue_claim_patience: Duration::ZERO,
            ring_poll: Duration::ZERO,
            skip_dirty_log_marks: false,
        };
        let daemon = Arc::new(
            Daemon::new(regions, device, options, None, Pins::new("fuzz", gmem_pins::Limit::Unlimited))
                .expect("daemon"),
        );
        let mut palette = vec![OwnedFd::from(own)];
        for size in [0, 4096, 1 << 20, 16 << 20] {
            palette.push(memfd(size, libc::MFD_ALLOW_SEALING, 0));
            palette.push(memfd(size, libc::MFD_ALLOW_SEALING, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW));
            palette.push(memfd(size, 0, 0));
        }
        for flags in [0, EFD_NONBLOCK, EFD_SEMAPHORE] {
            // SAFETY: into_raw_fd hands the fd over.
            palette.push(unsafe { OwnedFd::from_raw_fd(EventFd::new(flags).expect("eventfd").into_raw_fd()) });
        }
        let (reader, writer) = std::io::pipe().expect("pipe");
        palette.push(reader.into());
        palette.push(writer.into());
        let (a, b) = UnixStream::pair().expect("pair");
        palette.push(a.into());
        palette.push(b.into());
        for path in ["/dev/null", "/"] {
            palette.push(std::fs::File::open(path).expect(path).into());
        }
        World { daemon, palette, _disk: disk }
    })
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let id = world.daemon.next_frontend_id();
    let status = Arc::new(FrontendStatus::new(id, None, ours.try_clone().expect("dup")));
    let Some(status) = world.daemon.frontend_connected(status) else { return };
    // gmemd serves its end while this thread sends and another takes the
    // replies, as a frontend and its socket would.
    let serving = std::thread::spawn(move || {
        serve_connection(&world.daemon, FrontendConnection::new(Arc::clone(&world.daemon), status), ours);
        // As gmemd's own connection thread does: the last handle on the
        // socket goes, and the frontend sees it closed.
        world.daemon.frontend_disconnected(id);
    });
    let mut replies = theirs.try_clone().expect("dup");
    let draining = std::thread::spawn(move || std::io::copy(&mut replies, &mut std::io::sink()));
    // Messages: request, flags, fd mask (one bit per palette slot from a
    // window the mask byte's top bits choose), body length, body.
    let mut rest = data;
    while rest.len() >= 4 {
        let (request, flags, mask, len) = (rest[0] % 48 + 1, rest[1], rest[2], usize::from(rest[3]));
        rest = &rest[4..];
        let body = &rest[..len.min(rest.len())];
        rest = &rest[body.len()..];
        let request = match u32::from(request) {
            28..=30 => 1, // postcopy: see the module comment
            other => other,
        };
        let flags = match flags % 4 {
            0 => u32::from(flags),
            1 => 1,
            _ => 1 | 8,
        };
        let mut message = Vec::with_capacity(12 + body.len());
        for word in [request, flags, body.len() as u32] {
            message.extend_from_slice(&word.to_ne_bytes());
        }
        message.extend_from_slice(body);
        let window = usize::from(mask >> 5) * 3;
        let fds: Vec<RawFd> = (0..5)
            .filter(|bit| mask & (1 << bit) != 0)
            .filter_map(|bit| world.palette.get(window + bit).map(AsRawFd::as_raw_fd))
            .collect();
        if theirs.send_with_fds(&[&message[..]], &fds).is_err() {
            break;
        }
    }
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    serving.join().expect("gmemd's side panicked");
    let _ = draining.join();
});
