//! `--trace-faults`: where a postcopy page request's time goes, from QEMU's
//! own trace events on both hosts (one host clock: the namespaces share it).
//!
//! Each request is followed by its RAM block and offset through:
//!
//! | leg | from | to |
//! |---|---|---|
//! | return path | destination QEMU reads the fault: `postcopy_request_shared_page` (gmemd's userfaultfd) or `postcopy_ram_fault_thread_request` (its own: vCPU) | source receives the request: `migrate_handle_rp_req_pages` |
//! | source | request received | page goes out: `postcopy_preempt_send_host_page` (preempt: from the return-path thread, on its own connection) or `get_queued_page` (the migration thread takes the request; the page joins the main stream behind what is queued there) |
//! | forward | page goes out | the destination reads the page's header: `ram_load_postcopy_loop`, which names the connection (0 main, 1 preempt); placing it follows at once |
//!
//! A request whose page the source had sent already (`get_queued_page_not_dirty`;
//! with preempt, `postcopy_preempt_hit` when the background stream is on
//! that page, or nothing at all when it is past it) waits for the page on
//! the main stream. Device and vCPU requests share everything after the
//! return path; what is not traced is the time from gmemd's fault to QEMU
//! reading it, and from placing the page to gmemd's wake-up, which gmemd's
//! fault-to-wake histogram includes.
//!
//! `ram_load_postcopy_loop` fires for every page the destination loads,
//! half a million in a 2 GiB guest: tracing slows the destination's loading
//! noticeably, so these runs are for finding where the time goes only.

use std::collections::HashMap;

use serde::Serialize;

use crate::figures::percentile;

/// Target page size of x86: QEMU traces preempt sends in pages of it.
const TARGET_PAGE_BYTES: u64 = 4096;

/// The trace events to turn on, in both QEMUs.
pub const EVENTS: [&str; 9] = [
    "postcopy_request_shared_page",
    "postcopy_request_shared_page_present",
    "postcopy_ram_fault_thread_request",
    "ram_load_postcopy_loop",
    "migrate_handle_rp_req_pages",
    "postcopy_preempt_send_host_page",
    "postcopy_preempt_hit",
    "get_queued_page",
    "get_queued_page_not_dirty",
];

/// The QEMU arguments that turn [`EVENTS`] on, with the
/// `tid@seconds.micros:` stamp (QEMU's log backend writes it only with
/// `-msg timestamp=on`).
pub fn qemu_args() -> Vec<String> {
    let trace = EVENTS.iter().flat_map(|event| ["-trace".to_string(), event.to_string()]);
    ["-msg".to_string(), "timestamp=on".to_string()].into_iter().chain(trace).collect()
}

/// A leg's duration over the requests that have it, µs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Leg {
    pub count: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Leg {
    fn of(mut durations: Vec<u64>) -> Option<Leg> {
        durations.sort_unstable();
        Some(Leg {
            count: durations.len(),
            p50_us: percentile(&durations, 0.5)?,
            p99_us: percentile(&durations, 0.99)?,
            max_us: *durations.last()?,
        })
    }
}

/// One kind of request (the device's, or QEMU's own), leg by leg.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Requests {
    /// Requests the destination QEMU made.
    pub requests: usize,
    /// Those whose page the source had sent already, or was sending on the
    /// main stream (no "page goes out").
    pub already_sent: usize,
    /// Requested pages that arrived on the main connection.
    pub arrived_main: usize,
    /// Requested pages that arrived on the postcopy-preempt connection.
    pub arrived_preempt: usize,
    pub return_path: Option<Leg>,
    pub source: Option<Leg>,
    pub forward: Option<Leg>,
    /// Fault read to page arrived.
    pub total: Option<Leg>,
}

/// The legs of both kinds of request in one migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultTrace {
    /// gmemd's faults that reached QEMU as requests.
    pub device: Requests,
    /// gmemd's faults QEMU found already placed (woken without a request).
    pub device_present: usize,
    /// QEMU's own faults (the vCPU's).
    pub qemu: Requests,
}

