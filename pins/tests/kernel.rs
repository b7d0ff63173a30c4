//! The ledger against the running kernel: an mlocked memfd range and io_uring
//! fixed buffers over the same memfd, compared with `VmLck`, `VmPin` and the
//! ring's fdinfo. One test, because those figures are the whole process's.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use gmem_pins::kernel::{Observed, RingFdinfo, Verdict};
use gmem_pins::{Limit, Owner, PinLedger, PinRequest, RingId};

const MIB: usize = 1 << 20;

struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are a mapping this test made and no longer uses.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn memfd_mapping(len: usize) -> (OwnedFd, Mapping) {
    // SAFETY: a NUL-terminated name; memfd_create keeps no pointer.
    let fd = unsafe { libc::memfd_create(c"gmem-pins-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on an fd this test owns.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
    // SAFETY: a new shared mapping of the memfd; nothing else uses that address range.
    let addr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    (fd, Mapping { addr, len })
}

#[test]
fn ledger_reconciles_with_vmlck_vmpin_and_fdinfo() {
    let (_fd, ram) = memfd_mapping(8 * MIB);
    let vm = Owner::new("vm");
    let mut ledger = PinLedger::new();
    ledger.set_user_limit(0, Limit::Unlimited);
    ledger.set_owner_limit(vm.clone(), 0, Limit::Unlimited).expect("owner");

    // SAFETY: the first 4 MiB of the test's own mapping.
    let rc = unsafe { libc::mlock(ram.addr, 4 * MIB) };
    if rc != 0 {
        // Without CAP_IPC_LOCK and with a small RLIMIT_MEMLOCK there is nothing to measure.
        eprintln!("mlock refused ({}); skipping", std::io::Error::last_os_error());
        return;
    }
    let lock = ledger.pin(PinRequest::mlock(vm.clone(), "ram", 0, 4 * MIB as u64)).expect("pin");

    let ring = io_uring::IoUring::new(4).expect("io_uring");
    let buffers = [
        // Both ranges lie inside the 8 MiB mapping.
        libc::iovec { iov_base: ram.addr.cast::<u8>().wrapping_add(4 * MIB).cast(), iov_len: 2 * MIB },
        libc::iovec { iov_base: ram.addr.cast::<u8>().wrapping_add(6 * MIB).cast(), iov_len: MIB },
    ];
    // SAFETY: the buffers stay mapped until the ring is dropped (`ram`
    // outlives `ring`, declared before it).
    unsafe { ring.submitter().register_buffers(&buffers) }.expect("register buffers");
    let fixed = [
        ledger
            .pin(PinRequest::fixed_buffer(vm.clone(), RingId(1), "ram", 4 * MIB as u64, 2 * MIB as u64))
            .expect("pin"),
        ledger.pin(PinRequest::fixed_buffer(vm.clone(), RingId(1), "ram", 6 * MIB as u64, MIB as u64)).expect("pin"),
    ];

    let info = RingFdinfo::read_self(ring.as_raw_fd()).expect("fdinfo");
    assert_eq!(info.table_size, Some(2));
    assert!(info.complete);
    assert_eq!(info.buffers[0].addr, buffers[0].iov_base as u64);
    assert_eq!(info.buffers[1].len, MIB as u64);

    let observed = Observed::read_self([(RingId(1), ring.as_raw_fd())]).expect("observe");
    assert_eq!(observed.status.vm_lck, Some(4 * MIB as u64));
    assert_eq!(observed.status.vm_pin, Some(3 * MIB as u64));
    let reconciliation = ledger.reconcile(&observed);
    assert_eq!(reconciliation.mismatches().count(), 0, "{reconciliation:#?}");
    assert!(reconciliation.checks.iter().all(|check| check.verdict == Verdict::Match));

    // The kernel lets go of the buffers, the ledger is not told: flagged.
    ring.submitter().unregister_buffers().expect("unregister");
    let observed = Observed::read_self([(RingId(1), ring.as_raw_fd())]).expect("observe");
    let reconciliation = ledger.reconcile(&observed);
    let flagged: Vec<&str> = reconciliation.mismatches().map(|check| check.what.as_str()).collect();
    assert_eq!(flagged, ["VmPin", "ring 1 buffers", "ring 1 bytes"], "{reconciliation:#?}");
    for receipt in fixed {
        ledger.unpin(receipt).expect("unpin");
    }

    // A sparse table lists its empty slots as `<none>`.
    ring.submitter().register_buffers_sparse(3).expect("sparse");
    let info = RingFdinfo::read_self(ring.as_raw_fd()).expect("fdinfo");
    assert_eq!((info.table_size, info.complete, info.buffers.len()), (Some(3), true, 0));

    // SAFETY: the range locked above.
    assert_eq!(unsafe { libc::munlock(ram.addr, 4 * MIB) }, 0);
    ledger.unpin(lock).expect("unpin");
    let observed = Observed::read_self([(RingId(1), ring.as_raw_fd())]).expect("observe");
    assert_eq!(ledger.reconcile(&observed).mismatches().count(), 0);
}
