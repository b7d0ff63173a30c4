//! A frontend's memory table: which guest-physical ranges map to which part
//! of which region, and the `GuestRam` the device uses to reach them.
//!
//! QEMU sends its table as fds plus offsets (SET_MEM_TABLE, or ADD_MEM_REG /
//! REM_MEM_REG one region at a time). gmemd recognises its own regions by the
//! fd's inode and reuses its own mapping, so guest RAM is mapped once in the
//! daemon however many frontends come and go. Memory it does not own is
//! refused unless the daemon runs with `--allow-foreign-memory`.

use std::fs::File;
use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestUsize, MemoryRegionAddress, VolatileMemory, VolatileSlice,
};

use super::{FileIdentity, GuestRegion, RegionSet};

/// Guest memory as the device sees it: the views of one memory table.
pub type GuestRam = GuestRegionCollection<RamView>;

/// One memory-table entry as the frontend describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemRegionDesc {
    /// Guest-physical address of the range.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// The frontend's own virtual address of the range (used to match REM_MEM_REG).
    pub frontend_addr: u64,
    /// Offset of the range in the fd.
    pub mmap_offset: u64,
}

/// Errors applying a memory-table message.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// fstat on the frontend's fd failed.
    #[error("cannot identify the fd of the range at GPA {gpa:#x}: {source}")]
    Identify { gpa: u64, source: std::io::Error },
    /// The fd is not one of the daemon's regions and foreign memory is off.
    #[error("the range at GPA {gpa:#x} ({size:#x} bytes) is not memory gmemd owns; attach QEMU to gmemd's regions (gmemctl qemu-args) or start gmemd with --allow-foreign-memory")]
    Foreign { gpa: u64, size: u64 },
    /// The range does not fit in the region it names.
    #[error("the range at GPA {gpa:#x} (offset {offset:#x}, {size:#x} bytes) lies outside region {region} ({region_size:#x} bytes)")]
    OutOfRegion { gpa: u64, offset: u64, size: u64, region: String, region_size: u64 },
    /// Mapping foreign memory failed.
    #[error("mapping foreign memory at GPA {gpa:#x}: {source}")]
    MapForeign { gpa: u64, source: vm_memory::mmap::MmapRegionError },
    /// Foreign memory that is too short.
    #[error("foreign memory at GPA {gpa:#x}: {source}")]
    ForeignFile { gpa: u64, source: crate::sys::SharedFileError },
    /// A region waiting to be adopted was offered an fd that is not it.
    #[error("the range at GPA {gpa:#x}: {source}")]
    Adopt { gpa: u64, source: super::RegionError },
    /// Too many mappings that could shrink are guarded already.
    #[error("foreign memory at GPA {gpa:#x} cannot be sealed against shrinking, and gmemd guards as many such mappings as it can; send memfds created with MFD_ALLOW_SEALING")]
    TooManyUnsealed { gpa: u64 },
    /// The range is empty or overflows the address space.
    #[error("invalid range at GPA {gpa:#x}, {size:#x} bytes")]
    InvalidRange { gpa: u64, size: u64 },
    /// The range overlaps one already in the table.
    #[error("the range at GPA {gpa:#x} overlaps one already in the table")]
    Overlap { gpa: u64 },
    /// REM_MEM_REG named a range that is not in the table.
    #[error("no range at GPA {gpa:#x} of {size:#x} bytes to remove")]
    NotFound { gpa: u64, size: u64 },
    /// More entries than the protocol allows.
    #[error("the table is full ({max} ranges)")]
    Full { max: usize },
}

/// One table entry: a window of a mapping, placed at a guest-physical address.
///
/// The view holds the mapping by `Arc`, so memory stays mapped for as long as
/// any worker still uses a table that contains it.
#[derive(Debug, Clone)]
pub struct RamView {
    mapping: Arc<MmapRegion>,
    offset: usize,
    len: usize,
    desc: MemRegionDesc,
    owner: Option<String>,
    /// The own region's private/shared map (`None` for foreign memory).
    attributes: Option<gmem_attributes::RegionAttributes>,
    hugepage_advised: bool,
    /// Foreign memory that could be truncated is guarded while mapped;
    /// declared after `mapping`, so the guard goes after the mapping.
    _truncation: Option<Arc<super::truncation::TruncationGuard>>,
}

impl RamView {
    /// The frontend's description of this range.
    pub fn desc(&self) -> &MemRegionDesc {
        &self.desc
    }

