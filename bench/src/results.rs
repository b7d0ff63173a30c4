//! Where results go: pretty JSON files under `bench/results/` (git-ignored).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::host;

/// Writes `report` as pretty JSON to `path`, or by default to
/// `bench/results/<UTC timestamp><suffix>.json`, creating the directory;
/// returns the path written.
pub fn write_json(path: Option<PathBuf>, suffix: &str, report: &impl Serialize) -> Result<PathBuf> {
    let path = path.unwrap_or_else(|| {
        gmem_tests::guest::repo_root().join(format!("bench/results/{}{suffix}.json", host::utc_timestamp(true)))
    });
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// [`write_json`], then says where the result went.
pub fn save(path: Option<PathBuf>, suffix: &str, report: &impl Serialize) -> Result<()> {
    let path = write_json(path, suffix, report)?;
    println!("JSON result: {}", path.display());
    Ok(())
}
