//! Human-readable renderings of gmemd's replies for `gmemctl status|regions|device`,
//! and the field and size formatting the other commands share.

use std::fmt::Write;

use gmem_protocol::{DeviceInfo, PinsInfo, RegionInfo, StatusInfo};
use serde::Serialize;

/// Prints `value` as pretty JSON, or as `human` renders it.
pub fn print<T: Serialize + ?Sized>(json: bool, value: &T, human: impl Fn(&T) -> String) -> serde_json::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", human(value));
    }
    Ok(())
}

pub fn status(status: &StatusInfo) -> String {
    let mut out = fields(&[
        ("version", status.version.clone()),
        ("pid", status.pid.to_string()),
        ("uptime", format!("{:.1} s", status.uptime_ms as f64 / 1000.0)),
        ("vhost-user socket", status.vhost_user_socket.clone()),
        ("frontends", status.frontends.len().to_string()),
        ("guest_memfd", status.guest_memfd.detail.clone()),
    ]);
    if !status.frontends.is_empty() {
        let rows = status.frontends.iter().map(|f| {
            vec![
                f.id.to_string(),
                f.pid.map_or_else(|| "-".into(), |pid| pid.to_string()),
                f.mapped_regions.to_string(),
                f.started_queues.to_string(),
            ]
        });
        out.push('\n');
        out += &table(&["FRONTEND", "PID", "MAPPED REGIONS", "STARTED QUEUES"], rows);
    }
    out
}

pub fn regions(regions: &[RegionInfo]) -> String {
    let rows = regions.iter().map(|r| {
        vec![
            r.id.clone(),
            bytes(r.size),
            bytes(r.populated_bytes),
            r.mapped_by.to_string(),
            r.backing.clone(),
            r.fd_path.clone(),
        ]
    });
    table(&["ID", "SIZE", "POPULATED", "MAPPED BY", "BACKING", "FD PATH"], rows)
}

pub fn device(device: &DeviceInfo) -> String {
    let mut out = fields(&[
        ("kind", device.kind.clone()),
        ("disk", device.disk.clone()),
        ("capacity", format!("{} ({} bytes)", bytes(device.capacity_bytes), device.capacity_bytes)),
        ("readonly", if device.readonly { "yes" } else { "no" }.into()),
        ("requests", device.requests.to_string()),
        ("errors", device.errors.to_string()),
    ]);
    let rows = device.queues.iter().map(|q| {
        vec![
            q.index.to_string(),
            if q.started { "yes" } else { "no" }.into(),
            q.requests.to_string(),
            q.errors.to_string(),
            bytes(q.bytes_from_guest),
            bytes(q.bytes_to_guest),
        ]
    });
    out.push('\n');
    out += &table(&["QUEUE", "STARTED", "REQUESTS", "ERRORS", "FROM GUEST", "TO GUEST"], rows);
    out
}

pub fn pins(pins: &PinsInfo) -> String {
    let limit = |limit: &gmem_pins::Limit| match limit {
        gmem_pins::Limit::Unlimited => "unlimited".to_string(),
        gmem_pins::Limit::Bytes(n) => bytes(*n),
    };
    let owners = pins.ledger.owners.iter().map(|o| {
        let regions: Vec<&str> = o.regions.iter().map(|r| r.region.as_str()).collect();
        vec![
            o.owner.as_str().to_string(),
            o.uid.to_string(),
            limit(&o.limit),
            bytes(o.in_use),
            bytes(o.pending_bytes),
            if o.over_budget { "OVER BUDGET" } else { "" }.to_string(),
            regions.join(","),
        ]
    });
    let mut out = table(&["OWNER", "UID", "BUDGET", "LOCKED", "PENDING", "", "REGIONS"], owners);
    match (&pins.reconciliation, &pins.reconciliation_error) {
        (Some(reconciliation), _) => {
            out.push('\n');
            let checks = reconciliation.checks.iter().map(|c| {
                let observed = c.observed.map_or_else(|| "?".into(), bytes);
                vec![c.what.clone(), bytes(c.expected), observed, format!("{:?}", c.verdict).to_lowercase()]
            });
            out += &table(&["CHECK", "LEDGER", "KERNEL", "VERDICT"], checks);
        }
        (None, Some(error)) => out += &format!("\nthe kernel's figures could not be read: {error}\n"),
        (None, None) => {}
    }
    out
}

/// `name  value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    pairs.iter().fold(String::new(), |mut out, (name, value)| {
        let _ = writeln!(out, "{name:width$}  {value}");
        out
    })
}

/// A table with left-aligned columns two spaces apart.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut rows: Vec<Vec<String>> = rows.collect();
    rows.insert(0, header.iter().map(|h| h.to_string()).collect());
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:width$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// Sizes as people read them: binary units, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
