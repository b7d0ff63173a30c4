//! The reference protocol, model-checked: loom runs every interleaving of a
//! device access and a conversion (and every memory-ordering outcome loom
//! models) and fails if the device's write into the range and the
//! converter's write after a successful conversion are not ordered by
//! happens-before, or if a failed conversion leaves the range unshared.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p gmem-attributes --test loom --release
//! ```
#![cfg(loom)]

use std::time::Duration;

use gmem_attributes::RegionAttributes;
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

const PAGE: u64 = 4096;
const DEVICE: u64 = 1;
const CANARY: u64 = 0xdead_beef;

/// Guest memory of one page, as loom sees it: every access is checked for
/// a happens-before order with every other.
#[derive(Debug)]
struct Memory(UnsafeCell<u64>);

// SAFETY: loom's UnsafeCell tracks every access and fails the model on any
// two that are not ordered; that is the property under test.
unsafe impl Sync for Memory {}

impl Memory {
    fn write(&self, value: u64) {
        // SAFETY: loom reports this access if it can race with another.
        self.0.with_mut(|p| unsafe { *p = value });
    }

    fn read(&self) -> u64 {
        // SAFETY: as for `write`.
        self.0.with(|p| unsafe { *p })
    }
}

/// The converter: after a successful conversion it discards the range
/// (writes the canary); after a failed one, the range must be shared.
fn convert(region: &RegionAttributes, memory: &Memory, wait: Option<Duration>) -> bool {
    let converted = region.to_private(0, PAGE, wait).is_ok();
    if converted {
        memory.write(CANARY);
    } else {
        assert!(region.is_shared(0, 2 * PAGE), "a failed conversion was not rolled back");
    }
    converted
}

#[test]
fn a_device_write_never_follows_a_conversion() {
    loom::model(|| {
        let region = RegionAttributes::new(2 * PAGE, PAGE).expect("region");
        let shard = region.shard(1);
        let memory = Arc::new(Memory(UnsafeCell::new(0)));
        let device = {
            let memory = Arc::clone(&memory);
            thread::spawn(move || {
                if let Ok(reference) = shard.acquire(100, 200) {
                    memory.write(DEVICE);
                    drop(reference);
                }
            })
        };
        let converted = convert(&region, &memory, None);
        device.join().expect("device");
        if converted {
            assert_eq!(memory.read(), CANARY);
        }
    });
}

#[test]
fn waiting_on_both_sides() {
    loom::model(|| {
        let region = RegionAttributes::new(2 * PAGE, PAGE).expect("region");
        let shard = region.shard(1);
        let memory = Arc::new(Memory(UnsafeCell::new(0)));
        let device = {
            let memory = Arc::clone(&memory);
            thread::spawn(move || {
                if let Ok(reference) = shard.acquire_wait(0, PAGE, Duration::from_millis(1)) {
                    memory.write(DEVICE);
                    drop(reference);
                }
            })
        };
        let converted = convert(&region, &memory, Some(Duration::from_millis(1)));
        device.join().expect("device");
        if converted {
            assert_eq!(memory.read(), CANARY);
        }
    });
}

#[test]
fn a_pin_holds_off_conversion() {
    loom::model(|| {
        let region = RegionAttributes::new(2 * PAGE, PAGE).expect("region");
        let memory = Arc::new(Memory(UnsafeCell::new(0)));
        let pinner = {
            let (region, memory) = (region.clone(), Arc::clone(&memory));
            thread::spawn(move || {
                if let Ok(hold) = region.hold(0, PAGE) {
                    memory.write(DEVICE);
                    drop(hold);
                }
            })
        };
        let converted = convert(&region, &memory, None);
        pinner.join().expect("pinner");
        if converted {
            assert_eq!(memory.read(), CANARY);
        }
    });
}
