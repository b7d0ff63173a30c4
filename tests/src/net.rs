//! Two simulated hosts for migration tests: [`HostPair`], two network
//! namespaces joined by a veth pair, and [`DelayRelay`], a TCP relay inside
//! the source namespace that adds one-way latency and can cut its
//! connections.
//!
//! Everything here needs root (`ip netns`, `tc`, `setns(2)`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where `ip netns` keeps its namespaces, one bind-mounted file per name.
const NETNS_DIR: &str = "/var/run/netns";
/// Name prefixes of our namespaces: `<prefix><pid>-<n>`.
const SRC_PREFIX: &str = "gmsrc-";
const DST_PREFIX: &str = "gmdst-";
/// The veth ends, created straight inside their namespaces.
const SRC_VETH: &str = "to-dst";
const DST_VETH: &str = "to-src";

/// Pairs created by this process so far; part of the names and addresses.
static PAIRS: AtomicU32 = AtomicU32::new(0);

/// Runs `program args`; fails with its stderr if it does not succeed.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

/// Moves the calling thread into the named network namespace: sockets it
/// creates from then on live there, and threads it spawns start there.
/// `CLONE_NEWNET` applies to the calling thread only, so call this at the
/// start of a thread of your own, never on a test's main thread.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns(2) only reads the descriptor, which `file` keeps open
    // for the duration of the call; it touches no memory of ours.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns into network namespace {name}"));
    }
    Ok(())
}

/// Spawns a thread called `name` that enters network namespace `netns`
/// (see [`enter_netns`]) and then runs `body`.
pub fn spawn_in_netns<T, F>(netns: &str, name: &str, body: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let netns = netns.to_owned();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            enter_netns(&netns)?;
            body()
        })
        .with_context(|| format!("spawning thread {name}"))
}

/// Two "hosts": network namespaces `gmsrc-<pid>-<n>` and `gmdst-<pid>-<n>`
/// joined by a veth pair, with `10.231.<n>.1/24` on the source side and
/// `10.231.<n>.2/24` on the destination side, and `lo` up in both. The
/// addresses exist only inside the two namespaces. Dropping the pair deletes
/// both namespaces, and with them the veth.
#[derive(Debug)]
pub struct HostPair {
    src_ns: String,
    dst_ns: String,
    src_addr: Ipv4Addr,
    dst_addr: Ipv4Addr,
}

