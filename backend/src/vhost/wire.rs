//! vhost-user framing on a unix stream socket: one message at a time,
//! with the fds that come with it, and replies.
//!
//! gmemd reads messages itself instead of through the vhost crate's request
//! handler, so that the connection's state is gmemd's own (it can be
//! recorded and handed to a new gmemd image) and its loop can stop between
//! two messages. The payload structs are the vhost crate's.
//!
//! Nothing here trusts the peer: the header is checked before the body is
//! read, the body is bounded, fds beyond [`MAX_FDS`] end the connection
//! (and are closed), and a message that stops half-way is given up after
//! [`MESSAGE_PATIENCE`] so a stalled peer holds no thread forever.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{FrontendReq, VhostUserMsgValidator, MAX_MSG_SIZE};
use vm_memory::ByteValued;

/// The most fds one message may carry: SET_MEM_TABLE sends one per region,
/// and QEMU sends at most 8 (VHOST_MEMORY_BASELINE_NREGIONS).
pub const MAX_FDS: usize = 8;
/// How long the rest of a message may take once its first byte arrived.
/// QEMU sends a message with one sendmsg; this only stops a stalled peer.
pub const MESSAGE_PATIENCE: Duration = Duration::from_secs(2);
/// How long a reply may wait for room in the socket buffer.
pub const REPLY_PATIENCE: Duration = Duration::from_secs(2);

const VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const KNOWN_FLAGS: u32 = 0x3 | FLAG_REPLY | FLAG_NEED_REPLY;

/// The 12-byte vhost-user header: request, flags, payload size.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// The request code.
    pub request: u32,
    /// Version (bits 0-1), REPLY (bit 2), NEED_REPLY (bit 3).
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

// SAFETY: three u32s, no padding; any bit pattern is a valid Header.
unsafe impl ByteValued for Header {}

/// Why a message could not be read or a reply not sent. Every variant ends
/// the connection: after any of them the stream is no longer in step.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frontend closed its end.
    #[error("the frontend closed the connection")]
    Closed,
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// A message stopped half-way.
    #[error("message cut short: {got} of {want} bytes within {}s", MESSAGE_PATIENCE.as_secs())]
    Cut { got: usize, want: usize },
    /// More fds than any message carries.
    #[error("more than {MAX_FDS} file descriptors attached to one message")]
    TooManyFds,
    /// A header gmemd cannot take.
    #[error("invalid message header {0:?}")]
    Header(Header),
    /// A request code gmemd does not know.
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    /// A payload whose size does not fit its request.
    #[error("{request:?}: payload of {got} bytes, expected {want}")]
    BodySize { request: FrontendReq, got: usize, want: usize },
    /// A payload whose fields are invalid.
    #[error("{0:?}: invalid payload")]
    Body(FrontendReq),
    /// A reply that the socket did not take in time.
    #[error("the frontend does not read its replies")]
    ReplyStalled,
}

/// One request from the frontend.
#[derive(Debug)]
pub struct Message {
    /// The header, checked.
    pub header: Header,
    /// The request, known to gmemd.
    pub request: FrontendReq,
    /// The payload, `header.size` bytes.
    pub body: Vec<u8>,
    /// The fds that came with it, close-on-exec.
    pub files: Vec<File>,
}

impl Message {
    /// Whether the frontend asked for an ack (REPLY_ACK).
    pub fn need_reply(&self) -> bool {
        self.header.flags & FLAG_NEED_REPLY != 0
    }

    /// The payload as one `T`, which must be exactly its size and valid.
    pub fn payload<T: ByteValued + VhostUserMsgValidator + Default>(&self) -> Result<T, WireError> {
        let (value, rest) = self.prefix::<T>()?;
        if !rest.is_empty() {
            return Err(WireError::BodySize { request: self.request, got: self.body.len(), want: size_of::<T>() });
        }
        Ok(value)
    }

    /// A `T` at the start of the payload, and the bytes after it.
    pub fn prefix<T: ByteValued + VhostUserMsgValidator + Default>(&self) -> Result<(T, &[u8]), WireError> {
        let want = size_of::<T>();
        let bytes =
            self.body.get(..want).ok_or(WireError::BodySize { request: self.request, got: self.body.len(), want })?;
        // Copied, not cast: the payload has no alignment in the Vec.
        let mut value = T::default();
        value.as_mut_slice().copy_from_slice(bytes);
        if !value.is_valid() {
            return Err(WireError::Body(self.request));
        }
        Ok((value, &self.body[want..]))
    }

