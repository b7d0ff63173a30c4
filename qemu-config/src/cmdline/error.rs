//! What can go wrong building a command line.

use gmem_protocol::ClientError;

/// Why a command line could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// QEMU needs at least one region for its main RAM.
    #[error("no guest RAM regions: QEMU needs at least one")]
    NoRegions,
    /// QEMU rejects zero-sized memory backends.
    #[error("region {id} has size 0")]
    ZeroSize {
        /// The offending region.
        id: String,
    },
    /// The id is used as a QEMU object id, which QEMU restricts.
    #[error("region id {id:?} is not a QEMU id (a letter, then letters, digits, '-', '.', '_')")]
    InvalidRegionId {
        /// The offending id.
        id: String,
    },
    /// Two objects with one id would make QEMU refuse to start.
    #[error("two regions share the id {id}")]
    DuplicateRegionId {
        /// The repeated id.
        id: String,
    },
    /// gmemd restarted and waits for the QEMU that maps this region to
    /// bring it back; a new QEMU cannot map it meanwhile.
    #[error("region {id} waits to be adopted back from the QEMU that still maps it (gmemd restarted); a new QEMU cannot map it until then")]
    AwaitingAdoption {
        /// The offending region.
        id: String,
    },
    /// A region without a path cannot be mapped.
    #[error("region {id} has an empty fd path")]
    EmptyFdPath {
        /// The offending region.
        id: String,
    },
    /// `maxmem` is the sum of all regions and must fit in 64 bits.
    #[error("the regions' total size overflows 64 bits")]
    TotalSizeOverflow,
    /// vhost-user-blk needs at least one virtqueue.
    #[error("the vhost-user-blk device needs at least one queue")]
    ZeroQueues,
    /// More queues than `num-queues` can express.
    #[error("gmemd reports {0} queues, more than a vhost-user-blk device can have")]
    TooManyQueues(usize),
    /// Asking the daemon failed.
    #[error("querying gmemd: {0}")]
    Daemon(#[from] ClientError),
}