/// What happened to a page when, µs since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    DeviceFault,
    DevicePresent,
    QemuFault,
    /// The destination read the page's header from connection `channel`.
    Arrived,
    RequestIn,
    PageOut,
    AlreadySent,
}

#[derive(Debug, Clone, PartialEq)]
struct Event {
    at_us: u64,
    kind: Kind,
    /// RAM block and byte offset; for `Arrived`, the block is empty (QEMU
    /// does not trace it).
    block: String,
    offset: u64,
    /// For `Arrived`: 0 main connection, 1 postcopy-preempt.
    channel: u32,
}

fn hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim().strip_prefix("0x")?, 16).ok()
}

/// `value` of `key=value` or `key value` in `args`.
fn field<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    let rest = &args[args.find(key)? + key.len()..];
    rest.split_whitespace().next()
}

/// One line of QEMU's log trace backend: `tid@seconds.micros:event args`.
fn parse(line: &str) -> Option<Event> {
    let (_, rest) = line.split_once('@')?;
    let (stamp, rest) = rest.split_once(':')?;
    let (seconds, micros) = stamp.split_once('.')?;
    let at_us = seconds.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?;
    let (name, args) = rest.split_once(' ').unwrap_or((rest, ""));
    let event =
        |kind, block: &str, offset, channel| Some(Event { at_us, kind, block: block.to_owned(), offset, channel });
    match name {
        // "for vhost-user in ram0 offset 0x1ffb3000"
        "postcopy_request_shared_page" => {
            let offset = hex(field(args, "offset ")?)?;
            event(Kind::DeviceFault, field(args, " in ")?, offset & !(TARGET_PAGE_BYTES - 1), 0)
        }
        "postcopy_request_shared_page_present" => event(Kind::DevicePresent, "", 0, 0),
        // "Request for HVA=0x7f.. rb=ram0 offset=0x.. pid=.."
        "postcopy_ram_fault_thread_request" => {
            event(Kind::QemuFault, field(args, "rb=")?, hex(field(args, "offset=")?)?, 0)
        }
        // "chan=1 addr=0x1ffb3000 flags=0x8"
        "ram_load_postcopy_loop" => {
            event(Kind::Arrived, "", hex(field(args, "addr=")?)?, field(args, "chan=")?.parse().ok()?)
        }
        // "in ram0 at 0xc0000 len 0x1000"
        "migrate_handle_rp_req_pages" => event(Kind::RequestIn, field(args, "in ")?, hex(field(args, "at ")?)?, 0),
        // "ramblock ram0 offset 0xc0" (in target pages)
        "postcopy_preempt_send_host_page" => {
            let page = hex(field(args, "offset ")?)?;
            event(Kind::PageOut, field(args, "ramblock ")?, page * TARGET_PAGE_BYTES, 0)
        }
        // "ramblock ram0 offset 0x3a3cf000" (in bytes)
        "postcopy_preempt_hit" => event(Kind::AlreadySent, field(args, "ramblock ")?, hex(field(args, "offset ")?)?, 0),
        // "ram0/0xc0000 page_abs=0xc0"
        "get_queued_page" | "get_queued_page_not_dirty" => {
            let (block, offset) = args.split_whitespace().next()?.split_once('/')?;
            let kind = if name == "get_queued_page" { Kind::PageOut } else { Kind::AlreadySent };
            event(kind, block, hex(offset)?, 0)
        }
        _ => None,
    }
}

/// Events of one kind by page, each in time order, with a mark once a
/// request has claimed it.
#[derive(Debug, Default)]
struct ByPage(HashMap<(String, u64), Vec<(u64, bool)>>);

impl ByPage {
    fn add(&mut self, key: (String, u64), at_us: u64) {
        self.0.entry(key).or_default().push((at_us, false));
    }

    /// Claims the first unclaimed event of `key` at or after `after_us`.
    fn claim(&mut self, key: &(String, u64), after_us: u64) -> Option<u64> {
        let slot = self.0.get_mut(key)?.iter_mut().find(|(at, claimed)| !claimed && *at >= after_us)?;
        slot.1 = true;
        Some(slot.0)
    }
}

