//! `gmem_qemu::migration` against the real QEMU on this machine: two
//! guestless QEMUs (SeaBIOS finds nothing to boot and idles) migrate over a
//! unix socket, without gmemd, so only the QMP sequences are under test.
//!
//! The source's RAM is a tmpfs file this process holds and fills with a
//! pattern (QEMU maps it through `/proc/<our pid>/fd/<n>`, as it maps
//! gmemd's); the destination's is a fresh memfd. After each migration the
//! destination's copy of the pattern is dumped and compared. Tests print a
//! note and pass when QEMU is missing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gmem_qemu::migration::{
    postcopy_preempt_unavailable, query_capabilities, query_migrate, wait_for_status, PreemptUnavailable, Side,
    POSTCOPY_PREEMPT,
};
use gmem_qemu::{
    prepare_destination, Endpoint, Migration, MigrationError, MigrationOptions, MigrationReport, MigrationStatus,
    Progress, QmpClient, SwitchToPostcopy,
};
use serde_json::json;

const MIB: u64 = 1 << 20;
const RAM: u64 = 128 * MIB;
/// Where the pattern lies in guest RAM: clear of SeaBIOS, which uses the
/// first MiB and the top of RAM.
const PATTERN_AT: u64 = 16 * MIB;
const PATTERN_LEN: u64 = 32 * MIB;

/// QEMU trace events that show the postcopy-preempt connection at work:
/// the destination accepting it, the source sending a requested page on it.
const PREEMPT_TRACE: [&str; 4] =
    ["-trace", "postcopy_preempt_new_channel", "-trace", "postcopy_preempt_send_host_page"];

/// Fails the test, rather than passing it unrun, without QEMU: the README's
/// test command (scripts/test) installs it.
fn need_qemu() {
    let found =
        Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(found, "qemu-system-x86_64 is needed; scripts/setup-host installs it");
}

/// What the source's RAM holds at [`PATTERN_AT`]: distinct 8-byte words.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut bytes = vec![0; PATTERN_LEN as usize];
        for (index, word) in (0u64..).zip(bytes.chunks_exact_mut(8)) {
            let value = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_0000_0000_a5a5;
            word.copy_from_slice(&value.to_le_bytes());
        }
        bytes
    })
}

/// A guestless QEMU; killed on drop.
struct Qemu {
    child: Child,
    qmp_path: PathBuf,
    /// Our QMP connection; QEMU serves one client at a time.
    qmp: Option<QmpClient>,
    log: PathBuf,
}

impl Qemu {
    /// QEMU with `memory_backend` as its RAM (`id=mem`) and `extra` arguments.
    fn start(dir: &Path, name: &str, memory_backend: &str, extra: &[&str]) -> Qemu {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let memory = format!("{memory_backend},id=mem,size={RAM},share=on");
        let qmp_option = format!("unix:{},server=on,wait=off", qmp_path.display());
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35,memory-backend=mem", "-m", "128M"])
            .args(["-object", &memory])
            .args(["-accel", "tcg", "-display", "none", "-nodefaults"])
            .args(["-qmp", &qmp_option])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn QEMU");
        let mut qemu = Qemu { child, qmp_path, qmp: None, log };
        qemu.qmp();
        qemu
    }

