//! gmemctl: ask gmemd what it serves, start QEMU guests attached to it, and
//! live-migrate them.

use std::num::NonZeroU32;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use gmem_protocol::ControlClient;
use gmem_qemu::{Accel, Output, QemuCommand, QemuProcess, QmpClient, SerialSink, SpawnOptions};

#[path = "gmemctl/live_update.rs"]
mod live_update;
#[path = "gmemctl/migrate.rs"]
mod migrate;
#[path = "gmemctl/progress.rs"]
mod progress;
#[path = "gmemctl/tables.rs"]
mod tables;

const ABOUT: &str = "Control gmemd, start QEMU guests attached to it, migrate them and live-update their QEMU";

const LONG_ABOUT: &str = "\
Control gmemd, start QEMU guests attached to it, and migrate them.

gmemd is a vhost-user-blk daemon that also owns the guest's RAM: it creates
the RAM as memfd regions, and QEMU maps the same pages through
/proc/<gmemd pid>/fd/<n> (memory-backend-file, share=on) instead of allocating
its own. The guest's disk is served by gmemd over a vhost-user socket.

gmemctl asks a running gmemd, on its control socket, for its regions, socket
and queues, and turns them into a QEMU command line: the first region is the
machine's main RAM, further regions are pc-dimm devices.

gmemctl migrate live-migrates a guest between two such QEMUs (each with its
own gmemd), precopy or postcopy, over their QMP sockets.

gmemctl live-update moves a running guest to a new QEMU process or binary on
the same host (cpr-transfer, cpr-exec); its RAM and disk stay in gmemd.";

const EXAMPLES: &str = "\
Examples:
  # What does the daemon serve?
  gmemctl --control /run/gmemd/control.sock regions

  # Print the QEMU arguments, then run them yourself:
  eval qemu-system-x86_64 \"$(gmemctl --control /run/gmemd/control.sock qemu-args \\
      --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0')\"

  # Or let gmemctl start QEMU; the guest console goes to stdout:
  gmemctl --control /run/gmemd/control.sock launch \\
      --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0 panic=-1'

  # Migrate it to a second QEMU, started on a second gmemd as a destination:
  gmemctl --control /run/gmemd2/control.sock launch --incoming defer \\
      --qmp /run/dst.qmp --kernel vmlinuz --initrd initrd.img &
  gmemctl migrate --from qmp=/run/src.qmp,control=/run/gmemd/control.sock \\
      --to qmp=/run/dst.qmp,control=/run/gmemd2/control.sock \\
      --uri unix:/run/mig.sock --postcopy

  # Or move it to a newer QEMU binary on the same host, in place (cpr-exec):
  gmemctl --control /run/gmemd/control.sock launch --aux-ram-share --qmp /run/vm.qmp \\
      --serial file:/run/vm.serial --kernel vmlinuz --initrd initrd.img &
  gmemctl --control /run/gmemd/control.sock live-update --mode cpr-exec \\
      --qemu \"$(scripts/qemu-next)\" --aux-ram-share --qmp /run/vm.qmp \\
      --serial file:/run/vm.serial --kernel vmlinuz --initrd initrd.img

  # Upgrade gmemd itself in place, under the running guest:
  gmemctl --control /run/gmemd/control.sock upgrade --binary /usr/local/bin/gmemd

Set RUST_LOG=info (or debug) to see what gmemctl does.";

#[derive(Debug, Parser)]
#[command(name = "gmemctl", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
struct Cli {
    /// gmemd's control socket (the PATH of `gmemd --control PATH`); needed
    /// by every command except migrate, which names its sockets in --from/--to.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Gmemd(GmemdCmd),
    /// Live-migrate a guest from one QEMU to another (precopy or postcopy).
    #[command(long_about = migrate::LONG_ABOUT, after_help = migrate::EXAMPLES)]
    Migrate(migrate::MigrateArgs),
}

