//! `PinLedger`: the accounts, the pins, and their travel across exec.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limit::Limit;

/// The VM a pin is charged to: a region's `owner=`, by default the daemon's
/// VM id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Owner(String);

impl Owner {
    /// The owner named `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Owner(id.into())
    }

    /// The owner's id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What holds guest RAM in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinKind {
    /// An mlocked range: the kernel drops it at exec and a forked child
    /// does not inherit it.
    Mlock,
    /// An io_uring fixed buffer: pinned for as long as its ring lives,
    /// across exec too, charged to the mm that registered it.
    FixedBuffer,
    /// The buffer of an in-flight request: counted, never budgeted, and
    /// gone when the request is.
    Transient,
}

impl PinKind {
    /// Whether the pin draws on the owner's and the user's budget.
    pub fn is_budgeted(self) -> bool {
        !matches!(self, PinKind::Transient)
    }
}

impl fmt::Display for PinKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PinKind::Mlock => "mlock",
            PinKind::FixedBuffer => "fixed-buffer",
            PinKind::Transient => "transient",
        })
    }
}

/// The daemon's name for one io_uring instance, so that fixed buffers can be
/// matched with the ring's fdinfo and with the rings an exec kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RingId(pub u64);

impl fmt::Display for RingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ring {}", self.0)
    }
}

/// The address space the kernel charged a pin to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Holder {
    /// The gmemd image with this generation: 0 for the first program, one
    /// more after each exec upgrade or crash restart. A pin held by an
    /// earlier image is charged to a dead mm.
    Image(u64),
    /// A helper process gmemd forked and exec'd, by pid.
    Helper(u32),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Image(generation) => write!(f, "gmemd image {generation}"),
            Holder::Helper(pid) => write!(f, "helper {pid}"),
        }
    }
}

/// A pin's identity in its ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PinId(pub u64);

impl fmt::Display for PinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pin {}", self.0)
    }
}

/// Whether a charged pin is in place in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinState {
    /// The kernel holds it.
    Held,
    /// Still charged, but the kernel let go of it (an exec dropped the
    /// mlock, a crash closed the ring): the program must re-establish it or
    /// give it up. The charge stays meanwhile, so nothing else can take the
    /// budget while gmemd is between images.
    Pending,
}

/// One pin as the ledger records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// Its identity.
    pub id: PinId,
    /// Who it is charged to.
    pub owner: Owner,
    /// The owner's uid, charged above the owner.
    pub uid: u32,
    /// What kind of pin.
    pub kind: PinKind,
    /// The region the pinned range is in.
    pub region: String,
    /// Start of the range in the region, in bytes.
    pub offset: u64,
    /// Length of the range in bytes; what the pin costs.
    pub len: u64,
    /// The ring of a fixed buffer.
    pub ring: Option<RingId>,
    /// Who holds it in the kernel (last held by, for a pending pin).
    pub holder: Holder,
    /// Whether the kernel holds it now.
    pub state: PinState,
}

/// What to pin, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRequest {
    /// The owner to charge.
    pub owner: Owner,
    /// The kind of pin.
    pub kind: PinKind,
    /// The region of the range.
    pub region: String,
    /// Start of the range in the region.
    pub offset: u64,
    /// Length of the range; must not be zero.
    pub len: u64,
    /// The ring of a fixed buffer (required for those, refused for others).
    pub ring: Option<RingId>,
    /// The helper that takes the pin, if not gmemd itself.
    pub helper: Option<u32>,
}

impl PinRequest {
    fn new(owner: Owner, kind: PinKind, region: impl Into<String>, offset: u64, len: u64) -> Self {
        PinRequest { owner, kind, region: region.into(), offset, len, ring: None, helper: None }
    }

    /// An mlock of `len` bytes at `offset` in `region`.
    pub fn mlock(owner: Owner, region: impl Into<String>, offset: u64, len: u64) -> Self {
        Self::new(owner, PinKind::Mlock, region, offset, len)
    }

    /// An io_uring fixed buffer on `ring` over `len` bytes at `offset` in `region`.
    pub fn fixed_buffer(owner: Owner, ring: RingId, region: impl Into<String>, offset: u64, len: u64) -> Self {
        PinRequest { ring: Some(ring), ..Self::new(owner, PinKind::FixedBuffer, region, offset, len) }
    }

    /// A transient device reference to `len` bytes at `offset` in `region`.
    pub fn transient(owner: Owner, region: impl Into<String>, offset: u64, len: u64) -> Self {
        Self::new(owner, PinKind::Transient, region, offset, len)
    }