    /// Our QMP connection, made anew after [`disconnect`](Self::disconnect).
    fn qmp(&mut self) -> &mut QmpClient {
        let (path, log) = (&self.qmp_path, &self.log);
        self.qmp.get_or_insert_with(|| {
            QmpClient::connect(path, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(log).unwrap_or_default()))
        })
    }

    /// Leaves QMP to another client.
    fn disconnect(&mut self) {
        self.qmp = None;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A source whose RAM holds the pattern, and a destination waiting with
/// `-incoming defer`.
struct Pair {
    dir: tempfile::TempDir,
    _source_ram: File,
    src: Qemu,
    dst: Qemu,
}

impl Pair {
    fn start() -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let ram = tempfile::tempfile_in("/dev/shm").expect("tmpfs file");
        ram.set_len(RAM).expect("ftruncate");
        ram.write_all_at(pattern(), PATTERN_AT).expect("fill");
        let backend = format!("memory-backend-file,mem-path=/proc/{}/fd/{}", std::process::id(), ram.as_raw_fd());
        let src = Qemu::start(dir.path(), "src", &backend, &PREEMPT_TRACE);
        let dst_args = [&["-incoming", "defer"][..], &PREEMPT_TRACE].concat();
        let dst = Qemu::start(dir.path(), "dst", "memory-backend-memfd", &dst_args);
        Pair { dir, _source_ram: ram, src, dst }
    }

    fn uri(&self, name: &str) -> String {
        format!("unix:{}", self.dir.path().join(name).display())
    }

    fn options(&self) -> MigrationOptions {
        let mut options = MigrationOptions::new(self.uri("migration.sock"));
        options.timeout = Duration::from_secs(60);
        options
    }

    /// Postcopy after half a second of precopy at 4 MiB/s, which cannot
    /// send the 32 MiB pattern in that time.
    fn throttled_postcopy_options(&self) -> MigrationOptions {
        let mut options = self.options();
        options.max_bandwidth = Some(4 * MIB);
        options.postcopy = Some(SwitchToPostcopy::After(Duration::from_millis(500)));
        options
    }

    fn wait_result(
        &mut self,
        migration: &mut Migration,
        on_progress: impl FnMut(&Progress),
    ) -> Result<MigrationReport, MigrationError> {
        migration.wait(Endpoint::new(self.src.qmp()), Endpoint::new(self.dst.qmp()), on_progress)
    }

    /// Waits for a migration that must complete; returns the report and
    /// the source statuses seen on the way.
    fn wait(&mut self, migration: &mut Migration) -> (MigrationReport, Vec<MigrationStatus>) {
        let mut seen = Vec::new();
        let report = self
            .wait_result(migration, |progress| {
                if seen.last() != Some(&progress.status) {
                    seen.push(progress.status);
                }
            })
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", self.src.log(), self.dst.log()));
        (report, seen)
    }

    /// Checks that the destination's RAM holds the pattern and that the
    /// source is done with the guest.
    fn assert_guest_moved(&mut self) {
        let dump = self.dir.path().join("dump");
        self.dst
            .qmp()
            .execute("pmemsave", json!({ "val": PATTERN_AT, "size": PATTERN_LEN, "filename": dump }))
            .expect("pmemsave");
        let copied = std::fs::read(&dump).expect("dump");
        assert!(copied == pattern(), "the destination's RAM differs");
        assert_eq!(self.src.qmp().query_status().expect("status"), "postmigrate");
        assert_eq!(self.dst.qmp().query_status().expect("status"), "running");
    }
}

#[test]
fn precopy_moves_the_guest() {
    need_qemu();
    let started = Instant::now();
    let mut pair = Pair::start();
    let options = pair.options();
    prepare_destination(pair.dst.qmp(), &options).expect("prepare destination");
    let mut migration = Migration::start(pair.src.qmp(), &options).expect("start");
    let (report, seen) = pair.wait(&mut migration);

    assert_eq!(seen.last(), Some(&MigrationStatus::Completed), "{seen:?}");
    assert!(!seen.iter().any(|s| s.is_postcopy()), "{seen:?}");
    assert!(!report.postcopy && report.postcopy_switch_ms.is_none());
    assert!(report.ram.transferred >= PATTERN_LEN, "{report:?}");
    assert_eq!(report.ram.postcopy_bytes, 0);
    assert!(report.total_time_ms > 0 && report.total_time_ms <= report.elapsed_ms + 100);
    // Without the postcopy-blocktime capability there is nothing to report.
    assert_eq!(report.postcopy_blocktime_ms, None);
    assert_eq!(report.destination_run_state, "running");
    assert_eq!(report.source_gmemd, None);
    pair.assert_guest_moved();
    eprintln!("precopy: {report:?}, test took {:?}", started.elapsed());
}

#[test]
fn postcopy_finishes_what_a_throttled_precopy_started() {
    need_qemu();
    let started = Instant::now();
    let mut pair = Pair::start();
    let options = pair.throttled_postcopy_options();
    prepare_destination(pair.dst.qmp(), &options).expect("prepare destination");
    let mut migration = Migration::start(pair.src.qmp(), &options).expect("start");
    let (report, seen) = pair.wait(&mut migration);

    assert!(seen.contains(&MigrationStatus::Active), "{seen:?}");
    assert!(report.postcopy, "{report:?} {seen:?}");
    assert!(report.postcopy_switch_ms.is_some_and(|ms| ms >= 500));
    assert!(report.ram.postcopy_bytes > PATTERN_LEN / 2, "{report:?}");
    assert!(report.ram.precopy_bytes < PATTERN_LEN, "{report:?}");
    // The destination measured its vCPUs' waits (the capability is on).
    assert!(report.postcopy_blocktime_ms.is_some(), "{report:?}");
    assert_eq!(report.postcopy_vcpu_blocktime_ms.as_ref().map(Vec::len), Some(1));
    pair.assert_guest_moved();
    eprintln!("postcopy: {report:?}, test took {:?}", started.elapsed());
}

