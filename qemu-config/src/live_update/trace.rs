//! QEMU's own downtime figure, from the `vmstate_downtime_checkpoint`
//! lines its stderr gets with
//! [`QemuCommand::downtime_trace`](crate::QemuCommand::downtime_trace).
//! `query-migrate` cannot give it for
//! cpr-exec: the image that knows the start is gone when the figure could
//! be asked for.
//!
//! With `-msg timestamp=on` QEMU 10.0 writes
//! `31832@1796127411.666210:vmstate_downtime_checkpoint src-downtime-start`
//! (thread id, then seconds since the epoch) and QEMU 11 writes
//! `2026-12-01T12:16:07.300264Z vmstate_downtime_checkpoint src-downtime-start`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Deadline, LiveUpdateError};
use crate::cmdline::DOWNTIME_TRACE_EVENT;

/// Where QEMU's downtime starts: the old QEMU begins to stop the guest.
const START: &str = "src-downtime-start";
/// Where it ends: the new QEMU has started the guest.
const END: &str = "dst-precopy-bh-vm-started";

/// How long to wait for the end checkpoint when the start is in the log:
/// QEMU writes it right after starting the guest, before QMP can say so,
/// but stderr may be a pipe someone else drains.
const END_WAIT: Duration = Duration::from_secs(1);

/// A position in QEMU's log: a hop reads only what comes after it.
#[derive(Debug)]
pub(super) struct LogMark {
    path: PathBuf,
    offset: u64,
}

impl LogMark {
    /// The end of `path` now (0 if it does not exist yet).
    pub(super) fn new(path: &Path) -> Result<Self, LiveUpdateError> {
        let offset = match std::fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(LiveUpdateError::File { what: "reading QEMU's log", path: path.to_owned(), source })
            }
        };
        Ok(LogMark { path: path.to_owned(), offset })
    }

    /// QEMU's downtime among the lines written since the mark, if they
    /// have both checkpoints.
    pub(super) fn downtime(&self) -> Result<Option<Duration>, LiveUpdateError> {
        let waited = Deadline::after(END_WAIT).poll("QEMU's last downtime checkpoint", || {
            let text = self.read()?;
            let found = qemu_downtime(&text);
            Ok((found.is_some() || !text.contains(START)).then_some(found))
        });
        match waited {
            Err(LiveUpdateError::Timeout { .. }) => Ok(None),
            other => other,
        }
    }

    fn read(&self) -> Result<String, LiveUpdateError> {
        let error = |source| LiveUpdateError::File { what: "reading QEMU's log", path: self.path.clone(), source };
        let mut file = File::open(&self.path).map_err(error)?;
        file.seek(SeekFrom::Start(self.offset)).map_err(error)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(error)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The last downtime in `log`: from the last `src-downtime-start` before
/// the last `dst-precopy-bh-vm-started` to that one.
fn qemu_downtime(log: &str) -> Option<Duration> {
    let checkpoints: Vec<(i64, &str)> = log.lines().filter_map(checkpoint).collect();
    let end = checkpoints.iter().rposition(|(_, name)| *name == END)?;
    let (end_us, _) = checkpoints[end];
    let (start_us, _) = checkpoints[..end].iter().rev().find(|(_, name)| *name == START)?;
    u64::try_from(end_us - start_us).ok().map(Duration::from_micros)
}

/// A checkpoint line's time (µs since the epoch) and name.
fn checkpoint(line: &str) -> Option<(i64, &str)> {
    let at = line.find(DOWNTIME_TRACE_EVENT)?;
    let name = line[at + DOWNTIME_TRACE_EVENT.len()..].split_whitespace().next()?;
    let name = name.strip_prefix("checkpoint=").unwrap_or(name);
    let stamp = line[..at].trim_end_matches([':', ' ']);
    let micros = match stamp.rsplit_once('@') {
        Some((_thread, epoch)) => epoch_micros(epoch)?,
        None => iso8601_micros(stamp)?,
    };
    Some((micros, name))
}

/// `1796127411.666210` → µs.
fn epoch_micros(text: &str) -> Option<i64> {
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    Some(seconds.parse::<i64>().ok()? * 1_000_000 + fraction_micros(fraction)?)
}

/// `2026-12-01T12:16:07.300264Z` (UTC) → µs since the epoch.
fn iso8601_micros(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut parts = hms.splitn(3, ':').map(str::parse::<i64>);
    let (hour, minute, second) = (parts.next()?.ok()?, parts.next()?.ok()?, parts.next()?.ok()?);
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(seconds * 1_000_000 + fraction_micros(fraction)?)
}

/// The digits after the decimal point, as µs (`5` is 500000 µs).
fn fraction_micros(digits: &str) -> Option<i64> {
    if digits.is_empty() {
        return Some(0);
    }
    let six: String = digits.chars().chain(std::iter::repeat('0')).take(6).collect();
    six.parse().ok()
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        // date -u -d 2026-12-01 +%s = 1796083200
        assert_eq!(days_from_civil(2026, 12, 1) * 86_400, 1_796_083_200);
        assert_eq!(iso8601_micros("1970-01-02T00:00:01.5Z"), Some(86_401_500_000));
    }

    /// A cpr-transfer hop as QEMU 10.0.2 logged it here (vhost-user lines
    /// between the checkpoints left out).
    const QEMU_10: &str = "\
31843@1796127411.663804:vhost_user_write req:34 flags:0x1
31832@1796127411.666210:vmstate_downtime_checkpoint src-downtime-start
31832@1796127411.667013:vmstate_downtime_checkpoint src-vm-stopped
31851@1796127411.669105:vmstate_downtime_checkpoint src-downtime-end
31843@1796127411.670774:vmstate_downtime_checkpoint dst-precopy-loadvm-completed
31843@1796127411.671206:vmstate_downtime_checkpoint dst-precopy-bh-vm-started
";

    /// A cpr-exec hop as QEMU 11.1.3 logged it here.
    const QEMU_11: &str = "\
2026-12-01T12:16:08.381330Z vmstate_downtime_checkpoint src-downtime-start
2026-12-01T12:16:08.381837Z vmstate_downtime_checkpoint src-vm-stopped
2026-12-01T12:16:08.389457Z vmstate_downtime_checkpoint src-downtime-end
2026-12-01T12:16:08.441801Z vhost_user_write req:1 (GET_FEATURES) flags:0x1
2026-12-01T12:16:08.449166Z vmstate_downtime_checkpoint dst-precopy-loadvm-completed
2026-12-01T12:16:08.449703Z vmstate_downtime_checkpoint dst-precopy-bh-vm-started
";

    #[test]
    fn both_formats() {
        assert_eq!(qemu_downtime(QEMU_10), Some(Duration::from_micros(4996)));
        assert_eq!(qemu_downtime(QEMU_11), Some(Duration::from_micros(68_373)));
    }

    #[test]
    fn the_last_complete_hop_counts() {
        let two = format!("{QEMU_10}{QEMU_11}");
        assert_eq!(qemu_downtime(&two), Some(Duration::from_micros(68_373)));
        let unfinished = format!("{QEMU_10}{}", &QEMU_11[..200]);
        assert_eq!(qemu_downtime(&unfinished), Some(Duration::from_micros(4996)));
        assert_eq!(qemu_downtime("no trace here\n"), None);
        assert_eq!(qemu_downtime(&QEMU_11[..150]), None, "start without end");
    }
}
