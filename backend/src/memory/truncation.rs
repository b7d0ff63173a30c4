//! Surviving a guest-RAM file that is truncated under gmemd.
//!
//! Memfd regions are sealed against shrinking, and shared memory from a
//! frontend is sealed before it is mapped, so neither can shrink. A `path=`
//! region is a tmpfs or hugetlbfs file, which cannot be sealed: anyone who
//! may write it (gmemd's user, root) can truncate it, and the next access
//! gmemd makes through its mapping would end the daemon with SIGBUS. So
//! such mappings are registered here, and a SIGBUS handler replaces the
//! page that is gone with a private zero page and lets the access go on:
//! the data was lost with the truncation anyway, and gmemd — with every
//! other guest it serves — stays up. Each replacement is counted, and the
//! data path reports it.
//!
//! A fault outside every registered range is not ours: the handler puts
//! back the handler it replaced (the Rust runtime's) and returns, so the
//! access faults again and is handled as it would have been.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Registered ranges at most: one per `path=` region.
const SLOTS: usize = 64;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    page: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { start: AtomicUsize::new(0), len: AtomicUsize::new(0), page: AtomicUsize::new(0) };
static SLOTS_IN_USE: [Slot; SLOTS] = [EMPTY; SLOTS];
static REPLACED: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
/// The handler this one replaced.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered mapping; dropping it unregisters the range.
#[derive(Debug)]
pub struct TruncationGuard {
    slot: usize,
}

impl Drop for TruncationGuard {
    fn drop(&mut self) {
        let slot = &SLOTS_IN_USE[self.slot];
        slot.len.store(0, Ordering::Release);
        slot.start.store(0, Ordering::Release);
    }
}

/// Pages of guest RAM replaced because their file was truncated, since start.
pub fn pages_replaced() -> u64 {
    REPLACED.load(Ordering::Relaxed)
}

/// Registers `[start, start + len)`, mapped from a file that may be
/// truncated, with pages of `page` bytes; `None` when every slot is taken
/// (the mapping is then unprotected, as before).
pub fn protect(start: usize, len: usize, page: usize) -> Option<TruncationGuard> {
    INSTALL.call_once(install);
    for (index, slot) in SLOTS_IN_USE.iter().enumerate() {
        if slot.start.compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            slot.page.store(page, Ordering::Release);
            slot.len.store(len, Ordering::Release);
            return Some(TruncationGuard { slot: index });
        }
    }
    None
}

fn install() {
    // SAFETY: a zeroed sigaction is valid; the handler only reads atomics
    // and calls mmap and sigaction, which are async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
            log::warn!(
                "cannot handle SIGBUS: {}; a truncated path= region would end gmemd",
                std::io::Error::last_os_error()
            );
            return;
        }
        let _ = PREVIOUS.set(previous);
    }
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SIGBUS delivered with
    // SA_SIGINFO; si_addr is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS_IN_USE {
        let (start, len, page) =
            (slot.start.load(Ordering::Acquire), slot.len.load(Ordering::Acquire), slot.page.load(Ordering::Acquire));
        if len == 0 || addr < start || addr - start >= len || page == 0 {
            continue;
        }
        let base = addr & !(page - 1);
        // SAFETY: [base, base + page) lies in a registered guest-RAM
        // mapping whose backing page is gone; a private anonymous page takes
        // its place, so the interrupted access reads or writes that instead.
        // Nothing else maps these addresses.
        let mapped = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            REPLACED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        break;
    }
    // Not ours: the previous handler (or the default action, if it was not
    // recorded yet) takes the fault when it happens again.
    // SAFETY: sigaction with a valid action, or signal with SIG_DFL.
    unsafe {
        match PREVIOUS.get() {
            Some(previous) => libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()),
            None => usize::from(libc::signal(libc::SIGBUS, libc::SIG_DFL) == libc::SIG_ERR) as libc::c_int,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    #[test]
    fn a_truncated_file_reads_as_zeros_instead_of_killing_the_process() {
        let mut file = tempfile::tempfile().expect("tmp");
        file.set_len(4 * 4096).expect("size");
        std::io::Write::write_all(&mut file, &[7u8; 4 * 4096]).expect("fill");
        let mapping = vm_memory::mmap::MmapRegion::<()>::from_file(
            vm_memory::FileOffset::new(file.try_clone().expect("dup"), 0),
            4 * 4096,
        )
        .expect("map");
        let _guard = protect(mapping.as_ptr() as usize, mapping.size(), 4096).expect("slot");
        let read = |offset: usize| {
            // SAFETY: within the live mapping.
            unsafe { std::ptr::read_volatile(mapping.as_ptr().add(offset)) }
        };
        assert_eq!(read(3 * 4096), 7);
        let before = pages_replaced();
        file.set_len(4096).expect("truncate under the mapping");
        assert_eq!(read(3 * 4096), 0, "the lost page reads as zeros");
        assert_eq!(read(0), 7, "the page still in the file is untouched");
        assert!(pages_replaced() > before);
        file.rewind().expect("rewind");
        let mut first = [0u8; 1];
        file.read_exact(&mut first).expect("read");
        assert_eq!(first, [7]);
    }
}
