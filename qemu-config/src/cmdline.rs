//! [`QemuCommand`]: the QEMU command line that attaches a VM to gmemd.
//!
//! Guest RAM is always gmemd's. The first region becomes the machine's main
//! RAM (`-machine pc,memory-backend=<id>`); every further region is plugged as
//! a `pc-dimm`. Each region is a `memory-backend-file` with `share=on` whose
//! `mem-path` is gmemd's `/proc/<pid>/fd/<n>`, so QEMU maps gmemd's pages
//! instead of allocating its own. Plain `-m` RAM is never generated.

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use gmem_protocol::{ControlClient, RegionInfo};

use crate::quote::{qemu_opt_value, shell_join};

mod choices;
mod error;
mod regions;

pub use choices::{Accel, SerialSink};
pub use error::CmdlineError;
use regions::{memory_backend, memory_option, validate_regions};

/// The id of the socket chardev the vhost-user device talks through.
pub const CHARDEV_ID: &str = "gmemd0";

/// [`QemuCommand::machine_type`] unless set otherwise.
pub const DEFAULT_MACHINE_TYPE: &str = "pc";

/// The trace event marking each step of a migration's downtime.
pub const DOWNTIME_TRACE_EVENT: &str = "vmstate_downtime_checkpoint";

/// What [`QemuCommand::downtime_trace`] adds: the event, traced to stderr,
/// with timestamps.
pub const DOWNTIME_TRACE_ARGS: [&str; 4] = ["-trace", DOWNTIME_TRACE_EVENT, "-msg", "timestamp=on"];

/// A QEMU command line attaching a VM to gmemd's RAM and vhost-user socket.
///
/// Built with [`QemuCommand::new`] or [`QemuCommand::for_daemon`], tuned with
/// the consuming setters, rendered with [`to_args`](Self::to_args) or, for a
/// human, with `Display` (a shell-quoted line starting with the binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand {
    qemu_binary: PathBuf,
    regions: Vec<RegionInfo>,
    vhost_user_socket: PathBuf,
    queues: u16,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    accel: Accel,
    machine_type: String,
    cpus: NonZeroU32,
    serial: SerialSink,
    qmp_socket: Option<PathBuf>,
    reconnect_ms: u64,
    aux_ram_share: bool,
    downtime_trace: bool,
    extra_args: Vec<String>,
}

impl QemuCommand {
    /// A command for `regions` (the first is main RAM), served by the
    /// vhost-user-blk backend at `vhost_user_socket` with `queues` queues.
    pub fn new(
        regions: &[RegionInfo],
        vhost_user_socket: impl Into<PathBuf>,
        queues: u16,
    ) -> Result<Self, CmdlineError> {
        validate_regions(regions)?;
        if queues == 0 {
            return Err(CmdlineError::ZeroQueues);
        }
        Ok(QemuCommand {
            qemu_binary: "qemu-system-x86_64".into(),
            regions: regions.to_vec(),
            vhost_user_socket: vhost_user_socket.into(),
            queues,
            kernel: None,
            initrd: None,
            append: None,
            accel: Accel::default(),
            machine_type: DEFAULT_MACHINE_TYPE.into(),
            cpus: NonZeroU32::MIN,
            serial: SerialSink::default(),
            qmp_socket: None,
            reconnect_ms: 1000,
            aux_ram_share: false,
            downtime_trace: false,
            extra_args: Vec::new(),
        })
    }

    /// Asks a running gmemd (query-status, query-regions, query-device) for
    /// its regions, vhost-user socket and queue count.
    pub fn for_daemon(client: &mut ControlClient) -> Result<Self, CmdlineError> {
        let status = client.query_status()?;
        let regions = client.query_regions()?;
        let device = client.query_device()?;
        let prefix = format!("/proc/{}/", status.pid);
        for region in regions.iter().filter(|r| !r.fd_path.starts_with(&prefix)) {
            log::warn!("region {} maps {}, not under {prefix}", region.id, region.fd_path);
        }
        let queues =
            u16::try_from(device.queues.len()).map_err(|_| CmdlineError::TooManyQueues(device.queues.len()))?;
        Self::new(&regions, status.vhost_user_socket, queues)
    }

