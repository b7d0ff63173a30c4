//! The framing against a scripted fake QEMU on the other end of a socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

use super::*;

const GREETING: &str =
    r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, "capabilities": ["oob"]}}"#;

/// The fake QEMU's side: reads requests, writes whatever the script says.
struct FakeQemu {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl FakeQemu {
    fn new(stream: UnixStream) -> Self {
        FakeQemu { writer: stream.try_clone().expect("clone"), reader: BufReader::new(stream) }
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).expect("write");
    }

    /// Reads one request, checks its command, and returns it.
    fn expect(&mut self, command: &str) -> Value {
        self.expect_kind("execute", command)
    }

    /// Like `expect`, for an `execute` or `exec-oob` request.
    fn expect_kind(&mut self, kind: &str, command: &str) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read");
        let request: Value = serde_json::from_str(&line).expect("request is JSON");
        assert_eq!(request[kind], command, "{line}");
        request
    }

    /// The greeting and capabilities negotiation.
    fn negotiate(&mut self) {
        self.send(&format!("{GREETING}\n"));
        let request = self.expect("qmp_capabilities");
        assert_eq!(request["arguments"], json!({"enable": ["oob"]}), "oob is offered, so enabled");
        self.send(&format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]));
    }
}

fn pair(script: impl FnOnce(FakeQemu) + Send + 'static) -> (QmpClient, thread::JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let server = thread::spawn(move || script(FakeQemu::new(theirs)));
    let client = QmpClient::handshake(ours).expect("handshake");
    (client, server)
}

#[test]
fn execute_returns_values_and_queues_interleaved_events() {
    let (mut client, server) = pair(|mut qemu| {
        qemu.negotiate();
        let request = qemu.expect("query-status");
        let id = &request["id"];
        // An event before the reply, and a reply split across two writes.
        qemu.send(r#"{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#);
        qemu.send("\n{\"return\": {\"status\": \"run");
        thread::sleep(Duration::from_millis(50));
        qemu.send(&format!("ning\", \"running\": true}}, \"id\": {id}}}\n"));
        let request = qemu.expect("device_add");
        assert_eq!(request["arguments"], json!({"driver": "pc-dimm", "id": "d1"}));
        qemu.send(&format!(
            "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"nope\"}}, \"id\": {}}}\n",
            request["id"]
        ));
    });
    assert_eq!(client.greeting()["QMP"]["version"]["qemu"]["major"], 10);
    assert_eq!(client.query_status().expect("status"), "running");
    let error = client.execute("device_add", json!({"driver": "pc-dimm", "id": "d1"})).expect_err("error reply");
    match error {
        QmpError::Command { command, class, desc } => {
            assert_eq!((command.as_str(), class.as_str(), desc.as_str()), ("device_add", "GenericError", "nope"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let events = client.events().expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"], "RESUME");
    assert!(client.events().expect("events").is_empty());
    server.join().expect("server");
}

#[test]
fn wait_event_skips_and_keeps_other_events() {
    let (mut client, server) = pair(|mut qemu| {
        qemu.negotiate();
        qemu.send("{\"event\": \"STOP\"}\n");
        thread::sleep(Duration::from_millis(30));
        qemu.send("{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true}}\n");
        let request = qemu.expect("quit");
        qemu.send(&format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]));
    });
    let shutdown = client.wait_event("SHUTDOWN", Duration::from_secs(5)).expect("shutdown");
    assert_eq!(shutdown["data"]["guest"], true);
    let stop = client.wait_event("STOP", Duration::from_millis(10)).expect("queued STOP");
    assert_eq!(stop["event"], "STOP");
    let started = Instant::now();
    assert!(matches!(client.wait_event("RESET", Duration::from_millis(100)), Err(QmpError::Timeout(_))));
    assert!(started.elapsed() >= Duration::from_millis(100));
    client.quit().expect("quit");
    server.join().expect("server");
}

#[test]
fn closed_and_silent_servers_are_errors() {
    let (mut client, server) = pair(|mut qemu| {
        qemu.negotiate();
        qemu.expect("stop");
        // Hang up mid-command.
    });
    assert!(matches!(client.execute("stop", Value::Null), Err(QmpError::Closed)));
    server.join().expect("server");

    let (mut client, server) = pair(|mut qemu| {
        qemu.negotiate();
        qemu.expect("cont");
        thread::sleep(Duration::from_millis(300));
    });
    client.set_timeout(Duration::from_millis(100));
    assert!(matches!(client.execute("cont", Value::Null), Err(QmpError::Timeout(_))));
    server.join().expect("server");
}

#[test]
fn a_server_that_does_not_greet_is_rejected() {
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    theirs.write_all(b"{\"return\": {}}\n").expect("write");
    assert!(matches!(QmpClient::handshake(ours), Err(QmpError::Malformed(_))));
}

#[test]
fn connect_retries_until_the_socket_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let server_path = path.clone();
    let server = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        let listener = UnixListener::bind(server_path).expect("bind");
        let (stream, _) = listener.accept().expect("accept");
        let mut qemu = FakeQemu::new(stream);
        qemu.negotiate();
        let request = qemu.expect("quit");
        qemu.send(&format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]));
    });
    let mut client = QmpClient::connect(&path, Duration::from_secs(5)).expect("connect");
    client.quit().expect("quit");
    server.join().expect("server");

    let missing = dir.path().join("never.sock");
    let error = QmpClient::connect(&missing, Duration::from_millis(50)).expect_err("no socket");
    assert!(matches!(error, QmpError::Connect { .. }), "{error}");
    let mut tries = 0;
    let gave_up = QmpClient::connect_while(&missing, Duration::from_secs(5), || {
        tries += 1;
        tries < 3
    });
    assert!(gave_up.is_err());
    assert_eq!(tries, 3);
}

#[test]
fn out_of_band_commands_and_late_replies() {
    let (mut client, server) = pair(|mut qemu| {
        qemu.negotiate();
        // An in-band command whose reply comes only after the client gave up.
        let late = qemu.expect("query-migrate");
        let recover = qemu.expect_kind("exec-oob", "migrate-recover");
        assert_eq!(recover["arguments"], json!({"uri": "tcp:10.0.0.2:4445"}));
        qemu.send(&format!("{{\"return\": {{}}, \"id\": {}}}\n", late["id"]));
        qemu.send(&format!("{{\"return\": {{}}, \"id\": {}}}\n", recover["id"]));
    });
    assert!(client.oob());
    client.set_timeout(Duration::from_millis(100));
    assert!(matches!(client.execute("query-migrate", Value::Null), Err(QmpError::Timeout(_))));
    client.set_timeout(Duration::from_secs(10));
    client
        .execute_oob("migrate-recover", json!({"uri": "tcp:10.0.0.2:4445"}))
        .expect("the late in-band reply is skipped, the oob one taken");
    server.join().expect("fake QEMU");
}

#[test]
fn out_of_band_needs_the_capability() {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let server = thread::spawn(move || {
        let mut qemu = FakeQemu::new(theirs);
        qemu.send("{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n");
        let request = qemu.expect("qmp_capabilities");
        assert!(request.get("arguments").is_none(), "nothing to enable");
        qemu.send(&format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]));
    });
    let mut client = QmpClient::handshake(ours).expect("handshake");
    server.join().expect("fake QEMU");
    assert!(!client.oob());
    let refused = client.execute_oob("migrate-recover", json!({"uri": "unix:/x"}));
    assert!(matches!(refused, Err(QmpError::OobUnavailable(_))), "{refused:?}");
}
