//! What the host-side benchmark runs: the cases (workload, queues, depth,
//! image, pinning), the backends, and the order of the runs. Pure: no I/O.

use std::time::Duration;

use serde::Serialize;

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Read,
    Write,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// Where each request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random block-aligned offsets over the whole image.
    Random,
    /// Consecutive blocks, each queue in its own slice of the image,
    /// wrapping at the slice's end.
    Sequential,
}

/// Which image a case uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// The small image, in the host page cache (written just before).
    Cached,
    /// The large image, evicted from the page cache before the timed phase.
    Uncached,
}

/// Whether the backend and the client are pinned to separate CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pinning {
    /// Backend on CPU 0, client on CPU 1.
    Pinned,
    /// Both wherever the scheduler puts them.
    Unpinned,
}

/// The CPU the backend is pinned to; the client gets [`CLIENT_CPU`].
pub const BACKEND_CPU: usize = 0;
/// The CPU the client's threads are pinned to.
pub const CLIENT_CPU: usize = 1;

/// One workload at one queue configuration and pinning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Case {
    /// e.g. `randread-4k-q1-d32`, `-uncached` and `-unpinned` appended.
    pub name: String,
    pub op: Op,
    pub pattern: Pattern,
    /// Bytes per request.
    pub block: usize,
    /// Queues, one client thread each.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u32,
    pub image: ImageKind,
    pub pinning: Pinning,
    /// Part of the queue-depth sweep (4 KiB random read, 1 queue, pinned).
    pub sweep: bool,
}

impl Case {
    fn new(op: Op, pattern: Pattern, block: usize, queues: u16, depth: u32) -> Case {
        let kind = match (pattern, op) {
            (Pattern::Random, Op::Read) => "randread",
            (Pattern::Random, Op::Write) => "randwrite",
            (Pattern::Sequential, Op::Read) => "seqread",
            (Pattern::Sequential, Op::Write) => "seqwrite",
        };
        let size = if block >= 1 << 20 { format!("{}m", block >> 20) } else { format!("{}k", block >> 10) };
        Case {
            name: format!("{kind}-{size}-q{queues}-d{depth}"),
            op,
            pattern,
            block,
            queues,
            depth,
            image: ImageKind::Cached,
            pinning: Pinning::Pinned,
            sweep: false,
        }
    }

    fn uncached(mut self) -> Case {
        self.image = ImageKind::Uncached;
        self.name.push_str("-uncached");
        self
    }

    fn unpinned(mut self) -> Case {
        self.pinning = Pinning::Unpinned;
        self.name.push_str("-unpinned");
        self
    }

    fn in_sweep(mut self) -> Case {
        self.sweep = true;
        self
    }

    /// Bytes of buffer one queue needs: a slot per request in flight, and
    /// at least 1 MiB for the correctness check.
    pub fn buffer_per_queue(&self) -> usize {
        (self.block * self.depth as usize).max(VERIFY_SPAN)
    }
}

/// The largest request the correctness check makes.
pub const VERIFY_SPAN: usize = 1 << 20;

const K4: usize = 4 << 10;
const M1: usize = 1 << 20;

/// The queue depths of the 4 KiB random-read sweep.
pub const SWEEP_DEPTHS: [u32; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// The headline workloads, each pinned and unpinned.
fn headline() -> Vec<Case> {
    vec![
        Case::new(Op::Read, Pattern::Random, K4, 1, 1),
        Case::new(Op::Read, Pattern::Random, K4, 1, 32),
        Case::new(Op::Read, Pattern::Random, K4, 2, 32),
        Case::new(Op::Write, Pattern::Random, K4, 1, 32),
        Case::new(Op::Read, Pattern::Sequential, M1, 1, 8),
        Case::new(Op::Write, Pattern::Sequential, M1, 1, 8),
        Case::new(Op::Read, Pattern::Random, K4, 1, 32).uncached(),
    ]
}

/// Every case of the full benchmark: the headline workloads pinned, the
/// same unpinned, and the depth sweep (pinned; its depths 1 and 32 are the
/// headline cases themselves, marked as part of the sweep, not run twice).
pub fn full_plan() -> Vec<Case> {
    let mut cases: Vec<Case> = headline()
        .into_iter()
        .map(|c| {
            let sweep =
                c.op == Op::Read && c.pattern == Pattern::Random && c.queues == 1 && c.image == ImageKind::Cached;
            if sweep {
                c.in_sweep()
            } else {
                c
            }
        })
        .collect();
    for depth in SWEEP_DEPTHS {
        if !cases.iter().any(|c| c.sweep && c.depth == depth) {
            cases.push(Case::new(Op::Read, Pattern::Random, K4, 1, depth).in_sweep());
        }
    }
    cases.extend(headline().into_iter().map(Case::unpinned));
    // gmemd's memory at its widest: eight queues, each 128 deep.
    cases.push(Case::new(Op::Read, Pattern::Random, K4, 8, 128));
    cases
}

/// `--quick`: enough to exercise every path once (cached read at depth 1
/// and 32, a write, the uncached image, two queues, unpinned), not to
/// measure anything.
pub fn quick_plan() -> Vec<Case> {
    vec![
        Case::new(Op::Read, Pattern::Random, K4, 1, 1).in_sweep(),
        Case::new(Op::Read, Pattern::Random, K4, 1, 32).in_sweep(),
        Case::new(Op::Write, Pattern::Sequential, M1, 2, 8).unpinned(),
        Case::new(Op::Read, Pattern::Random, K4, 1, 32).uncached(),
    ]
}

/// Who serves the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// gmemd over vhost-user, through libblkio.
    Gmemd,
    /// qemu-storage-daemon, `cache.direct=off`, through libblkio.
    QsdBuffered,
    /// qemu-storage-daemon, `cache.direct=on`, through libblkio (uncached
    /// cases only).
    QsdDirect,
    /// No backend: io_uring with O_DIRECT on the image itself.
    Raw,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gmemd => "gmemd",
            Backend::QsdBuffered => "qsd-buffered",
            Backend::QsdDirect => "qsd-direct",
            Backend::Raw => "raw",
        }
    }

    pub fn is_qsd(self) -> bool {
        matches!(self, Backend::QsdBuffered | Backend::QsdDirect)
    }
}

