//! Property tests of the pin ledger against a plain model: random sequences
//! of pin, unpin, fork (a helper), helper exit, exec upgrade, crash restart,
//! re-establishing and abandoning pins, and releases with stale receipts.
//!
//! After every step: every account's usage equals the sum of the live pins
//! charged to it (so nothing went negative or leaked), no account is over
//! its budget, a pin succeeds exactly when the model says it fits, and a
//! refused release changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use gmem_pins::{
    Holder, LedgerSnapshot, Limit, Owner, PendingPin, PinError, PinId, PinKind, PinLedger, PinReceipt, PinRequest,
    PinState, Restart, Restored, RingId, Usage,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;
const RINGS: [RingId; 2] = [RingId(1), RingId(2)];

/// Owners, their uids and budgets (in pages). vm-a and vm-b share uid 1000,
/// whose budget is less than theirs added up.
const OWNERS: [(&str, u32, u64); 3] = [("vm-a", 1000, 32), ("vm-b", 1000, 32), ("vm-c", 1001, 24)];
const USERS: [(u32, u64); 2] = [(1000, 48), (1001, 40)];

#[derive(Debug, Clone)]
enum Op {
    Pin { owner: usize, kind: PinKind, pages: u64, helper: Option<usize>, ring: usize },
    Unpin(usize),
    Fork,
    HelperExit(usize),
    Exec { keep: [bool; 2] },
    Crash,
    Reestablish(usize),
    Abandon(usize),
    StaleUnpin,
}

fn kind() -> impl Strategy<Value = PinKind> {
    prop_oneof![Just(PinKind::Mlock), Just(PinKind::FixedBuffer), Just(PinKind::Transient)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..OWNERS.len(), kind(), 1..=12u64, proptest::option::weighted(0.25, 0..4usize), 0..2usize)
            .prop_map(|(owner, kind, pages, helper, ring)| Op::Pin { owner, kind, pages, helper, ring }),
        5 => any::<usize>().prop_map(Op::Unpin),
        1 => Just(Op::Fork),
        1 => any::<usize>().prop_map(Op::HelperExit),
        1 => any::<[bool; 2]>().prop_map(|keep| Op::Exec { keep }),
        1 => Just(Op::Crash),
        3 => any::<usize>().prop_map(Op::Reestablish),
        1 => any::<usize>().prop_map(Op::Abandon),
        1 => Just(Op::StaleUnpin),
    ]
}

#[derive(Debug, Clone)]
struct ModelPin {
    owner: usize,
    kind: PinKind,
    len: u64,
    ring: Option<RingId>,
    holder: Holder,
    held: bool,
}

/// The ledger under test, the receipts the "daemon" holds, and the model.
struct Harness {
    ledger: PinLedger,
    receipts: Vec<PinReceipt>,
    pending: Vec<PendingPin>,
    /// Receipts whose pins are gone (helper exited) or whose image is.
    stale: Vec<PinReceipt>,
    helpers: Vec<u32>,
    next_pid: u32,
    model: BTreeMap<PinId, ModelPin>,
}

fn owner(index: usize) -> Owner {
    Owner::new(OWNERS[index].0)
}

fn add(usage: &mut Usage, kind: PinKind, len: u64) {
    let tally = match kind {
        PinKind::Mlock => &mut usage.mlock,
        PinKind::FixedBuffer => &mut usage.fixed_buffer,
        PinKind::Transient => &mut usage.transient,
    };
    tally.bytes += len;
    tally.pins += 1;
}

fn round_trip(snapshot: &LedgerSnapshot) -> LedgerSnapshot {
    let json = serde_json::to_string(snapshot).expect("serialise");
    serde_json::from_str(&json).expect("deserialise")
}

impl Harness {
    fn new() -> Self {
        let mut ledger = PinLedger::new();
        for (uid, pages) in USERS {
            ledger.set_user_limit(uid, Limit::Bytes(pages * PAGE));
        }
        for (name, uid, pages) in OWNERS {
            ledger.set_owner_limit(Owner::new(name), uid, Limit::Bytes(pages * PAGE)).expect("owner");
        }
        Harness {
            ledger,
            receipts: Vec::new(),
            pending: Vec::new(),
            stale: Vec::new(),
            helpers: Vec::new(),
            next_pid: 100,
            model: BTreeMap::new(),
        }
    }

    fn model_owner(&self, index: usize) -> Usage {
        let mut usage = Usage::default();
        for pin in self.model.values().filter(|pin| pin.owner == index) {
            add(&mut usage, pin.kind, pin.len);
        }
        usage
    }

