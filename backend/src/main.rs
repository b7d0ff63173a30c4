//! The `gmemd` daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use gmemd::blk::{BlkDevice, DeviceOptions};
use gmemd::cli::Args;
use gmemd::daemon::{Daemon, DaemonOptions};
use gmemd::memory::RegionSet;
use gmemd::peers::PeerPolicy;
use gmemd::state_file::{PreviousLife, StateFile};
use gmemd::sys::SocketAccess;
use gmemd::vhost::ConnectionThreads;
use gmemd::{control, vhost};

/// A socket file gmemd made: removed when gmemd exits normally, or when
/// start-up fails after it was made, so no dead socket is left behind.
struct SocketFile(PathBuf);

impl SocketFile {
    fn bind(path: &Path, access: SocketAccess) -> Result<(Self, std::os::unix::net::UnixListener)> {
        let listener = gmemd::sys::bind_socket(path, access).with_context(|| format!("binding {}", path.display()))?;
        Ok((SocketFile(path.to_path_buf()), listener))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn main() -> Result<()> {
    gmemd::logging::RateLimitedLogger::install().context("installing the logger")?;
    let args = Args::parse();
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
    for (spec, _) in regions.slots().filter(|(_, region)| region.is_none()) {
        let pids: Vec<i32> = previous.iter().flat_map(|p| p.frontends.iter().map(|f| f.pid)).collect();
        log::warn!(
            "region {} is taken back from its frontend (pids {pids:?}) when it reconnects: gmemd restarted while \
             that QEMU kept the guest's RAM",
            spec.id
        );
    }
    if let Some(previous) = &previous {
        state.carry_over(previous);
    }
    let device_options = DeviceOptions {
        disk: args.disk.clone(),
        readonly: args.readonly,
        queues: args.queues,
        serial: args.serial.clone(),
    };
    let device = BlkDevice::new(&device_options).context("opening the disk")?;
    let options = DaemonOptions {
        vhost_socket: args.socket.clone(),
        allow_foreign_memory: args.allow_foreign_memory,
        frontend_policy: PeerPolicy::own_user().with(&args.allow_uid, &args.allow_gid),
        max_frontends: usize::from(args.max_frontends),
        postcopy_orphan_timeout: Duration::from_secs(args.postcopy_orphan_timeout),
        queue_claim_patience: Duration::from_secs(5),
        skip_dirty_log_marks: args.test_skip_dirty_log,
    };
    if options.skip_dirty_log_marks {
        log::warn!("--test-skip-dirty-log: precopy migrations will lose the device's writes");
    }

    // Signals are taken by one thread with sigwait, so no handler runs in
    // the middle of another thread's work; block them before any thread starts.
    let signals = gmemd::sys::block_termination_signals().context("blocking SIGTERM/SIGINT/SIGHUP")?;
    let daemon = Arc::new(
        Daemon::new(regions, device, options, Some(state)).context("creating the quit event and the event thread")?,
    );
    daemon.record_state();
    let vhost_access = SocketAccess { mode: args.socket_mode, group: args.socket_group };
    let (vhost_file, vhost_listener) = SocketFile::bind(&args.socket, vhost_access)?;
    let control = match &args.control {
        Some(path) => Some(SocketFile::bind(path, SocketAccess::default())?),
        None => None,
    };
    let control_thread = match control {
        Some((file, listener)) => {
            let daemon = Arc::clone(&daemon);
            let thread =
                std::thread::Builder::new().name("control".into()).spawn(move || control::serve(daemon, listener))?;
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
    log::info!("serving {} on {}", args.disk.display(), args.socket.display());
    vhost::serve(Arc::clone(&daemon), vhost_listener, ConnectionThreads::default()).context("serving vhost-user")?;
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
