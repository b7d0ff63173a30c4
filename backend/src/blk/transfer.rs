//! `Transfer`: a request's disk operation while it is in flight.

use std::os::fd::RawFd;

use vm_memory::GuestAddress;

use super::aio::DiskOp;
use super::request::RequestError;
use crate::memory::{GuestBuf, HeldBufs};

/// A read, write or flush handed to the disk engine: what to move, where
/// it has got to, and what completing the request needs afterwards. It
/// holds the guest buffers ([`HeldBufs`]) until it is finished.
#[derive(Debug)]
pub struct Transfer {
    op: DiskOp,
    fd: RawFd,
    /// Disk offset of the first byte.
    offset: u64,
    /// Bytes moved so far.
    done: u64,
    /// The guest buffers, resolved and held (none for a flush).
    held: Option<HeldBufs>,
    /// The same buffers as the guest named them, for the dirty log.
    bufs: Vec<GuestBuf>,
    /// Where the status byte goes.
    status: GuestAddress,
}

impl Transfer {
    /// A read or write of `held` at `offset` through `fd`.
    pub(super) fn data(
        op: DiskOp,
        fd: RawFd,
        offset: u64,
        held: HeldBufs,
        bufs: Vec<GuestBuf>,
        status: GuestAddress,
    ) -> Self {
        Transfer { op, fd, offset, done: 0, held: Some(held), bufs, status }
    }

    /// A flush of `fd`.
    pub(super) fn flush(fd: RawFd, status: GuestAddress) -> Self {
        Transfer { op: DiskOp::Flush, fd, offset: 0, done: 0, held: None, bufs: Vec::new(), status }
    }

    /// The operation.
    pub fn op(&self) -> DiskOp {
        self.op
    }

    /// The fd it goes through.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The disk offset the next part starts at.
    pub fn position(&self) -> u64 {
        self.offset + self.done
    }

    /// The iovecs of the next part.
    pub fn pending(&self) -> &[libc::iovec] {
        self.held.as_ref().map_or(&[], HeldBufs::pending)
    }

    /// The engine moved `n` bytes of the part handed to it: `Ok(true)` when
    /// the transfer is complete, `Ok(false)` when a next part must be
    /// handed over, an error when the disk ended first.
    pub fn advance(&mut self, n: usize) -> Result<bool, RequestError> {
        let Some(held) = &mut self.held else { return Ok(true) };
        if n == 0 && !held.is_empty() {
            return Err(RequestError::Short { done: self.done, wanted: self.done + held.len() });
        }
        held.advance(n);
        self.done += n as u64;
        Ok(held.is_empty())
    }

    /// Bytes moved so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The buffers as the guest named them.
    pub fn bufs(&self) -> &[GuestBuf] {
        &self.bufs
    }

    /// Where the status byte goes.
    pub fn status(&self) -> GuestAddress {
        self.status
    }
}
