//! `GuestRegion`: one piece of guest RAM that gmemd creates, seals and maps.
//!
//! The region's file is what QEMU maps (through `/proc/<pid>/fd/<n>`), and its
//! mapping here is the one the device data path reads and writes. Because the
//! file is sealed against shrink and grow, no frontend can truncate it under
//! the daemon: a truncation would turn the daemon's own accesses into SIGBUS.
//!
//! A region can also be taken back — adopted — from an fd that names it: by
//! a new gmemd image after an exec upgrade (the fd was inherited), or by a
//! gmemd restarted after a crash (the fd comes in a frontend's memory table).
//! What makes the fd this region's is its [`RegionRecord`]: the memfd's
//! (device, inode), size, seals, and its name, which carries a random token
//! drawn when the region was made. An inode is unique among files that
//! exist, and the token tells this region from an unrelated memfd that got
//! a recycled inode number after the region itself was gone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gmem_attributes::RegionAttributes;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

/// What a region's pages live in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    /// An anonymous memfd: freed when the daemon exits.
    Memfd,
    /// A memfd on the default hugetlb size.
    MemfdHugetlb,
    /// A file on tmpfs or hugetlbfs, so that RAM outlives a daemon restart.
    File(PathBuf),
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Memfd => f.write_str("memfd"),
            Backing::MemfdHugetlb => f.write_str("memfd-hugetlb"),
            Backing::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// How to create one region (`--memory`, `--region size=..,id=..[,hugetlb][,path=..]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec {
    /// Name shown on the control socket and used as QEMU's memory-backend id.
    pub id: String,
    /// Size in bytes; a multiple of the page (or huge page) size.
    pub size: u64,
    /// Where the pages live.
    pub backing: Backing,
    /// Keep the region in RAM (mlock), charged to `owner` in the pin ledger.
    #[serde(default)]
    pub lock: bool,
    /// The VM the region belongs to, for the pin ledger (`None`: the
    /// daemon's `--vm-id`).
    #[serde(default)]
    pub owner: Option<String>,
}

impl RegionSpec {
    /// A plain memfd region: not locked, owned by the daemon's VM.
    pub fn memfd(id: &str, size: u64) -> Self {
        RegionSpec { id: id.into(), size, backing: Backing::Memfd, lock: false, owner: None }
    }

    /// Whether `other` is the same memory: id, size and backing (locking
    /// and ownership may change between two starts).
    pub fn same_memory(&self, other: &RegionSpec) -> bool {
        self.id == other.id && self.size == other.size && self.backing == other.backing
    }
}

/// Errors creating a region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// memfd_create failed.
    #[error("region {id}: memfd_create: {source}")]
    Create { id: String, source: io::Error },
    /// Opening the backing file failed.
    #[error("region {id}: opening {path}: {source}")]
    Open { id: String, path: PathBuf, source: io::Error },
    /// The file could not be sized.
    #[error("region {id}: setting the size to {size} bytes: {source}")]
    Size { id: String, size: u64, source: io::Error },
    /// A kept backing file has another size than asked for.
    #[error(
        "region {id}: the backing file already holds {existing} bytes of guest RAM, not {size}; refusing to resize it"
    )]
    SizeMismatch { id: String, existing: u64, size: u64 },
    /// Sealing failed.
    #[error("region {id}: sealing against shrink/grow: {source}")]
    Seal { id: String, source: io::Error },
    /// Mapping failed.
    #[error("region {id}: mmap of {size} bytes: {source}")]
    Map { id: String, size: u64, source: vm_memory::mmap::MmapRegionError },
    /// The file's identity could not be read.
    #[error("region {id}: its attribute map: {why}")]
    Attributes { id: String, why: String },
    #[error("region {id}: fstat: {source}")]
    Stat { id: String, source: io::Error },
    /// A size that cannot be mapped.
    #[error("region {id}: size {size} is not a non-zero multiple of {page} bytes")]
    BadSize { id: String, size: u64, page: u64 },
    /// An fd offered as the region is not it.
    #[error("region {id}: the fd offered for it is not the region gmemd made ({why}); not adopted")]
    NotOurs { id: String, why: String },
}

/// What identifies a region gmemd made, to take it back later from an fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRecord {
    /// How it was made.
    pub spec: RegionSpec,
    /// Its file's (device, inode).
    pub identity: FileIdentity,
    /// The memfd's name, token included (empty for a `path=` file).
    pub name: String,
}

/// (device, inode) of an open file: how a frontend's fd is recognised as ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    /// The identity of `file`.
    pub fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        Ok(FileIdentity { dev: meta.dev(), ino: meta.ino() })
    }
}

