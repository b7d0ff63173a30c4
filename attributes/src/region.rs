//! `RegionAttributes`: one region's attribute map, the references the data
//! path takes on it, and conversion.
//!
//! # The reference protocol
//!
//! The data path takes a reference on a range, then checks the attribute;
//! a conversion to private flips the attribute, then checks the references.
//! Whatever the interleaving, either the data path sees the flip (and
//! touches nothing), or the conversion sees the reference (and fails with
//! `EAGAIN`, or waits for it).
//!
//! Both sides meet under a lock per reference shard. Each shard (one per
//! queue worker) has its own copy of the attribute map behind its own
//! mutex, and its own slots, one per reference it can hold. The data path
//! locks only its shard's mutex, which no other queue touches, so the check
//! costs an uncontended lock and a B-tree lookup. A conversion updates every
//! shard's copy, one shard lock at a time, and then reads every shard's
//! slots. For one shard, either the data path's critical section (claim a
//! slot, check the copy) comes first, and the conversion, which locks the
//! same mutex afterwards, sees the claimed slot; or the conversion's comes
//! first, and the data path sees the flipped copy. A reference is let go of
//! with a release store that the conversion reads with acquire, so the
//! device's accesses through it happen before the conversion returns.
//!
//! The flip is to a third state, *converting*: a request that meets it
//! waits ([`RefShard::acquire_wait`]) rather than failing, because the
//! conversion may yet be rolled back to shared. On failure the flip is
//! undone at once, so no request waits longer than the conversion ran.
//!
//! Long-lived references (pins: io_uring fixed buffers, mlocks) are
//! [`RangeHold`]s, taken under the conversion lock itself and checked by
//! every conversion alongside the slots.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::extents::{Extents, State};
use crate::sync::{lock, Arc, AtomicU64, AtomicUsize, Deadline, Mutex, Ordering};

/// `KVM_MEMORY_ATTRIBUTE_PRIVATE` (linux/kvm.h): the one attribute bit.
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

/// A conversion request, field for field `KVM_SET_MEMORY_ATTRIBUTES2` on a
/// guest_memfd (less `error_offset`, which comes back in
/// [`ConvertError::Busy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttributes {
    /// Start in the region, in bytes; page-aligned.
    pub offset: u64,
    /// Length in bytes; page-aligned, not zero.
    pub size: u64,
    /// [`KVM_MEMORY_ATTRIBUTE_PRIVATE`] or 0 (shared).
    pub attributes: u64,
    /// No flags are defined; must be 0.
    pub flags: u64,
}

/// What kept a range from becoming private.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Blocker {
    /// A device reference: a request in flight.
    Reference,
    /// A pin: a [`RangeHold`].
    Pin,
}

/// Why a conversion failed. The attributes are as they were before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// `size` is 0.
    #[error("a conversion of 0 bytes")]
    Empty,
    /// Offset or size is not a multiple of the region's page size.
    #[error("offset {offset:#x} and size {size:#x} must be multiples of the page size {page_size:#x}")]
    Unaligned { offset: u64, size: u64, page_size: u64 },
    /// The range does not fit in the region.
    #[error("{offset:#x}+{size:#x} lies outside the region's {region_size:#x} bytes")]
    OutOfRange { offset: u64, size: u64, region_size: u64 },
    /// Attribute bits other than [`KVM_MEMORY_ATTRIBUTE_PRIVATE`].
    #[error("unsupported attributes {0:#x}")]
    Attributes(u64),
    /// Flags, of which none are defined.
    #[error("unsupported flags {0:#x}")]
    Flags(u64),
    /// Something still references the range (`EAGAIN`): `error_offset` is
    /// the first offending byte offset in the region.
    #[error("{blocker:?} at offset {error_offset:#x} is still using the range")]
    Busy { error_offset: u64, blocker: Blocker },
}

