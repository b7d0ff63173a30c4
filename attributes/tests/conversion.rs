//! The conversion contract, one case at a time.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use gmem_attributes::{
    pin_range, punch_hole, Blocker, ConvertError, Denied, Extent, PinRangeError, RegionAttributes, SetAttributes,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use gmem_pins::{Limit, Owner, PinLedger, PinRequest, SharedLedger};

const PAGE: u64 = 4096;

fn region(pages: u64) -> RegionAttributes {
    RegionAttributes::new(pages * PAGE, PAGE).expect("region")
}

#[test]
fn all_shared_at_start_then_extents() {
    let region = region(16);
    assert!(region.is_shared(0, 16 * PAGE));
    assert_eq!(region.extents(), [Extent { offset: 0, size: 16 * PAGE, private: false }]);
    region.to_private(4 * PAGE, 2 * PAGE, None).expect("private");
    region.to_private(6 * PAGE, PAGE, None).expect("private");
    assert!(!region.is_shared(0, 5 * PAGE));
    assert!(region.is_shared(7 * PAGE, PAGE));
    assert_eq!(
        region.extents(),
        [
            Extent { offset: 0, size: 4 * PAGE, private: false },
            Extent { offset: 4 * PAGE, size: 3 * PAGE, private: true },
            Extent { offset: 7 * PAGE, size: 9 * PAGE, private: false },
        ]
    );
    region.to_shared(5 * PAGE, PAGE).expect("shared");
    assert_eq!(region.extents().iter().filter(|e| e.private).count(), 2);
}

#[test]
fn requests_are_checked_like_the_kernel_does() {
    let region = region(16);
    let private = |offset, size| SetAttributes { offset, size, attributes: KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0 };
    let einval = |result: Result<(), ConvertError>| result.expect_err("EINVAL").errno();
    assert_eq!(einval(region.set_attributes(&private(100, PAGE), None)), libc::EINVAL);
    assert_eq!(einval(region.set_attributes(&private(0, 0), None)), libc::EINVAL);
    assert_eq!(einval(region.set_attributes(&private(15 * PAGE, 2 * PAGE), None)), libc::EINVAL);
    assert_eq!(einval(region.set_attributes(&private(u64::MAX - PAGE + 1, PAGE), None)), libc::EINVAL);
    assert_eq!(einval(region.set_attributes(&SetAttributes { attributes: 1, ..private(0, PAGE) }, None)), libc::EINVAL);
    assert_eq!(einval(region.set_attributes(&SetAttributes { flags: 1, ..private(0, PAGE) }, None)), libc::EINVAL);
    region.set_attributes(&private(0, PAGE), None).expect("private");
    region.set_attributes(&SetAttributes { attributes: 0, ..private(0, PAGE) }, None).expect("shared");
    assert!(region.is_shared(0, 16 * PAGE));
}

#[test]
fn a_reference_fails_the_conversion_with_its_offset_and_is_not_starved() {
    let region = region(16);
    let shard = region.shard(8);
    let reference = shard.acquire(5 * PAGE + 100, 3000).expect("shared");
    let error = region.to_private(0, 8 * PAGE, None).expect_err("busy");
    assert_eq!(error, ConvertError::Busy { error_offset: 5 * PAGE, blocker: Blocker::Reference });
    assert_eq!(error.errno(), libc::EAGAIN);
    // Rolled back: everything is shared again, other requests go ahead.
    assert!(region.is_shared(0, 16 * PAGE));
    drop(shard.acquire(0, PAGE).expect("not starved"));
    drop(reference);
    region.to_private(0, 8 * PAGE, None).expect("free now");
    assert_eq!(shard.acquire(2 * PAGE, 10 * PAGE).err(), Some(Denied::Private { offset: 2 * PAGE }));
    // Private to shared is unchecked.
    region.to_shared(0, 8 * PAGE).expect("shared");
}

#[test]
fn the_rollback_keeps_what_was_private_before() {
    let region = region(16);
    let shard = region.shard(8);
    region.to_private(2 * PAGE, PAGE, None).expect("private");
    let reference = shard.acquire(6 * PAGE, PAGE).expect("shared");
    assert!(region.to_private(0, 8 * PAGE, None).is_err());
    assert!(!region.is_shared(2 * PAGE, PAGE), "a rolled-back conversion must not share what was private");
    assert!(region.is_shared(3 * PAGE, 5 * PAGE));
    drop(reference);
}

#[test]
fn the_first_offending_offset_is_the_lowest() {
    let region = region(32);
    let (a, b) = (region.shard(4), region.shard(4));
    let _late = a.acquire(20 * PAGE, PAGE).expect("shared");
    let _early = b.acquire(9 * PAGE, 2 * PAGE).expect("shared");
    let _before = b.acquire(0, 2 * PAGE).expect("shared");
    let error = region.to_private(8 * PAGE, 16 * PAGE, None).expect_err("busy");
    assert_eq!(error, ConvertError::Busy { error_offset: 9 * PAGE, blocker: Blocker::Reference });
    // A reference that starts before the range reports the range's start.
    let error = region.to_private(PAGE, 2 * PAGE, None).expect_err("busy");
    assert_eq!(error, ConvertError::Busy { error_offset: PAGE, blocker: Blocker::Reference });
}

