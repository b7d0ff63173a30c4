//! The raw image behind the device, and how it is cached.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::config::SECTOR_SIZE;

/// Errors opening the image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// open(2) failed.
    #[error("opening disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// The image is smaller than one sector.
    #[error("disk image {path} is {len} bytes; it needs at least one 512-byte sector")]
    TooSmall { path: PathBuf, len: u64 },
    /// The image's mode allows nobody to write it.
    #[error(
        "disk image {path} is read-only (mode {mode:o}); pass --readonly to serve it read-only, or make it writable"
    )]
    ReadOnlyImage { path: PathBuf, mode: u32 },
    /// O_DIRECT (cache none or directsync) is not possible on the image.
    #[error("disk image {path}: --cache {cache} needs O_DIRECT, which its file system refuses ({source}); use --cache writeback or writethrough")]
    NoDirect { path: PathBuf, cache: CacheMode, source: io::Error },
}

/// How the image is cached and when a write is durable, as QEMU's
/// `cache=` option names the four combinations (docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Host page cache; a write is durable after the guest's FLUSH.
    Writeback,
    /// Host page cache; every write is durable when it completes.
    Writethrough,
    /// O_DIRECT (no host page cache); a write is durable after FLUSH.
    None,
    /// O_DIRECT; every write is durable when it completes.
    Directsync,
}

impl CacheMode {
    /// Whether the host page cache is bypassed.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether the device starts with a volatile write cache the guest
    /// must flush (the guest can turn it off and on: VIRTIO_BLK_F_CONFIG_WCE).
    pub fn write_cache(self) -> bool {
        matches!(self, CacheMode::Writeback | CacheMode::None)
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::None => "none",
            CacheMode::Directsync => "directsync",
        })
    }
}

/// The image opened with O_DIRECT, and the alignment O_DIRECT needs there.
#[derive(Debug)]
struct Direct {
    file: File,
    /// Memory alignment of buffers (statx `dio_mem_align`).
    mem_align: u64,
    /// Alignment of offsets and lengths (statx `dio_offset_align`).
    offset_align: u64,
}

/// A raw disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// With cache none or directsync: what aligned transfers go through;
    /// the others go through `file`, as QEMU bounces them.
    direct: Option<Direct>,
    path: PathBuf,
    capacity_bytes: u64,
    readonly: bool,
    cache: CacheMode,
    /// The volatile write cache is on (the guest's WCE bit): writes need a
    /// FLUSH to be durable. Off, each write is made durable (RWF_DSYNC).
    write_cache: AtomicBool,
}

impl Disk {
    /// Opens the image; its size is the device's capacity, rounded down to
    /// whole sectors.
    pub fn open(path: &Path, readonly: bool, cache: CacheMode) -> Result<Self, DiskError> {
        let open_error = |source| DiskError::Open { path: path.to_path_buf(), source };
        // Root may open any file for writing; an image nobody may write is
        // meant to stay unchanged, so it is served read-only or not at all.
        let mode = std::fs::metadata(path).map_err(open_error)?.permissions().mode();
        if !readonly && mode & 0o222 == 0 {
            return Err(DiskError::ReadOnlyImage { path: path.to_path_buf(), mode: mode & 0o7777 });
        }
        let file = OpenOptions::new().read(true).write(!readonly).open(path).map_err(open_error)?;
        Self::inherit(file, path, readonly, cache)
    }

    /// The image open as `file` (a previous gmemd image's, kept across its
    /// exec), known by `path`. The O_DIRECT file, if the cache mode wants
    /// one, is opened again from `file` itself, so it is the same inode
    /// whatever `path` names now.
    pub fn inherit(file: File, path: &Path, readonly: bool, cache: CacheMode) -> Result<Self, DiskError> {
        let len = file.metadata().map_err(|source| DiskError::Open { path: path.to_path_buf(), source })?.len();
        if len < SECTOR_SIZE {
            return Err(DiskError::TooSmall { path: path.to_path_buf(), len });
        }
        let direct = match cache.direct() {
            true => Some(open_direct(&file, readonly).map_err(|source| DiskError::NoDirect {
                path: path.to_path_buf(),
                cache,
                source,
            })?),
            false => None,
        };
        Ok(Disk {
            file,
            direct,
            path: path.to_path_buf(),
            capacity_bytes: len - len % SECTOR_SIZE,
            readonly,
            cache,
            write_cache: AtomicBool::new(cache.write_cache()),
        })
    }

    /// The cache mode it was opened with.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// Whether the volatile write cache is on (see [`CacheMode::write_cache`]).
    pub fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    /// The guest turned its write cache on or off (the WCE config field).
    pub fn set_write_cache(&self, on: bool) {
        self.write_cache.store(on, Ordering::Relaxed);
    }

