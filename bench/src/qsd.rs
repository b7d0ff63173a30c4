//! The qemu-storage-daemon side: its vhost-user-blk export on a fresh image
//! and a QEMU that owns its RAM as a shared memfd.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gmem_qemu::quote::{qemu_opt_value, shell_join};
use gmem_tests::{AgentResults, GuestImage};

use crate::backends::{Run, Workload, QEMU};
use crate::figures::Figures;

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
struct Guard {
    child: Child,
    what: &'static str,
}

impl Guard {
    fn spawn(what: &'static str, binary: &Path, args: &[String], log: &Path) -> Result<Guard> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what} ({})", binary.display()))?;
        Ok(Guard { child, what })
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?
            {
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

/// qemu-storage-daemon's arguments: the raw image through the file driver
/// (host page cache on, like gmemd's buffered I/O), exported as
/// vhost-user-blk with one queue.
pub fn qsd_args(disk: &Path, socket: &Path) -> Vec<String> {
    let (disk, socket) = (disk.to_string_lossy(), socket.to_string_lossy());
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=file0,filename={},cache.direct=off", qemu_opt_value(&disk)),
        "--blockdev".into(),
        "driver=raw,node-name=disk0,file=file0".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            qemu_opt_value(&socket)
        ),
    ]
}

/// QEMU for the qsd run: the same machine as the gmemd run, but QEMU owns
/// its RAM as a shared memfd (vhost-user needs RAM the backend can map).
pub fn qsd_qemu_args(
    work: &Workload,
    image: &GuestImage,
    socket: &Path,
    serial: &Path,
) -> Vec<String> {
    let bytes = work.memory_mib << 20;
    let socket = socket.to_string_lossy();
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "-smp".into(),
        work.cpus.to_string(),
        "-machine".into(),
        "pc,memory-backend=ram0".into(),
        "-m".into(),
        format!("{bytes}B"),
        "-object".into(),
        format!("memory-backend-memfd,id=ram0,share=on,size={bytes}"),
        "-chardev".into(),
        format!(
            "socket,id=qsd0,path={},reconnect-ms=1000",
            qemu_opt_value(&socket)
        ),
        "-device".into(),
        "vhost-user-blk-pci,chardev=qsd0,num-queues=1".into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-kernel".into(),
        image.kernel.display().to_string(),
        "-initrd".into(),
        image.initrd.display().to_string(),
        "-append".into(),
        work.append(),
    ]);
    args
}

/// A fresh directory under the system temp dir, removed on drop (the same
/// place the harness puts gmemd's image, so both images share a file system).
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(prefix: &str) -> Result<ScratchDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// qemu-storage-daemon: a fresh sparse image of the same size, the export,
/// then QEMU booting the same guest and agent.
pub fn run_qsd(work: &Workload, image: &GuestImage, qsd: &Path) -> Result<Run> {
    let started = Instant::now();
    let dir = ScratchDir::new("gmem-bench-qsd")?;
    let at = |name: &str| -> PathBuf { dir.0.join(name) };
    let (disk, socket, serial) = (at("disk.raw"), at("vhost.sock"), at("bench.serial"));
    let (qsd_log, qemu_log) = (at("qsd.log"), at("qemu.log"));
    File::create(&disk)?.set_len(work.disk_mib << 20)?;

    let daemon_args = qsd_args(&disk, &socket);
    let mut daemon = Guard::spawn("qemu-storage-daemon", qsd, &daemon_args, &qsd_log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
        if let Some(status) = daemon.child.try_wait()? {
            bail!(
                "qemu-storage-daemon exited during start-up ({status}); its output:\n{}",
                read(&qsd_log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "qemu-storage-daemon did not create {} within 20 s; its output:\n{}",
                socket.display(),
                read(&qsd_log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let qemu_args = qsd_qemu_args(work, image, &socket, &serial);
    let mut qemu = Guard::spawn("QEMU", Path::new(QEMU), &qemu_args, &qemu_log)?;
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
        bail!(
            "the guest did not power off within {:?}; {}",
            work.timeout,
            context()
        );
    }
    let results = AgentResults::parse(&read(&serial));
    if results.exit_code() != Some(0) {
        bail!(
            "the guest agent failed (exit {:?}); {}",
            results.exit_code(),
            context()
        );
    }
    let figures = Figures::from_results(&results, started.elapsed().as_secs_f64())?;
    let commands = vec![
        shell_join(std::iter::once(qsd.display().to_string()).chain(daemon_args)),
        shell_join(std::iter::once(QEMU.to_string()).chain(qemu_args)),
    ];
    Ok(Run {
        figures,
        commands,
        device: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_command_line() {
        let args = qsd_args(Path::new("/t/a,b.raw"), Path::new("/t/v.sock"));
        assert_eq!(
            shell_join(&args),
            "--blockdev driver=file,node-name=file0,filename=/t/a,,b.raw,cache.direct=off \
             --blockdev driver=raw,node-name=disk0,file=file0 \
             --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
             addr.path=/t/v.sock,writable=on,num-queues=1"
        );
    }
}
