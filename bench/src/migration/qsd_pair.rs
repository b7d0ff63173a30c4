//! [`QsdPair`]: the qemu-storage-daemon counterpart of the harness's
//! `MigrationPair`. Two hosts; on each a qemu-storage-daemon exporting the
//! same raw image as vhost-user-blk (shared storage, `locking=off`) and a
//! QEMU owning its RAM (`memory-backend-memfd,share=on`); the source boots
//! the guest, the destination waits with `-incoming defer`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use gmem_protocol::ControlClient;
use gmem_qemu::quote::{qemu_opt_value, shell_join};
use gmem_qemu::QmpClient;
use gmem_tests::{GuestImage, HostPair};

use super::testbed::Testbed;
use super::Settings;
use crate::backends::{agent_command_line, QEMU};
use crate::qsd::{qsd_args, qsd_qemu_args, read, start_qsd, Guard, Machine, ScratchDir};

/// How long QEMU may take to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One host's QEMU and qemu-storage-daemon, with their files.
#[derive(Debug)]
pub struct QsdHost {
    /// QEMU; dropped (killed) before the daemon.
    qemu: Guard,
    /// qemu-storage-daemon.
    pub daemon: Guard,
    /// The guest console.
    serial: PathBuf,
    qmp: PathBuf,
    /// QEMU's output.
    pub qemu_log: PathBuf,
    /// qemu-storage-daemon's output.
    pub daemon_log: PathBuf,
    /// The command lines that started the daemon and QEMU.
    commands: Vec<String>,
}

impl QsdHost {
    /// Starts the daemon on `disk` in namespace `netns`, then QEMU (as a
    /// migration destination if `incoming`), naming files after `side`.
    fn start(
        side: &str,
        netns: &str,
        incoming: bool,
        disk: &Path,
        machine: &Machine<'_>,
        qsd: &Path,
        dir: &ScratchDir,
    ) -> Result<QsdHost> {
        let at = |what: &str| dir.join(&format!("{side}.{what}"));
        let (socket, serial, qmp) = (at("vhost.sock"), at("serial"), at("qmp"));
        let (qemu_log, daemon_log) = (at("qemu.log"), at("qsd.log"));
        let daemon_args = qsd_args(disk, &socket, true);
        let daemon = start_qsd(qsd, Some(netns), &daemon_args, &socket, &daemon_log)
            .with_context(|| format!("starting the {side} qemu-storage-daemon"))?;
        let mut qemu_args = qsd_qemu_args(machine, &socket, &serial);
        let qmp_path = qmp.to_string_lossy();
        qemu_args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qemu_opt_value(&qmp_path))]);
        if incoming {
            qemu_args.extend(["-incoming".into(), "defer".into()]);
        }
        let qemu = Guard::spawn("QEMU", Some(netns), Path::new(QEMU), &qemu_args, &qemu_log)
            .with_context(|| format!("starting the {side} QEMU"))?;
        let commands = vec![
            shell_join(std::iter::once(qsd.display().to_string()).chain(daemon_args)),
            shell_join(std::iter::once(QEMU.to_string()).chain(qemu_args)),
        ];
        Ok(QsdHost { qemu, daemon, serial, qmp, qemu_log, daemon_log, commands })
    }

    fn connect_qmp(&mut self) -> Result<QmpClient> {
        let qemu = &mut self.qemu;
        QmpClient::connect_while(&self.qmp, QMP_CONNECT_TIMEOUT, || matches!(qemu.try_wait(), Ok(None)))
            .with_context(|| format!("QMP of QEMU; its output:\n{}", read(&self.qemu_log)))
    }
}

/// Source and destination on qemu-storage-daemon, ready to migrate;
/// dropping it stops both QEMUs, both daemons, deletes the namespaces and
/// then the files.
#[derive(Debug)]
pub struct QsdPair {
    /// The running guest's host.
    pub source: QsdHost,
    /// The destination host.
    pub dest: QsdHost,
    hosts: HostPair,
    /// The image, sockets and logs; removed last.
    _dir: ScratchDir,
}

impl QsdPair {
    /// Creates the hosts and a fresh image, starts both daemons, boots the
    /// source guest with `settings`' seqio workload and starts the
    /// destination QEMU.
    pub fn start(settings: &Settings, image: &GuestImage, qsd: &Path, seed: u64) -> Result<QsdPair> {
        let hosts = HostPair::create()?;
        let dir = ScratchDir::new("gmem-bench-qsd-migration")?;
        let disk = dir.join("disk.raw");
        File::create(&disk)?.set_len(settings.disk_bytes())?;
        let append = agent_command_line("seqio", &settings.agent_params(seed));
        let machine =
            Machine { memory_mib: settings.memory_mib, cpus: 1, image, append: &append, aux_ram_share: false };
        let source = QsdHost::start("src", hosts.src_ns(), false, &disk, &machine, qsd, &dir)?;
        let dest = QsdHost::start("dst", hosts.dst_ns(), true, &disk, &machine, qsd, &dir)?;
        Ok(QsdPair { source, dest, hosts, _dir: dir })
    }

    /// The command lines of the source's daemon and QEMU (the destination's
    /// differ only in file names and `-incoming defer`).
    pub fn commands(&self) -> &[String] {
        &self.source.commands
    }
}

impl Testbed for QsdPair {
    fn hosts(&self) -> &HostPair {
        &self.hosts
    }

    fn consoles(&self) -> Vec<PathBuf> {
        vec![self.source.serial.clone(), self.dest.serial.clone()]
    }

    fn qmp(&mut self) -> Result<(QmpClient, QmpClient)> {
        Ok((self.source.connect_qmp()?, self.dest.connect_qmp()?))
    }

    fn gmemd(&self) -> Result<Option<(ControlClient, ControlClient)>> {
        Ok(None)
    }

    fn diagnostics(&self) -> String {
        let (src, dst) = (&self.source, &self.dest);
        format!(
            "consoles:\n{}\n{}\nsource QEMU:\n{}\ndestination QEMU:\n{}\nsource qemu-storage-daemon:\n{}\ndestination qemu-storage-daemon:\n{}",
            read(&src.serial),
            read(&dst.serial),
            read(&src.qemu_log),
            read(&dst.qemu_log),
            read(&src.daemon_log),
            read(&dst.daemon_log)
        )
    }

    fn qemu_logs(&self) -> (String, String) {
        (read(&self.source.qemu_log), read(&self.dest.qemu_log))
    }

    fn qemu_pids(&self) -> (u32, u32) {
        (self.source.qemu.id(), self.dest.qemu.id())
    }
}
