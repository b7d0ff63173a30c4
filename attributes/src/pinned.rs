//! A pin in the ledger tied to a hold on the range it pins: a pin is a
//! long-lived reference, so a pinned range cannot be made private.

use gmem_pins::{PinError, PinGuard, PinRequest, SharedLedger};

use crate::region::{Denied, RangeHold, RegionAttributes};

/// Why [`pin_range`] failed. Nothing is held or charged.
#[derive(Debug, thiserror::Error)]
pub enum PinRangeError {
    /// The range is not shared (or not in the region).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The ledger refused the pin (over budget, unknown owner...).
    #[error(transparent)]
    Pin(#[from] PinError),
}

/// A range that is both charged in the pin ledger and held against
/// conversion. Dropping it lets go of both; the daemon drops it after it has
/// let go of the memory (munlock, unregistering the buffer).
#[derive(Debug)]
pub struct PinnedRange {
    /// Dropped first: the charge goes only once nothing holds the range.
    hold: RangeHold,
    pin: PinGuard,
}

impl PinnedRange {
    /// The hold on the range.
    pub fn hold(&self) -> &RangeHold {
        &self.hold
    }

    /// The ledger's guard.
    pub fn pin(&self) -> &PinGuard {
        &self.pin
    }
}

/// Holds `request`'s range in `region` and charges it in `ledger`. The hold
/// comes first: a private range is refused before anything is charged.
pub fn pin_range(
    region: &RegionAttributes,
    ledger: &SharedLedger,
    request: PinRequest,
) -> Result<PinnedRange, PinRangeError> {
    let hold = region.hold(request.offset, request.len)?;
    let pin = ledger.pin(request)?;
    Ok(PinnedRange { hold, pin })
}
