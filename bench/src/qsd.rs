//! The qemu-storage-daemon side: its vhost-user-blk export on a fresh image
//! and a QEMU that owns its RAM as a shared memfd.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gmem_qemu::quote::{qemu_opt_value, shell_join};
use gmem_qemu::SerialSink;
use gmem_tests::{AgentResults, GuestImage};

use crate::backends::{Run, Workload, QEMU};
use crate::figures::Figures;

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    what: &'static str,
}

impl Guard {
    /// Starts `binary args` with both outputs to `log`; inside network
    /// namespace `netns` (`ip netns exec`, which execs) when given.
    pub fn spawn(what: &'static str, netns: Option<&str>, binary: &Path, args: &[String], log: &Path) -> Result<Guard> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = match netns {
            Some(netns) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns]).arg(binary);
                ip
            }
            None => Command::new(binary),
        };
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what} ({})", binary.display()))?;
        Ok(Guard { child, what })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("waiting for {}", self.what))
    }

    /// Stops it as an operator would: SIGTERM, then waits (SIGKILL after 10 s).
    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: kill takes a pid and a signal number by value.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if self.wait_timeout(Duration::from_secs(10))?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How qemu-storage-daemon opens and exports the image; the default is the
/// guest benchmarks' configuration ([`qsd_args`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QsdConfig {
    /// `locking=off` on the file node, so that a second daemon (a
    /// migration's destination) can open the image too, as two gmemds do;
    /// without it the second one fails to take the image's lock.
    pub shared_image: bool,
    /// The file driver's `aio=` (`threads` when `None`, QEMU's default).
    pub aio: Option<&'static str>,
    /// `cache.direct=on` (O_DIRECT) instead of the host page cache.
    pub direct: bool,
    /// The export's `num-queues`.
    pub queues: u16,
    /// Run the export in an `--object iothread` of its own instead of the
    /// main loop.
    pub iothread: bool,
}

impl Default for QsdConfig {
    fn default() -> Self {
        QsdConfig { shared_image: false, aio: None, direct: false, queues: 1, iothread: false }
    }
}

/// qemu-storage-daemon's arguments: the raw image through the file driver
/// (host page cache on, like gmemd's buffered I/O), exported as
/// vhost-user-blk with one queue; `shared_image` as in [`QsdConfig`].
pub fn qsd_args(disk: &Path, socket: &Path, shared_image: bool) -> Vec<String> {
    let config = QsdConfig { shared_image, ..QsdConfig::default() };
    qsd_args_with(disk, socket, &config)
}

/// qemu-storage-daemon's arguments for `config`.
pub fn qsd_args_with(disk: &Path, socket: &Path, config: &QsdConfig) -> Vec<String> {
    let (disk, socket) = (disk.to_string_lossy(), socket.to_string_lossy());
    let locking = if config.shared_image { ",locking=off" } else { "" };
    let aio = config.aio.map_or(String::new(), |aio| format!(",aio={aio}"));
    let direct = if config.direct { "on" } else { "off" };
    let mut args = Vec::new();
    if config.iothread {
        args.extend(["--object".into(), "iothread,id=iot0".into()]);
    }
    let iothread = if config.iothread { ",iothread=iot0" } else { "" };
    args.extend([
        "--blockdev".into(),
        format!(
            "driver=file,node-name=file0,filename={}{aio},cache.direct={direct}{locking}",
            qemu_opt_value(&disk)
        ),
        "--blockdev".into(),
        "driver=raw,node-name=disk0,file=file0".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={}{iothread}",
            qemu_opt_value(&socket),
            config.queues
        ),
    ]);
    args
}

/// The guest a qsd run boots: what the gmemd run's QEMU gets from gmemd
/// and the harness.
#[derive(Debug, Clone, Copy)]
pub struct Machine<'a> {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Kernel and initramfs.
    pub image: &'a GuestImage,
    /// The kernel command line (the agent and its parameters).
    pub append: &'a str,
    /// `aux-ram-share=on`, for a live update (cpr).
    pub aux_ram_share: bool,
}

/// QEMU for a qsd run: the same machine as the gmemd run, but QEMU owns
/// its RAM as a shared memfd (vhost-user needs RAM the backend can map).
pub fn qsd_qemu_args(machine: &Machine<'_>, socket: &Path, serial: &Path) -> Vec<String> {
    let bytes = machine.memory_mib << 20;
    let socket = socket.to_string_lossy();
    let mut args: Vec<String> =
        ["-nodefaults", "-no-reboot", "-display", "none", "-accel", "tcg", "-cpu", "max"].map(String::from).to_vec();
    args.extend([
        "-smp".into(),
        machine.cpus.to_string(),
        "-machine".into(),
        format!("pc,memory-backend=ram0{}", if machine.aux_ram_share { ",aux-ram-share=on" } else { "" }),
        "-m".into(),
        format!("{bytes}B"),
        "-object".into(),
        format!("memory-backend-memfd,id=ram0,share=on,size={bytes}"),
        "-chardev".into(),
        format!("socket,id=qsd0,path={},reconnect-ms=1000", qemu_opt_value(&socket)),
        "-device".into(),
        "vhost-user-blk-pci,chardev=qsd0,num-queues=1".into(),
    ]);
    // The same console as gmemd's QEMU gets: appended to, through a chardev.
    args.extend(SerialSink::File(serial.to_owned()).qemu_args());
    args.extend([
        "-kernel".into(),
        machine.image.kernel.display().to_string(),
        "-initrd".into(),
        machine.image.initrd.display().to_string(),
        "-append".into(),
        machine.append.to_string(),
    ]);
    args
}

