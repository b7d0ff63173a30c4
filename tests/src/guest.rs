//! The Linux test guest: kernel + initramfs built by `scripts/guest-image`,
//! and the protocol its agents speak on the serial console.
//!
//! The guest's init runs one agent chosen on the kernel command line
//! (`agent=NAME agent.KEY=VALUE ...`, see [`agent_append`]). Agents print
//! `GMEMD-RESULT key=value ...` lines (long-running ones also
//! `GMEMD-PROGRESS key=<count>` lines), init prints `GMEMD-AGENT-EXIT <rc>`
//! and powers off; [`AgentResults::parse`] turns the captured serial text back
//! into values. Agents live in `scripts/guest/agents/`; each documents its
//! parameters and result keys at the top.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Marker of a result line: `GMEMD-RESULT key=value key=value ...`.
pub const RESULT_MARKER: &str = "GMEMD-RESULT";
/// Marker of a progress line: `GMEMD-PROGRESS key=<count> ...`, e.g. the
/// blocks the seqio agent has done so far. Not a result.
pub const PROGRESS_MARKER: &str = "GMEMD-PROGRESS";
/// Marker init prints with the agent's exit status before powering off.
pub const EXIT_MARKER: &str = "GMEMD-AGENT-EXIT";
/// Marker init prints just before it runs the agent:
/// `GMEMD-AGENT-START <name> uptime=<guest seconds since boot>`.
pub const START_MARKER: &str = "GMEMD-AGENT-START";

/// Kernel and initramfs of the test guest, for QEMU's `-kernel`/`-initrd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// Builds the guest image if needed (first run downloads Debian packages;
    /// later runs are a sub-second cache hit) and returns its paths.
    ///
    /// Runs `scripts/guest-image` at most once per process: tests call this
    /// freely. A failure is remembered too, so a broken setup fails every test
    /// quickly with the same message instead of retrying the download.
    pub fn ensure() -> Result<GuestImage> {
        static IMAGE: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
        IMAGE.get_or_init(|| build_image().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
    }
}

/// The workspace root: this crate lives in `<root>/tests`.
pub fn repo_root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest)
}

