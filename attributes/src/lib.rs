//! Private/shared attributes of guest RAM, and safe conversion between them.
//!
//! Each region gets a [`RegionAttributes`]: an attribute map that costs one
//! entry per extent (all shared at start), the references the device data
//! path takes on ranges it is about to touch ([`RefShard`], [`RangeRef`]),
//! long-lived references for pins ([`RangeHold`], [`pin_range`]), and
//! conversion with the contract of the kernel's `KVM_SET_MEMORY_ATTRIBUTES2`
//! on a guest_memfd: shared→private only when nothing references the range,
//! else `EAGAIN` with the first offending offset ([`ConvertError::Busy`]);
//! private→shared unchecked.
//!
//! The protocol that makes the check safe is described in [`region`]'s
//! documentation, model-checked with loom (`tests/loom.rs`) and stressed in
//! `tests/stress.rs`. See `docs/pins-and-conversion.md`.

mod discard;
mod extents;
pub mod guest_memfd;
mod pinned;
pub mod region;
mod sync;

pub use discard::punch_hole;
pub use pinned::{pin_range, PinRangeError, PinnedRange};
pub use region::{
    Blocker, ConvertError, Denied, Extent, RangeHold, RangeRef, RefShard, RegionAttributes, RegionError, SetAttributes,
    DEFAULT_SHARD_SLOTS, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
