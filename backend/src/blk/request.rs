//! Parsing a virtio-blk request out of a descriptor chain, trusting nothing.
//!
//! The chain is flattened into its readable and writable byte streams first,
//! so any layout the driver picks (VIRTIO_F_ANY_LAYOUT is implied by
//! VERSION_1) parses the same: the header is the first 16 readable bytes, the
//! status the last writable byte, and data is what lies between.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestAddress;

use super::config::{MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::memory::{AccessError, GuestBuf, RamAccess};

/// Size of `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const SEGMENT_LEN: usize = 16;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read from `sector` into the data buffers.
    Read { sector: u64 },
    /// Write the data buffers at `sector`.
    Write { sector: u64 },
    /// Make earlier writes durable.
    Flush,
    /// Return the device id string.
    GetId,
    /// Deallocate the ranges listed in the data buffers.
    Discard,
    /// Zero the ranges listed in the data buffers.
    WriteZeroes,
}

/// A parsed, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    /// The operation.
    pub op: Op,
    /// Data buffers: writable ones for Read/GetId, readable ones otherwise.
    pub data: Vec<GuestBuf>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request failed. Every variant is something the guest did or the
/// disk reported; none is fatal to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no writable byte for the status.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// The chain loops, or names a descriptor outside the table.
    #[error("descriptor chain loops or leaves the descriptor table")]
    BrokenChain,
    /// A buffer runs past the end of the guest-physical address space.
    #[error("a descriptor's buffer runs past the end of the address space")]
    Wraps,
    /// A readable descriptor follows a writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 readable bytes.
    #[error("request header is shorter than 16 bytes")]
    ShortHeader,
    /// Data buffers point the wrong way for the operation.
    #[error("data buffers have the wrong direction for request type {0}")]
    WrongDirection(u32),
    /// Data length not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// Beyond the end of the disk.
    #[error("sectors {sector}+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange { sector: u64, sectors: u64, capacity: u64 },
    /// A write to a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// A malformed DISCARD / WRITE_ZEROES segment list.
    #[error("bad discard/write-zeroes segment list: {0}")]
    BadSegments(&'static str),
    /// A request type or flag the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A segment flag the device does not implement.
    #[error("unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    /// A guest buffer outside guest RAM, or the disk I/O failing.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// A disk operation failed.
    #[error("disk: {0}")]
    Disk(#[from] std::io::Error),
    /// The disk ended before the transfer did (the image shrank under us).
    #[error("disk I/O stopped after {done} of {wanted} bytes")]
    Short { done: u64, wanted: u64 },
}

impl RequestError {
    /// The virtio-blk status to complete the request with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// A small number per kind, so each kind can be logged once.
    pub fn kind(&self) -> u32 {
        match self {
            RequestError::NoStatus => 0,
            RequestError::ReadableAfterWritable => 1,
            RequestError::ShortHeader => 2,
            RequestError::WrongDirection(_) => 3,
            RequestError::Unaligned(_) => 4,
            RequestError::OutOfRange { .. } => 5,
            RequestError::ReadOnly => 6,
            RequestError::BadSegments(_) => 7,
            RequestError::Unsupported(_) => 8,
            RequestError::UnsupportedFlags(_) => 9,
            RequestError::Access(AccessError::NotRam { .. }) => 10,
            RequestError::Access(AccessError::Private { .. } | AccessError::Converting { .. }) => 14,
            RequestError::Access(_) | RequestError::Disk(_) | RequestError::Short { .. } => 11,
            RequestError::BrokenChain => 12,
            RequestError::Wraps => 13,
        }
    }
}

/// A request that could not be parsed, with the status byte's address when
/// the chain had one (so the request can still be completed with an error).
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub error: RequestError,
    /// Where to write the error status, if anywhere.
    pub status: Option<GuestAddress>,
}