fn build_image() -> Result<GuestImage> {
    let dir = run_path_script("guest-image")?;
    let image = GuestImage { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
    for file in [&image.kernel, &image.initrd] {
        if !file.is_file() {
            bail!("scripts/guest-image reported {} but {} is missing", dir.display(), file.display());
        }
    }
    log::info!("test guest image: {}", dir.display());
    Ok(image)
}

/// Runs `scripts/<name>`, whose contract is to print exactly one line on
/// stdout, a path, and progress on stderr; returns the path. Its stderr
/// goes to the debug log, or into the error if it fails.
pub(crate) fn run_path_script(name: &str) -> Result<PathBuf> {
    let script = repo_root().join("scripts").join(name);
    let out = Command::new(&script).output().with_context(|| format!("cannot run {}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{} failed ({}); its output:\n{}", script.display(), out.status, stderr.trim_end());
    }
    for line in stderr.lines() {
        log::debug!("{name}: {line}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().collect::<Vec<_>>().as_slice() {
        [path] if !path.trim().is_empty() => Ok(PathBuf::from(path.trim())),
        _ => bail!("{} printed {stdout:?} instead of one path line; stderr:\n{}", script.display(), stderr.trim_end()),
    }
}

/// Kernel command line (QEMU `-append`) that runs agent `agent` with the given
/// parameters; the agent sees `agent.mib=64` as `AGENT_MIB=64` (keys
/// uppercased, dashes turned into underscores).
///
/// Keys and values must not contain whitespace: the guest splits the command
/// line on it. Agents take numbers and hex strings only.
pub fn agent_append(agent: &str, params: &[(&str, &str)]) -> String {
    debug_assert!(!agent.is_empty() && !agent.contains(char::is_whitespace), "bad agent name {agent:?}");
    let mut line = format!("console=ttyS0 quiet panic=-1 agent={agent}");
    for (key, value) in params {
        debug_assert!(
            !key.is_empty() && !format!("{key}{value}").contains(char::is_whitespace),
            "agent parameter {key:?}={value:?} must not contain whitespace"
        );
        line.push_str(&format!(" agent.{key}={value}"));
    }
    line
}

/// What an agent reported on the serial console.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentResults {
    /// Every `key=value` of every result line, in console order.
    pairs: Vec<(String, String)>,
    /// Every numeric `key=count` of every progress line, in console order.
    progress: Vec<(String, u64)>,
    exit: Option<i32>,
    started: Option<(String, Option<String>)>,
}

impl AgentResults {
    /// Parses captured serial output. Robust against what a raw console
    /// carries besides our lines: `\r\n` endings, firmware escape sequences and
    /// kernel messages before a marker on the same line, interleaved kernel log
    /// lines, a truncated last line. A last line without its newline is left
    /// out: the guest may still be writing it, and reading it half-way would
    /// report a result line without its later keys.
    ///
    /// Values are cut at the first character outside `[A-Za-z0-9._:+/-]`
    /// (agents only print such values), so a kernel message that lands in the
    /// middle of a result line costs at most the rest of that line. Tokens
    /// without `=` are ignored.
    pub fn parse(serial: &str) -> AgentResults {
        let mut results = AgentResults::default();
        let complete = serial.rfind(['\n', '\r']).map_or("", |end| &serial[..end]);
        for line in complete.split(['\n', '\r']) {
            if let Some(rest) = after_marker(line, RESULT_MARKER) {
                for token in rest.split_whitespace() {
                    let Some((key, value)) = token.split_once('=') else {
                        continue;
                    };
                    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
                        continue;
                    }
                    let end = value.find(|c: char| !is_value_char(c)).unwrap_or(value.len());
                    results.pairs.push((key.to_owned(), value[..end].to_owned()));
                }
            } else if let Some(rest) = after_marker(line, PROGRESS_MARKER) {
                for token in rest.split_whitespace() {
                    if let Some((key, count)) = token.split_once('=') {
                        if let Ok(count) = count.parse() {
                            results.progress.push((key.to_owned(), count));
                        }
                    }
                }
            } else if let Some(rest) = after_marker(line, EXIT_MARKER) {
                // A line cut short (QEMU killed mid-write) has no number: skip it.
                if let Some(code) = rest.split_whitespace().next().and_then(|t| t.parse().ok()) {
                    results.exit = Some(code);
                }
            } else if let Some(rest) = after_marker(line, START_MARKER) {
                let mut words = rest.split_whitespace();
                if let Some(name) = words.next() {
                    let uptime = words.find_map(|w| w.strip_prefix("uptime=")).map(str::to_owned);
                    results.started = Some((name.to_owned(), uptime));
                }
            }
        }
        results
    }

    /// The value of `key`; if several result lines set it, the last one.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Every value reported for `key`, in console order (e.g. each `op=` of
    /// the bench agent).
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    /// The highest progress count reported for `key`, if any. Counts only
    /// grow, and a line cut short (a count missing its last digits) cannot
    /// lower the maximum.
    pub fn progress(&self, key: &str) -> Option<u64> {
        self.progress.iter().filter(|(k, _)| k == key).map(|(_, count)| *count).max()
    }

    /// The agent's exit status, once init has reported it; `None` while the
    /// agent still runs (or if the guest died first).
    pub fn exit_code(&self) -> Option<i32> {
        self.exit
    }

    /// Name of the agent init started, if it got that far.
    pub fn agent(&self) -> Option<&str> {
        self.started.as_ref().map(|(name, _)| name.as_str())
    }

    /// Guest uptime in seconds when the agent started (kernel boot + init),
    /// useful to report boot time.
    pub fn boot_seconds(&self) -> Option<f64> {
        self.started.as_ref()?.1.as_deref()?.parse().ok()
    }
}

