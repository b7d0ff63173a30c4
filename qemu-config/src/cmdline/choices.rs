//! The small choices a command line is made of: accelerator, serial sink.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

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
    /// A file QEMU creates or truncates (`-serial file:PATH`).
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

impl fmt::Display for SerialSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialSink::Stdio => f.write_str("stdio"),
            // `-serial file:` takes the rest of the argument verbatim (no
            // QemuOpts parsing), so a comma in the path must NOT be doubled.
            SerialSink::File(path) => write!(f, "file:{}", path.display()),
            SerialSink::None => f.write_str("none"),
        }
    }
}
