//! The guest a `gmem-bench cpr` run moves: on gmemd (the test harness's
//! `Gmemd` and `Vm`) or QEMU-owned RAM with qemu-storage-daemon.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use gmem_qemu::cmdline::DOWNTIME_TRACE_ARGS;
use gmem_qemu::live_update::{self, HopOptions};
use gmem_qemu::quote::{qemu_opt_value, shell_join};
use gmem_qemu::{CprMode, HopReport, NextQemu, Output, ProcessHandle, QemuProcess, SpawnOptions};
use gmem_tests::seqio::{self, SeqioReport};
use gmem_tests::{poll_until, AgentResults, Gmemd, GmemdOptions, GuestImage, Vm, VmOptions};

use super::Settings;
use crate::backends::agent_command_line;
use crate::qsd::{qsd_args, qsd_qemu_args, read, start_qsd, Guard, Machine, ScratchDir};

/// A running guest that can be moved to a new QEMU.
pub trait Guest {
    /// Its console (the progress lines).
    fn serial(&self) -> PathBuf;
    /// One live update hop.
    fn hop(&mut self, mode: CprMode) -> Result<HopReport>;
    /// Waits for the agent to finish and checks the guest's and the
    /// image's verdicts: a run that lost data measures nothing.
    fn finish(&mut self, settings: &Settings, seed: u64) -> Result<()>;
    /// The command lines that started the backend and QEMU.
    fn commands(&self) -> Result<Vec<String>>;
}

/// The guest's agent, its verdict, and the image's.
fn check_results(results: &AgentResults, disk: &Path, settings: &Settings, seed: u64) -> Result<()> {
    let report = SeqioReport::from_results(results)?;
    ensure!(report.blocks == settings.blocks() && report.is_clean(), "the guest found lost data: {report:?}");
    let disk_sum = seqio::verify_disk(disk, settings.blocks(), seed)?;
    ensure!(disk_sum == report.sum, "the image's checksum is not the guest's");
    Ok(())
}

/// gmemd owns the RAM; QEMU maps it through `/proc/<gmemd>/fd/<n>`.
pub struct GmemdGuest {
    gmemd: Gmemd,
    vm: Vm,
}

impl GmemdGuest {
    /// Starts gmemd and boots the guest on `qemu`.
    pub fn start(settings: &Settings, qemu: &Path, seed: u64) -> Result<Self> {
        let gmemd = Gmemd::start(&GmemdOptions {
            memory: format!("{}M", settings.memory_mib),
            disk_bytes: settings.disk_bytes(),
            ..GmemdOptions::default()
        })?;
        let mut options = VmOptions { qemu: Some(qemu.to_owned()), cpr: true, ..VmOptions::new("cpr", "seqio") };
        for (key, value) in settings.agent_params(seed) {
            options = options.param(key, value);
        }
        let vm = Vm::start(&gmemd, &options)?;
        Ok(GmemdGuest { gmemd, vm })
    }
}

impl GmemdGuest {
    /// `upgrade`: gmemd execs its own program again; returns its reply.
    pub fn upgrade(&self) -> Result<gmem_protocol::UpgradeInfo> {
        Ok(self.gmemd.client()?.upgrade(None)?)
    }

    /// Kills gmemd with SIGKILL and starts it again at once; returns the
    /// time until the new one answers on its control socket.
    pub fn crash_and_restart(&mut self) -> Result<Duration> {
        let began = std::time::Instant::now();
        self.gmemd.crash()?;
        self.gmemd.restart()?;
        Ok(began.elapsed())
    }
}

impl Guest for GmemdGuest {
    fn serial(&self) -> PathBuf {
        self.vm.serial_path().to_owned()
    }

    fn hop(&mut self, mode: CprMode) -> Result<HopReport> {
        self.vm.live_update(&self.gmemd, mode)
    }

    fn finish(&mut self, settings: &Settings, seed: u64) -> Result<()> {
        let results = self.vm.wait_exit(settings.timeout())?;
        check_results(&results, &self.gmemd.disk, settings, seed)
    }

    /// As the two processes run, from `/proc/<pid>/cmdline`.
    fn commands(&self) -> Result<Vec<String>> {
        [self.gmemd.pid(), self.vm.pid()]
            .into_iter()
            .map(|pid| {
                let argv = ProcessHandle::open(pid)?.cmdline()?;
                Ok(shell_join(argv))
            })
            .collect()
    }
}

/// QEMU owns the RAM (`memory-backend-memfd,share=on`); the disk is
/// qemu-storage-daemon's vhost-user-blk export.
pub struct QsdGuest {
    dir: ScratchDir,
    qsd: PathBuf,
    daemon: Guard,
    /// Daemons started so far, for their log names.
    daemons: usize,
    qemu: QemuProcess,
    next: NextQemu,
    commands: Vec<String>,
}