#[test]
fn waiting_quiesces_new_references_and_waits_for_old_ones() {
    let region = region(16);
    let shard = std::sync::Arc::new(region.shard(8));
    let reference_taken = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        let shard2 = std::sync::Arc::clone(&shard);
        let reference_taken = &reference_taken;
        scope.spawn(move || {
            let reference = shard2.acquire(3 * PAGE, PAGE).expect("shared");
            reference_taken.wait();
            std::thread::sleep(Duration::from_millis(30));
            drop(reference);
        });
        reference_taken.wait();
        let start = Instant::now();
        region.to_private(0, 4 * PAGE, Some(Duration::from_secs(5))).expect("the reference went within the wait");
        assert!(start.elapsed() >= Duration::from_millis(20));
    });
    // A request that meets a conversion in progress waits for its outcome.
    region.to_shared(0, 4 * PAGE).expect("shared");
    let reference = shard.acquire(PAGE, PAGE).expect("shared");
    std::thread::scope(|scope| {
        let converter = scope.spawn(|| region.to_private(0, 4 * PAGE, Some(Duration::from_millis(50))));
        std::thread::sleep(Duration::from_millis(10));
        let shard = std::sync::Arc::clone(&shard);
        let waiter = scope.spawn(move || shard.acquire_wait(2 * PAGE, PAGE, Duration::from_secs(5)).map(drop));
        let converted = converter.join().expect("converter");
        assert!(matches!(converted, Err(ConvertError::Busy { error_offset, .. }) if error_offset == PAGE));
        assert_eq!(waiter.join().expect("waiter"), Ok(()), "the rollback let the waiting request through");
    });
    drop(reference);
}

#[test]
fn a_pin_is_a_long_lived_reference() {
    let region = region(64);
    let mut ledger = PinLedger::new();
    ledger.set_user_limit(0, Limit::Unlimited);
    ledger.set_owner_limit(Owner::new("vm"), 0, Limit::Bytes(16 * PAGE)).expect("owner");
    let ledger = SharedLedger::new(ledger);
    let buffer = gmem_pins::RingId(1);
    let pinned =
        pin_range(&region, &ledger, PinRequest::fixed_buffer(Owner::new("vm"), buffer, "ram", 8 * PAGE, 8 * PAGE))
            .expect("pin");
    let error = region.to_private(0, 32 * PAGE, Some(Duration::from_millis(5))).expect_err("pinned");
    assert_eq!(error, ConvertError::Busy { error_offset: 8 * PAGE, blocker: Blocker::Pin });
    // Over budget: nothing stays held.
    let over = pin_range(&region, &ledger, PinRequest::mlock(Owner::new("vm"), "ram", 32 * PAGE, 16 * PAGE));
    assert!(matches!(over, Err(PinRangeError::Pin(_))));
    region.to_private(32 * PAGE, 16 * PAGE, None).expect("the refused pin held nothing");
    // A private range cannot be pinned.
    let refused = pin_range(&region, &ledger, PinRequest::mlock(Owner::new("vm"), "ram", 40 * PAGE, PAGE));
    assert!(matches!(refused, Err(PinRangeError::Denied(Denied::Private { offset })) if offset == 40 * PAGE));
    drop(pinned);
    assert_eq!(ledger.lock().owner_usage(&Owner::new("vm")).map(|u| u.budgeted()), Some(0));
    region.to_private(0, 32 * PAGE, None).expect("unpinned");
}

#[test]
fn a_punched_range_reads_zero() {
    // SAFETY: a NUL-terminated name; memfd_create keeps no pointer.
    let fd = unsafe { libc::memfd_create(c"gmem-attributes-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    use std::os::unix::fs::FileExt;
    file.write_all_at(&vec![0xa5; 16 * PAGE as usize], 0).expect("write");
    let region = region(16);
    region.to_private(4 * PAGE, 8 * PAGE, None).expect("private");
    punch_hole(&file, 4 * PAGE, 8 * PAGE).expect("punch");
    let mut content = vec![0u8; 16 * PAGE as usize];
    file.read_exact_at(&mut content, 0).expect("read");
    assert!(content[..4 * PAGE as usize].iter().all(|b| *b == 0xa5));
    assert!(content[4 * PAGE as usize..12 * PAGE as usize].iter().all(|b| *b == 0));
    assert!(content[12 * PAGE as usize..].iter().all(|b| *b == 0xa5));
    assert_eq!(file.metadata().expect("stat").len(), 16 * PAGE, "the size is kept");
    // SAFETY: fstat into a zeroed stat buffer of the right type.
    let blocks = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(file.as_raw_fd(), &mut stat), 0);
        stat.st_blocks
    };
    assert_eq!(blocks * 512, 8 * PAGE as i64, "the punched pages are freed");
}