/// One guest RAM region owned by the daemon.
#[derive(Debug)]
pub struct GuestRegion {
    spec: RegionSpec,
    identity: FileIdentity,
    /// The memfd's name, with its token; empty for a `path=` file.
    name: String,
    /// The region file's fd number, for `/proc/<pid>/fd/<n>`.
    fd: std::os::fd::RawFd,
    /// The mapping also holds the region's one open file (its `FileOffset`),
    /// so the region costs the daemon a single fd.
    mapping: Arc<MmapRegion>,
    /// Whether gmemd asked for transparent huge pages on the mapping.
    hugepage_advised: bool,
    /// A `path=` file can be truncated by whoever may write it; its mapping
    /// is then kept usable (see `truncation`).
    _truncation: Option<super::truncation::TruncationGuard>,
    /// Which pages are private (the device may not touch them), and the
    /// references that keep a range from becoming private.
    attributes: RegionAttributes,
}

const PAGE_SIZE: u64 = 4096;
const HUGE_PAGE_SIZE: u64 = 2 << 20;

impl GuestRegion {
    /// Creates, sizes, seals and maps the region described by `spec`.
    pub fn create(spec: RegionSpec) -> Result<Self, RegionError> {
        let id = spec.id.clone();
        let page = match spec.backing {
            Backing::MemfdHugetlb => HUGE_PAGE_SIZE,
            _ => PAGE_SIZE,
        };
        if spec.size == 0 || !spec.size.is_multiple_of(page) {
            return Err(RegionError::BadSize { id, size: spec.size, page });
        }
        let name = match spec.backing {
            Backing::File(_) => String::new(),
            _ => {
                format!("gmemd-{id}-{:016x}", token().map_err(|source| RegionError::Create { id: id.clone(), source })?)
            }
        };
        let file = match &spec.backing {
            Backing::Memfd => create_memfd(&id, &name, 0)?,
            Backing::MemfdHugetlb => create_memfd(&id, &name, libc::MFD_HUGETLB)?,
            Backing::File(path) => open_backing_file(&id, path)?,
        };
        let current = file.metadata().map_err(|source| RegionError::Stat { id: id.clone(), source })?;
        // A kept file holds guest RAM from an earlier run: never resize it,
        // that would drop RAM content (and SIGBUS a QEMU still mapping it).
        if matches!(spec.backing, Backing::File(_)) && current.len() != 0 && current.len() != spec.size {
            return Err(RegionError::SizeMismatch { id, existing: current.len(), size: spec.size });
        }
        if current.len() != spec.size {
            file.set_len(spec.size).map_err(|source| RegionError::Size { id: id.clone(), size: spec.size, source })?;
        }
        // Only memfds take seals; a tmpfs/hugetlbfs file cannot be sealed, so a
        // file-backed region relies on the file's permissions instead.
        if !matches!(spec.backing, Backing::File(_)) {
            seal_size(&file).map_err(|source| RegionError::Seal { id: id.clone(), source })?;
        }
        Self::map(spec, name, file)
    }

    /// Takes back the region `record` describes from `file`, after checking
    /// that `file` is that region: same (device, inode), size and seals,
    /// and, for a memfd, the same name with its token. Nothing is adopted
    /// on the word of whoever sent the fd.
    pub fn adopt(record: &RegionRecord, file: File) -> Result<Self, RegionError> {
        let id = record.spec.id.clone();
        let not_ours = |why: String| RegionError::NotOurs { id: id.clone(), why };
        let identity = FileIdentity::of(&file).map_err(|source| RegionError::Stat { id: id.clone(), source })?;
        if identity != record.identity {
            return Err(not_ours("another file".into()));
        }
        let len = file.metadata().map_err(|source| RegionError::Stat { id: id.clone(), source })?.len();
        if len != record.spec.size {
            return Err(not_ours(format!("{len} bytes, not {}", record.spec.size)));
        }
        if !matches!(record.spec.backing, Backing::File(_)) {
            let seals = crate::sys::seals(&file).map_err(|e| not_ours(format!("no seals: {e}")))?;
            let wanted = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            if seals & wanted != wanted {
                return Err(not_ours(format!("seals {seals:#x}, not {wanted:#x}")));
            }
            let target = crate::sys::fd_target(&file).map_err(|e| not_ours(e.to_string()))?;
            if memfd_name(&target) != Some(record.name.as_str()) {
                return Err(not_ours(format!("named {}", target.display())));
            }
        }
        Self::map(record.spec.clone(), record.name.clone(), file)
    }