/// When each page offset arrived at the destination, and on which
/// connection; a page arrives once, and every request for it waits for
/// that arrival.
#[derive(Debug, Default)]
struct Arrivals(HashMap<u64, Vec<(u64, u32)>>);

impl Arrivals {
    /// The first arrival of `offset` at or after `after_us`.
    fn after(&self, offset: u64, after_us: u64) -> Option<(u64, u32)> {
        self.0.get(&offset)?.iter().find(|(at, _)| *at >= after_us).copied()
    }
}

impl FaultTrace {
    /// The legs of every request in the two QEMUs' logs.
    pub fn from_logs(source_log: &str, destination_log: &str) -> FaultTrace {
        let mut requests_in = ByPage::default();
        let mut pages_out = ByPage::default();
        let mut already_sent = ByPage::default();
        let mut last_block = String::new();
        for mut event in source_log.lines().filter_map(parse) {
            // A request names its RAM block only when it differs from the
            // previous request's (QEMU's REQ_PAGES after REQ_PAGES_ID).
            if event.kind == Kind::RequestIn {
                if event.block == "(null)" {
                    event.block.clone_from(&last_block);
                } else {
                    last_block.clone_from(&event.block);
                }
            }
            let key = (event.block, event.offset);
            match event.kind {
                Kind::RequestIn => requests_in.add(key, event.at_us),
                Kind::PageOut => pages_out.add(key, event.at_us),
                Kind::AlreadySent => already_sent.add(key, event.at_us),
                _ => {}
            }
        }
        let destination: Vec<Event> = destination_log.lines().filter_map(parse).collect();
        let mut arrivals = Arrivals::default();
        for event in destination.iter().filter(|e| e.kind == Kind::Arrived) {
            arrivals.0.entry(event.offset).or_default().push((event.at_us, event.channel));
        }
        let mut device = Legs::default();
        let mut qemu = Legs::default();
        let mut device_present = 0;
        for event in &destination {
            let legs = match event.kind {
                Kind::DeviceFault => &mut device,
                Kind::QemuFault => &mut qemu,
                Kind::DevicePresent => {
                    device_present += 1;
                    continue;
                }
                _ => continue,
            };
            legs.requests += 1;
            let key = (event.block.clone(), event.offset);
            let mut out = None;
            if let Some(request_in) = requests_in.claim(&key, event.at_us) {
                legs.return_path.push(request_in - event.at_us);
                out = pages_out.claim(&key, request_in);
                match out {
                    Some(out) => legs.source.push(out - request_in),
                    None if already_sent.claim(&key, request_in).is_some() => legs.already_sent += 1,
                    None => {}
                }
            }
            if let Some((arrived, channel)) = arrivals.after(event.offset, event.at_us) {
                legs.total.push(arrived - event.at_us);
                if let Some(out) = out.filter(|&out| arrived >= out) {
                    legs.forward.push(arrived - out);
                }
                match channel {
                    0 => legs.arrived_main += 1,
                    _ => legs.arrived_preempt += 1,
                }
            }
        }
        FaultTrace { device: device.summary(), device_present, qemu: qemu.summary() }
    }

    /// The legs on a few lines, for the console.
    pub fn describe(&self) -> String {
        let leg = |name: &str, leg: &Option<Leg>| match leg {
            Some(l) => format!(" {name} p50 {} / p99 {} µs (n={})", l.p50_us, l.p99_us, l.count),
            None => String::new(),
        };
        let requests = |who: &str, r: &Requests| {
            format!(
                "  {who}: {} requests, {} already sent, pages arrived {} on the main / {} on the preempt connection;{}{}{}{}",
                r.requests,
                r.already_sent,
                r.arrived_main,
                r.arrived_preempt,
                leg("return path", &r.return_path),
                leg("source", &r.source),
                leg("forward", &r.forward),
                leg("total", &r.total)
            )
        };
        format!(
            "{}\n{}\n  device faults found placed already: {}",
            requests("device", &self.device),
            requests("QEMU (vCPU)", &self.qemu),
            self.device_present
        )
    }
}

