use super::*;

#[test]
fn modes_by_name() {
    assert_eq!("cpr-exec".parse(), Ok(CprMode::CprExec));
    assert_eq!("cpr-transfer".parse(), Ok(CprMode::CprTransfer));
    assert!("cpr-reboot".parse::<CprMode>().is_err());
    assert_eq!(CprMode::CprExec.to_string(), "cpr-exec");
    assert!(CprMode::CprExec.min_version() > CprMode::CprTransfer.min_version());
    assert_eq!(serde_json::to_value(CprMode::CprTransfer).ok(), Some(json!("cpr-transfer")));
}

#[test]
fn versions() {
    let debian = "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-2~bpo13+1)\nCopyright (c) 2003-2025 ...";
    assert_eq!(QemuVersion::from_version_output(debian), Some(QemuVersion::new(11, 1, 3)));
    assert_eq!(QemuVersion::from_version_output("QEMU emulator version 10.2"), Some(QemuVersion::new(10, 2, 0)));
    assert_eq!(QemuVersion::from_version_output("qemu-storage-daemon"), None);
    let greeting = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}}});
    let ten = QemuVersion::from_greeting(&greeting).expect("version");
    assert_eq!(ten.to_string(), "10.0.2");
    assert!(ten < CprMode::CprExec.min_version() && ten >= CprMode::CprTransfer.min_version());
    assert_eq!(serde_json::to_value(ten).ok(), Some(json!("10.0.2")));
}

#[test]
fn pause_from_event_timestamps() {
    let event = |name: &str, seconds: i64, microseconds: i64| json!({"event": name, "timestamp": {"seconds": seconds, "microseconds": microseconds}});
    let old = [event("STOP", 100, 999_000)];
    let new = [event("RESUME", 101, 4_500), event("SHUTDOWN", 102, 0)];
    assert_eq!(paused_ms(&old, &new), Some(5.5));
    assert_eq!(paused_ms(&old, &[]), None, "RESUME came before the hop listened");
    assert_eq!(paused_ms(&[], &new), None);
}

#[test]
fn next_qemu_needs_a_qmp_socket() {
    let region = gmem_protocol::RegionInfo {
        id: "ram0".into(),
        size: 1 << 30,
        fd_path: "/proc/42/fd/3".into(),
        backing: "memfd".into(),
        populated_bytes: 0,
        mapped_by: 0,
        awaiting_adoption: false,
    };
    let cmd = QemuCommand::new(&[region], "/run/v.sock", 1).expect("valid").aux_ram_share(true);
    assert!(matches!(NextQemu::from_command(&cmd), Err(LiveUpdateError::NoQmpSocket)));
    let next = NextQemu::from_command(&cmd.qmp("/run/q.sock").qemu_binary("/opt/qemu")).expect("next");
    assert_eq!(next.qmp, PathBuf::from("/run/q.sock"));
    assert_eq!(next.binary, PathBuf::from("/opt/qemu"));
    assert!(next.args.iter().any(|a| a.ends_with("aux-ram-share=on")));
}
