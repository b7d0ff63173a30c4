//! gmemd replaced under a running guest: by exec (`upgrade`), QEMU's
//! connection carried over; and killed and started again (a crash), while
//! QEMU keeps the guest's RAM mapped and reconnects to the new gmemd.
//!
//! The guest runs the `seqio` agent (see tests/migration.rs): every block it
//! writes is read straight back into guest RAM by the device, and at the end
//! it checks every slot in RAM and the disk against its running checksum,
//! and the host checks every block of the image. A request lost or run twice
//! wrongly across the restart, or RAM that is not the guest's, fails it.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use gmem_protocol::UpgradeInfo;
use gmem_tests::seqio::{self, SeqioReport, PROGRESS_KEY};
use gmem_tests::{binaries, AgentResults, Gmemd, GmemdOptions, Vm, VmOptions};

/// Blocks the guest writes: 64 MiB.
const BLOCKS: u64 = 16384;

fn seqio_vm(gmemd: &Gmemd, name: &str, seed: u64) -> Result<Vm> {
    // Paced so the run spans the restarts; a progress line every 64 blocks
    // so the host sees the guest move again soon after each.
    let options = VmOptions::new(name, "seqio")
        .param("blocks", BLOCKS)
        .param("seed", seed)
        .param("pace_us", 200)
        .param("progress_every", 64);
    Vm::start(gmemd, &options)
}

/// The inode of the file QEMU maps as the region named `id`, from its maps.
fn qemu_mapped_inode(qemu: u32, id: &str) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{qemu}/maps"))?;
    maps.lines()
        .find(|line| line.contains(&format!("gmemd-{id}-")) || line.ends_with(&format!("/{id}.ram")))
        .and_then(|line| line.split_whitespace().nth(4)?.parse().ok())
        .with_context(|| format!("QEMU {qemu} does not map region {id}:\n{maps}"))
}

