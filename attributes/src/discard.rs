//! Discarding the content of a range that became private.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Frees `[offset, offset + len)` of `file` (a memfd, tmpfs or hugetlbfs
/// file): `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`. Every
/// mapping of the range reads zero afterwards, in gmemd and in QEMU. On
/// hugetlbfs the range must be huge-page aligned.
pub fn punch_hole(file: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a borrowed, open fd with integer arguments; no
    // memory is passed.
    let rc = unsafe {
        libc::fallocate(file.as_fd().as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
