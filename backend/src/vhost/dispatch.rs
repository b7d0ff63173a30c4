//! The message loop of one frontend connection: it waits for the next
//! message, or for the daemon to ask it to pause or quit, decodes the
//! message's payload with the vhost crate's structs, carries it out on the
//! [`FrontendConnection`] and replies as the vhost-user spec says.
//!
//! Replies follow the spec and QEMU: messages with a reply payload always
//! get one; the others are acked (0, or 1 on failure) only when the
//! frontend negotiated REPLY_ACK and asked (NEED_REPLY). A message that
//! needs a protocol feature the frontend did not negotiate, carries fds
//! where none belong, or whose payload does not parse ends the connection:
//! the frontend broke the protocol and the stream cannot be trusted.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserMsgValidator, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr, VhostUserVringState,
};
use vhost::vhost_user::{VhostUserProtocolFeatures as Pf, VhostUserVirtioFeatures};
use vm_memory::ByteValued;

use super::connection::{FrontendConnection, Refusal};
use super::wire::{Message, Wire, WireError};
use crate::daemon::Daemon;
use crate::memory::MemRegionDesc;

/// Bit 8 of a SET_VRING_{KICK,CALL,ERR} payload: no fd comes with it.
const VRING_NOFD: u64 = 0x100;

/// What a message produced.
enum Reply {
    /// Nothing but the ack, if one was asked for.
    Ack,
    /// This payload, with these fds (closed once sent).
    Payload(Vec<u8>, Vec<File>),
}

fn payload<T: ByteValued>(value: &T) -> Reply {
    Reply::Payload(value.as_slice().to_vec(), Vec::new())
}

fn u64_reply(value: u64) -> Reply {
    payload(&VhostUserU64::new(value))
}

fn broken(error: WireError) -> Refusal {
    Refusal::Close(error.to_string())
}

/// Serves one connection until the frontend goes, breaks the protocol, or
/// the daemon quits. Between two messages it takes part in a pause.
pub fn serve(daemon: &Arc<Daemon>, mut connection: FrontendConnection, socket: UnixStream) {
    let id = connection.id();
    let mut wire = match Wire::new(socket) {
        Ok(wire) => wire,
        Err(error) => {
            log::error!("frontend {id}: {error}; closing this connection");
            return;
        }
    };
    loop {
        let ready = crate::sys::poll_readable([wire.socket(), daemon.quiesce.event(), daemon.quit_event()]);
        let [readable, pause, quit] = match ready {
            Ok(ready) => ready,
            Err(error) => {
                log::error!("frontend {id}: poll: {error}; closing this connection");
                return;
            }
        };
        if quit {
            log::debug!("frontend {id}: closed for shutdown");
            return;
        }
        if pause && daemon.quiesce.pausing() {
            park(daemon, &mut connection, &wire);
            continue;
        }
        if !readable {
            continue;
        }
        let message = match wire.recv() {
            Ok(message) => message,
            Err(WireError::Closed) => return,
            Err(error) => {
                log::warn!("frontend {id}: {error}; closing this connection (gmemd keeps serving)");
                return;
            }
        };
        if let Err(why) = handle(&mut connection, &mut wire, message) {
            log::warn!("frontend {id}: {why}; closing this connection (gmemd keeps serving)");
            return;
        }
    }
}

/// Pauses between two messages: stops the rings, deposits the record,
/// and goes on when the pause ends (the exec failed or was refused).
fn park(daemon: &Daemon, connection: &mut FrontendConnection, wire: &Wire) {
    match connection.suspend(wire.socket().as_raw_fd()) {
        Ok(record) => {
            daemon.quiesce.park_connection(Ok(record.clone()));
            connection.resume(&record);
        }
        Err(why) => daemon.quiesce.park_connection(Err((connection.id(), why))),
    }
}

/// Whether fds may come with `request`.
fn carries_fds(request: FrontendReq) -> bool {
    use FrontendReq::*;
    // REM_MEM_REG: the spec lets a backend take and close one fd, for
    // frontends that send it.
    matches!(
        request,
        SET_MEM_TABLE
            | SET_VRING_CALL
            | SET_VRING_KICK
            | SET_VRING_ERR
            | SET_LOG_BASE
            | SET_INFLIGHT_FD
            | ADD_MEM_REG
            | REM_MEM_REG
    )
}

