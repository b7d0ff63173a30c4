//! The generated command line against the real QEMU on this machine.
//!
//! The test process plays gmemd's RAM owner: it holds unlinked tmpfs files
//! (what a memfd is) and hands QEMU `/proc/<our pid>/fd/<n>`. The vhost-user
//! backend is qemu-storage-daemon serving a null disk. Tests print a note and
//! pass when either binary is missing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use gmem_protocol::RegionInfo;
use gmem_qemu::{Output, ProcessError, QemuCommand, QemuProcess, SerialSink, SpawnOptions};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Fails the test, rather than passing it unrun, without `binary`: the
/// README's test command (scripts/test) installs it.
fn need(binary: &str) {
    let found = Command::new(binary).arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(found, "{binary} is needed; scripts/setup-host installs it");
}

/// A guest RAM region owned by this process, as gmemd would report it.
fn owned_region(id: &str, size: u64) -> (File, RegionInfo) {
    let file = tempfile::tempfile_in("/dev/shm").expect("tmpfs file");
    file.set_len(size).expect("ftruncate");
    let region = RegionInfo {
        id: id.into(),
        size,
        fd_path: format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()),
        backing: "memfd".into(),
        populated_bytes: 0,
        mapped_by: 0,
        awaiting_adoption: false,
    };
    (file, region)
}

/// qemu-storage-daemon exporting a null disk as vhost-user-blk; killed on drop.
struct StorageDaemon(Child);

impl StorageDaemon {
    fn start(socket: &Path, queues: u16) -> Self {
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},num-queues={queues},writable=on",
            socket.display()
        );
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", "driver=null-co,node-name=disk0,size=67108864", "--export", &export])
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no vhost-user socket");
            sleep(Duration::from_millis(10));
        }
        StorageDaemon(child)
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU with its output in `dir/qemu.log`, so a failure can show it.
fn spawn(cmd: &QemuCommand, dir: &Path) -> QemuProcess {
    let options =
        SpawnOptions { stdout: Output::Null, stderr: Output::File(dir.join("qemu.log")), ..SpawnOptions::default() };
    QemuProcess::spawn_with(cmd, &options).expect("spawn QEMU")
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
}

fn paused_command(regions: &[RegionInfo], vhost: PathBuf, dir: &Path) -> QemuCommand {
    QemuCommand::new(regions, vhost, 2)
        .expect("valid command")
        .serial(SerialSink::None)
        .qmp(dir.join("qmp.sock"))
        .reconnect_ms(100)
        .extra_args(["-S"])
}

/// Reads 8 bytes of guest-physical memory through the human monitor.
fn guest_u64(qmp: &mut gmem_qemu::QmpClient, address: u64) -> String {
    let line = format!("xp /1xg {address:#x}");
    let out = qmp.execute("human-monitor-command", json!({ "command-line": line })).expect("xp");
    out.as_str().unwrap_or_default().trim().to_owned()
}

#[test]
fn guest_ram_is_the_owners_memory_and_dimms_plug() {
    need("qemu-system-x86_64");
    need("qemu-storage-daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let (main_file, main) = owned_region("ram0", 64 * MIB);
    let (dimm_file, dimm) = owned_region("ram1", 32 * MIB);
    let vhost = dir.path().join("vhost.sock");
    let _backend = StorageDaemon::start(&vhost, 2);
    let cmd = paused_command(&[main, dimm], vhost, dir.path());
    let mut qemu = spawn(&cmd, dir.path());
    let mut qmp = qemu.qmp().unwrap_or_else(|e| panic!("{e}\n{}", log_of(dir.path())));
    assert_eq!(qmp.query_status().expect("status"), "prelaunch");

    let memdevs = qmp.execute("query-memdev", Value::Null).expect("query-memdev");
    let mut seen: Vec<(String, u64, bool)> = memdevs
        .as_array()
        .expect("array")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or("").into(), m["size"].as_u64().unwrap_or(0), m["share"] == true))
        .collect();
    seen.sort();
    assert_eq!(seen, [("ram0".into(), 64 * MIB, true), ("ram1".into(), 32 * MIB, true)]);

    let devices = qmp.execute("query-memory-devices", Value::Null).expect("devices");
    let dimm_info = &devices[0]["data"];
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
    assert_eq!((dimm_info["id"].as_str(), dimm_info["memdev"].as_str()), (Some("dimm-ram1"), Some("/objects/ram1")));
    let dimm_address = dimm_info["addr"].as_u64().expect("dimm address");

    // What the owner writes, the guest sees: both regions are mapped shared.
    main_file.write_at(&0x1122_3344_5566_7788_u64.to_le_bytes(), 8 * MIB).expect("write");
    dimm_file.write_at(&0x0102_0304_0506_0708_u64.to_le_bytes(), 0).expect("write");
    assert!(guest_u64(&mut qmp, 8 * MIB).ends_with("0x1122334455667788"));
    assert!(guest_u64(&mut qmp, dimm_address).ends_with("0x0102030405060708"));

    let pci = qmp.execute("query-pci", Value::Null).expect("query-pci");
    let virtio = pci[0]["devices"].as_array().expect("devices").iter().filter(|d| d["id"]["vendor"] == 0x1af4).count();
    assert_eq!(virtio, 1, "one virtio device (the vhost-user-blk): {pci}");

    qmp.execute("cont", Value::Null).expect("cont");
    assert_eq!(qmp.query_status().expect("status"), "running");
    qmp.quit().expect("quit");
    let status = qemu.wait_timeout(Duration::from_secs(10)).expect("wait");
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", log_of(dir.path()));
}

#[test]
fn qemu_waits_for_a_late_vhost_user_backend() {
    need("qemu-system-x86_64");
    need("qemu-storage-daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ram, main) = owned_region("ram0", 32 * MIB);
    let vhost = dir.path().join("vhost.sock");
    let cmd = paused_command(&[main], vhost.clone(), dir.path());
    let mut qemu = spawn(&cmd, dir.path());
    // With reconnect-ms, QEMU keeps retrying inside device realize instead
    // of exiting; its QMP monitor does not answer commands meanwhile.
    assert_eq!(qemu.wait_timeout(Duration::from_millis(1500)).expect("wait"), None);
    let _backend = StorageDaemon::start(&vhost, 2);
    let mut qmp = qemu.qmp().unwrap_or_else(|e| panic!("{e}\n{}", log_of(dir.path())));
    assert_eq!(qmp.query_status().expect("status"), "prelaunch");
    qmp.quit().expect("quit");
    assert!(qemu.wait_timeout(Duration::from_secs(10)).expect("wait").is_some());
}

#[test]
fn an_early_exit_is_reported_instead_of_a_qmp_timeout() {
    need("qemu-system-x86_64");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ram, main) = owned_region("ram0", 32 * MIB);
    let cmd = paused_command(&[main], dir.path().join("vhost.sock"), dir.path()).extra_args(["-no-such-option"]);
    let mut qemu = spawn(&cmd, dir.path());
    let started = Instant::now();
    match qemu.qmp() {
        Err(ProcessError::ExitedEarly(status)) => assert!(!status.success()),
        other => panic!("expected ExitedEarly, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(log_of(dir.path()).contains("no-such-option"));
}
