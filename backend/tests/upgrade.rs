//! Exec upgrade against the real binary, with the vhost crate's frontend
//! as the peer: the connection, its rings and the RAM carry over; a
//! refused handover and a failed exec leave the old program serving.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use gmem_protocol::ClientError;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const DATA: u64 = 0x10_0000;

/// Writes a pattern and reads it back through the connection's ring.
fn round_trip(fe: &Fe, mem: &GuestMem, ring: &mut Ring, sector: u64, seed: u8) {
    let data = pattern(64 << 10, seed);
    mem.write(DATA, &data);
    assert_eq!(fe.write(mem, ring, sector, DATA, data.len() as u32), (1, S_OK));
    mem.write(DATA, &vec![0u8; data.len()]);
    assert_eq!(fe.read(mem, ring, sector, DATA, data.len() as u32), (data.len() as u32 + 1, S_OK));
    assert_eq!(mem.read(DATA, data.len()), data, "read back after the upgrade");
}

/// A script that runs gmemd with `env` set, standing in for a new program.
fn wrapper(dir: &std::path::Path, env: &str) -> String {
    let path = dir.join("gmemd-wrapper");
    std::fs::write(&path, format!("#!/bin/sh\n{env} exec {} \"$@\"\n", env!("CARGO_BIN_EXE_gmemd"))).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

#[test]
fn a_connection_keeps_running_across_upgrades() {
    let daemon = Gmemd::start(&[]);
    let (mut fe, mem, mut ring) = ready_frontend(&daemon);
    round_trip(&fe, &mem, &mut ring, 0, 1);
    let before = daemon.status();
    for round in 0..3u8 {
        let counted = daemon.device();
        let info = daemon.ctl().upgrade(None).expect("upgrade");
        assert_eq!(daemon.device(), counted, "the device's counters go on across the upgrade");
        assert_eq!(info.pid, before.pid, "the same process");
        assert_eq!(info.frontends, 1);
        round_trip(&fe, &mem, &mut ring, 8 * u64::from(round), 2 + round);
        // The message loop goes on too.
        assert_ne!(fe.vu.get_features().expect("GET_FEATURES after the upgrade"), 0);
        fe.vu.set_vring_enable(0, true).expect("SET_VRING_ENABLE after the upgrade");
    }
    let after = daemon.status();
    assert_eq!(
        after.frontends.iter().map(|f| f.id).collect::<Vec<_>>(),
        before.frontends.iter().map(|f| f.id).collect::<Vec<_>>()
    );
    // A new connection gets an id never used before.
    let mut second = daemon.frontend();
    second.handshake(vhost::vhost_user::VhostUserProtocolFeatures::empty());
    let ids: Vec<u64> = daemon.status().frontends.iter().map(|f| f.id).collect();
    assert_eq!(ids, [before.frontends[0].id, before.frontends[0].id + 1], "{ids:?}");
    drop(second);
    assert!(daemon.log().matches("took over from gmemd").count() == 3, "{}", daemon.log());
}

#[test]
fn a_refused_handover_goes_back_to_the_old_program() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let refusing = wrapper(daemon.dir(), "GMEMD_TEST_REFUSE_HANDOVER=1");
    match daemon.ctl().upgrade(Some(&refusing)) {
        Err(ClientError::Command(error)) => {
            assert!(
                error.desc.contains("refused the handover") && error.desc.contains("GMEMD_TEST_REFUSE_HANDOVER"),
                "{error:?}"
            )
        }
        other => panic!("the refusing program took over: {other:?}"),
    }
    round_trip(&fe, &mem, &mut ring, 0, 9);
    // And a good upgrade still works after that.
    daemon.ctl().upgrade(None).expect("upgrade after a refusal");
    round_trip(&fe, &mem, &mut ring, 0, 10);
}