/// The text after the first occurrence of `marker` followed by a space or the
/// end of the line. Found anywhere in the line: firmware escapes or a kernel
/// message may precede it.
fn after_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let mut search = line;
    while let Some(pos) = search.find(marker) {
        let rest = &search[pos + marker.len()..];
        if rest.is_empty() || rest.starts_with(char::is_whitespace) {
            return Some(rest);
        }
        search = rest;
    }
    None
}

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._:+/-".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_line() {
        assert_eq!(agent_append("idle", &[]), "console=ttyS0 quiet panic=-1 agent=idle");
        assert_eq!(
            agent_append("bench", &[("mib", "64"), ("randreads", "100")]),
            "console=ttyS0 quiet panic=-1 agent=bench agent.mib=64 agent.randreads=100"
        );
    }

    #[test]
    fn parses_a_real_console() {
        // Shape of an actual run: SeaBIOS escapes, \r\n, kernel log lines.
        let serial = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.3)\r\n\
            Booting from ROM..\x1bc\x1b[?7l\x1b[2J\r\n\
            GMEMD-AGENT-START write-verify uptime=2.98\r\n\
            GMEMD-RESULT written_sha256=55f8 readback_sha256=55f8 mib=32 match=yes\r\n\
            [    6.123456] virtio_blk virtio0: something\r\n\
            GMEMD-RESULT discard=ok\r\n\
            GMEMD-AGENT-EXIT 0\r\n\
            [    6.594453] reboot: Power down\r\n";
        let r = AgentResults::parse(serial);
        assert_eq!(r.get("written_sha256"), Some("55f8"));
        assert_eq!(r.get("match"), Some("yes"));
        assert_eq!(r.get("mib"), Some("32"));
        assert_eq!(r.get("discard"), Some("ok"));
        assert_eq!(r.get("virtio0:"), None);
        assert_eq!(r.exit_code(), Some(0));
        assert_eq!(r.agent(), Some("write-verify"));
        assert_eq!(r.boot_seconds(), Some(2.98));
    }

    #[test]
    fn a_line_still_being_written_is_not_read() {
        let serial = "GMEMD-RESULT seqio_blocks=16384 seqio_bad_slots=0\nGMEMD-RESULT seqio_blocks=16384 seqio_bad";
        let r = AgentResults::parse(serial);
        assert_eq!(r.all("seqio_blocks"), ["16384"], "only the complete line");
        assert_eq!(r.get("seqio_bad_slots"), Some("0"));
        assert_eq!(AgentResults::parse("GMEMD-RESULT done=1").get("done"), None);
    }

    #[test]
    fn last_value_wins_and_all_keeps_order() {
        let serial = "GMEMD-RESULT op=seq-write mib=128 seconds=0.28 mib_per_s=451.51\n\
            GMEMD-RESULT op=seq-read mib=128 seconds=0.06 mib_per_s=2016.17\n\
            GMEMD-RESULT op=rand-read count=8192 seconds=1.22 iops=6681\n";
        let r = AgentResults::parse(serial);
        assert_eq!(r.get("op"), Some("rand-read"));
        assert_eq!(r.all("op"), ["seq-write", "seq-read", "rand-read"]);
        assert_eq!(r.all("mib_per_s"), ["451.51", "2016.17"]);
        assert!(r.all("nope").is_empty());
        assert_eq!(r.exit_code(), None);
    }

    #[test]
    fn marker_mid_line_and_kernel_noise_inside_a_line() {
        let serial = "Booting from ROM..\x1b[2JGMEMD-RESULT ready=1\r\n\
            GMEMD-RESULT cpus=2[    3.1] random: crng init done\n\
            junk GMEMD-RESULTS x=1 GMEMD-RESULT y=2\n";
        let r = AgentResults::parse(serial);
        assert_eq!(r.get("ready"), Some("1"));
        assert_eq!(r.get("cpus"), Some("2"));
        assert_eq!(r.get("x"), None);
        assert_eq!(r.get("y"), Some("2"));
    }

    #[test]
    fn progress_lines_are_not_results() {
        let serial = "GMEMD-AGENT-START seqio uptime=1.5\r\n\
            GMEMD-PROGRESS seqio=256\r\n\
            GMEMD-PROGRESS seqio=512\r\n\
            GMEMD-RESULT seqio_blocks=600 seqio_bad_slots=0\r\n\
            GMEMD-PROGRESS seqio=76";
        let r = AgentResults::parse(serial);
        assert_eq!(r.get("seqio"), None);
        assert_eq!(r.get("seqio_blocks"), Some("600"));
        assert_eq!(r.all("seqio_bad_slots"), ["0"]);
        // The last line is cut short (768 in the making).
        assert_eq!(r.progress("seqio"), Some(512));
        assert_eq!(r.progress("other"), None);
        assert_eq!(AgentResults::parse("GMEMD-RESULT seqio=5\n").progress("seqio"), None);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(AgentResults::parse("GMEMD-AGENT-EXIT 127\r\n").exit_code(), Some(127));
        assert_eq!(AgentResults::parse("GMEMD-AGENT-EXIT 1\nGMEMD-AGENT-EXIT 0\n").exit_code(), Some(0));
        // A line without its newline yet is not read.
        assert_eq!(AgentResults::parse("GMEMD-AGENT-EXIT 1\nGMEMD-AGENT-EXIT 0").exit_code(), Some(1));
        // Cut off mid-line, or no exit line at all.
        assert_eq!(AgentResults::parse("GMEMD-AGENT-EXIT ").exit_code(), None);
        assert_eq!(AgentResults::parse("GMEMD-AGENT-EXIT").exit_code(), None);
        assert_eq!(AgentResults::parse("").exit_code(), None);
        assert_eq!(AgentResults::parse("").get("x"), None);
    }

    #[test]
    fn malformed_tokens_are_skipped() {
        let r = AgentResults::parse("GMEMD-RESULT =x novalue k= a.b=1 ok=yes\n");
        assert_eq!(r.get(""), None);
        assert_eq!(r.get("novalue"), None);
        assert_eq!(r.get("k"), Some(""));
        assert_eq!(r.get("a.b"), None);
        assert_eq!(r.get("ok"), Some("yes"));
    }
}
