//! gmemd's command line.

use std::path::PathBuf;

use clap::Parser;

use crate::blk::aio::AioKind;
use crate::blk::CacheMode;
use crate::memory::{Backing, RegionSpec};

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
pub struct Args {
    /// vhost-user socket QEMU connects to (created with --socket-mode).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Raw disk image served as the virtio-blk disk.
    #[arg(long, value_name = "PATH")]
    pub disk: PathBuf,

    /// Control socket for gmemctl and scripts (JSON lines, see
    /// docs/control-protocol.md). Mode 0600; only root and gmemd's own user
    /// may use it.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// File recording this gmemd's regions and frontends, so that a gmemd
    /// restarted after a crash takes back the RAM a running QEMU still maps
    /// (default: the --socket path with `.state` appended).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,

    /// Guest RAM as one region `ram0` of this size (e.g. 512M, 1G).
    /// Ignored when --region is given.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub memory: u64,

    /// A guest RAM region: id=NAME,size=SIZE[,hugetlb][,path=FILE][,lock][,owner=VM].
    /// Repeat for several; the first is the machine's main RAM, the others
    /// become DIMMs. path= keeps the RAM in a tmpfs/hugetlbfs file that
    /// outlives gmemd. lock keeps it in RAM (mlock), charged to owner= (by
    /// default --vm-id) in the pin ledger.
    #[arg(long, value_name = "SPEC", value_parser = parse_region)]
    pub region: Vec<RegionSpec>,

    /// Lock every region in RAM (mlock), as each region's `lock` does.
    #[arg(long)]
    pub mlock: bool,

    /// The VM this gmemd's regions belong to, unless a region names its
    /// own owner=: the account their pins are charged to.
    #[arg(long, value_name = "ID", default_value = "vm0")]
    pub vm_id: String,

    /// How much each owner may pin (locked regions): bytes with K/M/G/T, or
    /// `unlimited`. Default: RLIMIT_MEMLOCK, or unlimited with CAP_IPC_LOCK,
    /// as the kernel would allow. The owners' pins also count against one
    /// budget per user, the same limit: a second frontend of the same VM,
    /// a helper, or gmemd after an upgrade or a restart does not get a
    /// second budget.
    #[arg(long, value_name = "SIZE", value_parser = parse_limit)]
    pub memlock_limit: Option<gmem_pins::Limit>,

    /// Number of virtio-blk request queues (one worker thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// How the disk image is cached, as QEMU's cache= names it:
    /// writeback (host page cache; writes durable after the guest's
    /// FLUSH), writethrough (page cache; every write durable when it
    /// completes), none (O_DIRECT; durable after FLUSH), directsync
    /// (O_DIRECT; every write durable). The guest may turn the write cache
    /// off and on (VIRTIO_BLK_F_CONFIG_WCE).
    #[arg(long, value_enum, default_value_t = CacheMode::Writeback)]
    pub cache: CacheMode,

    /// The disk engine: io_uring (each queue keeps up to its size of
    /// requests in flight), or sync (one request at a time per queue).
    /// io_uring falls back to sync, with a warning, where the kernel
    /// refuses it.
    #[arg(long, value_enum, default_value_t = AioKind::IoUring)]
    pub aio: AioKind,

    /// Longest time, in microseconds, a queue worker polls its ring and its
    /// disk engine for work before it sleeps on the kick eventfd. Polling
    /// trades CPU for latency: a request the guest adds, or a completion,
    /// is seen at once instead of after a wake-up. The window adapts as in
    /// QEMU's iothreads (whose poll-max-ns defaults to 32 µs too): halved
    /// when the next work came later than this, doubled (from 4 µs) when it
    /// came sooner than this but after the window, so an idle queue does
    /// not spin. 0 never polls.
    #[arg(long, value_name = "US", default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub poll_us: u32,

    /// Serve the disk read-only (VIRTIO_BLK_F_RO; writes fail with IOERR).
    #[arg(long)]
    pub readonly: bool,