/// The commands that talk to one gmemd (`--control`).
#[derive(Debug, Subcommand)]
enum GmemdCmd {
    /// Show gmemd's version, pid, uptime, vhost-user socket and frontends.
    Status(Format),
    /// Show the guest RAM regions gmemd owns.
    Regions(Format),
    /// Show the virtio-blk device gmemd serves, with per-queue figures.
    Device(Format),
    /// Show the pin ledger: guest RAM locked per owner (VM) and user,
    /// budgets (--memlock-limit), pins a restarted gmemd has yet to take
    /// back, and the kernel's own figures (VmLck, VmPin) next to the
    /// ledger's, a mismatch flagged.
    Pins(Format),
    /// Drop a postcopy registration whose destination QEMU disconnected
    /// before the migration ended. gmemd keeps one for
    /// --postcopy-orphan-timeout; meanwhile requests that need a page which
    /// never arrived fail.
    PostcopyAbort,
    /// Replace gmemd's own program, in place, while QEMU and the guest go
    /// on: gmemd pauses its device between two requests, execs the new
    /// program, which takes over the RAM, the disk and every QEMU
    /// connection. If the new program cannot, the old one goes on and the
    /// reason is printed. Refused during postcopy.
    Upgrade {
        /// The gmemd program to run; by default the path the running gmemd
        /// was started from (which a package upgrade replaced).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the QEMU arguments (without the binary) that attach a VM to gmemd.
    QemuArgs {
        #[command(flatten)]
        vm: VmArgs,
        /// Print a JSON array of arguments instead of one shell-quoted line.
        #[arg(long)]
        json: bool,
    },
    /// Start QEMU attached to gmemd, wait for it, and exit with its status.
    /// SIGTERM/SIGINT/SIGHUP to gmemctl stop QEMU cleanly; QEMU never
    /// outlives gmemctl.
    Launch {
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        run: QemuRun,
    },
    /// Move a running guest to a new QEMU on the same host (cpr-transfer,
    /// cpr-exec); RAM and disk stay in gmemd.
    #[command(long_about = live_update::LONG_ABOUT, after_help = live_update::EXAMPLES)]
    LiveUpdate(live_update::LiveUpdateArgs),
}

/// Which QEMU runs and where its stderr goes.
#[derive(Debug, Args)]
struct QemuRun {
    /// The QEMU binary to run (live-update: the new one), e.g. the QEMU 11
    /// from scripts/qemu-next for cpr-exec.
    #[arg(long, value_name = "BINARY", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Append QEMU's stderr to this file instead of inheriting gmemctl's;
    /// with --downtime-trace it holds QEMU's downtime checkpoints, which
    /// live-update reads (give it the same file).
    #[arg(long, value_name = "PATH")]
    qemu_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct Format {
    /// Print the daemon's reply as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The VM's own settings; RAM, disk socket and queues come from gmemd.
#[derive(Debug, Args)]
struct VmArgs {
    /// Kernel to boot directly (-kernel).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (-initrd).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line (-append), e.g. 'console=ttyS0'.
    #[arg(long, value_name = "CMDLINE")]
    append: Option<String>,
    /// Machine type: `pc` is each QEMU release's newest i440FX machine; a
    /// guest to be live-updated to another QEMU release needs a versioned
    /// one, e.g. pc-i440fx-10.0 (see `qemu-system-x86_64 -machine help`).
    #[arg(long, value_name = "TYPE", default_value = gmem_qemu::cmdline::DEFAULT_MACHINE_TYPE)]
    machine_type: String,
    /// Accelerator: tcg (-cpu max) or kvm (-cpu host).
    #[arg(long, value_name = "tcg|kvm", default_value = "tcg")]
    accel: Accel,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1")]
    cpus: NonZeroU32,
    /// Guest serial console: stdio, none or file:PATH.
    #[arg(long, value_name = "SINK", default_value = "stdio")]
    serial: SerialSink,
    /// QMP unix socket for QEMU to create (launch: a temporary one if unset).
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// How often QEMU retries gmemd's vhost-user socket, in milliseconds.
    #[arg(long, value_name = "MS", default_value = "1000")]
    reconnect_ms: u64,
    /// Add aux-ram-share=on to -machine, so that ROMs and ACPI tables are
    /// shared memory a live update can carry over (needed by live-update).
    #[arg(long)]
    aux_ram_share: bool,
    /// Add -trace vmstate_downtime_checkpoint -msg timestamp=on: QEMU logs
    /// each step of a migration's downtime on stderr, from which
    /// live-update reports QEMU's own downtime figure.
    #[arg(long)]
    downtime_trace: bool,
    /// Start as a migration destination (-incoming): `defer` for
    /// `gmemctl migrate`, which sets capabilities and then starts listening.
    #[arg(long, value_name = "defer|URI")]
    incoming: Option<String>,
    /// Further QEMU arguments, appended verbatim after `--`.
    #[arg(last = true, value_name = "QEMU ARGS")]
    extra: Vec<String>,
}

impl VmArgs {
    fn build(&self, client: &mut ControlClient) -> Result<QemuCommand> {
        let mut cmd = QemuCommand::for_daemon(client)
            .context("building the QEMU command line from gmemd's replies")?
            .accel(self.accel)
            .machine_type(&self.machine_type)
            .cpus(self.cpus)
            .serial(self.serial.clone())
            .reconnect_ms(self.reconnect_ms)
            .aux_ram_share(self.aux_ram_share)
            .downtime_trace(self.downtime_trace);
        if let Some(incoming) = &self.incoming {
            cmd = cmd.extra_args(["-incoming", incoming]);
        }
        cmd = cmd.extra_args(self.extra.iter().cloned());
        if let Some(kernel) = &self.kernel {
            cmd = cmd.kernel(kernel);
        }
        if let Some(initrd) = &self.initrd {
            cmd = cmd.initrd(initrd);
        }
        if let Some(append) = &self.append {
            cmd = cmd.append(append);
        }
        if let Some(qmp) = &self.qmp {
            cmd = cmd.qmp(qmp);
        }
        Ok(cmd)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gmemctl: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// line already ends with (several error types repeat their source's text).
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: Cli) -> Result<ExitCode> {
    let (command, control) = match (cli.command, cli.control) {
        (Cmd::Migrate(args), None) => {
            migrate::run(&args)?;
            return Ok(ExitCode::SUCCESS);
        }
        (Cmd::Migrate(_), Some(_)) => Cli::command()
            .error(
                ErrorKind::ArgumentConflict,
                "migrate takes gmemd's control sockets in --from and --to \
                 (qmp=PATH,control=PATH), not --control",
            )
            .exit(),
        (Cmd::Gmemd(command), Some(control)) => (command, control),
        (Cmd::Gmemd(_), None) => Cli::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "--control PATH (gmemd's control socket) is required for this command",
            )
            .exit(),
    };
    let mut client = ControlClient::connect(&control)
        .with_context(|| format!("connecting to gmemd's control socket {}", control.display()))?;
    match command {
        GmemdCmd::Status(format) => {
            let status = client.query_status().context("query-status")?;
            tables::print(format.json, &status, tables::status)?;
        }
        GmemdCmd::Regions(format) => {
            let regions = client.query_regions().context("query-regions")?;
            tables::print(format.json, regions.as_slice(), tables::regions)?;
        }
        GmemdCmd::Device(format) => {
            let device = client.query_device().context("query-device")?;
            tables::print(format.json, &device, tables::device)?;
        }
        GmemdCmd::Pins(format) => {
            let pins = client.query_pins().context("query-pins")?;
            tables::print(format.json, &pins, tables::pins)?;
        }
        GmemdCmd::PostcopyAbort => {
            let reply: serde_json::Value =
                client.execute(&gmem_protocol::Command::PostcopyAbort).context("postcopy-abort")?;
            let dropped = reply.get("dropped").and_then(serde_json::Value::as_bool).unwrap_or(false);
            println!("{}", if dropped { "postcopy registration dropped" } else { "no orphaned postcopy registration" });
        }
        GmemdCmd::Upgrade { binary, json } => {
            let binary = binary.map(|b| std::path::absolute(&b).unwrap_or(b));
            let binary = match &binary {
                Some(path) => Some(path.to_str().context("--binary must be a UTF-8 path")?),
                None => None,
            };
            let info = client.upgrade(binary).context("upgrade")?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!(
                    "gmemd {} -> {} ({}), pid {}: {} frontend connections carried over, device paused {} µs",
                    info.from_version, info.to_version, info.binary, info.pid, info.frontends, info.paused_us
                );
            }
        }
        GmemdCmd::QemuArgs { vm, json } => {
            let args = vm.build(&mut client)?.to_args();
            if json {
                println!("{}", serde_json::to_string(&args)?);
            } else {
                println!("{}", gmem_qemu::quote::shell_join(&args));
            }
        }
        GmemdCmd::Launch { vm, run } => {
            let cmd = vm.build(&mut client)?.qemu_binary(run.qemu);
            drop(client);
            return launch(cmd, vm.qmp.is_none(), run.qemu_log);
        }
        GmemdCmd::LiveUpdate(args) => live_update::run(&args, &mut client)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs QEMU to completion and turns its exit status into ours.
fn launch(cmd: QemuCommand, temporary_qmp: bool, log: Option<PathBuf>) -> Result<ExitCode> {
    // A QMP socket is always there, so the VM can be inspected or stopped
    // while it runs; the temporary one goes away with its directory.
    let qmp_dir = if temporary_qmp { Some(tempfile::Builder::new().prefix("gmemctl-").tempdir()?) } else { None };
    let cmd = match &qmp_dir {
        Some(dir) => cmd.qmp(dir.path().join("qmp.sock")),
        None => cmd,
    };
    forward_termination_signals().context("installing signal handlers")?;
    let options = SpawnOptions {
        stderr: log.map_or(Output::Inherit, Output::Append),
        stop_with_parent: true,
        ..SpawnOptions::default()
    };
    let mut qemu = QemuProcess::spawn_with(&cmd, &options).context("starting QEMU")?;
    QEMU_PID.store(i32::try_from(qemu.pid()).unwrap_or(0), Ordering::SeqCst);
    if STOP_REQUESTED.load(Ordering::SeqCst) {
        // A signal came while QEMU was starting.
        stop_qemu();
    }
    if let Some(qmp) = cmd.qmp_path() {
        log::info!("QEMU pid {}, QMP socket {}", qemu.pid(), qmp.display());
        report_run_state(qmp.to_owned());
    }
    let status = qemu.wait().context("waiting for QEMU")?;
    log::info!("QEMU exited: {status}");
    // Shells report death by signal N as 128 + N; do the same.
    let code = status.code().or_else(|| status.signal().map(|signal| 128 + signal)).unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// QEMU's pid for the signal handler; 0 until QEMU runs.
static QEMU_PID: AtomicI32 = AtomicI32::new(0);
/// Set by the signal handler, for a signal that came before QEMU ran.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// SIGTERM, SIGINT and SIGHUP to `gmemctl launch` stop QEMU (with SIGTERM,
/// which QEMU handles as a clean shutdown) instead of leaving it running;
/// gmemctl then exits with QEMU's status. (If gmemctl itself is killed,
/// PR_SET_PDEATHSIG stops QEMU.)
fn forward_termination_signals() -> std::io::Result<()> {
    extern "C" fn on_signal(_signal: libc::c_int) {
        STOP_REQUESTED.store(true, Ordering::SeqCst);
        stop_qemu();
    }
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; sa_sigaction gets a handler
        // that only touches atomics and calls kill, both async-signal-safe.
        // SA_RESTART keeps the wait for QEMU going.
        let result = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends QEMU SIGTERM once it runs; async-signal-safe.
fn stop_qemu() {
    let pid = QEMU_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill takes a pid and a signal number by value.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Logs the guest's run state once QEMU answers on QMP, without holding up
/// the wait for QEMU (which may be blocked connecting to gmemd meanwhile).
fn report_run_state(qmp: PathBuf) {
    std::thread::spawn(move || {
        let state = QmpClient::connect(&qmp, Duration::from_secs(10)).and_then(|mut client| client.query_status());
        match state {
            Ok(state) => log::info!("guest is {state}"),
            Err(e) => log::debug!("no run state from {}: {e}", qmp.display()),
        }
    });
}
