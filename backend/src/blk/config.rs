//! The virtio-blk configuration space and feature bits gmemd offers.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Sector size of the virtio-blk protocol; offsets and lengths count in it.
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request the driver may use (`seg_max`). QEMU's
/// vhost-user-blk default queue size is 128; two descriptors go to the
/// header and the status.
pub const SEG_MAX: u32 = 126;
/// Segments one DISCARD or WRITE_ZEROES request may carry.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors one DISCARD or WRITE_ZEROES segment may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Offset of the `writeback` byte (WCE) in the config space: the one
/// field the driver may write (VIRTIO_BLK_F_CONFIG_WCE).
pub const WCE_OFFSET: u32 = 32;
/// Length of the config space we expose; QEMU asks for its own struct's
/// size, and bytes past the fields we implement read as zero.
pub const CONFIG_SPACE_LEN: usize = 256;

/// Device parameters that shape the config space and features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in bytes.
    pub capacity_bytes: u64,
    /// Number of request queues.
    pub num_queues: u16,
    /// Whether writes are refused.
    pub readonly: bool,
}

impl BlkConfig {
    /// The virtio feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ);
        if self.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        features
    }

    /// The config space, little-endian, laid out as `struct
    /// virtio_blk_config`, with the write cache on or off.
    pub fn space(&self, write_cache: bool) -> [u8; CONFIG_SPACE_LEN] {
        let mut space = [0u8; CONFIG_SPACE_LEN];
        let mut put = |offset: usize, bytes: &[u8]| space[offset..offset + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.capacity_bytes / SECTOR_SIZE).to_le_bytes()); // capacity
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(WCE_OFFSET as usize, &[u8::from(write_cache)]); // writeback
        put(34, &self.num_queues.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        space
    }

    /// `size` bytes of the config space from `offset`, or `None` when the
    /// window is outside it.
    pub fn read(&self, offset: u32, size: u32, write_cache: bool) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        self.space(write_cache).get(start..end).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(readonly: bool) -> BlkConfig {
        BlkConfig { capacity_bytes: 256 << 20, num_queues: 4, readonly }
    }

    #[test]
    fn space_has_the_virtio_layout() {
        let space = config(false).space(true);
        let u32_at = |o: usize| u32::from_le_bytes(space[o..o + 4].try_into().expect("4"));
        assert_eq!(u64::from_le_bytes(space[0..8].try_into().expect("8")), (256 << 20) / 512);
        assert_eq!(u32_at(12), SEG_MAX);
        assert_eq!(u32_at(20), 512);
        assert_eq!(u16::from_le_bytes([space[34], space[35]]), 4);
        assert_eq!(u32_at(40), MAX_DISCARD_SEG);
        assert_eq!(space[56], 1);
        assert_eq!(space[WCE_OFFSET as usize], 1);
        assert_eq!(config(false).space(false)[WCE_OFFSET as usize], 0);
    }

    #[test]
    fn reads_windows_and_refuses_outside_ones() {
        let c = config(false);
        assert_eq!(c.read(34, 2, true), Some(vec![4, 0]));
        assert_eq!(c.read(0, 60, true).map(|v| v.len()), Some(60));
        assert_eq!(c.read(250, 10, true), None);
        assert_eq!(c.read(u32::MAX, 2, true), None);
    }

    #[test]
    fn readonly_devices_offer_ro_and_no_discard() {
        let ro = config(true).features();
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let rw = config(false).features();
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(rw & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    }
}