#[test]
fn an_upgrade_to_a_program_that_cannot_run_changes_nothing() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let not_executable = daemon.dir().join("not-a-program");
    std::fs::write(&not_executable, "text").expect("write");
    for (binary, expect) in
        [("/nonexistent/gmemd", "No such file"), (not_executable.to_str().expect("utf-8"), "not executable")]
    {
        match daemon.ctl().upgrade(Some(binary)) {
            Err(ClientError::Command(error)) => assert!(error.desc.contains(expect), "{binary}: {error:?}"),
            other => panic!("{binary}: {other:?}"),
        }
    }
    // Executable, but not a program the kernel can run: execve fails
    // after the pause, which is undone.
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    match daemon.ctl().upgrade(not_executable.to_str()) {
        Err(ClientError::Command(error)) => assert!(error.desc.contains("exec of"), "{error:?}"),
        other => panic!("{other:?}"),
    }
    round_trip(&fe, &mem, &mut ring, 0, 3);
}

#[test]
fn a_hundred_upgrades_leak_no_fd_and_no_memory() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", daemon.pid())).expect("fd dir").count();
    let rss_kib = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS").to_string();
        line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).expect("a number")
    };
    daemon.ctl().upgrade(None).expect("first upgrade");
    round_trip(&fe, &mem, &mut ring, 0, 1);
    let (fds_before, rss_before) = (fds(), rss_kib());
    for round in 0..100u8 {
        daemon.ctl().upgrade(None).unwrap_or_else(|e| panic!("upgrade {round}: {e}"));
    }
    round_trip(&fe, &mem, &mut ring, 0, 2);
    let (fds_after, rss_after) = (fds(), rss_kib());
    assert_eq!(fds_after, fds_before, "fds leak across upgrades");
    // The guest RAM the round trips touched is resident in both; a leak of
    // a few KiB per upgrade would show as hundreds.
    assert!(rss_after < rss_before + 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");
}

#[test]
fn no_upgrade_while_a_frontend_is_in_postcopy() {
    let daemon = Gmemd::start(&[]);
    let mut fe = daemon.frontend();
    fe.handshake(vhost::vhost_user::VhostUserProtocolFeatures::PAGEFAULT);
    let _uffd = fe.vu.postcopy_advise().expect("POSTCOPY_ADVISE");
    match daemon.ctl().upgrade(None) {
        Err(ClientError::Command(error)) => assert!(error.desc.contains("postcopy"), "{error:?}"),
        other => panic!("upgraded in postcopy: {other:?}"),
    }
    // The postcopy goes on: the connection still answers.
    assert_ne!(fe.vu.get_features().expect("GET_FEATURES"), 0);
    drop(fe);
    wait_until("the postcopy frontend is gone", || daemon.status().frontends.is_empty());
    daemon.ctl().upgrade(None).expect("upgrade once the postcopy is over");
}

/// A frontend that connects while the upgrade is under way waits in the
/// listening socket's backlog (the socket is never closed) and is served by
/// the new program: no connect() that succeeds and then fails.
#[test]
fn a_frontend_connecting_during_an_upgrade_is_served_by_the_new_program() {
    let daemon = Gmemd::start(&[]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    // The new program starts a second after the exec.
    let slow = wrapper(daemon.dir(), "sleep 1;");
    let control = daemon.ctl();
    let upgrade = std::thread::spawn(move || {
        let mut control = control;
        control.upgrade(Some(&slow))
    });
    wait_until("the upgrade has begun", || daemon.log().contains("upgrade: exec"));
    let mut late = daemon.frontend();
    late.handshake(vhost::vhost_user::VhostUserProtocolFeatures::empty());
    let info = upgrade.join().expect("upgrade thread").expect("upgrade");
    assert_eq!(info.frontends, 1, "only the connection made before the pause was carried over");
    assert_eq!(daemon.status().frontends.len(), 2, "the late frontend is served");
    round_trip(&fe, &mem, &mut ring, 0, 5);
}
