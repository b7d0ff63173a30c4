//! [`Settings`]: the workload and the migration parameters, the same for
//! every scenario of a `gmem-bench migration` run.

use anyhow::{ensure, Result};
use clap::Args as ClapArgs;
use gmem_tests::seqio::BLOCK_BYTES;
use serde::Serialize;

/// The workload and the migration parameters, the same for every scenario.
#[derive(Debug, Clone, ClapArgs, Serialize)]
pub struct Settings {
    /// One-way delay of the delayed link, ms.
    #[arg(long, value_name = "MS", default_value_t = 5)]
    pub delay_ms: u64,

    /// Also cap the source-to-destination link at RATE (tc units, e.g. 1gbit;
    /// a tbf qdisc on the source's veth) in every scenario [default: no cap]
    #[arg(long, value_name = "RATE")]
    pub link_rate: Option<String>,

    /// Blocks the guest writes (agent.blocks; 4 KiB each, and as many RAM
    /// slots). The workload must outlast the migration.
    #[arg(long, default_value_t = 262144, value_parser = clap::value_parser!(u64).range(1..))]
    pub blocks: u64,

    /// Slot stride (agent.stride): block i lands in RAM slot i*stride mod
    /// blocks, so in postcopy the device keeps meeting pages not yet sent.
    /// Coprime to --blocks.
    #[arg(long, default_value_t = 4099, value_parser = clap::value_parser!(u64).range(1..))]
    pub stride: u64,

    /// Blocks between two progress lines of the guest
    /// (agent.progress_every); sets the resolution of the stall.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_every: u64,

    /// Blocks the guest writes before the migration starts.
    #[arg(long, default_value_t = 1024)]
    pub start_at: u64,

    /// Postcopy: the precopy bandwidth cap before the switch, MiB/s.
    #[arg(long, value_name = "MIB_S", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub postcopy_precopy_mib_s: u64,

    /// Postcopy: cap the pages streamed in the background after the switch
    /// (max-postcopy-bandwidth), MiB/s [default: QEMU's, unlimited]
    #[arg(long, value_name = "MIB_S", value_parser = clap::value_parser!(u64).range(1..))]
    pub postcopy_mib_s: Option<u64>,

    /// Postcopy: send migrate-start-postcopy this long after migrate, ms.
    #[arg(long, value_name = "MS", default_value_t = 1500)]
    pub switch_after_ms: u64,

    /// Guest RAM in MiB, at least twice the slots (--blocks * 4 KiB).
    #[arg(long, value_name = "MIB", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(64..))]
    pub memory_mib: u64,

    /// Also follow every postcopy page request through both QEMUs' trace
    /// events (gmemd scenarios): how long it took to reach the source, to
    /// leave it, and to be placed. Tracing costs QEMU time on every
    /// request, so such runs are for finding where the time goes, not for
    /// the headline figures.
    #[arg(long)]
    pub trace_faults: bool,

    /// Set TCP_NODELAY on both QEMUs' migration connections once they are
    /// up (taken from the running QEMUs with pidfd_getfd): an experiment
    /// to see what Nagle's algorithm costs page requests, since QEMU sets
    /// it on multifd connections only.
    #[arg(long)]
    pub qemu_nodelay: bool,

    /// Limit for one migration, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout_secs: u64,
}

impl Settings {
    /// The guest RAM the agent's slots take, and the disk its blocks take.
    pub fn slot_bytes(&self) -> u64 {
        self.blocks * BLOCK_BYTES as u64
    }

    /// The image: room for every block, in whole MiB.
    pub fn disk_bytes(&self) -> u64 {
        self.slot_bytes().next_multiple_of(1 << 20)
    }

    /// The seqio agent's parameters.
    pub fn agent_params(&self, seed: u64) -> [(&'static str, String); 4] {
        [
            ("blocks", self.blocks.to_string()),
            ("seed", seed.to_string()),
            ("stride", self.stride.to_string()),
            ("progress_every", self.progress_every.to_string()),
        ]
    }

    pub fn check(&self) -> Result<()> {
        ensure!(
            gcd(self.stride, self.blocks) == 1,
            "--stride {} must be coprime to --blocks {}",
            self.stride,
            self.blocks
        );
        ensure!(self.start_at < self.blocks, "--start-at must be below --blocks");
        ensure!(
            self.slot_bytes() <= (self.memory_mib << 20) / 2,
            "--blocks {} need {} MiB of slots: more than half of --memory-mib",
            self.blocks,
            self.slot_bytes() >> 20
        );
        Ok(())
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn settings(args: &[&str]) -> Settings {
        let argv = std::iter::once("test").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|cli| cli.settings).expect("valid arguments")
    }

    #[test]
    fn defaults_are_consistent() -> Result<()> {
        let s = settings(&[]);
        s.check()?;
        assert_eq!(s.disk_bytes(), 1 << 30);
        assert_eq!(s.agent_params(7)[1], ("seed", "7".to_string()));
        Ok(())
    }

    #[test]
    fn bad_combinations_are_refused() {
        assert!(settings(&["--stride", "4096"]).check().is_err());
        assert!(settings(&["--blocks", "1000", "--start-at", "1000"]).check().is_err());
        assert!(settings(&["--memory-mib", "1024"]).check().is_err());
        assert!(settings(&["--memory-mib", "1024", "--blocks", "131071"]).check().is_ok());
    }
}