    /// The fd to move `iovecs` at `offset` through: the O_DIRECT one when
    /// there is one and the transfer meets its alignment, else the
    /// buffered one.
    pub fn fd_for(&self, iovecs: &[libc::iovec], offset: u64) -> RawFd {
        match &self.direct {
            Some(direct)
                if offset.is_multiple_of(direct.offset_align)
                    && iovecs.iter().all(|iov| {
                        (iov.iov_base as u64).is_multiple_of(direct.mem_align)
                            && (iov.iov_len as u64).is_multiple_of(direct.offset_align)
                    }) =>
            {
                direct.file.as_raw_fd()
            }
            _ => self.file.as_raw_fd(),
        }
    }

    /// The open image, for transfers.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes (whole sectors).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// DISCARD: deallocates the range. Discard is a hint, so a file system
    /// that cannot punch holes just keeps the data.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    /// WRITE_ZEROES: the range reads back as zeroes afterwards; `unmap`
    /// allows deallocating it.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
        match self.fallocate(mode | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zero_blocks(offset, len),
            other => other,
        }
    }

    fn write_zero_blocks(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
        // SAFETY: fallocate on an fd we own, with integer arguments only.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Opens `file` again with O_DIRECT (through /proc/self/fd, so the same
/// inode) and reads the alignment O_DIRECT needs on it.
fn open_direct(file: &File, readonly: bool) -> io::Result<Direct> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let direct = OpenOptions::new().read(true).write(!readonly).custom_flags(libc::O_DIRECT).open(path)?;
    // SAFETY: `statx` is plain integers, for which all zeroes is a value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes one `statx` struct into `stx`; the path is
    // empty with AT_EMPTY_PATH, so only the fd is looked at.
    let rc =
        unsafe { libc::statx(direct.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    let known = rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0;
    // Without the kernel's figure, 4 KiB is aligned enough for any device.
    let (mem_align, offset_align) = if known {
        (u64::from(stx.stx_dio_mem_align.max(1)), u64::from(stx.stx_dio_offset_align))
    } else {
        (4096, 4096)
    };
    Ok(Direct { file: direct, mem_align, offset_align })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn capacity_is_whole_sectors_and_tiny_images_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 1500]).expect("write");
        assert_eq!(Disk::open(&path, false, CacheMode::Writeback).expect("open").capacity_bytes(), 1024);
        std::fs::write(&path, [0u8; 100]).expect("write");
        assert!(matches!(Disk::open(&path, false, CacheMode::Writeback), Err(DiskError::TooSmall { .. })));
        assert!(matches!(
            Disk::open(&dir.path().join("missing"), true, CacheMode::Writeback),
            Err(DiskError::Open { .. })
        ));
        std::fs::write(&path, vec![0u8; 4096]).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        let error =
            Disk::open(&path, false, CacheMode::Writeback).expect_err("a 0444 image is not written, even by root");
        assert!(matches!(error, DiskError::ReadOnlyImage { mode: 0o444, .. }), "{error}");
        assert!(Disk::open(&path, true, CacheMode::Writeback).is_ok(), "it can be served read-only");
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0xffu8; 1 << 16]).expect("write");
        let disk = Disk::open(&path, false, CacheMode::Writeback).expect("open");
        disk.write_zeroes(4096, 4096, false).expect("zero");
        disk.write_zeroes(16384, 4096, true).expect("zero+unmap");
        let mut back = vec![0u8; 1 << 16];
        disk.file().read_exact_at(&mut back, 0).expect("read");
        assert!(back[4096..8192].iter().all(|&b| b == 0));
        assert!(back[16384..20480].iter().all(|&b| b == 0));
        assert!(back[..4096].iter().all(|&b| b == 0xff));
        disk.discard(0, 4096).expect("discard");
    }

    #[test]
    fn aligned_transfers_go_direct_and_the_others_buffered() {
        // /var/tmp is on disk where /tmp may be tmpfs, which refused O_DIRECT before Linux 6.6.
        let dir = tempfile::tempdir_in("/var/tmp").expect("dir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 1 << 16]).expect("write");
        let disk = Disk::open(&path, false, CacheMode::None).expect("O_DIRECT on this file system");
        assert!(disk.write_cache());
        let mut buf = vec![0u8; 3 * 4096];
        let aligned = buf.as_mut_ptr().wrapping_add(4096 - buf.as_ptr() as usize % 4096);
        let iov = |base: *mut u8, len| [libc::iovec { iov_base: base.cast(), iov_len: len }];
        let buffered = disk.file().as_raw_fd();
        assert_ne!(disk.fd_for(&iov(aligned, 4096), 8192), buffered);
        assert_eq!(disk.fd_for(&iov(aligned.wrapping_add(1), 4096), 8192), buffered, "unaligned memory");
        assert_eq!(disk.fd_for(&iov(aligned, 100), 8192), buffered, "unaligned length");
        let writeback = Disk::open(&path, false, CacheMode::Writeback).expect("open");
        assert_eq!(writeback.fd_for(&iov(aligned, 4096), 0), writeback.file().as_raw_fd());
        assert!(!Disk::open(&path, false, CacheMode::Directsync).expect("open").write_cache());
    }
}
