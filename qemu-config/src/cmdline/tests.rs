use super::*;

fn region(id: &str, size: u64, fd: u32) -> RegionInfo {
    RegionInfo {
        id: id.into(),
        size,
        fd_path: format!("/proc/42/fd/{fd}"),
        backing: "memfd".into(),
        populated_bytes: 0,
        mapped_by: 0,
        awaiting_adoption: false,
    }
}

/// The values following each occurrence of `option`.
fn value_of<'a>(args: &'a [String], option: &str) -> Vec<&'a str> {
    args.windows(2).filter(|pair| pair[0] == option).map(|pair| pair[1].as_str()).collect()
}

const MIB: u64 = 1 << 20;

#[test]
fn single_region_is_main_ram() {
    let cmd = QemuCommand::new(&[region("ram0", 256 * MIB, 3)], "/run/gmemd/vhost.sock", 2).expect("valid");
    let args = cmd.to_args();
    assert_eq!(value_of(&args, "-machine"), ["pc,memory-backend=ram0"]);
    assert_eq!(value_of(&args, "-m"), ["268435456B"]);
    assert_eq!(
        value_of(&args, "-object"),
        ["memory-backend-file,id=ram0,share=on,size=268435456,mem-path=/proc/42/fd/3"]
    );
    assert_eq!(value_of(&args, "-device"), ["vhost-user-blk-pci,chardev=gmemd0,num-queues=2"]);
    assert_eq!(value_of(&args, "-chardev"), ["socket,id=gmemd0,path=/run/gmemd/vhost.sock,reconnect-ms=1000"]);
    for flag in ["-nodefaults", "-no-reboot"] {
        assert!(args.iter().any(|a| a == flag), "{flag} missing");
    }
    assert_eq!(value_of(&args, "-display"), ["none"]);
    assert_eq!(value_of(&args, "-serial"), ["stdio"]);
    assert_eq!(value_of(&args, "-smp"), ["1"]);
    assert!(value_of(&args, "-qmp").is_empty());
    assert!(value_of(&args, "-kernel").is_empty());
}

#[test]
fn further_regions_are_dimms() {
    let regions = [region("ram0", 512 * MIB, 3), region("ram1", 128 * MIB, 4), region("ram2", 256 * MIB, 5)];
    let args = QemuCommand::new(&regions, "/s", 1).expect("valid").to_args();
    assert_eq!(value_of(&args, "-machine"), ["pc,memory-backend=ram0"]);
    assert_eq!(value_of(&args, "-m"), [format!("{}B,slots=2,maxmem={}B", 512 * MIB, 896 * MIB)]);
    let objects = value_of(&args, "-object");
    assert_eq!(objects.len(), 3);
    assert!(objects[2].starts_with("memory-backend-file,id=ram2,share=on,size=268435456,"));
    assert_eq!(
        value_of(&args, "-device")[..2],
        ["pc-dimm,id=dimm-ram1,memdev=ram1", "pc-dimm,id=dimm-ram2,memdev=ram2"]
    );
}

#[test]
fn accelerators_and_options() {
    let regions = [region("ram0", MIB, 3)];
    let tcg = QemuCommand::new(&regions, "/s", 1).expect("valid");
    let tcg_args = tcg.to_args();
    assert_eq!(value_of(&tcg_args, "-accel"), ["tcg"]);
    assert_eq!(value_of(&tcg_args, "-cpu"), ["max"]);

    let kvm = tcg
        .accel(Accel::Kvm)
        .cpus(NonZeroU32::new(4).expect("nonzero"))
        .serial(SerialSink::File("/tmp/a,b/serial.log".into()))
        .qmp("/tmp/q,1.sock")
        .kernel("/k")
        .initrd("/i")
        .append("console=ttyS0 quiet")
        .reconnect_ms(250)
        .aux_ram_share(true)
        .machine_type("pc-i440fx-10.0")
        .downtime_trace(true)
        .extra_args(["-S"]);
    let args = kvm.to_args();
    assert_eq!(value_of(&args, "-trace"), ["vmstate_downtime_checkpoint"]);
    assert_eq!(value_of(&args, "-msg"), ["timestamp=on"]);
    assert_eq!(args.last().map(String::as_str), Some("-S"), "extra arguments come last");
    assert_eq!(value_of(&args, "-accel"), ["kvm"]);
    assert_eq!(value_of(&args, "-cpu"), ["host"]);
    assert_eq!(value_of(&args, "-smp"), ["4"]);
    assert_eq!(value_of(&args, "-machine"), ["pc-i440fx-10.0,memory-backend=ram0,aux-ram-share=on"]);
    // The console is appended to, through a chardev (QemuOpts: comma doubled).
    assert_eq!(value_of(&args, "-serial"), ["chardev:serial0"]);
    assert_eq!(value_of(&args, "-chardev")[1], "file,id=serial0,path=/tmp/a,,b/serial.log,append=on");
    assert_eq!(value_of(&args, "-qmp"), ["unix:/tmp/q,,1.sock,server=on,wait=off"]);
    assert_eq!(value_of(&args, "-kernel"), ["/k"]);
    assert_eq!(value_of(&args, "-initrd"), ["/i"]);
    assert_eq!(value_of(&args, "-append"), ["console=ttyS0 quiet"]);
    assert!(value_of(&args, "-chardev")[0].ends_with(",reconnect-ms=250"));
    assert_eq!(args.last().map(String::as_str), Some("-S"));
    assert_eq!(kvm.qmp_path(), Some(Path::new("/tmp/q,1.sock")));
}

