//! [`ProgressClock`]: host-side timestamps of the progress lines a guest
//! prints on its serial console, taken while the guest runs.
//!
//! The guest's own clock does not see the time its VM spends stopped (a
//! migration's switchover; under TCG, guest time stands still with the
//! vCPUs), so in-guest timing cannot measure how long the guest stalled. The
//! host can: a thread reads the console files every poll interval and stamps
//! each `GMEMD-PROGRESS key=<count>` line with the host's monotonic clock at
//! the poll that found its first byte (an agent prints a line right after
//! the progress it reports). The largest gap between consecutive lines
//! ([`ProgressTimeline::gaps_overlapping`]) is the longest time the guest
//! made no visible progress; its resolution is the interval between lines
//! ([`ProgressTimeline::typical_interval`]) plus the poll interval.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::guest::AgentResults;

/// One progress line, as the host saw it appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressStamp {
    /// The poll that found the line's first byte.
    pub at: Instant,
    /// The line's count (e.g. blocks done).
    pub count: u64,
    /// Which of the clock's files (0-based) the line began in: for a
    /// migration, 0 is the source's console and 1 the destination's.
    pub file: usize,
}

/// What the poller and its owner share.
#[derive(Debug, Default)]
struct Shared {
    stopping: AtomicBool,
    stamps: Mutex<Vec<ProgressStamp>>,
}

impl Shared {
    fn stamps(&self) -> std::sync::MutexGuard<'_, Vec<ProgressStamp>> {
        self.stamps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A thread timestamping one guest console's progress lines; stopped on
/// drop.
///
/// The console may span several files written one after the other, e.g. a
/// migration's source then destination serial file: they are read as one
/// stream, in the order given, so a line the source began and the
/// destination finished counts once, as the source's. This holds because
/// the guest runs on one side at a time.
#[derive(Debug)]
pub struct ProgressClock {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ProgressClock {
    /// Starts polling `files` (which may not exist yet) every `poll` for
    /// `GMEMD-PROGRESS` lines carrying `key`.
    pub fn start(files: Vec<PathBuf>, key: &str, poll: Duration) -> Result<ProgressClock> {
        let shared = Arc::new(Shared::default());
        let poller = Poller {
            files: files.into_iter().map(|path| (path, None)).collect(),
            key: key.to_owned(),
            line: Vec::new(),
            began: None,
        };
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("progress-clock".into())
                .spawn(move || poller.run(&shared, poll))
                .context("spawning the progress clock")?
        };
        Ok(ProgressClock { shared, thread: Some(thread) })
    }

    /// The latest stamp so far.
    pub fn latest(&self) -> Option<ProgressStamp> {
        self.shared.stamps().last().copied()
    }

    /// Waits up to `timeout` for the latest stamp to satisfy `done` and
    /// returns it; `None` on timeout.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&ProgressStamp) -> bool) -> Option<ProgressStamp> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(stamp) = self.latest().filter(&done) {
                return Some(stamp);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops polling and returns every stamp, or the error that stopped the
    /// poller.
    pub fn stop(mut self) -> Result<ProgressTimeline> {
        self.halt()?;
        Ok(ProgressTimeline(std::mem::take(&mut *self.shared.stamps())))
    }

    fn halt(&mut self) -> Result<()> {
        self.shared.stopping.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(anyhow!("the progress clock panicked")),
        }
    }
}

impl Drop for ProgressClock {
    fn drop(&mut self) {
        if let Err(e) = self.halt() {
            log::warn!("{e:#}");
        }
    }
}

/// The poller thread's state: the files, in order, and the line being read
/// with when and in which file it began.
#[derive(Debug)]
struct Poller {
    files: Vec<(PathBuf, Option<File>)>,
    key: String,
    line: Vec<u8>,
    began: Option<(Instant, usize)>,
}

impl Poller {
    fn run(mut self, shared: &Shared, poll: Duration) -> Result<()> {
        let mut chunk = Vec::new();
        while !shared.stopping.load(Ordering::Acquire) {
            for (index, (path, file)) in self.files.iter_mut().enumerate() {
                if file.is_none() {
                    match File::open(&*path) {
                        Ok(opened) => *file = Some(opened),
                        Err(e) if e.kind() == ErrorKind::NotFound => continue,
                        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
                    }
                }
                if let Some(file) = file {
                    chunk.clear();
                    file.read_to_end(&mut chunk).with_context(|| format!("reading {}", path.display()))?;
                    let at = Instant::now();
                    for &byte in &chunk {
                        let (began_at, began_in) = *self.began.get_or_insert((at, index));
                        if byte != b'\n' {
                            self.line.push(byte);
                            continue;
                        }
                        let text = String::from_utf8_lossy(&self.line);
                        if let Some(count) = AgentResults::parse(&text).progress(&self.key) {
                            shared.stamps().push(ProgressStamp { at: began_at, count, file: began_in });
                        }
                        self.line.clear();
                        self.began = None;
                    }
                }
            }
            thread::sleep(poll);
        }
        Ok(())
    }
}