/// With postcopy-preempt the destination accepts a second connection and
/// the source sends each requested page on it, as the request arrives.
#[test]
fn postcopy_preempt_sends_requested_pages_on_their_own_connection() {
    need_qemu();
    let started = Instant::now();
    let mut pair = Pair::start();
    let mut options = pair.throttled_postcopy_options();
    options.postcopy_preempt = true;
    let unavailable = postcopy_preempt_unavailable(pair.src.qmp(), pair.dst.qmp(), &options).expect("probe");
    assert_eq!(unavailable, None, "guestless QEMUs without vhost-user devices");
    prepare_destination(pair.dst.qmp(), &options).expect("prepare destination");
    let on = |qmp: &mut QmpClient, side| query_capabilities(qmp, side).expect("capabilities")[POSTCOPY_PREEMPT];
    assert!(on(pair.dst.qmp(), Side::Destination));
    let mut migration = Migration::start(pair.src.qmp(), &options).expect("start");
    assert!(on(pair.src.qmp(), Side::Source));
    let (report, _) = pair.wait(&mut migration);

    assert!(report.postcopy && report.postcopy_preempt, "{report:?}");
    pair.assert_guest_moved();
    assert!(pair.dst.log().contains("postcopy_preempt_new_channel"), "{}", pair.dst.log());
    let sent = pair.src.log().matches("postcopy_preempt_send_host_page").count();
    assert_eq!(sent as u64, report.ram.postcopy_requests, "{}", pair.src.log());
    eprintln!("postcopy-preempt: {report:?}, {sent} pages sent preempting, test took {:?}", started.elapsed());
}

/// fd: and exec: URIs carry one connection; QEMU refuses postcopy-preempt
/// with them, and the probe says so first.
#[test]
fn postcopy_preempt_needs_a_uri_for_two_connections() {
    need_qemu();
    let mut pair = Pair::start();
    let mut options = pair.options();
    options.postcopy = Some(SwitchToPostcopy::AfterFirstPass);
    options.postcopy_preempt = true;
    options.connect_uri = "fd:migration".into();
    let unavailable = postcopy_preempt_unavailable(pair.src.qmp(), pair.dst.qmp(), &options).expect("probe");
    assert_eq!(unavailable, Some(PreemptUnavailable::SingleChannel { uri: "fd:migration".into() }));
    assert!(unavailable.is_some_and(|u| u.qemu_refuses()));

    // QEMU's own word, on the destination.
    options.listen_uri = "exec:cat".into();
    match prepare_destination(pair.dst.qmp(), &options) {
        Err(e @ MigrationError::Qmp { side: Side::Destination, .. }) => {
            assert!(e.to_string().contains("multi-channel"), "{e}")
        }
        other => panic!("postcopy-preempt over exec: {other:?}"),
    }
}

#[test]
fn a_paused_postcopy_recovers_on_a_new_socket() {
    paused_postcopy_recovers_on_a_new_socket(false);
}

/// With postcopy-preempt the source opens both connections anew.
#[test]
fn a_paused_postcopy_preempt_recovers_on_a_new_socket() {
    paused_postcopy_recovers_on_a_new_socket(true);
}