    /// The same pin, taken by helper process `pid` on the owner's behalf.
    pub fn by_helper(self, pid: u32) -> Self {
        PinRequest { helper: Some(pid), ..self }
    }
}

/// Proof of one pin, to be handed back to release it.
///
/// It names the accounts the pin was charged to, so the release is charged
/// back to them, whoever releases it. It cannot be cloned or copied, and
/// [`PinLedger::unpin`] consumes it, so one pin is released at most once
/// through it. Dropping it without releasing the pin leaves the charge in
/// place and logs a warning; hold it in a [`crate::PinGuard`] to release on
/// drop.
#[derive(Debug)]
#[must_use = "a pin stays charged until its receipt is handed back"]
pub struct PinReceipt {
    /// The ledger that issued it.
    instance: u64,
    /// The image that issued it: receipts die with their program.
    image: u64,
    id: PinId,
    owner: Owner,
    uid: u32,
    kind: PinKind,
    len: u64,
    holder: Holder,
    /// Set once handed back (or when it is a placeholder), so that dropping
    /// it says nothing.
    spent: bool,
}

impl PinReceipt {
    /// The pin's identity.
    pub fn id(&self) -> PinId {
        self.id
    }

    /// The owner it is charged to.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// The uid it is charged to.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Its kind.
    pub fn kind(&self) -> PinKind {
        self.kind
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it pins nothing (never true of a receipt the ledger issued).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Who holds it in the kernel.
    pub fn holder(&self) -> Holder {
        self.holder
    }

    /// A receipt for nothing, left behind when a guard hands its receipt on.
    pub(crate) fn spent() -> Self {
        PinReceipt {
            instance: 0,
            image: 0,
            id: PinId(0),
            owner: Owner(String::new()),
            uid: 0,
            kind: PinKind::Transient,
            len: 0,
            holder: Holder::Image(0),
            spent: true,
        }
    }

    pub(crate) fn is_spent(&self) -> bool {
        self.spent
    }
}

impl Drop for PinReceipt {
    fn drop(&mut self) {
        if !self.spent {
            log::warn!(
                "{} ({}, {} bytes, owner {}) dropped without being released: its charge stays",
                self.id,
                self.kind,
                self.len,
                self.owner
            );
        }
    }
}

/// A pin that is still charged but no longer held by the kernel (see
/// [`PinState::Pending`]); hand it to [`PinLedger::reestablish`] once the
/// pin is in place again, or to [`PinLedger::abandon`] to give it up.
#[derive(Debug)]
#[must_use = "a pending pin stays charged until it is re-established or abandoned"]
pub struct PendingPin(PinReceipt);

impl PendingPin {
    /// The pin's identity.
    pub fn id(&self) -> PinId {
        self.0.id
    }

    /// Its kind.
    pub fn kind(&self) -> PinKind {
        self.0.kind
    }

    /// The owner it is charged to.
    pub fn owner(&self) -> &Owner {
        &self.0.owner
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.0.len
    }

    /// Whether it pins nothing (never true of a pending pin the ledger issued).
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
}

/// Bytes and pins of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Bytes pinned.
    pub bytes: u64,
    /// Number of pins.
    pub pins: u64,
}

/// What an account has pinned, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// mlocked ranges.
    pub mlock: Tally,
    /// io_uring fixed buffers.
    pub fixed_buffer: Tally,
    /// In-flight request buffers.
    pub transient: Tally,
}

impl Usage {
    /// The tally of one kind.
    pub fn of(&self, kind: PinKind) -> Tally {
        match kind {
            PinKind::Mlock => self.mlock,
            PinKind::FixedBuffer => self.fixed_buffer,
            PinKind::Transient => self.transient,
        }
    }

    fn of_mut(&mut self, kind: PinKind) -> &mut Tally {
        match kind {
            PinKind::Mlock => &mut self.mlock,
            PinKind::FixedBuffer => &mut self.fixed_buffer,
            PinKind::Transient => &mut self.transient,
        }
    }

    /// The bytes that count against a budget: mlocks and fixed buffers.
    /// Each is bounded by a budget of at most `u64::MAX`, but their sum need
    /// not be, so it saturates rather than wraps.
    pub fn budgeted(&self) -> u64 {
        self.mlock.bytes.saturating_add(self.fixed_buffer.bytes)
    }

