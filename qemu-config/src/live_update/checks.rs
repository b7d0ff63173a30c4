//! What a hop checks before it changes anything: everything that would
//! otherwise lose the guest, and that QEMU itself does not refuse.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::{greeting_version, CprMode, LiveUpdateError, NextQemu, QemuVersion, Running};
use crate::process::ProcessHandle;
use crate::qmp::QmpClient;

/// Checks that the guest the QEMU behind `qmp` runs can move to `next`
/// in `mode`, and returns what it learnt about that QEMU.
pub(super) fn check(qmp: &mut QmpClient, mode: CprMode, next: &NextQemu) -> Result<Running, LiveUpdateError> {
    let pid = qmp
        .peer_pid()
        .map_err(LiveUpdateError::qmp("reading the QMP peer's pid"))?
        .ok_or_else(|| LiveUpdateError::NoPeerPid { qmp: next.qmp.clone() })?;
    let handle = ProcessHandle::open(pid).map_err(LiveUpdateError::process(pid))?;
    let version = greeting_version(qmp, "the running QEMU's QMP greeting")?;

    let run_state = qmp.query_status().map_err(LiveUpdateError::qmp("query-status on the running QEMU"))?;
    if !matches!(run_state.as_str(), "running" | "paused") {
        return Err(LiveUpdateError::NotRunning { run_state });
    }
    let migration =
        qmp.execute("query-migrate", Value::Null).map_err(LiveUpdateError::qmp("query-migrate on the running QEMU"))?;
    if let Some(status) = migration["status"].as_str() {
        if !matches!(status, "completed" | "failed" | "cancelled" | "none") {
            return Err(LiveUpdateError::MigrationInProgress { status: status.to_owned() });
        }
    }

    let next_version = QemuVersion::of_binary(&next.binary)?;
    if next_version < mode.min_version() {
        return Err(LiveUpdateError::BinaryTooOld { binary: next.binary.clone(), version: next_version, mode });
    }

    shared_memory(qmp)?;
    same_machine_type(qmp, next)?;
    let running_args = handle.cmdline().map_err(LiveUpdateError::process(pid))?;
    same_machine(running_args.get(1..).unwrap_or_default(), &next.args)?;
    same_ram(&handle, &next.args)?;
    Ok(Running { handle, version, run_state })
}

/// Every memory backend is `share=on` and the machine has `aux-ram-share=on`:
/// otherwise guest RAM, or the ROMs and ACPI tables, stay in the old QEMU's
/// private memory. QEMU refuses cpr-transfer then, but QEMU 11 goes ahead
/// with cpr-exec, and the new image runs without them.
fn shared_memory(qmp: &mut QmpClient) -> Result<(), LiveUpdateError> {
    const DURING: &str = "query-memdev on the running QEMU";
    let memdevs = qmp.execute("query-memdev", Value::Null).map_err(LiveUpdateError::qmp(DURING))?;
    let memdevs =
        memdevs.as_array().ok_or_else(|| LiveUpdateError::Malformed { during: DURING, reply: memdevs.to_string() })?;
    if let Some(private) = memdevs.iter().find(|m| m["share"] != true) {
        return Err(LiveUpdateError::PrivateMemory { id: private["id"].as_str().unwrap_or("(no id)").to_owned() });
    }
    let aux = qmp
        .execute("qom-get", json!({ "path": "/machine", "property": "aux-ram-share" }))
        .map_err(LiveUpdateError::qmp("qom-get /machine aux-ram-share"))?;
    if aux != true {
        return Err(LiveUpdateError::NoAuxRamShare);
    }
    Ok(())
}

/// The new binary builds the machine type the guest runs on. An
/// unversioned alias such as `pc` names each release's newest type, and the
/// new QEMU refuses the state of another ("Machine type received is
/// 'pc-i440fx-10.0' and local is 'pc-i440fx-11.1'"): after a cpr-exec no
/// QEMU would be left to run the guest.
fn same_machine_type(qmp: &mut QmpClient, next: &NextQemu) -> Result<(), LiveUpdateError> {
    const DURING: &str = "qom-get /machine type";
    let reply = qmp
        .execute("qom-get", json!({ "path": "/machine", "property": "type" }))
        .map_err(LiveUpdateError::qmp(DURING))?;
    let running = reply
        .as_str()
        .map(|t| t.strip_suffix("-machine").unwrap_or(t).to_owned())
        .ok_or_else(|| LiveUpdateError::Malformed { during: DURING, reply: reply.to_string() })?;
    // The type is the leading bare word (or `type=`) of the last -machine
    // that has one; QEMU merges repeated -machine options.
    let requested = next
        .args
        .windows(2)
        .rev()
        .filter(|pair| pair[0] == "-machine")
        .find_map(|pair| {
            qemu_opts(&pair[1])
                .into_iter()
                .find(|(key, value)| value.is_empty() || key == "type")
                .map(|(key, value)| if value.is_empty() { key } else { value })
        })
        .unwrap_or_else(|| crate::cmdline::DEFAULT_MACHINE_TYPE.to_owned());
    let next_type = resolve_machine_alias(&next.binary, &requested)?;
    if next_type != running {
        return Err(LiveUpdateError::MachineTypeMismatch { running, next: next_type, requested });
    }
    Ok(())
}

