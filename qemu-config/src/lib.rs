//! Attach a QEMU VM to gmemd.
//!
//! gmemd is a vhost-user-blk daemon that also *owns the guest's RAM*: it
//! creates the RAM as memfd regions and QEMU maps the very same pages through
//! `/proc/<gmemd pid>/fd/<n>`. This crate knows how to say that to QEMU:
//!
//! - [`cmdline`]: [`QemuCommand`], the command line (guest RAM is always
//!   gmemd's, never QEMU's own `-m` RAM);
//! - [`qmp`]: [`QmpClient`], a small blocking QMP client;
//! - [`migration`]: [`Migration`], live migration (precopy, postcopy,
//!   postcopy recovery) driven over QMP;
//! - [`live_update`]: moving a running guest to a new QEMU on the same host
//!   (cpr-transfer, cpr-exec), one [`live_update::hop`] at a time;
//! - [`process`]: [`QemuProcess`], a QEMU child that is killed on drop;
//! - [`quote`]: shell and QEMU-option quoting.
//!
//! The `gmemctl` binary puts them together.

pub mod cmdline;
pub mod live_update;
pub mod migration;
pub mod process;
pub mod qmp;
pub mod quote;

pub use cmdline::{Accel, CmdlineError, QemuCommand, SerialSink};
pub use live_update::{CprMode, HopOptions, HopReport, LiveUpdateError, NextQemu, QemuVersion};
pub use migration::{
    prepare_destination, Endpoint, Migration, MigrationError, MigrationOptions, MigrationReport, MigrationStatus,
    Progress, SwitchToPostcopy,
};
pub use process::{Output, ProcessError, ProcessHandle, QemuProcess, SpawnOptions};
pub use qmp::{QmpClient, QmpError};
