//! Parsing of `query-migrate` replies captured from QEMU 10.0.2 on this
//! machine (guestless q35, 128 MiB, a unix socket between two QEMUs).

use super::*;

fn parse(text: &str) -> QemuMigrationInfo {
    serde_json::from_str(text).expect("a query-migrate reply")
}

/// Source during precopy, with max-bandwidth at its 128 MiB/s default.
const SOURCE_ACTIVE: &str = r#"{"expected-downtime": 300, "status": "active", "setup-time": 1, "total-time": 203, "ram": {"total": 134750208, "postcopy-requests": 0, "dirty-sync-count": 1, "multifd-bytes": 0, "pages-per-second": 32960, "downtime-bytes": 0, "page-size": 4096, "remaining": 107749376, "postcopy-bytes": 0, "mbps": 1082.15936, "transferred": 27053794, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 27053588, "duplicate": 0, "dirty-pages-rate": 0, "normal-bytes": 27000832, "normal": 6592}}"#;

/// Source right after migrate-start-postcopy.
const SOURCE_POSTCOPY_ACTIVE: &str = r#"{"status": "postcopy-active", "setup-time": 1, "downtime": 1, "total-time": 1111, "ram": {"total": 134750208, "postcopy-requests": 2, "dirty-sync-count": 2, "multifd-bytes": 0, "pages-per-second": 1280, "downtime-bytes": 0, "page-size": 4096, "remaining": 121208832, "postcopy-bytes": 7614498, "mbps": 42.0264, "transferred": 13331999, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 5779001, "duplicate": 227, "dirty-pages-rate": 168, "normal-bytes": 13365248, "normal": 3263}}"#;

/// Source after migrate-pause.
const SOURCE_POSTCOPY_PAUSED: &str = r#"{"status": "postcopy-paused", "setup-time": 4, "error-desc": "Postcopy migration is paused by the user", "downtime": 0, "total-time": 906, "ram": {"total": 134750208, "postcopy-requests": 1, "dirty-sync-count": 2, "multifd-bytes": 0, "pages-per-second": 320, "downtime-bytes": 0, "page-size": 4096, "remaining": 132575232, "postcopy-bytes": 1183554, "mbps": 10.50768, "transferred": 1775951, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 526689, "duplicate": 323, "dirty-pages-rate": 0, "normal-bytes": 1703936, "normal": 416}}"#;

/// Source after a postcopy migration completed.
const SOURCE_COMPLETED: &str = r#"{"status": "completed", "setup-time": 1, "downtime": 1, "total-time": 1227, "ram": {"total": 134750208, "postcopy-requests": 2, "dirty-sync-count": 2, "multifd-bytes": 0, "pages-per-second": 269067, "downtime-bytes": 0, "page-size": 4096, "remaining": 0, "postcopy-bytes": 28253545, "mbps": 222.501220228385, "transferred": 34098312, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 5779001, "duplicate": 24845, "dirty-pages-rate": 0, "normal-bytes": 33742848, "normal": 8238}}"#;

/// Source whose migrate could not connect.
const SOURCE_FAILED: &str =
    r#"{"status": "failed", "error-desc": "Failed to connect to '/tmp/nonexist': No such file or directory"}"#;

/// Destination after migrate-incoming, before the source connects.
const DESTINATION_LISTENING: &str =
    r#"{"status": "setup", "socket-address": [{"path": "/tmp/mig/e1/mig.sock", "type": "unix"}]}"#;

/// Destination after postcopy, with the postcopy-blocktime capability.
const DESTINATION_COMPLETED: &str =
    r#"{"postcopy-blocktime": 0, "status": "completed", "postcopy-vcpu-blocktime": [0]}"#;

#[test]
fn a_qemu_that_never_migrated_has_no_status() {
    let info = parse("{}");
    assert_eq!(info, QemuMigrationInfo::default());
    assert_eq!(info.status(), MigrationStatus::None);
}

#[test]
fn precopy_figures_are_read() {
    let info = parse(SOURCE_ACTIVE);
    assert_eq!(info.status(), MigrationStatus::Active);
    assert_eq!(
        (info.total_time, info.setup_time, info.expected_downtime, info.downtime),
        (Some(203), Some(1), Some(300), None)
    );
    let ram = info.ram.expect("ram");
    assert_eq!(ram.total, 134_750_208);
    assert_eq!(ram.remaining, 107_749_376);
    assert_eq!(ram.transferred, 27_053_794);
    assert_eq!(ram.dirty_sync_count, 1);
    assert!((ram.fraction_sent() - 0.2004).abs() < 0.001, "{}", ram.fraction_sent());
    assert!((ram.bytes_per_second() - 135.27e6).abs() < 0.01e6);
}

