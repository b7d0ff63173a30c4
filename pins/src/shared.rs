//! The ledger shared between gmemd's threads, and guards that release a pin
//! when they go out of scope.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::ledger::{PinError, PinLedger, PinReceipt, PinRecord, PinRequest};

/// A [`PinLedger`] behind a lock, cloned into every thread that pins.
#[derive(Debug, Clone)]
pub struct SharedLedger(Arc<Mutex<PinLedger>>);

impl SharedLedger {
    /// Shares `ledger`.
    pub fn new(ledger: PinLedger) -> Self {
        SharedLedger(Arc::new(Mutex::new(ledger)))
    }

    /// The ledger, locked. A thread that panicked while holding the lock
    /// left no half-done change behind (every change is computed before it
    /// is stored), so the poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, PinLedger> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pins `req` and returns a guard that releases it when dropped.
    pub fn pin(&self, req: PinRequest) -> Result<PinGuard, PinError> {
        let receipt = self.lock().pin(req)?;
        Ok(PinGuard { ledger: self.clone(), receipt })
    }

    /// A guard over a receipt obtained from the ledger directly (a survivor
    /// of an exec, a re-established pin).
    pub fn guard(&self, receipt: PinReceipt) -> PinGuard {
        PinGuard { ledger: self.clone(), receipt }
    }
}

/// One pin, released from the accounts it was charged to when the guard is
/// dropped. The daemon keeps it next to whatever holds the memory (the
/// mlocked mapping, the registered ring), dropped after the memory is let go.
#[derive(Debug)]
#[must_use = "dropping the guard releases the pin at once"]
pub struct PinGuard {
    ledger: SharedLedger,
    receipt: PinReceipt,
}

impl PinGuard {
    /// The pin's receipt.
    pub fn receipt(&self) -> &PinReceipt {
        &self.receipt
    }

    /// Releases the pin now, reporting a refusal instead of logging it.
    pub fn release(mut self) -> Result<PinRecord, PinError> {
        let receipt = std::mem::replace(&mut self.receipt, PinReceipt::spent());
        self.ledger.lock().unpin(receipt)
    }

    /// The receipt without the guard: the pin stays charged, and its release
    /// is the caller's.
    pub fn into_receipt(mut self) -> PinReceipt {
        std::mem::replace(&mut self.receipt, PinReceipt::spent())
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.receipt.is_spent() {
            return;
        }
        let receipt = std::mem::replace(&mut self.receipt, PinReceipt::spent());
        // unpin logs a refusal itself; there is no caller to report it to.
        let _ = self.ledger.lock().unpin(receipt);
    }
}
