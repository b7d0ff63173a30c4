//! Guest RAM: the regions gmemd owns, each frontend's table of them, and the
//! one checked, counted path through which the device touches them.

mod access;
mod region;
mod table;
pub mod truncation;

use std::fs::File;
use std::sync::{Arc, OnceLock};

pub use access::{AccessCounters, AccessError, GuestBuf, HeldBufs, RamAccess, RangeRefs, IOV_MAX};
pub use region::{Backing, FileIdentity, GuestRegion, RegionError, RegionRecord, RegionSpec};
pub use table::{GuestRam, MemRegionDesc, MemoryTable, RamView, TableError, MAX_MEM_SLOTS};

/// One region of the set: live, or waiting to be adopted from the
/// frontend that still maps it (gmemd restarted after a crash).
#[derive(Debug)]
struct Slot {
    spec: RegionSpec,
    /// The region as its previous gmemd made it, while it waits.
    awaiting: Option<RegionRecord>,
    live: OnceLock<Arc<GuestRegion>>,
}

/// Every region the daemon owns, kept for its lifetime, whatever frontends
/// come and go.
#[derive(Debug, Default)]
pub struct RegionSet {
    slots: Vec<Slot>,
}

impl RegionSet {
    /// Creates every region in `specs`; ids must be unique.
    pub fn create(specs: Vec<RegionSpec>) -> Result<Self, RegionError> {
        Self::resume(specs, &[])
    }

    /// The regions of `specs`, where `previous` (what a gmemd before a
    /// crash made) names a memfd region of the same id, size and backing,
    /// left waiting for a frontend to bring it back; the others created.
    pub fn resume(specs: Vec<RegionSpec>, previous: &[RegionRecord]) -> Result<Self, RegionError> {
        let mut slots = Vec::with_capacity(specs.len());
        for spec in specs {
            let awaiting = previous
                .iter()
                .find(|r| r.spec.same_memory(&spec) && !matches!(spec.backing, Backing::File(_)))
                .cloned();
            let live = OnceLock::new();
            if awaiting.is_none() {
                let _ = live.set(Arc::new(GuestRegion::create(spec.clone())?));
            }
            slots.push(Slot { spec, awaiting, live });
        }
        Ok(RegionSet { slots })
    }

    /// The regions a previous gmemd image handed over: each record with the
    /// fd it kept open.
    pub fn inherit(regions: Vec<(RegionRecord, File)>) -> Result<Self, RegionError> {
        let slots = regions
            .into_iter()
            .map(|(record, file)| {
                let live = OnceLock::new();
                let _ = live.set(Arc::new(GuestRegion::adopt(&record, file)?));
                Ok(Slot { spec: record.spec, awaiting: None, live })
            })
            .collect::<Result<_, RegionError>>()?;
        Ok(RegionSet { slots })
    }

    /// The live regions, in creation order (the first is the machine's main RAM).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<GuestRegion>> {
        self.slots.iter().filter_map(|s| s.live.get())
    }

    /// Every region's spec, and the region if it is live (not waiting).
    pub fn slots(&self) -> impl Iterator<Item = (&RegionSpec, Option<&Arc<GuestRegion>>)> {
        self.slots.iter().map(|s| (&s.spec, s.live.get()))
    }

    /// Whether any region is a hugetlb memfd (userfaultfd must be told).
    pub fn hugetlb(&self) -> bool {
        self.slots.iter().any(|s| matches!(s.spec.backing, Backing::MemfdHugetlb))
    }

    /// The live region whose file is `identity`, if the daemon owns it.
    pub fn find(&self, identity: FileIdentity) -> Option<&Arc<GuestRegion>> {
        self.iter().find(|r| r.identity() == identity)
    }

    /// The live region with id `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<GuestRegion>> {
        self.iter().find(|r| r.id() == id)
    }

    /// Adopts the waiting region whose file `file` is, if there is one and
    /// `file` proves to be it (see [`GuestRegion::adopt`]).
    pub fn adopt(&self, identity: FileIdentity, file: &File) -> Result<Option<&Arc<GuestRegion>>, RegionError> {
        let waiting =
            self.slots.iter().find_map(|s| s.awaiting.as_ref().filter(|r| r.identity == identity).map(|r| (s, r)));
        let Some((slot, record)) = waiting else { return Ok(None) };
        if let Some(region) = slot.live.get() {
            return Ok(Some(region));
        }
        let file = file.try_clone().map_err(|source| RegionError::Stat { id: record.spec.id.clone(), source })?;
        let region = GuestRegion::adopt(record, file)?;
        log::warn!(
            "region {}: adopted from a frontend's memory table; guest RAM carried over from before gmemd restarted",
            region.id()
        );
        Ok(Some(slot.live.get_or_init(|| Arc::new(region))))
    }

    /// What identifies each region, live or waiting, for the state file.
    pub fn records(&self) -> Vec<RegionRecord> {
        self.slots.iter().filter_map(|s| s.live.get().map(|r| r.record()).or_else(|| s.awaiting.clone())).collect()
    }
}
