//! Exec upgrade: gmemd replaces its own program while QEMU and the guest
//! go on (docs/live-update.md, "gmemd upgrades itself").
//!
//! The running program ([`Upgrader`]) pauses every connection between two
//! messages and every ring between two requests, writes a
//! [`HandoverRecord`] of what it holds (regions, disk, listening sockets,
//! each connection's [`ConnectionRecord`]) into a memfd, clears
//! close-on-exec on the fds the record names and execs the new program in
//! the same process. The new program ([`Takeover`]) builds everything from
//! duplicates of those fds, so that nothing of the old state is consumed
//! until all of it has been taken; then it closes the originals, restarts
//! the rings and answers the `upgrade` request. If it cannot take over, it
//! execs the previous program again (kept open as an fd, so a binary
//! replaced on disk does not matter), which takes the same record back and
//! answers with the reason.

mod record;
mod takeover;
mod upgrade;

pub use record::{HandoverRecord, InheritedRegion, Requester, HANDOVER_VERSION};
pub use takeover::{Carried, Takeover, TakeoverError};
pub use upgrade::{RunningImage, UpgradeError, Upgrader};

/// Environment variable naming the handover: `<record fd>:<previous program fd>`.
/// Only these two numbers are needed to go back, whatever the new program
/// makes of the record.
const HANDOVER_ENV: &str = "GMEMD_HANDOVER";
/// Set when a new program refused the handover: why. The previous program,
/// exec'd again, reports it to the requester.
const REFUSED_ENV: &str = "GMEMD_HANDOVER_REFUSED";
/// Test-only: a new program started with this set refuses the handover,
/// so that tests can exercise the way back.
const TEST_REFUSE_ENV: &str = "GMEMD_TEST_REFUSE_HANDOVER";

/// The environment for a program gmemd execs: its own, without handover
/// variables of an earlier upgrade, plus `extra`.
fn exec_environment(extra: &[(&str, &str)]) -> Vec<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    let mut env: Vec<std::ffi::CString> = std::env::vars_os()
        .filter(|(key, _)| key != HANDOVER_ENV && key != REFUSED_ENV && key != TEST_REFUSE_ENV)
        .filter_map(|(key, value)| {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            std::ffi::CString::new(entry).ok()
        })
        .collect();
    // A reason with a NUL in it is cut there rather than dropped.
    env.extend(extra.iter().filter_map(|(key, value)| {
        let value = value.split('\0').next().unwrap_or_default();
        std::ffi::CString::new(format!("{key}={value}")).ok()
    }));
    env
}

/// `argv` as exec wants it.
fn exec_arguments(argv: &[std::ffi::OsString]) -> Vec<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    // Arguments came from an exec, so none holds a NUL.
    argv.iter().filter_map(|arg| std::ffi::CString::new(arg.as_bytes()).ok()).collect()
}

/// NULL-terminated pointer array over `strings`, for execve.
fn pointers(strings: &[std::ffi::CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}