    /// This usage with one more pin of `kind` and `len` bytes; `None` on overflow.
    fn plus(mut self, kind: PinKind, len: u64) -> Option<Self> {
        let tally = self.of_mut(kind);
        tally.bytes = tally.bytes.checked_add(len)?;
        tally.pins = tally.pins.checked_add(1)?;
        Some(self)
    }

    /// This usage with one pin of `kind` and `len` bytes fewer; `None` when
    /// that would go below zero.
    fn minus(mut self, kind: PinKind, len: u64) -> Option<Self> {
        let tally = self.of_mut(kind);
        tally.bytes = tally.bytes.checked_sub(len)?;
        tally.pins = tally.pins.checked_sub(1)?;
        Some(self)
    }
}

/// One of the ledger's accounts, as errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// A VM's.
    Owner(Owner),
    /// A uid's, above its VMs.
    User(u32),
    /// What one address space holds (for reconciliation with the kernel).
    Holder(Holder),
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Owner(owner) => write!(f, "owner {owner}"),
            Account::User(uid) => write!(f, "uid {uid}"),
            Account::Holder(holder) => write!(f, "{holder}"),
        }
    }
}

/// Why a pin or a release was refused. Nothing in the ledger changed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The owner was never added to the ledger.
    #[error("owner {0} is not known to the pin ledger")]
    UnknownOwner(Owner),
    /// An owner was added for a uid that was never added.
    #[error("uid {0} is not known to the pin ledger")]
    UnknownUser(u32),
    /// An owner cannot move to another uid: its pins are charged to the first.
    #[error("owner {owner} is charged to uid {uid}, not {wanted}")]
    OtherUser { owner: Owner, uid: u32, wanted: u32 },
    /// A pin of nothing.
    #[error("a pin of 0 bytes")]
    Empty,
    /// A fixed buffer without its ring, or a ring for anything else.
    #[error("a {kind} pin {}", if *kind == PinKind::FixedBuffer { "needs its ring" } else { "has no ring" })]
    Ring { kind: PinKind },
    /// The pin would take an account over its budget.
    #[error(
        "{account}: pinning {requested} more bytes would exceed its budget of {budget} bytes ({in_use} bytes in use)"
    )]
    OverBudget { account: Account, budget: u64, in_use: u64, requested: u64 },
    /// A count would overflow.
    #[error("{account}: pinning {requested} more bytes overflows its count")]
    Overflow { account: Account, requested: u64 },
    /// A release would take an account below zero: the ledger is
    /// inconsistent, and the release is refused rather than wrapping.
    #[error("{account}: releasing {release} bytes of {kind} would drive its {in_use} bytes below zero")]
    Underflow { account: Account, kind: PinKind, in_use: u64, release: u64 },
    /// The receipt's pin is not live: it was released already (its holder
    /// died, or it was given up).
    #[error("{0} is not live in the ledger (released already)")]
    NotLive(PinId),
    /// The receipt came from another ledger.
    #[error("{0}: the receipt was issued by another ledger")]
    ForeignReceipt(PinId),
    /// The receipt came from an earlier image of gmemd.
    #[error("{id}: the receipt was issued by gmemd image {issued}, this is image {current}")]
    StaleReceipt { id: PinId, issued: u64, current: u64 },
    /// The receipt and the ledger's record disagree.
    #[error("{id}: the receipt ({kind}, {len} bytes, owner {owner}) does not match the ledger's record")]
    Mismatch { id: PinId, kind: PinKind, len: u64, owner: Owner },
    /// A held pin handed in as pending, or the reverse.
    #[error("{id} is {state:?}, not {wanted:?}")]
    State { id: PinId, state: PinState, wanted: PinState },
    /// The ledger ran out of pin ids.
    #[error("the pin ledger ran out of pin ids")]
    Exhausted,
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Written by an incompatible version.
    #[error("ledger snapshot version {found}, this program reads {SNAPSHOT_VERSION}")]
    Version { found: u32 },
    /// An account is listed twice.
    #[error("ledger snapshot: {0} is listed twice")]
    DuplicateAccount(String),
    /// An owner's uid is not listed.
    #[error("ledger snapshot: owner {owner} is charged to uid {uid}, which is not listed")]
    UnknownUser { owner: Owner, uid: u32 },
    /// A pin is not valid in the snapshot.
    #[error("ledger snapshot: {id}: {why}")]
    BadPin { id: PinId, why: String },
    /// Charging the pins again failed.
    #[error("ledger snapshot: {0}")]
    Charge(#[from] PinError),
}

/// Version of [`LedgerSnapshot`]'s layout.
pub const SNAPSHOT_VERSION: u32 = 1;