    fn model_user(&self, uid: u32) -> Usage {
        let mut usage = Usage::default();
        for pin in self.model.values().filter(|pin| OWNERS[pin.owner].1 == uid) {
            add(&mut usage, pin.kind, pin.len);
        }
        usage
    }

    fn model_holder(&self, holder: Holder) -> Usage {
        let mut usage = Usage::default();
        for pin in self.model.values().filter(|pin| pin.held && pin.holder == holder) {
            add(&mut usage, pin.kind, pin.len);
        }
        usage
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for (index, (name, _, pages)) in OWNERS.iter().enumerate() {
            let usage = self.ledger.owner_usage(&Owner::new(*name)).expect("owner");
            prop_assert_eq!(usage, self.model_owner(index), "owner {} usage", name);
            prop_assert!(usage.budgeted() <= pages * PAGE, "owner {} over budget: {:?}", name, usage);
        }
        for (uid, pages) in USERS {
            let usage = self.ledger.user_usage(uid).expect("user");
            prop_assert_eq!(usage, self.model_user(uid), "uid {} usage", uid);
            prop_assert!(usage.budgeted() <= pages * PAGE, "uid {} over budget: {:?}", uid, usage);
        }
        let holders: BTreeSet<Holder> = self
            .model
            .values()
            .map(|pin| pin.holder)
            .chain(self.helpers.iter().map(|pid| Holder::Helper(*pid)))
            .chain([Holder::Image(self.ledger.image())])
            .collect();
        for holder in holders {
            prop_assert_eq!(self.ledger.holder_usage(holder), self.model_holder(holder), "{} usage", holder);
        }
        let ids: Vec<PinId> = self.ledger.pins().map(|record| record.id).collect();
        prop_assert_eq!(ids, self.model.keys().copied().collect::<Vec<_>>());
        for record in self.ledger.pins() {
            let pin = &self.model[&record.id];
            prop_assert_eq!(record.state == PinState::Held, pin.held);
            prop_assert_eq!(record.len, pin.len);
        }
        Ok(())
    }

    fn fits(&self, index: usize, kind: PinKind, len: u64) -> bool {
        let (_, uid, owner_pages) = OWNERS[index];
        let user_pages = USERS.iter().find(|(u, _)| *u == uid).map(|(_, pages)| *pages).expect("uid");
        !kind.is_budgeted()
            || (self.model_owner(index).budgeted() + len <= owner_pages * PAGE
                && self.model_user(uid).budgeted() + len <= user_pages * PAGE)
    }

    fn keep_stale(&mut self, receipt: PinReceipt) {
        // A handful is enough to try releasing them again.
        if self.stale.len() < 16 {
            self.stale.push(receipt);
        }
    }