/// The backends a case runs on: qsd with O_DIRECT only where the data is
/// not in the page cache anyway (with a cached image it would only throw
/// the cache away); no qsd at all with `gmemd_only`.
pub fn backends_for(case: &Case, gmemd_only: bool) -> Vec<Backend> {
    let mut backends = vec![Backend::Gmemd];
    if !gmemd_only {
        backends.push(Backend::QsdBuffered);
        if case.image == ImageKind::Uncached {
            backends.push(Backend::QsdDirect);
        }
    }
    backends.push(Backend::Raw);
    backends
}

/// One run: a case on a backend in a repetition (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub rep: u32,
    pub case: usize,
    pub backend: Backend,
}

/// The order of all runs: repetitions outermost, then cases, then the
/// case's backends back to back, the backends' order rotated by one each
/// repetition, so that drift on the host and "who ran first" hit every
/// backend alike.
pub fn order(cases: &[Case], reps: u32, gmemd_only: bool) -> Vec<Slot> {
    let mut slots = Vec::new();
    for rep in 1..=reps {
        for (index, case) in cases.iter().enumerate() {
            let mut backends = backends_for(case, gmemd_only);
            let shift = (rep as usize - 1) % backends.len();
            backends.rotate_left(shift);
            slots.extend(backends.into_iter().map(|backend| Slot { rep, case: index, backend }));
        }
    }
    slots
}

/// Parses `10s`, `500ms`, `2m` or a plain number of seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 10s, 500ms, 2m or 1.5"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        other => return Err(format!("unknown unit {other:?} in {text:?} (use ms, s or m)")),
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_plan_has_every_workload_once() {
        let cases = full_plan();
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        for name in [
            "randread-4k-q1-d1",
            "randread-4k-q1-d32",
            "randread-4k-q2-d32",
            "randwrite-4k-q1-d32",
            "seqread-1m-q1-d8",
            "seqwrite-1m-q1-d8",
            "randread-4k-q1-d32-uncached",
            "randread-4k-q1-d128",
            "randread-4k-q1-d1-unpinned",
            "randread-4k-q1-d32-uncached-unpinned",
            "randread-4k-q8-d128",
        ] {
            assert_eq!(names.iter().filter(|n| **n == name).count(), 1, "{name}");
        }
        let sweep: Vec<u32> = cases.iter().filter(|c| c.sweep).map(|c| c.depth).collect();
        let mut sorted = sweep.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, SWEEP_DEPTHS);
        assert!(cases.iter().filter(|c| c.sweep).all(|c| c.pinning == Pinning::Pinned && c.image == ImageKind::Cached));
        assert_eq!(cases.len(), 7 + 6 + 7 + 1);
    }

    #[test]
    fn buffers_fit_the_depth_and_the_check() {
        let cases = full_plan();
        let seq = cases.iter().find(|c| c.name == "seqread-1m-q1-d8");
        assert_eq!(seq.map(Case::buffer_per_queue), Some(8 << 20));
        let d1 = cases.iter().find(|c| c.name == "randread-4k-q1-d1");
        assert_eq!(d1.map(Case::buffer_per_queue), Some(VERIFY_SPAN));
    }

    #[test]
    fn runs_alternate_and_rotate() {
        let cases = quick_plan();
        let slots = order(&cases, 2, false);
        let first: Vec<Backend> = slots.iter().filter(|s| s.rep == 1 && s.case == 0).map(|s| s.backend).collect();
        let second: Vec<Backend> = slots.iter().filter(|s| s.rep == 2 && s.case == 0).map(|s| s.backend).collect();
        assert_eq!(first, [Backend::Gmemd, Backend::QsdBuffered, Backend::Raw]);
        assert_eq!(second, [Backend::QsdBuffered, Backend::Raw, Backend::Gmemd]);
        let uncached = cases.len() - 1;
        assert_eq!(
            slots.iter().filter(|s| s.rep == 1 && s.case == uncached).count(),
            4,
            "the uncached case adds qsd with O_DIRECT"
        );
        assert!(order(&cases, 1, true).iter().all(|s| !s.backend.is_qsd()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
