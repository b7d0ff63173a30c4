//! Locked guest RAM, charged in the pin ledger (`gmem_pins`).
//!
//! A region with `lock` is mlocked (MLOCK_ONFAULT: pages stay in RAM once
//! touched, without populating the region up front) and held against
//! conversion to private (`gmem_attributes::RangeHold`): a pinned range is
//! a long-lived reference. The pin is charged to the region's owner and,
//! above it, to gmemd's uid, in one ledger that crosses gmemd's exec
//! upgrade (in the handover record) and its crash restart (in the state
//! file): mlocks do not survive either, so the next image finds the pins
//! pending, mlocks the regions again and re-establishes them, without
//! charging the budget a second time. See docs/pins-and-conversion.md.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use gmem_attributes::RangeHold;
use gmem_pins::kernel::{Observed, Reconciliation};
use gmem_pins::{
    LedgerSnapshot, Limit, Owner, PendingPin, PinError, PinGuard, PinKind, PinLedger, PinRequest, PinsReport, Restart,
    RestoreError, SharedLedger,
};

use crate::memory::{GuestRegion, RegionSet};

/// Why a region could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// The ledger refused the charge (over budget).
    #[error("locking region {region}: {source}")]
    Ledger { region: String, source: PinError },
    /// The region is private, or partly.
    #[error("locking region {region}: {why}")]
    Held { region: String, why: String },
    /// mlock2 failed.
    #[error("locking region {region}: mlock: {source}")]
    Mlock { region: String, source: std::io::Error },
    /// The recorded ledger cannot be taken back.
    #[error("the pin ledger of the previous gmemd: {0}")]
    Restore(#[from] RestoreError),
}

/// A region locked in RAM: munlocked, then let go of, when dropped.
#[derive(Debug)]
struct Locked {
    addr: usize,
    len: usize,
    /// Dropped after the munlock: the range may turn private again only
    /// once nothing pins it.
    _hold: RangeHold,
    /// Dropped last: the charge goes when the pin is gone.
    _pin: PinGuard,
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the range is exactly a mapping of the region, which the
        // region keeps mapped for gmemd's life; munlock changes no memory.
        unsafe { libc::munlock(self.addr as *const libc::c_void, self.len) };
    }
}