impl ConvertError {
    /// The errno the kernel's `KVM_SET_MEMORY_ATTRIBUTES2` fails with in
    /// the same case.
    pub fn errno(&self) -> i32 {
        match self {
            ConvertError::Busy { .. } => libc::EAGAIN,
            _ => libc::EINVAL,
        }
    }
}

/// Why the data path may not touch a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Part of it is private, from this offset on.
    #[error("guest memory at region offset {offset:#x} is private")]
    Private { offset: u64 },
    /// Part of it is being converted to private (retry, or wait with
    /// [`RefShard::acquire_wait`]).
    #[error("guest memory in the range is being converted to private")]
    Converting,
    /// The range does not fit in the region.
    #[error("{offset:#x}+{len:#x} lies outside the region")]
    OutOfRange { offset: u64, len: u64 },
    /// Every slot of the shard is taken: more references than it was made for.
    #[error("all {0} reference slots of the shard are taken")]
    Full(usize),
}

/// The most pages a region may have: references pack their first page and
/// page count into 32 bits each.
const MAX_PAGES: u64 = u32::MAX as u64;

/// How many references a shard can hold when none is asked for.
pub const DEFAULT_SHARD_SLOTS: usize = 256;

/// One extent of [`RegionAttributes::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Start in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// Whether it is private.
    pub private: bool,
}

/// Why a region's attributes could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// A page size that is not a power of two.
    #[error("page size {0} is not a power of two")]
    PageSize(u64),
    /// A size that is not a non-zero multiple of the page size, or too many pages.
    #[error("region size {size:#x} is not a non-zero multiple of {page_size:#x} of at most {MAX_PAGES} pages")]
    Size { size: u64, page_size: u64 },
}

/// What conversions serialise on.
#[derive(Debug)]
struct Control {
    /// The canonical map, for queries and holds.
    extents: Extents,
    next_shard: u64,
    next_hold: u64,
}

#[derive(Debug)]
struct Inner {
    size: u64,
    page_size: u64,
    page_shift: u32,
    /// Held for the whole of a conversion and while a hold is checked.
    control: Mutex<Control>,
    /// The shards, by id; taken after `control`, before any shard's lock.
    shards: Mutex<Vec<(u64, Arc<Shard>)>>,
    /// Pins: hold id → pages. Not under `control`, so that a pin can be let
    /// go of while a conversion waits for it.
    holds: Mutex<Vec<(u64, u64, u64)>>,
}

#[derive(Debug)]
struct Shard {
    /// This shard's copy of the attribute map.
    map: Mutex<Extents>,
    /// One reference each: `first page << 32 | pages`, 0 when free.
    slots: Box<[AtomicU64]>,
    /// One past the highest slot ever claimed: conversions scan no further.
    /// Slots are claimed lowest first, so this stays near the most
    /// references the shard had in flight at once.
    high_water: AtomicUsize,
}

