//! The seqio agent: gmem-io.c and its Rust mirror (`gmem_tests::seqio`)
//! agree, on the host against an image file, and in a real guest on gmemd.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use gmem_tests::guest::repo_root;
use gmem_tests::seqio::{self, SeqioReport, BLOCK_BYTES};
use gmem_tests::{AgentResults, Gmemd, GmemdOptions, Vm, VmOptions};

/// gmem-io built for the host (the guest's copy is static and inside the
/// initramfs), once per test process.
fn host_gmem_io() -> Result<&'static Path> {
    static BINARY: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gmem-io");
            let source = repo_root().join("scripts/guest/gmem-io.c");
            let out = Command::new("gcc")
                .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
                .arg(&binary)
                .arg(&source)
                .output()
                .map_err(|e| format!("running gcc: {e}"))?;
            if !out.status.success() {
                return Err(format!("gcc {} failed: {}", source.display(), String::from_utf8_lossy(&out.stderr)));
            }
            Ok(binary)
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(anyhow::Error::msg)
}

/// Runs `gmem-io seqio` on a fresh image file of `blocks` blocks (not on
/// tmpfs, which refuses O_DIRECT) and returns the image and the report.
fn run_on_host(dir: &Path, blocks: u64, seed: u64) -> Result<(PathBuf, SeqioReport)> {
    let image = dir.join(format!("seqio-{seed}.raw"));
    std::fs::File::create(&image)?.set_len(blocks * BLOCK_BYTES as u64)?;
    let out =
        Command::new(host_gmem_io()?).arg("seqio").arg(&image).args([blocks.to_string(), seed.to_string()]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "gmem-io seqio failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let results = AgentResults::parse(&stdout);
    ensure!(results.progress(seqio::PROGRESS_KEY).unwrap_or(0) == blocks / 256 * 256, "{stdout}");
    Ok((image, SeqioReport::from_results(&results)?))
}

#[test]
fn the_c_agent_and_the_rust_mirror_agree() -> Result<()> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    // 300 blocks: progress once, and a short last 1 MiB read. Seed 0 takes
    // the zero-state substitute for block 0.
    for seed in [0, 1, rand::random::<u64>()] {
        let (image, report) = run_on_host(dir.path(), 300, seed)?;
        ensure!(report.is_clean() && report.blocks == 300, "seed {seed}: {report:?}");
        let on_disk = seqio::verify_disk(&image, 300, seed).with_context(|| format!("seed {seed}"))?;
        ensure!(on_disk == report.sum, "seed {seed}: C sum {:016x}, Rust {on_disk:016x}", report.sum);
        ensure!(seqio::expected_sum(300, seed) == report.sum, "seed {seed}");
    }
    Ok(())
}

#[test]
fn verify_disk_finds_a_changed_block() -> Result<()> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let (image, _) = run_on_host(dir.path(), 64, 7)?;
    ensure!(seqio::verify_disk(&image, 64, 8).is_err(), "another seed's pattern passed");
    let mut file = std::fs::OpenOptions::new().write(true).open(&image)?;
    file.seek(SeekFrom::Start(40 * BLOCK_BYTES as u64 + 100))?;
    file.write_all(&[0])?;
    match seqio::verify_disk(&image, 64, 7) {
        Ok(_) => bail!("a changed byte in block 40 went unnoticed"),
        Err(e) => {
            ensure!(e.to_string().contains("1 of 64 blocks") && e.to_string().ends_with("the first is 40"), "{e}")
        }
    }
    Ok(())
}

#[test]
fn seqio_runs_in_a_guest_on_gmemd() -> Result<()> {
    const BLOCKS: u64 = 512;
    let seed = rand::random::<u64>();
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    let options = VmOptions::new("seqio", "seqio").param("blocks", BLOCKS).param("seed", seed);
    let mut vm = Vm::start(&gmemd, &options)?;
    let results = vm.wait_exit(Duration::from_secs(180))?;
    let report = SeqioReport::from_results(&results)?;
    ensure!(report.is_clean() && report.blocks == BLOCKS, "{report:?}");
    ensure!(results.progress(seqio::PROGRESS_KEY) == Some(BLOCKS), "{}", vm.serial_text());
    ensure!(seqio::verify_disk(&gmemd.disk, BLOCKS, seed)? == report.sum);
    let device = gmemd.client()?.query_device()?;
    ensure!(device.queues[0].bytes_to_guest >= 2 * BLOCKS * BLOCK_BYTES as u64, "{device:?}");
    Ok(())
}