/// `gmemctl upgrade --json` against `gmemd`.
fn gmemctl_upgrade(gmemd: &Gmemd) -> Result<UpgradeInfo> {
    let out = std::process::Command::new(binaries()?.join("gmemctl"))
        .arg("--control")
        .arg(&gmemd.control)
        .args(["upgrade", "--json"])
        .output()?;
    ensure!(out.status.success(), "gmemctl upgrade: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn ten_upgrades_under_guest_io_keep_qemus_connection_and_lose_nothing() -> Result<()> {
    let seed = rand::random::<u64>();
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    let mut vm = seqio_vm(&gmemd, "upgrade", seed)?;
    vm.wait_for_progress(PROGRESS_KEY, 1024, Duration::from_secs(240))?;
    let before = gmemd.client()?.query_status()?;
    let mut paused_us = Vec::new();
    for round in 0..10 {
        let info = if round == 0 { gmemctl_upgrade(&gmemd)? } else { gmemd.client()?.upgrade(None)? };
        ensure!(info.pid == before.pid && info.frontends == 1, "upgrade {round}: {info:?}");
        paused_us.push(info.paused_us);
        std::thread::sleep(Duration::from_millis(300));
    }
    let progress = AgentResults::parse(&vm.serial_text()).progress(PROGRESS_KEY).unwrap_or(0);
    ensure!(progress < BLOCKS, "the guest's I/O ended before the last upgrade ({progress} blocks)");
    let after = gmemd.client()?.query_status()?;
    ensure!(after.frontends == before.frontends, "the frontend changed: {before:?} then {after:?}");
    let results = vm.wait_exit(Duration::from_secs(300))?;
    let report = SeqioReport::from_results(&results)?;
    ensure!(report.is_clean() && report.blocks == BLOCKS, "{report:?}\n{}", gmemd.log());
    ensure!(seqio::verify_disk(&gmemd.disk, BLOCKS, seed)? == report.sum);
    // QEMU never saw the backend go: it connected once.
    ensure!(gmemd.log().matches("connected (pid").count() == 1, "{}", gmemd.log());
    eprintln!("device paused per upgrade (µs): {paused_us:?}");
    Ok(())
}

#[test]
fn a_gmemd_killed_twice_under_guest_io_comes_back_and_nothing_is_lost() -> Result<()> {
    let seed = rand::random::<u64>();
    let shm = tempfile::Builder::new().prefix("gmemd-restart-").tempdir_in("/dev/shm")?;
    let dimm = shm.path().join("dimm0.ram");
    let options = GmemdOptions {
        extra: vec![
            "--region".into(),
            "id=ram0,size=512M".into(),
            "--region".into(),
            format!("id=dimm0,size=64M,path={}", dimm.display()),
        ],
        ..GmemdOptions::default()
    };
    let mut gmemd = Gmemd::start(&options)?;
    let mut vm = seqio_vm(&gmemd, "restart", seed)?;
    let inodes = gmemd
        .client()?
        .query_regions()?
        .iter()
        .map(|region| Ok(std::fs::metadata(&region.fd_path)?.ino()))
        .collect::<Result<Vec<u64>>>()?;

    for (round, at) in [2048, 8192].into_iter().enumerate() {
        vm.wait_for_progress(PROGRESS_KEY, at, Duration::from_secs(240))?;
        gmemd.crash()?;
        // The guest's requests queue up with nobody serving them.
        std::thread::sleep(Duration::from_millis(500));
        gmemd.restart()?;
        let back = Instant::now();
        vm.wait_for_progress(PROGRESS_KEY, at + 256, Duration::from_secs(60))
            .with_context(|| format!("the guest made no progress after restart {round}:\n{}", gmemd.log()))?;
        eprintln!("restart {round}: the guest moves again {:?} after gmemd answered", back.elapsed());
        let regions = gmemd.client()?.query_regions()?;
        for (region, inode) in regions.iter().zip(&inodes) {
            ensure!(!region.awaiting_adoption, "region {} not taken back: {regions:?}", region.id);
            let now = std::fs::metadata(&region.fd_path)?.ino();
            ensure!(now == *inode, "region {} is other memory than before the crash", region.id);
            ensure!(now == qemu_mapped_inode(vm.pid(), &region.id)?, "region {} is not the RAM QEMU maps", region.id);
        }
        let status = gmemd.client()?.query_status()?;
        ensure!(
            status.frontends.iter().map(|f| f.pid).eq([Some(vm.pid() as i32)]),
            "the same QEMU is the one frontend: {status:?}"
        );
    }
    let results = vm.wait_exit(Duration::from_secs(300))?;
    let report = SeqioReport::from_results(&results)?;
    ensure!(report.is_clean() && report.blocks == BLOCKS, "{report:?}\n{}", gmemd.log());
    ensure!(seqio::verify_disk(&gmemd.disk, BLOCKS, seed)? == report.sum);
    ensure!(gmemd.log().matches("adopted from a frontend's memory table").count() == 2, "{}", gmemd.log());
    Ok(())
}

/// Without the state file the restarted gmemd does not know the RAM QEMU
/// offers as its own: it refuses it (foreign memory is off by default), and
/// the guest's I/O stays stopped. The test above would fail the same way if
/// adoption were broken.
#[test]
fn without_its_state_file_a_restarted_gmemd_refuses_the_old_ram() -> Result<()> {
    let mut gmemd = Gmemd::start(&GmemdOptions::default())?;
    let mut vm = seqio_vm(&gmemd, "forgotten", 1)?;
    vm.wait_for_progress(PROGRESS_KEY, 1024, Duration::from_secs(240))?;
    gmemd.crash()?;
    std::fs::remove_file(gmemd.dir.path().join("vhost.sock.state")).context("the state file")?;
    gmemd.restart()?;
    let stuck = vm.wait_for_progress(PROGRESS_KEY, 1024 + 256, Duration::from_secs(15));
    ensure!(stuck.is_err(), "the guest moved on memory gmemd does not own");
    let log = gmemd.log();
    ensure!(log.contains("is not memory gmemd owns"), "{log}");
    let regions = gmemd.client()?.query_regions()?;
    ensure!(!regions[0].awaiting_adoption, "with no state file the RAM is new: {regions:?}");
    Ok(())
}
