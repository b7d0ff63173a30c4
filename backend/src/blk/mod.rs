//! The virtio-blk device: config space, request parsing, and execution
//! against a raw image. Device state here is shared by every frontend
//! connection; what a connection negotiates lives in `crate::vhost`.

mod config;
mod device;
mod disk;
mod request;

pub use config::{BlkConfig, CONFIG_SPACE_LEN};
pub use device::{BlkDevice, DeviceOptions, DeviceQueue, Outcome, QueueCounters};
pub use disk::{Disk, DiskError};
pub use request::{parse, BlkRequest, Op, Rejected, RequestError};
