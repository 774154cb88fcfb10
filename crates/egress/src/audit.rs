//! The audit log: one row per request that reached the gateway, allowed or
//! not. Rows are written by one thread in batches, off the request path;
//! a crash loses at most the last batch (up to 50 ms of requests).

use std::path::Path;
use std::sync::mpsc;

use anyhow::{Context, Result};
use hangar_api::egress::{EgressLogEntry, EgressOutcome};
use rusqlite::{Connection, params};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS egress_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms BIGINT NOT NULL,
    machine_id TEXT NOT NULL,
    app TEXT NOT NULL,
    method TEXT NOT NULL,
    scheme TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    rule TEXT,
    secrets TEXT NOT NULL,
    bytes_sent BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL,
    duration_us BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS egress_log_machine ON egress_log (machine_id, at_ms);
CREATE INDEX IF NOT EXISTS egress_log_app ON egress_log (app, at_ms);
"#;

/// A request's record, filled in as it goes.
#[derive(Debug, Clone)]
pub struct Record {
    pub at_ms: i64,
    pub machine_id: String,
    pub app: String,
    pub method: String,
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub status: u16,
    pub outcome: EgressOutcome,
    pub reason: Option<String>,
    pub rule: Option<String>,
    pub secrets: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_us: u64,
}

#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    path: std::path::PathBuf,
}

/// Filters of a query.
#[derive(Debug, Default)]
pub struct Query {
    pub app: Option<String>,
    pub machine: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: u32,
}

enum Message {
    Record(Box<Record>),
    /// Commit what is queued, then answer: a query sees every request
    /// that finished before it.
    Flush(mpsc::Sender<()>),
}

fn outcome_str(o: EgressOutcome) -> &'static str {
    match o {
        EgressOutcome::Allowed => "allowed",
        EgressOutcome::Denied => "denied",
        EgressOutcome::Exfiltration => "exfiltration",
    }
}

/// How the log is kept small: a machine sending requests as fast as it can
/// must not fill the host's disk with their records.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Entries older than this go, at most hourly.
    pub age: std::time::Duration,
    /// And only the newest this many are kept, checked every
    /// [`PRUNE_EVERY`] records (or this many, if fewer).
    pub max_entries: u64,
}

/// How many records are written between checks of [`Retention::max_entries`].
const PRUNE_EVERY: u64 = 10_000;

/// The longest path kept in a record (the rest is cut): a machine chooses
/// its paths.
const MAX_PATH: usize = 1024;