impl HostPair {
    /// Creates the namespaces and the link between them. First deletes
    /// namespaces left behind by test processes that no longer run.
    pub fn create() -> Result<HostPair> {
        delete_stale_namespaces();
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = (n % 256) as u8;
        // From here on, dropping `pair` removes whatever was created.
        let pair = HostPair {
            src_ns: format!("{SRC_PREFIX}{pid}-{n}"),
            dst_ns: format!("{DST_PREFIX}{pid}-{n}"),
            src_addr: Ipv4Addr::new(10, 231, subnet, 1),
            dst_addr: Ipv4Addr::new(10, 231, subnet, 2),
        };
        run("ip", &["netns", "add", &pair.src_ns])?;
        run("ip", &["netns", "add", &pair.dst_ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                SRC_VETH,
                "netns",
                &pair.src_ns,
                "type",
                "veth",
                "peer",
                "name",
                DST_VETH,
                "netns",
                &pair.dst_ns,
            ],
        )?;
        for (ns, veth, addr) in [(&pair.src_ns, SRC_VETH, pair.src_addr), (&pair.dst_ns, DST_VETH, pair.dst_addr)] {
            run("ip", &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", veth])?;
            run("ip", &["-n", ns, "link", "set", veth, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// The source host's namespace.
    pub fn src_ns(&self) -> &str {
        &self.src_ns
    }

    /// The destination host's namespace.
    pub fn dst_ns(&self) -> &str {
        &self.dst_ns
    }

    /// The source host's address (in [`src_ns`](Self::src_ns)).
    pub fn src_addr(&self) -> Ipv4Addr {
        self.src_addr
    }

    /// The destination host's address (in [`dst_ns`](Self::dst_ns)).
    pub fn dst_addr(&self) -> Ipv4Addr {
        self.dst_addr
    }

    /// Limits what the source sends to the destination (the direction of a
    /// migration stream) to `rate`, in tc(8) units, e.g. `"200mbit"`: a tbf
    /// qdisc (burst 32kb, latency 50ms) on the source's veth. Calling it
    /// again replaces the limit.
    pub fn limit_bandwidth(&self, rate: &str) -> Result<()> {
        run(
            "tc",
            &[
                "-n",
                &self.src_ns,
                "qdisc",
                "replace",
                "dev",
                SRC_VETH,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "32kb",
                "latency",
                "50ms",
            ],
        )
    }

    /// A [`DelayRelay`] in the source namespace, listening on an ephemeral
    /// port of [`src_addr`](Self::src_addr) and forwarding to `target_port`
    /// on [`dst_addr`](Self::dst_addr), `delay` late each way.
    pub fn delay_relay(&self, target_port: u16, delay: Duration) -> Result<DelayRelay> {
        DelayRelay::start(
            &self.src_ns,
            SocketAddr::from((self.src_addr, 0)),
            SocketAddr::from((self.dst_addr, target_port)),
            delay,
        )
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        for ns in [&self.src_ns, &self.dst_ns] {
            if Path::new(NETNS_DIR).join(ns).exists() {
                if let Err(e) = run("ip", &["netns", "del", ns]) {
                    log::warn!("{e:#}");
                }
            }
        }
    }
}

/// Deletes our namespaces whose creating process (the pid in the name) is
/// gone: a test killed by a timeout never runs its `Drop`.
fn delete_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(SRC_PREFIX).or_else(|| name.strip_prefix(DST_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("deleting network namespace {name} of a process that is gone");
            if let Err(e) = run("ip", &["netns", "del", &name]) {
                log::warn!("{e:#}");
            }
        }
    }
}

/// Largest chunk one read takes from a socket.
const CHUNK_BYTES: usize = 64 << 10;
/// Chunks in flight per direction: bounds the relay's buffer to 4 MiB, so a
/// slow far side slows the sender down instead of piling up data here.
const CHUNKS_IN_FLIGHT: usize = 64;

/// A TCP relay running inside a network namespace: each connection accepted
/// on its listening address is joined to a new connection to its target, and
/// every chunk read in either direction is written `delay` after it was read,
/// in order (a fixed one-way latency; zero makes a plain relay). Buffering is
/// bounded, so the relay passes on the far side's pace.
///
/// [`cut`](Self::cut) shuts down the current connections, as a network
/// failure would, while the relay keeps accepting new ones. Dropping the relay
/// stops it and cuts everything.
#[derive(Debug)]
pub struct DelayRelay {
    addr: SocketAddr,
    shared: Arc<RelayShared>,
    acceptor: Option<JoinHandle<Result<()>>>,
}

/// What the relay's threads and its owner share.
#[derive(Debug)]
struct RelayShared {
    listener: TcpListener,
    target: SocketAddr,
    delay: Duration,
    stopping: AtomicBool,
    accepted: AtomicUsize,
    links: Mutex<Vec<Link>>,
}

/// One relayed connection: both sockets and the four threads moving data.
#[derive(Debug)]
struct Link {
    client: TcpStream,
    server: TcpStream,
    pumps: Vec<JoinHandle<()>>,
}

impl Link {
    fn shut_down(&self) {
        // Errors only mean the socket is shut down already.
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    fn join(self) {
        for pump in self.pumps {
            if pump.join().is_err() {
                log::warn!("a relay thread panicked");
            }
        }
    }
}

impl RelayShared {
    fn links(&self) -> MutexGuard<'_, Vec<Link>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts until the relay stops.
    fn accept_loop(&self) -> Result<()> {
        loop {
            let accepted = self.listener.accept();
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            match accepted {
                Ok((client, peer)) => {
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.relay(client) {
                        log::warn!("relay to {}: connection from {peer}: {e:#}", self.target);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e).context("relay accept"),
            }
        }
    }

    /// Connects `client` to the target; on failure `client` is closed, as a
    /// refused connection would leave it.
    fn relay(&self, client: TcpStream) -> Result<()> {
        let server = TcpStream::connect(self.target).with_context(|| format!("connecting to {}", self.target))?;
        for socket in [&client, &server] {
            socket.set_nodelay(true)?;
        }
        let mut links = self.links();
        // Forget connections that ended by themselves.
        let (done, live): (Vec<Link>, Vec<Link>) =
            std::mem::take(&mut *links).into_iter().partition(|link| link.pumps.iter().all(JoinHandle::is_finished));
        *links = live;
        done.into_iter().for_each(Link::join);
        let mut pumps = pump(client.try_clone()?, server.try_clone()?, self.delay)?;
        pumps.extend(pump(server.try_clone()?, client.try_clone()?, self.delay)?);
        links.push(Link { client, server, pumps });
        Ok(())
    }

    /// Shuts down every connection and waits for their threads.
    fn cut(&self) {
        let links = std::mem::take(&mut *self.links());
        links.iter().for_each(Link::shut_down);
        links.into_iter().for_each(Link::join);
    }
}

/// A chunk and when to write it; `None` is the end of the stream.
type Timed = (Instant, Option<Vec<u8>>);

/// Starts the two threads moving data from `from` to `to`, `delay` late.
///
/// The reader stamps each chunk with its due time; the writer sleeps until
/// then and writes it, so chunks keep their order and the delay does not cost
/// throughput. An end of stream is passed on as a half close once due; an
/// error on either side shuts down both sockets, so the opposite direction's
/// threads end too.
fn pump(from: TcpStream, to: TcpStream, delay: Duration) -> Result<Vec<JoinHandle<()>>> {
    let (tx, rx) = sync_channel::<Timed>(CHUNKS_IN_FLIGHT);
    let (reader_from, reader_to) = (from.try_clone()?, to.try_clone()?);
    let reader = thread::Builder::new()
        .name("relay-read".into())
        .spawn(move || read_chunks(reader_from, reader_to, delay, tx))?;
    let writer = thread::Builder::new().name("relay-write".into()).spawn(move || write_chunks(from, to, rx))?;
    Ok(vec![reader, writer])
}

fn read_chunks(mut from: TcpStream, to: TcpStream, delay: Duration, tx: SyncSender<Timed>) {
    loop {
        let mut chunk = vec![0u8; CHUNK_BYTES];
        match from.read(&mut chunk) {
            Ok(0) => {
                let _ = tx.send((Instant::now() + delay, None));
                return;
            }
            Ok(n) => {
                chunk.truncate(n);
                if tx.send((Instant::now() + delay, Some(chunk))).is_err() {
                    return; // the writer gave up
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Reset or cut: the far side must not wait for more.
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn write_chunks(from: TcpStream, mut to: TcpStream, rx: Receiver<Timed>) {
    for (due, chunk) in rx {
        thread::sleep(due.saturating_duration_since(Instant::now()));
        match chunk {
            Some(data) => {
                if to.write_all(&data).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

impl DelayRelay {
    /// Starts a relay in network namespace `netns`, listening on `listen`
    /// (port 0: an ephemeral one, see [`addr`](Self::addr)) and forwarding
    /// to `target`, with `delay` added in each direction.
    pub fn start(netns: &str, listen: SocketAddr, target: SocketAddr, delay: Duration) -> Result<DelayRelay> {
        let (tx, rx) = sync_channel(1);
        let acceptor = spawn_in_netns(netns, "relay-accept", move || {
            let bound = TcpListener::bind(listen).with_context(|| format!("relay: binding {listen}"));
            let shared = match bound {
                Ok(listener) => Arc::new(RelayShared {
                    listener,
                    target,
                    delay,
                    stopping: AtomicBool::new(false),
                    accepted: AtomicUsize::new(0),
                    links: Mutex::new(Vec::new()),
                }),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(());
                }
            };
            let _ = tx.send(Ok(Arc::clone(&shared)));
            shared.accept_loop()
        })?;
        let shared = match rx.recv() {
            Ok(shared) => shared?,
            Err(_) => match acceptor.join() {
                Ok(result) => return Err(result.err().unwrap_or_else(|| anyhow::anyhow!("relay thread ended early"))),
                Err(_) => bail!("the relay thread panicked"),
            },
        };
        let addr = shared.listener.local_addr()?;
        Ok(DelayRelay { addr, shared, acceptor: Some(acceptor) })
    }

    /// The address it listens on (in its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far, cut or not.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Shuts down both sockets of every current connection, as a broken
    /// network would end them, and waits until their threads are gone. The
    /// relay keeps listening: a new connection gets through.
    pub fn cut(&self) {
        self.shared.cut();
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        // SAFETY: shutdown(2) on the listener's descriptor, which
        // `self.shared` keeps open; it touches no memory of ours. On Linux
        // it wakes the acceptor blocked in accept(2), which then sees
        // `stopping`.
        let rc = unsafe { libc::shutdown(self.shared.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if rc != 0 {
            log::warn!("relay {}: shutting the listener down: {}", self.addr, io::Error::last_os_error());
        } else if let Some(acceptor) = self.acceptor.take() {
            match acceptor.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::warn!("relay {}: {e:#}", self.addr),
                Err(_) => log::warn!("relay {}: the acceptor panicked", self.addr),
            }
        }
        self.shared.cut();
    }
}