    fn restart(&mut self, restart: Restart) -> Result<(), TestCaseError> {
        let snapshot = round_trip(&self.ledger.snapshot());
        let (ledger, restored) = PinLedger::restore(snapshot, &restart).expect("restore");
        self.ledger = ledger;
        for receipt in std::mem::take(&mut self.receipts) {
            self.keep_stale(receipt);
        }
        // The old image's pending pins went with it; the new image gets its own.
        self.pending.clear();
        let inherited = match &restart {
            Restart::Exec { inherited_rings } => inherited_rings.clone(),
            Restart::Crash => BTreeSet::new(),
        };
        let mut dropped = BTreeSet::new();
        let mut survivors = BTreeSet::new();
        let mut pending = BTreeSet::new();
        for (id, pin) in &mut self.model {
            if pin.kind == PinKind::Transient {
                dropped.insert(*id);
            } else if pin.held
                && (matches!(pin.holder, Holder::Helper(_))
                    || (pin.kind == PinKind::FixedBuffer && pin.ring.is_some_and(|ring| inherited.contains(&ring))))
            {
                survivors.insert(*id);
            } else {
                pin.held = false;
                pending.insert(*id);
            }
        }
        self.model.retain(|id, _| !dropped.contains(id));
        prop_assert_eq!(restored.dropped.iter().map(|record| record.id).collect::<BTreeSet<_>>(), dropped);
        prop_assert_eq!(restored.survivors.iter().map(PinReceipt::id).collect::<BTreeSet<_>>(), survivors);
        prop_assert_eq!(restored.pending.iter().map(PendingPin::id).collect::<BTreeSet<_>>(), pending);
        self.receipts = restored.survivors;
        self.pending = restored.pending;
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Pin { owner: index, kind, pages, helper, ring } => {
                let len = pages * PAGE;
                let offset = (index as u64) << 30;
                let mut req = match kind {
                    PinKind::Mlock => PinRequest::mlock(owner(index), "ram", offset, len),
                    PinKind::FixedBuffer => PinRequest::fixed_buffer(owner(index), RINGS[ring], "ram", offset, len),
                    PinKind::Transient => PinRequest::transient(owner(index), "ram", offset, len),
                };
                let helper =
                    helper.and_then(|i| (!self.helpers.is_empty()).then(|| self.helpers[i % self.helpers.len()]));
                if let Some(pid) = helper {
                    req = req.by_helper(pid);
                }
                let fits = self.fits(index, kind, len);
                match self.ledger.pin(req) {
                    Ok(receipt) => {
                        prop_assert!(fits, "pin of {} bytes for {} succeeded over budget", len, OWNERS[index].0);
                        let holder = helper.map_or(Holder::Image(self.ledger.image()), Holder::Helper);
                        prop_assert_eq!(receipt.holder(), holder);
                        self.model.insert(
                            receipt.id(),
                            ModelPin { owner: index, kind, len, ring: receipt_ring(kind, ring), holder, held: true },
                        );
                        self.receipts.push(receipt);
                    }
                    Err(PinError::OverBudget { .. }) => prop_assert!(!fits, "a pin that fits was refused"),
                    Err(other) => prop_assert!(false, "pin failed: {}", other),
                }
            }
            Op::Unpin(i) => {
                if self.receipts.is_empty() {
                    return Ok(());
                }
                let receipt = self.receipts.swap_remove(i % self.receipts.len());
                let id = receipt.id();
                let released = self.ledger.unpin(receipt);
                prop_assert!(released.is_ok(), "releasing a live pin failed: {:?}", released);
                self.model.remove(&id);
            }
            Op::Fork => {
                self.helpers.push(self.next_pid);
                self.next_pid += 1;
            }
            Op::HelperExit(i) => {
                if self.helpers.is_empty() {
                    return Ok(());
                }
                let pid = self.helpers.swap_remove(i % self.helpers.len());
                let released: BTreeSet<PinId> =
                    self.ledger.helper_exited(pid).into_iter().map(|record| record.id).collect();
                let expected: BTreeSet<PinId> =
                    self.model.iter().filter(|(_, pin)| pin.holder == Holder::Helper(pid)).map(|(id, _)| *id).collect();
                prop_assert_eq!(&released, &expected);
                self.model.retain(|id, _| !expected.contains(id));
                let (gone, kept): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut self.receipts).into_iter().partition(|r| expected.contains(&r.id()));
                self.receipts = kept;
                for receipt in gone {
                    self.keep_stale(receipt);
                }
            }
            Op::Exec { keep } => {
                let inherited_rings = RINGS.iter().zip(keep).filter(|(_, keep)| *keep).map(|(ring, _)| *ring).collect();
                self.restart(Restart::Exec { inherited_rings })?;
            }
            Op::Crash => self.restart(Restart::Crash)?,
            Op::Reestablish(i) => {
                if self.pending.is_empty() {
                    return Ok(());
                }
                let pending = self.pending.swap_remove(i % self.pending.len());
                let id = pending.id();
                let receipt = self.ledger.reestablish(pending);
                prop_assert!(receipt.is_ok(), "re-establishing failed: {:?}", receipt);
                let Ok(receipt) = receipt else { unreachable!() };
                let pin = self.model.get_mut(&id).expect("model pin");
                pin.held = true;
                pin.holder = Holder::Image(self.ledger.image());
                self.receipts.push(receipt);
            }
            Op::Abandon(i) => {
                if self.pending.is_empty() {
                    return Ok(());
                }
                let pending = self.pending.swap_remove(i % self.pending.len());
                let id = pending.id();
                prop_assert!(self.ledger.abandon(pending).is_ok());
                self.model.remove(&id);
            }
            Op::StaleUnpin => {
                let Some(receipt) = self.stale.pop() else { return Ok(()) };
                let before = self.ledger.snapshot();
                let refused = self.ledger.unpin(receipt);
                prop_assert!(refused.is_err(), "a stale receipt released a pin");
                prop_assert_eq!(self.ledger.snapshot(), before, "a refused release changed the ledger");
            }
        }
        Ok(())
    }
}