    /// Takes the message's only fd, if exactly one came.
    pub fn one_file(&mut self) -> Option<File> {
        (self.files.len() == 1).then(|| self.files.remove(0))
    }
}

/// A frontend connection's socket.
#[derive(Debug)]
pub struct Wire {
    socket: UnixStream,
}

impl Wire {
    /// Frames messages on `socket`, which must be in blocking mode.
    pub fn new(socket: UnixStream) -> io::Result<Self> {
        socket.set_nonblocking(false)?;
        socket.set_write_timeout(Some(REPLY_PATIENCE))?;
        Ok(Wire { socket })
    }

    /// The socket, for polling and for handing over.
    pub fn socket(&self) -> &UnixStream {
        &self.socket
    }

    /// Reads one message; the caller saw the socket readable.
    pub fn recv(&mut self) -> Result<Message, WireError> {
        let mut header = Header::default();
        let mut files = Vec::new();
        let deadline = Instant::now() + MESSAGE_PATIENCE;
        self.read_exact(header.as_mut_slice(), &mut files, deadline, true)?;
        let version_ok = header.flags & 0x3 == VERSION;
        if !version_ok || header.flags & !KNOWN_FLAGS != 0 || header.flags & FLAG_REPLY != 0 {
            return Err(WireError::Header(header));
        }
        if header.size as usize > MAX_MSG_SIZE {
            return Err(WireError::Header(header));
        }
        let request = FrontendReq::try_from(header.request).map_err(|_| WireError::UnknownRequest(header.request))?;
        let mut body = vec![0u8; header.size as usize];
        self.read_exact(&mut body, &mut files, deadline, false)?;
        Ok(Message { header, request, body, files })
    }

    /// Reads exactly `buf.len()` bytes, collecting fds.
    fn read_exact(
        &mut self,
        buf: &mut [u8],
        files: &mut Vec<File>,
        deadline: Instant,
        first: bool,
    ) -> Result<(), WireError> {
        let mut got = 0;
        while got < buf.len() {
            if got > 0 || !first {
                let left = deadline.saturating_duration_since(Instant::now());
                let [readable] = crate::sys::poll_readable_for([&self.socket], Some(left))?;
                if !readable {
                    return Err(WireError::Cut { got, want: buf.len() });
                }
            }
            let n = recv_with_fds(&self.socket, &mut buf[got..], files)?;
            if n == 0 {
                return Err(if got == 0 && first {
                    WireError::Closed
                } else {
                    WireError::Cut { got, want: buf.len() }
                });
            }
            got += n;
        }
        Ok(())
    }

    /// Replies to `request` with `payload` and `fds`.
    pub fn reply(&mut self, request: &Header, payload: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
        let size = u32::try_from(payload.len()).map_err(|_| WireError::Body(FrontendReq::GET_CONFIG))?;
        let header = Header { request: request.request, flags: VERSION | FLAG_REPLY, size };
        let mut bytes = Vec::with_capacity(size_of::<Header>() + payload.len());
        bytes.extend_from_slice(header.as_slice());
        bytes.extend_from_slice(payload);
        send_with_fds(&self.socket, &bytes, fds)
    }

    /// Replies with a u64 (an ack: 0 success, 1 failure; or a value).
    pub fn reply_u64(&mut self, request: &Header, value: u64) -> Result<(), WireError> {
        self.reply(request, &value.to_ne_bytes(), &[])
    }
}

/// One recvmsg into `buf`; fds that come with it are appended to `files`.
fn recv_with_fds(socket: &UnixStream, buf: &mut [u8], files: &mut Vec<File>) -> Result<usize, WireError> {
    // Room for MAX_FDS + 1 fds, so one too many is seen rather than cut.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `control`, both
        // live and writable for the lengths given.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error.into());
        }
    };
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within `msg_controllen`; each SCM_RIGHTS payload holds fds the kernel
    // installed in this process, which nothing else owns yet.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    files.push(File::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || files.len() > MAX_FDS {
        // `files` closes what arrived; the kernel closed what did not fit.
        files.clear();
        return Err(WireError::TooManyFds);
    }
    Ok(n)
}

