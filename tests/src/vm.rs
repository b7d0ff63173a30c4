//! `Vm`: a real QEMU booting the test guest on a gmemd.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gmem_qemu::live_update::{self, HopOptions};
use gmem_qemu::{CprMode, HopReport, NextQemu, Output, QemuCommand, QemuProcess, QmpClient, SerialSink, SpawnOptions};

use crate::daemon::Gmemd;
use crate::guest::{agent_append, run_path_script, AgentResults, GuestImage};

/// The QEMU with cpr-exec (10.2 or later) that `scripts/qemu-next`
/// provides: a wrapper in `~/.cache/gmemd/trixie-qemu/bin`, built on first
/// use (debootstrap, about a minute; later a check of milliseconds). Runs
/// the script once per process and remembers a failure, as
/// [`GuestImage::ensure`] does; a test that needs it fails without it.
pub fn qemu_next() -> Result<PathBuf> {
    static QEMU: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    QEMU.get_or_init(|| run_path_script("qemu-next").map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

/// How to start a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Names the VM's files in its gmemd's directory: `<name>.serial` (the
    /// guest console), `<name>.qmp` (QMP socket), `<name>.qemu.log` (QEMU's
    /// stderr).
    pub name: String,
    /// vCPUs, at least 1.
    pub cpus: u32,
    /// The guest agent to run, with its parameters (see [`agent_append`]).
    pub agent: String,
    /// The agent's parameters.
    pub params: Vec<(String, String)>,
    /// More words for the guest kernel's command line, e.g.
    /// `memmap=16M$0x10000000` to keep the guest off part of its RAM.
    pub kernel_args: Vec<String>,
    /// A named network namespace to run QEMU in, e.g. a
    /// [`HostPair`](crate::net::HostPair) side.
    pub netns: Option<String>,
    /// Start as a live-migration destination: `-incoming defer`, so QEMU
    /// waits for `migrate-incoming` on QMP instead of booting. The kernel,
    /// initrd and command line stay those of the agent, so the machine
    /// matches a source started with the same options.
    pub incoming: bool,
    /// The QEMU binary; `None` is `qemu-system-x86_64` from PATH.
    pub qemu: Option<PathBuf>,
    /// The machine type; `None` is [`QemuCommand`]'s default (`pc`).
    pub machine_type: Option<String>,
    /// Ready for [`Vm::live_update`]: `aux-ram-share=on`, and the downtime
    /// trace in QEMU's log.
    pub cpr: bool,
    /// Further QEMU arguments, e.g. `-no-shutdown`, or `-trace EVENT` to
    /// log a trace event in [`Vm::qemu_log`] (each line
    /// `tid@seconds.micros:event args`).
    pub qemu_args: Vec<String>,
}

impl VmOptions {
    /// One vCPU running `agent` with no parameters, in our namespace, booting.
    pub fn new(name: &str, agent: &str) -> VmOptions {
        VmOptions {
            name: name.to_owned(),
            cpus: 1,
            agent: agent.to_owned(),
            params: Vec::new(),
            kernel_args: Vec::new(),
            netns: None,
            incoming: false,
            qemu: None,
            machine_type: None,
            cpr: false,
            qemu_args: Vec::new(),
        }
    }

    /// Adds the agent parameter `key=value`.
    pub fn param(mut self, key: &str, value: impl ToString) -> VmOptions {
        self.params.push((key.to_owned(), value.to_string()));
        self
    }
}

/// A running QEMU with the test guest; QEMU is killed on drop.
#[derive(Debug)]
pub struct Vm {
    qemu: QemuProcess,
    options: VmOptions,
    serial: PathBuf,
    qmp: PathBuf,
    qemu_log: PathBuf,
    /// The gmemd it runs on, for diagnostics.
    gmemd_log: PathBuf,
    gmemd_control: PathBuf,
}

impl Vm {
    /// Boots the guest on `gmemd` with `cpus` vCPUs and runs `agent`.
    pub fn boot(gmemd: &Gmemd, name: &str, cpus: u32, agent: &str, params: &[(&str, &str)]) -> Result<Vm> {
        let mut options = VmOptions { cpus, ..VmOptions::new(name, agent) };
        for (key, value) in params {
            options = options.param(key, value);
        }
        Vm::start(gmemd, &options)
    }

    /// Starts QEMU on `gmemd` as `options` say, with a QMP socket.
    pub fn start(gmemd: &Gmemd, options: &VmOptions) -> Result<Vm> {
        let dir = gmemd.dir.path();
        let serial = dir.join(format!("{}.serial", options.name));
        let qmp = dir.join(format!("{}.qmp", options.name));
        let qemu_log = dir.join(format!("{}.qemu.log", options.name));
        let mut command = Vm::command(gmemd, options, &serial, &qmp)?;
        if options.incoming {
            command = command.extra_args(["-incoming", "defer"]);
        }
        let spawn = SpawnOptions {
            stdout: Output::Null,
            stderr: Output::File(qemu_log.clone()),
            netns: options.netns.clone(),
            ..SpawnOptions::default()
        };
        let qemu = QemuProcess::spawn_with(&command, &spawn).context("starting QEMU")?;
        Ok(Vm {
            qemu,
            options: options.clone(),
            serial,
            qmp,
            qemu_log,
            gmemd_log: gmemd.log_path(),
            gmemd_control: gmemd.control.clone(),
        })
    }

    /// The command line for `options` on `gmemd` as it is now (its regions'
    /// `/proc/<pid>/fd/<n>` paths), without `-incoming`.
    fn command(gmemd: &Gmemd, options: &VmOptions, serial: &Path, qmp: &Path) -> Result<QemuCommand> {
        let image = GuestImage::ensure()?;
        let params: Vec<(&str, &str)> = options.params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut append = agent_append(&options.agent, &params);
        for word in &options.kernel_args {
            append.push(' ');
            append.push_str(word);
        }
        let mut command = QemuCommand::for_daemon(&mut gmemd.client()?)?
            .kernel(&image.kernel)
            .initrd(&image.initrd)
            .append(append)
            .cpus(std::num::NonZeroU32::new(options.cpus).context("cpus must be at least 1")?)
            .serial(SerialSink::File(serial.to_owned()))
            .qmp(qmp)
            .aux_ram_share(options.cpr)
            .downtime_trace(options.cpr);
        if let Some(qemu) = &options.qemu {
            command = command.qemu_binary(qemu);
        }
        if let Some(machine_type) = &options.machine_type {
            command = command.machine_type(machine_type);
        }
        Ok(command.extra_args(options.qemu_args.iter().cloned()))
    }

    /// Moves the guest to a new QEMU (`mode`), its command line regenerated
    /// from `gmemd`: [`gmem_qemu::live_update::hop`] with the hop's files
    /// in gmemd's directory and the new QEMU's stderr appended to this
    /// VM's log. After a cpr-transfer this `Vm` is the new QEMU, and the
    /// old one (killed by the hop) is reaped. Needs [`VmOptions::cpr`].
    pub fn live_update(&mut self, gmemd: &Gmemd, mode: CprMode) -> Result<HopReport> {
        self.live_update_to(gmemd, mode, self.options.qemu.clone())
    }

    /// [`live_update`](Self::live_update) to another QEMU binary (`None`:
    /// the one on PATH), which this `Vm` runs from then on.
    pub fn live_update_to(&mut self, gmemd: &Gmemd, mode: CprMode, qemu: Option<PathBuf>) -> Result<HopReport> {
        let after = VmOptions { qemu, ..self.options.clone() };
        let command = Vm::command(gmemd, &after, &self.serial, &self.qmp)?;
        let next = NextQemu::from_command(&command)?;
        let options = HopOptions {
            trace_log: Some(self.qemu_log.clone()),
            spawn: SpawnOptions {
                stdout: Output::Null,
                stderr: Output::Append(self.qemu_log.clone()),
                netns: self.options.netns.clone(),
                ..SpawnOptions::default()
            },
            ..HopOptions::new(mode, gmemd.dir.path())
        };
        let qmp = self.qmp()?;
        let hop = live_update::hop(qmp, &next, &options, |step| log::info!("{mode}: {step:?}"))
            .with_context(|| format!("{mode} of QEMU {}; {}", self.pid(), self.diagnostics()))?;
        if let Some(new) = hop.spawned {
            self.qemu = new;
        }
        self.options = after;
        Ok(hop.report)
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// QEMU's QMP socket.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// A new QMP connection (capabilities negotiated), waiting for QEMU to
    /// open its socket.
    pub fn qmp(&mut self) -> Result<QmpClient> {
        self.qemu.qmp().with_context(|| format!("QMP of QEMU {}; its log:\n{}", self.pid(), self.qemu_log()))
    }

    /// The file QEMU writes the guest console to.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// What the guest printed so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// What QEMU printed on stderr so far.
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(&self.qemu_log).unwrap_or_default()
    }

    /// Waits until the guest printed a result with `key`, QEMU exits, or
    /// `timeout` passes.
    pub fn wait_for(&mut self, key: &str, timeout: Duration) -> Result<AgentResults> {
        self.wait_until(&format!("'{key}'"), timeout, |results| results.get(key).is_some())
    }

    /// Waits until the guest reported progress `key` of at least `count`
    /// (see [`AgentResults::progress`]), QEMU exits, or `timeout` passes.
    pub fn wait_for_progress(&mut self, key: &str, count: u64, timeout: Duration) -> Result<AgentResults> {
        self.wait_until(&format!("progress {key}>={count}"), timeout, |results| {
            results.progress(key).is_some_and(|done| done >= count)
        })
    }

    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&AgentResults) -> bool,
    ) -> Result<AgentResults> {
        let deadline = Instant::now() + timeout;
        loop {
            let results = AgentResults::parse(&self.serial_text());
            if done(&results) {
                return Ok(results);
            }
            if let Some(status) = self.qemu.try_wait()? {
                bail!("QEMU exited ({status}) before the guest reported {what}; {}", self.diagnostics());
            }
            if Instant::now() > deadline {
                bail!("no {what} from the guest within {timeout:?}; {}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the agent to finish and the guest to power off.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<AgentResults> {
        match self.qemu.wait_timeout(timeout)? {
            Some(_) => {
                let results = AgentResults::parse(&self.serial_text());
                match results.exit_code() {
                    Some(0) => Ok(results),
                    code => bail!("the guest agent failed (exit {code:?}); {}", self.diagnostics()),
                }
            }
            None => bail!("the guest did not power off within {timeout:?}; {}", self.diagnostics()),
        }
    }

    /// SIGKILLs QEMU, as a crash would end it.
    pub fn kill(&mut self) -> Result<()> {
        self.qemu.kill()?;
        Ok(())
    }

    /// The serial console, QEMU's log, and gmemd's log and device figures,
    /// for error messages.
    fn diagnostics(&self) -> String {
        let gmemd_log = std::fs::read_to_string(&self.gmemd_log).unwrap_or_default();
        let tail: Vec<&str> = gmemd_log.lines().rev().take(40).collect();
        let device = gmem_protocol::ControlClient::connect(&self.gmemd_control).and_then(|mut c| c.query_device());
        format!(
            "serial:\n{}\nQEMU's log:\n{}\ngmemd's log (last lines):\n{}\ngmemd's device: {device:?}",
            self.serial_text(),
            self.qemu_log(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}