/// A uid's budget, as a snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntry {
    /// The uid.
    pub uid: u32,
    /// Its budget.
    pub limit: Limit,
}

/// An owner's uid and budget, as a snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerEntry {
    /// The owner.
    pub owner: Owner,
    /// The uid it is charged to.
    pub uid: u32,
    /// Its budget.
    pub limit: Limit,
}

/// The ledger in a form that crosses an exec or is recorded for a crash
/// restart. Usage is not recorded: [`PinLedger::restore`] recomputes it from
/// the pins, so a snapshot cannot carry a count that disagrees with them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The ledger's identity, kept across images.
    pub instance: u64,
    /// The image that took the snapshot.
    pub image: u64,
    /// The next pin id to hand out.
    pub next_id: u64,
    /// Budgets per uid.
    pub users: Vec<UserEntry>,
    /// Owners, their uids and budgets.
    pub owners: Vec<OwnerEntry>,
    /// Every charged pin.
    pub pins: Vec<PinRecord>,
}

/// What gmemd's next image finds of the pins it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// An exec upgrade: mlocks are gone (exec drops them), fixed buffers on
    /// the rings the new image inherited are still pinned, charged to the
    /// old image's dead mm, and must be released exactly once; fixed
    /// buffers on other rings went with their ring.
    Exec {
        /// The rings whose fds survived the exec.
        inherited_rings: BTreeSet<RingId>,
    },
    /// A crash restart: the old process is gone, and with it its mlocks and
    /// its rings.
    Crash,
}

/// The outcome of [`PinLedger::restore`].
#[derive(Debug, Default)]
pub struct Restored {
    /// Still charged, no longer in place: re-establish or abandon each.
    pub pending: Vec<PendingPin>,
    /// Still pinned by the kernel: receipts to release each exactly once.
    pub survivors: Vec<PinReceipt>,
    /// Transient references of requests the old image had in flight: they
    /// ended with it and are no longer charged.
    pub dropped: Vec<PinRecord>,
}

#[derive(Debug, Clone)]
struct OwnerAccount {
    uid: u32,
    limit: Limit,
    usage: Usage,
}

#[derive(Debug, Clone)]
struct UserAccount {
    limit: Limit,
    usage: Usage,
}

/// The pin ledger. See the crate documentation for its rules.
#[derive(Debug)]
pub struct PinLedger {
    instance: u64,
    image: u64,
    next_id: u64,
    users: BTreeMap<u32, UserAccount>,
    owners: BTreeMap<Owner, OwnerAccount>,
    /// What each address space holds; pending pins are in none.
    holders: BTreeMap<Holder, Usage>,
    pins: BTreeMap<PinId, PinRecord>,
}

/// A fresh ledger identity. It only needs to tell ledgers apart, so the
/// standard library's randomly keyed hasher is enough.
fn random_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish()
}

/// The new usages of one charge or release, computed before any is stored
/// so that a refusal leaves every account as it was.
struct Change {
    owner: Usage,
    user: Usage,
    holder: Option<(Holder, Usage)>,
}

impl Default for PinLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl PinLedger {
    /// An empty ledger, for gmemd's first image.
    pub fn new() -> Self {
        PinLedger {
            instance: random_instance(),
            image: 0,
            next_id: 1,
            users: BTreeMap::new(),
            owners: BTreeMap::new(),
            holders: BTreeMap::new(),
            pins: BTreeMap::new(),
        }
    }

    /// Sets the budget of `uid`, adding it if it is new. A budget lowered
    /// below the use releases nothing; it refuses new pins.
    pub fn set_user_limit(&mut self, uid: u32, limit: Limit) {
        self.users
            .entry(uid)
            .and_modify(|user| user.limit = limit)
            .or_insert(UserAccount { limit, usage: Usage::default() });
    }

    /// Adds `owner`, charged to `uid` (added already), with budget `limit`;
    /// for an owner already there, sets its budget.
    pub fn set_owner_limit(&mut self, owner: Owner, uid: u32, limit: Limit) -> Result<(), PinError> {
        if !self.users.contains_key(&uid) {
            return Err(PinError::UnknownUser(uid));
        }
        match self.owners.get_mut(&owner) {
            Some(account) if account.uid != uid => Err(PinError::OtherUser { owner, uid: account.uid, wanted: uid }),
            Some(account) => {
                account.limit = limit;
                Ok(())
            }
            None => {
                self.owners.insert(owner, OwnerAccount { uid, limit, usage: Usage::default() });
                Ok(())
            }
        }
    }

