//! The migration messages of a [`FrontendConnection`]: dirty logging on the
//! source, the postcopy session on the destination (docs/migration.md).

use std::fs::File;
use std::sync::Arc;

use gmem_protocol::MigrationState;

use super::{nack, FrontendConnection, Refusal};
use crate::migration::{HostRange, PostcopyPhase, PostcopySession};
use crate::vhost::vring::Vring;

impl FrontendConnection {
    /// VHOST_F_LOG_ALL acked or not (SET_FEATURES). QEMU waits for the
    /// reply before it relies on the log: from here on every device write
    /// is marked.
    pub(super) fn set_logging(&mut self, logging: bool) {
        if logging == self.tracking.log.enabled() {
            return;
        }
        self.tracking.log.set_enabled(logging);
        let migration = &self.daemon.migration;
        match (logging, migration.state()) {
            (true, MigrationState::None | MigrationState::PostcopyEnded | MigrationState::PostcopyAborted) => {
                migration.set_state(MigrationState::DirtyLogging)
            }
            (false, MigrationState::DirtyLogging) => migration.set_state(MigrationState::None),
            _ => {}
        }
        log::info!("frontend {}: dirty logging {}", self.id(), if logging { "on" } else { "off" });
    }

    /// SET_LOG_BASE. QEMU waits for the reply, which only success sends: a
    /// failure ends the connection, so QEMU's migration fails instead of hanging.
    pub fn set_log_base(&mut self, size: u64, offset: u64, file: File) -> Result<(), Refusal> {
        self.tracking.log.set_base(file, size, offset).map_err(|e| Refusal::Close(e.to_string()))
    }

    /// Whether memory-table messages are in postcopy mode.
    pub fn postcopy_listening(&self) -> bool {
        self.postcopy.as_ref().is_some_and(PostcopySession::listening)
    }

    /// gmemd's own address of the view at `gpa`, which QEMU needs in
    /// postcopy to translate our faults (the table was just updated).
    pub(super) fn backend_base(&self, gpa: u64) -> Result<u64, Refusal> {
        let view = self.table.views().iter().find(|v| v.desc().gpa == gpa);
        view.map(|v| v.host_addr()).ok_or_else(|| Refusal::Close(format!("no range at GPA {gpa:#x} after adding it")))
    }

    /// Refuses to start vring `index` while guest RAM may not be touched.
    pub(super) fn device_may_start(&mut self, index: u8) -> Result<(), Refusal> {
        if self.postcopy.as_ref().is_some_and(|s| s.phase() == PostcopyPhase::Advised) {
            // The guest runs, but QEMU never sent LISTEN: the migration
            // completed in precopy (QEMU sends no POSTCOPY_END then), so all
            // of RAM is here and the userfaultfd has no use.
            log::info!("frontend {}: postcopy was advised but the migration completed in precopy", self.id());
            self.postcopy = None;
            self.daemon.release_postcopy(self.id());
            self.daemon.migration.set_state(MigrationState::None);
        }
        match self.postcopy.as_ref().filter(|s| !s.device_may_run()) {
            Some(session) => {
                let message = format!(
                    "vring {index}: not started while postcopy is {:?}: guest RAM is not registered yet, and \
                     touching it now would break QEMU's page placement",
                    session.phase()
                );
                log::error!("frontend {}: {message}", self.id());
                Err(nack(message))
            }
            None => Ok(()),
        }
    }

    /// POSTCOPY_ADVISE. A refusal is answered with a reply that carries no
    /// fd, which fails QEMU's incoming migration. (A gmemd that cannot
    /// create a userfaultfd does not offer PAGEFAULT, so QEMU refuses
    /// postcopy before it gets this far.)
    pub fn advise_postcopy(&mut self) -> Result<File, Refusal> {
        let refuse = |message: String| {
            log::error!("frontend {}: POSTCOPY_ADVISE refused: {message}", self.id());
            Err(nack(message))
        };
        if self.postcopy.is_some() {
            return Err(Refusal::Close("POSTCOPY_ADVISE repeated".into()));
        }
        if self.vrings.iter().any(Vring::started) {
            return refuse(
                "vrings are running; postcopy needs the device stopped until guest RAM is registered".into(),
            );
        }
        if let Err(why) = self.daemon.claim_postcopy(self.id()) {
            return refuse(why);
        }
        match PostcopySession::advise(Arc::clone(&self.daemon.migration), self.daemon.regions.hugetlb()) {
            Ok((session, for_qemu)) => {
                log::info!("frontend {}: postcopy advised; QEMU holds the userfaultfd", self.id());
                self.postcopy = Some(session);
                Ok(for_qemu)
            }
            Err(error) => {
                self.daemon.release_postcopy(self.id());
                refuse(error.to_string())
            }
        }
    }

    /// POSTCOPY_LISTEN.
    pub fn listen_postcopy(&mut self) -> Result<(), Refusal> {
        let session =
            self.postcopy.as_mut().ok_or_else(|| Refusal::Close("POSTCOPY_LISTEN before POSTCOPY_ADVISE".into()))?;
        session.listen().map_err(|e| Refusal::Close(e.to_string()))
    }

    /// QEMU's ack of the memory table in postcopy mode. QEMU expects no
    /// reply: a failure is logged, and the vrings then refuse to start (the
    /// device must not run unregistered).
    pub fn register_postcopy_table(&mut self) -> Result<(), Refusal> {
        let id = self.id();
        let ranges: Vec<HostRange> = self
            .table
            .views()
            .iter()
            .map(|v| HostRange { addr: v.host_addr(), len: v.desc().size, hugepage: v.hugepage_advised() })
            .collect();
        let session = self.postcopy.as_mut().ok_or_else(|| nack("memory-table ack without postcopy"))?;
        session.register(&ranges).map_err(|e| {
            log::error!("frontend {id}: postcopy registration failed: {e}");
            nack(e)
        })
    }

    /// POSTCOPY_END.
    pub fn end_postcopy(&mut self) -> Result<(), Refusal> {
        let mut session = self.postcopy.take().ok_or_else(|| Refusal::Close("POSTCOPY_END without postcopy".into()))?;
        let ended = session.end();
        self.daemon.release_postcopy(self.id());
        log::info!("frontend {}: postcopy ended; guest RAM unregistered", self.id());
        ended.map_err(|e| {
            log::error!("frontend {}: {e}", self.id());
            Refusal::Close(e.to_string())
        })
    }

    /// The frontend is gone: logging stops; a postcopy still registered is
    /// handed to the daemon, which keeps it for a while (see
    /// `Daemon::orphan_postcopy`), any other is dropped.
    pub(super) fn end_migration_on_disconnect(&mut self) {
        self.set_logging(false);
        match self.postcopy.take() {
            Some(session) if session.registered() => {
                // Workers waiting on a missing page are left to the orphan:
                // dropping it wakes them, and they see they were stopped.
                for vring in &mut self.vrings {
                    vring.abandon();
                }
                self.daemon.orphan_postcopy(self.id(), session);
            }
            Some(_) => self.daemon.release_postcopy(self.id()),
            None => {}
        }
    }
}
