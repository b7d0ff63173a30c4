//! The `gmemd` daemon.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use gmem_pins::{Limit, Restart};
use gmemd::blk::{BlkDevice, DeviceOptions};
use gmemd::cli::Args;
use gmemd::daemon::{Daemon, DaemonOptions};
use gmemd::handover::{RunningImage, Takeover, TakeoverError, Upgrader};
use gmemd::memory::RegionSet;
use gmemd::peers::PeerPolicy;
use gmemd::pins::Pins;
use gmemd::state_file::{PreviousLife, StateFile};
use gmemd::sys::SocketAccess;
use gmemd::vhost::ConnectionThreads;
use gmemd::{control, vhost};

/// A socket file gmemd made: removed when gmemd exits normally, or when
/// start-up fails after it was made, so no dead socket is left behind.
struct SocketFile(PathBuf);

impl SocketFile {
    fn bind(path: &Path, access: SocketAccess) -> Result<(Self, UnixListener)> {
        let listener = gmemd::sys::bind_socket(path, access).with_context(|| format!("binding {}", path.display()))?;
        Ok((SocketFile(path.to_path_buf()), listener))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What serving starts from: new, or a previous program's handover.
struct Started {
    daemon: Arc<Daemon>,
    vhost: (SocketFile, UnixListener),
    control: Option<(SocketFile, UnixListener)>,
    /// Connections a previous program handed over, to start once serving.
    takeover: Option<(Takeover, Vec<gmemd::handover::Carried>)>,
}

fn main() -> Result<()> {
    gmemd::logging::RateLimitedLogger::install().context("installing the logger")?;
    match Takeover::from_env() {
        None => serve(Args::parse(), None),
        Some(Err(error)) => bail!("started by an upgrade, but its handover is unusable: {error}"),
        Some(Ok(takeover)) => match Args::try_parse() {
            Ok(args) => serve(args, Some(takeover)),
            Err(error) => takeover.refuse(&TakeoverError::CommandLine(error.to_string())),
        },
    }
}

fn serve(args: Args, takeover: Option<Takeover>) -> Result<()> {
    let device_options = DeviceOptions {
        disk: args.disk.clone(),
        readonly: args.readonly,
        queues: args.queues,
        serial: args.serial.clone(),
        cache: args.cache,
        aio: args.aio,
    };
    let options = DaemonOptions {
        vhost_socket: args.socket.clone(),
        allow_foreign_memory: args.allow_foreign_memory,
        frontend_policy: PeerPolicy::own_user().with(&args.allow_uid, &args.allow_gid),
        max_frontends: usize::from(args.max_frontends),
        postcopy_orphan_timeout: Duration::from_secs(args.postcopy_orphan_timeout),
        queue_claim_patience: Duration::from_secs(5),
        ring_poll: Duration::from_micros(u64::from(args.poll_us)),
        skip_dirty_log_marks: args.test_skip_dirty_log,
    };
    if options.skip_dirty_log_marks {
        log::warn!("--test-skip-dirty-log: precopy migrations will lose the device's writes");
    }
    // Signals are taken by one thread with sigwait, so no handler runs in
    // the middle of another thread's work; block them before any thread starts.
    let signals = gmemd::sys::block_termination_signals().context("blocking SIGTERM/SIGINT/SIGHUP")?;
    let started = match takeover {
        None => start_fresh(&args, &device_options, options)?,
        Some(takeover) => match take_over(&args, &device_options, options, &takeover) {
            Ok(started) => Started { takeover: Some((takeover, started.1)), ..started.0 },
            Err(error) => takeover.refuse(&error),
        },
    };
    let Started { daemon, vhost: (vhost_file, vhost_listener), control, takeover } = started;
    let image = RunningImage::current(vhost_listener.as_raw_fd(), control.as_ref().map(|(_, l)| l.as_raw_fd()))
        .context("finding this program for later upgrades")?;
    let upgrader = Arc::new(Upgrader::new(Arc::clone(&daemon), image));
    let control_thread = match control {
        Some((file, listener)) => {
            let daemon = Arc::clone(&daemon);
            let thread = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || control::serve(daemon, listener, upgrader))?;
            Some((file, thread))
        }
        None => None,
    };
    {
        let daemon = Arc::clone(&daemon);
        std::thread::Builder::new().name("signals".into()).spawn(move || loop {
            match signals.wait() {
                Some(libc::SIGHUP) => log::info!("SIGHUP ignored; SIGTERM or the `quit` command stops gmemd"),
                Some(signal) => {
                    log::info!("signal {signal}: shutting down");
                    break daemon.quit();
                }
                None => break daemon.quit(),
            }
        })?;
    }
    let mut threads = ConnectionThreads::default();
    if let Some((takeover, carried)) = takeover {
        takeover.finish(&daemon, carried, &mut threads);
    }
    daemon.record_state();
    log::info!("serving {} on {}", args.disk.display(), args.socket.display());
    vhost::serve(Arc::clone(&daemon), vhost_listener, threads).context("serving vhost-user")?;
    if let Some((file, thread)) = control_thread {
        match thread.join() {
            Ok(result) => result.context("serving the control socket")?,
            Err(_) => bail!("the control thread panicked"),
        }
        drop(file);
    }
    drop(vhost_file);
    daemon.events.close();
    Ok(())
}

/// `--memlock-limit`, or what the kernel would allow gmemd.
fn memlock_limit(args: &Args) -> Result<Limit> {
    match args.memlock_limit {
        Some(limit) => Ok(limit),
        None => Limit::probe_default().context("reading RLIMIT_MEMLOCK and the capabilities for --memlock-limit"),
    }
}

/// A new daemon: regions made (or left waiting for the frontend of a
/// previous, crashed gmemd to bring them back), disk opened, sockets bound.
fn start_fresh(args: &Args, device_options: &DeviceOptions, options: DaemonOptions) -> Result<Started> {
    let specs = args.region_specs()?;
    let mut state = StateFile::new(args.state_path());
    let previous = match state.load() {
        Ok(previous) => previous.filter(PreviousLife::ram_may_live),
        Err(error) => {
            log::warn!("{error}; starting with new guest RAM");
            None
        }
    };
    let regions =
        RegionSet::resume(specs, previous.as_ref().map_or(&[], |p| &p.regions)).context("creating guest RAM")?;
    if let Some(previous) = &previous {
        state.carry_over(previous);
        for (spec, _) in regions.slots().filter(|(_, region)| region.is_none()) {
            let pids: Vec<i32> = previous.frontends.iter().map(|f| f.pid).collect();
            log::warn!(
                "region {} is taken back from its frontend (pids {pids:?}) when it reconnects: gmemd restarted \
                 while that QEMU kept the guest's RAM",
                spec.id
            );
        }
    }
    let device = BlkDevice::new(device_options).context("opening the disk")?;
    let limit = memlock_limit(args)?;
    let pins = match previous.and_then(|p| p.pins) {
        // A crash: the pins its locked regions had stay charged until they
        // are locked again.
        Some(snapshot) => Pins::restore(&args.vm_id, limit, snapshot, &Restart::Crash)
            .context("taking back the pin ledger of the gmemd before the crash")?,
        None => Pins::new(&args.vm_id, limit),
    };
    let daemon = Arc::new(
        Daemon::new(regions, device, options, Some(state), pins)
            .context("creating the quit event and the event thread")?,
    );
    daemon.establish_pins().context("locking guest RAM")?;
    let vhost_access = SocketAccess { mode: args.socket_mode, group: args.socket_group };
    let vhost = SocketFile::bind(&args.socket, vhost_access)?;
    let control = args.control.as_ref().map(|path| SocketFile::bind(path, SocketAccess::default())).transpose()?;
    Ok(Started { daemon, vhost, control, takeover: None })
}

/// The daemon a previous program handed over, built from duplicates of its
/// fds; on error nothing of the handover is consumed.
fn take_over(
    args: &Args,
    device_options: &DeviceOptions,
    options: DaemonOptions,
    takeover: &Takeover,
) -> Result<(Started, Vec<gmemd::handover::Carried>), TakeoverError> {
    let regions = takeover.regions()?;
    let disk = takeover.disk(&args.disk, args.readonly, device_options.cache)?;
    let device = BlkDevice::with_disk(disk, device_options);
    let mut state = StateFile::new(args.state_path());
    // Same process, same pid: the file names this very gmemd, and the
    // frontends that hold its RAM.
    if let Ok(Some(previous)) = state.load() {
        state.carry_over(&previous);
    }
    let limit = memlock_limit(args).map_err(|e| TakeoverError::Daemon(std::io::Error::other(format!("{e:#}"))))?;
    let pins = takeover.pins(&args.vm_id, limit)?;
    let daemon = Arc::new(Daemon::new(regions, device, options, Some(state), pins).map_err(TakeoverError::Daemon)?);
    daemon.establish_pins().map_err(TakeoverError::Pins)?;
    let (vhost, control) = takeover.listeners()?;
    let carried = takeover.connections(&daemon)?;
    let started = Started {
        daemon,
        vhost: (SocketFile(args.socket.clone()), vhost),
        control: args.control.clone().zip(control).map(|(path, listener)| (SocketFile(path), listener)),
        takeover: None,
    };
    Ok((started, carried))
}
