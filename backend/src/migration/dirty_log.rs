//! `DirtyLog`: the dirty-page bitmap QEMU shares for precopy
//! (VHOST_USER_SET_LOG_BASE with LOG_SHMFD).
//!
//! Bit `n` stands for guest-physical page `n` (VHOST_LOG_PAGE, 4 KiB). While
//! the frontend has VHOST_F_LOG_ALL on, every page the device writes is
//! marked here, after the write: QEMU clears bits as it syncs and re-sends
//! the pages, so a page written after QEMU sent it is sent again. A missed
//! mark is silent corruption on the destination, which is why the data path
//! marks in `RamAccess`, the one place it writes guest RAM.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::FileOffset;

use super::MigrationStats;

/// The log's page size: one bit per 4 KiB of guest-physical memory.
pub const LOG_PAGE: u64 = 0x1000;

/// Errors mapping the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The size does not fit the address space or is zero.
    #[error("dirty log of {0} bytes cannot be mapped")]
    BadSize(u64),
    /// mmap failed.
    #[error("mapping the dirty log: {0}")]
    Map(#[from] MmapRegionError),
    /// The log's file is too short or could shrink under gmemd.
    #[error("the dirty log's fd: {0}")]
    File(#[from] crate::sys::SharedFileError),
}

/// One frontend's dirty log.
#[derive(Debug)]
pub struct DirtyLog {
    enabled: AtomicBool,
    bitmap: Mutex<Option<Arc<MmapRegion>>>,
    /// Test-only: accept the log but never mark it, so a test can show that
    /// its verification catches a migration that loses device writes.
    skip_marks: bool,
    warned: AtomicBool,
    stats: Arc<MigrationStats>,
}

impl DirtyLog {
    /// A log with nothing mapped and logging off.
    pub fn new(stats: Arc<MigrationStats>, skip_marks: bool) -> Self {
        DirtyLog {
            enabled: AtomicBool::new(false),
            bitmap: Mutex::new(None),
            skip_marks,
            warned: AtomicBool::new(false),
            stats,
        }
    }

    /// SET_LOG_BASE: maps `size` bytes of `file` at `offset`, replacing any
    /// earlier log (QEMU sends a new one when guest memory grows).
    /// The file must cover the range and be sealed against shrinking (gmemd
    /// seals it when it can): marks are writes into it, and a truncation
    /// would turn them into SIGBUS. QEMU's log memfd is sealed already.
    pub fn set_base(&self, file: File, size: u64, offset: u64) -> Result<(), LogError> {
        let len = usize::try_from(size).ok().filter(|len| *len > 0).ok_or(LogError::BadSize(size))?;
        let end = offset.checked_add(size).ok_or(LogError::BadSize(size))?;
        crate::sys::require_sealed_size(&file, end)?;
        let region = MmapRegion::from_file(FileOffset::new(file, offset), len)?;
        *self.lock() = Some(Arc::new(region));
        self.stats.set_log(self.active(), size);
        Ok(())
    }

    /// The mapped log's fd, size and offset in the fd, if one is mapped.
    pub fn mapped(&self) -> Option<(std::os::fd::RawFd, u64, u64)> {
        use std::os::fd::AsRawFd;
        let bitmap = self.lock().clone()?;
        let file = bitmap.file_offset()?;
        Some((file.file().as_raw_fd(), bitmap.size() as u64, file.start()))
    }

    /// VHOST_F_LOG_ALL switched on or off (SET_FEATURES).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
        let size = self.lock().as_ref().map_or(0, |b| b.size() as u64);
        self.stats.set_log(self.active(), size);
    }

    /// Whether logging is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn active(&self) -> bool {
        self.enabled() && self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<MmapRegion>>> {
        // Only ever replaced whole; a panic cannot leave it half-written.
        self.bitmap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the pages of `[gpa, gpa + len)` as written by the device.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.enabled() || self.skip_marks {
            return;
        }
        let Some(bitmap) = self.lock().clone() else {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::error!("dirty logging is on but QEMU sent no log (SET_LOG_BASE); device writes go unlogged");
            }
            return;
        };
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let Some(byte) = usize::try_from(page / 8).ok().filter(|b| *b < bitmap.size()) else {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    log::error!("guest page {page:#x} lies beyond QEMU's dirty log ({} bytes)", bitmap.size());
                }
                return;
            };
            // SAFETY: `byte` is within the mapping, which `bitmap` keeps
            // alive. The log is shared with QEMU, which also updates it
            // atomically (it clears bits with atomic exchanges), and AtomicU8
            // has the size and alignment of u8.
            let cell = unsafe { AtomicU8::from_ptr(bitmap.as_ptr().add(byte)) };
            cell.fetch_or(1 << (page % 8), Ordering::Release);
        }
        self.stats.pages_marked(last - first + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn log_file(bytes: u64) -> File {
        let file = crate::sys::memfd("log", libc::MFD_ALLOW_SEALING).expect("memfd");
        file.set_len(bytes).expect("size");
        file
    }

    #[test]
    fn marks_every_page_a_write_touches_only_while_enabled() {
        let stats = Arc::new(MigrationStats::default());
        let log = DirtyLog::new(Arc::clone(&stats), false);
        let file = log_file(64);
        log.set_base(file.try_clone().expect("dup"), 64, 0).expect("map");
        log.mark(0, 4096);
        log.set_enabled(true);
        // Pages 1 and 2 (a write across a page boundary), page 9 and page 511.
        log.mark(LOG_PAGE + 4000, 200);
        log.mark(9 * LOG_PAGE, 1);
        log.mark(511 * LOG_PAGE + 5, 1);
        // Beyond the log: ignored, not a crash.
        log.mark(512 * LOG_PAGE, 1);
        let mut bytes = [0u8; 64];
        file.read_exact_at(&mut bytes, 0).expect("read");
        assert_eq!(bytes[0], 0b0000_0110);
        assert_eq!(bytes[1], 0b0000_0010);
        assert_eq!(bytes[63], 0b1000_0000);
        assert_eq!(bytes.iter().map(|b| b.count_ones()).sum::<u32>(), 4);
        assert!(stats.info().dirty_log.active);
        log.set_enabled(false);
        log.mark(20 * LOG_PAGE, 1);
        file.read_exact_at(&mut bytes, 0).expect("read");
        assert_eq!(bytes[2], 0);
    }

    #[test]
    fn the_test_switch_drops_every_mark() {
        let log = DirtyLog::new(Arc::default(), true);
        let file = log_file(8);
        log.set_base(file.try_clone().expect("dup"), 8, 0).expect("map");
        log.set_enabled(true);
        log.mark(0, 8 * 8 * LOG_PAGE);
        let mut bytes = [0u8; 8];
        file.read_exact_at(&mut bytes, 0).expect("read");
        assert_eq!(bytes, [0; 8]);
    }
}
