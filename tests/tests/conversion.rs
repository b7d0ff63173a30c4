//! Private/shared conversion of a real guest's RAM under its own I/O.
//!
//! Part of the guest's RAM, kept from its kernel by `memmap=`, goes private
//! and back over and over while the guest runs `seqio`: the guest and every
//! byte of its I/O must come through untouched, and each conversion must
//! discard the range's content. Then the page the guest reads into goes
//! private under it: those reads fail with EIO in the guest, nothing is
//! written into the page meanwhile, and reads work again once it is shared.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use gmem_protocol::{ClientError, Command, ControlClient, SetMemoryAttributesArgs};
use gmem_tests::seqio::{self, SeqioReport, PROGRESS_KEY};
use gmem_tests::{Gmemd, GmemdOptions, Vm, VmOptions};

const BOOT_AND_RUN: Duration = Duration::from_secs(240);

/// The guest-physical range `memmap=` reserves: with guest RAM under 3.5
/// GiB, guest-physical addresses are offsets in gmemd's first region.
const RESERVED_AT: u64 = 0x1000_0000;
const RESERVED_BYTES: u64 = 16 << 20;

fn set_attributes(
    control: &mut ControlClient,
    region: &str,
    offset: u64,
    size: u64,
    private: bool,
    wait_ms: Option<u64>,
) -> Result<(), ClientError> {
    let args = SetMemoryAttributesArgs { region: region.to_owned(), offset, size, private, wait_ms };
    control.execute::<serde_json::Value>(&Command::SetMemoryAttributes(args)).map(drop)
}

/// gmemd's first region, opened through its `/proc/<pid>/fd/<n>` path.
fn main_ram(control: &mut ControlClient) -> Result<(String, std::fs::File)> {
    let region = control.query_regions()?.into_iter().next().context("gmemd has no region")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&region.fd_path)
        .with_context(|| format!("opening {}", region.fd_path))?;
    Ok((region.id, file))
}

#[test]
fn reserved_guest_ram_converted_back_and_forth_leaves_the_guest_and_its_io_undisturbed() -> Result<()> {
    const BLOCKS: u64 = 16384;
    const CHUNK: u64 = 1 << 20;
    let seed = rand::random::<u64>();
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    let mut options = VmOptions::new("reserved", "seqio")
        .param("blocks", BLOCKS)
        .param("seed", seed)
        .param("pace_us", 100)
        .param("progress_every", 64);
    options.kernel_args.push(format!("memmap={}M${RESERVED_AT:#x}", RESERVED_BYTES >> 20));
    let mut vm = Vm::start(&gmemd, &options)?;
    vm.wait_for_progress(PROGRESS_KEY, 512, BOOT_AND_RUN)?;

    let mut control = gmemd.client()?;
    let (region, ram) = main_ram(&mut control)?;
    let canary = vec![0xc3u8; CHUNK as usize];
    let mut back = vec![0u8; CHUNK as usize];
    let mut rounds = 0u64;
    // Converts while the guest writes, until it is near its end.
    while rounds < 2000
        && gmem_tests::AgentResults::parse(&vm.serial_text()).progress(PROGRESS_KEY).unwrap_or(0) < BLOCKS - 2048
    {
        let at = RESERVED_AT + (rounds * 7 % (RESERVED_BYTES / CHUNK)) * CHUNK;
        set_attributes(&mut control, &region, at, CHUNK, true, None)
            .with_context(|| format!("to private at {at:#x}: the guest does not use that RAM, nothing may hold it"))?;
        // What the guest would keep there while it is private.
        ram.write_all_at(&canary, at)?;
        set_attributes(&mut control, &region, at, CHUNK, false, None)?;
        ram.read_exact_at(&mut back, at)?;
        if let Some(at_byte) = back.iter().position(|b| *b != 0) {
            bail!(
                "{:#x} reads {:#x} after going shared again: the content was not discarded",
                at + at_byte as u64,
                back[at_byte]
            );
        }
        rounds += 1;
    }
    let conversions = 2 * rounds;
    ensure!(conversions >= 20, "only {conversions} conversions before the guest finished");
    let results = vm.wait_exit(BOOT_AND_RUN)?;
    let report = SeqioReport::from_results(&results)?;
    ensure!(report.is_clean() && report.blocks == BLOCKS, "{report:?}\n{}", gmemd.log());
    ensure!(seqio::verify_disk(&gmemd.disk, BLOCKS, seed)? == report.sum, "the image lost a write");
    eprintln!("{conversions} conversions of the reserved range while the guest wrote {BLOCKS} blocks");
    Ok(())
}

#[test]
fn a_guest_buffer_turned_private_fails_its_reads_with_eio_and_nothing_is_corrupted() -> Result<()> {
    let seed = rand::random::<u64>() | 1;
    let gmemd = Gmemd::start(&GmemdOptions::default())?;
    let options = VmOptions::new("buffer", "convert").param("seed", seed).param("pace_us", 500);
    let mut vm = Vm::start(&gmemd, &options)?;
    let frame = vm.wait_for_progress("convert_pfn", 1, BOOT_AND_RUN)?.progress("convert_pfn").context("no frame")?;
    vm.wait_for_progress("convert_ok", 64, BOOT_AND_RUN)?;

    let mut control = gmemd.client()?;
    let (region, ram) = main_ram(&mut control)?;
    let page = frame * 4096;
    // Reads are in flight all the time: hold new ones off and let those
    // finish instead of failing with EAGAIN.
    set_attributes(&mut control, &region, page, 4096, true, Some(2000)).context("to private")?;
    let private_since = std::time::Instant::now();
    vm.wait_for_progress("convert_eio", 3, Duration::from_secs(60))
        .context("the guest's reads into its private page did not fail")?;
    // No device write landed in the page while it was private: the
    // conversion discarded it, and only the guest's own fill (0xA5 before
    // each read) may be there.
    let mut now = vec![0u8; 4096];
    ram.read_exact_at(&mut now, page)?;
    ensure!(
        now.iter().all(|b| *b == 0 || *b == 0xa5),
        "the page holds data no one but the device could have put there: {:02x?}",
        &now[..16]
    );
    set_attributes(&mut control, &region, page, 4096, false, None).context("back to shared")?;
    let private_for = private_since.elapsed();

    let results = vm.wait_exit(BOOT_AND_RUN)?;
    let number = |key: &str| -> Result<u64> { Ok(results.get(key).context(key.to_owned())?.parse()?) };
    let (ok, eio, bad) = (number("convert_ok")?, number("convert_eio")?, number("convert_bad")?);
    // A read that completed just before the conversion to private finds
    // its page emptied by it before the guest looks: the contract (the
    // content goes with the conversion), not a loss. The agent reads one
    // block at a time, so that is one read at most.
    let zeroed = number("convert_zeroed")?;
    ensure!(bad == 0 && zeroed <= 1 && eio >= 3 && ok >= 256, "ok {ok}, eio {eio}, zeroed {zeroed}, bad {bad}");
    let mut block = vec![0u8; 4096];
    std::fs::File::open(&gmemd.disk)?.read_exact_at(&mut block, 0)?;
    ensure!(block == seqio::block(seed, 0), "block 0 on the host is not what the guest wrote");
    let device = gmemd.client()?.query_device()?;
    ensure!(device.errors >= eio, "the device counted {} errors for the guest's {eio} EIOs", device.errors);
    ensure!(!device.queues.iter().any(|q| q.broken), "a queue broke: {:?}", device.queues);
    eprintln!("{eio} reads failed with EIO in {private_for:?} private, then {ok} good reads ({zeroed} found its page emptied)");
    Ok(())
}
