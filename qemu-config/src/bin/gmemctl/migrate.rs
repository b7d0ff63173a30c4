//! `gmemctl migrate`: live-migrate a guest between two QEMUs, each attached
//! to its own gmemd.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};
use gmem_protocol::{parse_size, ControlClient};
use gmem_qemu::migration::{postcopy_preempt_unavailable, query_migrate, Side, DEFAULT_MIGRATION_TIMEOUT};
use gmem_qemu::{
    prepare_destination, Endpoint, Migration, MigrationError, MigrationOptions, MigrationStatus, QmpClient,
    SwitchToPostcopy,
};

use crate::progress::{summary, ProgressDisplay};

pub const LONG_ABOUT: &str = "\
Live-migrate a guest from one QEMU to another over QMP.

The destination QEMU must have been started with the same machine and
devices as the source, attached to its own gmemd, and with `-incoming defer`
(`gmemctl --control DST_GMEMD.sock launch --incoming defer ...`), so that
gmemctl can set its capabilities before it listens.

gmemctl then:
  0. with --postcopy: asks both QEMUs whether they have postcopy-preempt
     (query-migrate-capabilities) and looks at the URIs;
  1. destination: migrate-set-capabilities (postcopy-ram, postcopy-preempt and
     postcopy-blocktime with --postcopy), migrate-incoming --uri;
  2. source: migrate-set-capabilities, migrate-set-parameters (bandwidth,
     downtime limit), migrate --connect-uri (default: --uri);
  3. polls query-migrate every 100 ms, draws progress on stderr, sends
     migrate-start-postcopy when due;
  4. waits for both sides to complete and the guest to run on the destination,
     and prints a summary (or, with --json, one JSON object).

Precopy copies RAM while the guest runs on the source, then stops it briefly
to send the rest. With --postcopy the guest moves to the destination after
the first full pass (or after --postcopy-after) and pages it still lacks are
fetched from the source on demand: the destination gmemd's device faults on
them too (it needs userfaultfd, i.e. root).

QEMU's postcopy-preempt capability sends the pages the destination asks for
on a connection of their own, instead of queueing them behind the pages the
source streams in the background: a vCPU or the device then waits for its
page, not for the stream. It needs the capability in both QEMUs (7.1 and
later) and URIs that can open a second connection (tcp:, unix:, vsock:; not
fd: or exec:), and QEMU needs it set on both sides before the destination
listens, so a --resume keeps what the migration started with.

But QEMU (10.0.2 and 11.1.3 at least) never completes a postcopy-preempt
migration once a vhost-user backend on the destination, such as gmemd's
disk, has faulted on a missing page: it files the backend's page requests
in a way it never marks as served, and waits for them at the end. The guest
runs on the destination, the source stays postcopy-active. So
--postcopy-preempt auto (the default) uses it where both QEMUs and the URIs
allow it and the destination has no vhost-user device, and otherwise says
why not; `on` uses it anyway where QEMU accepts it (gmemctl then gives up
10 s after the source has sent all RAM, with the guest running on the
destination); `off` never does. The summary and the JSON's postcopy_preempt
say whether it was used.

A postcopy migration cannot be cancelled; if its connection breaks it pauses
(the guest waits for missing pages), and `gmemctl migrate --resume` with the
same arguments recovers it, best with a new port in --uri: a destination
whose main loop waits on a page may still hold the first one
(migrate-recover is sent out of band for it). With postcopy-preempt both
connections are opened anew there.

QEMU's QMP sockets serve one client at a time: nothing else may hold them.";