#[test]
fn postcopy_figures_are_read() {
    let info = parse(SOURCE_POSTCOPY_ACTIVE);
    assert_eq!(info.status(), MigrationStatus::PostcopyActive);
    assert!(info.status().is_postcopy());
    let ram = info.ram.expect("ram");
    assert_eq!((ram.postcopy_requests, ram.postcopy_bytes, ram.precopy_bytes), (2, 7_614_498, 5_779_001));
    assert_eq!(ram.dirty_bytes_per_second(), 168 * 4096);
}

#[test]
fn a_pause_carries_its_reason() {
    let info = parse(SOURCE_POSTCOPY_PAUSED);
    assert_eq!(info.status(), MigrationStatus::PostcopyPaused);
    assert_eq!(info.error_desc.as_deref(), Some("Postcopy migration is paused by the user"));
}

#[test]
fn completion_and_failure_are_final() {
    let completed = parse(SOURCE_COMPLETED);
    assert_eq!(completed.status(), MigrationStatus::Completed);
    assert!(completed.status().is_finished() && !completed.status().is_postcopy());
    assert_eq!(completed.ram.expect("ram").remaining, 0);

    let failed = parse(SOURCE_FAILED);
    assert_eq!(failed.status(), MigrationStatus::Failed);
    assert!(failed.ram.is_none());
    assert!(failed.error_desc.is_some_and(|d| d.starts_with("Failed to connect")));
}

#[test]
fn the_destination_reports_status_and_blocktime_only() {
    let listening = parse(DESTINATION_LISTENING);
    assert_eq!(listening.status(), MigrationStatus::Setup);
    assert!(listening.ram.is_none() && listening.postcopy_blocktime.is_none());

    let completed = parse(DESTINATION_COMPLETED);
    assert_eq!(completed.status(), MigrationStatus::Completed);
    assert_eq!(completed.postcopy_blocktime, Some(0));
    assert_eq!(completed.postcopy_vcpu_blocktime, Some(vec![0]));
}

#[test]
fn statuses_round_trip_through_their_qemu_names() {
    for status in [
        MigrationStatus::Setup,
        MigrationStatus::PostcopyActive,
        MigrationStatus::PostcopyDevice,
        MigrationStatus::PostcopyRecoverSetup,
        MigrationStatus::PreSwitchover,
        MigrationStatus::WaitUnplug,
    ] {
        let json = serde_json::to_string(&status).expect("serialize");
        assert_eq!(json, format!("\"{status}\""));
        assert_eq!(serde_json::from_str::<MigrationStatus>(&json).ok(), Some(status));
    }
    let newer: MigrationStatus = serde_json::from_str("\"some-future-state\"").expect("parse");
    assert_eq!(newer, MigrationStatus::Unknown);
}

#[test]
fn ram_figures_are_written_in_snake_case() {
    let ram = parse(SOURCE_COMPLETED).ram.expect("ram");
    let json = serde_json::to_value(&ram).expect("serialize");
    assert_eq!(json["postcopy_requests"], 2);
    assert_eq!(json["dirty_pages_rate"], 0);
    assert!(json.get("postcopy-requests").is_none());
}

#[test]
fn errors_explain_themselves() {
    let failed = MigrationError::Failed {
        source_error: Some("Unable to write to socket: Broken pipe".into()),
        destination_error: Some("load of migration failed".into()),
    };
    assert_eq!(
        failed.to_string(),
        "migration failed: Unable to write to socket: Broken pipe \
         (destination: load of migration failed)"
    );
    let paused = MigrationError::PostcopyPaused { error_desc: None };
    assert_eq!(paused.to_string(), "postcopy paused: QEMU gave no reason");
    let wrong = MigrationError::WrongStatus {
        side: Side::Destination,
        status: MigrationStatus::PostcopyActive,
        expected: "postcopy-paused".into(),
    };
    assert_eq!(
        wrong.to_string(),
        "the destination QEMU's migration is postcopy-active, but this needs it postcopy-paused"
    );
}
