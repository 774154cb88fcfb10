//! Human-readable output. `--json` bypasses all of it.

use hangar_api::{App, ImageInfo, ImageList, Machine, MachineEvent, ProcessInfo};
use serde::Serialize;

pub fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce()) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("serializes"));
    } else {
        human();
    }
}

/// Prints rows as left-aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A byte count for people: 1.2 MB.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} kB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub fn images(list: &ImageList) {
    table(
        &["REFERENCE", "DIGEST", "LAYERS", "DISK", "UNIQUE", "MACHINES"],
        list.images
            .iter()
            .map(|i| {
                vec![
                    i.reference.clone(),
                    short(&i.digest),
                    i.layers.len().to_string(),
                    bytes(i.disk_bytes),
                    bytes(i.unique_bytes),
                    i.machines.to_string(),
                ]
            })
            .collect(),
    );
    println!(
        "total on disk: {} (shared layers counted once)",
        bytes(list.total_disk_bytes)
    );
}

pub fn image(i: &ImageInfo) {
    println!("reference:   {}", i.reference);
    println!("digest:      {}", i.digest);
    println!("download:    {}", bytes(i.size));
    println!(
        "disk:        {} ({} not shared with other images)",
        bytes(i.disk_bytes),
        bytes(i.unique_bytes)
    );
    println!("machines:    {}", i.machines);
    println!("entrypoint:  {:?}", i.config.entrypoint);
    println!("cmd:         {:?}", i.config.cmd);
    if let Some(dir) = &i.config.working_dir {
        println!("working dir: {dir}");
    }
    if let Some(user) = &i.config.user {
        println!("user:        {user}");
    }
    println!();
    table(
        &["LAYER", "MEDIA TYPE", "DOWNLOAD", "DISK", "SHARED BY"],
        i.layers
            .iter()
            .map(|l| {
                vec![
                    short(&l.digest),
                    l.media_type.clone(),
                    bytes(l.size),
                    bytes(l.disk_bytes),
                    format!("{} image(s)", l.shared_by),
                ]
            })
            .collect(),
    );
}

pub fn short(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex[..hex.len().min(12)].to_owned()
}

pub fn apps(apps: &[App]) {
    table(
        &["NAME", "MACHINES", "CREATED"],
        apps.iter()
            .map(|a| vec![a.name.clone(), a.machine_count.to_string(), a.created_at.clone()])
            .collect(),
    );
}

pub fn machines(ms: &[Machine]) {
    table(
        &["ID", "NAME", "STATE", "IMAGE", "RUN SECONDS", "UPDATED"],
        ms.iter()
            .map(|m| {
                vec![
                    m.id.clone(),
                    m.name.clone(),
                    m.state.to_string(),
                    m.image_ref.reference.clone(),
                    format!("{:.1}", m.run_seconds),
                    m.updated_at.clone(),
                ]
            })
            .collect(),
    );
}

pub fn machine(m: &Machine) {
    println!("id:          {}", m.id);
    println!("name:        {}", m.name);
    println!("app:         {}", m.app);
    println!("state:       {}", m.state);
    println!("image:       {} ({})", m.image_ref.reference, m.image_ref.digest);
    println!("run seconds: {:.3}", m.run_seconds);
    println!("created:     {}", m.created_at);
    println!("updated:     {}", m.updated_at);
    if let Some(e) = &m.last_exit {
        let how = match (e.exit_code, e.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "unknown".into(),
        };
        let oom = if e.oom_killed { ", out of memory" } else { "" };
        println!("last exit:   {how}{oom} at {}", e.exited_at);
    }
}

pub fn processes(ps: &[ProcessInfo]) {
    table(
        &["PID", "PPID", "UID", "STATE", "RSS KB", "COMMAND"],
        ps.iter()
            .map(|p| {
                vec![
                    p.pid.to_string(),
                    p.ppid.to_string(),
                    p.uid.to_string(),
                    p.state.clone(),
                    p.rss_kb.to_string(),
                    p.command.clone(),
                ]
            })
            .collect(),
    );
}