pub const EXAMPLES: &str = "\
Examples:
  # Precopy between two hosts (the destination listens on 10.0.0.2:4444):
  gmemctl migrate --from qmp=/run/src.qmp,control=/run/gmemd-src.sock \\
      --to qmp=/run/dst.qmp,control=/run/gmemd-dst.sock --uri tcp:10.0.0.2:4444

  # Postcopy 2 s after the start, precopy throttled to 100 MiB/s, for a script:
  gmemctl migrate --from src.qmp --to dst.qmp --uri unix:/tmp/mig.sock \\
      --postcopy-after 2 --max-bandwidth 100M --json

  # The postcopy connection broke and the migration paused: recover it.
  gmemctl migrate --from src.qmp --to dst.qmp --uri unix:/tmp/mig2.sock --resume";

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The source: its QEMU's QMP socket, and optionally its gmemd's control
    /// socket (for dirty-log figures). A bare PATH means qmp=PATH.
    #[arg(long, value_name = "qmp=PATH[,control=PATH]")]
    from: EndpointSpec,
    /// The destination: its QEMU's QMP socket, and optionally its gmemd's
    /// control socket (for postcopy device faults and their latency).
    #[arg(long, value_name = "qmp=PATH[,control=PATH]")]
    to: EndpointSpec,
    /// Where the destination listens, e.g. tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "URI")]
    uri: String,
    /// Where the source connects, when it differs from --uri (a relay or
    /// NAT in between).
    #[arg(long, value_name = "URI")]
    connect_uri: Option<String>,
    /// Switch to postcopy once precopy has sent all RAM once.
    #[arg(long)]
    postcopy: bool,
    /// Switch to postcopy this many seconds after the start (implies --postcopy).
    #[arg(long, value_name = "SECONDS")]
    postcopy_after: Option<Seconds>,
    /// In postcopy, send requested pages on a connection of their own
    /// (QEMU's postcopy-preempt): auto where both QEMUs and the URIs allow
    /// it and the destination has no vhost-user device (QEMU hangs at the
    /// end otherwise), on wherever QEMU accepts it, or off.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = Preempt::Auto)]
    postcopy_preempt: Preempt,
    /// Precopy bandwidth cap in bytes/s, with K, M, G suffixes (powers of
    /// 1024), e.g. 100M [default: QEMU's, 128M unless changed].
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// Bandwidth cap for the pages postcopy pushes in the background, bytes/s
    /// [default: QEMU's, unlimited unless changed].
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size)]
    max_postcopy_bandwidth: Option<u64>,
    /// The downtime precopy aims for, in milliseconds [default: QEMU's, 300].
    #[arg(long, value_name = "MS")]
    downtime_limit: Option<u64>,
    /// Give up after this many seconds; a precopy migration is then
    /// cancelled and the guest stays on the source.
    #[arg(long, value_name = "SECONDS", default_value_t = Seconds(DEFAULT_MIGRATION_TIMEOUT))]
    timeout: Seconds,
    /// Take over a migration already under way: if it paused in postcopy,
    /// recover it (migrate-recover on the destination at --uri, migrate
    /// resume on the source), then wait for it as usual.
    #[arg(long)]
    resume: bool,
    /// Print the final report as one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

impl MigrateArgs {
    fn options(&self) -> MigrationOptions {
        let mut options = MigrationOptions::new(&self.uri);
        if let Some(connect_uri) = &self.connect_uri {
            options.connect_uri = connect_uri.clone();
        }
        options.postcopy = match (self.postcopy_after, self.postcopy) {
            (Some(Seconds(delay)), _) => Some(SwitchToPostcopy::After(delay)),
            (None, true) => Some(SwitchToPostcopy::AfterFirstPass),
            (None, false) => None,
        };
        options.max_bandwidth = self.max_bandwidth;
        options.max_postcopy_bandwidth = self.max_postcopy_bandwidth;
        options.downtime_limit_ms = self.downtime_limit;
        options.timeout = self.timeout.0;
        options
    }
}

/// When `gmemctl migrate` runs postcopy with QEMU's postcopy-preempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preempt {
    /// Where it works.
    Auto,
    /// Wherever QEMU accepts it.
    On,
    /// Never.
    Off,
}

/// `qmp=PATH[,control=PATH]`, or a bare QMP socket path.
#[derive(Debug, Clone)]
struct EndpointSpec {
    qmp: PathBuf,
    control: Option<PathBuf>,
}

impl FromStr for EndpointSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.contains('=') {
            return Ok(EndpointSpec { qmp: s.into(), control: None });
        }
        let (mut qmp, mut control) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("qmp", path)) if !path.is_empty() => qmp = Some(path.into()),
                Some(("control", path)) if !path.is_empty() => control = Some(path.into()),
                _ => return Err(format!("unknown part {part:?}: use qmp=PATH[,control=PATH]")),
            }
        }
        let qmp = qmp.ok_or("missing qmp=PATH (the QEMU's QMP socket)")?;
        Ok(EndpointSpec { qmp, control })
    }
}

/// The connections to one side.
struct Connected {
    qmp: QmpClient,
    gmemd: Option<ControlClient>,
}

impl Connected {
    fn open(spec: &EndpointSpec, side: Side) -> Result<Self> {
        let qmp = QmpClient::connect(&spec.qmp, Duration::from_secs(5))
            .with_context(|| format!("connecting to the {side} QEMU's QMP socket {}", spec.qmp.display()))?;
        let gmemd = spec
            .control
            .as_ref()
            .map(|path| {
                ControlClient::connect(path)
                    .with_context(|| format!("connecting to the {side} gmemd's control socket {}", path.display()))
            })
            .transpose()?;
        Ok(Connected { qmp, gmemd })
    }

    fn endpoint(&mut self) -> Endpoint<'_> {
        Endpoint { qmp: &mut self.qmp, gmemd: self.gmemd.as_mut() }
    }
}

