//! The control socket of a real gmemd: every command, and input that must
//! get an error reply without costing the connection or the daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use gmem_protocol::{Command, ControlClient, ErrorClass, EventKind, Reply, MAX_LINE_BYTES};
use gmem_tests::{Gmemd, GmemdOptions};

fn small() -> GmemdOptions {
    GmemdOptions { memory: "64M".into(), queues: 2, disk_bytes: 8 << 20, ..GmemdOptions::default() }
}

fn error_class(reply: &Reply) -> Option<ErrorClass> {
    match reply {
        Reply::Error { error, .. } => Some(error.class),
        _ => None,
    }
}

#[test]
fn every_command_answers() -> Result<()> {
    let mut gmemd = Gmemd::start(&small())?;
    let mut client = gmemd.client()?;
    let status = client.query_status()?;
    ensure!(status.pid == gmemd.pid() && status.frontends.is_empty(), "{status:?}");
    ensure!(status.vhost_user_socket == gmemd.socket.display().to_string());
    let regions = client.query_regions()?;
    ensure!(regions.len() == 1 && regions[0].id == "ram0" && regions[0].size == 64 << 20, "{regions:?}");
    ensure!(regions[0].fd_path.starts_with(&format!("/proc/{}/fd/", gmemd.pid())));
    ensure!(regions[0].backing == "memfd");
    let device = client.query_device()?;
    ensure!(device.queues.len() == 2 && device.capacity_bytes == 8 << 20 && !device.readonly, "{device:?}");
    let mode = std::fs::metadata(&gmemd.control)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "control socket mode {mode:o}");
    client.quit()?;
    ensure!(gmemd.wait_exit(Duration::from_secs(10))?.success(), "{}", gmemd.log());
    ensure!(!gmemd.control.exists() && !gmemd.socket.exists(), "sockets left behind");
    Ok(())
}

#[test]
fn bad_input_gets_errors_and_the_session_goes_on() -> Result<()> {
    let mut gmemd = Gmemd::start(&small())?;
    let mut client = gmemd.client()?;
    let cases: [(&[u8], ErrorClass); 6] = [
        (b"garbage", ErrorClass::GenericError),
        (b"{\"execute\":", ErrorClass::GenericError),
        (b"[]", ErrorClass::GenericError),
        (b"{\"execute\":\"launch-missiles\"}", ErrorClass::CommandNotFound),
        (b"{\"execute\":\"query-status\",\"arguments\":{\"verbose\":1}}", ErrorClass::InvalidArguments),
        (b"{\"execute\":\"query-status\",\"arguments\":\"x\"}", ErrorClass::GenericError),
    ];
    for (line, class) in cases {
        let reply = client.send_raw(line)?;
        ensure!(error_class(&reply) == Some(class), "{}: {reply:?}", String::from_utf8_lossy(line));
    }
    // A huge line is refused and skipped; the next line is served.
    let huge = vec![b'x'; MAX_LINE_BYTES * 4];
    ensure!(error_class(&client.send_raw(&huge)?) == Some(ErrorClass::GenericError));
    ensure!(client.query_status().is_ok());
    // Invalid UTF-8.
    ensure!(error_class(&client.send_raw(b"\xff\xfe{}")?) == Some(ErrorClass::GenericError));
    // The id is echoed, as in QMP.
    match client.send_raw(br#"{"execute":"query-status","id":"req-7"}"#)? {
        Reply::Return { id, .. } => ensure!(id.as_ref().map(|id| id.json()) == Some(r#""req-7""#)),
        other => anyhow::bail!("{other:?}"),
    }
    ensure!(gmemd.alive());
    Ok(())
}

#[test]
fn half_lines_and_vanishing_clients_do_not_disturb_others() -> Result<()> {
    let mut gmemd = Gmemd::start(&small())?;
    // A client that sends half a request and goes away.
    let mut half = UnixStream::connect(&gmemd.control)?;
    half.write_all(br#"{"execute":"query-"#)?;
    drop(half);
    // A client that sends half a line and stays: nothing is answered yet,
    // and other clients are served meanwhile.
    let mut slow = UnixStream::connect(&gmemd.control)?;
    slow.write_all(br#"{"execute":"query-"#)?;
    ensure!(gmemd.client()?.query_device().is_ok());
    slow.write_all(b"regions\"}\n")?;
    let mut line = String::new();
    BufReader::new(slow.try_clone()?).read_line(&mut line)?;
    ensure!(line.contains("\"return\"") && line.contains("ram0"), "{line}");
    // Pipelined requests get one reply each, in order.
    let mut pipelined = UnixStream::connect(&gmemd.control)?;
    pipelined
        .write_all(format!("{}\n{}\n", Command::QueryStatus.to_line(), Command::QueryDevice.to_line()).as_bytes())?;
    let mut reader = BufReader::new(pipelined);
    let (mut first, mut second) = (String::new(), String::new());
    reader.read_line(&mut first)?;
    reader.read_line(&mut second)?;
    ensure!(first.contains("uptime_ms") && second.contains("capacity_bytes"), "{first}{second}");
    ensure!(gmemd.alive(), "{}", gmemd.log());
    Ok(())
}

#[test]
fn frontend_connections_are_announced_as_events() -> Result<()> {
    let gmemd = Gmemd::start(&small())?;
    let mut client = ControlClient::connect(&gmemd.control)?;
    client.query_status()?; // subscribed from here on
    let frontend = UnixStream::connect(&gmemd.socket)?;
    let connected = client.next_event(Duration::from_secs(10))?.context("no connect event")?;
    ensure!(connected.event == EventKind::FrontendConnected, "{connected:?}");
    ensure!(client.query_status()?.frontends.len() == 1);
    drop(frontend);
    let gone = client.next_event(Duration::from_secs(10))?.context("no disconnect event")?;
    ensure!(gone.event == EventKind::FrontendDisconnected, "{gone:?}");
    ensure!(client.query_status()?.frontends.is_empty());
    Ok(())
}

/// A member given twice was read with the last one winning, so this quit
/// gmemd; integer ids came back as floats.
#[test]
fn a_member_given_twice_is_refused_and_ids_come_back_as_sent() -> Result<()> {
    let mut gmemd = Gmemd::start(&small())?;
    let stream = UnixStream::connect(&gmemd.control)?;
    let mut lines = BufReader::new(stream.try_clone()?);
    let mut ask = |request: &str| -> Result<String> {
        (&stream).write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        lines.read_line(&mut line)?;
        Ok(line)
    };
    let reply = ask(r#"{"execute":"query-status","execute":"quit","id":1}"#)?;
    ensure!(reply.contains("\"error\"") && reply.contains("'execute' is given twice"), "{reply}");
    ensure!(gmemd.alive(), "a request naming quit twice over query-status quit gmemd");
    for id in ["18446744073709551616", "12345678901234567890123", "-0", "7", r#""s""#] {
        let reply = ask(&format!(r#"{{"execute":"query-device","id":{id}}}"#))?;
        ensure!(reply.trim_end().ends_with(&format!(r#""id":{id}}}"#)), "id {id} came back as: {reply}");
    }
    Ok(())
}