fn paused_postcopy_recovers_on_a_new_socket(preempt: bool) {
    need_qemu();
    let started = Instant::now();
    let mut pair = Pair::start();
    let mut options = pair.options();
    options.postcopy_preempt = preempt;
    options.max_bandwidth = Some(4 * MIB);
    // Slow enough that the pause lands well before postcopy is done.
    options.max_postcopy_bandwidth = Some(16 * MIB);
    options.postcopy = Some(SwitchToPostcopy::After(Duration::ZERO));
    prepare_destination(pair.dst.qmp(), &options).expect("prepare destination");
    let mut migration = Migration::start(pair.src.qmp(), &options).expect("start");

    // Only postcopy can pause.
    match migration.pause(pair.src.qmp(), pair.dst.qmp()) {
        Err(MigrationError::WrongStatus { side: Side::Source, status, .. }) => {
            assert!(!status.is_postcopy(), "{status}")
        }
        other => panic!("pause in precopy: {other:?}"),
    }
    wait_for_status(pair.src.qmp(), Side::Source, &[MigrationStatus::Active], Duration::from_secs(10))
        .expect("precopy");
    migration.switch_to_postcopy(pair.src.qmp()).expect("switch");
    wait_for_status(pair.src.qmp(), Side::Source, &[MigrationStatus::PostcopyActive], Duration::from_secs(10))
        .expect("postcopy");

    migration.pause(pair.src.qmp(), pair.dst.qmp()).expect("pause");
    // What wait() says about a paused migration.
    match pair.wait_result(&mut migration, |_| {}) {
        Err(MigrationError::PostcopyPaused { error_desc }) => {
            assert_eq!(error_desc.as_deref(), Some("Postcopy migration is paused by the user"))
        }
        other => panic!("wait on a paused migration: {other:?}"),
    }
    let recovery_uri = pair.uri("recovery.sock");
    migration
        .recover(pair.dst.qmp(), &recovery_uri)
        .unwrap_or_else(|e| panic!("migrate-recover: {e}\n{}", pair.dst.log()));
    migration.resume(pair.src.qmp(), &recovery_uri).expect("migrate resume");
    let (report, seen) = pair.wait(&mut migration);

    assert_eq!(seen.last(), Some(&MigrationStatus::Completed), "{seen:?}");
    assert!(report.postcopy && report.recoveries == 1, "{report:?}");
    assert_eq!(report.postcopy_preempt, preempt, "{report:?}");
    let channels = pair.dst.log().matches("postcopy_preempt_new_channel").count();
    assert_eq!(channels, if preempt { 2 } else { 0 }, "{}", pair.dst.log());
    // Not the time from the switchover to completion, which QEMU puts in
    // `downtime` when the real downtime rounds to 0 ms.
    assert!(report.downtime_ms < 500, "{report:?}");
    assert!(report.ram.postcopy_bytes > PATTERN_LEN / 2, "{report:?}");
    let destination = query_migrate(pair.dst.qmp(), Side::Destination).expect("query");
    assert_eq!(destination.status(), MigrationStatus::Completed);
    pair.assert_guest_moved();
    eprintln!("recovered postcopy: {report:?}, test took {:?}", started.elapsed());
}

#[test]
fn misconfigured_destinations_and_sources_are_explained() {
    need_qemu();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let options = MigrationOptions::new(format!("unix:{}", dir.path().join("m.sock").display()));

    let mut plain = Qemu::start(dir.path(), "plain", "memory-backend-memfd", &[]);
    match prepare_destination(plain.qmp(), &options) {
        Err(e @ MigrationError::NotIncoming { .. }) => {
            assert!(e.to_string().contains("-incoming defer"), "{e}")
        }
        other => panic!("a QEMU without -incoming: {other:?}"),
    }

    let listening_on = format!("unix:{}", dir.path().join("early.sock").display());
    let mut early = Qemu::start(dir.path(), "early", "memory-backend-memfd", &["-incoming", &listening_on]);
    match prepare_destination(early.qmp(), &options) {
        Err(MigrationError::AlreadyIncoming { status }) => {
            assert_eq!(status, MigrationStatus::Setup)
        }
        other => panic!("a QEMU with -incoming URI: {other:?}"),
    }

    // Nobody listens on options' URI: QEMU's reason comes back.
    let mut migration = Migration::start(plain.qmp(), &options).expect("start");
    let result = migration.wait(Endpoint::new(plain.qmp()), Endpoint::new(early.qmp()), |_| {});
    match result {
        Err(MigrationError::Failed { source_error: Some(reason), .. }) => {
            assert!(reason.contains("m.sock"), "{reason}")
        }
        other => panic!("migrating to nowhere: {other:?}"),
    }
    eprintln!("test took {:?}", started.elapsed());
}

