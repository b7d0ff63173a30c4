//! Facts about the machine and its tools, recorded with every result.

use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The host a result was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    /// CPUs this process may run on.
    pub nproc: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub qemu_version: String,
    /// `None` with `--gmemd-only`.
    pub qsd_version: Option<String>,
    /// Where the disk images live (both backends use the same directory).
    pub temp_dir: String,
    /// Whether /dev/kvm exists. The benchmark uses TCG either way.
    pub dev_kvm: bool,
}

impl HostInfo {
    /// Gathers the facts; `qsd` is the storage daemon's binary, if used.
    pub fn gather(qemu: &Path, qsd: Option<&Path>) -> Result<HostInfo> {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        });
        Ok(HostInfo {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
            qemu_version: tool_version(qemu, "QEMU (qemu-system-x86_64)", "install qemu-system-x86")?,
            qsd_version: qsd
                .map(|qsd| {
                    tool_version(
                        qsd,
                        "qemu-storage-daemon",
                        "install qemu-utils (Debian ships it there; use the same QEMU release), \
                         pass --qsd PATH, or run with --gmemd-only",
                    )
                })
                .transpose()?,
            temp_dir: std::env::temp_dir().display().to_string(),
            dev_kvm: Path::new("/dev/kvm").exists(),
        })
    }
}

/// First line of `binary --version`; a clear error when the tool is missing.
pub fn tool_version(binary: &Path, what: &str, hint: &str) -> Result<String> {
    let out = match Command::new(binary).arg("--version").output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("{what} not found: no executable {} (on PATH or as given); {hint}", binary.display())
        }
        Err(e) => return Err(e).with_context(|| format!("running {} --version", binary.display())),
    };
    if !out.status.success() {
        bail!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// Runs the host's `sync(1)`, so dirty pages left by the previous run (or by
/// anything else on the host) are written back before the next run starts
/// and its fdatasync pays only for its own data.
pub fn sync_host() -> Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(())
}

/// Seconds since the epoch as a UTC timestamp, `2026-11-21T09:30:00Z`;
/// `file_safe` uses `-` instead of `:` (for file names).
pub fn utc_timestamp(file_safe: bool) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let sep = if file_safe { '-' } else { ':' };
    format!("{y:04}-{m:02}-{d:02}T{:02}{sep}{:02}{sep}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_778), (2026, 11, 21));
    }

    #[test]
    fn missing_tool_is_a_clear_error() {
        let err = tool_version(Path::new("/nonexistent/qsd"), "qemu-storage-daemon", "hint")
            .expect_err("a missing binary must fail");
        assert!(err.to_string().contains("qemu-storage-daemon not found"), "{err}");
    }
}