/// Sends `bytes` with `fds` attached (one sendmsg, then plain sends for any
/// rest), within the socket's write timeout.
fn send_with_fds(socket: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
    let mut control = [0u64; 8];
    let fd_bytes = std::mem::size_of_val(fds);
    let mut sent = 0;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        let mut iov = libc::iovec { iov_base: rest.as_ptr().cast_mut().cast(), iov_len: rest.len() };
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
            if space > std::mem::size_of_val(&control) {
                return Err(WireError::TooManyFds);
            }
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer holds `space` bytes, enough for one
            // cmsghdr with `fds`; the macros stay within it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
            }
        }
        // SAFETY: `msg` points at `iov` (into `bytes`) and `control`, live
        // for the call; the kernel only reads them.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Err(WireError::ReplyStalled),
                _ => return Err(error.into()),
            }
        }
        sent += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vhost::vhost_user::message::VhostUserVringState;

    fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let header = Header { request, flags, size: body.len() as u32 };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn messages_are_framed_and_checked() {
        let (mut peer, ours) = UnixStream::pair().expect("pair");
        let mut wire = Wire::new(ours).expect("wire");
        let state = VhostUserVringState::new(1, 256);
        peer.write_all(&message(8, 1 | FLAG_NEED_REPLY, state.as_slice())).expect("send");
        let msg = wire.recv().expect("recv");
        assert_eq!(msg.request, FrontendReq::SET_VRING_NUM);
        assert!(msg.need_reply());
        let back: VhostUserVringState = msg.payload().expect("payload");
        assert_eq!((back.index, back.num), (1, 256));
        let too_long = msg.payload::<vhost::vhost_user::message::VhostUserVringAddr>();
        assert!(matches!(too_long, Err(WireError::BodySize { .. })));
        for bad in [message(8, 2, &[]), message(8, 1 | FLAG_REPLY, &[]), message(8, 1 | 0x10, &[])] {
            peer.write_all(&bad).expect("send");
            assert!(matches!(wire.recv(), Err(WireError::Header(_))));
        }
        peer.write_all(&message(9999, 1, &[])).expect("send");
        assert!(matches!(wire.recv(), Err(WireError::UnknownRequest(9999))));
        let mut huge = Header { request: 1, flags: 1, size: 1 << 20 }.as_slice().to_vec();
        huge.truncate(12);
        peer.write_all(&huge).expect("send");
        assert!(matches!(wire.recv(), Err(WireError::Header(_))));
        drop(peer);
        assert!(matches!(wire.recv(), Err(WireError::Closed)));
    }

    #[test]
    fn fds_come_with_their_message_and_too_many_are_refused() {
        let (peer, ours) = UnixStream::pair().expect("pair");
        let mut wire = Wire::new(ours).expect("wire");
        let files: Vec<File> = (0..MAX_FDS + 1).map(|_| tempfile::tempfile().expect("tmp")).collect();
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        send_with_fds(&peer, &message(12, 1, &0u64.to_ne_bytes()), &fds[..1]).expect("send one");
        let msg = wire.recv().expect("recv");
        assert_eq!(msg.files.len(), 1);
        let flags = crate::sys::set_cloexec(msg.files[0].as_raw_fd(), true);
        assert!(flags.is_ok());
        send_with_fds(&peer, &message(5, 1, &[0; 8]), &fds[..MAX_FDS + 1]).expect("send nine");
        assert!(matches!(wire.recv(), Err(WireError::TooManyFds)));
    }

    #[test]
    fn a_message_that_stops_half_way_is_given_up() {
        let (mut peer, ours) = UnixStream::pair().expect("pair");
        let mut wire = Wire::new(ours).expect("wire");
        peer.write_all(&message(8, 1, &[0; 8])[..14]).expect("send part");
        let started = Instant::now();
        assert!(matches!(wire.recv(), Err(WireError::Cut { got: 2, want: 8 })));
        assert!(started.elapsed() >= MESSAGE_PATIENCE);
    }
}
