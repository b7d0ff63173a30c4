//! Live update of a guest doing block I/O: its QEMU is replaced three times
//! while the `seqio` agent writes (cpr-transfer with the system's QEMU 10.0,
//! cpr-exec with the QEMU 11 of scripts/qemu-next), or upgraded from one to
//! the other, guest RAM and disk staying in one gmemd throughout. QEMU, the guest and gmemd are real; the
//! QMP sequences are gmem_qemu::live_update's.
//!
//! seqio writes numbered blocks to /dev/vda, keeps a running checksum in
//! guest RAM and reads every block straight back into a slot of its own in
//! guest RAM (the device writes that RAM). At the end it checks every slot
//! and the disk against its checksum, and the host checks every block of
//! the image. A hop that lost guest RAM (or the device's writes into it, or
//! the vCPU's) shows up as a stale slot, a wrong checksum or a dead guest; a
//! guest restarted from scratch prints its start line twice; a write the
//! device ran twice or never shows in gmemd's byte counts.
//!
//! The tests fail, not skip, without their QEMU (scripts/test provides
//! both).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use gmem_qemu::live_update::{self, HopOptions};
use gmem_qemu::{CprMode, HopReport, LiveUpdateError, NextQemu, QemuCommand};
use gmem_tests::guest::START_MARKER;
use gmem_tests::seqio::{self, SeqioReport, BLOCK_BYTES, PROGRESS_KEY};
use gmem_tests::{poll_until, qemu_next, AgentResults, Gmemd, GmemdOptions, Vm, VmOptions};

/// Blocks the guest writes: 64 MiB, about 5 s of I/O under TCG.
const BLOCKS: u64 = 16384;
/// The first hop once the guest has written this many blocks.
const START_AT: u64 = 1024;
/// Blocks the guest writes between two hops.
const BETWEEN_HOPS: u64 = 2048;
/// Boot plus the whole run, generously (TCG on a busy 2-core host).
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// The size of a virtio-blk request header, which the device reads from
/// guest RAM for every request.
const HEADER_BYTES: u64 = 16;

/// One hop: the mode, and the QEMU binary to move to (`None`: the
/// system's).
type Hop = (CprMode, Option<PathBuf>);

/// Boots the seqio guest on a fresh gmemd with `options` (whose agent
/// parameters are added here), moves it as `hops` say while it writes, and
/// checks everything. Returns the hops' reports.
fn hops_lose_nothing(options: VmOptions, hops: &[Hop], seed: u64) -> Result<Vec<HopReport>> {
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    let options = VmOptions { cpr: true, ..options }.param("blocks", BLOCKS).param("seed", seed);
    let mut vm = Vm::start(&gmemd, &options)?;
    let mut reports = Vec::new();
    let mut due = START_AT;
    for (hop, (mode, qemu)) in (1..).zip(hops) {
        let (mode, qemu) = (*mode, qemu.clone());
        let results = vm.wait_for_progress(PROGRESS_KEY, due, RUN_TIMEOUT)?;
        let before = results.progress(PROGRESS_KEY).unwrap_or(0);
        ensure!(before < BLOCKS, "the guest finished before hop {hop}; raise BLOCKS");
        let old_pid = vm.pid();
        let report = vm.live_update_to(&gmemd, mode, qemu).with_context(|| format!("hop {hop}"))?;
        eprintln!("hop {hop} at block {before}: {}", serde_json::to_string(&report)?);
        ensure!(report.old_pid == old_pid && report.new_pid == vm.pid() && report.mode == mode, "{report:?}");
        match mode {
            CprMode::CprExec => ensure!(vm.pid() == old_pid, "cpr-exec keeps the pid: {report:?}"),
            CprMode::CprTransfer => ensure!(vm.pid() != old_pid, "cpr-transfer runs a new QEMU: {report:?}"),
        }
        ensure!(report.qemu_downtime_ms.is_some_and(|ms| ms > 0.0), "no downtime in QEMU's trace: {report:?}");
        // gmemd serves the new QEMU alone once the old connection is gone,
        // and the new QEMU maps the same regions again.
        poll_until("gmemd to serve the new QEMU alone", Duration::from_secs(10), || {
            let status = gmemd.client().ok()?.query_status().ok()?;
            let regions = gmemd.client().ok()?.query_regions().ok()?;
            let alone = status.frontends.len() == 1 && status.frontends[0].pid == i32::try_from(vm.pid()).ok();
            (alone && regions.iter().all(|r| r.mapped_by == 1)).then_some(())
        })?;
        reports.push(report);
        due = before + BETWEEN_HOPS;
    }
    let results = vm.wait_exit(RUN_TIMEOUT)?;
    verify(&vm, &gmemd, &results, seed, due - BETWEEN_HOPS)?;
    Ok(reports)
}