/// The protocol feature `request` needs, if any.
fn needs_feature(request: FrontendReq) -> Option<Pf> {
    use FrontendReq::*;
    Some(match request {
        GET_QUEUE_NUM => Pf::MQ,
        SET_LOG_BASE => Pf::LOG_SHMFD,
        GET_CONFIG | SET_CONFIG => Pf::CONFIG,
        POSTCOPY_ADVISE | POSTCOPY_LISTEN | POSTCOPY_END => Pf::PAGEFAULT,
        GET_INFLIGHT_FD | SET_INFLIGHT_FD => Pf::INFLIGHT_SHMFD,
        RESET_DEVICE => Pf::RESET_DEVICE,
        GET_MAX_MEM_SLOTS | ADD_MEM_REG | REM_MEM_REG => Pf::CONFIGURE_MEM_SLOTS,
        _ => return None,
    })
}

/// Carries out one message and replies; `Err` ends the connection.
fn handle(connection: &mut FrontendConnection, wire: &mut Wire, mut message: Message) -> Result<(), String> {
    let request = message.request;
    let result = if !message.files.is_empty() && !carries_fds(request) {
        Err(Refusal::Close(format!("{request:?} came with {} fds, which it never carries", message.files.len())))
    } else if let Some(feature) = needs_feature(request).filter(|f| !connection.has_protocol_feature(*f)) {
        Err(Refusal::Close(format!("{request:?} needs protocol feature {feature:?}, which was not negotiated")))
    } else {
        carry_out(connection, &mut message)
    };
    let ack_wanted = message.need_reply() && connection.reply_ack();
    let sent = match result {
        Ok(Reply::Ack) if ack_wanted => wire.reply_u64(&message.header, 0),
        Ok(Reply::Ack) => Ok(()),
        Ok(Reply::Payload(bytes, files)) => {
            let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
            wire.reply(&message.header, &bytes, &fds)
        }
        Err(Refusal::Nack(why)) => {
            log::warn!("frontend {}: {request:?} refused: {why}", connection.id());
            if ack_wanted {
                wire.reply_u64(&message.header, 1)
            } else {
                Ok(())
            }
        }
        Err(Refusal::Close(why)) => return Err(format!("{request:?}: {why}")),
    };
    sent.map_err(|e| e.to_string())
}

/// The vring index and fd of a SET_VRING_{KICK,CALL,ERR}.
fn vring_fd(message: &mut Message) -> Result<(u8, Option<File>), Refusal> {
    let value = message.payload::<VhostUserU64>().map_err(broken)?.value;
    let file = match (value & VRING_NOFD != 0, message.files.len()) {
        (true, 0) => None,
        (false, 1) => message.one_file(),
        _ => return Err(Refusal::Close("the fd and the no-fd flag disagree".into())),
    };
    Ok(((value & 0xff) as u8, file))
}

fn desc_of(region: &VhostUserMemoryRegion) -> MemRegionDesc {
    MemRegionDesc {
        gpa: region.guest_phys_addr,
        size: region.memory_size,
        frontend_addr: region.user_addr,
        mmap_offset: region.mmap_offset,
    }
}