impl QsdGuest {
    /// Starts qemu-storage-daemon on a fresh image and boots the guest on
    /// `qemu`.
    pub fn start(settings: &Settings, image: &GuestImage, qemu: &Path, qsd: &Path, seed: u64) -> Result<Self> {
        let dir = ScratchDir::new("gmem-bench-cpr")?;
        File::create(dir.join("disk.raw"))?.set_len(settings.disk_bytes())?;
        let daemon_args = qsd_args(&dir.join("disk.raw"), &dir.join("vhost.sock"), true);
        let daemon = start_qsd(qsd, None, &daemon_args, &dir.join("vhost.sock"), &dir.join("qsd-0.log"))?;
        let append = agent_command_line("seqio", &settings.agent_params(seed));
        let machine = Machine { memory_mib: settings.memory_mib, cpus: 1, image, append: &append, aux_ram_share: true };
        let qmp = dir.join("qemu.qmp");
        let mut args = qsd_qemu_args(&machine, &dir.join("vhost.sock"), &dir.join("serial"));
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qemu_opt_value(&qmp.to_string_lossy()))]);
        args.extend(DOWNTIME_TRACE_ARGS.map(String::from));
        let next = NextQemu { binary: qemu.to_owned(), args, qmp };
        let spawn = SpawnOptions {
            stdout: Output::Null,
            stderr: Output::File(dir.join("qemu.log")),
            ..SpawnOptions::default()
        };
        let qemu =
            QemuProcess::spawn_argv(&next.binary, &next.args, Some(&next.qmp), &spawn).context("starting QEMU")?;
        let commands = vec![
            shell_join(std::iter::once(qsd.display().to_string()).chain(daemon_args)),
            shell_join(std::iter::once(next.binary.display().to_string()).chain(next.args.clone())),
        ];
        Ok(QsdGuest { dir, qsd: qsd.to_owned(), daemon, daemons: 1, qemu, next, commands })
    }

    /// qemu-storage-daemon serves one vhost-user client at a time, and a
    /// cpr-transfer's new QEMU connects while the old one still is (with
    /// one daemon the two deadlock): a second daemon on the same image
    /// (`locking=off`) takes over the socket path, so that the command line
    /// stays the same. The old daemon keeps serving the old QEMU's
    /// connection until that QEMU is gone.
    fn second_daemon(&mut self) -> Result<Guard> {
        let socket = self.dir.join("vhost.sock");
        let inode = std::fs::metadata(&socket)?.ino();
        let args = qsd_args(&self.dir.join("disk.raw"), &socket, true);
        let log = self.dir.join(&format!("qsd-{}.log", self.daemons));
        self.daemons += 1;
        let daemon = start_qsd(&self.qsd, None, &args, &socket, &log)?;
        poll_until("the second qemu-storage-daemon to take over the socket", Duration::from_secs(20), || {
            std::fs::metadata(&socket).ok().filter(|m| m.ino() != inode).map(drop)
        })?;
        Ok(daemon)
    }
}

impl QsdGuest {
    /// What upgrading qemu-storage-daemon takes: stop it (SIGTERM) and start
    /// a new one on the same image and socket, which QEMU reconnects to
    /// (`reconnect-ms`). Returns the time until the new one listens.
    pub fn restart_daemon(&mut self) -> Result<Duration> {
        let began = std::time::Instant::now();
        self.daemon.stop()?;
        let socket = self.dir.join("vhost.sock");
        let args = qsd_args(&self.dir.join("disk.raw"), &socket, true);
        let log = self.dir.join(&format!("qsd-{}.log", self.daemons));
        self.daemons += 1;
        self.daemon = start_qsd(&self.qsd, None, &args, &socket, &log)?;
        Ok(began.elapsed())
    }
}

impl Guest for QsdGuest {
    fn serial(&self) -> PathBuf {
        self.dir.join("serial")
    }

    fn hop(&mut self, mode: CprMode) -> Result<HopReport> {
        let daemon = match mode {
            CprMode::CprTransfer => Some(self.second_daemon()?),
            CprMode::CprExec => None,
        };
        let log = self.dir.join("qemu.log");
        let options = HopOptions {
            trace_log: Some(log.clone()),
            spawn: SpawnOptions {
                stdout: Output::Null,
                stderr: Output::Append(log.clone()),
                ..SpawnOptions::default()
            },
            ..HopOptions::new(mode, self.dir.path())
        };
        let qmp = self.qemu.qmp().context("QMP")?;
        let hop = live_update::hop(qmp, &self.next, &options, |_| {})
            .with_context(|| format!("{mode}; QEMU's log:\n{}", read(&log)))?;
        if let Some(new) = hop.spawned {
            self.qemu = new;
        }
        if let Some(daemon) = daemon {
            // The old QEMU is gone: its daemon has nobody left to serve.
            self.daemon = daemon;
        }
        Ok(hop.report)
    }

    fn finish(&mut self, settings: &Settings, seed: u64) -> Result<()> {
        if self.qemu.wait_timeout(settings.timeout())?.is_none() {
            bail!("the guest did not finish within {:?}; serial:\n{}", settings.timeout(), read(&self.serial()));
        }
        let results = AgentResults::parse(&read(&self.serial()));
        check_results(&results, &self.dir.join("disk.raw"), settings, seed)
    }

    fn commands(&self) -> Result<Vec<String>> {
        Ok(self.commands.clone())
    }
}
