//! One migration on a [`Testbed`]: wait for the guest to be writing,
//! migrate with the QMP sequences of `gmem_qemu::migration`, and time the
//! guest's progress lines on the host throughout.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gmem_protocol::MigrationInfo;
use gmem_qemu::migration::{
    prepare_destination, Endpoint, Migration, MigrationError, MigrationOptions as Plan, MigrationReport,
};
use gmem_tests::console::{ProgressGap, ProgressStamp};
use gmem_tests::seqio::PROGRESS_KEY;
use gmem_tests::{ProgressClock, ProgressTimeline};

use super::nodelay;
use super::testbed::Testbed;

/// How often the host reads the guest consoles for progress lines.
pub const CONSOLE_POLL: Duration = Duration::from_millis(1);
/// How long the guest may take to boot and reach the starting point.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long, after the migration completed, the host waits for a progress
/// line from the destination (the end of the measurement window).
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(10);

/// A migration as the host saw it.
#[derive(Debug)]
pub struct Migrated {
    /// `Migration::wait`'s report, or why it failed. A postcopy-preempt
    /// migration that QEMU never completes has the report as it stood when
    /// the driver gave up on it (`MigrationError::PostcopyPreemptStuck`).
    pub report: Result<MigrationReport>,
    /// Whether QEMU completed the migration.
    pub completed: bool,
    /// With `nodelay`: on how many of the source's and the destination
    /// QEMU's migration connections TCP_NODELAY was set.
    pub nodelay_sockets: Option<(usize, usize)>,
    /// Every progress line of the guest, on either side, host-timestamped.
    pub timeline: ProgressTimeline,
    /// When `migrate` was sent.
    pub started: Instant,
    /// When `Migration::wait` returned.
    pub finished: Instant,
    /// When the host stopped reading the consoles.
    pub watched_until: Instant,
    /// The source's and the destination gmemd's `query-migration` once the
    /// guest printed on the destination after the migration (gmemd only).
    /// `Migration::wait` asks as soon as QEMU reports the destination
    /// running, often before its device completed a request, so its report
    /// may lack the device I/O gap; this has it.
    pub gmemd_after: Option<(MigrationInfo, MigrationInfo)>,
}

impl Migrated {
    /// The first progress line after the migration ended: the guest doing
    /// I/O on the destination. `None` if it printed none within
    /// [`RESUME_TIMEOUT`].
    pub fn resumed(&self) -> Option<ProgressStamp> {
        self.timeline.0.iter().find(|stamp| stamp.at > self.finished).copied()
    }

    /// The gaps between progress lines from `migrate` to the first line
    /// after the migration ended (or its end, if none came), longest first.
    pub fn gaps(&self) -> Vec<ProgressGap> {
        let end = self.resumed().map_or(self.finished, |stamp| stamp.at);
        self.timeline.gaps_overlapping(self.started, end)
    }

    /// From the source gmemd's last request completion to the destination
    /// gmemd's first, µs, from [`gmemd_after`](Self::gmemd_after).
    pub fn device_io_gap_us(&self) -> Option<u64> {
        let (source, dest) = self.gmemd_after.as_ref()?;
        let (last, first) = (source.device_io.last_completion_us, dest.device_io.first_completion_us);
        (last > 0 && first > last).then(|| first - last)
    }
}

/// Waits until the guest has done `start_at` blocks, then migrates as
/// `plan` says, and waits up to [`RESUME_TIMEOUT`] for the guest's first
/// progress line at least `linger` after the migration ended (measured runs
/// want the first line; a run that shows whether the guest goes on at all
/// watches longer). With `nodelay`, TCP_NODELAY goes on both QEMUs'
/// migration connections once they are up (see `nodelay`). A failed
/// migration is returned in [`Migrated::report`]; a guest that never
/// reaches `start_at` or a QEMU that cannot be reached is an error.
pub fn migrate(bed: &mut dyn Testbed, plan: &Plan, start_at: u64, linger: Duration, nodelay: bool) -> Result<Migrated> {
    let clock = ProgressClock::start(bed.consoles(), PROGRESS_KEY, CONSOLE_POLL)?;
    if clock.wait_for(BOOT_TIMEOUT, |stamp| stamp.count >= start_at).is_none() {
        anyhow::bail!("the guest did not write {start_at} blocks within {BOOT_TIMEOUT:?}; {}", bed.diagnostics());
    }
    let (mut src_qmp, mut dst_qmp) = bed.qmp()?;
    let mut gmemd = bed.gmemd()?;
    prepare_destination(&mut dst_qmp, plan).context("preparing the destination")?;
    let started = Instant::now();
    let mut setters = None;
    let outcome = match Migration::start(&mut src_qmp, plan) {
        Ok(mut migration) => {
            if nodelay {
                setters = Some(set_nodelay(bed.qemu_pids(), plan)?);
            }
            let mut source = Endpoint::new(&mut src_qmp);
            let mut destination = Endpoint::new(&mut dst_qmp);
            if let Some((src_ctl, dst_ctl)) = gmemd.as_mut() {
                source = source.with_gmemd(src_ctl);
                destination = destination.with_gmemd(dst_ctl);
            }
            migration.wait(source, destination, |_| {})
        }
        Err(error) => Err(error),
    };
    let (report, completed) = match outcome {
        Ok(report) => (Ok(report), true),
        Err(MigrationError::PostcopyPreemptStuck { report, .. }) => (Ok(*report), false),
        Err(error) => (Err(error.into()), false),
    };
    let finished = Instant::now();
    let nodelay_sockets = match setters {
        Some((source, destination)) => Some((joined(source)?, joined(destination)?)),
        None => None,
    };
    clock.wait_for(RESUME_TIMEOUT, |stamp| stamp.at > finished + linger);
    let gmemd_after = match gmemd.as_mut() {
        Some((src_ctl, dst_ctl)) => Some((src_ctl.query_migration()?, dst_ctl.query_migration()?)),
        None => None,
    };
    let timeline = clock.stop()?;
    Ok(Migrated {
        report,
        completed,
        nodelay_sockets,
        timeline,
        started,
        finished,
        watched_until: Instant::now(),
        gmemd_after,
    })
}

/// A thread setting TCP_NODELAY on one QEMU's migration connections.
type Setter = JoinHandle<Result<usize>>;

/// Starts a thread per QEMU (`pids`: source, destination) that sets
/// TCP_NODELAY on its migration connections as they open: the source's to
/// the port of `plan`'s connect URI, the destination's on the port of its
/// listen URI; two each with postcopy-preempt.
fn set_nodelay((src, dst): (u32, u32), plan: &Plan) -> Result<(Setter, Setter)> {
    let port = |uri: &str| {
        uri.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).with_context(|| format!("no port in {uri}"))
    };
    let connections = if plan.postcopy_preempt { 2 } else { 1 };
    let timeout = plan.timeout;
    let spawn = |pid: u32, port: u16| {
        std::thread::Builder::new()
            .name("nodelay".into())
            .spawn(move || nodelay::set_on_migration_sockets(pid, port, connections, timeout))
            .context("spawning a thread")
    };
    Ok((spawn(src, port(&plan.connect_uri)?)?, spawn(dst, port(&plan.listen_uri)?)?))
}

/// What a [`Setter`] did.
fn joined(setter: Setter) -> Result<usize> {
    setter.join().map_err(|_| anyhow::anyhow!("the TCP_NODELAY thread panicked"))?
}