fn carry_out(connection: &mut FrontendConnection, message: &mut Message) -> Result<Reply, Refusal> {
    use FrontendReq::*;
    let request = message.request;
    let no_payload = |message: &Message| {
        if message.body.is_empty() {
            Ok(())
        } else {
            Err(Refusal::Close(format!("{request:?} carries no payload, got {} bytes", message.body.len())))
        }
    };
    // In postcopy listening mode, QEMU acks the memory table it was sent
    // with a u64 0 under the table message's own code.
    let postcopy_ack = matches!(request, SET_MEM_TABLE | ADD_MEM_REG | REM_MEM_REG)
        && connection.postcopy_listening()
        && message.body.len() == size_of::<u64>();
    if postcopy_ack {
        if message.payload::<VhostUserU64>().map_err(broken)?.value != 0 {
            return Err(Refusal::Close("the frontend reported a failure in its memory-table ack".into()));
        }
        connection.register_postcopy_table()?;
        return Ok(Reply::Ack);
    }
    match request {
        SET_OWNER => {
            no_payload(message)?;
            connection.set_owner();
            Ok(Reply::Ack)
        }
        RESET_OWNER | RESET_DEVICE => {
            no_payload(message)?;
            connection.reset_device();
            Ok(Reply::Ack)
        }
        GET_FEATURES => {
            no_payload(message)?;
            Ok(u64_reply(connection.features_offered()))
        }
        SET_FEATURES => {
            let features = message.payload::<VhostUserU64>().map_err(broken)?.value;
            connection.set_features(features).map(|()| Reply::Ack)
        }
        GET_PROTOCOL_FEATURES => {
            no_payload(message)?;
            Ok(u64_reply(connection.protocol_features_offered().bits()))
        }
        SET_PROTOCOL_FEATURES => {
            let features = message.payload::<VhostUserU64>().map_err(broken)?.value;
            connection.set_protocol_features(features).map(|()| Reply::Ack)
        }
        GET_QUEUE_NUM => {
            no_payload(message)?;
            Ok(u64_reply(connection.queue_num()))
        }
        GET_MAX_MEM_SLOTS => {
            no_payload(message)?;
            Ok(u64_reply(connection.max_mem_slots()))
        }
        SET_MEM_TABLE => {
            let (header, rest) = message.prefix::<VhostUserMemory>().map_err(broken)?;
            let count = header.num_regions as usize;
            let expected = count * size_of::<VhostUserMemoryRegion>();
            if rest.len() != expected || message.files.len() != count {
                return Err(Refusal::Close(format!(
                    "SET_MEM_TABLE of {count} regions came with {} payload bytes and {} fds",
                    rest.len(),
                    message.files.len()
                )));
            }
            let regions: Vec<VhostUserMemoryRegion> = rest
                .chunks_exact(size_of::<VhostUserMemoryRegion>())
                .map(|chunk| {
                    let mut region = VhostUserMemoryRegion::default();
                    region.as_mut_slice().copy_from_slice(chunk);
                    region
                })
                .collect();
            if !regions.iter().all(VhostUserMsgValidator::is_valid) {
                return Err(Refusal::Close("SET_MEM_TABLE with an empty or overflowing range".into()));
            }
            let entries = regions.iter().map(desc_of).zip(message.files.drain(..)).collect();
            match connection.set_mem_table(entries)? {
                None => Ok(Reply::Ack),
                Some(bases) => {
                    let mut bytes = header.as_slice().to_vec();
                    for (mut region, base) in regions.into_iter().zip(bases) {
                        region.user_addr = base;
                        bytes.extend_from_slice(region.as_slice());
                    }
                    Ok(Reply::Payload(bytes, Vec::new()))
                }
            }
        }
        ADD_MEM_REG => {
            let region = message.payload::<VhostUserSingleMemoryRegion>().map_err(broken)?;
            if !<VhostUserMemoryRegion as VhostUserMsgValidator>::is_valid(&region) {
                return Err(Refusal::Close("ADD_MEM_REG of an empty or overflowing range".into()));
            }
            let file = message.one_file().ok_or_else(|| Refusal::Close("ADD_MEM_REG needs exactly one fd".into()))?;
            match connection.add_mem_region(desc_of(&region), file) {
                Ok(None) => Ok(Reply::Ack),
                Ok(Some(base)) => {
                    let reply = VhostUserSingleMemoryRegion::new(
                        region.guest_phys_addr,
                        region.memory_size,
                        base,
                        region.mmap_offset,
                    );
                    Ok(payload(&reply))
                }
                // In postcopy mode QEMU reads a reply in any case.
                Err(Refusal::Nack(why)) if connection.postcopy_listening() => {
                    log::warn!("frontend {}: ADD_MEM_REG refused: {why}", connection.id());
                    Ok(u64_reply(1))
                }
                Err(refusal) => Err(refusal),
            }
        }
        REM_MEM_REG => {
            let region = message.payload::<VhostUserSingleMemoryRegion>().map_err(broken)?;
            connection.remove_mem_region(desc_of(&region)).map(|()| Reply::Ack)
        }
        SET_VRING_NUM => {
            let state = message.payload::<VhostUserVringState>().map_err(broken)?;
            connection.set_vring_num(state.index, state.num).map(|()| Reply::Ack)
        }
        SET_VRING_ADDR => {
            let addr = message.payload::<VhostUserVringAddr>().map_err(broken)?;
            connection.set_vring_addr(addr.index, addr.descriptor, addr.used, addr.available).map(|()| Reply::Ack)
        }
        SET_VRING_BASE => {
            let state = message.payload::<VhostUserVringState>().map_err(broken)?;
            connection.set_vring_base(state.index, state.num).map(|()| Reply::Ack)
        }
        GET_VRING_BASE => {
            let state = message.payload::<VhostUserVringState>().map_err(broken)?;
            let base = connection.get_vring_base(state.index)?;
            Ok(payload(&VhostUserVringState::new(state.index, base)))
        }
        SET_VRING_KICK => {
            let (index, file) = vring_fd(message)?;
            connection.set_vring_kick(index, file).map(|()| Reply::Ack)
        }
        SET_VRING_CALL => {
            let (index, file) = vring_fd(message)?;
            connection.set_vring_call(index, file).map(|()| Reply::Ack)
        }
        SET_VRING_ERR => {
            let (index, file) = vring_fd(message)?;
            connection.set_vring_err(index, file).map(|()| Reply::Ack)
        }
        SET_VRING_ENABLE => {
            let state = message.payload::<VhostUserVringState>().map_err(broken)?;
            if connection.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                return Err(Refusal::Close("SET_VRING_ENABLE before VHOST_USER_F_PROTOCOL_FEATURES was acked".into()));
            }
            let enable = match state.num {
                0 => false,
                1 => true,
                other => return Err(Refusal::Close(format!("SET_VRING_ENABLE with {other}"))),
            };
            connection.set_vring_enable(state.index, enable).map(|()| Reply::Ack)
        }
        GET_CONFIG => {
            let (config, rest) = message.prefix::<VhostUserConfig>().map_err(broken)?;
            if rest.len() != config.size as usize {
                return Err(Refusal::Close("GET_CONFIG whose size does not match its payload".into()));
            }
            // An empty payload tells the frontend the window was refused.
            let bytes = connection.get_config(config.offset, config.size).unwrap_or_default();
            let reply = VhostUserConfig { size: u32::try_from(bytes.len()).unwrap_or(0), ..config };
            let mut out = reply.as_slice().to_vec();
            out.extend_from_slice(&bytes);
            Ok(Reply::Payload(out, Vec::new()))
        }
        SET_CONFIG => {
            let (config, rest) = message.prefix::<VhostUserConfig>().map_err(broken)?;
            if rest.len() != config.size as usize {
                return Err(Refusal::Close("SET_CONFIG whose size does not match its payload".into()));
            }
            connection.set_config(config.offset, rest).map(|()| Reply::Ack)
        }
        SET_LOG_BASE => {
            let log = message.payload::<VhostUserLog>().map_err(broken)?;
            let file = message.one_file().ok_or_else(|| Refusal::Close("SET_LOG_BASE needs exactly one fd".into()))?;
            connection.set_log_base(log.mmap_size, log.mmap_offset, file)?;
            Ok(payload(&log))
        }
        GET_INFLIGHT_FD => {
            let wanted = message.payload::<VhostUserInflight>().map_err(broken)?;
            match connection.get_inflight_fd(wanted.num_queues, wanted.queue_size) {
                Ok((reply, file)) => Ok(Reply::Payload(reply.as_slice().to_vec(), vec![file])),
                // A zero size tells the frontend to go on without inflight tracking.
                Err(why) => {
                    log::warn!("frontend {}: no inflight region: {why}", connection.id());
                    Ok(payload(&VhostUserInflight::default()))
                }
            }
        }
        SET_INFLIGHT_FD => {
            let inflight = message.payload::<VhostUserInflight>().map_err(broken)?;
            let file =
                message.one_file().ok_or_else(|| Refusal::Close("SET_INFLIGHT_FD needs exactly one fd".into()))?;
            connection.set_inflight_fd(&inflight, file).map(|()| Reply::Ack)
        }
        POSTCOPY_ADVISE => {
            no_payload(message)?;
            match connection.advise_postcopy() {
                Ok(uffd) => Ok(Reply::Payload(Vec::new(), vec![uffd])),
                // A reply without the fd fails QEMU's incoming migration.
                Err(Refusal::Nack(_)) => Ok(Reply::Payload(Vec::new(), Vec::new())),
                Err(refusal) => Err(refusal),
            }
        }
        POSTCOPY_LISTEN => {
            no_payload(message)?;
            connection.listen_postcopy().map(|()| Reply::Ack)
        }
        POSTCOPY_END => {
            no_payload(message)?;
            connection.end_postcopy().map(|()| Reply::Ack)
        }
        other => Err(Refusal::Close(format!("{other:?} is not supported"))),
    }
}