    /// The id of the daemon region behind the view, or `None` for foreign memory.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The own region's private/shared map, and where the view starts in
    /// that region; `None` for foreign memory.
    pub fn attributes(&self) -> Option<(&gmem_attributes::RegionAttributes, u64)> {
        self.attributes.as_ref().map(|a| (a, self.offset as u64))
    }

    /// Whether gmemd asked for transparent huge pages on the mapping.
    pub fn hugepage_advised(&self) -> bool {
        self.hugepage_advised
    }

    /// The daemon's virtual address of the view's first byte.
    pub fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64 + self.offset as u64
    }

    /// The frontend's fd behind foreign memory (`None` for own regions).
    pub fn foreign_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.owner.is_none().then(|| self.mapping.file_offset().map(|f| f.file().as_raw_fd())).flatten()
    }
}

impl GuestMemoryRegion for RamView {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len as GuestUsize
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.desc.gpa)
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    // No `get_host_address`: every access goes through a bounds-checked
    // `VolatileSlice`, so nothing reaches guest RAM by raw pointer arithmetic.
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let start = usize::try_from(offset.raw_value()).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        let end = start.checked_add(count).ok_or(GuestMemoryError::InvalidBackendAddress)?;
        if end > self.len {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        Ok(self.mapping.get_slice(self.offset + start, count)?)
    }
}

impl GuestMemoryRegionBytes for RamView {}

/// A view of `desc`'s range of an own region.
fn own_view(region: &GuestRegion, desc: MemRegionDesc) -> Result<RamView, TableError> {
    let (gpa, size) = (desc.gpa, desc.size);
    let fits = desc.mmap_offset.checked_add(size).is_some_and(|e| e <= region.size());
    if !fits {
        return Err(TableError::OutOfRegion {
            gpa,
            offset: desc.mmap_offset,
            size,
            region: region.id().to_string(),
            region_size: region.size(),
        });
    }
    Ok(RamView {
        mapping: Arc::clone(region.mapping()),
        // Both fit in the region, whose size is a usize.
        offset: usize::try_from(desc.mmap_offset).map_err(|_| TableError::InvalidRange { gpa, size })?,
        len: usize::try_from(size).map_err(|_| TableError::InvalidRange { gpa, size })?,
        desc,
        owner: Some(region.id().to_string()),
        attributes: Some(region.attributes().clone()),
        hugepage_advised: region.hugepage_advised(),
        _truncation: None,
    })
}

/// The most ranges a table holds: QEMU's VHOST_USER_MAX_RAM_SLOTS.
pub const MAX_MEM_SLOTS: usize = 509;

/// One frontend's memory table.
#[derive(Debug, Default, Clone)]
pub struct MemoryTable {
    views: Vec<RamView>,
}

impl MemoryTable {
    /// Replaces the whole table (SET_MEM_TABLE). All or nothing: on error the
    /// old table stays.
    pub fn set(
        &mut self,
        regions: &RegionSet,
        entries: Vec<(MemRegionDesc, File)>,
        allow_foreign: bool,
    ) -> Result<(), TableError> {
        let mut table = MemoryTable::default();
        for (desc, file) in entries {
            table.add(regions, desc, file, allow_foreign)?;
        }
        *self = table;
        Ok(())
    }

    /// Adds one range (ADD_MEM_REG).
    pub fn add(
        &mut self,
        regions: &RegionSet,
        desc: MemRegionDesc,
        file: File,
        allow_foreign: bool,
    ) -> Result<(), TableError> {
        let (gpa, size) = (desc.gpa, desc.size);
        self.check_free(&desc)?;
        let len = usize::try_from(size).map_err(|_| TableError::InvalidRange { gpa, size })?;
        let identity = FileIdentity::of(&file).map_err(|source| TableError::Identify { gpa, source })?;
        let own = match regions.find(identity) {
            Some(region) => Some(region),
            None => regions.adopt(identity, &file).map_err(|source| TableError::Adopt { gpa, source })?,
        };
        let view = match own {
            Some(region) => own_view(region, desc)?,
            None if allow_foreign => {
                // The frontend keeps its fd and could truncate the file:
                // seal it against that where the file allows; where it does
                // not (libblkio's memfds, a tmpfs file), the mapping is
                // guarded so a truncation costs the frontend its data, not
                // gmemd its life.
                let end = desc.mmap_offset.checked_add(size).ok_or(TableError::InvalidRange { gpa, size })?;
                let pin = crate::sys::pin_shared_file_size(&file, end)
                    .map_err(|source| TableError::ForeignFile { gpa, source })?;
                let mapping = MmapRegion::from_file(FileOffset::new(file, desc.mmap_offset), len)
                    .map_err(|source| TableError::MapForeign { gpa, source })?;
                let truncation = match pin {
                    crate::sys::SizePin::Sealed => None,
                    crate::sys::SizePin::Unsealable(_) => {
                        let page =
                            mapping.file_offset().map_or(4096, |f| super::region::file_page_size(f.file())) as usize;
                        let guard = super::truncation::protect(mapping.as_ptr() as usize, len, page);
                        Some(Arc::new(guard.ok_or(TableError::TooManyUnsealed { gpa })?))
                    }
                };
                RamView {
                    mapping: Arc::new(mapping),
                    offset: 0,
                    len,
                    desc,
                    owner: None,
                    attributes: None,
                    hugepage_advised: false,
                    _truncation: truncation,
                }
            }
            None => return Err(TableError::Foreign { gpa, size }),
        };
        self.insert(view)
    }