    /// This program's image generation.
    pub fn image(&self) -> u64 {
        self.image
    }

    /// What `owner` has pinned.
    pub fn owner_usage(&self, owner: &Owner) -> Option<Usage> {
        self.owners.get(owner).map(|account| account.usage)
    }

    /// `owner`'s budget.
    pub fn owner_limit(&self, owner: &Owner) -> Option<Limit> {
        self.owners.get(owner).map(|account| account.limit)
    }

    /// What `uid` has pinned, over all its owners.
    pub fn user_usage(&self, uid: u32) -> Option<Usage> {
        self.users.get(&uid).map(|account| account.usage)
    }

    /// `uid`'s budget.
    pub fn user_limit(&self, uid: u32) -> Option<Limit> {
        self.users.get(&uid).map(|account| account.limit)
    }

    /// What `holder` holds in the kernel.
    pub fn holder_usage(&self, holder: Holder) -> Usage {
        self.holders.get(&holder).copied().unwrap_or_default()
    }

    /// Every charged pin, by id.
    pub fn pins(&self) -> impl Iterator<Item = &PinRecord> {
        self.pins.values()
    }

    /// Pins `req`'s range, charging its owner and the owner's uid.
    ///
    /// A budgeted pin must fit both budgets: every image of gmemd and every
    /// helper draws on the same owner's budget.
    pub fn pin(&mut self, req: PinRequest) -> Result<PinReceipt, PinError> {
        let account = self.owners.get(&req.owner).ok_or_else(|| PinError::UnknownOwner(req.owner.clone()))?;
        if req.len == 0 {
            return Err(PinError::Empty);
        }
        if req.ring.is_some() != (req.kind == PinKind::FixedBuffer) {
            return Err(PinError::Ring { kind: req.kind });
        }
        let id = PinId(self.next_id);
        let next_id = self.next_id.checked_add(1).ok_or(PinError::Exhausted)?;
        let record = PinRecord {
            id,
            owner: req.owner,
            uid: account.uid,
            kind: req.kind,
            region: req.region,
            offset: req.offset,
            len: req.len,
            ring: req.ring,
            holder: req.helper.map_or(Holder::Image(self.image), Holder::Helper),
            state: PinState::Held,
        };
        let change = self.charge(&record, true)?;
        self.commit(&record, change);
        self.next_id = next_id;
        let receipt = self.receipt(&record);
        self.pins.insert(id, record);
        Ok(receipt)
    }

    /// Releases the pin `receipt` proves, from the accounts it was charged
    /// to. A receipt that does not match a live pin of this ledger and this
    /// image is refused and logged; nothing is released twice.
    pub fn unpin(&mut self, mut receipt: PinReceipt) -> Result<PinRecord, PinError> {
        receipt.spent = true;
        let result = self.check_receipt(&receipt, PinState::Held).and_then(|record| {
            let change = self.uncharge(record)?;
            Ok((record.id, change))
        });
        match result.and_then(|(id, change)| self.remove(id, change)) {
            Ok(record) => Ok(record),
            Err(error) => {
                log::error!("pin ledger: refused to release {}: {error}", receipt.id);
                Err(error)
            }
        }
    }

