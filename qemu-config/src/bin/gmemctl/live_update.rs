//! `gmemctl live-update`: move a running guest to a new QEMU on the same
//! host (cpr-transfer or cpr-exec), one or more times, its RAM and disk
//! staying in gmemd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use gmem_protocol::ControlClient;
use gmem_qemu::live_update::{self, Hop, Step, DEFAULT_HOP_TIMEOUT};
use gmem_qemu::{CprMode, HopOptions, HopReport, NextQemu, Output, QemuProcess, QmpClient, SerialSink, SpawnOptions};
use serde::Serialize;

use crate::migrate::Seconds;
use crate::tables::fields;
use crate::{QemuRun, VmArgs};

pub const LONG_ABOUT: &str = "\
Move a running guest to a new QEMU on the same host, without copying its RAM:
the RAM stays in gmemd's memfds and the new QEMU maps them again; CPU and
device state go through QEMU's migration stream (CPR, checkpoint and restart).

--mode cpr-transfer (QEMU 10.0 or later): gmemctl starts a second QEMU with
  the same command line plus -incoming for a main and a cpr channel (unix
  sockets in --work-dir), runs migrate-set-parameters mode=cpr-transfer and
  migrate with both channels on the running QEMU, waits for the new QEMU to
  run the guest and kills the old one (SIGKILL: an orderly exit would remove
  the QMP socket file the new QEMU has taken over). The new QEMU outlives
  gmemctl; the old one's parent (e.g. gmemctl launch) sees it die of SIGKILL.
--mode cpr-exec (QEMU 10.2 or later): migrate-set-parameters mode=cpr-exec and
  cpr-exec-command (the --qemu binary with the same arguments plus -incoming
  file:STATE), migrate to file:STATE; QEMU execs the new binary in place
  (same pid), which loads STATE; gmemctl reconnects to QMP.

Each hop regenerates the command line from gmemd's query-regions and the VM
options given here, which must be those the QEMU was started with (gmemctl
compares them with its /proc/<pid>/cmdline). Parameters do not survive a hop
and are set again each time.

Refused up front, with the guest untouched: a QEMU without the mode, a --qemu
binary too old for it, a memory backend without share=on, a machine without
aux-ram-share=on (QEMU 11 would run cpr-exec without them and lose the guest),
a different command line, mem-paths that no longer lead to the guest's RAM.
Start guests meant for live update with `gmemctl launch --aux-ram-share
--qmp PATH --serial file:PATH --downtime-trace --qemu-log PATH`.

Each hop reports its handover (migrate sent until the new QEMU says the guest
runs, host clock), the guest's pause between the old QEMU's STOP and the new
QEMU's RESUME event (QMP timestamps), and QEMU's own downtime from its
vmstate_downtime_checkpoint trace when the guest runs with --downtime-trace
and --qemu-log names QEMU's stderr log.";

pub const EXAMPLES: &str = "\
Examples:
  # Start a guest that can be live-updated, with the newer QEMU from scripts/qemu-next:
  Q=$(scripts/qemu-next)
  gmemctl --control /run/gmemd/control.sock launch --qemu \"$Q\" --aux-ram-share \\
      --qmp /run/vm.qmp --serial file:/run/vm.serial --downtime-trace --qemu-log /run/vm.log \\
      --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0' &

  # Exec it into the same (or an upgraded) binary three times:
  gmemctl --control /run/gmemd/control.sock live-update --mode cpr-exec --hops 3 --qemu \"$Q\" \\
      --aux-ram-share --qmp /run/vm.qmp --serial file:/run/vm.serial --downtime-trace \\
      --qemu-log /run/vm.log --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0'

  # Hand it to a new QEMU process (QEMU 10.0 suffices), JSON for a script:
  gmemctl --control /run/gmemd/control.sock live-update --mode cpr-transfer --json \\
      --aux-ram-share --qmp /run/vm.qmp --serial file:/run/vm.serial \\
      --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0'";

#[derive(Debug, Args)]
pub struct LiveUpdateArgs {
    /// cpr-transfer (a new QEMU process) or cpr-exec (QEMU execs the new
    /// binary in place).
    #[arg(long, value_name = "cpr-transfer|cpr-exec")]
    mode: CprMode,
    /// How many times to move the guest.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    hops: u32,
    /// Pause between hops, in seconds.
    #[arg(long, value_name = "SECONDS", default_value = "1")]
    interval: Seconds,
    /// Give up on a hop step after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = Seconds(DEFAULT_HOP_TIMEOUT))]
    timeout: Seconds,
    /// Where to put the cpr channel sockets or the cpr-exec state file
    /// [default: a temporary directory].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Print one JSON object ({"mode", "hops": [...]}) instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: QemuRun,
    #[command(flatten)]
    vm: VmArgs,
}

/// The JSON result.
#[derive(Debug, Serialize)]
struct LiveUpdateReport {
    mode: CprMode,
    hops: Vec<HopReport>,
}