    /// Device id returned to the guest's GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "gmemd")]
    pub serial: String,

    /// Accept memory tables that name memory gmemd does not own, acting as
    /// a plain vhost-user backend for QEMU-owned RAM. Such memory must be a
    /// memfd that gmemd can seal against shrinking (or is sealed already).
    #[arg(long)]
    pub allow_foreign_memory: bool,

    /// Permission bits of the vhost-user socket, in octal. 0600 lets only
    /// gmemd's user connect; 0660 with --socket-group lets a group in.
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Group of the vhost-user socket (a name or a gid), e.g. the group
    /// QEMU runs as under libvirt.
    #[arg(long, value_name = "GROUP", value_parser = crate::peers::parse_group)]
    pub socket_group: Option<u32>,

    /// Also accept vhost-user connections from this user (a name or a uid).
    /// Root and gmemd's own user are always accepted. Repeatable.
    #[arg(long, value_name = "USER", value_parser = crate::peers::parse_user)]
    pub allow_uid: Vec<u32>,

    /// Also accept vhost-user connections from members of this group (a
    /// name or a gid; supplementary groups count). Repeatable.
    #[arg(long, value_name = "GROUP", value_parser = crate::peers::parse_group)]
    pub allow_gid: Vec<u32>,

    /// Frontend connections served at once; more are refused. QEMU uses
    /// one per device, two during a cpr-transfer live update.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_frontends: u16,

    /// Seconds a postcopy registration outlives a destination QEMU that
    /// disconnected before the migration ended; then it is dropped (and at
    /// once with `gmemctl postcopy-abort`). 0 drops it at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub postcopy_orphan_timeout: u64,

    /// For tests only: accept QEMU's dirty log but never mark it, so a
    /// precopy migration silently loses the device's writes. Exists to prove
    /// that the migration tests' verification catches exactly that.
    #[arg(long, hide = true)]
    pub test_skip_dirty_log: bool,
}

const EXAMPLES: &str = "Examples:
  gmemd --socket /run/gmemd/vhost.sock --control /run/gmemd/control.sock --disk disk.raw --memory 1G
  gmemd --socket vhost.sock --disk disk.raw --region id=ram0,size=1G --region id=ram1,size=512M --queues 2
  # QEMU running as libvirt's qemu user:
  gmemd --socket /run/gmemd/vhost.sock --disk disk.raw --socket-group kvm --socket-mode 660 --allow-gid kvm

Logging goes to stderr, warnings and errors only; set RUST_LOG=info (or debug)
for more. Lines a guest or frontend can cause are rate-limited per call site.
SIGTERM and SIGINT stop gmemd; SIGHUP is ignored (a closed terminal must not
take a guest's RAM and disk down).";

impl Args {
    /// The state file's path.
    pub fn state_path(&self) -> PathBuf {
        self.state.clone().unwrap_or_else(|| {
            let mut path = self.socket.clone().into_os_string();
            path.push(".state");
            path.into()
        })
    }

    /// The regions to create: the --region list, or one `ram0` of --memory.
    pub fn region_specs(&self) -> Result<Vec<RegionSpec>, CliError> {
        let specs = if self.region.is_empty() {
            vec![RegionSpec::memfd("ram0", self.memory)]
        } else {
            let mut ids: Vec<&str> = self.region.iter().map(|s| s.id.as_str()).collect();
            ids.sort_unstable();
            if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
                return Err(CliError::DuplicateRegion(pair[0].to_string()));
            }
            self.region.clone()
        };
        Ok(specs.into_iter().map(|spec| RegionSpec { lock: spec.lock || self.mlock, ..spec }).collect())
    }
}

/// A command-line value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// A malformed --region.
    #[error("--region '{spec}': {why}; expected id=NAME,size=SIZE[,hugetlb][,path=FILE][,lock][,owner=VM]")]
    Region { spec: String, why: String },
    /// Two --region with one id.
    #[error("--region id '{0}' is given twice; ids must be unique")]
    DuplicateRegion(String),
    /// A mode that is not octal permission bits.
    #[error("'{0}' is not a file mode: use octal permission bits, e.g. 600 or 0660")]
    Mode(String),
}