    /// The QEMU executable (default `qemu-system-x86_64`, found via `PATH`).
    pub fn qemu_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.qemu_binary = binary.into();
        self
    }

    /// Boots this kernel directly (`-kernel`).
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// The initial ramdisk for [`kernel`](Self::kernel) (`-initrd`).
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// The kernel command line (`-append`).
    pub fn append(mut self, cmdline: impl Into<String>) -> Self {
        self.append = Some(cmdline.into());
        self
    }

    /// The accelerator (default TCG).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// The machine type (default `pc`, which each QEMU release resolves to
    /// its own newest i440FX version). A live update to another QEMU
    /// release needs the versioned type the guest started on, e.g.
    /// `pc-i440fx-10.0`, since the new QEMU must build the same machine.
    pub fn machine_type(mut self, machine_type: impl Into<String>) -> Self {
        self.machine_type = machine_type.into();
        self
    }

    /// The number of vCPUs (default 1).
    pub fn cpus(mut self, cpus: NonZeroU32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Where the guest serial console goes (default QEMU's stdout).
    pub fn serial(mut self, sink: SerialSink) -> Self {
        self.serial = sink;
        self
    }

    /// Adds a QMP server on the unix socket `path` (QEMU creates it).
    pub fn qmp(mut self, path: impl Into<PathBuf>) -> Self {
        self.qmp_socket = Some(path.into());
        self
    }

    /// How often QEMU retries the vhost-user socket after losing or failing
    /// to reach gmemd (default 1000 ms; 0 makes a missing daemon fatal).
    /// QEMU does not finish starting until it has connected once.
    pub fn reconnect_ms(mut self, ms: u64) -> Self {
        self.reconnect_ms = ms;
        self
    }

    /// Adds `aux-ram-share=on` to `-machine`, which cpr-transfer needs so
    /// that ROMs and ACPI tables are shareable too (default off).
    pub fn aux_ram_share(mut self, on: bool) -> Self {
        self.aux_ram_share = on;
        self
    }

    /// Adds `-trace vmstate_downtime_checkpoint -msg timestamp=on`: QEMU
    /// then writes a timestamped line to stderr at each step of a
    /// migration's downtime, from which [`crate::live_update`] takes QEMU's
    /// own downtime figure of a cpr-exec, which `query-migrate` cannot give
    /// (default off).
    pub fn downtime_trace(mut self, on: bool) -> Self {
        self.downtime_trace = on;
        self
    }

    /// Appends arguments after the generated ones, verbatim.
    pub fn extra_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The QEMU executable.
    pub fn binary(&self) -> &Path {
        &self.qemu_binary
    }

    /// The QMP socket, if one was configured.
    pub fn qmp_path(&self) -> Option<&Path> {
        self.qmp_socket.as_deref()
    }

    /// Where the serial console goes.
    pub fn serial_sink(&self) -> &SerialSink {
        &self.serial
    }

    /// The guest RAM regions, main RAM first.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// The arguments, without the binary. Paths are converted lossily:
    /// non-UTF-8 bytes in a path would become U+FFFD.
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["-nodefaults", "-no-reboot", "-display", "none"].map(String::from).to_vec();
        let mut push = |option: &str, value: String| args.extend([option.to_string(), value]);
        let (accel, cpu) = match self.accel {
            Accel::Tcg => ("tcg", "max"),
            Accel::Kvm => ("kvm", "host"),
        };
        push("-accel", accel.into());
        push("-cpu", cpu.into());
        push("-smp", self.cpus.to_string());
        let main = &self.regions[0];
        let aux = if self.aux_ram_share { ",aux-ram-share=on" } else { "" };
        push("-machine", format!("{},memory-backend={}{aux}", self.machine_type, main.id));
        push("-m", memory_option(&self.regions));
        for region in &self.regions {
            push("-object", memory_backend(region));
        }
        for dimm in &self.regions[1..] {
            push("-device", format!("pc-dimm,id=dimm-{0},memdev={0}", dimm.id));
        }
        let socket = self.vhost_user_socket.to_string_lossy();
        push(
            "-chardev",
            format!("socket,id={CHARDEV_ID},path={},reconnect-ms={}", qemu_opt_value(&socket), self.reconnect_ms),
        );
        push("-device", format!("vhost-user-blk-pci,chardev={CHARDEV_ID},num-queues={}", self.queues));
        args.extend(self.serial.qemu_args());
        let mut push = |option: &str, value: String| args.extend([option.to_string(), value]);
        if let Some(qmp) = &self.qmp_socket {
            let path = qmp.to_string_lossy();
            push("-qmp", format!("unix:{},server=on,wait=off", qemu_opt_value(&path)));
        }
        if let Some(kernel) = &self.kernel {
            push("-kernel", kernel.to_string_lossy().into_owned());
        }
        if let Some(initrd) = &self.initrd {
            push("-initrd", initrd.to_string_lossy().into_owned());
        }
        if let Some(append) = &self.append {
            push("-append", append.clone());
        }
        if self.downtime_trace {
            args.extend(DOWNTIME_TRACE_ARGS.map(String::from));
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

impl fmt::Display for QemuCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let binary = self.qemu_binary.to_string_lossy().into_owned();
        f.write_str(&shell_join(std::iter::once(binary).chain(self.to_args())))
    }
}

#[cfg(test)]
mod tests;