    fn map(spec: RegionSpec, name: String, file: File) -> Result<Self, RegionError> {
        let id = spec.id.clone();
        let identity = FileIdentity::of(&file).map_err(|source| RegionError::Stat { id: id.clone(), source })?;
        let fd = file.as_raw_fd();
        let size = usize::try_from(spec.size).map_err(|_| RegionError::BadSize {
            id: id.clone(),
            size: spec.size,
            page: PAGE_SIZE,
        })?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(|source| RegionError::Map {
            id,
            size: spec.size,
            source,
        })?;
        let hugepage_advised = !matches!(spec.backing, Backing::MemfdHugetlb) && advise_hugepages(&mapping);
        let page = mapping.file_offset().map_or(PAGE_SIZE, |f| file_page_size(f.file()));
        let attributes = RegionAttributes::new(spec.size, page)
            .map_err(|e| RegionError::Attributes { id: spec.id.clone(), why: e.to_string() })?;
        let truncation = match &spec.backing {
            Backing::File(_) => {
                let guard = super::truncation::protect(mapping.as_ptr() as usize, mapping.size(), page as usize);
                if guard.is_none() {
                    log::warn!("region {}: too many path= regions to guard against truncation", spec.id);
                }
                guard
            }
            Backing::Memfd | Backing::MemfdHugetlb => None,
        };
        Ok(GuestRegion {
            spec,
            identity,
            name,
            fd,
            mapping: Arc::new(mapping),
            hugepage_advised,
            _truncation: truncation,
            attributes,
        })
    }

    /// How the region was asked for.
    pub fn spec(&self) -> &RegionSpec {
        &self.spec
    }

    /// The daemon's virtual address of the region's first byte.
    pub fn host_addr(&self) -> usize {
        self.mapping.as_ptr() as usize
    }

    /// The region's private/shared map and its references.
    pub fn attributes(&self) -> &RegionAttributes {
        &self.attributes
    }

    /// Discards `[offset, offset + len)`: it reads as zeroes afterwards
    /// (a range that turned private loses its content).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let file = self.mapping.file_offset().map(|f| f.file()).ok_or_else(|| io::Error::other("no file"))?;
        gmem_attributes::punch_hole(file, offset, len)
    }

    /// What identifies the region, to adopt it again later.
    pub fn record(&self) -> RegionRecord {
        RegionRecord { spec: self.spec.clone(), identity: self.identity, name: self.name.clone() }
    }

    /// The region file's fd, which gmemd keeps open for the region's life.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    /// The region's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.spec.size
    }

    /// What the pages live in.
    pub fn backing(&self) -> &Backing {
        &self.spec.backing
    }

    /// The (device, inode) pair frontends' fds are matched against.
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// The daemon's one mapping of the region.
    pub fn mapping(&self) -> &Arc<MmapRegion> {
        &self.mapping
    }

    /// Whether gmemd asked for transparent huge pages on the mapping (postcopy
    /// turns them off while RAM is registered and back on after).
    pub fn hugepage_advised(&self) -> bool {
        self.hugepage_advised
    }

    /// The path a frontend on this host opens to map the same memory.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.fd))
    }

    /// Bytes backed by pages now (allocated blocks of the file).
    pub fn populated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let file = self.mapping.file_offset().map(FileOffset::file);
        file.and_then(|f| f.metadata().ok()).map_or(0, |m| m.blocks() * 512)
    }
}

/// The page size of the file system `file` lives on: the huge page size on
/// hugetlbfs, 4 KiB elsewhere.
pub(super) fn file_page_size(file: &File) -> u64 {
    const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the statfs it is given, for a valid fd.
    if unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return PAGE_SIZE;
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    let stat = unsafe { stat.assume_init() };
    if stat.f_type == HUGETLBFS_MAGIC {
        u64::try_from(stat.f_bsize).unwrap_or(PAGE_SIZE)
    } else {
        PAGE_SIZE
    }
}

/// Asks for transparent huge pages on guest RAM, as QEMU does for its own
/// RAM; false when the kernel has THP off for shared memory or not at all.
fn advise_hugepages(mapping: &MmapRegion) -> bool {
    // SAFETY: the range is exactly the fresh mapping; MADV_HUGEPAGE changes
    // its THP policy, never its content.
    unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE) == 0 }
}

fn create_memfd(id: &str, name: &str, extra_flags: libc::c_uint) -> Result<File, RegionError> {
    crate::sys::memfd(name, libc::MFD_ALLOW_SEALING | extra_flags)
        .map_err(|source| RegionError::Create { id: id.to_string(), source })
}

/// A random 64-bit token, for a memfd's name.
fn token() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(bytes))
}

