//! Guest RAM regions as QEMU memory backends, and the checks that keep QEMU
//! from rejecting them at start-up with a less helpful message.

use gmem_protocol::RegionInfo;

use super::CmdlineError;
use crate::quote::qemu_opt_value;

/// The `-object` value for one region: a shared file backend on gmemd's fd.
pub(super) fn memory_backend(region: &RegionInfo) -> String {
    format!(
        "memory-backend-file,id={},share=on,size={},mem-path={}",
        region.id,
        region.size,
        qemu_opt_value(&region.fd_path)
    )
}

/// The `-m` value: main RAM, plus DIMM slots for the other regions. A
/// suffix-less `-m` number means MiB to QEMU while `maxmem` means bytes, so
/// every size carries an explicit `B`.
pub(super) fn memory_option(regions: &[RegionInfo]) -> String {
    let main = regions.first().map_or(0, |r| r.size);
    if regions.len() <= 1 {
        return format!("{main}B");
    }
    // validate_regions() checked that the sum fits.
    let total: u64 = regions.iter().map(|r| r.size).sum();
    format!("{main}B,slots={},maxmem={total}B", regions.len() - 1)
}

/// QEMU's rule for object ids (`id_wellformed()` in util/id.c).
fn is_qemu_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

pub(super) fn validate_regions(regions: &[RegionInfo]) -> Result<(), CmdlineError> {
    if regions.is_empty() {
        return Err(CmdlineError::NoRegions);
    }
    let mut total: u64 = 0;
    for (index, region) in regions.iter().enumerate() {
        let id = || region.id.clone();
        if !is_qemu_id(&region.id) {
            return Err(CmdlineError::InvalidRegionId { id: id() });
        }
        if regions[..index].iter().any(|earlier| earlier.id == region.id) {
            return Err(CmdlineError::DuplicateRegionId { id: id() });
        }
        if region.size == 0 {
            return Err(CmdlineError::ZeroSize { id: id() });
        }
        if region.awaiting_adoption {
            return Err(CmdlineError::AwaitingAdoption { id: id() });
        }
        if region.fd_path.is_empty() {
            return Err(CmdlineError::EmptyFdPath { id: id() });
        }
        total = total.checked_add(region.size).ok_or(CmdlineError::TotalSizeOverflow)?;
    }
    Ok(())
}
