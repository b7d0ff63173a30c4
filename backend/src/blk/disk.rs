//! The raw image behind the device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
}

/// A raw disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    capacity_bytes: u64,
    readonly: bool,
}

impl Disk {
    /// Opens the image; its size is the device's capacity, rounded down to
    /// whole sectors.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let open_error = |source| DiskError::Open { path: path.to_path_buf(), source };
        // Root may open any file for writing; an image nobody may write is
        // meant to stay unchanged, so it is served read-only or not at all.
        let mode = std::fs::metadata(path).map_err(open_error)?.permissions().mode();
        if !readonly && mode & 0o222 == 0 {
            return Err(DiskError::ReadOnlyImage { path: path.to_path_buf(), mode: mode & 0o7777 });
        }
        let file = OpenOptions::new().read(true).write(!readonly).open(path).map_err(open_error)?;
        Self::inherit(file, path, readonly)
    }

    /// The image open as `file` (a previous gmemd image's, kept across its
    /// exec), known by `path`.
    pub fn inherit(file: File, path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let len = file.metadata().map_err(|source| DiskError::Open { path: path.to_path_buf(), source })?.len();
        if len < SECTOR_SIZE {
            return Err(DiskError::TooSmall { path: path.to_path_buf(), len });
        }
        Ok(Disk { file, path: path.to_path_buf(), capacity_bytes: len - len % SECTOR_SIZE, readonly })
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

    /// FLUSH: makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn capacity_is_whole_sectors_and_tiny_images_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 1500]).expect("write");
        assert_eq!(Disk::open(&path, false).expect("open").capacity_bytes(), 1024);
        std::fs::write(&path, [0u8; 100]).expect("write");
        assert!(matches!(Disk::open(&path, false), Err(DiskError::TooSmall { .. })));
        assert!(matches!(Disk::open(&dir.path().join("missing"), true), Err(DiskError::Open { .. })));
        std::fs::write(&path, vec![0u8; 4096]).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        let error = Disk::open(&path, false).expect_err("a 0444 image is not written, even by root");
        assert!(matches!(error, DiskError::ReadOnlyImage { mode: 0o444, .. }), "{error}");
        assert!(Disk::open(&path, true).is_ok(), "it can be served read-only");
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0xffu8; 1 << 16]).expect("write");
        let disk = Disk::open(&path, false).expect("open");
        disk.write_zeroes(4096, 4096, false).expect("zero");
        disk.write_zeroes(16384, 4096, true).expect("zero+unmap");
        let mut back = vec![0u8; 1 << 16];
        disk.file().read_exact_at(&mut back, 0).expect("read");
        assert!(back[4096..8192].iter().all(|&b| b == 0));
        assert!(back[16384..20480].iter().all(|&b| b == 0));
        assert!(back[..4096].iter().all(|&b| b == 0xff));
        disk.discard(0, 4096).expect("discard");
        disk.flush().expect("flush");
    }
}