    /// Releases every pin helper `pid` held: the kernel let go of them when
    /// it exited. Their receipts are stale from now on.
    pub fn helper_exited(&mut self, pid: u32) -> Vec<PinRecord> {
        let ids: Vec<PinId> =
            self.pins.values().filter(|record| record.holder == Holder::Helper(pid)).map(|record| record.id).collect();
        let mut released = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(record) = self.pins.get(&id) else { continue };
            match self.uncharge(record) {
                Ok(change) => released.extend(self.remove(id, change)),
                Err(error) => log::error!("pin ledger: helper {pid} exited, but {id} cannot be released: {error}"),
            }
        }
        released
    }

    /// Marks `pending` as in place again, held by this image. Its charge
    /// was kept all along, so no budget is checked. A fixed buffer keeps its
    /// [`RingId`]: a ring registered to replace one that is gone takes the
    /// gone ring's id.
    pub fn reestablish(&mut self, mut pending: PendingPin) -> Result<PinReceipt, PinError> {
        pending.0.spent = true;
        let id = pending.0.id;
        let record = self.check_receipt(&pending.0, PinState::Pending)?;
        let holder = Holder::Image(self.image);
        let usage = self
            .holder_usage(holder)
            .plus(record.kind, record.len)
            .ok_or(PinError::Overflow { account: Account::Holder(holder), requested: record.len })?;
        let record = self.pins.get_mut(&id).ok_or(PinError::NotLive(id))?;
        record.holder = holder;
        record.state = PinState::Held;
        let record = record.clone();
        self.holders.insert(holder, usage);
        Ok(self.receipt(&record))
    }

    /// Gives up `pending`: it could not be re-established. Its charge is released.
    pub fn abandon(&mut self, mut pending: PendingPin) -> Result<PinRecord, PinError> {
        pending.0.spent = true;
        let record = self.check_receipt(&pending.0, PinState::Pending)?;
        let change = self.uncharge(record)?;
        self.remove(pending.0.id, change)
    }

    /// The ledger as it must cross an exec or be recorded for a restart.
    pub fn snapshot(&self) -> LedgerSnapshot {
        LedgerSnapshot {
            version: SNAPSHOT_VERSION,
            instance: self.instance,
            image: self.image,
            next_id: self.next_id,
            users: self.users.iter().map(|(uid, account)| UserEntry { uid: *uid, limit: account.limit }).collect(),
            owners: self
                .owners
                .iter()
                .map(|(owner, account)| OwnerEntry { owner: owner.clone(), uid: account.uid, limit: account.limit })
                .collect(),
            pins: self.pins.values().cloned().collect(),
        }
    }

    /// The ledger of gmemd's next image, from the previous image's
    /// snapshot, after `restart`.
    ///
    /// Every mlock and fixed buffer stays charged to its owner: those the
    /// kernel still holds come back as receipts (`survivors`), the others
    /// as [`PendingPin`]s. Only transient references are dropped. So the
    /// budget gmemd had is not handed out a second time while it
    /// re-establishes its pins.
    pub fn restore(snapshot: LedgerSnapshot, restart: &Restart) -> Result<(PinLedger, Restored), RestoreError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version { found: snapshot.version });
        }
        let mut ledger = PinLedger {
            instance: snapshot.instance,
            image: snapshot.image.checked_add(1).ok_or(PinError::Exhausted)?,
            next_id: snapshot.next_id,
            users: BTreeMap::new(),
            owners: BTreeMap::new(),
            holders: BTreeMap::new(),
            pins: BTreeMap::new(),
        };
        for entry in snapshot.users {
            if ledger.users.insert(entry.uid, UserAccount { limit: entry.limit, usage: Usage::default() }).is_some() {
                return Err(RestoreError::DuplicateAccount(format!("uid {}", entry.uid)));
            }
        }
        for entry in snapshot.owners {
            if !ledger.users.contains_key(&entry.uid) {
                return Err(RestoreError::UnknownUser { owner: entry.owner, uid: entry.uid });
            }
            let account = OwnerAccount { uid: entry.uid, limit: entry.limit, usage: Usage::default() };
            if ledger.owners.contains_key(&entry.owner) {
                return Err(RestoreError::DuplicateAccount(format!("owner {}", entry.owner)));
            }
            ledger.owners.insert(entry.owner, account);
        }
        let mut restored = Restored::default();
        for mut record in snapshot.pins {
            ledger.check_restored(&record)?;
            if record.kind == PinKind::Transient {
                restored.dropped.push(record);
                continue;
            }
            let survives = match (record.holder, record.state) {
                (_, PinState::Pending) => false,
                // A helper is its own process: gmemd's exec or crash left it running.
                (Holder::Helper(_), PinState::Held) => true,
                (Holder::Image(_), PinState::Held) => match restart {
                    Restart::Exec { inherited_rings } => {
                        record.kind == PinKind::FixedBuffer && record.ring.is_some_and(|r| inherited_rings.contains(&r))
                    }
                    Restart::Crash => false,
                },
            };
            if !survives {
                record.state = PinState::Pending;
            }
            let change = ledger.charge(&record, false)?;
            ledger.commit(&record, change);
            let receipt = ledger.receipt(&record);
            if survives {
                restored.survivors.push(receipt);
            } else {
                restored.pending.push(PendingPin(receipt));
            }
            ledger.pins.insert(record.id, record);
        }
        Ok((ledger, restored))
    }

    /// Everything the ledger knows, for `query-pins`.
    pub fn report(&self) -> PinsReport {
        let users = self
            .users
            .iter()
            .map(|(uid, account)| UserReport {
                uid: *uid,
                limit: account.limit,
                in_use: account.usage.budgeted(),
                over_budget: !account.limit.allows(account.usage.budgeted()),
                usage: account.usage,
            })
            .collect();
        let owners = self
            .owners
            .iter()
            .map(|(owner, account)| {
                let mut regions: BTreeMap<&str, Usage> = BTreeMap::new();
                let mut pending_bytes = 0u64;
                for record in self.pins.values().filter(|record| &record.owner == owner) {
                    let usage = regions.entry(record.region.as_str()).or_default();
                    // The owner's own usage already passed the checked
                    // charge, so a sum over part of its pins cannot overflow.
                    *usage = usage.plus(record.kind, record.len).unwrap_or(*usage);
                    if record.state == PinState::Pending {
                        pending_bytes = pending_bytes.saturating_add(record.len);
                    }
                }
                OwnerReport {
                    owner: owner.clone(),
                    uid: account.uid,
                    limit: account.limit,
                    in_use: account.usage.budgeted(),
                    over_budget: !account.limit.allows(account.usage.budgeted()),
                    usage: account.usage,
                    pending_bytes,
                    regions: regions
                        .into_iter()
                        .map(|(region, usage)| RegionReport { region: region.to_string(), usage })
                        .collect(),
                }
            })
            .collect();
        let dead_image_bytes = self
            .holders
            .iter()
            .filter(|(holder, _)| matches!(holder, Holder::Image(image) if *image != self.image))
            .map(|(_, usage)| usage.budgeted())
            .fold(0u64, u64::saturating_add);
        PinsReport { image: self.image, users, owners, dead_image_bytes }
    }

    /// The new usages of charging `record`, checking the budgets if
    /// `budget` (not when restoring charges that existed already).
    fn charge(&self, record: &PinRecord, budget: bool) -> Result<Change, PinError> {
        let owner = self.owners.get(&record.owner).ok_or_else(|| PinError::UnknownOwner(record.owner.clone()))?;
        let user = self.users.get(&owner.uid).ok_or(PinError::UnknownUser(owner.uid))?;
        let (kind, len) = (record.kind, record.len);
        let overflow = |account: Account| PinError::Overflow { account, requested: len };
        let new_owner = owner.usage.plus(kind, len).ok_or_else(|| overflow(Account::Owner(record.owner.clone())))?;
        let new_user = user.usage.plus(kind, len).ok_or_else(|| overflow(Account::User(owner.uid)))?;
        if budget && kind.is_budgeted() {
            let checks = [
                (Account::Owner(record.owner.clone()), owner.limit, owner.usage),
                (Account::User(owner.uid), user.limit, user.usage),
            ];
            for (account, limit, usage) in checks {
                let in_use = usage.budgeted();
                if !in_use.checked_add(len).is_some_and(|total| limit.allows(total)) {
                    return Err(PinError::OverBudget {
                        account,
                        budget: limit.bytes().unwrap_or(u64::MAX),
                        in_use,
                        requested: len,
                    });
                }
            }
        }
        let holder = match record.state {
            PinState::Held => {
                let usage = self
                    .holder_usage(record.holder)
                    .plus(kind, len)
                    .ok_or_else(|| overflow(Account::Holder(record.holder)))?;
                Some((record.holder, usage))
            }
            PinState::Pending => None,
        };
        Ok(Change { owner: new_owner, user: new_user, holder })
    }

    /// The new usages of releasing `record` from the accounts it was
    /// charged to: its own owner, uid and holder, never the caller's.
    fn uncharge(&self, record: &PinRecord) -> Result<Change, PinError> {
        let (kind, len) = (record.kind, record.len);
        let underflow = |account: Account, usage: Usage| {
            let error = PinError::Underflow { account, kind, in_use: usage.of(kind).bytes, release: len };
            log::error!("pin ledger: {error}");
            error
        };
        let owner = self.owners.get(&record.owner).ok_or_else(|| PinError::UnknownOwner(record.owner.clone()))?;
        let user = self.users.get(&record.uid).ok_or(PinError::UnknownUser(record.uid))?;
        let new_owner =
            owner.usage.minus(kind, len).ok_or_else(|| underflow(Account::Owner(record.owner.clone()), owner.usage))?;
        let new_user = user.usage.minus(kind, len).ok_or_else(|| underflow(Account::User(record.uid), user.usage))?;
        let holder = match record.state {
            PinState::Held => {
                let usage = self.holder_usage(record.holder);
                let new = usage.minus(kind, len).ok_or_else(|| underflow(Account::Holder(record.holder), usage))?;
                Some((record.holder, new))
            }
            PinState::Pending => None,
        };
        Ok(Change { owner: new_owner, user: new_user, holder })
    }

    fn commit(&mut self, record: &PinRecord, change: Change) {
        if let Some(owner) = self.owners.get_mut(&record.owner) {
            owner.usage = change.owner;
        }
        if let Some(user) = self.users.get_mut(&record.uid) {
            user.usage = change.user;
        }
        if let Some((holder, usage)) = change.holder {
            if usage == Usage::default() {
                self.holders.remove(&holder);
            } else {
                self.holders.insert(holder, usage);
            }
        }
    }

    /// Removes pin `id` and stores `change`, the usages without it.
    fn remove(&mut self, id: PinId, change: Change) -> Result<PinRecord, PinError> {
        let record = self.pins.remove(&id).ok_or(PinError::NotLive(id))?;
        self.commit(&record, change);
        Ok(record)
    }

    fn receipt(&self, record: &PinRecord) -> PinReceipt {
        PinReceipt {
            instance: self.instance,
            image: self.image,
            id: record.id,
            owner: record.owner.clone(),
            uid: record.uid,
            kind: record.kind,
            len: record.len,
            holder: record.holder,
            spent: false,
        }
    }

    /// The live record `receipt` proves, in state `wanted`.
    fn check_receipt(&self, receipt: &PinReceipt, wanted: PinState) -> Result<&PinRecord, PinError> {
        let id = receipt.id;
        if receipt.instance != self.instance {
            return Err(PinError::ForeignReceipt(id));
        }
        if receipt.image != self.image {
            return Err(PinError::StaleReceipt { id, issued: receipt.image, current: self.image });
        }
        let record = self.pins.get(&id).ok_or(PinError::NotLive(id))?;
        if record.owner != receipt.owner
            || record.uid != receipt.uid
            || record.kind != receipt.kind
            || record.len != receipt.len
            || (wanted == PinState::Held && record.holder != receipt.holder)
        {
            return Err(PinError::Mismatch { id, kind: receipt.kind, len: receipt.len, owner: receipt.owner.clone() });
        }
        if record.state != wanted {
            return Err(PinError::State { id, state: record.state, wanted });
        }
        Ok(record)
    }

    fn check_restored(&self, record: &PinRecord) -> Result<(), RestoreError> {
        let bad = |why: &str| RestoreError::BadPin { id: record.id, why: why.to_string() };
        if record.id.0 == 0 || record.id.0 >= self.next_id {
            return Err(bad("id outside the ledger's range"));
        }
        if self.pins.contains_key(&record.id) {
            return Err(bad("listed twice"));
        }
        let owner = self.owners.get(&record.owner).ok_or_else(|| bad("unknown owner"))?;
        if owner.uid != record.uid {
            return Err(bad("charged to another uid than its owner's"));
        }
        if record.len == 0 {
            return Err(bad("0 bytes"));
        }
        if record.ring.is_some() != (record.kind == PinKind::FixedBuffer) {
            return Err(bad("ring and kind disagree"));
        }
        Ok(())
    }
}