    /// Adds one range of an own region by the region itself (a table
    /// restored from a record names regions by id).
    pub fn add_own(&mut self, region: &GuestRegion, desc: MemRegionDesc) -> Result<(), TableError> {
        self.check_free(&desc)?;
        let view = own_view(region, desc)?;
        self.insert(view)
    }

    fn check_free(&self, desc: &MemRegionDesc) -> Result<(), TableError> {
        let (gpa, size) = (desc.gpa, desc.size);
        let end = gpa.checked_add(size).filter(|_| size > 0).ok_or(TableError::InvalidRange { gpa, size })?;
        if self.views.len() >= MAX_MEM_SLOTS {
            return Err(TableError::Full { max: MAX_MEM_SLOTS });
        }
        if self.views.iter().any(|v| v.desc.gpa < end && gpa < v.desc.gpa + v.desc.size) {
            return Err(TableError::Overlap { gpa });
        }
        Ok(())
    }

    fn insert(&mut self, view: RamView) -> Result<(), TableError> {
        self.views.push(view);
        self.views.sort_by_key(|v| v.desc.gpa);
        Ok(())
    }

    /// Removes the range (REM_MEM_REG) matching guest address, size and the
    /// frontend's address, as the vhost-user spec identifies it.
    pub fn remove(&mut self, desc: &MemRegionDesc) -> Result<(), TableError> {
        let position = self
            .views
            .iter()
            .position(|v| {
                v.desc.gpa == desc.gpa && v.desc.size == desc.size && v.desc.frontend_addr == desc.frontend_addr
            })
            .ok_or(TableError::NotFound { gpa: desc.gpa, size: desc.size })?;
        self.views.remove(position);
        Ok(())
    }

    /// Translates an address in the frontend's own address space (vring
    /// addresses come that way) to a guest-physical one.
    pub fn frontend_to_gpa(&self, frontend_addr: u64) -> Option<u64> {
        self.views.iter().find_map(|v| {
            let offset = frontend_addr.checked_sub(v.desc.frontend_addr)?;
            (offset < v.desc.size).then(|| v.desc.gpa + offset)
        })
    }

    /// The table's views, sorted by guest address.
    pub fn views(&self) -> &[RamView] {
        &self.views
    }

