//! The host-side benchmark's errors, typed so that the mode's edge can say
//! which backend, run and step they belong to.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong below the mode's edge (`hostside::run`).
#[derive(Debug, Error)]
pub enum HostBenchError {
    /// A libblkio call failed (connect, start, memory, I/O submission).
    #[error("libblkio {what}: {source}")]
    Blkio {
        what: String,
        #[source]
        source: blkio::Error,
    },

    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A request completed with an error, or short.
    #[error("{op} of {len} bytes at offset {offset} failed: {message}")]
    Request { op: &'static str, offset: u64, len: usize, message: String },

    /// What a backend returned (or stored) is not what was written.
    #[error("data mismatch at offset {offset} ({len} bytes): {what}")]
    Mismatch { offset: u64, len: usize, what: String },

    /// posix_fadvise(DONTNEED) left too much of the image in the page cache.
    #[error(
        "{} is still {:.2}% resident in the page cache after eviction (limit {:.2}%)",
        path.display(), resident * 100.0, limit * 100.0
    )]
    StillCached { path: PathBuf, resident: f64, limit: f64 },

    /// A /proc file did not have the expected form.
    #[error("cannot parse {path}: {what}")]
    Parse { path: String, what: String },
}

impl HostBenchError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> HostBenchError {
        HostBenchError::Io { what: what.into(), source }
    }

    /// The last OS error (errno) with what was being done.
    pub fn last_os(what: impl Into<String>) -> HostBenchError {
        HostBenchError::io(what, std::io::Error::last_os_error())
    }

    /// A libblkio error with what was being done.
    pub fn blkio(what: impl Into<String>, source: blkio::Error) -> HostBenchError {
        HostBenchError::Blkio { what: what.into(), source }
    }
}

/// Results below the mode's edge.
pub type Result<T, E = HostBenchError> = std::result::Result<T, E>;
