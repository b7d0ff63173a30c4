//! Two simulated hosts: namespaces, the veth between them, the bandwidth
//! limit, the delay relay, and gmemd + QEMU started on each side.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use gmem_tests::net::spawn_in_netns;
use gmem_tests::seqio::{self, SeqioReport};
use gmem_tests::{GmemdOptions, HostPair, MigrationOptions, MigrationPair, VmOptions};

/// A server in `ns` on an ephemeral port of `addr`: for every connection it
/// runs `serve` in a thread of its own. Runs until the namespace goes.
fn server_in(ns: &str, addr: std::net::Ipv4Addr, serve: fn(TcpStream)) -> Result<SocketAddr> {
    let (tx, rx) = mpsc::channel();
    spawn_in_netns(ns, "test-server", move || {
        let listener = TcpListener::bind((addr, 0))?;
        tx.send(listener.local_addr()?)?;
        for stream in listener.incoming() {
            let stream = stream?;
            std::thread::spawn(move || serve(stream));
        }
        Ok(())
    })?;
    rx.recv_timeout(Duration::from_secs(5)).context("the server did not start")
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn sink(mut stream: TcpStream) {
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
}

/// Runs `body` on a thread in `ns` and returns its result.
fn in_ns<T: Send + 'static>(ns: &str, body: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match spawn_in_netns(ns, "test-client", body)?.join() {
        Ok(result) => result,
        Err(_) => anyhow::bail!("the client thread panicked"),
    }
}

/// The fastest of `rounds` one-byte round trips over `stream`.
fn min_round_trip(stream: &mut TcpStream, rounds: usize) -> Result<Duration> {
    let mut best = Duration::MAX;
    for round in 0..rounds {
        let started = Instant::now();
        stream.write_all(&[round as u8])?;
        let mut reply = [0u8];
        stream.read_exact(&mut reply)?;
        ensure!(reply[0] == round as u8);
        best = best.min(started.elapsed());
    }
    Ok(best)
}

#[test]
fn a_relay_delays_and_cuts_while_accepting_new_connections() -> Result<()> {
    let hosts = HostPair::create()?;
    let target = server_in(hosts.dst_ns(), hosts.dst_addr(), echo)?;
    let relay = hosts.delay_relay(target.port(), Duration::from_millis(5))?;
    let addr = relay.addr();
    ensure!(addr.ip() == hosts.src_addr());

    // The root namespace cannot reach either address.
    ensure!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());

    let mut stream = in_ns(hosts.src_ns(), move || Ok(TcpStream::connect(addr)?))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let rtt = min_round_trip(&mut stream, 5)?;
    ensure!(rtt >= Duration::from_millis(10) && rtt < Duration::from_millis(500), "round trip {rtt:?}");
    ensure!(relay.connections() == 1);

    // After the cut, the old connection reads EOF (or a reset), never data.
    relay.cut();
    let _ = stream.write_all(b"x");
    let mut buf = [0u8; 8];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => anyhow::bail!("read {n} bytes from a cut connection"),
        Err(e) => ensure!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the cut did not end the connection: {e}"
        ),
    }

    // A new connection through the same relay works.
    let mut again = in_ns(hosts.src_ns(), move || Ok(TcpStream::connect(addr)?))?;
    again.set_read_timeout(Some(Duration::from_secs(5)))?;
    ensure!(min_round_trip(&mut again, 2)? >= Duration::from_millis(10));
    ensure!(relay.connections() == 2);

    // Without a delay it is a plain relay; a half close reaches the far side
    // and the echo's end comes back.
    let plain = hosts.delay_relay(target.port(), Duration::ZERO)?;
    let plain_addr = plain.addr();
    let mut direct = in_ns(hosts.src_ns(), move || Ok(TcpStream::connect(plain_addr)?))?;
    direct.set_read_timeout(Some(Duration::from_secs(5)))?;
    ensure!(min_round_trip(&mut direct, 5)? < Duration::from_millis(10));
    direct.write_all(b"bye")?;
    direct.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    direct.read_to_end(&mut rest)?;
    ensure!(rest == b"bye", "{rest:?}");
    Ok(())
}

#[test]
fn bandwidth_limit_slows_the_source_side() -> Result<()> {
    const BYTES: usize = 4 << 20;
    let hosts = HostPair::create()?;
    hosts.limit_bandwidth("40mbit")?;
    let target = server_in(hosts.dst_ns(), hosts.dst_addr(), sink)?;
    let elapsed = in_ns(hosts.src_ns(), move || {
        let mut stream = TcpStream::connect(target)?;
        let started = Instant::now();
        stream.write_all(&vec![0x5a; BYTES])?;
        stream.shutdown(Shutdown::Write)?;
        // The sink closes after reading everything: wait for that.
        stream.read_to_end(&mut Vec::new())?;
        Ok(started.elapsed())
    })?;
    // 4 MiB at 40 Mbit/s (5 MB/s) take about 0.84 s.
    ensure!(elapsed >= Duration::from_millis(600) && elapsed < Duration::from_secs(10), "4 MiB took {elapsed:?}");
    Ok(())
}

#[test]
fn namespaces_go_with_the_pair() -> Result<()> {
    let hosts = HostPair::create()?;
    let names = [hosts.src_ns().to_owned(), hosts.dst_ns().to_owned()];
    ensure!(names[0] != names[1]);
    ensure!(HostPair::create()?.src_ns() != names[0], "two pairs share a namespace");
    for name in &names {
        ensure!(Path::new("/var/run/netns").join(name).exists());
    }
    drop(hosts);
    for name in &names {
        ensure!(!Path::new("/var/run/netns").join(name).exists(), "{name} is still there");
    }
    Ok(())
}

#[test]
fn a_migration_pair_runs_the_source_and_parks_the_destination() -> Result<()> {
    const BLOCKS: u64 = 256;
    let options = MigrationOptions {
        gmemd: GmemdOptions { memory: "256M".into(), disk_bytes: 16 << 20, ..GmemdOptions::default() },
        vm: VmOptions::new("pair", "seqio").param("blocks", BLOCKS).param("seed", 5),
    };
    let mut pair = MigrationPair::start(&options)?;
    ensure!(pair.dest.disk == pair.source.disk);
    // Both QEMUs are up (until `ip netns exec` has exec'd, the pid is still
    // `ip`'s, in our namespace): the source runs, the destination waits for
    // an incoming migration.
    ensure!(pair.source_vm.qmp()?.query_status()? == "running");
    let status = pair.dest_vm.qmp()?.query_status()?;
    ensure!(status == "inmigrate", "destination status {status}");
    // Both sides really run in their namespaces.
    for (pid, ns) in [
        (pair.source.pid(), pair.hosts.src_ns()),
        (pair.source_vm.pid(), pair.hosts.src_ns()),
        (pair.dest.pid(), pair.hosts.dst_ns()),
        (pair.dest_vm.pid(), pair.hosts.dst_ns()),
    ] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
        let named = std::fs::metadata(Path::new("/var/run/netns").join(ns))?;
        let inode = std::os::unix::fs::MetadataExt::ino(&named);
        ensure!(theirs.to_string_lossy() == format!("net:[{inode}]"), "pid {pid} is in {theirs:?}, not {ns}");
    }
    let results = pair.source_vm.wait_exit(Duration::from_secs(180))?;
    let report = SeqioReport::from_results(&results)?;
    ensure!(report.is_clean(), "{report:?}");
    ensure!(seqio::verify_disk(&pair.dest.disk, BLOCKS, 5)? == report.sum);
    ensure!(pair.dest_vm.qmp()?.query_status()? == "inmigrate");
    Ok(())
}
