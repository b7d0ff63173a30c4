//! `DescChain`: the descriptors of one request, walked from its head.
//!
//! virtio-queue takes heads from the available ring, but only builds a
//! chain for a head it just took; a request found in flight after a
//! restart is known by its head alone. So gmemd walks every chain itself,
//! the same way for both: at most as many descriptors as the table holds
//! (a loop ends there), an indirect table at most once and never inside
//! another, no more than 2^32 bytes in all. A descriptor that cannot be
//! read ends the walk; the request parser sees that the last descriptor
//! still said NEXT and fails the request.

use std::mem::size_of;

use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

/// An iterator over the descriptors of the chain headed by one index.
#[derive(Debug)]
pub struct DescChain<'a> {
    ram: &'a GuestRam,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    /// Descriptors this table may still yield.
    ttl: u16,
    indirect: bool,
    bytes: u32,
    done: bool,
}

impl<'a> DescChain<'a> {
    /// The chain headed by `head` in the descriptor table at `table` of
    /// `queue_size` entries.
    pub fn new(ram: &'a GuestRam, table: GuestAddress, queue_size: u16, head: u16) -> Self {
        DescChain {
            ram,
            table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
            done: false,
        }
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        let addr = self.table.0.checked_add(u64::from(index) * size_of::<Descriptor>() as u64)?;
        self.ram.read_obj::<Descriptor>(GuestAddress(addr)).ok()
    }
}

impl Iterator for DescChain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.done || self.ttl == 0 || self.next >= self.table_len {
            return None;
        }
        let mut desc = self.read(self.next)?;
        if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            // One indirect table per chain, whole descriptors, fewer than 2^16.
            let entries = desc.len() / size_of::<Descriptor>() as u32;
            if self.indirect
                || desc.len() % size_of::<Descriptor>() as u32 != 0
                || entries == 0
                || entries > u32::from(u16::MAX)
            {
                self.done = true;
                return None;
            }
            self.table = desc.addr();
            self.table_len = u16::try_from(entries).unwrap_or(u16::MAX);
            self.ttl = self.table_len;
            self.next = 0;
            self.indirect = true;
            desc = self.read(0)?;
            if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
                self.done = true;
                return None;
            }
        }
        self.bytes = match self.bytes.checked_add(desc.len()) {
            Some(bytes) => bytes,
            None => {
                self.done = true;
                return None;
            }
        };
        self.ttl -= 1;
        if desc.has_next() {
            self.next = desc.next();
        } else {
            self.done = true;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemRegionDesc, MemoryTable, RegionSet, RegionSpec};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    fn ram() -> (RegionSet, GuestRam) {
        let regions = RegionSet::create(vec![RegionSpec::memfd("r", 1 << 20)]).expect("regions");
        let region = regions.iter().next().expect("region");
        let fd = std::fs::OpenOptions::new().read(true).write(true).open(region.fd_path()).expect("open");
        let mut table = MemoryTable::default();
        table
            .add(&regions, MemRegionDesc { gpa: 0, size: 1 << 20, frontend_addr: 0, mmap_offset: 0 }, fd, false)
            .expect("add");
        let ram = table.guest_ram();
        (regions, ram)
    }

    fn put(ram: &GuestRam, table: u64, index: u64, desc: Descriptor) {
        ram.write_obj(desc, GuestAddress(table + 16 * index)).expect("write");
    }

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    #[test]
    fn direct_and_indirect_chains_are_walked_and_loops_end() {
        let (_regions, ram) = ram();
        put(&ram, 0, 3, Descriptor::new(0x1000, 16, NEXT, 5));
        put(&ram, 0, 5, Descriptor::new(0x2000, 512, NEXT | WRITE, 6));
        put(&ram, 0, 6, Descriptor::new(0x3000, 1, WRITE, 0));
        let lens: Vec<u32> = DescChain::new(&ram, GuestAddress(0), 8, 3).map(|d| d.len()).collect();
        assert_eq!(lens, [16, 512, 1]);
        // Indirect: the head points at a table of two.
        put(&ram, 0, 0, Descriptor::new(0x4000, 32, INDIRECT, 0));
        put(&ram, 0x4000, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&ram, 0x4000, 1, Descriptor::new(0x3000, 1, WRITE, 0));
        assert_eq!(DescChain::new(&ram, GuestAddress(0), 8, 0).count(), 2);
        // A loop stops after the table's size, the last one still saying NEXT.
        put(&ram, 0, 7, Descriptor::new(0x1000, 16, NEXT, 7));
        let looped: Vec<Descriptor> = DescChain::new(&ram, GuestAddress(0), 8, 7).collect();
        assert_eq!(looped.len(), 8);
        assert!(looped.last().is_some_and(|d| d.has_next()));
        // An indirect table inside an indirect table, or outside RAM: nothing.
        put(&ram, 0x4000, 0, Descriptor::new(0x5000, 16, INDIRECT, 0));
        assert_eq!(DescChain::new(&ram, GuestAddress(0), 8, 0).count(), 0);
        put(&ram, 0, 1, Descriptor::new(1 << 40, 32, INDIRECT, 0));
        assert_eq!(DescChain::new(&ram, GuestAddress(0), 8, 1).count(), 0);
        assert_eq!(DescChain::new(&ram, GuestAddress(0), 8, 9).count(), 0, "a head past the table");
    }
}
