//! Locked regions and the pin ledger against the real daemon: the ledger
//! agrees with the kernel (VmLck), a budget is enforced, and neither an exec
//! upgrade nor a crash restart loses a lock or charges it twice.

mod common;

use common::*;
use gmem_pins::kernel::Verdict;
use gmem_pins::Limit;
use gmem_protocol::{ClientError, Command, ErrorClass, PinsInfo, SetMemoryAttributesArgs};

const RAM: u64 = 64 * MIB;

/// The daemon's VmLck in bytes.
fn vm_lck(daemon: &Gmemd) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck");
    kib * 1024
}

fn pins(daemon: &Gmemd) -> PinsInfo {
    daemon.ctl().query_pins().expect("query-pins")
}

/// Locked, pending, and whether every reconciliation check matched.
fn ledger_state(daemon: &Gmemd) -> (u64, u64, bool) {
    let info = pins(daemon);
    let owner = info.ledger.owners.iter().find(|o| o.owner.as_str() == "vm0").expect("owner vm0");
    let matched = info.reconciliation.expect("the kernel's figures").checks.iter().all(|c| c.verdict == Verdict::Match);
    (owner.in_use, owner.pending_bytes, matched)
}

#[test]
fn a_locked_region_is_charged_and_the_kernel_agrees() {
    let daemon = Gmemd::start(&["--mlock", "--memlock-limit", "256M"]);
    assert_eq!(vm_lck(&daemon), RAM);
    assert_eq!(ledger_state(&daemon), (RAM, 0, true));
    let info = pins(&daemon);
    assert_eq!(info.ledger.owners[0].limit, Limit::Bytes(256 * MIB));
    assert_eq!(info.ledger.owners[0].regions.len(), 1);
    // Pinned memory may not turn private.
    let args = SetMemoryAttributesArgs { region: "ram0".into(), offset: 0, size: 4096, private: true, wait_ms: None };
    match daemon.ctl().execute::<serde_json::Value>(&Command::SetMemoryAttributes(args)) {
        Err(ClientError::Command(error)) => {
            assert_eq!((error.class, error.error_offset), (ErrorClass::Again, Some(0)), "{error:?}");
            assert!(error.desc.contains("a pin"), "{error:?}");
        }
        other => panic!("a locked range went private: {other:?}"),
    }
}

#[test]
fn a_lock_over_budget_is_refused_with_who_and_how_much() {
    let mut daemon = Gmemd::spawn(&Launch::default(), &["--mlock", "--memlock-limit", "32M"]);
    assert!(daemon.exited_within(TIMEOUT), "gmemd started over its budget");
    let log = daemon.log();
    assert!(log.contains("locking region ram0") && log.contains("vm0") && log.contains("33554432"), "{log}");
}

#[test]
fn ten_upgrades_keep_every_lock_and_charge_it_once() {
    let daemon = Gmemd::start(&["--mlock", "--memlock-limit", "64M"]);
    let (fe, mem, mut ring) = ready_frontend(&daemon);
    for round in 0..10 {
        daemon.ctl().upgrade(None).unwrap_or_else(|e| panic!("upgrade {round}: {e}"));
        // Exec drops mlocks; the new program locked the region again, on
        // the charge the old one handed over (a second charge would not
        // fit the 64 MiB budget).
        assert_eq!(vm_lck(&daemon), RAM, "upgrade {round}");
        assert_eq!(ledger_state(&daemon), (RAM, 0, true), "upgrade {round}");
    }
    assert_eq!(fe.read(&mem, &mut ring, 0, 0x10_0000, 4096).1, S_OK);
}

#[test]
fn a_crash_restart_takes_the_locks_back_without_a_second_budget() {
    let mut daemon = Gmemd::start(&["--mlock", "--memlock-limit", "64M"]);
    let (fe, mem, _ring) = ready_frontend(&daemon);
    daemon.crash();
    drop(fe);
    daemon.restart();
    // The region waits for its frontend; its pin stays charged, pending.
    assert_eq!(vm_lck(&daemon), 0);
    let (locked, pending, _) = ledger_state(&daemon);
    assert_eq!((locked, pending), (RAM, RAM), "the charge was not kept while the region is away");
    // The frontend comes back with the region's memfd.
    let mut fe = daemon.frontend();
    fe.handshake(vhost::vhost_user::VhostUserProtocolFeatures::empty());
    fe.set_table(&[mem.whole()]).expect("SET_MEM_TABLE after the restart");
    wait_until("the region is locked again", || vm_lck(&daemon) == RAM);
    assert_eq!(ledger_state(&daemon), (RAM, 0, true));
}