fn total(bufs: &[GuestBuf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// Splits `bufs` at byte `at`: the first `at` bytes, and the rest.
fn split_at(bufs: &[GuestBuf], at: u64) -> (Vec<GuestBuf>, Vec<GuestBuf>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = at;
    for buf in bufs {
        let take = left.min(u64::from(buf.len));
        if take > 0 {
            // take <= buf.len, a u32.
            head.push(GuestBuf { addr: buf.addr, len: take as u32 });
        }
        if take < u64::from(buf.len) {
            // Buffers were checked not to wrap.
            let addr = GuestAddress(buf.addr.0 + take);
            tail.push(GuestBuf { addr, len: buf.len - take as u32 });
        }
        left -= take;
    }
    (head, tail)
}

/// Parses and validates one request. `capacity` is the disk size in sectors.
pub fn parse(
    chain: impl Iterator<Item = Descriptor>,
    access: &RamAccess,
    capacity: u64,
    readonly: bool,
) -> Result<BlkRequest, Rejected> {
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    let (mut misordered, mut cut, mut wraps) = (false, false, false);
    for desc in chain {
        // virtio-queue ends iteration quietly when a chain loops, points past
        // the table or cannot be read; a last descriptor that still says
        // NEXT means the chain was cut, not finished.
        cut = desc.has_next();
        wraps |= desc.addr().0.checked_add(u64::from(desc.len())).is_none();
        let buf = GuestBuf { addr: desc.addr(), len: desc.len() };
        if desc.is_write_only() {
            writable.push(buf);
        } else if writable.is_empty() {
            readable.push(buf);
        } else {
            misordered = true;
        }
    }
    // A buffer that runs past the end of the address space would put the
    // status byte, or data, at the wrapped-around low address: no status
    // is written anywhere then.
    if wraps {
        return Err(Rejected { error: RequestError::Wraps, status: None });
    }
    let writable_len = total(&writable);
    if writable_len == 0 {
        return Err(Rejected { error: RequestError::NoStatus, status: None });
    }
    let (writable_data, status) = split_at(&writable, writable_len - 1);
    let status = status[0].addr;
    let reject = |error: RequestError| Rejected { error, status: Some(status) };
    if cut {
        return Err(reject(RequestError::BrokenChain));
    }
    if misordered {
        return Err(reject(RequestError::ReadableAfterWritable));
    }
    if total(&readable) < HEADER_LEN {
        return Err(reject(RequestError::ShortHeader));
    }
    let (header_bufs, readable_data) = split_at(&readable, HEADER_LEN);
    let mut header = [0u8; HEADER_LEN as usize];
    access.read_into(&header_bufs, &mut header).map_err(|e| reject(e.into()))?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
    ]);

    let (op, data) = match request_type {
        VIRTIO_BLK_T_IN => (Op::Read { sector }, writable_data),
        VIRTIO_BLK_T_OUT => (Op::Write { sector }, readable_data),
        VIRTIO_BLK_T_FLUSH => (Op::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => (Op::GetId, writable_data),
        VIRTIO_BLK_T_DISCARD => (Op::Discard, readable_data),
        VIRTIO_BLK_T_WRITE_ZEROES => (Op::WriteZeroes, readable_data),
        other => return Err(reject(RequestError::Unsupported(other))),
    };
    // Data must all point one way: a read may not carry readable payload
    // after its header, a write no writable bytes before its status.
    let stray = match op {
        Op::Read { .. } | Op::GetId => !total(&readable).eq(&HEADER_LEN),
        Op::Write { .. } | Op::Discard | Op::WriteZeroes => writable_len != 1,
        Op::Flush => false,
    };
    if stray {
        return Err(reject(RequestError::WrongDirection(request_type)));
    }
    let data_len = total(&data);
    match op {
        Op::Read { sector } | Op::Write { sector } => {
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(reject(RequestError::Unaligned(data_len)));
            }
            check_range(sector, data_len / SECTOR_SIZE, capacity).map_err(reject)?;
        }
        Op::Discard | Op::WriteZeroes => {
            let count = data_len / SEGMENT_LEN as u64;
            if data_len == 0 || !data_len.is_multiple_of(SEGMENT_LEN as u64) {
                return Err(reject(RequestError::BadSegments("length is not a non-zero multiple of 16")));
            }
            if count > u64::from(MAX_DISCARD_SEG) {
                return Err(reject(RequestError::BadSegments("more segments than max_discard_seg")));
            }
        }
        Op::Flush | Op::GetId => {}
    }
    if readonly && matches!(op, Op::Write { .. } | Op::Discard | Op::WriteZeroes) {
        return Err(reject(RequestError::ReadOnly));
    }
    for buf in &data {
        access.check(*buf).map_err(|e| reject(e.into()))?;
    }
    Ok(BlkRequest { op, data, data_len, status })
}

/// Checks that `sectors` sectors from `sector` lie on a disk of `capacity` sectors.
pub fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, sectors, capacity }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: u64, len: u32) -> GuestBuf {
        GuestBuf { addr: GuestAddress(addr), len }
    }

    #[test]
    fn split_at_cuts_inside_and_between_buffers() {
        let bufs = [buf(0x1000, 10), buf(0x2000, 6)];
        let (head, tail) = split_at(&bufs, 12);
        assert_eq!(head, vec![buf(0x1000, 10), buf(0x2000, 2)]);
        assert_eq!(tail, vec![buf(0x2002, 4)]);
        let (head, tail) = split_at(&bufs, 10);
        assert_eq!(head, vec![buf(0x1000, 10)]);
        assert_eq!(tail, vec![buf(0x2000, 6)]);
        let (head, tail) = split_at(&bufs, 0);
        assert!(head.is_empty());
        assert_eq!(tail.len(), 2);
    }

    #[test]
    fn ranges_check_overflow_and_capacity() {
        assert!(check_range(0, 8, 8).is_ok());
        assert!(check_range(1, 8, 8).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}
