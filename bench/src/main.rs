//! `gmem-bench`: gmemd against qemu-storage-daemon on the same guest workload,
//! and live-migration figures through gmemd.

mod backends;
mod compare;
mod cpr;
mod figures;
mod host;
mod hostside;
mod migration;
mod qsd;
mod results;
mod update;

use anyhow::Result;
use clap::{Parser, Subcommand};

use backends::GmemdBuild;

/// What every result says about the guest's CPU.
const TCG_NOTE: &str = "The guest runs under TCG (-accel tcg -cpu max, no KVM): emulating the guest's \
CPU costs far more than either backend, so these figures compare backends under the same guest; \
they are not the backends' or the disk's physical limits.";

/// Benchmarks gmemd against qemu-storage-daemon on the same guest workload.
///
/// Without a subcommand: each run boots the test guest (scripts/guest-image)
/// under QEMU with TCG and runs its `bench` agent on a fresh sparse raw
/// image: sequential 1 MiB O_DIRECT writes (fdatasync included) and reads of
/// --mib MiB, then --randreads random 4 KiB O_DIRECT reads at queue depth 1
/// within that range. The guest measures each phase itself.
///
/// The two backends:
///   gmemd  gmemd owns the guest RAM (memfd); QEMU maps it through
///          /proc/<gmemd>/fd/N. Started via the test harness.
///   qsd    qemu-storage-daemon --export type=vhost-user-blk over a file
///          blockdev with cache.direct=off; QEMU owns its RAM as
///          memory-backend-memfd,share=on.
///
/// Runs alternate (gmemd, qsd, gmemd, ...), each after a host sync(1). The summary gives each figure's
/// median per backend and the ratio gmemd/qsd (above 1: gmemd faster); the
/// JSON result has every run, host facts and the command lines used.
///
/// The guest is TCG-bound: the figures compare backends under the same
/// emulated guest, not the physical limits of the host or the backends.
///
/// Mind the cache modes when reading seq-write: qsd's export tells the guest
/// its cache is write-through (CONFIG_WCE, wce=0), so the guest never sends it
/// a FLUSH, while gmemd receives one FLUSH per seq-write and runs fdatasync.
/// See docs/benchmarks.md.
///
/// `gmem-bench host` drives gmemd and qemu-storage-daemon from the host
/// through libblkio instead (no guest), next to the raw io_uring ceiling;
/// see `gmem-bench host --help`.
///
/// `gmem-bench migration` measures live migration instead (precopy and
/// postcopy, direct and delayed link, gmemd and qemu-storage-daemon); see
/// `gmem-bench migration --help`. `gmem-bench cpr` measures the downtime of
/// a QEMU live update (cpr-transfer, cpr-exec); see `gmem-bench cpr --help`.
/// `gmem-bench update` measures replacing the backend itself (gmemd's exec
/// upgrade, a restart); see `gmem-bench update --help`.
#[derive(Debug, Parser)]
#[command(
    verbatim_doc_comment,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    compare: compare::Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    Migration(migration::Args),
    Host(hostside::Args),
    Cpr(cpr::Args),
    Update(update::Args),
}

const EXAMPLES: &str = "Examples:
  cargo run --release -p gmem-bench -- --runs 3
  cargo run --release -p gmem-bench -- --gmemd-only --runs 1 --mib 32 --randreads 1000
  cargo run --release -p gmem-bench -- migration --runs 3
  cargo run --release -p gmem-bench -- host --quick
  cargo run --release -p gmem-bench -- cpr --runs 3
  cargo run --release -p gmem-bench -- update --runs 2

Needs qemu-system-x86_64 and (unless --gmemd-only) qemu-storage-daemon on PATH;
the first run builds the guest image and gmemd, which takes a while.";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let build = match &cli.command {
        Some(Command::Migration(args)) => args.backends.gmemd_build,
        Some(Command::Host(args)) => args.backends.gmemd_build,
        Some(Command::Cpr(args)) => args.backends.gmemd_build,
        Some(Command::Update(args)) => args.backends.gmemd_build,
        None => cli.compare.backends.gmemd_build,
    };
    if build == GmemdBuild::Release {
        // Before any thread exists: this sets environment variables.
        backends::optimize_harness_gmemd();
    }
    match cli.command {
        Some(Command::Migration(args)) => migration::run(args),
        Some(Command::Host(args)) => hostside::run(args),
        Some(Command::Cpr(args)) => cpr::run(args),
        Some(Command::Update(args)) => update::run(args),
        None => compare::run(cli.compare),
    }
}