/// A uid's line in [`PinsReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserReport {
    /// The uid.
    pub uid: u32,
    /// Its budget.
    pub limit: Limit,
    /// Budgeted bytes in use.
    pub in_use: u64,
    /// Whether the use exceeds a budget lowered after the pins were taken.
    pub over_budget: bool,
    /// By kind.
    pub usage: Usage,
}

/// An owner's line in [`PinsReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerReport {
    /// The owner.
    pub owner: Owner,
    /// The uid above it.
    pub uid: u32,
    /// Its budget.
    pub limit: Limit,
    /// Budgeted bytes in use.
    pub in_use: u64,
    /// Whether the use exceeds a budget lowered after the pins were taken.
    pub over_budget: bool,
    /// By kind.
    pub usage: Usage,
    /// Bytes charged but not in place (waiting to be re-established).
    pub pending_bytes: u64,
    /// By region.
    pub regions: Vec<RegionReport>,
}

/// A region's line in [`OwnerReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionReport {
    /// The region.
    pub region: String,
    /// By kind.
    pub usage: Usage,
}

/// The ledger for `query-pins`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinsReport {
    /// This image's generation.
    pub image: u64,
    /// Per uid.
    pub users: Vec<UserReport>,
    /// Per owner, with regions.
    pub owners: Vec<OwnerReport>,
    /// Fixed-buffer bytes still pinned on behalf of an earlier image (a
    /// dead mm): in no `VmPin`, only in the rings' fdinfo.
    pub dead_image_bytes: u64,
}