/// The guest's own verdict, the image, a single boot, progress after the
/// last hop, and gmemd's count of the device's writes.
fn verify(vm: &Vm, gmemd: &Gmemd, results: &AgentResults, seed: u64, last_hop_at: u64) -> Result<()> {
    let report = SeqioReport::from_results(results)?;
    ensure!(report.blocks == BLOCKS, "{report:?}");
    ensure!(report.is_clean(), "the guest found lost data after the hops: {report:?}");
    let disk_sum = seqio::verify_disk(&gmemd.disk, BLOCKS, seed)?;
    ensure!(disk_sum == report.sum, "the image's checksum {disk_sum:016x} is not the guest's {:016x}", report.sum);
    let starts = vm.serial_text().matches(START_MARKER).count();
    ensure!(starts == 1, "the agent started {starts} times: the guest was restarted, not moved");
    ensure!(
        results.progress(PROGRESS_KEY) == Some(BLOCKS) && last_hop_at < BLOCKS,
        "progress {:?}, last hop at {last_hop_at}",
        results.progress(PROGRESS_KEY)
    );
    // Every request reads a 16-byte header from guest RAM; the rest of what
    // the device read is write data, which is exactly the guest's blocks
    // (the boot writes nothing) when every write ran once.
    let device = gmemd.client()?.query_device()?;
    ensure!(device.errors == 0, "{device:?}");
    let written = device.queues.iter().map(|q| q.bytes_from_guest).sum::<u64>() - HEADER_BYTES * device.requests;
    ensure!(
        written == BLOCKS * BLOCK_BYTES as u64,
        "the device wrote {written} bytes of data for {} bytes of blocks: {device:?}",
        BLOCKS * BLOCK_BYTES as u64
    );
    Ok(())
}

#[test]
fn cpr_transfer_three_hops_with_the_guest_writing_lose_nothing() -> Result<()> {
    let hops = [(CprMode::CprTransfer, None), (CprMode::CprTransfer, None), (CprMode::CprTransfer, None)];
    let reports = hops_lose_nothing(VmOptions::new("cpr-transfer", "seqio"), &hops, 31)?;
    // The second QEMU builds its machine while the guest still runs in the
    // first: the guest pauses for a fraction of the handover.
    ensure!(reports.iter().all(|r| r.paused_ms.is_some_and(|p| p < r.handover_ms)), "{reports:?}");
    Ok(())
}

#[test]
fn cpr_exec_three_hops_on_qemu_11_lose_nothing() -> Result<()> {
    let qemu = Some(qemu_next()?);
    let hops = [(CprMode::CprExec, qemu.clone()), (CprMode::CprExec, qemu.clone()), (CprMode::CprExec, qemu.clone())];
    hops_lose_nothing(VmOptions { qemu, ..VmOptions::new("cpr-exec", "seqio") }, &hops, 32)?;
    Ok(())
}