pub fn run(args: &MigrateArgs) -> Result<()> {
    let mut options = args.options();
    let mut src = Connected::open(&args.from, Side::Source)?;
    let mut dst = Connected::open(&args.to, Side::Destination)?;
    let mut migration = if args.resume {
        take_over(&mut src.qmp, &mut dst.qmp, &options)?
    } else {
        if options.postcopy.is_some() {
            destination_serves_postcopy(&mut dst)?;
            options.postcopy_preempt = use_preempt(args.postcopy_preempt, &mut src, &mut dst, &options)?;
        }
        prepare_destination(&mut dst.qmp, &options)?;
        Migration::start(&mut src.qmp, &options)?
    };
    let mut display = ProgressDisplay::new();
    let result = migration.wait(src.endpoint(), dst.endpoint(), |p| display.show(p));
    display.finish();
    match result {
        Ok(report) if args.json => println!("{}", serde_json::to_string(&report)?),
        Ok(report) => print!("{}", summary(&report)),
        Err(MigrationError::Timeout { status, elapsed }) if !status.is_postcopy() => {
            migration.cancel(&mut src.qmp).context("cancelling the migration after the timeout")?;
            return Err(anyhow!(
                "no completion after {:.0} s ({status}): migration cancelled, the guest keeps \
                 running on the source",
                elapsed.as_secs_f64()
            ));
        }
        Err(e @ MigrationError::Timeout { .. }) => {
            return Err(anyhow!(
                "{e}; a postcopy migration cannot be cancelled (the guest runs on the \
                 destination): keep waiting with the same command plus --resume"
            ));
        }
        Err(e @ MigrationError::PostcopyPaused { .. }) => {
            return Err(anyhow!(
                "{e}; the guest runs on the destination and waits for the pages still on the \
                 source: once the connection works again, run the same command plus --resume \
                 (with a new port or path in --uri)"
            ));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Says why postcopy cannot work before anything is set up, if the
/// destination gmemd knows (QEMU would refuse too, saying less).
fn destination_serves_postcopy(dst: &mut Connected) -> Result<()> {
    let Some(gmemd) = dst.gmemd.as_mut() else {
        return Ok(());
    };
    let info = gmemd.query_migration().context("query-migration on the destination gmemd")?;
    match info.postcopy.unavailable {
        Some(why) => Err(anyhow!(
            "the destination gmemd cannot serve postcopy: {why}; migrate without --postcopy, or restart it with that privilege"
        )),
        None => Ok(()),
    }
}

/// Whether to run postcopy with postcopy-preempt, as `when` says; tells
/// why not, or why it may not end well.
fn use_preempt(when: Preempt, src: &mut Connected, dst: &mut Connected, options: &MigrationOptions) -> Result<bool> {
    if when == Preempt::Off {
        return Ok(false);
    }
    let why_not = postcopy_preempt_unavailable(&mut src.qmp, &mut dst.qmp, options)?;
    match (when, why_not) {
        (_, None) => Ok(true),
        (Preempt::On, Some(why)) if !why.qemu_refuses() => {
            log::warn!("postcopy-preempt on as asked, though {why}");
            Ok(true)
        }
        (Preempt::On, Some(why)) => Err(anyhow!("--postcopy-preempt on: {why}")),
        (_, Some(why)) => {
            log::warn!("postcopy without postcopy-preempt (requested pages queue behind the background stream): {why}");
            Ok(false)
        }
    }
}

/// Attaches to the migration the source runs and, if it paused in
/// postcopy, recovers it.
fn take_over(src: &mut QmpClient, dst: &mut QmpClient, options: &MigrationOptions) -> Result<Migration> {
    let mut migration =
        Migration::attach(src, options).context("--resume needs a migration under way on the source")?;
    if query_migrate(src, Side::Source)?.status() == MigrationStatus::PostcopyPaused {
        log::info!("recovering the paused postcopy migration");
        migration.recover(dst, &options.listen_uri)?;
        migration.resume(src, &options.connect_uri)?;
    }
    Ok(migration)
}

/// A duration given in seconds, fractions allowed: `2`, `0.5`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub Duration);

impl FromStr for Seconds {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse::<f64>()
            .ok()
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .map(Seconds)
            .ok_or_else(|| format!("{text:?} is not a number of seconds"))
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_may_be_fractions() {
        assert_eq!("0.5".parse(), Ok(Seconds(Duration::from_millis(500))));
        assert_eq!("3".parse(), Ok(Seconds(Duration::from_secs(3))));
        assert!("-1".parse::<Seconds>().is_err());
        assert_eq!(Seconds(DEFAULT_MIGRATION_TIMEOUT).to_string(), "600");
    }

    #[test]
    fn endpoints_name_their_sockets() {
        let full: EndpointSpec = "qmp=/run/q.sock,control=/run/g.sock".parse().expect("parse");
        assert_eq!(full.qmp, PathBuf::from("/run/q.sock"));
        assert_eq!(full.control, Some(PathBuf::from("/run/g.sock")));
        let bare: EndpointSpec = "/run/q.sock".parse().expect("parse");
        assert_eq!((bare.qmp, bare.control), (PathBuf::from("/run/q.sock"), None));
        assert!("control=/run/g.sock".parse::<EndpointSpec>().is_err());
        assert!("qmp=/q,gmemd=/g".parse::<EndpointSpec>().is_err());
    }
}
