//! Live migration of a guest doing block I/O, between two hosts (network
//! namespaces joined by a veth), each with its own gmemd owning its RAM and
//! both serving the same disk image. QEMU, the guest and both daemons are
//! real; the QMP sequences are gmem_qemu::migration's.
//!
//! The guest runs the `seqio` agent: it writes numbered blocks to /dev/vda,
//! keeps a running checksum in RAM and reads every block straight back into a
//! slot of its own in guest RAM (the device writes that RAM). Migration
//! starts while it runs; at the end, on the destination, it checks every slot
//! in RAM and the disk against its checksum, and the host checks every block
//! of the image. A device write the migration lost shows up as a stale slot.
//!
//! Every postcopy test runs twice: with requested pages queued behind the
//! background stream on one connection, and with QEMU's `postcopy-preempt`,
//! which gives them a connection of their own. The source QEMU traces each
//! page it sends on that connection, so a test knows which one it ran.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use gmem_protocol::MigrationState;
use gmem_qemu::migration::{
    postcopy_preempt_unavailable, prepare_destination, Endpoint, Migration, MigrationError, MigrationOptions as Plan,
    MigrationReport, PreemptUnavailable, SwitchToPostcopy,
};
use gmem_qemu::QmpClient;
use gmem_tests::seqio::{self, SeqioReport, PROGRESS_KEY};
use gmem_tests::{DelayRelay, GmemdOptions, MigrationOptions, MigrationPair, VmOptions};

/// Blocks the guest writes: 64 MiB, about 5 s of I/O under TCG.
const BLOCKS: u64 = 16384;
/// The port the destination QEMU listens on, in its own namespace.
const PORT: u16 = 4444;
/// Migration starts once the guest has written this many blocks.
const START_AT: u64 = 1024;

/// Slot stride of the postcopy runs: block i lands in slot i * 4099 mod
/// BLOCKS, 16 MiB further each time, so the device keeps meeting pages QEMU
/// has not streamed yet (it streams onward from each requested page).
const SCATTERED: u64 = 4099;

/// The QEMU trace event for a requested page the source sends on the
/// postcopy-preempt connection (QEMU 8.0 and later send it from the
/// return-path thread, as the request arrives).
const PREEMPT_SEND: &str = "postcopy_preempt_send_host_page";

fn pair(name: &str, seed: u64, stride: u64, gmemd: GmemdOptions) -> Result<MigrationPair> {
    pair_with(name, seed, stride, gmemd, &[])
}

/// [`pair`] with further QEMU arguments for both QEMUs.
fn pair_with(name: &str, seed: u64, stride: u64, gmemd: GmemdOptions, qemu_args: &[&str]) -> Result<MigrationPair> {
    let vm = VmOptions::new(name, "seqio").param("blocks", BLOCKS).param("seed", seed).param("stride", stride);
    let qemu_args = ["-trace", PREEMPT_SEND].iter().chain(qemu_args).map(|arg| arg.to_string()).collect();
    MigrationPair::start(&MigrationOptions {
        gmemd: GmemdOptions { memory: "512M".into(), ..gmemd },
        vm: VmOptions { qemu_args, ..vm },
    })
}

/// Pages the source QEMU has sent on the postcopy-preempt connection so far.
fn pages_sent_preempting(pair: &MigrationPair) -> usize {
    pair.source_vm.qemu_log().lines().filter(|line| line.contains(PREEMPT_SEND)).count()
}

/// Where the source connects: straight to the destination, or to a relay.
fn plan(pair: &MigrationPair, relay: Option<&DelayRelay>) -> Plan {
    let listen = format!("tcp:{}:{PORT}", pair.hosts.dst_addr());
    let mut plan = Plan::new(listen);
    if let Some(relay) = relay {
        plan.connect_uri = format!("tcp:{}", relay.addr());
    }
    plan.timeout = Duration::from_secs(120);
    plan
}

/// How a migration ended.
#[derive(Debug)]
enum Ended {
    /// Completed, with both QEMUs' and gmemds' figures.
    Completed(Box<MigrationReport>),
    /// With `postcopy-preempt` and gmemd's vhost-user device on the
    /// destination, QEMU sent all of RAM and never completed (the QEMU bug
    /// in docs/migration.md): the figures as they stood then, with the
    /// guest running on the destination.
    PreemptStuck(Box<MigrationReport>),
}