/// What live update is for: the guest started on the system's QEMU 10.0
/// (on a versioned machine type) moves to QEMU 11 by cpr-transfer, then
/// execs QEMU 11 in place.
#[test]
fn a_running_guest_is_upgraded_from_qemu_10_to_11() -> Result<()> {
    let qemu = Some(qemu_next()?);
    let options = VmOptions { machine_type: Some("pc-i440fx-10.0".into()), ..VmOptions::new("upgrade", "seqio") };
    let reports = hops_lose_nothing(options, &[(CprMode::CprTransfer, qemu.clone()), (CprMode::CprExec, qemu)], 33)?;
    let versions: Vec<String> = reports.iter().map(|r| format!("{} -> {}", r.old_version, r.new_version)).collect();
    ensure!(reports[0].old_version.major == 10 && reports[0].new_version.major == 11, "{versions:?}");
    Ok(())
}

/// What would lose the guest is refused before anything changes, and the
/// guest runs on in the same QEMU. The guest need not boot for this.
#[test]
fn live_update_refuses_what_would_lose_the_guest() -> Result<()> {
    let qemu_11 = qemu_next()?;
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    // Expects `outcome` to be the refusal `expected` says, with the guest's
    // QEMU still there and running.
    let refused = |vm: &mut Vm, outcome: Result<HopReport>, expected: fn(&LiveUpdateError) -> bool| -> Result<()> {
        let error = outcome.err().context("the hop was not refused")?;
        let refusal = error.downcast_ref::<LiveUpdateError>().with_context(|| format!("{error:#}"))?;
        eprintln!("refused: {refusal}");
        ensure!(expected(refusal), "refused for another reason: {refusal}");
        let state = vm.qmp()?.query_status()?;
        ensure!(state == "running", "the guest's QEMU is {state} after the refusal");
        Ok(())
    };
    // QEMU 11 would build pc-i440fx-11.1 from `-machine pc`, not 10.0's;
    // a new command line that is not the running one would not load either.
    let mut vm = Vm::start(&gmemd, &VmOptions { cpr: true, ..VmOptions::new("pc", "idle") })?;
    let outcome = vm.live_update_to(&gmemd, CprMode::CprTransfer, Some(qemu_11.clone()));
    refused(&mut vm, outcome, |e| matches!(e, LiveUpdateError::MachineTypeMismatch { .. }))?;
    let other = QemuCommand::for_daemon(&mut gmemd.client()?)?.aux_ram_share(true).qmp(vm.qmp_path());
    let options = HopOptions::new(CprMode::CprTransfer, gmemd.dir.path());
    let outcome = live_update::hop(vm.qmp()?, &NextQemu::from_command(&other)?, &options, |_| {})
        .map(|hop| hop.report)
        .map_err(anyhow::Error::from);
    refused(&mut vm, outcome, |e| matches!(e, LiveUpdateError::CommandLineMismatch { .. }))?;
    drop(vm);

    // QEMU 10.0 cannot exec, into QEMU 11 or any other, even on a machine
    // type QEMU 11 has.
    let pinned =
        VmOptions { cpr: true, machine_type: Some("pc-i440fx-10.0".into()), ..VmOptions::new("pinned", "idle") };
    let mut vm = Vm::start(&gmemd, &pinned)?;
    let outcome = vm.live_update_to(&gmemd, CprMode::CprExec, Some(qemu_11.clone()));
    refused(&mut vm, outcome, |e| matches!(e, LiveUpdateError::ModeUnsupported { .. }))?;
    let outcome = vm.live_update_to(&gmemd, CprMode::CprExec, None);
    refused(&mut vm, outcome, |e| matches!(e, LiveUpdateError::BinaryTooOld { .. }))?;
    drop(vm);

    // QEMU 11 without aux-ram-share=on would exec and lose the ROMs.
    let mut vm = Vm::start(&gmemd, &VmOptions { qemu: Some(qemu_11.clone()), ..VmOptions::new("noaux", "idle") })?;
    for mode in [CprMode::CprExec, CprMode::CprTransfer] {
        let outcome = vm.live_update(&gmemd, mode);
        refused(&mut vm, outcome, |e| matches!(e, LiveUpdateError::NoAuxRamShare))?;
    }
    Ok(())
}