impl AuditLog {
    /// Opens the log, kept within `retention`.
    pub fn open(path: &Path, retention: Retention) -> Result<AuditLog> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(SCHEMA).context("creating the audit schema")?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(conn, rx, retention))
            .context("starting the audit writer")?;
        Ok(AuditLog {
            tx,
            path: path.to_owned(),
        })
    }

    pub fn record(&self, r: Record) {
        if self.tx.send(Message::Record(Box::new(r))).is_err() {
            tracing::error!("the audit writer has stopped; an egress record was lost");
        }
    }

    /// Newest first.
    pub fn query(&self, q: &Query) -> Result<Vec<EgressLogEntry>> {
        let (done, flushed) = mpsc::channel();
        self.tx
            .send(Message::Flush(done))
            .context("the audit writer has stopped")?;
        flushed.recv().context("the audit writer has stopped")?;
        let conn = Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut stmt = conn.prepare(
            "SELECT id, at_ms, machine_id, app, method, scheme, host, port, path, status, outcome, reason, rule,
                    secrets, bytes_sent, bytes_received, duration_us
             FROM egress_log
             WHERE (?1 IS NULL OR app = ?1) AND (?2 IS NULL OR machine_id = ?2)
               AND (?3 IS NULL OR at_ms >= ?3) AND (?4 IS NULL OR at_ms < ?4)
             ORDER BY id DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(params![q.app, q.machine, q.since_ms, q.until_ms, q.limit], |row| {
            let outcome: String = row.get(10)?;
            let secrets: String = row.get(13)?;
            let at_ms: i64 = row.get(1)?;
            Ok(EgressLogEntry {
                id: row.get(0)?,
                time: rfc3339(at_ms),
                machine_id: row.get(2)?,
                app: row.get(3)?,
                method: row.get(4)?,
                scheme: row.get(5)?,
                host: row.get(6)?,
                port: row.get(7)?,
                path: row.get(8)?,
                status: row.get(9)?,
                outcome: match outcome.as_str() {
                    "denied" => EgressOutcome::Denied,
                    "exfiltration" => EgressOutcome::Exfiltration,
                    _ => EgressOutcome::Allowed,
                },
                reason: row.get(11)?,
                rule: row.get(12)?,
                secrets: serde_json::from_str(&secrets).unwrap_or_default(),
                bytes_sent: row.get::<_, i64>(14)? as u64,
                bytes_received: row.get::<_, i64>(15)? as u64,
                duration_ms: row.get::<_, i64>(16)? as f64 / 1000.0,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

fn write_loop(mut conn: Connection, rx: mpsc::Receiver<Message>, retention: Retention) {
    let mut batch = Vec::new();
    let mut waiting = Vec::new();
    let mut pruned: Option<std::time::Instant> = None;
    let mut since_count: u64 = PRUNE_EVERY;
    while let Ok(first) = rx.recv() {
        if pruned.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(3600)) {
            let cutoff = now_ms() - retention.age.as_millis() as i64;
            if let Err(e) = conn.execute("DELETE FROM egress_log WHERE at_ms < ?", [cutoff]) {
                tracing::warn!("pruning the audit log: {e}");
            }
            pruned = Some(std::time::Instant::now());
        }
        if since_count >= PRUNE_EVERY.min(retention.max_entries) {
            // Ids only grow: the newest entries are the highest.
            let keep = i64::try_from(retention.max_entries).unwrap_or(i64::MAX);
            let sql = "DELETE FROM egress_log WHERE id <= (SELECT MAX(id) FROM egress_log) - ?";
            if let Err(e) = conn.execute(sql, [keep]) {
                tracing::warn!("pruning the audit log: {e}");
            }
            since_count = 0;
        }
        // Whatever else arrives within 50 ms goes into the same commit.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Message::Record(r) => batch.push(*r),
                Message::Flush(done) => waiting.push(done),
            }
            if batch.len() < 1024 && waiting.is_empty() {
                next = rx
                    .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                    .ok();
            }
        }
        if !batch.is_empty()
            && let Err(e) = write_batch(&mut conn, &batch)
        {
            tracing::error!("writing {} egress records: {e}", batch.len());
        }
        since_count += batch.len() as u64;
        batch.clear();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Record]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO egress_log (at_ms, machine_id, app, method, scheme, host, port, path, status, outcome,
                                     reason, rule, secrets, bytes_sent, bytes_received, duration_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        for r in batch {
            stmt.execute(params![
                r.at_ms,
                r.machine_id,
                r.app,
                r.method,
                r.scheme,
                r.host,
                r.port,
                cut(&r.path, MAX_PATH),
                r.status,
                outcome_str(r.outcome),
                r.reason,
                r.rule,
                serde_json::to_string(&r.secrets).expect("names serialize"),
                r.bytes_sent as i64,
                r.bytes_received as i64,
                r.duration_us as i64,
            ])?;
        }
    }
    tx.commit()
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> Record {
        Record {
            at_ms: now_ms(),
            machine_id: "m".into(),
            app: "a".into(),
            method: "GET".into(),
            scheme: "http",
            host: "h".into(),
            port: 80,
            path: path.into(),
            status: 200,
            outcome: EgressOutcome::Allowed,
            reason: None,
            rule: None,
            secrets: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
            duration_us: 0,
        }
    }

    #[test]
    fn keeps_the_newest_entries_and_cuts_long_paths() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            age: std::time::Duration::from_secs(86_400),
            max_entries: 10,
        };
        let log = AuditLog::open(&dir.path().join("audit.db"), retention).unwrap();
        let query = Query {
            limit: 1000,
            ..Default::default()
        };
        for round in 0..5 {
            for i in 0..10 {
                log.record(record(&format!("/{round}/{i}")));
            }
            log.query(&query).unwrap();
        }
        log.record(record(&"x".repeat(5000)));
        let entries = log.query(&query).unwrap();
        assert!(entries.len() <= 20, "{} entries kept", entries.len());
        assert!(entries.iter().any(|e| e.path == "/4/9"), "the newest are kept");
        assert!(!entries.iter().any(|e| e.path.starts_with("/0/")), "the oldest went");
        assert!(entries.iter().any(|e| e.path.len() == MAX_PATH));
    }
}