/// The daemon's pins: the ledger and the regions locked under it.
#[derive(Debug)]
pub struct Pins {
    ledger: SharedLedger,
    /// The owner of regions that name none.
    default_owner: Owner,
    uid: u32,
    /// Each owner's budget, and gmemd's user's.
    limit: Limit,
    locked: Mutex<BTreeMap<String, Locked>>,
    /// Pins a previous image held, waiting for their region to be locked again.
    pending: Mutex<Vec<PendingPin>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data whole.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pins {
    /// A new ledger: each owner and gmemd's user may pin up to `limit`.
    pub fn new(vm_id: &str, limit: Limit) -> Self {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let mut ledger = PinLedger::new();
        ledger.set_user_limit(uid, limit);
        Pins {
            ledger: SharedLedger::new(ledger),
            default_owner: Owner::new(vm_id),
            uid,
            limit,
            locked: Mutex::default(),
            pending: Mutex::default(),
        }
    }

    /// The ledger a previous image recorded, after `restart`: its pins stay
    /// charged, pending until [`establish`](Self::establish) locks their
    /// regions again. `limit` replaces the recorded budgets.
    pub fn restore(vm_id: &str, limit: Limit, snapshot: LedgerSnapshot, restart: &Restart) -> Result<Self, PinsError> {
        let (mut ledger, restored) = PinLedger::restore(snapshot, restart)?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        ledger.set_user_limit(uid, limit);
        for owner in ledger.report().owners {
            if let Err(error) = ledger.set_owner_limit(owner.owner.clone(), owner.uid, limit) {
                log::warn!("owner {}: keeping its recorded budget: {error}", owner.owner.as_str());
            }
        }
        for survivor in restored.survivors {
            // gmemd registers no io_uring buffers, so nothing outlives its
            // image; a receipt here was charged by a build that did.
            if let Err(error) = ledger.unpin(survivor) {
                log::error!("releasing a pin of the previous gmemd: {error}");
            }
        }
        Ok(Pins {
            ledger: SharedLedger::new(ledger),
            default_owner: Owner::new(vm_id),
            uid,
            limit,
            locked: Mutex::default(),
            pending: Mutex::new(restored.pending),
        })
    }

    /// Locks every live region that asks for it and is not locked yet:
    /// taking back a pin a previous image held when there is one, else
    /// charging a new one. Idempotent; called at start and whenever a
    /// region may have come back (a frontend's memory table).
    pub fn establish(&self, regions: &RegionSet) -> Result<(), PinsError> {
        let mut locked = lock(&self.locked);
        for region in regions.iter().filter(|r| r.spec().lock) {
            if !locked.contains_key(region.id()) {
                let entry = self.lock_region(region)?;
                locked.insert(region.id().to_string(), entry);
            }
        }
        Ok(())
    }

    fn lock_region(&self, region: &GuestRegion) -> Result<Locked, PinsError> {
        let id = region.id().to_string();
        let owner = region.spec().owner.as_deref().map_or_else(|| self.default_owner.clone(), Owner::new);
        let hold = region
            .attributes()
            .hold(0, region.size())
            .map_err(|denied| PinsError::Held { region: id.clone(), why: denied.to_string() })?;
        let taken_back = {
            let mut pending = lock(&self.pending);
            let ledger = self.ledger.lock();
            let index = pending.iter().position(|p| {
                p.kind() == PinKind::Mlock
                    && p.len() == region.size()
                    && ledger.pins().any(|r| r.id == p.id() && r.region == id)
            });
            drop(ledger);
            index.map(|index| pending.swap_remove(index))
        };
        let pin = match taken_back {
            Some(pending) => {
                let receipt = self
                    .ledger
                    .lock()
                    .reestablish(pending)
                    .map_err(|source| PinsError::Ledger { region: id.clone(), source })?;
                self.ledger.guard(receipt)
            }
            None => {
                let ledger_error = |source| PinsError::Ledger { region: id.clone(), source };
                {
                    let mut ledger = self.ledger.lock();
                    if ledger.owner_limit(&owner).is_none() {
                        ledger.set_owner_limit(owner.clone(), self.uid, self.limit).map_err(ledger_error)?;
                    }
                }
                self.ledger.pin(PinRequest::mlock(owner, id.clone(), 0, region.size())).map_err(ledger_error)?
            }
        };
        let (addr, len) = (region.host_addr(), region.size() as usize);
        // SAFETY: the range is exactly the region's mapping, alive for the
        // daemon's life; mlock2 changes no memory, only its residency.
        let rc = unsafe { libc::mlock2(addr as *const libc::c_void, len, libc::MLOCK_ONFAULT) };
        if rc != 0 {
            // `pin` and `hold` drop here: nothing stays charged or held.
            return Err(PinsError::Mlock { region: id, source: std::io::Error::last_os_error() });
        }
        log::info!("region {id}: locked in RAM ({} bytes, charged to {})", len, pin.receipt().owner().as_str());
        Ok(Locked { addr, len, _hold: hold, _pin: pin })
    }

    /// Whether pins of a previous image wait for their region.
    pub fn has_pending(&self) -> bool {
        !lock(&self.pending).is_empty()
    }

    /// Gives up the pins a previous image held that no region took back,
    /// so that their charge is not kept forever.
    pub fn abandon_pending(&self) {
        for pending in lock(&self.pending).drain(..) {
            match self.ledger.lock().abandon(pending) {
                Ok(record) => log::warn!("region {}: its lock was not taken back; charge released", record.region),
                Err(error) => log::error!("releasing a pin of the previous gmemd: {error}"),
            }
        }
    }

    /// The ledger, to hand to the next image or record for a restart.
    pub fn snapshot(&self) -> LedgerSnapshot {
        self.ledger.lock().snapshot()
    }

    /// The ledger's report and its reconciliation with what the kernel says.
    pub fn report(&self) -> (PinsReport, Result<Reconciliation, String>) {
        let ledger = self.ledger.lock();
        let observed = Observed::read_self(std::iter::empty()).map_err(|e| e.to_string());
        (ledger.report(), observed.map(|observed| ledger.reconcile(&observed)))
    }
}
