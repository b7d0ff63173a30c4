//! `Userfault`: the few userfaultfd operations gmemd needs, straight from
//! the kernel's uapi.
//!
//! gmemd only creates the fd, registers its guest-RAM mapping for
//! missing-page faults and unregisters it; QEMU reads the fault messages
//! and wakes gmemd's threads once the page is in place (vhost-user postcopy).
//! The fd is opened for kernel-mode faults too (no UFFD_USER_MODE_ONLY):
//! the data path moves guest data with preadv/pwritev, whose faults happen
//! in the kernel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// UFFD_FEATURE_MISSING_SHMEM: missing-page faults on shmem (memfd) mappings.
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// UFFD_FEATURE_MISSING_HUGETLBFS: the same for hugetlbfs mappings.
const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `1 << _UFFDIO_WAKE` in a registered range's `ioctls`: QEMU wakes our
/// faulting threads with UFFDIO_WAKE on our fd, so the range must allow it.
const UFFDIO_WAKE_BIT: u64 = 1 << 2;

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// Errors creating or using the userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UserfaultError {
    /// Neither the syscall nor /dev/userfaultfd was allowed.
    #[error(
        "cannot create a userfaultfd ({syscall}; /dev/userfaultfd: {device}): postcopy needs gmemd to run as root, \
         with CAP_SYS_PTRACE, with read-write access to /dev/userfaultfd, or with vm.unprivileged_userfaultfd=1"
    )]
    Denied { syscall: io::Error, device: io::Error },
    /// UFFDIO_API refused the handshake or lacks a needed feature.
    #[error("userfaultfd API handshake: {0}")]
    Api(String),
    /// UFFDIO_REGISTER failed.
    #[error("registering {len:#x} bytes at {addr:#x} for missing-page faults: {source}")]
    Register { addr: u64, len: u64, source: io::Error },
    /// UFFDIO_UNREGISTER failed.
    #[error("unregistering {len:#x} bytes at {addr:#x}: {source}")]
    Unregister { addr: u64, len: u64, source: io::Error },
}

/// A userfaultfd, handshaken.
#[derive(Debug)]
pub struct Userfault {
    file: File,
}

impl Userfault {
    /// Opens a userfaultfd (close-on-exec, non-blocking: QEMU polls it) and
    /// agrees on the API; `hugetlb` asks for hugetlbfs support as well as shmem.
    pub fn open(hugetlb: bool) -> Result<Self, UserfaultError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes only flags and returns a new
        // fd or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let file = if fd >= 0 {
            // The kernel returns an int fd; it fits.
            // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
            unsafe { File::from_raw_fd(fd as i32) }
        } else {
            let syscall = io::Error::last_os_error();
            Self::open_device(flags).map_err(|device| UserfaultError::Denied { syscall, device })?
        };
        let uffd = Userfault { file };
        uffd.handshake(hugetlb)?;
        Ok(uffd)
    }

    /// /dev/userfaultfd (Linux 6.1+), which a deployment can grant by file mode.
    fn open_device(flags: i32) -> io::Result<File> {
        let device = OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a
        // new fd or -1.
        let fd = unsafe { libc::ioctl(device.as_raw_fd(), USERFAULTFD_IOC_NEW(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn handshake(&self, hugetlb: bool) -> Result<(), UserfaultError> {
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API reads and writes exactly one uffdio_api, which
        // `api` is, with the kernel's layout.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_API(), &mut api) };
        if ret < 0 {
            return Err(UserfaultError::Api(io::Error::last_os_error().to_string()));
        }
        let mut needed = UFFD_FEATURE_MISSING_SHMEM;
        if hugetlb {
            needed |= UFFD_FEATURE_MISSING_HUGETLBFS;
        }
        if api.features & needed != needed {
            return Err(UserfaultError::Api(format!(
                "the kernel lacks missing-page faults on shared memory (features {:#x}, need {needed:#x})",
                api.features
            )));
        }
        Ok(())
    }

    /// A second fd for the same userfaultfd, to hand to QEMU.
    pub fn share(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Registers `[addr, addr + len)` of gmemd's own address space for
    /// missing-page faults.
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UserfaultError> {
        let mut register =
            UffdioRegister { range: UffdioRange { start: addr, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register. It
        // changes how faults in the range are handled, not the memory: the
        // range is guest RAM that gmemd keeps mapped while registered.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut register) };
        if ret < 0 {
            return Err(UserfaultError::Register { addr, len, source: io::Error::last_os_error() });
        }
        if register.ioctls & UFFDIO_WAKE_BIT == 0 {
            return Err(UserfaultError::Register { addr, len, source: io::Error::other("the range cannot be woken") });
        }
        Ok(())
    }

    /// Drops the registration of `[addr, addr + len)`.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UserfaultError> {
        let range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range and changes only
        // fault handling of the range.
        let ret = unsafe { ioctl_with_ref(&self.file, UFFDIO_UNREGISTER(), &range) };
        if ret < 0 {
            return Err(UserfaultError::Unregister { addr, len, source: io::Error::last_os_error() });
        }
        Ok(())
    }
}