/// The durations collected for one kind of request, µs.
#[derive(Debug, Default)]
struct Legs {
    requests: usize,
    already_sent: usize,
    arrived_main: usize,
    arrived_preempt: usize,
    return_path: Vec<u64>,
    source: Vec<u64>,
    forward: Vec<u64>,
    total: Vec<u64>,
}

impl Legs {
    fn summary(self) -> Requests {
        Requests {
            requests: self.requests,
            already_sent: self.already_sent,
            arrived_main: self.arrived_main,
            arrived_preempt: self.arrived_preempt,
            return_path: Leg::of(self.return_path),
            source: Leg::of(self.source),
            forward: Leg::of(self.forward),
            total: Leg::of(self.total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as QEMU 10.0.2 wrote them in a postcopy-preempt run.
    const DESTINATION: &str = "\
6001@1796134000.000100:postcopy_ram_fault_thread_request Request for HVA=0x7f0000001000 rb=ram0 offset=0x1000 pid=6010
6001@1796134000.000200:postcopy_request_shared_page for vhost-user in ram0 offset 0x2010
6002@1796134000.001100:ram_load_postcopy_loop chan=1 addr=0x1000 flags=0x8
6003@1796134000.002300:ram_load_postcopy_loop chan=0 addr=0x2000 flags=0x8
6001@1796134000.001500:postcopy_request_shared_page_present vhost-user already ram0 offset 0x3000
qemu-system-x86_64: some other line
";
    const SOURCE: &str = "\
7001@1796134000.000400:migrate_handle_rp_req_pages in ram0 at 0x1000 len 0x1000
7001@1796134000.000410:postcopy_preempt_send_host_page ramblock ram0 offset 0x1
7001@1796134000.000700:migrate_handle_rp_req_pages in (null) at 0x2000 len 0x1000
7002@1796134000.000900:get_queued_page_not_dirty ram0/0x2000 page_abs=0x2
";

    #[test]
    fn requests_are_followed_through_both_logs() {
        let trace = FaultTrace::from_logs(SOURCE, DESTINATION);
        let leg = |count, us| Some(Leg { count, p50_us: us, p99_us: us, max_us: us });
        assert_eq!(trace.qemu.requests, 1);
        assert_eq!(trace.qemu.return_path, leg(1, 300));
        assert_eq!(trace.qemu.source, leg(1, 10));
        assert_eq!(trace.qemu.forward, leg(1, 690));
        assert_eq!(trace.qemu.total, leg(1, 1000));
        assert_eq!((trace.qemu.arrived_main, trace.qemu.arrived_preempt), (0, 1));
        assert_eq!((trace.device.requests, trace.device.already_sent), (1, 1));
        assert_eq!(trace.device.return_path, leg(1, 500));
        assert_eq!((trace.device.source, trace.device.forward), (None, None));
        assert_eq!(trace.device.total, leg(1, 2100));
        assert_eq!((trace.device.arrived_main, trace.device.arrived_preempt), (1, 0));
        assert_eq!(trace.device_present, 1);
    }

    #[test]
    fn lines_of_other_events_are_skipped() {
        assert_eq!(parse("qemu-system-x86_64: terminating on signal 15"), None);
        assert_eq!(parse("123@1.000002:vhost_user_postcopy_waker ram0 + 0x1000"), None);
        let queued = parse("5@10.000020:get_queued_page ram0/0x5000 page_abs=0x5").expect("an event");
        assert_eq!((queued.at_us, queued.kind, queued.offset), (10_000_020, Kind::PageOut, 0x5000));
        let hit = parse("5@10.000030:postcopy_preempt_hit ramblock ram0 offset 0x6000").expect("an event");
        assert_eq!((hit.kind, hit.block.as_str(), hit.offset), (Kind::AlreadySent, "ram0", 0x6000));
    }
}
