//! The virtio-blk device: config space, request parsing, and execution
//! against a raw image, through an asynchronous disk engine per queue.
//! Device state here is shared by every frontend connection; what a
//! connection negotiates lives in `crate::vhost`.

pub mod aio;
mod config;
mod device;
mod disk;
mod request;
mod transfer;

pub use config::{BlkConfig, CONFIG_SPACE_LEN};
pub use device::{BlkDevice, DeviceOptions, DeviceQueue, Outcome, QueueCounters, Started};
pub use disk::{CacheMode, Disk, DiskError};
pub use request::{parse, BlkRequest, Op, Rejected, RequestError};
pub use transfer::Transfer;
