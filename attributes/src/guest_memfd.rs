//! What the running kernel offers of guest_memfd, found by asking it.
//!
//! The attribute map in [`crate::region`] keeps the contract of the kernel's
//! in-place conversion (`KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd) so
//! that a guest_memfd backing can take its place. Whether the kernel has that
//! ioctl cannot be read off a capability number: the number of
//! `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` changed in every revision of the
//! series (245, 246, 248, 249, 250). So the probe creates a throwaway VM and
//! a small guest_memfd and calls the ioctl itself on a zero-sized range:
//! a kernel without it answers `ENOTTY`, one with it accepts the call or
//! refuses the range. The merged capabilities (`KVM_CAP_GUEST_MEMFD` 234,
//! `KVM_CAP_GUEST_MEMFD_FLAGS` 244) are stable uapi and are asked directly.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// The kernel's guest_memfd support, as probed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemfdSupport {
    /// KVM can create guest_memfd files (`KVM_CAP_GUEST_MEMFD`).
    pub guest_memfd: bool,
    /// A guest_memfd can be mmapped by the host (`GUEST_MEMFD_FLAG_MMAP`).
    pub mmap: bool,
    /// A guest_memfd can start out all shared (`GUEST_MEMFD_FLAG_INIT_SHARED`).
    pub init_shared: bool,
    /// `KVM_SET_MEMORY_ATTRIBUTES2` works on a guest_memfd: conversion in
    /// place, with the EAGAIN and `error_offset` contract gmemd follows.
    pub in_place_conversion: bool,
    /// What the probe found or why it stopped, in words.
    pub detail: String,
}

const KVMIO: u64 = 0xAE;
const KVM_CAP_GUEST_MEMFD: libc::c_ulong = 234;
const KVM_CAP_GUEST_MEMFD_FLAGS: libc::c_ulong = 244;
const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// `_IOC(dir, KVMIO, nr, size)` as the kernel's uapi builds it.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_READ_WRITE: u64 = 3;
const KVM_CREATE_VM: u64 = kvm_ioc(IOC_NONE, 0x01, 0);
const KVM_CHECK_EXTENSION: u64 = kvm_ioc(IOC_NONE, 0x03, 0);
const KVM_CREATE_GUEST_MEMFD: u64 = kvm_ioc(IOC_READ_WRITE, 0xd4, std::mem::size_of::<CreateGuestMemfd>());
const KVM_SET_MEMORY_ATTRIBUTES2: u64 = kvm_ioc(IOC_READ_WRITE, 0xd2, std::mem::size_of::<MemoryAttributes2>());

/// `struct kvm_create_guest_memfd`.
#[repr(C)]
#[derive(Default)]
struct CreateGuestMemfd {
    size: u64,
    flags: u64,
    reserved: [u64; 6],
}

/// `struct kvm_memory_attributes2` of the in-place conversion series (its
/// layout unchanged since v5).
#[repr(C)]
#[derive(Default)]
struct MemoryAttributes2 {
    offset: u64,
    size: u64,
    attributes: u64,
    flags: u64,
    error_offset: u64,
    reserved: [u64; 11],
}

/// Probes `/dev/kvm`. Never fails: what could not be found out is `false`,
/// and `detail` says why.
pub fn probe() -> GuestMemfdSupport {
    let mut found = GuestMemfdSupport::default();
    found.detail = match probe_into(&mut found) {
        Ok(()) if found.in_place_conversion => "guest_memfd with in-place conversion".into(),
        Ok(()) => "guest_memfd without in-place conversion (KVM_SET_MEMORY_ATTRIBUTES2: ENOTTY)".into(),
        Err(why) => why,
    };
    found
}

fn probe_into(found: &mut GuestMemfdSupport) -> Result<(), String> {
    let kvm = File::options().read(true).write(true).open("/dev/kvm").map_err(|e| format!("/dev/kvm: {e}"))?;
    let check = |cap: libc::c_ulong| {
        // SAFETY: KVM_CHECK_EXTENSION takes an integer argument and touches no memory.
        unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CHECK_EXTENSION as _, cap) }
    };
    if check(KVM_CAP_GUEST_MEMFD) <= 0 {
        return Err("KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD)".into());
    }
    found.guest_memfd = true;
    let flags = u64::try_from(check(KVM_CAP_GUEST_MEMFD_FLAGS)).unwrap_or(0);
    found.mmap = flags & GUEST_MEMFD_FLAG_MMAP != 0;
    found.init_shared = flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0;

    // SAFETY: KVM_CREATE_VM takes the VM type (0: the default) and returns a new fd or -1.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0 as libc::c_ulong) };
    if vm < 0 {
        return Err(format!("KVM_CREATE_VM: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `vm` is a new fd that nothing else owns.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    let mut create = CreateGuestMemfd { size: 2 << 20, flags: flags & GUEST_MEMFD_FLAG_MMAP, ..Default::default() };
    // SAFETY: `create` is a live kvm_create_guest_memfd of the size the ioctl number encodes.
    let gmem = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_GUEST_MEMFD as _, &mut create) };
    if gmem < 0 {
        return Err(format!("KVM_CREATE_GUEST_MEMFD: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `gmem` is a new fd that nothing else owns.
    let gmem = unsafe { OwnedFd::from_raw_fd(gmem) };
    let mut none = MemoryAttributes2::default();
    // SAFETY: `none` is a live kvm_memory_attributes2 of the size the ioctl
    // number encodes; a zero-sized range changes nothing.
    let rc = unsafe { libc::ioctl(gmem.as_raw_fd(), KVM_SET_MEMORY_ATTRIBUTES2 as _, &mut none) };
    found.in_place_conversion = rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOTTY);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // From linux/kvm.h: KVM_CREATE_VM _IO(KVMIO, 0x01), KVM_CHECK_EXTENSION
        // _IO(KVMIO, 0x03), KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, 64 bytes).
        assert_eq!(KVM_CREATE_VM, 0xAE01);
        assert_eq!(KVM_CHECK_EXTENSION, 0xAE03);
        assert_eq!(KVM_CREATE_GUEST_MEMFD, 0xC040_AED4);
        assert_eq!(KVM_SET_MEMORY_ATTRIBUTES2, 0xC080_AED2);
    }

    #[test]
    fn probing_never_fails_and_explains_itself() {
        let found = probe();
        assert!(!found.detail.is_empty());
        assert!(found.guest_memfd || !found.in_place_conversion);
    }
}
