//! `Vm`: a real QEMU booting the test guest on a gmemd.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gmem_qemu::{QemuCommand, QemuProcess, SerialSink};

use crate::daemon::Gmemd;
use crate::guest::{agent_append, AgentResults, GuestImage};

/// A booted guest; QEMU is killed on drop.
#[derive(Debug)]
pub struct Vm {
    qemu: QemuProcess,
    serial: PathBuf,
}

impl Vm {
    /// Boots the guest on `gmemd` with `cpus` vCPUs and runs `agent`.
    pub fn boot(gmemd: &Gmemd, name: &str, cpus: u32, agent: &str, params: &[(&str, &str)]) -> Result<Vm> {
        let image = GuestImage::ensure()?;
        let serial = gmemd.dir.path().join(format!("{name}.serial"));
        let mut client = gmemd.client()?;
        let command = QemuCommand::for_daemon(&mut client)?
            .kernel(&image.kernel)
            .initrd(&image.initrd)
            .append(agent_append(agent, params))
            .cpus(std::num::NonZeroU32::new(cpus).context("cpus must be at least 1")?)
            .serial(SerialSink::File(serial.clone()));
        let qemu = QemuProcess::spawn(&command).context("starting QEMU")?;
        Ok(Vm { qemu, serial })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// What the guest printed so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the guest printed a result with `key`, QEMU exits, or
    /// `timeout` passes.
    pub fn wait_for(&mut self, key: &str, timeout: Duration) -> Result<AgentResults> {
        let deadline = Instant::now() + timeout;
        loop {
            let results = AgentResults::parse(&self.serial_text());
            if results.get(key).is_some() {
                return Ok(results);
            }
            if let Some(status) = self.qemu.try_wait()? {
                bail!("QEMU exited ({status}) before the guest reported '{key}'; serial:\n{}", self.serial_text());
            }
            if Instant::now() > deadline {
                bail!("no '{key}' from the guest within {timeout:?}; serial:\n{}", self.serial_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the agent to finish and the guest to power off.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<AgentResults> {
        match self.qemu.wait_timeout(timeout)? {
            Some(_) => {
                let results = AgentResults::parse(&self.serial_text());
                match results.exit_code() {
                    Some(0) => Ok(results),
                    code => bail!("the guest agent failed (exit {code:?}); serial:\n{}", self.serial_text()),
                }
            }
            None => bail!("the guest did not power off within {timeout:?}; serial:\n{}", self.serial_text()),
        }
    }

    /// SIGKILLs QEMU, as a crash would end it.
    pub fn kill(&mut self) -> Result<()> {
        self.qemu.kill()?;
        Ok(())
    }
}