/// The name of the memfd `/proc/self/fd/<n>` links to, as in
/// `/memfd:gmemd-ram0-0123456789abcdef (deleted)`.
fn memfd_name(target: &Path) -> Option<&str> {
    target.to_str()?.strip_prefix("/memfd:")?.strip_suffix(" (deleted)")
}

fn open_backing_file(id: &str, path: &Path) -> Result<File, RegionError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Guest RAM is private to the daemon and the frontends of its user.
    OpenOptions::new()
        .mode(0o600)
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| RegionError::Open { id: id.to_string(), path: path.to_path_buf(), source })
}

/// Seals the memfd's size for good: shrink and grow are refused to everyone
/// (frontends included), and no further seals may be added, so a frontend
/// cannot seal writes away either.
fn seal_size(file: &File) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an owned fd with an integer argument; no memory
    // is passed to the kernel.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::VolatileMemory;

    #[test]
    fn memfd_region_is_sealed_and_shared() {
        let region = GuestRegion::create(RegionSpec::memfd("ram0", 1 << 20)).expect("create");
        assert_eq!(region.size(), 1 << 20);
        // Sealed: nobody can resize it, not even through a reopened path.
        let reopened = OpenOptions::new().read(true).write(true).open(region.fd_path()).expect("reopen");
        assert_eq!(FileIdentity::of(&reopened).expect("stat"), region.identity());
        assert!(reopened.set_len(4096).is_err(), "shrink must be refused");
        assert!(reopened.set_len(2 << 20).is_err(), "grow must be refused");
        // A write through the daemon's mapping is visible through the file.
        let slice = region.mapping().get_slice(4096, 4).expect("slice");
        slice.copy_from(&[1u8, 2, 3, 4]);
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&reopened, &mut buf, 4096).expect("read");
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(region.populated_bytes() >= 4096);
    }

    #[test]
    fn a_region_is_adopted_from_its_own_fd_only() {
        let region = GuestRegion::create(RegionSpec::memfd("ram0", 1 << 20)).expect("create");
        region.mapping().get_slice(0, 1).expect("slice").copy_from(&[0x5au8]);
        let record = region.record();
        assert!(
            record.name.starts_with("gmemd-ram0-") && record.name.len() == "gmemd-ram0-".len() + 16,
            "{}",
            record.name
        );
        let open = |path: PathBuf| OpenOptions::new().read(true).write(true).open(path).expect("open");
        let adopted = GuestRegion::adopt(&record, open(region.fd_path())).expect("its own fd");
        let mut byte = [0u8];
        adopted.mapping().get_slice(0, 1).expect("slice").copy_to(&mut byte[..]);
        assert_eq!(byte, [0x5a], "the same memory");
        // An unrelated memfd of the same name and size is not adopted.
        let other = crate::sys::memfd(&record.name, libc::MFD_ALLOW_SEALING).expect("memfd");
        other.set_len(1 << 20).expect("size");
        seal_size(&other).expect("seal");
        assert!(matches!(GuestRegion::adopt(&record, other), Err(RegionError::NotOurs { .. })));
        // Nor the region's inode under another name (a forged record).
        let forged = RegionRecord { name: "gmemd-ram0-0000000000000000".into(), ..record };
        assert!(matches!(GuestRegion::adopt(&forged, open(region.fd_path())), Err(RegionError::NotOurs { .. })));
    }

    #[test]
    fn rejects_sizes_that_cannot_be_mapped() {
        assert!(matches!(GuestRegion::create(RegionSpec::memfd("z", 0)), Err(RegionError::BadSize { .. })));
        assert!(matches!(GuestRegion::create(RegionSpec::memfd("odd", 4097)), Err(RegionError::BadSize { .. })));
    }

    #[test]
    fn file_backed_region_keeps_content_across_instances() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ram");
        let spec =
            RegionSpec { id: "ram0".into(), size: 1 << 20, backing: Backing::File(path), lock: false, owner: None };
        let first = GuestRegion::create(spec.clone()).expect("create");
        first.mapping().get_slice(0, 1).expect("slice").copy_from(&[0xa5u8]);
        drop(first);
        let bigger = RegionSpec { size: 2 << 20, ..spec.clone() };
        assert!(matches!(GuestRegion::create(bigger), Err(RegionError::SizeMismatch { .. })));
        let second = GuestRegion::create(spec).expect("reopen");
        let mut byte = [0u8];
        second.mapping().get_slice(0, 1).expect("slice").copy_to(&mut byte[..]);
        assert_eq!(byte, [0xa5]);
    }
}