    /// The `GuestRam` the device uses while this table is current.
    pub fn guest_ram(&self) -> GuestRam {
        // Views never overlap (checked on insert) and are sorted, which is
        // all `from_regions` checks; an empty table is an empty GuestRam.
        GuestRegionCollection::from_regions(self.views.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionSpec;
    use std::fs::OpenOptions;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    fn regions() -> RegionSet {
        RegionSet::create(vec![RegionSpec::memfd("ram0", 4 * MIB), RegionSpec::memfd("ram1", 2 * MIB)])
            .expect("regions")
    }

    /// The fd a frontend would send: its own open of the region's path.
    fn frontend_fd(regions: &RegionSet, index: usize) -> File {
        let region = regions.iter().nth(index).expect("region");
        OpenOptions::new().read(true).write(true).open(region.fd_path()).expect("open")
    }

    fn desc(gpa: u64, size: u64, mmap_offset: u64) -> MemRegionDesc {
        MemRegionDesc { gpa, size, frontend_addr: 0x7f00_0000_0000_u64.wrapping_add(gpa), mmap_offset }
    }

    #[test]
    fn own_regions_reuse_the_daemon_mapping() {
        let regions = regions();
        let mut table = MemoryTable::default();
        // QEMU splits RAM around the PC hole: two ranges of one fd.
        let entries = vec![
            (desc(0, 0xa0000, 0), frontend_fd(&regions, 0)),
            (desc(0x10_0000, 3 * MIB, 0x10_0000), frontend_fd(&regions, 0)),
            (desc(0x1_0000_0000, 2 * MIB, 0), frontend_fd(&regions, 1)),
        ];
        table.set(&regions, entries, false).expect("set");
        let ram0 = regions.iter().next().expect("ram0");
        assert_eq!(table.views()[1].host_addr(), ram0.mapping().as_ptr() as u64 + 0x10_0000);
        assert_eq!(table.views()[2].owner(), Some("ram1"));
        // A write through the table lands in the daemon's own region.
        let ram = table.guest_ram();
        ram.write_obj(0xdead_beef_u32, GuestAddress(0x10_0010)).expect("write");
        let mut back = [0u8; 4];
        ram0.mapping().get_slice(0x10_0010, 4).expect("slice").copy_to(&mut back[..]);
        assert_eq!(u32::from_le_bytes(back), 0xdead_beef);
        // The hole is not guest RAM.
        assert!(ram.read_obj::<u8>(GuestAddress(0xb0000)).is_err());
        assert!(ram.find_region(GuestAddress(0x1_0000_0000 + 2 * MIB)).is_none());
    }

    #[test]
    fn foreign_memory_is_refused_by_default_and_mapped_when_allowed() {
        let regions = regions();
        let foreign = crate::sys::memfd("foreign", libc::MFD_ALLOW_SEALING).expect("memfd");
        foreign.set_len(MIB).expect("size");
        let mut table = MemoryTable::default();
        let error =
            table.add(&regions, desc(0, MIB, 0), foreign.try_clone().expect("dup"), false).expect_err("foreign");
        assert!(matches!(error, TableError::Foreign { .. }), "{error}");
        assert!(error.to_string().contains("--allow-foreign-memory"));
        let past_its_end = table.add(&regions, desc(0, 2 * MIB, 0), foreign.try_clone().expect("dup"), true);
        assert!(matches!(past_its_end, Err(TableError::ForeignFile { .. })), "a range longer than the file");
        table.add(&regions, desc(0, MIB, 0), foreign.try_clone().expect("dup"), true).expect("allowed");
        assert_eq!(table.views()[0].owner(), None);
        assert!(foreign.set_len(4096).is_err(), "gmemd sealed it against shrinking");
        let unsealable = tempfile::tempfile().expect("tmp");
        unsealable.set_len(MIB).expect("size");
        table.add(&regions, desc(MIB, MIB, 0), unsealable, true).expect("a file that could shrink, guarded");
    }

    #[test]
    fn ranges_past_the_region_overlaps_and_empty_ranges_are_refused() {
        let regions = regions();
        let mut table = MemoryTable::default();
        let past_end = table.add(&regions, desc(0, 2 * MIB, 3 * MIB), frontend_fd(&regions, 0), false);
        assert!(matches!(past_end, Err(TableError::OutOfRegion { .. })));
        let overflow = table.add(&regions, desc(0, MIB, u64::MAX), frontend_fd(&regions, 0), false);
        assert!(matches!(overflow, Err(TableError::OutOfRegion { .. })));
        let empty = table.add(&regions, desc(0, 0, 0), frontend_fd(&regions, 0), false);
        assert!(matches!(empty, Err(TableError::InvalidRange { .. })));
        let wraps = table.add(&regions, desc(u64::MAX - 10, MIB, 0), frontend_fd(&regions, 0), false);
        assert!(matches!(wraps, Err(TableError::InvalidRange { .. })));
        table.add(&regions, desc(0, MIB, 0), frontend_fd(&regions, 0), false).expect("first");
        let overlap = table.add(&regions, desc(MIB / 2, MIB, 0), frontend_fd(&regions, 1), false);
        assert!(matches!(overlap, Err(TableError::Overlap { .. })));
    }

    #[test]
    fn set_is_all_or_nothing_and_remove_matches_exactly() {
        let regions = regions();
        let mut table = MemoryTable::default();
        table.add(&regions, desc(0, MIB, 0), frontend_fd(&regions, 0), false).expect("add");
        let bad = vec![
            (desc(0, MIB, 0), frontend_fd(&regions, 1)),
            (desc(8 * MIB, MIB, 0), tempfile::tempfile().expect("tmp")),
        ];
        assert!(table.set(&regions, bad, false).is_err());
        assert_eq!(table.views()[0].owner(), Some("ram0"), "old table kept");
        let mut other = desc(0, MIB, 0);
        other.frontend_addr += 4096;
        assert!(matches!(table.remove(&other), Err(TableError::NotFound { .. })));
        table.remove(&desc(0, MIB, 0)).expect("remove");
        assert!(table.views().is_empty());
        assert_eq!(table.guest_ram().num_regions(), 0);
    }
}