pub fn events(ev: &[MachineEvent]) {
    table(
        &["TIMESTAMP", "TYPE", "STATUS", "SOURCE"],
        ev.iter()
            .map(|e| {
                vec![
                    e.timestamp.to_string(),
                    e.kind.clone(),
                    e.status.clone(),
                    e.source.clone(),
                ]
            })
            .collect(),
    );
}

pub fn checkpoints(cps: &[hangar_api::Checkpoint]) {
    table(
        &["ID", "PARENT", "CREATED", "COMMENT"],
        cps.iter()
            .map(|c| {
                vec![
                    c.id.clone(),
                    c.parent_id.clone().unwrap_or_else(|| "-".into()),
                    c.created_at.clone(),
                    c.comment.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
}

pub fn diff(d: &hangar_api::CheckpointDiff) {
    for c in &d.changes {
        let mark = match c.kind {
            hangar_api::ChangeKind::Added => 'A',
            hangar_api::ChangeKind::Modified => 'M',
            hangar_api::ChangeKind::Deleted => 'D',
        };
        let size = match (c.old_size, c.size) {
            (Some(a), Some(b)) if a != b => format!(" ({} -> {})", bytes(a), bytes(b)),
            (_, Some(b)) => format!(" ({})", bytes(b)),
            (Some(a), None) => format!(" ({})", bytes(a)),
            (None, None) => String::new(),
        };
        let slash = if c.file_type == "dir" { "/" } else { "" };
        println!("{mark} {}{slash}{size}", c.path);
    }
    if d.truncated {
        println!("… and more, left out");
    }
    if let Some(text) = &d.content_diff {
        print!("{text}");
    }
}

pub fn volumes(vs: &[hangar_api::Volume]) {
    table(
        &["ID", "NAME", "SIZE GB", "STATE", "ATTACHED TO", "CREATED"],
        vs.iter()
            .map(|v| {
                vec![
                    v.id.clone(),
                    v.name.clone(),
                    v.size_gb.to_string(),
                    v.state.clone(),
                    v.attached_machine_id.clone().unwrap_or_else(|| "-".into()),
                    v.created_at.clone(),
                ]
            })
            .collect(),
    );
}

pub fn volume(v: &hangar_api::Volume) {
    println!("id:          {}", v.id);
    println!("name:        {}", v.name);
    println!("size:        {} GB", v.size_gb);
    println!("state:       {}", v.state);
    if let Some(used) = v.used_bytes {
        println!("used:        {}", bytes(used));
    }
    println!("attached to: {}", v.attached_machine_id.as_deref().unwrap_or("-"));
    if let Some(purge) = &v.purge_at {
        println!("purged at:   {purge}");
    }
}

pub fn secrets(list: &[hangar_api::egress::Secret]) {
    table(
        &["NAME", "HOSTS", "ALSO IN", "VERSION", "UPDATED"],
        list.iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.allowed_hosts.join(","),
                    s.allowed_in
                        .iter()
                        .map(|p| format!("{p:?}").to_lowercase())
                        .collect::<Vec<_>>()
                        .join(","),
                    s.version.to_string(),
                    s.updated_at.clone(),
                ]
            })
            .collect(),
    );
}

pub fn policy(p: &hangar_api::egress::EgressPolicy) {
    if p.allow.is_empty() {
        println!("nothing allowed (deny by default)");
    }
    for rule in &p.allow {
        println!("allow {rule}");
    }
}

pub fn egress_log(entries: &[hangar_api::egress::EgressLogEntry]) {
    table(
        &["TIME", "MACHINE", "REQUEST", "STATUS", "OUTCOME", "SECRETS", "MS"],
        entries
            .iter()
            .map(|e| {
                vec![
                    e.time.clone(),
                    e.machine_id.clone(),
                    format!("{} {}://{}:{}{}", e.method, e.scheme, e.host, e.port, e.path),
                    e.status.to_string(),
                    format!("{:?}", e.outcome).to_lowercase(),
                    e.secrets.join(","),
                    format!("{:.1}", e.duration_ms),
                ]
            })
            .collect(),
    );
}