impl Shard {
    fn claim(&self, packed: u64) -> Option<usize> {
        for (index, slot) in self.slots.iter().enumerate() {
            // Relaxed: the claim is made under the shard's lock, which
            // orders it (and the high-water mark) before any conversion that
            // locks the shard later.
            if slot.load(Ordering::Relaxed) == 0
                && slot.compare_exchange(0, packed, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            {
                if index >= self.high_water.load(Ordering::Relaxed) {
                    self.high_water.fetch_max(index + 1, Ordering::Relaxed);
                }
                return Some(index);
            }
        }
        None
    }

    /// The slots a reference may be in.
    fn used_slots(&self) -> &[AtomicU64] {
        let high_water = self.high_water.load(Ordering::Relaxed).min(self.slots.len());
        &self.slots[..high_water]
    }
}

fn pack(first: u64, end: u64) -> u64 {
    (first << 32) | (end - first)
}

fn unpack(packed: u64) -> (u64, u64) {
    let first = packed >> 32;
    (first, first + (packed & u64::from(u32::MAX)))
}

/// One region's attribute map and references. Cheap to clone: clones share
/// the region.
#[derive(Debug, Clone)]
pub struct RegionAttributes {
    inner: Arc<Inner>,
}

impl RegionAttributes {
    /// A region of `size` bytes in pages of `page_size` (4 KiB, or the huge
    /// page size of a hugetlb region), all shared.
    pub fn new(size: u64, page_size: u64) -> Result<Self, RegionError> {
        if !page_size.is_power_of_two() {
            return Err(RegionError::PageSize(page_size));
        }
        if size == 0 || !size.is_multiple_of(page_size) || size / page_size > MAX_PAGES {
            return Err(RegionError::Size { size, page_size });
        }
        Ok(RegionAttributes {
            inner: Arc::new(Inner {
                size,
                page_size,
                page_shift: page_size.trailing_zeros(),
                control: Mutex::new(Control { extents: Extents::default(), next_shard: 0, next_hold: 0 }),
                shards: Mutex::new(Vec::new()),
                holds: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Whether `other` is this very region's map (not merely an equal one).
    pub fn is(&self, other: &RegionAttributes) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The region's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The region's page size.
    pub fn page_size(&self) -> u64 {
        self.inner.page_size
    }

    /// A reference shard for one queue worker, with room for `slots`
    /// references at once (the queue size bounds the descriptors in flight).
    pub fn shard(&self, slots: usize) -> RefShard {
        let slots = slots.max(1);
        let mut control = lock(&self.inner.control);
        let shard = Arc::new(Shard {
            map: Mutex::new(control.extents.clone()),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            high_water: AtomicUsize::new(0),
        });
        let id = control.next_shard;
        control.next_shard += 1;
        lock(&self.inner.shards).push((id, Arc::clone(&shard)));
        RefShard { region: self.clone(), id, shard }
    }

    /// Pages `[first, end)` covering bytes `[offset, offset + len)`, if they
    /// lie in the region.
    fn pages(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.checked_add(len).filter(|end| *end <= self.inner.size)?;
        let shift = self.inner.page_shift;
        Some((offset >> shift, end.div_ceil(self.inner.page_size)))
    }

    fn byte(&self, page: u64) -> u64 {
        page << self.inner.page_shift
    }

    /// Whether `[offset, offset + len)` is entirely shared.
    pub fn is_shared(&self, offset: u64, len: u64) -> bool {
        let Some((first, end)) = self.pages(offset, len) else { return false };
        lock(&self.inner.control).extents.any_overlap(first, end).is_none()
    }

    /// Every extent of the region, shared and private, in order.
    pub fn extents(&self) -> Vec<Extent> {
        let control = lock(&self.inner.control);
        let mut extents = Vec::with_capacity(control.extents.len() * 2 + 1);
        let mut at = 0;
        for (first, end, _) in control.extents.iter() {
            if first > at {
                extents.push(Extent { offset: self.byte(at), size: self.byte(first - at), private: false });
            }
            extents.push(Extent { offset: self.byte(first), size: self.byte(end - first), private: true });
            at = end;
        }
        let pages = self.inner.size >> self.inner.page_shift;
        if at < pages {
            extents.push(Extent { offset: self.byte(at), size: self.byte(pages - at), private: false });
        }
        extents
    }

    /// Applies `request` as `KVM_SET_MEMORY_ATTRIBUTES2` would: to private
    /// only if nothing references the range (waiting up to `wait` for
    /// references to go, if given); to shared unconditionally.
    pub fn set_attributes(&self, request: &SetAttributes, wait: Option<Duration>) -> Result<(), ConvertError> {
        if request.flags != 0 {
            return Err(ConvertError::Flags(request.flags));
        }
        match request.attributes {
            KVM_MEMORY_ATTRIBUTE_PRIVATE => self.to_private(request.offset, request.size, wait),
            0 => self.to_shared(request.offset, request.size),
            other => Err(ConvertError::Attributes(other)),
        }
    }

    fn check_range(&self, offset: u64, size: u64) -> Result<(u64, u64), ConvertError> {
        let page_size = self.inner.page_size;
        if size == 0 {
            return Err(ConvertError::Empty);
        }
        if !offset.is_multiple_of(page_size) || !size.is_multiple_of(page_size) {
            return Err(ConvertError::Unaligned { offset, size, page_size });
        }
        self.pages(offset, size).ok_or(ConvertError::OutOfRange { offset, size, region_size: self.inner.size })
    }

    /// Applies `edit` to the canonical map and to every shard's copy, each
    /// copy under its shard's lock, so no request sees an edit half made.
    fn publish(&self, control: &mut Control, edit: impl Fn(&mut Extents)) {
        edit(&mut control.extents);
        for (_, shard) in lock(&self.inner.shards).iter() {
            edit(&mut lock(&shard.map));
        }
    }

    /// The first page of `[first, end)` something references, and what.
    fn first_reference(&self, first: u64, end: u64) -> Option<(u64, Blocker)> {
        let mut found: Option<(u64, Blocker)> = None;
        let mut note = |page: u64, blocker: Blocker| {
            if found.is_none_or(|(earliest, _)| page < earliest) {
                found = Some((page, blocker));
            }
        };
        // The data path never takes this lock: scanning under it costs it nothing.
        for (_, shard) in lock(&self.inner.shards).iter() {
            for slot in shard.used_slots() {
                // Acquire: pairs with the release that frees the slot, so the
                // device's accesses through a reference seen gone happened
                // before whatever the caller does once conversion returns.
                let packed = slot.load(Ordering::Acquire);
                if packed == 0 {
                    continue;
                }
                let (ref_first, ref_end) = unpack(packed);
                if ref_first < end && ref_end > first {
                    note(ref_first.max(first), Blocker::Reference);
                }
            }
        }
        for &(_, hold_first, hold_end) in lock(&self.inner.holds).iter() {
            if hold_first < end && hold_end > first {
                note(hold_first.max(first), Blocker::Pin);
            }
        }
        found
    }

    /// Makes `[offset, offset + size)` private, if no reference and no pin
    /// covers it; else fails with [`ConvertError::Busy`] and the first
    /// offending offset, leaving the attributes as they were. With `wait`,
    /// new references to the range wait meanwhile, and the conversion waits
    /// up to `wait` for the ones in flight and the pins to go.
    pub fn to_private(&self, offset: u64, size: u64, wait: Option<Duration>) -> Result<(), ConvertError> {
        let (first, end) = self.check_range(offset, size)?;
        let mut control = lock(&self.inner.control);
        let before = control.extents.within(first, end);
        // Flip first, then look at the references.
        self.publish(&mut control, |map| map.set(first, end, Some(State::Converting)));
        let mut deadline = Deadline::new(wait);
        loop {
            match self.first_reference(first, end) {
                None => {
                    self.publish(&mut control, |map| map.set(first, end, Some(State::Private)));
                    return Ok(());
                }
                Some((page, blocker)) if deadline.expired() => {
                    // Undo the flip: the range is as it was, and the
                    // requests that waited on it go ahead.
                    self.publish(&mut control, |map| {
                        map.set(first, end, None);
                        for &(from, to, state) in &before {
                            map.set(from, to, Some(state));
                        }
                    });
                    return Err(ConvertError::Busy { error_offset: self.byte(page), blocker });
                }
                Some(_) => deadline.pause(),
            }
        }
    }

    /// Makes `[offset, offset + size)` shared. Unchecked, as in the kernel:
    /// nothing can reference private memory. Its content is whatever the
    /// caller left (gmemd discards it when it goes private, so it reads 0).
    pub fn to_shared(&self, offset: u64, size: u64) -> Result<(), ConvertError> {
        let (first, end) = self.check_range(offset, size)?;
        let mut control = lock(&self.inner.control);
        self.publish(&mut control, |map| map.set(first, end, None));
        Ok(())
    }

    /// A long-lived reference to `[offset, offset + len)`, for a pin: the
    /// range must be shared, and no conversion makes it private while the
    /// hold lasts.
    pub fn hold(&self, offset: u64, len: u64) -> Result<RangeHold, Denied> {
        let (first, end) = self.pages(offset, len).ok_or(Denied::OutOfRange { offset, len })?;
        // Under the conversion lock, the canonical map cannot change.
        let mut control = lock(&self.inner.control);
        if let Some((page, _)) = control.extents.first_overlap(first, end) {
            return Err(Denied::Private { offset: self.byte(page).max(offset) });
        }
        let id = control.next_hold;
        control.next_hold += 1;
        lock(&self.inner.holds).push((id, first, end));
        Ok(RangeHold { region: self.clone(), id, offset, len })
    }
}

/// One queue worker's references to a region. See the module documentation.
#[derive(Debug)]
pub struct RefShard {
    region: RegionAttributes,
    id: u64,
    shard: Arc<Shard>,
}

impl RefShard {
    /// The region.
    pub fn region(&self) -> &RegionAttributes {
        &self.region
    }

    /// A reference to `[offset, offset + len)` if it is entirely shared:
    /// the device may touch the range until the reference is dropped.
    pub fn acquire(&self, offset: u64, len: u64) -> Result<RangeRef, Denied> {
        let (first, end) = self.region.pages(offset, len).ok_or(Denied::OutOfRange { offset, len })?;
        if first == end {
            return Ok(RangeRef { shard: Arc::clone(&self.shard), slot: None });
        }
        let map = lock(&self.shard.map);
        // Take the reference, then check the attribute.
        let slot = self.shard.claim(pack(first, end)).ok_or(Denied::Full(self.shard.slots.len()))?;
        let reference = RangeRef { shard: Arc::clone(&self.shard), slot: Some(slot) };
        match map.any_overlap(first, end) {
            None => Ok(reference),
            Some(State::Converting) => Err(Denied::Converting),
            Some(State::Private) => {
                let page = map.first_overlap(first, end).map_or(first, |(page, _)| page);
                Err(Denied::Private { offset: self.region.byte(page).max(offset) })
            }
        }
    }

    /// Like [`RefShard::acquire`], but waits up to `wait` while the range is
    /// being converted, for the conversion to end one way or the other.
    pub fn acquire_wait(&self, offset: u64, len: u64, wait: Duration) -> Result<RangeRef, Denied> {
        let mut deadline = Deadline::new(Some(wait));
        loop {
            match self.acquire(offset, len) {
                Err(Denied::Converting) if !deadline.expired() => deadline.pause(),
                other => return other,
            }
        }
    }
}

impl Drop for RefShard {
    fn drop(&mut self) {
        lock(&self.region.inner.shards).retain(|(id, _)| *id != self.id);
    }
}

/// A reference: while it lives, no conversion makes its range private. It
/// owns a share of its shard, so a request in flight can keep it as long
/// as the request lasts.
#[derive(Debug)]
#[must_use = "the reference is let go of when dropped"]
pub struct RangeRef {
    shard: Arc<Shard>,
    slot: Option<usize>,
}

impl Drop for RangeRef {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // Release: everything done through the reference happens before
            // a conversion that sees the slot free.
            self.shard.slots[slot].store(0, Ordering::Release);
        }
    }
}

/// A long-lived reference for a pin; see [`RegionAttributes::hold`].
#[derive(Debug)]
#[must_use = "the hold is let go of when dropped"]
pub struct RangeHold {
    region: RegionAttributes,
    id: u64,
    offset: u64,
    len: u64,
}

impl RangeHold {
    /// Start of the held range in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the held range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the hold covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RangeHold {
    fn drop(&mut self) {
        lock(&self.region.inner.holds).retain(|(id, _, _)| *id != self.id);
    }
}
