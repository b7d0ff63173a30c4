//! A guest's descriptor chain, parsed and executed by the device against a
//! model of guest RAM with canaries.
//!
//! The input fills the first 64 KiB of guest RAM (descriptor tables, headers,
//! indirect tables: whatever the guest wrote) and names a queue size and a
//! head. The chain is walked by gmemd's walker and by virtio-queue's, which
//! must agree; then the device executes it. Afterwards every byte of guest
//! RAM outside the chain's device-writable buffers must be as it was, and
//! the used length may not exceed what the chain made writable.

#![no_main]

use std::sync::{Arc, OnceLock};

use gmemd::blk::aio::{AioKind, AsyncDisk, SyncDisk};
use gmemd::blk::{BlkDevice, CacheMode, DeviceOptions, Outcome, RequestError, Started};
use gmemd::memory::{Backing, GuestRam, MemRegionDesc, MemoryTable, RamAccess, RegionSet, RegionSpec};
use gmemd::migration::Tracking;
use gmemd::vhost::DescChain;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 128 << 10;
const INPUT_AREA: u64 = 32 << 10;
/// Where the avail ring for virtio-queue's walk lives: past the input.
const AVAIL: u64 = INPUT_AREA;

struct World {
    _regions: RegionSet,
    ram: Arc<GuestRam>,
    device: BlkDevice,
    tracking: Tracking,
    _disk: tempfile::NamedTempFile,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let regions = RegionSet::create(vec![RegionSpec {
            id: "ram0".into(),
            size: RAM,
            backing: Backing::Memfd,
            lock: false,
            owner: None,
        }])
        .expect("ram");
        let region = regions.iter().next().expect("region");
        let fd = std::fs::OpenOptions::new().read(true).write(true).open(region.fd_path()).expect("open");
        let mut table = MemoryTable::default();
        table
            .add(&regions, MemRegionDesc { gpa: 0, size: RAM, frontend_addr: 0, mmap_offset: 0 }, fd, false)
            .expect("add");
        let disk = tempfile::NamedTempFile::new().expect("disk");
        disk.as_file().set_len(1 << 20).expect("size");
        let options = DeviceOptions {
            disk: disk.path().to_path_buf(),
            readonly: false,
            queues: 1,
            serial: "fuzz".into(),
            cache: CacheMode::Writeback,
            aio: AioKind::Sync,
        };
        let device = BlkDevice::new(&options).expect("device");
        World {
            ram: Arc::new(table.guest_ram()),
            _regions: regions,
            device,
            tracking: Tracking::new(Default::default(), false),
            _disk: disk,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let world = world();
    let size = 1u16 << (data[0] % 9);
    let head = u16::from_le_bytes([data[1], data[2]]) % (size * 2);
    let mut image = vec![0xccu8; RAM as usize];
    let input = &data[3..];
    image[..input.len().min(INPUT_AREA as usize)].copy_from_slice(&input[..input.len().min(INPUT_AREA as usize)]);
    // virtio-queue's walk: one available entry naming `head`.
    image[AVAIL as usize + 2..AVAIL as usize + 4].copy_from_slice(&1u16.to_le_bytes());
    image[AVAIL as usize + 4..AVAIL as usize + 6].copy_from_slice(&head.to_le_bytes());
    world.ram.write_slice(&image, GuestAddress(0)).expect("fill RAM");

    let ours: Vec<Descriptor> = DescChain::new(&world.ram, GuestAddress(0), size, head).collect();
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some((AVAIL + 0x1000) as u32), Some(0));
    queue.set_ready(true);
    let theirs: Vec<Descriptor> =
        queue.iter(&*world.ram).expect("iter").next().map(|chain| chain.collect()).unwrap_or_default();
    let key = |d: &Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
    assert_eq!(
        ours.iter().map(key).collect::<Vec<_>>(),
        theirs.iter().map(key).collect::<Vec<_>>(),
        "walkers disagree"
    );

    let writable: Vec<(u64, u64)> =
        ours.iter().filter(|d| d.is_write_only()).map(|d| (d.addr().0, u64::from(d.len()))).collect();
    let before = image;
    let counters = Default::default();
    let access = RamAccess::new(&world.ram, &counters, &world.tracking);
    let queue_state = &world.device.queues()[0];
    let chain = DescChain::new(&world.ram, GuestAddress(0), size, head);
    let outcome = match world.device.start(chain, &access, queue_state) {
        Started::Done(outcome) => outcome,
        Started::Transfer(mut transfer) => {
            // The queue worker's loop, on the synchronous engine.
            let mut disk = SyncDisk::new().expect("engine");
            let mut done = Vec::new();
            let result = loop {
                // SAFETY: `transfer` holds its buffers until it is finished below.
                unsafe { disk.push(transfer.op(), transfer.fd(), transfer.pending(), transfer.position(), 0) }
                    .expect("push");
                disk.complete(1, &mut done).expect("complete");
                let moved = done.pop().expect("a completion").result.map_err(RequestError::Disk);
                match moved.and_then(|n| transfer.advance(n)) {
                    Ok(false) => continue,
                    Ok(true) => break Ok(()),
                    Err(error) => break Err(error),
                }
            };
            world.device.finish(transfer, result, &access, queue_state)
        }
    };
    let Outcome::Completed(used) = outcome else { panic!("a request was abandoned with no stop asked") };
    let total: u64 = writable.iter().map(|(_, len)| len).sum();
    assert!(u64::from(used) <= total, "used length {used} > writable bytes {total}");
    let mut after = vec![0u8; RAM as usize];
    world.ram.read_slice(&mut after, GuestAddress(0)).expect("read RAM");
    for (at, (old, new)) in before.iter().zip(&after).enumerate() {
        if old != new {
            let at = at as u64;
            assert!(
                writable.iter().any(|(addr, len)| at >= *addr && at - addr < *len),
                "the device wrote guest RAM at {at:#x}, outside every writable buffer of the chain"
            );
        }
    }
});
