//! Guest RAM: the regions gmemd owns, each frontend's table of them, and the
//! one checked, counted path through which the device touches them.

mod access;
mod region;
mod table;
pub mod truncation;

use std::sync::Arc;

pub use access::{AccessCounters, AccessError, GuestBuf, RamAccess};
pub use region::{Backing, FileIdentity, GuestRegion, RegionError, RegionSpec};
pub use table::{GuestRam, MemRegionDesc, MemoryTable, RamView, TableError, MAX_MEM_SLOTS};

/// Every region the daemon owns, created at start and kept for its lifetime,
/// whatever frontends come and go.
#[derive(Debug, Default)]
pub struct RegionSet {
    regions: Vec<Arc<GuestRegion>>,
}

impl RegionSet {
    /// Creates every region in `specs`; ids must be unique.
    pub fn create(specs: Vec<RegionSpec>) -> Result<Self, RegionError> {
        let regions =
            specs.into_iter().map(|spec| GuestRegion::create(spec).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        Ok(RegionSet { regions })
    }

    /// The regions, in creation order (the first is the machine's main RAM).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<GuestRegion>> {
        self.regions.iter()
    }

    /// Whether any region is a hugetlb memfd (userfaultfd must be told).
    pub fn hugetlb(&self) -> bool {
        self.iter().any(|r| matches!(r.backing(), Backing::MemfdHugetlb))
    }

    /// The region with id `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<GuestRegion>> {
        self.regions.iter().find(|r| r.id() == id)
    }

    /// The region whose file is `identity`, if the daemon owns it.
    pub fn find(&self, identity: FileIdentity) -> Option<&Arc<GuestRegion>> {
        self.regions.iter().find(|r| r.identity() == identity)
    }
}
