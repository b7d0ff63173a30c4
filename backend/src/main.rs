//! The `gmemd` daemon.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;

use gmemd::blk::{BlkDevice, DeviceOptions};
use gmemd::cli::{parse_region, parse_size};
use gmemd::daemon::{Daemon, DaemonOptions};
use gmemd::memory::{Backing, RegionSet, RegionSpec};
use gmemd::{control, vhost};

/// gmemd owns a QEMU guest's RAM and serves it a vhost-user-blk disk.
///
/// gmemd creates the guest's RAM itself (sealed memfds, one per region) and
/// QEMU maps that same memory, so the RAM outlives any one QEMU process: a
/// frontend can disconnect, crash or be replaced and reconnect to the same
/// RAM. The device's data path reads and writes guest RAM directly.
///
/// Attach QEMU with the arguments `gmemctl --control PATH qemu-args` prints,
/// or start it with `gmemctl --control PATH launch`.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, after_help = EXAMPLES)]
struct Args {
    /// vhost-user socket QEMU connects to (created, mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Raw disk image served as the virtio-blk disk.
    #[arg(long, value_name = "PATH")]
    disk: PathBuf,

    /// Control socket for gmemctl and scripts (JSON lines, see docs/control-protocol.md).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Guest RAM as one region `ram0` of this size (e.g. 512M, 1G).
    /// Ignored when --region is given.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    memory: u64,

    /// A guest RAM region: id=NAME,size=SIZE[,hugetlb][,path=FILE]. Repeat
    /// for several; the first is the machine's main RAM, the others become
    /// DIMMs. path= keeps the RAM in a tmpfs/hugetlbfs file that outlives gmemd.
    #[arg(long, value_name = "SPEC", value_parser = parse_region)]
    region: Vec<RegionSpec>,

    /// Number of virtio-blk request queues (one worker thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,

    /// Serve the disk read-only (VIRTIO_BLK_F_RO; writes fail with IOERR).
    #[arg(long)]
    readonly: bool,

    /// Device id returned to the guest's GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "gmemd")]
    serial: String,

    /// Accept memory tables that name memory gmemd does not own, acting as
    /// a plain vhost-user backend for QEMU-owned RAM.
    #[arg(long)]
    allow_foreign_memory: bool,

    /// For tests only: accept QEMU's dirty log but never mark it, so a
    /// precopy migration silently loses the device's writes. Exists to prove
    /// that the migration tests' verification catches exactly that.
    #[arg(long, hide = true)]
    test_skip_dirty_log: bool,
}

const EXAMPLES: &str = "Examples:
  gmemd --socket /run/gmemd/vhost.sock --control /run/gmemd/control.sock --disk disk.raw --memory 1G
  gmemd --socket vhost.sock --disk disk.raw --region id=ram0,size=1G --region id=ram1,size=512M --queues 2

Logging goes to stderr; set RUST_LOG=info (or debug) for more.";

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let specs = if args.region.is_empty() {
        vec![RegionSpec { id: "ram0".into(), size: args.memory, backing: Backing::Memfd }]
    } else {
        args.region.clone()
    };
    let mut ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        bail!("--region ids must be unique");
    }
    let regions = RegionSet::create(specs).context("creating guest RAM")?;
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
        skip_dirty_log_marks: args.test_skip_dirty_log,
    };
    if options.skip_dirty_log_marks {
        log::warn!("--test-skip-dirty-log: precopy migrations will lose the device's writes");
    }

    // Signals are taken by one thread with sigwait, so no handler runs in
    // the middle of another thread's work; block them before any thread starts.
    let signals = gmemd::sys::block_termination_signals().context("blocking SIGTERM/SIGINT")?;
    let daemon =
        Arc::new(Daemon::new(regions, device, options).context("creating the quit event and the event thread")?);
    let vhost_listener =
        gmemd::sys::bind_private_socket(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    let control_thread = match &args.control {
        Some(path) => {
            let listener =
                gmemd::sys::bind_private_socket(path).with_context(|| format!("binding {}", path.display()))?;
            let daemon = Arc::clone(&daemon);
            Some(std::thread::Builder::new().name("control".into()).spawn(move || control::serve(daemon, listener))?)
        }
        None => None,
    };
    {
        let daemon = Arc::clone(&daemon);
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            if let Some(signal) = signals.wait() {
                log::info!("signal {signal}: shutting down");
            }
            daemon.quit();
        })?;
    }
    log::info!("serving {} on {}", args.disk.display(), args.socket.display());
    vhost::serve(Arc::clone(&daemon), vhost_listener).context("serving vhost-user")?;
    if let Some(thread) = control_thread {
        match thread.join() {
            Ok(result) => result.context("serving the control socket")?,
            Err(_) => bail!("the control thread panicked"),
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    daemon.events.close();
    Ok(())
}
