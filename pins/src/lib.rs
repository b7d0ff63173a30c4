//! The pin ledger: every pin gmemd holds on guest RAM, charged to the owner
//! it was taken for.
//!
//! Three kinds of pin are charged here: mlocked regions, io_uring fixed
//! buffers registered over guest RAM, and transient device references (the
//! buffers of in-flight requests, counted but not budgeted). Each pin is
//! charged to an [`Owner`] (the VM its region belongs to) and, above it, to
//! the uid the owner runs under, the way the kernel charges io_uring pins to
//! `user->locked_vm`.
//!
//! The rules the kernel's own accounting breaks, and this ledger keeps:
//! - A pin is released from the accounts it was charged to, not from
//!   whoever happens to release it: [`PinLedger::pin`] returns a
//!   [`PinReceipt`] (neither `Clone` nor `Copy`) that names those accounts,
//!   and [`PinLedger::unpin`] consumes it.
//! - No count goes negative: every subtraction is checked, and a release
//!   that does not match a live pin is refused and logged.
//! - No second budget: helpers and every image of gmemd (after an exec
//!   upgrade or a crash restart) draw on the same owner's budget, because
//!   the ledger travels as a [`LedgerSnapshot`] and [`PinLedger::restore`]
//!   re-creates the charges before anything new is pinned.
//!
//! [`kernel`] reads what the kernel reports (`VmLck`, `VmPin`, io_uring
//! fdinfo) so that [`PinLedger::reconcile`] can compare it with the ledger.
//! See `docs/pins-and-conversion.md`.

mod ledger;
mod limit;
mod shared;

pub mod kernel;

pub use ledger::{
    Account, Holder, LedgerSnapshot, Owner, OwnerEntry, OwnerReport, PendingPin, PinError, PinId, PinKind, PinLedger,
    PinReceipt, PinRecord, PinRequest, PinState, PinsReport, RegionReport, Restart, RestoreError, Restored, RingId,
    Tally, Usage, UserEntry, UserReport, SNAPSHOT_VERSION,
};
pub use limit::{Limit, LimitError};
pub use shared::{PinGuard, SharedLedger};
