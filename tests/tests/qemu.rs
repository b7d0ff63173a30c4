//! Real QEMU 10, a real Linux guest, the real gmemd: guest I/O through the
//! device, several queues, and guest RAM outliving QEMU.

use std::io::Read;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use gmem_tests::{poll_until, Gmemd, GmemdOptions, Vm};
use sha2::{Digest, Sha256};

const BOOT_AND_RUN: Duration = Duration::from_secs(180);
/// For QEMU and gmemctl to start or stop (no guest boot involved).
const WAIT: Duration = Duration::from_secs(20);

fn sha256_of_prefix(path: &std::path::Path, bytes: u64) -> Result<String> {
    let mut file = std::fs::File::open(path)?.take(bytes);
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[test]
fn guest_writes_32_mib_and_reads_it_back_through_gmemd() -> Result<()> {
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    let mut vm = Vm::boot(&gmemd, "write-verify", 1, "write-verify", &[("mib", "32")])?;
    let results = vm.wait_exit(BOOT_AND_RUN)?;
    let written = results.get("written_sha256").context("no written_sha256")?;
    ensure!(
        results.get("match") == Some("yes"),
        "guest readback differs: {written} vs {:?}",
        results.get("readback_sha256")
    );
    ensure!(results.get("readback_sha256") == Some(written));
    // The bytes really reached the image on the host.
    ensure!(
        sha256_of_prefix(&gmemd.disk, 32 << 20)? == written,
        "the image on the host does not hold what the guest wrote"
    );
    ensure!(results.get("discard") == Some("ok"), "discard: {:?}", results.get("discard"));
    let device = gmemd.client()?.query_device()?;
    ensure!(device.queues[0].bytes_from_guest >= 32 << 20, "{device:?}");
    ensure!(device.queues[0].bytes_to_guest >= 32 << 20, "{device:?}");
    ensure!(device.errors == 0, "{device:?}");
    Ok(())
}

#[test]
fn two_vcpus_drive_two_queues() -> Result<()> {
    let gmemd = Gmemd::start(&GmemdOptions { queues: 2, ..GmemdOptions::default() })?;
    let mut vm = Vm::boot(&gmemd, "multiqueue", 2, "multiqueue", &[])?;
    let results = vm.wait_exit(BOOT_AND_RUN)?;
    ensure!(
        results.get("slices_failed") == Some("0") && results.get("slices_ok") == Some("2"),
        "{:?}",
        vm.serial_text()
    );
    let device = gmemd.client()?.query_device()?;
    ensure!(device.queues.len() == 2);
    for queue in &device.queues {
        ensure!(queue.requests > 0, "queue {} served nothing: {device:?}", queue.index);
    }
    Ok(())
}

/// Counts `needle` in the region file behind `fd_path`, read through the
/// daemon's /proc fd link as QEMU opens it.
fn count_in_region(fd_path: &str, needle: &[u8]) -> Result<usize> {
    let mut file = std::fs::File::open(fd_path).with_context(|| format!("opening {fd_path}"))?;
    let mut buf = vec![0u8; 4 << 20];
    let (mut count, mut carry) = (0, Vec::new());
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(count);
        }
        let mut window = std::mem::take(&mut carry);
        window.extend_from_slice(&buf[..n]);
        count += window.windows(needle.len()).filter(|w| *w == needle).count();
        carry = window[window.len().saturating_sub(needle.len() - 1)..].to_vec();
    }
}

#[test]
fn guest_ram_outlives_a_killed_qemu_and_a_new_qemu_reconnects() -> Result<()> {
    let mut gmemd = Gmemd::start(&GmemdOptions::default())?;
    let token: String = (0..16).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let doubled = format!("{token}{token}");
    let region = gmemd.client()?.query_regions()?.remove(0);

    let mut first = Vm::boot(&gmemd, "first", 1, "ram-token", &[("token", &token)])?;
    first.wait_for("ram_token", BOOT_AND_RUN)?;
    // QEMU maps gmemd's memfd, not memory of its own.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", first.pid()))?;
    ensure!(maps.contains("/memfd:gmemd-ram0"), "QEMU does not map gmemd's region:\n{maps}");
    ensure!(gmemd.client()?.query_status()?.frontends.len() == 1);
    first.kill()?;

    // The guest's bytes are still in gmemd's RAM.
    let found = count_in_region(&region.fd_path, doubled.as_bytes())?;
    ensure!(found > 1000, "the guest's RAM content is gone after QEMU died (found {found} copies)");
    // The search can fail: a fresh region of another daemon does not hold it.
    let fresh = Gmemd::start(&GmemdOptions::default())?;
    let fresh_region = fresh.client()?.query_regions()?.remove(0);
    ensure!(
        count_in_region(&fresh_region.fd_path, doubled.as_bytes())? == 0,
        "the search finds tokens that were never written"
    );

    // A new QEMU attaches to the same daemon and the same region and does I/O.
    ensure!(gmemd.alive(), "gmemd died with its frontend:\n{}", gmemd.log());
    let mut second = Vm::boot(&gmemd, "second", 1, "write-verify", &[("mib", "8")])?;
    let results = second.wait_exit(BOOT_AND_RUN)?;
    ensure!(results.get("match") == Some("yes"));
    let regions = gmemd.client()?.query_regions()?;
    ensure!(regions[0].fd_path == region.fd_path, "the region changed across frontends");
    ensure!(gmemd.log().matches("connected (pid").count() >= 2, "{}", gmemd.log());
    Ok(())
}

/// `gmemctl launch` does not leave QEMU behind: SIGTERM to gmemctl stops
/// QEMU (forwarded), and so does SIGKILL (QEMU's parent-death signal).
#[test]
fn gmemctl_launch_takes_qemu_down_with_it() -> Result<()> {
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        let log = gmemd.dir.path().join(format!("gmemctl-{name}.log"));
        let mut launch = std::process::Command::new(gmem_tests::binaries()?.join("gmemctl"))
            .arg("--control")
            .arg(&gmemd.control)
            .args(["launch", "--serial", "none"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let text = || std::fs::read_to_string(&log).unwrap_or_default();
        let qemu = poll_until("QEMU's pid in gmemctl's log", WAIT, || {
            let text = text();
            let pid =
                text.split("QEMU pid ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<i32>().ok()?;
            Some(pid)
        })?;
        poll_until("QEMU attached to gmemd", WAIT, || {
            (gmemd.client().ok()?.query_status().ok()?.frontends.len() == 1).then_some(())
        })?;
        // SAFETY: kill takes a pid and a signal number by value.
        ensure!(unsafe { libc::kill(launch.id() as i32, signal) } == 0, "signalling gmemctl");
        let status = launch.wait()?;
        eprintln!("{name}: gmemctl exited {status}; log:\n{}", text());
        poll_until(&format!("QEMU gone after {name} to gmemctl"), WAIT, || (!running(qemu)).then_some(()))?;
        poll_until("gmemd to see QEMU go", WAIT, || {
            gmemd.client().ok()?.query_status().ok()?.frontends.is_empty().then_some(())
        })?;
    }
    Ok(())
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn running(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}
