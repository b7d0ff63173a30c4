//! [`Testbed`]: what a migration run needs from a setup of two hosts, so
//! that gmemd (the harness's [`MigrationPair`]) and qemu-storage-daemon
//! ([`QsdPair`](super::qsd_pair::QsdPair)) are driven by the same code.

use std::path::PathBuf;

use anyhow::Result;
use gmem_protocol::ControlClient;
use gmem_qemu::QmpClient;
use gmem_tests::{HostPair, MigrationPair};

/// Two hosts with a guest running on the source, whose agent prints
/// progress lines, and a destination QEMU waiting with `-incoming defer`.
pub trait Testbed {
    /// The two network namespaces.
    fn hosts(&self) -> &HostPair;

    /// The guest console files: the source's, then the destination's.
    fn consoles(&self) -> Vec<PathBuf>;

    /// New QMP connections to the source and the destination QEMU.
    fn qmp(&mut self) -> Result<(QmpClient, QmpClient)>;

    /// Control connections to the source and destination gmemd, when gmemd
    /// serves the disk.
    fn gmemd(&self) -> Result<Option<(ControlClient, ControlClient)>>;

    /// Consoles and logs, for an error message.
    fn diagnostics(&self) -> String;

    /// What the source and the destination QEMU wrote on stderr so far.
    fn qemu_logs(&self) -> (String, String);

    /// The source's and the destination QEMU's pids.
    fn qemu_pids(&self) -> (u32, u32);
}

impl Testbed for MigrationPair {
    fn hosts(&self) -> &HostPair {
        &self.hosts
    }

    fn consoles(&self) -> Vec<PathBuf> {
        vec![self.source_vm.serial_path().to_owned(), self.dest_vm.serial_path().to_owned()]
    }

    fn qmp(&mut self) -> Result<(QmpClient, QmpClient)> {
        Ok((self.source_vm.qmp()?, self.dest_vm.qmp()?))
    }

    fn gmemd(&self) -> Result<Option<(ControlClient, ControlClient)>> {
        Ok(Some((self.source.client()?, self.dest.client()?)))
    }

    fn diagnostics(&self) -> String {
        format!(
            "consoles:\n{}\nsource QEMU:\n{}\ndestination QEMU:\n{}\nsource gmemd:\n{}\ndestination gmemd:\n{}",
            self.serial_text(),
            self.source_vm.qemu_log(),
            self.dest_vm.qemu_log(),
            self.source.log(),
            self.dest.log()
        )
    }

    fn qemu_logs(&self) -> (String, String) {
        (self.source_vm.qemu_log(), self.dest_vm.qemu_log())
    }

    fn qemu_pids(&self) -> (u32, u32) {
        (self.source_vm.pid(), self.dest_vm.pid())
    }
}