/// What `binary` makes of machine type `name`: its `-machine help` says
/// `pc    Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-11.1)`.
fn resolve_machine_alias(binary: &Path, name: &str) -> Result<String, LiveUpdateError> {
    let out = Command::new(binary).args(["-machine", "help"]).output().map_err(|e| {
        LiveUpdateError::BinaryUnusable { binary: binary.to_owned(), why: format!("running -machine help: {e}") }
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let alias = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .and_then(|line| line.split("(alias of ").nth(1))
        .and_then(|rest| rest.split(')').next());
    Ok(alias.unwrap_or(name).to_owned())
}

/// `args` without `-incoming VALUE` pairs, which differ between the QEMUs
/// of a chain of hops by design.
fn without_incoming(args: &[String]) -> Vec<&str> {
    let mut kept = Vec::with_capacity(args.len());
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "-incoming" {
            words.next();
        } else {
            kept.push(word.as_str());
        }
    }
    kept
}

/// The running QEMU's arguments end with `next` (both without
/// `-incoming`): the same machine, devices and paths. They may start with
/// more, e.g. a loader's options when the binary is a wrapper that execs
/// `ld.so --library-path ... qemu`. A difference is reported at the first
/// argument that differs, with the lines aligned where the running one
/// has the new one's first argument.
fn same_machine(running: &[String], next: &[String]) -> Result<(), LiveUpdateError> {
    let (running, next) = (without_incoming(running), without_incoming(next));
    if running.ends_with(&next) {
        return Ok(());
    }
    let start = next
        .first()
        .and_then(|first| running.iter().position(|arg| arg == first))
        .unwrap_or_else(|| running.len().saturating_sub(next.len()));
    let tail = &running[start..];
    let index = (0..next.len().max(tail.len())).find(|&i| tail.get(i) != next.get(i)).unwrap_or(0);
    Err(LiveUpdateError::CommandLineMismatch {
        index,
        next: next.get(index).map(|s| s.to_string()),
        running: tail.get(index).map(|s| s.to_string()),
    })
}

/// The `memory-backend-file` objects of `args`: id and `mem-path`.
fn file_backends(args: &[String]) -> Vec<(String, String)> {
    args.windows(2)
        .filter(|pair| pair[0] == "-object")
        .filter_map(|pair| {
            let options = qemu_opts(&pair[1]);
            (options.first().map(|(k, _)| k.as_str()) == Some("memory-backend-file")).then_some(())?;
            let map: HashMap<_, _> = options.into_iter().collect();
            Some((map.get("id")?.clone(), map.get("mem-path")?.clone()))
        })
        .collect()
}

/// A QemuOpts string split into `key=value` pairs; a doubled comma is a
/// comma in a value, and a leading bare word (the object type) becomes a
/// key with an empty value.
fn qemu_opts(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut finish = |current: &mut String| {
        let item = std::mem::take(current);
        let (key, value) = item.split_once('=').unwrap_or((&item, ""));
        pairs.push((key.to_owned(), value.to_owned()));
    };
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => finish(&mut current),
            _ => current.push(c),
        }
    }
    finish(&mut current);
    pairs
}

/// Every `mem-path` of `next` names memory the running QEMU has mapped
/// (same device and inode in its `/proc/<pid>/maps`): the new QEMU reopens
/// the path rather than inheriting the mapping, so a path that now leads
/// elsewhere (gmemd restarted, its `/proc/<pid>/fd/<n>` gone) would give it
/// other memory or none.
fn same_ram(running: &ProcessHandle, next: &[String]) -> Result<(), LiveUpdateError> {
    let maps = running.proc_file("maps").map_err(LiveUpdateError::process(running.pid()))?;
    let mapped: Vec<(&str, u64)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(3);
            Some((fields.next()?, fields.next()?.parse().ok()?))
        })
        .collect();
    for (id, path) in file_backends(next) {
        let unreachable = |why: String| LiveUpdateError::RamNotReachable { id: id.clone(), path: path.clone(), why };
        let meta = std::fs::metadata(&path).map_err(|e| unreachable(e.to_string()))?;
        let dev = format!("{:02x}:{:02x}", libc::major(meta.dev()), libc::minor(meta.dev()));
        if !mapped.contains(&(dev.as_str(), meta.ino())) {
            return Err(unreachable(format!(
                "it is inode {} on device {dev}, which QEMU {} has not mapped",
                meta.ino(),
                running.pid()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn command_lines_match_at_the_end_without_incoming() {
        let next = strings(&["-m", "1G", "-qmp", "unix:q"]);
        let wrapped = strings(&[
            "--library-path",
            "/r/lib",
            "/r/qemu",
            "-L",
            "/r/share",
            "-m",
            "1G",
            "-incoming",
            "file:/s",
            "-qmp",
            "unix:q",
        ]);
        assert!(same_machine(&wrapped, &next).is_ok());
        let with_incoming = strings(&["-m", "1G", "-qmp", "unix:q", "-incoming", "defer"]);
        assert!(same_machine(&next, &with_incoming).is_ok());

        // Where a mismatch is reported: index, new argument, running one.
        let mismatch = |running: &[&str]| match same_machine(&strings(running), &next) {
            Err(LiveUpdateError::CommandLineMismatch { index, next, running }) => (index, next, running),
            other => panic!("{other:?}"),
        };
        let text = |s: &str| Some(s.to_string());
        assert_eq!(mismatch(&["-m", "2G", "-qmp", "unix:q"]), (1, text("1G"), text("2G")));
        assert_eq!(mismatch(&["-m", "1G", "-qmp", "unix:q", "-S"]), (4, None, text("-S")));
    }

    #[test]
    fn file_backends_are_found_with_their_paths() {
        let args = strings(&[
            "-object",
            "memory-backend-file,id=ram0,share=on,size=1,mem-path=/proc/7/fd/3",
            "-object",
            "memory-backend-memfd,id=ram1,share=on,size=1",
            "-object",
            "memory-backend-file,mem-path=/a,,b,id=ram2",
        ]);
        assert_eq!(
            file_backends(&args),
            [("ram0".to_string(), "/proc/7/fd/3".to_string()), ("ram2".to_string(), "/a,b".to_string())]
        );
    }
}