/// Every progress stamp of a run, in the order the lines appeared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressTimeline(pub Vec<ProgressStamp>);

/// The time between two consecutive progress lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressGap {
    /// The line before the gap.
    pub before: ProgressStamp,
    /// The line after it.
    pub after: ProgressStamp,
}

impl ProgressGap {
    /// How long no line appeared.
    pub fn duration(&self) -> Duration {
        self.after.at.saturating_duration_since(self.before.at)
    }
}

impl ProgressTimeline {
    /// Consecutive pairs of lines.
    fn gaps(&self) -> impl Iterator<Item = ProgressGap> + '_ {
        self.0.windows(2).map(|pair| ProgressGap { before: pair[0], after: pair[1] })
    }

    /// The first line that began in file `file` (for a migration's files: the
    /// guest's first progress on the destination).
    pub fn first_from(&self, file: usize) -> Option<ProgressStamp> {
        self.0.iter().find(|stamp| stamp.file == file).copied()
    }

    /// The gaps between consecutive lines that overlap `start..end` (a gap
    /// that began before `start` or ended after `end` counts whole),
    /// longest first.
    pub fn gaps_overlapping(&self, start: Instant, end: Instant) -> Vec<ProgressGap> {
        let mut gaps: Vec<ProgressGap> =
            self.gaps().filter(|gap| gap.after.at >= start && gap.before.at <= end).collect();
        gaps.sort_by_key(|gap| std::cmp::Reverse(gap.duration()));
        gaps
    }

    /// The median gap between consecutive lines that ended before `before`:
    /// how often the guest printed while undisturbed, i.e. the resolution
    /// of a gap.
    pub fn typical_interval(&self, before: Instant) -> Option<Duration> {
        let mut gaps: Vec<Duration> =
            self.gaps().filter(|gap| gap.after.at < before).map(|gap| gap.duration()).collect();
        gaps.sort_unstable();
        gaps.get(gaps.len() / 2).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(millis: &[u64]) -> (Instant, ProgressTimeline) {
        let t0 = Instant::now();
        let stamps = millis
            .iter()
            .zip(1..)
            .map(|(&ms, count)| ProgressStamp { at: t0 + Duration::from_millis(ms), count, file: 0 })
            .collect();
        (t0, ProgressTimeline(stamps))
    }

    #[test]
    fn gaps_overlapping_the_window_longest_first() {
        let (t0, tl) = timeline(&[0, 2, 4, 6, 56, 58, 60, 160, 162]);
        let ms = |n| t0 + Duration::from_millis(n);
        let gaps = |from, to| -> Vec<(Duration, u64, u64)> {
            tl.gaps_overlapping(ms(from), ms(to))
                .iter()
                .map(|g| (g.duration(), g.before.count, g.after.count))
                .collect()
        };
        // The 100 ms gap lies outside the window; the 50 ms one overlaps it.
        let d = Duration::from_millis;
        assert_eq!(gaps(5, 57), [(d(50), 4, 5), (d(2), 3, 4), (d(2), 5, 6)]);
        assert_eq!(gaps(5, 161)[..3], [(d(100), 7, 8), (d(50), 4, 5), (d(2), 3, 4)]);
        // A window inside one gap still finds it.
        assert_eq!(gaps(100, 101), [(d(100), 7, 8)]);
        assert_eq!(tl.typical_interval(ms(7)), Some(d(2)));
        assert!(ProgressTimeline::default().gaps_overlapping(t0, ms(1)).is_empty());
        assert_eq!(ProgressTimeline::default().typical_interval(ms(1)), None);
    }

    #[test]
    fn a_line_split_across_files_counts_once_as_where_it_began() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (src, dst) = (dir.path().join("src.serial"), dir.path().join("dst.serial"));
        std::fs::write(&src, "boot\r\nGMEMD-PROGRESS seqio=4\r\nGMEMD-PROGRESS seq")?;
        let clock = ProgressClock::start(vec![src, dst.clone()], "seqio", Duration::from_millis(1))?;
        assert!(clock.wait_for(Duration::from_secs(5), |s| s.count == 4).is_some());
        std::fs::write(&dst, "io=8\r\nGMEMD-PROGRESS other=9\r\nGMEMD-PROGRESS seqio=12\r\n")?;
        assert!(clock.wait_for(Duration::from_secs(5), |s| s.count == 12).is_some());
        let timeline = clock.stop()?;
        let lines: Vec<(u64, usize)> = timeline.0.iter().map(|s| (s.count, s.file)).collect();
        assert_eq!(lines, [(4, 0), (8, 0), (12, 1)]);
        assert_eq!(timeline.first_from(1).map(|s| s.count), Some(12));
        assert_eq!(timeline.first_from(2), None);
        Ok(())
    }
}
