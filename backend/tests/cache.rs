//! `--cache` as QEMU names the modes, checked against the page cache itself:
//! after a write completes, cachestat(2) on the image says whether its pages
//! are cached, and whether they are dirty (not yet durable).

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;

use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

const DATA: u64 = 0x10_0000;
const LEN: u32 = 64 << 10;
/// Where the writes go on the disk: sector 2048, 1 MiB in.
const SECTOR: u64 = 2048;

/// Pages of `file` in `[offset, offset + len)` that are in the page cache,
/// and how many of those are dirty (cachestat(2), Linux 6.5).
fn cachestat(file: &File, offset: u64, len: u64) -> (u64, u64) {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads one range and writes one stat struct, both
    // laid out as the kernel's and alive for the call.
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range, &mut stat, 0) };
    assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
    (stat.nr_cache, stat.nr_dirty + stat.nr_writeback)
}

/// A daemon with `--cache mode`, a ready frontend, and one 64 KiB write
/// done; returns what cachestat says of the written range after it.
fn write_once(extra: &[&str]) -> (Gmemd, Fe, GuestMem, Ring, (u64, u64)) {
    let daemon = Gmemd::start(extra);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    mem.write(DATA, &pattern(LEN as usize, 1));
    assert_eq!(fe.write(&mem, &mut ring, SECTOR, DATA, LEN), (1, S_OK));
    let image = File::open(&daemon.disk).expect("the image");
    let stat = cachestat(&image, SECTOR * 512, u64::from(LEN));
    (daemon, fe, mem, ring, stat)
}

#[test]
fn writeback_leaves_writes_dirty_until_flush() {
    let (daemon, fe, mem, mut ring, (cached, dirty)) = write_once(&["--cache", "writeback"]);
    assert!(cached > 0 && dirty > 0, "cached {cached}, dirty {dirty}: the write should wait in the page cache");
    assert_eq!(fe.run(&mem, &mut ring, &[header(&mem, T_FLUSH, 0), status()]), (1, S_OK));
    let image = File::open(&daemon.disk).expect("the image");
    assert_eq!(cachestat(&image, SECTOR * 512, u64::from(LEN)).1, 0, "FLUSH left dirty pages");
    assert!(daemon.device().write_cache);
}

#[test]
fn writethrough_makes_each_write_durable() {
    let (daemon, _fe, _mem, _ring, (cached, dirty)) = write_once(&["--cache", "writethrough"]);
    assert!(cached > 0, "writethrough goes through the page cache");
    assert_eq!(dirty, 0, "a completed writethrough write left dirty pages");
    assert!(!daemon.device().write_cache);
}

#[test]
fn none_and_directsync_bypass_the_page_cache() {
    for mode in ["none", "directsync"] {
        let (daemon, fe, mem, mut ring, (cached, dirty)) = write_once(&["--cache", mode]);
        assert_eq!((cached, dirty), (0, 0), "--cache {mode}: the aligned write went through the page cache");
        assert_eq!(daemon.device().cache, mode);
        // A buffer O_DIRECT cannot take (one byte off alignment) goes
        // through the page cache instead, and still arrives.
        mem.write(DATA + 1, &pattern(4096, 9));
        assert_eq!(fe.write(&mem, &mut ring, 0, DATA + 1, 4096), (1, S_OK));
        assert_eq!(daemon.disk_bytes(0, 4096), pattern(4096, 9), "--cache {mode}");
        let image = File::open(&daemon.disk).expect("the image");
        let (cached, dirty) = cachestat(&image, 0, 4096);
        assert!(cached > 0, "--cache {mode}: the unaligned write was not buffered");
        if mode == "directsync" {
            assert_eq!(dirty, 0, "a completed directsync write left dirty pages");
        }
    }
}

#[test]
fn the_guest_turns_the_write_cache_off_and_on() {
    let (daemon, mut fe, mem, mut ring, _) = write_once(&["--cache", "writeback"]);
    let wce = 32;
    let read_wce =
        |fe: &mut Fe| fe.vu.get_config(wce, 1, VhostUserConfigFlags::WRITABLE, &[0]).expect("GET_CONFIG").1[0];
    assert_eq!(read_wce(&mut fe), 1);
    fe.vu.set_config(wce, VhostUserConfigFlags::WRITABLE, &[0]).expect("SET_CONFIG wce=0");
    assert_eq!(read_wce(&mut fe), 0);
    assert!(!daemon.device().write_cache);
    mem.write(DATA, &pattern(LEN as usize, 2));
    assert_eq!(fe.write(&mem, &mut ring, SECTOR + 1024, DATA, LEN), (1, S_OK));
    let image = File::open(&daemon.disk).expect("the image");
    assert_eq!(cachestat(&image, (SECTOR + 1024) * 512, u64::from(LEN)).1, 0, "write cache off, yet dirty");
    fe.vu.set_config(wce, VhostUserConfigFlags::WRITABLE, &[1]).expect("SET_CONFIG wce=1");
    assert!(daemon.device().write_cache);
    // Nothing else in the config space is writable.
    assert!(fe.vu.set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8]).is_err(), "capacity written");
}