#[test]
fn gmemctl_migrate_prints_a_json_report_and_explains_a_wrong_destination() {
    need_qemu();
    let started = Instant::now();
    let mut pair = Pair::start();
    let uri = pair.uri("migration.sock");
    let (src, dst) = (pair.src.qmp_path.clone(), pair.dst.qmp_path.clone());
    let gmemctl = || {
        Command::new(env!("CARGO_BIN_EXE_gmemctl"))
            .args(["migrate", "--uri", &uri, "--json"])
            .args(["--postcopy-after", "0.3", "--max-bandwidth", "4M"])
            .arg("--from")
            .arg(&src)
            .arg("--to")
            .arg(format!("qmp={}", dst.display()))
            .output()
            .expect("run gmemctl")
    };
    pair.src.disconnect();
    pair.dst.disconnect();

    let output = gmemctl();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["postcopy"], true, "{report}");
    // Both QEMUs have it, the URI is unix:, no vhost-user device: on.
    assert_eq!(report["postcopy_preempt"], true, "{report}");
    assert_eq!(report["destination_run_state"], "running", "{report}");
    assert!(report["ram"]["postcopy_bytes"].as_u64() > Some(0), "{report}");
    // stderr is no terminal here: progress comes as lines.
    assert!(stderr.lines().any(|l| l.starts_with("postcopy-active")), "{stderr}");
    pair.assert_guest_moved();

    // The destination has its guest now; it cannot take another one.
    pair.src.disconnect();
    pair.dst.disconnect();
    let output = gmemctl();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(stderr.contains("start it with -incoming defer"), "{stderr}");
    eprintln!("test took {:?}", started.elapsed());
}

/// `--postcopy-preempt on` refuses what QEMU would refuse, before touching
/// either QEMU; `off` migrates without it, and the summary says so.
#[test]
fn gmemctl_migrate_postcopy_preempt_on_and_off() {
    need_qemu();
    let mut pair = Pair::start();
    let uri = pair.uri("migration.sock");
    let (src, dst) = (pair.src.qmp_path.clone(), pair.dst.qmp_path.clone());
    let gmemctl = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gmemctl"))
            .args(["migrate", "--uri", &uri, "--postcopy-after", "0.3", "--max-bandwidth", "4M"])
            .args(extra)
            .arg("--from")
            .arg(&src)
            .arg("--to")
            .arg(&dst)
            .output()
            .expect("run gmemctl")
    };
    pair.src.disconnect();
    pair.dst.disconnect();

    let output = gmemctl(&["--postcopy-preempt", "on", "--connect-uri", "fd:migration"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--postcopy-preempt on: fd:migration opens a single connection"), "{stderr}");
    let status = query_migrate(pair.dst.qmp(), Side::Destination).expect("query").status();
    assert_eq!(status, MigrationStatus::None, "the destination was prepared anyway");
    pair.dst.disconnect();

    let output = gmemctl(&["--postcopy-preempt", "off"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("postcopy-preempt") && l.contains("off")), "{stdout}");
    pair.assert_guest_moved();
}

#[test]
fn gmemctl_migrate_resume_recovers_a_paused_postcopy() {
    need_qemu();
    let started = Instant::now();
    let mut pair = Pair::start();
    let mut options = pair.options();
    options.max_postcopy_bandwidth = Some(16 * MIB);
    options.postcopy = Some(SwitchToPostcopy::After(Duration::ZERO));
    prepare_destination(pair.dst.qmp(), &options).expect("prepare destination");
    let mut migration = Migration::start(pair.src.qmp(), &options).expect("start");
    migration.switch_to_postcopy(pair.src.qmp()).expect("switch");
    wait_for_status(pair.src.qmp(), Side::Source, &[MigrationStatus::PostcopyActive], Duration::from_secs(10))
        .expect("postcopy");
    migration.pause(pair.src.qmp(), pair.dst.qmp()).expect("pause");
    pair.src.disconnect();
    pair.dst.disconnect();

    let output = Command::new(env!("CARGO_BIN_EXE_gmemctl"))
        .args(["migrate", "--resume", "--json", "--uri"])
        .arg(pair.uri("recovery.sock"))
        .arg("--from")
        .arg(&pair.src.qmp_path)
        .arg("--to")
        .arg(&pair.dst.qmp_path)
        .output()
        .expect("run gmemctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["recoveries"], 1, "{report}");
    assert_eq!(report["postcopy"], true, "{report}");
    pair.assert_guest_moved();
    eprintln!("test took {:?}", started.elapsed());
}