/// A fresh directory under the system temp dir, removed on drop (the same
/// place the harness puts gmemd's image, so both images share a file system).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `<temp dir>/<prefix>-<pid>-<nanoseconds>`.
    pub fn new(prefix: &str) -> Result<ScratchDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl ScratchDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file's text, empty if it cannot be read (for error messages).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Starts qemu-storage-daemon `binary` with `args` (see [`qsd_args`]), its
/// output in `log`, and waits until it has created its vhost-user `socket`.
pub fn start_qsd(binary: &Path, netns: Option<&str>, args: &[String], socket: &Path, log: &Path) -> Result<Guard> {
    let mut daemon = Guard::spawn("qemu-storage-daemon", netns, binary, args, log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
        if let Some(status) = daemon.try_wait()? {
            bail!("qemu-storage-daemon exited during start-up ({status}); its output:\n{}", read(log));
        }
        if Instant::now() > deadline {
            bail!("qemu-storage-daemon did not create {} within 20 s; its output:\n{}", socket.display(), read(log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(daemon)
}

/// qemu-storage-daemon: a fresh sparse image of the same size, the export,
/// then QEMU booting the same guest and agent.
pub fn run_qsd(work: &Workload, image: &GuestImage, qsd: &Path) -> Result<Run> {
    let started = Instant::now();
    let dir = ScratchDir::new("gmem-bench-qsd")?;
    let (disk, socket, serial) = (dir.join("disk.raw"), dir.join("vhost.sock"), dir.join("bench.serial"));
    let (qsd_log, qemu_log) = (dir.join("qsd.log"), dir.join("qemu.log"));
    File::create(&disk)?.set_len(work.disk_mib << 20)?;

    let daemon_args = qsd_args(&disk, &socket, false);
    let _daemon = start_qsd(qsd, None, &daemon_args, &socket, &qsd_log)?;
    let append = work.append();
    let machine =
        Machine { memory_mib: work.memory_mib, cpus: work.cpus, image, append: &append, aux_ram_share: false };
    let qemu_args = qsd_qemu_args(&machine, &socket, &serial);
    let mut qemu = Guard::spawn("QEMU", None, Path::new(QEMU), &qemu_args, &qemu_log)?;
    let status = qemu.wait_timeout(work.timeout)?;
    let context = || {
        format!(
            "serial:\n{}\nQEMU output:\n{}\nqemu-storage-daemon output:\n{}",
            read(&serial),
            read(&qemu_log),
            read(&qsd_log)
        )
    };
    if status.is_none() {
        bail!("the guest did not power off within {:?}; {}", work.timeout, context());
    }
    let results = AgentResults::parse(&read(&serial));
    if results.exit_code() != Some(0) {
        bail!("the guest agent failed (exit {:?}); {}", results.exit_code(), context());
    }
    let figures = Figures::from_results(&results, started.elapsed().as_secs_f64())?;
    let commands = vec![
        shell_join(std::iter::once(qsd.display().to_string()).chain(daemon_args)),
        shell_join(std::iter::once(QEMU.to_string()).chain(qemu_args)),
    ];
    Ok(Run { figures, commands, device: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_command_line() {
        let args = qsd_args(Path::new("/t/a,b.raw"), Path::new("/t/v.sock"), false);
        assert_eq!(
            shell_join(&args),
            "--blockdev driver=file,node-name=file0,filename=/t/a,,b.raw,cache.direct=off \
             --blockdev driver=raw,node-name=disk0,file=file0 \
             --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
             addr.path=/t/v.sock,writable=on,num-queues=1"
        );
        let shared = qsd_args(Path::new("/t/d.raw"), Path::new("/t/v.sock"), true);
        assert_eq!(shared[1], "driver=file,node-name=file0,filename=/t/d.raw,cache.direct=off,locking=off");
        let best = QsdConfig { aio: Some("io_uring"), direct: true, queues: 2, iothread: true, ..QsdConfig::default() };
        assert_eq!(
            shell_join(qsd_args_with(Path::new("/t/d.raw"), Path::new("/t/v.sock"), &best)),
            "--object iothread,id=iot0 \
             --blockdev driver=file,node-name=file0,filename=/t/d.raw,aio=io_uring,cache.direct=on \
             --blockdev driver=raw,node-name=disk0,file=file0 \
             --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
             addr.path=/t/v.sock,writable=on,num-queues=2,iothread=iot0"
        );
    }
}