fn receipt_ring(kind: PinKind, ring: usize) -> Option<RingId> {
    (kind == PinKind::FixedBuffer).then_some(RINGS[ring])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ledger_matches_its_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut harness = Harness::new();
        for op in ops {
            harness.apply(op)?;
            harness.check()?;
        }
        // Releasing everything leaves every account at zero.
        for receipt in std::mem::take(&mut harness.receipts) {
            let id = receipt.id();
            prop_assert!(harness.ledger.unpin(receipt).is_ok());
            harness.model.remove(&id);
        }
        for pending in std::mem::take(&mut harness.pending) {
            let id = pending.id();
            prop_assert!(harness.ledger.abandon(pending).is_ok());
            harness.model.remove(&id);
        }
        harness.check()?;
        for (name, _, _) in OWNERS {
            prop_assert_eq!(harness.ledger.owner_usage(&Owner::new(name)), Some(Usage::default()));
        }
    }

    /// An exec upgrade that re-establishes every pin gives back the ledger
    /// it started from, less the transient references; twice over.
    #[test]
    fn exec_round_trips(pins in proptest::collection::vec((0..OWNERS.len(), kind(), 1..=8u64, 0..2usize), 0..30),
                        keep in any::<[bool; 2]>()) {
        let mut harness = Harness::new();
        for (owner, kind, pages, ring) in pins {
            harness.apply(Op::Pin { owner, kind, pages, helper: None, ring })?;
        }
        let strip = |snapshot: LedgerSnapshot| {
            snapshot
                .pins
                .into_iter()
                .filter(|record| record.kind != PinKind::Transient)
                .map(|record| (record.id, record.owner, record.kind, record.region, record.offset, record.len, record.ring))
                .collect::<Vec<_>>()
        };
        let before = harness.ledger.snapshot();
        let usage_before: Vec<Usage> = OWNERS
            .iter()
            .map(|(name, _, _)| {
                let mut usage = harness.ledger.owner_usage(&Owner::new(*name)).expect("owner");
                usage.transient = Default::default();
                usage
            })
            .collect();
        for _ in 0..2 {
            let inherited_rings = RINGS.iter().zip(keep).filter(|(_, keep)| *keep).map(|(ring, _)| *ring).collect();
            harness.restart(Restart::Exec { inherited_rings })?;
            for pending in std::mem::take(&mut harness.pending) {
                let id = pending.id();
                let receipt = harness.ledger.reestablish(pending).expect("re-establish");
                let pin = harness.model.get_mut(&id).expect("model pin");
                pin.held = true;
                pin.holder = Holder::Image(harness.ledger.image());
                harness.receipts.push(receipt);
            }
            harness.check()?;
            let after = harness.ledger.snapshot();
            prop_assert_eq!(after.instance, before.instance);
            prop_assert_eq!(strip(after), strip(before.clone()));
            for (index, (name, _, _)) in OWNERS.iter().enumerate() {
                prop_assert_eq!(harness.ledger.owner_usage(&Owner::new(*name)), Some(usage_before[index]));
            }
        }
    }
}

#[test]
fn a_release_is_charged_back_to_the_owner_not_to_the_releaser() {
    let mut ledger = PinLedger::new();
    ledger.set_user_limit(1000, Limit::Unlimited);
    ledger.set_owner_limit(Owner::new("vm-a"), 1000, Limit::Bytes(1 << 20)).expect("owner");
    ledger.set_owner_limit(Owner::new("vm-b"), 1000, Limit::Bytes(1 << 20)).expect("owner");
    let a = ledger.pin(PinRequest::mlock(Owner::new("vm-a"), "ram-a", 0, 8192)).expect("pin");
    let b = ledger.pin(PinRequest::mlock(Owner::new("vm-b"), "ram-b", 0, 4096)).expect("pin");
    // Whichever frontend's request leads to it, the release names vm-a's accounts.
    ledger.unpin(a).expect("unpin");
    assert_eq!(ledger.owner_usage(&Owner::new("vm-a")), Some(Usage::default()));
    assert_eq!(ledger.owner_usage(&Owner::new("vm-b")).map(|u| u.mlock.bytes), Some(4096));
    ledger.unpin(b).expect("unpin");
}

