//! The small choices a command line is made of: accelerator, serial sink.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::quote::qemu_opt_value;

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Emulation: `-accel tcg -cpu max` (the default CPU model, qemu64,
    /// lacks instructions that current distribution kernels use).
    #[default]
    Tcg,
    /// Hardware virtualisation: `-accel kvm -cpu host`.
    Kvm,
}

impl FromStr for Accel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            _ => Err(format!("unknown accelerator {s:?}: use tcg or kvm")),
        }
    }
}

/// Where the guest's first serial port goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialSink {
    /// QEMU's stdout (`-serial stdio`).
    #[default]
    Stdio,
    /// A file QEMU creates or appends to (a `file` chardev with
    /// `append=on`), so that the QEMU a live update starts, or the same one
    /// after cpr-exec, carries on the same console log.
    File(PathBuf),
    /// No serial port output (`-serial none`).
    None,
}

impl FromStr for SerialSink {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialSink::Stdio),
            "none" => Ok(SerialSink::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialSink::File(path.into())),
                _ => Err(format!("unknown serial sink {s:?}: use stdio, none or file:PATH")),
            },
        }
    }
}

/// The id of the chardev a [`SerialSink::File`] console writes through.
const SERIAL_CHARDEV_ID: &str = "serial0";

impl SerialSink {
    /// The QEMU options: `-serial stdio|none`, or a `file` chardev with
    /// `append=on` and `-serial chardev:ID` (`-serial file:` would truncate
    /// the log each time a QEMU opens it).
    pub fn qemu_args(&self) -> Vec<String> {
        let serial = |value: &str| vec!["-serial".to_string(), value.to_string()];
        match self {
            SerialSink::Stdio => serial("stdio"),
            SerialSink::None => serial("none"),
            SerialSink::File(path) => {
                let path = path.to_string_lossy();
                let mut args = vec![
                    "-chardev".to_string(),
                    format!("file,id={SERIAL_CHARDEV_ID},path={},append=on", qemu_opt_value(&path)),
                ];
                args.extend(serial(&format!("chardev:{SERIAL_CHARDEV_ID}")));
                args
            }
        }
    }
}

impl fmt::Display for SerialSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialSink::Stdio => f.write_str("stdio"),
            SerialSink::File(path) => write!(f, "file:{}", path.display()),
            SerialSink::None => f.write_str("none"),
        }
    }
}