pub fn run(args: &LiveUpdateArgs, client: &mut ControlClient) -> Result<()> {
    let qmp_path = args.vm.qmp.clone().context("live-update needs --qmp PATH: the running QEMU's QMP socket")?;
    if args.vm.incoming.is_some() {
        bail!("--incoming is for starting a migration destination; live-update adds its own");
    }
    if args.mode == CprMode::CprTransfer && args.vm.serial == SerialSink::Stdio {
        bail!(
            "cpr-transfer starts a new QEMU that outlives gmemctl, and its console cannot be \
             gmemctl's stdout: start the guest with --serial file:PATH (or none)"
        );
    }
    // Removed when gmemctl is done; the hops need it only while they run.
    let scratch;
    let work_dir = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => {
            scratch = tempfile::Builder::new().prefix("gmemctl-cpr-").tempdir()?;
            scratch.path().to_owned()
        }
    };
    let options = HopOptions {
        trace_log: args.run.qemu_log.clone(),
        spawn: SpawnOptions {
            stdout: Output::Null,
            stderr: args.run.qemu_log.clone().map_or(Output::Inherit, Output::Append),
            own_process_group: true,
            ..SpawnOptions::default()
        },
        timeout: args.timeout.0,
        ..HopOptions::new(args.mode, work_dir)
    };

    let qmp = QmpClient::connect(&qmp_path, Duration::from_secs(5)).context("reaching the running QEMU")?;
    let mut spawned: Option<QemuProcess> = None;
    let mut reports = Vec::new();
    let outcome = hops(args, client, &options, qmp, &mut spawned, &mut reports);
    // Whatever happened, a QEMU a hop started holds the guest (or the
    // hop that failed left it there): it outlives gmemctl, and dropping
    // its handle would kill it.
    if let Some(process) = spawned {
        let pid = process.detach();
        eprintln!("the guest runs in QEMU {pid}, which gmemctl leaves running");
    }
    outcome?;
    let result = LiveUpdateReport { mode: args.mode, hops: reports };
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print!("{}", summary(&result));
    }
    Ok(())
}

/// The hops, one after the other; `spawned` is the QEMU the last
/// cpr-transfer started, `reports` grows with every hop done.
fn hops(
    args: &LiveUpdateArgs,
    client: &mut ControlClient,
    options: &HopOptions,
    mut qmp: QmpClient,
    spawned: &mut Option<QemuProcess>,
    reports: &mut Vec<HopReport>,
) -> Result<()> {
    for hop in 1..=args.hops {
        if hop > 1 {
            std::thread::sleep(args.interval.0);
        }
        // Regenerated each hop: the mem-paths come from gmemd now.
        let command = args.vm.build(client)?.qemu_binary(&args.run.qemu).aux_ram_share(true);
        let next = NextQemu::from_command(&command)?;
        let label = format!("hop {hop}/{} ({})", args.hops, args.mode);
        let Hop { qmp: new_qmp, spawned: new_process, report } =
            live_update::hop(qmp, &next, options, |step| show(&label, &step)).context(label.clone())?;
        eprintln!("{label}: {}", one_line(&report));
        qmp = new_qmp;
        // The QEMU the previous hop started is gone (killed by this one);
        // dropping its handle reaps it.
        if let Some(process) = new_process {
            *spawned = Some(process);
        }
        reports.push(report);
    }
    Ok(())
}

fn show(label: &str, step: &Step) {
    let text = match step {
        Step::Checked { pid, version } => format!("checks passed: QEMU {version}, pid {pid}"),
        Step::Started { pid } => format!("new QEMU {pid} waits on the cpr channel"),
        Step::Migrating => "migrate sent".to_string(),
        Step::Execed => "QEMU exec'd the new binary; reconnecting".to_string(),
        Step::Running { after } => format!("guest running after {:.1} ms", ms(*after)),
        Step::OldStopped { pid } => format!("old QEMU {pid} killed"),
    };
    eprintln!("{label}: {text}");
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `handover 72.4 ms, paused 71.9 ms, QEMU downtime 73.0 ms; QEMU 11.1.3 pid 4711`.
fn one_line(report: &HopReport) -> String {
    let optional = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    format!(
        "handover {:.1} ms, guest paused {}, QEMU downtime {}; now QEMU {} pid {}",
        report.handover_ms,
        optional(report.paused_ms),
        optional(report.qemu_downtime_ms),
        report.new_version,
        report.new_pid
    )
}

fn summary(result: &LiveUpdateReport) -> String {
    let lines: Vec<(String, String)> =
        result.hops.iter().enumerate().map(|(i, hop)| (format!("hop {}", i + 1), one_line(hop))).collect();
    let mut pairs = vec![("mode", result.mode.to_string())];
    pairs.extend(lines.iter().map(|(k, v)| (k.as_str(), v.clone())));
    fields(&pairs)
}
