//! [`QemuProcess`]: QEMU as a child process that cannot outlive its owner's
//! scope (it is killed on drop unless detached), with a QMP connection on
//! request; [`ProcessHandle`]: any process, held by pidfd.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cmdline::QemuCommand;
use crate::qmp::{QmpClient, QmpError};
use crate::quote::shell_join;

mod handle;

pub use handle::ProcessHandle;

/// How long [`QemuProcess::qmp`] waits for QEMU to answer on its socket.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why starting, watching or stopping QEMU failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The binary could not be started.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The program: the QEMU binary, or `ip` with [`SpawnOptions::netns`].
        binary: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file for QEMU's stdout or stderr could not be created.
    #[error("creating {path} for QEMU's output: {source}")]
    OutputFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Waiting for or signalling the child failed.
    #[error("waiting for or killing QEMU: {0}")]
    Wait(#[from] io::Error),
    /// [`QemuProcess::qmp`] on a command line without `-qmp`.
    #[error("QEMU was started without a QMP socket")]
    NoQmpSocket,
    /// QEMU ended before its QMP socket answered.
    #[error("QEMU exited ({0}) before its QMP socket answered")]
    ExitedEarly(ExitStatus),
    /// Talking QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// Where one of QEMU's output streams goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Output {
    /// The same stream as ours (with `-serial stdio`, the guest console).
    #[default]
    Inherit,
    /// Discarded.
    Null,
    /// A pipe: take it with [`QemuProcess::take_stdout`] or
    /// [`QemuProcess::take_stderr`], and keep reading it, or QEMU blocks.
    Piped,
    /// A file, created or truncated.
    File(PathBuf),
    /// A file, created if need be and appended to: several QEMUs in turn
    /// (a live update's) keep one log.
    Append(PathBuf),
}

impl Output {
    fn to_stdio(&self) -> Result<Stdio, ProcessError> {
        Ok(match self {
            Output::Inherit => Stdio::inherit(),
            Output::Null => Stdio::null(),
            Output::Piped => Stdio::piped(),
            Output::File(path) => File::create(path).map_err(output_file(path))?.into(),
            Output::Append(path) => {
                File::options().append(true).create(true).open(path).map_err(output_file(path))?.into()
            }
        })
    }
}

fn output_file(path: &Path) -> impl FnOnce(io::Error) -> ProcessError + '_ {
    move |source| ProcessError::OutputFile { path: path.to_owned(), source }
}

/// Where QEMU's stdout and stderr go (both inherited by default) and which
/// network namespace it runs in (ours by default).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpawnOptions {
    /// QEMU's stdout.
    pub stdout: Output,
    /// QEMU's stderr.
    pub stderr: Output,
    /// A named network namespace (ip-netns(8)) to run QEMU in: QEMU is
    /// started as `ip netns exec <netns> <qemu> <args>`, which needs root.
    /// `ip` execs QEMU, so [`QemuProcess::pid`] is still QEMU's pid.
    pub netns: Option<String>,
    /// QEMU gets SIGTERM when the thread that started it dies, even by
    /// SIGKILL (PR_SET_PDEATHSIG), so it cannot outlive a `gmemctl launch`.
    pub stop_with_parent: bool,
    /// QEMU gets a process group of its own, so that a Ctrl-C meant for
    /// the process that started it does not reach it: for a QEMU that is to
    /// outlive its starter ([`QemuProcess::detach`]).
    pub own_process_group: bool,
}

/// A running QEMU, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    qmp_path: Option<PathBuf>,
    exit: Option<ExitStatus>,
    /// Set by [`detach`](Self::detach): dropping leaves QEMU running.
    detached: bool,
}

impl QemuProcess {
    /// Starts `cmd` with stdin from /dev/null and both outputs inherited.
    pub fn spawn(cmd: &QemuCommand) -> Result<Self, ProcessError> {
        Self::spawn_with(cmd, &SpawnOptions::default())
    }

    /// Starts `cmd` with stdin from /dev/null and outputs as `options` say.
    pub fn spawn_with(cmd: &QemuCommand, options: &SpawnOptions) -> Result<Self, ProcessError> {
        Self::spawn_argv(cmd.binary(), &cmd.to_args(), cmd.qmp_path(), options)
    }

    /// Starts `binary` with `args` (for a command line that is not a
    /// [`QemuCommand`]'s, or one with arguments added), stdin from
    /// /dev/null and outputs as `options` say. `qmp` is the QMP socket the
    /// arguments create, for [`qmp`](Self::qmp).
    pub fn spawn_argv(
        binary: &Path,
        args: &[String],
        qmp: Option<&Path>,
        options: &SpawnOptions,
    ) -> Result<Self, ProcessError> {
        let line = || shell_join(std::iter::once(binary.to_string_lossy()).chain(args.iter().map(Into::into)));
        let mut command = match &options.netns {
            Some(netns) => {
                log::info!("starting in network namespace {netns}: {}", line());
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns]).arg(binary);
                ip
            }
            None => {
                log::info!("starting {}", line());
                Command::new(binary)
            }
        };
        if options.stop_with_parent {
            stop_with_parent(&mut command);
        }
        if options.own_process_group {
            command.process_group(0);
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(options.stdout.to_stdio()?)
            .stderr(options.stderr.to_stdio()?)
            .spawn()
            .map_err(|source| ProcessError::Spawn { binary: PathBuf::from(command.get_program()), source })?;
        Ok(QemuProcess { child, qmp_path: qmp.map(Path::to_owned), exit: None, detached: false })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's stdout, if it was [`Output::Piped`] and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// QEMU's stderr, if it was [`Output::Piped`] and not taken yet.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// QEMU's exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
        }
        Ok(self.exit)
    }

    /// Waits until QEMU exits.
    pub fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let status = self.child.wait()?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Waits up to `timeout` for QEMU to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        // std has no timed wait: poll, backing off so long waits stay cheap.
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Kills QEMU (SIGKILL) unless it has already exited, and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.child.kill()?;
        self.wait()
    }

    /// Lets QEMU run on once this handle is gone, e.g. the QEMU a live
    /// update started, which must outlive `gmemctl`. Returns its pid. When
    /// this process exits, QEMU is reparented (and eventually reaped) by
    /// init or the nearest subreaper.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.pid()
    }

    /// Connects to QEMU's QMP socket, retrying for up to
    /// [`QMP_CONNECT_TIMEOUT`] while QEMU is still starting; fails at once
    /// with [`ProcessError::ExitedEarly`] if QEMU exits meanwhile.
    pub fn qmp(&mut self) -> Result<QmpClient, ProcessError> {
        let path = self.qmp_path.clone().ok_or(ProcessError::NoQmpSocket)?;
        let child = &mut self.child;
        let connected = QmpClient::connect_while(&path, QMP_CONNECT_TIMEOUT, || matches!(child.try_wait(), Ok(None)));
        match connected {
            Ok(client) => Ok(client),
            Err(e) => match self.try_wait()? {
                Some(status) => Err(ProcessError::ExitedEarly(status)),
                None => Err(e.into()),
            },
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        match self.kill() {
            Ok(status) => log::debug!("QEMU {} ended: {status}", self.child.id()),
            Err(e) => log::warn!("could not stop QEMU {}: {e}", self.child.id()),
        }
    }
}

/// See [`SpawnOptions::stop_with_parent`].
fn stop_with_parent(command: &mut Command) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let hook = move || {
        // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number by value.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before the prctl took effect.
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::other("the parent exited while QEMU was starting"));
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls on values
    // it owns, as code between fork and exec must.
    unsafe {
        command.pre_exec(hook);
    }
}
