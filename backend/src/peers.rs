//! Who may talk to gmemd's sockets, decided from the kernel's record of
//! the peer (SO_PEERCRED, SO_PEERGROUPS), never from anything it sends.

use std::ffi::CString;

use crate::sys::PeerCredentials;

/// The users and groups allowed on one socket: always root and the
/// daemon's own user, plus what the operator lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    daemon_uid: u32,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl PeerPolicy {
    /// Root and the daemon's user only.
    pub fn own_user() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let daemon_uid = unsafe { libc::geteuid() };
        PeerPolicy { daemon_uid, uids: Vec::new(), gids: Vec::new() }
    }

    /// Also allows `uids` and members of `gids`.
    pub fn with(mut self, uids: &[u32], gids: &[u32]) -> Self {
        self.uids.extend_from_slice(uids);
        self.gids.extend_from_slice(gids);
        self
    }

    /// Whether `peer` may connect.
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        peer.uid == 0
            || peer.uid == self.daemon_uid
            || self.uids.contains(&peer.uid)
            || peer.gids.iter().any(|g| self.gids.contains(g))
    }

    /// Who is allowed, for the refusal message.
    pub fn describe(&self) -> String {
        let mut who = vec!["root".to_string(), format!("uid {}", self.daemon_uid)];
        who.extend(self.uids.iter().map(|u| format!("uid {u}")));
        who.extend(self.gids.iter().map(|g| format!("members of gid {g}")));
        who.join(", ")
    }
}

/// A user given by name or number, as `--allow-uid` takes it.
pub fn parse_user(text: &str) -> Result<u32, String> {
    if let Ok(uid) = text.parse() {
        return Ok(uid);
    }
    let name = CString::new(text).map_err(|_| format!("'{text}' is not a user name"))?;
    // SAFETY: getpwnam reads the NUL-terminated name; the returned record
    // (or NULL) is read at once, before any other passwd call.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("no user '{text}'"));
    }
    // SAFETY: non-NULL, so it points to a valid passwd record.
    Ok(unsafe { (*entry).pw_uid })
}

/// A group given by name or number, as `--allow-gid` and `--socket-group` take it.
pub fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse() {
        return Ok(gid);
    }
    let name = CString::new(text).map_err(|_| format!("'{text}' is not a group name"))?;
    // SAFETY: getgrnam reads the NUL-terminated name; the returned record
    // (or NULL) is read at once, before any other group call.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("no group '{text}'"));
    }
    // SAFETY: non-NULL, so it points to a valid group record.
    Ok(unsafe { (*entry).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gids: &[u32]) -> PeerCredentials {
        PeerCredentials { pid: 1, uid, gids: gids.to_vec() }
    }

    #[test]
    fn root_the_daemon_user_and_listed_users_and_groups_may_connect() {
        let policy = PeerPolicy { daemon_uid: 1000, uids: Vec::new(), gids: Vec::new() };
        assert!(policy.allows(&peer(0, &[0])));
        assert!(policy.allows(&peer(1000, &[1000])));
        assert!(!policy.allows(&peer(1001, &[1001])));
        let policy = policy.with(&[64055], &[107]);
        assert!(policy.allows(&peer(64055, &[64055])), "a listed uid");
        assert!(policy.allows(&peer(1002, &[1002, 107])), "a member of a listed group");
        assert!(!policy.allows(&peer(1001, &[1001, 108])));
        assert!(policy.describe().contains("uid 64055") && policy.describe().contains("gid 107"));
    }

    #[test]
    fn users_and_groups_by_name_or_number() {
        assert_eq!(parse_user("0"), Ok(0));
        assert_eq!(parse_user("root"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(parse_user("no-such-user-here").is_err());
        assert!(parse_group("no-such-group-here").is_err());
    }
}
