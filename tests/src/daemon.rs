//! `Gmemd`: the real gmemd binary, started for one test in a directory of its own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use gmem_protocol::ControlClient;

use crate::guest::repo_root;

/// Builds the workspace's binaries once per test process and returns the
/// directory they are in. Tests may run before cargo built `gmemd` for this
/// crate (it is another package's binary), so build rather than assume.
pub fn binaries() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "gmemd", "-p", "gmem-qemu", "--bins"])
            .current_dir(repo_root())
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of gmemd/gmemctl failed: {status}"));
        }
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
        Ok(target.join("debug"))
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// How to start gmemd.
#[derive(Debug, Clone)]
pub struct GmemdOptions {
    /// `--memory`.
    pub memory: String,
    /// `--queues`.
    pub queues: u16,
    /// Size of the fresh raw disk image (unused with `disk`).
    pub disk_bytes: u64,
    /// An existing raw image to serve instead of a fresh one, e.g. the
    /// source's image for a migration destination (the shared storage two
    /// real hosts would have).
    pub disk: Option<PathBuf>,
    /// A named network namespace to run gmemd in (`ip netns exec`, which
    /// execs, so [`Gmemd::pid`] stays gmemd's), e.g. a
    /// [`HostPair`](crate::net::HostPair) side.
    pub netns: Option<String>,
    /// Run gmemd as this uid (and gid), e.g. 65534 for a gmemd without the
    /// privilege userfaultfd needs. Its scratch directory and a fresh disk
    /// are handed to that user.
    pub user: Option<u32>,
    /// Further arguments.
    pub extra: Vec<String>,
    /// The gmemd binary to run instead of the workspace's (which
    /// [`binaries`] builds), e.g. another build a benchmark measures.
    pub binary: Option<PathBuf>,
}

impl Default for GmemdOptions {
    fn default() -> Self {
        GmemdOptions {
            memory: "512M".into(),
            queues: 1,
            disk_bytes: 256 << 20,
            disk: None,
            netns: None,
            user: None,
            extra: Vec::new(),
            binary: None,
        }
    }
}

/// A running gmemd; killed on drop.
#[derive(Debug)]
pub struct Gmemd {
    child: Child,
    /// The command line it was started with, for [`Gmemd::restart`].
    argv: Vec<OsString>,
    /// The test's scratch directory (sockets, disk, logs).
    pub dir: tempfile::TempDir,
    /// Control socket.
    pub control: PathBuf,
    /// vhost-user socket.
    pub socket: PathBuf,
    /// The raw disk image (in `dir`, unless [`GmemdOptions::disk`] named
    /// another).
    pub disk: PathBuf,
}

impl Gmemd {
    /// Starts gmemd with `options` (on a fresh sparse disk unless
    /// [`GmemdOptions::disk`] names one) and waits until its control socket
    /// answers.
    pub fn start(options: &GmemdOptions) -> Result<Gmemd> {
        let dir = tempfile::Builder::new().prefix("gmemd-test-").tempdir()?;
        let disk = match &options.disk {
            Some(disk) => disk.clone(),
            None => {
                let disk = dir.path().join("disk.raw");
                std::fs::File::create(&disk)?.set_len(options.disk_bytes)?;
                disk
            }
        };
        let (control, socket) = (dir.path().join("control.sock"), dir.path().join("vhost.sock"));
        // Each wrapper execs the next, so the child's pid ends up gmemd's.
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(netns) = &options.netns {
            argv.extend(["ip", "netns", "exec", netns.as_str()].map(Into::into));
        }
        if let Some(uid) = options.user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).context("handing the scratch directory over")?;
            if options.disk.is_none() {
                std::os::unix::fs::chown(&disk, Some(uid), Some(uid)).context("handing the disk over")?;
            }
            argv.extend(
                ["setpriv".to_string(), format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]
                    .map(Into::into),
            );
        }
        match &options.binary {
            Some(binary) => argv.push(binary.into()),
            None => argv.push(binaries()?.join("gmemd").into()),
        }
        argv.extend(["--socket".into(), socket.clone().into(), "--control".into(), control.clone().into()]);
        argv.extend(["--disk".into(), disk.clone().into(), "--memory".into(), options.memory.clone().into()]);
        argv.extend(["--queues".into(), options.queues.to_string().into()]);
        argv.extend(options.extra.iter().map(Into::into));
        let child = Self::spawn(&argv, dir.path())?;
        let mut gmemd = Gmemd { child, argv, dir, control, socket, disk };
        gmemd.wait_ready()?;
        Ok(gmemd)
    }

    /// Starts `argv`, logging (appending) to `gmemd.log` in `dir`.
    fn spawn(argv: &[OsString], dir: &Path) -> Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("gmemd.log"))?;
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting gmemd")
    }

    /// Waits until the control socket answers.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.client().is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("gmemd exited during start-up ({status}); log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("gmemd's control socket did not answer within 20 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills gmemd with SIGKILL, as a crash would end it: no clean-up runs.
    pub fn crash(&mut self) -> Result<()> {
        self.child.kill().context("killing gmemd")?;
        self.child.wait()?;
        Ok(())
    }

    /// Starts gmemd again with the same command line (after [`Gmemd::crash`]
    /// or an exit), and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(!self.alive(), "gmemd {} still runs", self.pid());
        self.child = Self::spawn(&self.argv, self.dir.path())?;
        self.wait_ready()
    }

    /// A new control connection.
    pub fn client(&self) -> Result<ControlClient> {
        Ok(ControlClient::connect(&self.control)?)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file the daemon logs to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("gmemd.log")
    }

    /// Waits up to `timeout` for the daemon to exit; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("gmemd did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gmemd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
