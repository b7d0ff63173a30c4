//! The migration scenarios: which backend, precopy or postcopy, which link;
//! and the migration plan each one runs.

use std::net::Ipv4Addr;
use std::time::Duration;

use clap::ValueEnum;
use gmem_qemu::migration::{MigrationOptions as Plan, SwitchToPostcopy};
use gmem_tests::DelayRelay;
use serde::Serialize;

use super::Settings;

/// The port the destination QEMU listens on, in its own namespace.
pub const PORT: u16 = 4444;

/// What serves the guest's disk on both hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// gmemd, owning the guest RAM (the harness's `MigrationPair`).
    Gmemd,
    /// qemu-storage-daemon, QEMU owning its RAM (`QsdPair`).
    Qsd,
}

/// One migration setup, measured `--runs` times (or, for
/// [`PostcopyQsd`](Scenario::PostcopyQsd), run once and described).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Precopy, gmemd, direct link.
    PrecopyGmemdDirect,
    /// Precopy, gmemd, link with --delay-ms one-way delay.
    PrecopyGmemdDelayed,
    /// Precopy, qemu-storage-daemon, direct link.
    PrecopyQsdDirect,
    /// Precopy, qemu-storage-daemon, delayed link.
    PrecopyQsdDelayed,
    /// Postcopy, gmemd, direct link.
    PostcopyGmemdDirect,
    /// Postcopy, gmemd, delayed link.
    PostcopyGmemdDelayed,
    /// Postcopy with QEMU's postcopy-preempt (requested pages on a
    /// connection of their own), gmemd, direct link.
    PostcopyPreemptGmemdDirect,
    /// Postcopy with postcopy-preempt, gmemd, delayed link (the relay
    /// carries both connections).
    PostcopyPreemptGmemdDelayed,
    /// Postcopy, qemu-storage-daemon, direct link: run once, to record what
    /// happens (its destination cannot take part in postcopy).
    PostcopyQsd,
}

impl Scenario {
    /// Every scenario, in the order a round runs them.
    pub const ALL: [Scenario; 9] = [
        Scenario::PrecopyGmemdDirect,
        Scenario::PrecopyQsdDirect,
        Scenario::PrecopyGmemdDelayed,
        Scenario::PrecopyQsdDelayed,
        Scenario::PostcopyGmemdDirect,
        Scenario::PostcopyPreemptGmemdDirect,
        Scenario::PostcopyGmemdDelayed,
        Scenario::PostcopyPreemptGmemdDelayed,
        Scenario::PostcopyQsd,
    ];

    /// The name on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::PrecopyGmemdDirect => "precopy-gmemd-direct",
            Scenario::PrecopyGmemdDelayed => "precopy-gmemd-delayed",
            Scenario::PrecopyQsdDirect => "precopy-qsd-direct",
            Scenario::PrecopyQsdDelayed => "precopy-qsd-delayed",
            Scenario::PostcopyGmemdDirect => "postcopy-gmemd-direct",
            Scenario::PostcopyGmemdDelayed => "postcopy-gmemd-delayed",
            Scenario::PostcopyPreemptGmemdDirect => "postcopy-preempt-gmemd-direct",
            Scenario::PostcopyPreemptGmemdDelayed => "postcopy-preempt-gmemd-delayed",
            Scenario::PostcopyQsd => "postcopy-qsd",
        }
    }

    /// What serves the disk.
    pub fn backend(self) -> Backend {
        match self {
            Scenario::PrecopyQsdDirect | Scenario::PrecopyQsdDelayed | Scenario::PostcopyQsd => Backend::Qsd,
            _ => Backend::Gmemd,
        }
    }

    /// Whether it switches to postcopy.
    pub fn postcopy(self) -> bool {
        matches!(
            self,
            Scenario::PostcopyGmemdDirect
                | Scenario::PostcopyGmemdDelayed
                | Scenario::PostcopyPreemptGmemdDirect
                | Scenario::PostcopyPreemptGmemdDelayed
                | Scenario::PostcopyQsd
        )
    }

    /// Whether postcopy runs with postcopy-preempt.
    pub fn preempt(self) -> bool {
        matches!(self, Scenario::PostcopyPreemptGmemdDirect | Scenario::PostcopyPreemptGmemdDelayed)
    }

    /// Whether the stream goes through the delaying relay.
    pub fn delayed(self) -> bool {
        matches!(
            self,
            Scenario::PrecopyGmemdDelayed
                | Scenario::PrecopyQsdDelayed
                | Scenario::PostcopyGmemdDelayed
                | Scenario::PostcopyPreemptGmemdDelayed
        )
    }

    /// Whether it yields figures (measured `--runs` times); the one that
    /// does not is run once and described.
    pub fn measured(self) -> bool {
        self != Scenario::PostcopyQsd
    }

    /// The migration to run: to `dst_addr`, or through `relay`. Precopy
    /// keeps QEMU's defaults (max-bandwidth 128 MiB/s, downtime-limit
    /// 300 ms). Postcopy caps precopy at --postcopy-precopy-mib-s, switches
    /// after --switch-after-ms and leaves max-postcopy-bandwidth at QEMU's
    /// default, unlimited, unless --postcopy-mib-s; the preempt scenarios turn postcopy-preempt on
    /// as `gmemctl migrate --postcopy-preempt on` does (QEMU accepts it; it
    /// never completes the migration once gmemd's device faulted).
    pub fn plan(self, settings: &Settings, dst_addr: Ipv4Addr, relay: Option<&DelayRelay>) -> Plan {
        let mut plan = Plan::new(format!("tcp:{dst_addr}:{PORT}"));
        if let Some(relay) = relay {
            plan.connect_uri = format!("tcp:{}", relay.addr());
        }
        plan.timeout = Duration::from_secs(settings.timeout_secs);
        if self.postcopy() {
            plan.max_bandwidth = Some(settings.postcopy_precopy_mib_s << 20);
            plan.postcopy = Some(SwitchToPostcopy::After(Duration::from_millis(settings.switch_after_ms)));
            plan.postcopy_preempt = self.preempt();
            plan.max_postcopy_bandwidth = settings.postcopy_mib_s.map(|mib| mib << 20);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_command_line_values() {
        for scenario in Scenario::ALL {
            assert_eq!(Scenario::from_str(scenario.name(), false), Ok(scenario), "{scenario:?}");
            assert_eq!(serde_json::to_value(scenario).ok(), Some(serde_json::Value::from(scenario.name())));
        }
    }

    #[test]
    fn only_qsd_postcopy_is_unmeasured() {
        let unmeasured: Vec<Scenario> = Scenario::ALL.into_iter().filter(|s| !s.measured()).collect();
        assert_eq!(unmeasured, [Scenario::PostcopyQsd]);
        assert!(Scenario::PostcopyQsd.postcopy() && !Scenario::PostcopyQsd.delayed());
        assert_eq!(Scenario::PrecopyQsdDelayed.backend(), Backend::Qsd);
        assert_eq!(Scenario::PostcopyGmemdDelayed.backend(), Backend::Gmemd);
        assert!(Scenario::PostcopyPreemptGmemdDelayed.preempt() && Scenario::PostcopyPreemptGmemdDelayed.delayed());
        assert!(Scenario::ALL.iter().filter(|s| s.preempt()).all(|s| s.postcopy() && s.backend() == Backend::Gmemd));
    }
}