impl Ended {
    /// The report of a migration that must have completed.
    fn completed(self) -> Result<MigrationReport> {
        match self {
            Ended::Completed(report) => Ok(*report),
            Ended::PreemptStuck(report) => bail!("postcopy-preempt never completed: {report:?}"),
        }
    }

    /// The figures of a postcopy-preempt migration, which QEMU never
    /// completes once gmemd's device has faulted.
    fn preempt_stuck(self) -> Result<MigrationReport> {
        match self {
            Ended::PreemptStuck(report) => Ok(*report),
            Ended::Completed(report) => bail!(
                "QEMU completed a postcopy-preempt migration with gmemd's device on the destination: the QEMU \
                 version here no longer strands vhost-user page requests, so postcopy_preempt_unavailable \
                 should let it be used (docs/migration.md); {report:?}"
            ),
        }
    }
}

/// Waits for the guest to be writing, then migrates with `plan`; `between`
/// runs after `migrate` is sent (to interrupt the stream, say), with the
/// source's and the destination's QMP (QEMU serves one QMP client at a time).
///
/// With [`Plan::postcopy_preempt`] it does what `gmemctl migrate
/// --postcopy-preempt on` does: the probe names gmemd's vhost-user device as
/// the reason not to, and the migration goes ahead anyway.
fn migrate(
    pair: &mut MigrationPair,
    plan: &Plan,
    between: impl FnOnce(&mut Migration, &mut QmpClient, &mut QmpClient, &MigrationPair) -> Result<()>,
) -> Result<Ended> {
    pair.source_vm.wait_for_progress(PROGRESS_KEY, START_AT, Duration::from_secs(60))?;
    let mut src_qmp = pair.source_vm.qmp()?;
    let mut dst_qmp = pair.dest_vm.qmp()?;
    if plan.postcopy_preempt {
        let why_not = postcopy_preempt_unavailable(&mut src_qmp, &mut dst_qmp, plan)?;
        ensure!(
            matches!(&why_not, Some(PreemptUnavailable::VhostUserDevices { devices }) if devices == &["vhost-user-blk-pci"]),
            "the probe should name gmemd's device: {why_not:?}"
        );
    }
    prepare_destination(&mut dst_qmp, plan)?;
    let mut migration = Migration::start(&mut src_qmp, plan)?;
    between(&mut migration, &mut src_qmp, &mut dst_qmp, pair)?;
    let (mut src_ctl, mut dst_ctl) = (pair.source.client()?, pair.dest.client()?);
    let outcome = migration.wait(
        Endpoint::new(&mut src_qmp).with_gmemd(&mut src_ctl),
        Endpoint::new(&mut dst_qmp).with_gmemd(&mut dst_ctl),
        |_| {},
    );
    let report = match outcome {
        Ok(report) => report,
        Err(MigrationError::PostcopyPreemptStuck { sent_all_for, report }) => {
            let json = serde_json::to_string(&report).unwrap_or_default();
            eprintln!("postcopy-preempt stuck {sent_all_for:?} after sending all RAM: {json}");
            return Ok(Ended::PreemptStuck(report));
        }
        Err(error) => {
            return Err(error).with_context(|| {
                format!(
                    "migration failed; consoles:\n{}\nsource QEMU (last lines):\n{}\ndestination QEMU (last \
                     lines):\n{}",
                    pair.serial_text(),
                    last_lines(&pair.source_vm.qemu_log(), 20),
                    last_lines(&pair.dest_vm.qemu_log(), 20)
                )
            })
        }
    };
    eprintln!("migration report: {}", serde_json::to_string(&report).unwrap_or_default());
    Ok(Ended::Completed(Box::new(report)))
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits for the agent to finish on the destination and checks everything:
/// it ran on both sides, every slot in guest RAM and the checksum verify,
/// and every block of the disk image is what it wrote.
fn verify(pair: &mut MigrationPair, seed: u64) -> Result<SeqioReport> {
    let results = pair.dest_vm.wait_for("seqio_blocks", Duration::from_secs(120))?;
    let report = SeqioReport::from_results(&results)?;
    let before = gmem_tests::AgentResults::parse(&pair.source_vm.serial_text()).progress(PROGRESS_KEY).unwrap_or(0);
    let after = results.progress(PROGRESS_KEY).unwrap_or(0);
    ensure!((START_AT..BLOCKS).contains(&before), "the source guest was not mid-run at the switch ({before} blocks)");
    ensure!(after > before, "the destination guest did not continue the sequence (progress {after} after {before})");
    ensure!(report.blocks == BLOCKS, "{report:?}");
    ensure!(report.is_clean(), "the guest found lost data after the migration: {report:?}");
    let disk_sum = seqio::verify_disk(&pair.source.disk, BLOCKS, seed)?;
    ensure!(disk_sum == report.sum, "the image's checksum {disk_sum:016x} is not the guest's {:016x}", report.sum);
    Ok(report)
}

#[test]
fn precopy_with_the_guest_writing_continuously_loses_nothing() -> Result<()> {
    let mut pair = pair("precopy", 11, 1, GmemdOptions::default())?;
    let plan = plan(&pair, None);
    let report = migrate(&mut pair, &plan, |_, _, _, _| Ok(()))?.completed()?;
    verify(&mut pair, 11)?;
    let source = report.source_gmemd.as_ref().context("source gmemd figures")?;
    ensure!(source.state == MigrationState::DirtyLogging, "{source:?}");
    ensure!(
        source.dirty_log.pages_marked > 0 && source.device_bytes_written > 0,
        "the device logged nothing: {source:?}"
    );
    ensure!(!report.postcopy, "{report:?}");
    Ok(())
}

/// The source gmemd upgrades itself by exec in the middle of a precopy: the
/// new program carries on QEMU's dirty log, so the device's writes after
/// the upgrade reach the destination too.
#[test]
fn precopy_across_an_upgrade_of_the_source_gmemd_loses_nothing() -> Result<()> {
    // The guest paced and the link capped, so that the guest writes for
    // seconds after the upgrade while RAM is still being sent, and is still
    // writing when the migration completes.
    let mut pair = MigrationPair::start(&MigrationOptions {
        gmemd: GmemdOptions { memory: "512M".into(), ..GmemdOptions::default() },
        vm: VmOptions::new("precopy-upgrade", "seqio").param("blocks", BLOCKS).param("seed", 13).param("pace_us", 400),
    })?;
    let mut plan = plan(&pair, None);
    plan.max_bandwidth = Some(32 << 20);
    let report = migrate(&mut pair, &plan, |_, _, _, pair| {
        let mut control = pair.source.client()?;
        gmem_tests::poll_until("the source gmemd logs dirty pages", Duration::from_secs(20), || {
            control.query_migration().ok().filter(|m| m.state == MigrationState::DirtyLogging)
        })?;
        let info = control.upgrade(None)?;
        ensure!(info.frontends == 1, "{info:?}");
        eprintln!("source gmemd upgraded mid-precopy: {info:?}");
        Ok(())
    })?
    .completed()?;
    verify(&mut pair, 13)?;
    let source = report.source_gmemd.as_ref().context("source gmemd figures")?;
    ensure!(source.dirty_log.pages_marked > 0, "the upgraded gmemd logged nothing: {source:?}");
    ensure!(!report.postcopy, "{report:?}");
    Ok(())
}

#[test]
fn precopy_without_dirty_logging_is_caught_by_the_verification() -> Result<()> {
    // The source gmemd accepts QEMU's log but never marks it: pages the
    // device wrote after QEMU had sent them arrive stale.
    let mut pair =
        pair("nolog", 12, 1, GmemdOptions { extra: vec!["--test-skip-dirty-log".into()], ..GmemdOptions::default() })?;
    let plan = plan(&pair, None);
    migrate(&mut pair, &plan, |_, _, _, _| Ok(()))?.completed()?;
    let outcome = verify(&mut pair, 12);
    let error = outcome.err().context("the verification passed although the device's writes were not logged")?;
    let text = format!("{error:#}");
    ensure!(text.contains("lost data") || text.contains("differ"), "failed for another reason: {text}");
    Ok(())
}

/// Precopy slow enough that much RAM is still missing when the guest moves
/// over, then postcopy, with or without `postcopy-preempt`: the destination
/// device faults on slots that have not arrived.
///
/// With preempt the stream is capped lower: the guest's own faults no
/// longer steer the stream, which sweeps through RAM in order, and over the
/// delayed link the guest took ~6 s of vCPU faults (10 ms each) to reach
/// its I/O again; at 16 MiB/s the stream had sent every slot by then, and
/// the device never faulted (twice in two runs).
fn postcopy_plan(pair: &MigrationPair, relay: Option<&DelayRelay>, preempt: bool) -> Plan {
    let mut plan = plan(pair, relay);
    plan.max_bandwidth = Some(8 << 20);
    plan.max_postcopy_bandwidth = Some(if preempt { 4 << 20 } else { 16 << 20 });
    plan.postcopy = Some(SwitchToPostcopy::After(Duration::from_millis(1500)));
    plan.postcopy_preempt = preempt;
    plan
}

/// The guest ran in postcopy, the destination device faulted and was
/// unregistered at the end, and no page went on a preempt connection.
fn check_postcopy(report: &MigrationReport, pair: &MigrationPair) -> Result<()> {
    ensure!(report.postcopy, "the guest never ran in postcopy: {report:?}");
    let dest = report.destination_gmemd.as_ref().context("destination gmemd figures")?;
    ensure!(dest.state == MigrationState::PostcopyEnded, "{dest:?}");
    ensure!(dest.postcopy.device_faults > 0, "the destination device never faulted on a missing page: {dest:?}");
    ensure!(dest.postcopy.registered_bytes == 0, "still registered after the end: {dest:?}");
    ensure!(!report.postcopy_preempt, "{report:?}");
    let preempting = pages_sent_preempting(pair);
    ensure!(preempting == 0, "postcopy-preempt is off, but {preempting} pages went on its connection");
    Ok(())
}

/// A postcopy-preempt migration that sent all of RAM and did not complete:
/// the destination device faulted (which is what keeps QEMU from
/// completing), and QEMU never sent gmemd POSTCOPY_END.
fn check_preempt_stuck(report: &MigrationReport, pair: &MigrationPair) -> Result<()> {
    ensure!(report.postcopy && report.postcopy_preempt && report.ram.remaining == 0, "{report:?}");
    let dest = report.destination_gmemd.as_ref().context("destination gmemd figures")?;
    ensure!(dest.postcopy.device_faults > 0, "the destination device never faulted on a missing page: {dest:?}");
    ensure!(dest.state == MigrationState::PostcopyRunning, "{dest:?}");
    let requests = report.ram.postcopy_requests;
    eprintln!("{requests} page requests, {} sent preempting, {:?}", pages_sent_preempting(pair), dest.postcopy);
    Ok(())
}

/// A pair for a postcopy test. With `preempt`, QEMU stays up when the
/// guest powers off (`-no-shutdown`): requested pages no longer wait behind
/// the capped stream (~75 ms each), so the guest may write its last block
/// before the stream has sent the rest of RAM, and a QEMU that exited then
/// would end the migration with an error instead of the hang under test.
fn postcopy_pair(name: &str, seed: u64, preempt: bool) -> Result<MigrationPair> {
    let qemu_args: &[&str] = if preempt { &["-no-shutdown"] } else { &[] };
    pair_with(name, seed, SCATTERED, GmemdOptions::default(), qemu_args)
}

/// Checks a postcopy that `ended`: with `preempt`, stuck as QEMU leaves it,
/// otherwise completed; then the guest's data, which the destination guest
/// verifies at its end in either case.
fn check_postcopy_ended(ended: Ended, pair: &mut MigrationPair, seed: u64, preempt: bool) -> Result<()> {
    if preempt {
        // Before the outcome: a migration that completed because preempt
        // was never on must not pass for a fixed QEMU.
        let preempting = pages_sent_preempting(pair);
        ensure!(preempting > 0, "postcopy-preempt is on, but the source sent no page on its connection: {ended:?}");
        check_preempt_stuck(&ended.preempt_stuck()?, pair)?;
    } else {
        check_postcopy(&ended.completed()?, pair)?;
    }
    verify(pair, seed)?;
    Ok(())
}

fn postcopy_over_the_direct_link(name: &str, seed: u64, preempt: bool) -> Result<()> {
    let mut pair = postcopy_pair(name, seed, preempt)?;
    let plan = postcopy_plan(&pair, None, preempt);
    let ended = migrate(&mut pair, &plan, |_, _, _, _| Ok(()))?;
    check_postcopy_ended(ended, &mut pair, seed, preempt)
}

#[test]
fn postcopy_with_the_device_faulting_on_missing_pages_loses_nothing() -> Result<()> {
    postcopy_over_the_direct_link("postcopy", 21, false)
}

/// Requested pages on a connection of their own. QEMU never completes the
/// migration (docs/migration.md), but the guest goes on on the destination
/// and loses nothing.
#[test]
fn postcopy_preempt_with_the_device_faulting_loses_nothing_but_never_completes() -> Result<()> {
    postcopy_over_the_direct_link("postcopy-preempt", 26, true)
}

/// 5 ms each way through the relay, 200 Mbit/s on the veth. With
/// `preempt`, the relay carries the second connection too.
fn postcopy_over_a_delayed_capped_link(name: &str, seed: u64, preempt: bool) -> Result<()> {
    let mut pair = postcopy_pair(name, seed, preempt)?;
    pair.hosts.limit_bandwidth("200mbit")?;
    let relay = pair.hosts.delay_relay(PORT, Duration::from_millis(5))?;
    let plan = postcopy_plan(&pair, Some(&relay), preempt);
    let ended = migrate(&mut pair, &plan, |_, _, _, _| Ok(()))?;
    let connections = if preempt { 2 } else { 1 };
    ensure!(relay.connections() == connections, "{} connections through the relay", relay.connections());
    check_postcopy_ended(ended, &mut pair, seed, preempt)
}

#[test]
fn postcopy_over_a_delayed_capped_link_loses_nothing() -> Result<()> {
    postcopy_over_a_delayed_capped_link("postcopy-delay", 22, false)
}

#[test]
fn postcopy_preempt_over_a_delayed_capped_link_loses_nothing_but_never_completes() -> Result<()> {
    postcopy_over_a_delayed_capped_link("postcopy-preempt-delay", 27, true)
}

#[test]
fn postcopy_interrupted_and_recovered_loses_nothing() -> Result<()> {
    postcopy_interrupted_and_recovered("postcopy-recover", 23, false)
}

/// With `postcopy-preempt` both connections break, and the source opens
/// both anew on resuming.
#[test]
fn postcopy_preempt_interrupted_and_recovered_loses_nothing_but_never_completes() -> Result<()> {
    postcopy_interrupted_and_recovered("postcopy-preempt-recover", 28, true)
}

fn postcopy_interrupted_and_recovered(name: &str, seed: u64, preempt: bool) -> Result<()> {
    let mut pair = postcopy_pair(name, seed, preempt)?;
    let relay = pair.hosts.delay_relay(PORT, Duration::ZERO)?;
    let mut plan = postcopy_plan(&pair, Some(&relay), preempt);
    plan.postcopy = Some(SwitchToPostcopy::After(Duration::ZERO));
    // The recovered stream takes a port of its own, straight to the
    // destination: a destination whose main loop is blocked on a page
    // (see Migration::recover) has not closed the first listener yet.
    let recovery = format!("tcp:{}:{}", pair.hosts.dst_addr(), PORT + 1);
    let mut before_resume = 0;
    let ended = migrate(&mut pair, &plan, |migration, src, dst, pair| {
        migration.switch_to_postcopy(src)?;
        // Let the guest run on the destination until its device has faulted
        // on a missing page, then break the stream as a network failure would.
        gmem_tests::poll_until("the guest to run on the destination", Duration::from_secs(30), || {
            dst.query_status().ok().filter(|state| state == "running")
        })?;
        gmem_tests::poll_until("a device fault on the destination", Duration::from_secs(30), || {
            let info = pair.dest.client().ok()?.query_migration().ok()?;
            (info.postcopy.device_faults > 0).then_some(())
        })?;
        relay.cut();
        migration.recover(dst, &recovery)?;
        let paused = pair.dest.client()?.query_migration()?;
        ensure!(paused.state == MigrationState::PostcopyRunning, "gmemd dropped its registration: {paused:?}");
        before_resume = pages_sent_preempting(pair);
        migration.resume(src, &recovery)?;
        Ok(())
    })?;
    if preempt {
        let after = pages_sent_preempting(&pair);
        ensure!(after > before_resume, "no page went on a preempt connection after the resume ({after} in all)");
    } else {
        ensure!(matches!(&ended, Ended::Completed(report) if report.recoveries == 1), "{ended:?}");
    }
    check_postcopy_ended(ended, &mut pair, seed, preempt)
}

/// Without the privilege userfaultfd needs, the destination gmemd does not
/// offer PAGEFAULT: QEMU refuses postcopy when the destination is prepared,
/// before the source is touched, and a precopy migration still works.
#[test]
fn postcopy_is_refused_up_front_by_an_unprivileged_destination() -> Result<()> {
    let nobody = GmemdOptions { user: Some(65534), ..GmemdOptions::default() };
    let mut pair = pair("unprivileged", 24, 1, nobody)?;
    let why = "postcopy needs gmemd to run as root, with CAP_SYS_PTRACE";
    ensure!(pair.dest.log().contains(why), "{}", pair.dest.log());
    let reported = pair.dest.client()?.query_migration()?.postcopy.unavailable;
    ensure!(reported.as_deref().is_some_and(|r| r.contains(why)), "query-migration: {reported:?}");

    // gmemctl asks the destination gmemd first and says why.
    let endpoint = |vm: &gmem_tests::Vm, gmemd: &gmem_tests::Gmemd| {
        format!("qmp={},control={}", vm.qmp_path().display(), gmemd.control.display())
    };
    let gmemctl = std::process::Command::new(gmem_tests::binaries()?.join("gmemctl"))
        .args(["migrate", "--postcopy", "--uri", &plan(&pair, None).listen_uri])
        .args(["--from", &endpoint(&pair.source_vm, &pair.source)])
        .args(["--to", &endpoint(&pair.dest_vm, &pair.dest)])
        .output()?;
    let stderr = String::from_utf8_lossy(&gmemctl.stderr);
    ensure!(
        !gmemctl.status.success() && stderr.contains("the destination gmemd cannot serve postcopy"),
        "gmemctl: {stderr}"
    );
    ensure!(stderr.contains(why), "gmemctl does not say why: {stderr}");

    // QEMU refuses it too, when asked directly.
    let refused = prepare_destination(&mut pair.dest_vm.qmp()?, &postcopy_plan(&pair, None, false));
    let error = format!("{:#}", refused.err().context("the destination accepted postcopy-ram")?);
    eprintln!("destination QEMU: {error}");
    ensure!(error.contains("not capable of postcopy"), "refused for another reason: {error}");

    let precopy = plan(&pair, None);
    let report = migrate(&mut pair, &precopy, |_, _, _, _| Ok(()))?.completed()?;
    ensure!(!report.postcopy, "{report:?}");
    verify(&mut pair, 24)?;
    Ok(())
}

/// Guest RAM on 2 MiB hugetlb pages (a hugetlb memfd region in both gmemds):
/// the guest boots and does its I/O on it, and postcopy places whole huge
/// pages, which the destination device faults on like small ones.
#[test]
fn postcopy_of_hugetlb_guest_ram_loses_nothing() -> Result<()> {
    gmem_tests::require_huge_pages(2 * 256)?;
    let hugetlb =
        GmemdOptions { extra: vec!["--region".into(), "id=ram0,size=512M,hugetlb".into()], ..GmemdOptions::default() };
    let mut pair = pair("postcopy-hugetlb", 25, SCATTERED, hugetlb)?;
    let mut plan = postcopy_plan(&pair, None, false);
    // QEMU 10.0 looks at the migration's state only every 64 host pages it
    // sends: with 2 MiB pages at the capped 8 MiB/s that is 16 s, and the
    // guest would be done before postcopy started. Uncapped, and asked for
    // postcopy at once, QEMU switches after the first 128 MiB, with most of
    // RAM still on the source.
    plan.max_bandwidth = None;
    plan.postcopy = Some(SwitchToPostcopy::After(Duration::ZERO));
    let report = migrate(&mut pair, &plan, |_, _, _, _| Ok(()))?.completed()?;
    check_postcopy(&report, &pair)?;
    verify(&mut pair, 25)?;
    let registered = pair.dest.client()?.query_regions()?;
    ensure!(registered.iter().all(|r| r.backing == "memfd-hugetlb"), "{registered:?}");
    Ok(())
}