pub use gmem_protocol::parse_size;

/// Parses `--memlock-limit`: a size, or `unlimited`.
pub fn parse_limit(text: &str) -> Result<gmem_pins::Limit, String> {
    match text {
        "unlimited" | "infinity" => Ok(gmem_pins::Limit::Unlimited),
        _ => parse_size(text).map(gmem_pins::Limit::Bytes).map_err(|e| format!("{e}, or `unlimited`")),
    }
}

/// Parses `--socket-mode`: octal permission bits.
pub fn parse_mode(text: &str) -> Result<u32, CliError> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| CliError::Mode(text.to_string()))
}

/// Parses one `--region id=NAME,size=SIZE[,hugetlb][,path=FILE][,lock][,owner=VM]`.
pub fn parse_region(spec: &str) -> Result<RegionSpec, CliError> {
    let fail = |why: &str| CliError::Region { spec: spec.to_string(), why: why.to_string() };
    let (mut id, mut size, mut hugetlb, mut path) = (None, None, false, None);
    let (mut lock, mut owner) = (false, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            // The id becomes QEMU's object id, which must start with a letter.
            Some(("id", v))
                if v.starts_with(|c: char| c.is_ascii_alphabetic())
                    && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                id = Some(v.to_string())
            }
            Some(("id", _)) => {
                return Err(fail(
                    "id must start with a letter and hold only letters, digits, '-' or '_' (it is QEMU's object id)",
                ))
            }
            Some(("size", v)) => size = Some(parse_size(v).map_err(|e| fail(&e.to_string()))?),
            Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
            Some(("owner", v)) if !v.is_empty() => owner = Some(v.to_string()),
            None if part == "hugetlb" => hugetlb = true,
            None if part == "lock" => lock = true,
            _ => return Err(fail(&format!("unknown option '{part}'"))),
        }
    }
    let backing = match (hugetlb, path) {
        (false, None) => Backing::Memfd,
        (true, None) => Backing::MemfdHugetlb,
        // A file on hugetlbfs is hugetlb-backed by where it lives.
        (_, Some(path)) => Backing::File(path),
    };
    Ok(RegionSpec {
        id: id.ok_or_else(|| fail("missing id="))?,
        size: size.ok_or_else(|| fail("missing size="))?,
        backing,
        lock,
        owner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions() {
        let r = parse_region("id=ram0,size=1G").expect("plain");
        assert_eq!((r.id.as_str(), r.size, r.backing), ("ram0", 1 << 30, Backing::Memfd));
        assert_eq!(parse_region("id=h,size=2M,hugetlb").expect("huge").backing, Backing::MemfdHugetlb);
        let f = parse_region("size=4M,id=f,path=/dev/shm/ram").expect("file");
        assert_eq!(f.backing, Backing::File("/dev/shm/ram".into()));
        let bad = [
            "size=1G",
            "id=x",
            "id=,size=1G",
            "id=a b,size=1G",
            "id=0ram,size=1G",
            "id=-x,size=1G",
            "id=x,size=1Q",
            "id=x,size=1G,color=red",
        ];
        for bad in bad {
            let error = parse_region(bad).expect_err(bad);
            assert!(error.to_string().contains("expected id=NAME"), "{error}");
        }
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("1777").is_err());
        assert!(parse_mode("rw").is_err());
    }

    #[test]
    fn duplicate_region_ids_are_refused() {
        let args = Args::parse_from([
            "gmemd",
            "--socket",
            "s",
            "--disk",
            "d",
            "--region",
            "id=a,size=1M",
            "--region",
            "id=a,size=2M",
        ]);
        assert_eq!(args.region_specs(), Err(CliError::DuplicateRegion("a".into())));
    }
}