#[test]
fn display_is_shell_quoted() {
    let cmd = QemuCommand::new(&[region("ram0", MIB, 3)], "/run/my vm/vhost.sock", 1)
        .expect("valid")
        .append("console=ttyS0 it's")
        .qemu_binary("/opt/qemu/bin/qemu-system-x86_64");
    let line = cmd.to_string();
    assert!(line.starts_with("/opt/qemu/bin/qemu-system-x86_64 -nodefaults -no-reboot "));
    assert!(line.contains(" -chardev 'socket,id=gmemd0,path=/run/my vm/vhost.sock,reconnect-ms=1000' "));
    assert!(line.ends_with(r" -append 'console=ttyS0 it'\''s'"), "{line}");
    assert!(line.contains(" -m 1048576B "));
}

#[test]
fn paths_with_commas_are_escaped_for_qemu() {
    let mut odd = region("ram0", MIB, 3);
    odd.fd_path = "/tmp/a,b".into();
    let args = QemuCommand::new(&[odd], "/tmp/c,d.sock", 1).expect("valid").to_args();
    assert!(value_of(&args, "-object")[0].ends_with(",mem-path=/tmp/a,,b"));
    assert!(value_of(&args, "-chardev")[0].contains(",path=/tmp/c,,d.sock,"));
}

#[test]
fn invalid_inputs_are_typed_errors() {
    let ok = region("ram0", MIB, 3);
    let err = |regions: &[RegionInfo], queues| QemuCommand::new(regions, "/s", queues).err();
    assert!(matches!(err(&[], 1), Some(CmdlineError::NoRegions)));
    assert!(matches!(err(std::slice::from_ref(&ok), 0), Some(CmdlineError::ZeroQueues)));
    assert!(matches!(
        err(&[region("ram0", 0, 3)], 1),
        Some(CmdlineError::ZeroSize { id }) if id == "ram0"
    ));
    for bad in ["", "0ram", "ram 0", "ram,0", "räm"] {
        assert!(
            matches!(err(&[region(bad, MIB, 3)], 1), Some(CmdlineError::InvalidRegionId { .. })),
            "{bad:?} accepted"
        );
    }
    assert!(matches!(err(&[ok.clone(), region("ram0", MIB, 4)], 1), Some(CmdlineError::DuplicateRegionId { .. })));
    let mut no_path = ok.clone();
    no_path.fd_path.clear();
    assert!(matches!(err(&[no_path], 1), Some(CmdlineError::EmptyFdPath { .. })));
    assert!(matches!(err(&[ok, region("ram1", u64::MAX, 4)], 1), Some(CmdlineError::TotalSizeOverflow)));
}

#[test]
fn sinks_and_accels_parse() {
    assert_eq!("stdio".parse(), Ok(SerialSink::Stdio));
    assert_eq!("none".parse(), Ok(SerialSink::None));
    assert_eq!("file:/a b".parse(), Ok(SerialSink::File("/a b".into())));
    assert!("file:".parse::<SerialSink>().is_err());
    assert!("pty".parse::<SerialSink>().is_err());
    assert_eq!("kvm".parse(), Ok(Accel::Kvm));
    assert_eq!("tcg".parse(), Ok(Accel::Tcg));
    assert!("hvf".parse::<Accel>().is_err());
}
