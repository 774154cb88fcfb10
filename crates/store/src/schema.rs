//! Schema migrations, applied in order and recorded in `schema_migrations`
//! inside the same transaction as the change, so a crash mid-migration leaves
//! the previous version intact.

use rusqlite::Connection;

use crate::{Result, db};

/// Each entry is one migration; never edit a released one, append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE apps (
    name TEXT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE images (
    reference TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    image_json TEXT NOT NULL
);
CREATE INDEX images_digest ON images (digest);
CREATE TABLE machines (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL REFERENCES apps (name),
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    config_json TEXT NOT NULL,
    image_reference TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    host TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    run_ms BIGINT NOT NULL,
    started_at_ms BIGINT,
    restart_count BIGINT NOT NULL,
    last_exit_json TEXT
);
-- Names are unique among the living; a destroyed machine frees its name.
CREATE UNIQUE INDEX machines_live_name ON machines (app, name) WHERE state <> 'destroyed';
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    detail_json TEXT
);
CREATE INDEX events_machine ON events (machine_id, seq);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
-- A checkpoint is a read-only snapshot of a machine's writable layer.
-- parent_id: the checkpoint the machine's layer descended from when this
-- one was taken (its previous checkpoint, or the one it was restored or
-- forked from).
CREATE TABLE checkpoints (
    id TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL,
    comment TEXT,
    parent_id TEXT,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX checkpoints_machine ON checkpoints (machine_id, created_at_ms);
-- The checkpoint the machine's current layer descends from.
ALTER TABLE machines ADD COLUMN base_checkpoint TEXT;
"#,
    r#"
-- Volumes outlive machines. A deleted one is kept (deleted_at_ms set)
-- until its retention ends, and can be brought back until then.
CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL REFERENCES apps (name),
    name TEXT NOT NULL,
    size_gb BIGINT NOT NULL,
    attached_machine_id TEXT,
    created_at_ms BIGINT NOT NULL,
    deleted_at_ms BIGINT
);
CREATE UNIQUE INDEX volumes_live_name ON volumes (app, name) WHERE deleted_at_ms IS NULL;
CREATE TABLE volume_snapshots (
    id TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX volume_snapshots_volume ON volume_snapshots (volume_id, created_at_ms);
"#,
    r#"
-- How many recorded steps (commands run through exec, files written
-- through the API) the machine had taken when the checkpoint was made.
ALTER TABLE checkpoints ADD COLUMN steps BIGINT NOT NULL DEFAULT 0;
"#,
    r#"
-- Secrets are stored sealed to the egress gateway's key: the daemon can't
-- read them back. The bindings are kept in the clear to show in the API;
-- the gateway trusts only the copy inside the sealed payload.
CREATE TABLE secrets (
    app TEXT NOT NULL REFERENCES apps (name),
    name TEXT NOT NULL,
    sealed TEXT NOT NULL,
    bindings_json TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (app, name)
);
CREATE TABLE egress_policies (
    app TEXT PRIMARY KEY REFERENCES apps (name),
    policy_json TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
"#,
];

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)")
        .map_err(db("creating schema_migrations"))?;
    let applied: i64 = conn
        .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
        .map_err(db("reading schema version"))?;
    if applied as usize > MIGRATIONS.len() {
        return Err(crate::StoreError::Corrupt(format!(
            "database schema version {applied} is newer than this daemon knows ({}): upgrade hangar",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction().map_err(db("migrating"))?;
        tx.execute_batch(sql)
            .map_err(db(format!("applying migration {}", i + 1)))?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES (?)", [i as i64 + 1])
            .map_err(db("recording migration"))?;
        tx.commit().map_err(db("migrating"))?;
    }
    Ok(())
}