#[test]
fn a_survivor_of_exec_is_released_once_from_the_dead_image() {
    let mut ledger = PinLedger::new();
    ledger.set_user_limit(1000, Limit::Bytes(64 << 20));
    let vm = Owner::new("vm");
    ledger.set_owner_limit(vm.clone(), 1000, Limit::Bytes(64 << 20)).expect("owner");
    let _lock = ledger.pin(PinRequest::mlock(vm.clone(), "ram", 0, 32 << 20)).expect("mlock");
    let _buffer = ledger.pin(PinRequest::fixed_buffer(vm.clone(), RingId(7), "ram", 0, 16 << 20)).expect("buffer");
    let inherited_rings = [RingId(7)].into_iter().collect();
    let (mut ledger, restored) =
        PinLedger::restore(ledger.snapshot(), &Restart::Exec { inherited_rings }).expect("restore");
    assert_eq!(ledger.image(), 1);
    // The budget is still taken while the mlock waits to be re-established:
    // no second budget after exec.
    let refused = ledger.pin(PinRequest::mlock(vm.clone(), "ram", 0, 32 << 20));
    assert!(
        matches!(refused, Err(PinError::OverBudget { budget, in_use, .. }) if budget == 64 << 20 && in_use == 48 << 20)
    );
    assert_eq!(ledger.report().dead_image_bytes, 16 << 20);
    assert_eq!(ledger.holder_usage(Holder::Image(0)).fixed_buffer.bytes, 16 << 20);
    let Restored { mut survivors, mut pending, .. } = restored;
    let survivor = survivors.pop().expect("survivor");
    assert_eq!(survivor.holder(), Holder::Image(0));
    ledger.unpin(survivor).expect("released once");
    assert_eq!(ledger.holder_usage(Holder::Image(0)), Usage::default());
    assert_eq!(ledger.holder_usage(Holder::Image(1)), Usage::default());
    let relocked = ledger.reestablish(pending.pop().expect("pending mlock")).expect("re-establish");
    assert_eq!(ledger.holder_usage(Holder::Image(1)).mlock.bytes, 32 << 20);
    ledger.unpin(relocked).expect("unpin");
    assert_eq!(ledger.owner_usage(&vm), Some(Usage::default()));
}

#[test]
fn an_over_budget_pin_names_owner_budget_and_use() {
    let mut ledger = PinLedger::new();
    ledger.set_user_limit(1000, Limit::Unlimited);
    ledger.set_owner_limit(Owner::new("vm-a"), 1000, Limit::Bytes(8 << 20)).expect("owner");
    let held = ledger.pin(PinRequest::mlock(Owner::new("vm-a"), "ram", 0, 6 << 20)).expect("pin");
    let error = ledger
        .pin(PinRequest::fixed_buffer(Owner::new("vm-a"), RingId(1), "ram", 0, 4 << 20))
        .expect_err("over budget");
    assert_eq!(
        error.to_string(),
        "owner vm-a: pinning 4194304 more bytes would exceed its budget of 8388608 bytes (6291456 bytes in use)"
    );
    // Transient references are counted, never refused.
    let transient = ledger.pin(PinRequest::transient(Owner::new("vm-a"), "ram", 0, 64 << 20)).expect("transient");
    assert_eq!(ledger.owner_usage(&Owner::new("vm-a")).map(|u| u.transient.bytes), Some(64 << 20));
    ledger.unpin(transient).expect("unpin");
    ledger.unpin(held).expect("unpin");
}

#[test]
fn receipts_from_elsewhere_are_refused() {
    let mut first = PinLedger::new();
    let mut second = PinLedger::new();
    for ledger in [&mut first, &mut second] {
        ledger.set_user_limit(0, Limit::Unlimited);
        ledger.set_owner_limit(Owner::new("vm"), 0, Limit::Unlimited).expect("owner");
    }
    let theirs = first.pin(PinRequest::mlock(Owner::new("vm"), "ram", 0, 4096)).expect("pin");
    let ours = second.pin(PinRequest::mlock(Owner::new("vm"), "ram", 0, 4096)).expect("pin");
    assert!(matches!(second.unpin(theirs), Err(PinError::ForeignReceipt(_))));
    assert_eq!(second.owner_usage(&Owner::new("vm")).map(|u| u.mlock.bytes), Some(4096));
    second.unpin(ours).expect("unpin");
}

#[test]
fn guards_release_on_drop() {
    let mut ledger = PinLedger::new();
    ledger.set_user_limit(0, Limit::Unlimited);
    ledger.set_owner_limit(Owner::new("vm"), 0, Limit::Bytes(1 << 20)).expect("owner");
    let shared = gmem_pins::SharedLedger::new(ledger);
    {
        let _guard = shared.pin(PinRequest::mlock(Owner::new("vm"), "ram", 0, 1 << 20)).expect("pin");
        assert!(shared.pin(PinRequest::mlock(Owner::new("vm"), "ram", 0, 4096)).is_err());
    }
    let guard = shared.pin(PinRequest::mlock(Owner::new("vm"), "ram", 0, 1 << 20)).expect("budget is back");
    assert_eq!(guard.release().expect("release").len, 1 << 20);
    assert_eq!(shared.lock().owner_usage(&Owner::new("vm")), Some(Usage::default()));
}
