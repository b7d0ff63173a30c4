//! [`MigrationPair`]: what a live-migration test has running before it
//! migrates. Two hosts ([`HostPair`]); on the source a gmemd and a QEMU
//! running the guest's agent; on the destination a gmemd with the same memory
//! and the same disk image (shared storage) and a QEMU waiting with
//! `-incoming defer`. Driving the migration over QMP is the test's business
//! ([`Vm::qmp`] on each side).

use anyhow::{Context, Result};

use crate::daemon::{Gmemd, GmemdOptions};
use crate::net::HostPair;
use crate::vm::{Vm, VmOptions};

/// How to build a [`MigrationPair`].
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Both daemons. The pair sets `netns` for each side, and `disk` of the
    /// destination to the source's image.
    pub gmemd: GmemdOptions,
    /// The guest. The pair sets `netns` for each side and `incoming` for the
    /// destination, and suffixes `name` with `-src` / `-dst`.
    pub vm: VmOptions,
}

/// Source and destination, ready to migrate; dropping it stops both QEMUs,
/// then both daemons, then deletes the namespaces.
#[derive(Debug)]
pub struct MigrationPair {
    /// The running guest, in the source namespace.
    pub source_vm: Vm,
    /// QEMU waiting for the incoming migration, in the destination namespace.
    pub dest_vm: Vm,
    /// The destination's gmemd, serving [`source`](Self::source)'s disk image.
    pub dest: Gmemd,
    /// The source's gmemd; owns the disk image.
    pub source: Gmemd,
    /// The two namespaces.
    pub hosts: HostPair,
}

impl MigrationPair {
    /// Creates the hosts, starts both daemons, boots the source guest and
    /// starts the destination QEMU.
    pub fn start(options: &MigrationOptions) -> Result<MigrationPair> {
        let hosts = HostPair::create()?;
        let source = Gmemd::start(&GmemdOptions { netns: Some(hosts.src_ns().to_owned()), ..options.gmemd.clone() })
            .context("starting the source gmemd")?;
        let dest = Gmemd::start(&GmemdOptions {
            netns: Some(hosts.dst_ns().to_owned()),
            disk: Some(source.disk.clone()),
            ..options.gmemd.clone()
        })
        .context("starting the destination gmemd")?;
        let source_vm = Vm::start(
            &source,
            &VmOptions {
                name: format!("{}-src", options.vm.name),
                netns: Some(hosts.src_ns().to_owned()),
                incoming: false,
                ..options.vm.clone()
            },
        )
        .context("starting the source QEMU")?;
        let dest_vm = Vm::start(
            &dest,
            &VmOptions {
                name: format!("{}-dst", options.vm.name),
                netns: Some(hosts.dst_ns().to_owned()),
                incoming: true,
                ..options.vm.clone()
            },
        )
        .context("starting the destination QEMU")?;
        Ok(MigrationPair { source_vm, dest_vm, dest, source, hosts })
    }

    /// Both guest consoles, source first, on separate lines: the agent's
    /// output before and after the switch-over, for parsing with
    /// [`AgentResults::parse`](crate::guest::AgentResults::parse) or for an
    /// error message.
    pub fn serial_text(&self) -> String {
        format!("{}\n{}", self.source_vm.serial_text(), self.dest_vm.serial_text())
    }
}
