//! Starting the two vhost-user backends on an image, with the same pieces
//! the guest benchmarks use: the test harness's `Gmemd::start` and
//! `qsd::start_qsd`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gmem_qemu::quote::shell_join;
use gmem_tests::{Gmemd, GmemdOptions};

use super::plan::Backend;
use crate::backends;
use crate::qsd::{self, Guard, QsdConfig, ScratchDir};

/// How to start each backend, the same for every run.
#[derive(Debug, Clone)]
pub struct DaemonSetup {
    /// The gmemd binary.
    pub gmemd: PathBuf,
    /// Passed to gmemd after the harness's and the benchmark's arguments.
    pub gmemd_args: Vec<String>,
    /// gmemd's `--memory`.
    pub gmemd_memory: String,
    /// The qemu-storage-daemon binary.
    pub qsd: PathBuf,
}

/// A running backend; stopped (killed and reaped) on drop.
#[derive(Debug)]
pub struct Daemon {
    pub pid: u32,
    pub socket: PathBuf,
    /// The exact command line, for the record.
    pub command: String,
    process: Process,
}

#[derive(Debug)]
enum Process {
    Gmemd(Box<Gmemd>),
    Qsd {
        // Declared first: the daemon stops before its scratch directory
        // (socket, log) is removed.
        _daemon: Guard,
        dir: ScratchDir,
    },
}

impl Daemon {
    /// gmemd's own view of the run (`query-device`: requests, bytes and
    /// errors per queue); `None` for qsd.
    pub fn device_counters(&self) -> Option<serde_json::Value> {
        match &self.process {
            Process::Gmemd(gmemd) => {
                gmemd.client().ok()?.query_device().ok().and_then(|d| serde_json::to_value(d).ok())
            }
            Process::Qsd { .. } => None,
        }
    }

    /// What the backend logged, for error messages.
    pub fn log(&self) -> String {
        match &self.process {
            Process::Gmemd(gmemd) => gmemd.log(),
            Process::Qsd { dir, .. } => qsd::read(&dir.join("qsd.log")),
        }
    }
}

/// The qsd configuration each qsd backend stands for: io_uring, an
/// iothread of its own, as many queues as the client uses; page cache on
/// or off.
pub fn qsd_config(backend: Backend, queues: u16) -> QsdConfig {
    QsdConfig {
        aio: Some("io_uring"),
        direct: backend == Backend::QsdDirect,
        queues,
        iothread: true,
        ..QsdConfig::default()
    }
}

/// Starts `backend` serving `image` with `queues` queues.
pub fn start(backend: Backend, setup: &DaemonSetup, image: &Path, queues: u16) -> Result<Daemon> {
    match backend {
        Backend::Gmemd => {
            // libblkio's request memory is its own memfd, not RAM gmemd
            // owns: gmemd must accept foreign memory to serve it at all.
            let mut extra = vec!["--allow-foreign-memory".to_string()];
            extra.extend(setup.gmemd_args.iter().cloned());
            let options = GmemdOptions {
                // The guest-RAM region gmemd creates is not used here.
                memory: setup.gmemd_memory.clone(),
                queues,
                disk: Some(image.to_path_buf()),
                extra,
                binary: Some(setup.gmemd.clone()),
                ..GmemdOptions::default()
            };
            let gmemd = Gmemd::start(&options).context("starting gmemd")?;
            let command = backends::gmemd_command(&setup.gmemd, &gmemd, &options);
            Ok(Daemon {
                pid: gmemd.pid(),
                socket: gmemd.socket.clone(),
                command,
                process: Process::Gmemd(Box::new(gmemd)),
            })
        }
        Backend::QsdBuffered | Backend::QsdDirect => {
            let dir = ScratchDir::new("gmem-bench-host-qsd")?;
            let (socket, log) = (dir.join("vhost.sock"), dir.join("qsd.log"));
            let args = qsd::qsd_args_with(image, &socket, &qsd_config(backend, queues));
            let guard = qsd::start_qsd(&setup.qsd, None, &args, &socket, &log)?;
            let command = shell_join(std::iter::once(setup.qsd.display().to_string()).chain(args));
            Ok(Daemon { pid: guard.id(), socket, command, process: Process::Qsd { _daemon: guard, dir } })
        }
        Backend::Raw => anyhow::bail!("the raw ceiling has no daemon"),
    }
}
