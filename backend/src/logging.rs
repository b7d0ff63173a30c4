//! The daemon's logger: env_logger, rate-limited per call site.
//!
//! Many lines can be triggered at will by a guest (a bad descriptor) or a
//! frontend (a bad message), including lines inside virtio-queue. Rather
//! than guard each one, the logger itself limits every call site: the first
//! [`BURST`] lines pass, then one per [`INTERVAL`], which carries the count
//! of what was suppressed since the last one. A flood costs a hash lookup
//! per line and a few bytes of log per interval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{Log, Metadata, Record};

/// Lines a call site may log before it is limited.
pub const BURST: u32 = 5;
/// A limited call site logs at most one line per interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Site {
    logged: u32,
    last: Instant,
    suppressed: u64,
}

/// What to do with one line from a call site.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Log,
    /// Log, noting how many lines were dropped before this one.
    LogAfter(u64),
    Drop,
}

/// Per call-site counters; call sites are code locations, so the map is bounded.
#[derive(Debug, Default)]
struct Limiter {
    sites: HashMap<(String, u32), Site>,
}

impl Limiter {
    fn judge(&mut self, key: (String, u32), now: Instant) -> Verdict {
        let site = self.sites.entry(key).or_insert(Site { logged: 0, last: now, suppressed: 0 });
        if site.logged < BURST {
            site.logged += 1;
            site.last = now;
            return Verdict::Log;
        }
        if now.duration_since(site.last) < INTERVAL {
            site.suppressed += 1;
            return Verdict::Drop;
        }
        site.last = now;
        match std::mem::take(&mut site.suppressed) {
            0 => Verdict::Log,
            n => Verdict::LogAfter(n),
        }
    }
}

/// env_logger behind a per-call-site rate limit.
#[derive(Debug)]
pub struct RateLimitedLogger {
    inner: env_logger::Logger,
    limiter: Mutex<Limiter>,
}

impl RateLimitedLogger {
    /// Installs the logger: `RUST_LOG` decides what is logged (default:
    /// warnings and errors), and every call site is rate-limited.
    pub fn install() -> Result<(), log::SetLoggerError> {
        let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).build();
        let max = inner.filter();
        log::set_boxed_logger(Box::new(RateLimitedLogger { inner, limiter: Mutex::default() }))?;
        log::set_max_level(max);
        Ok(())
    }
}

impl Log for RateLimitedLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let key = (record.file().unwrap_or(record.target()).to_string(), record.line().unwrap_or(0));
        let verdict = self.limiter.lock().unwrap_or_else(|p| p.into_inner()).judge(key, Instant::now());
        match verdict {
            Verdict::Log => self.inner.log(record),
            Verdict::LogAfter(suppressed) => self.inner.log(
                &Record::builder()
                    .args(format_args!("{} [{suppressed} similar lines suppressed]", record.args()))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
            Verdict::Drop => {}
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_passes_a_burst_then_one_line_per_interval_with_the_count() {
        let mut limiter = Limiter::default();
        let start = Instant::now();
        let site = || ("src/x.rs".to_string(), 7);
        for _ in 0..BURST {
            assert_eq!(limiter.judge(site(), start), Verdict::Log);
        }
        for _ in 0..1000 {
            assert_eq!(limiter.judge(site(), start + Duration::from_secs(1)), Verdict::Drop);
        }
        assert_eq!(limiter.judge(("src/x.rs".to_string(), 8), start), Verdict::Log, "other sites are not limited");
        assert_eq!(limiter.judge(site(), start + INTERVAL), Verdict::LogAfter(1000));
        assert_eq!(limiter.judge(site(), start + INTERVAL), Verdict::Drop);
        assert_eq!(limiter.judge(site(), start + 3 * INTERVAL), Verdict::LogAfter(1));
        assert_eq!(limiter.judge(site(), start + 5 * INTERVAL), Verdict::Log);
    }
}
