//! Hangar's durable state. Every change a caller makes here is committed
//! (SQLite WAL with `synchronous=FULL`) before the call returns, so the daemon
//! can acknowledge an API request only after its effect is on disk.
//!
//! One thread owns the one connection and runs each call's whole transaction
//! in one go: a call costs one hop to that thread and back plus the commit,
//! whatever the number of statements in it. (With sqlx every statement, BEGIN
//! and COMMIT was its own hop to a worker thread; on two busy cores each hop
//! cost a wakeup, about 1 ms per machine state change in all.)
//!
//! The SQL is kept portable (no SQLite-only syntax beyond the pragmas in
//! [`Store::open`]) so a Postgres/CockroachDB backend can take the same
//! statements later.

#![forbid(unsafe_code)]

mod schema;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use hangar_api::{MachineConfig, MachineEvent, MachineState};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

/// Errors from the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (duplicate app or machine name).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("state database: {context}")]
    Database {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database holds a corrupt record: {0}")]
    Corrupt(String),
    #[error("starting the state database's thread")]
    Thread(#[source] std::io::Error),
    #[error("state database: {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The store's thread is gone (it panicked, or the process is ending).
    #[error("state database is closed")]
    Closed,
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn db(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Database { context, source }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// An app row.
#[derive(Debug, Clone)]
pub struct AppRecord {
    pub name: String,
    pub created_at_ms: i64,
    pub machine_count: u64,
}

/// An image resolved into the local image store.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub reference: String,
    pub digest: String,
    /// The image store's own description (`hangar_image::Image` as JSON).
    pub image_json: String,
}

/// Everything the daemon persists about one machine.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRecord {
    pub id: String,
    pub app: String,
    pub name: String,
    pub state: MachineState,
    pub config: MachineConfig,
    pub image_reference: String,
    pub image_digest: String,
    pub instance_id: String,
    /// The daemon that owns this machine (one today; N workers later).
    pub host: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Completed running time, not counting the current run.
    pub run_ms: i64,
    /// When the current run began, while started.
    pub started_at_ms: Option<i64>,
    /// Restarts by the restart policy since the last user start.
    pub restart_count: u32,
    pub last_exit: Option<hangar_api::ExitInfo>,
    /// The checkpoint the machine's writable layer descends from: the last
    /// one taken, restored or forked from. `None` for a fresh layer.
    pub base_checkpoint: Option<String>,
}

/// A checkpoint: a read-only snapshot of a machine's writable layer.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRecord {
    pub id: String,
    pub machine_id: String,
    pub comment: Option<String>,
    /// The checkpoint the layer descended from when this one was taken.
    pub parent_id: Option<String>,
    pub created_at_ms: i64,
    /// How many recorded steps the machine had taken by then.
    pub steps: u64,
}

/// A volume: storage that outlives machines.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRecord {
    pub id: String,
    pub app: String,
    pub name: String,
    pub size_gb: u64,
    /// The machine that mounts it, while one (not destroyed) does.
    pub attached_machine_id: Option<String>,
    pub created_at_ms: i64,
    /// When it was deleted; it is purged once its retention has passed.
    pub deleted_at_ms: Option<i64>,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeSnapshotRecord {
    pub id: String,
    pub volume_id: String,
    pub created_at_ms: i64,
}

/// A secret, sealed: the store never holds its value in the clear.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretRecord {
    pub app: String,
    pub name: String,
    /// The sealed payload, base64.
    pub sealed: String,
    pub allowed_hosts: Vec<String>,
    pub allowed_in: Vec<hangar_api::egress::SecretPlacement>,
    pub inject: Option<hangar_api::egress::SecretInjection>,
    pub version: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What of a secret is stored in the clear, as one JSON column.
#[derive(serde::Serialize, serde::Deserialize)]
struct SecretBindings {
    allowed_hosts: Vec<String>,
    #[serde(default)]
    allowed_in: Vec<hangar_api::egress::SecretPlacement>,
    #[serde(default)]
    inject: Option<hangar_api::egress::SecretInjection>,
}

fn secret_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SecretRecord> {
    let bindings: String = row.get(3)?;
    let b: SecretBindings = serde_json::from_str(&bindings)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e)))?;
    Ok(SecretRecord {
        app: row.get(0)?,
        name: row.get(1)?,
        sealed: row.get(2)?,
        allowed_hosts: b.allowed_hosts,
        allowed_in: b.allowed_in,
        inject: b.inject,
        version: row.get::<_, i64>(4)? as u32,
        created_at_ms: row.get(5)?,
        updated_at_ms: row.get(6)?,
    })
}

const SECRET_SELECT: &str =
    "SELECT app, name, sealed, bindings_json, version, created_at_ms, updated_at_ms FROM secrets";

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The state store. Cheap to clone; every clone talks to the same connection.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    pub async fn open(path: &Path) -> Result<Store> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let path = path.to_owned();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("hangar-store".into())
            .spawn(move || {
                let mut conn = match open_connection(&path) {
                    Ok(conn) => {
                        let _ = opened_tx.send(Ok(()));
                        conn
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when the last `Store` clone is dropped.
                for job in queue {
                    job(&mut conn);
                }
            })
            .map_err(StoreError::Thread)?;
        opened.await.map_err(|_| StoreError::Closed)??;
        Ok(Store { jobs })
    }

    /// Runs `f` on the store's thread and waits for its answer.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (answer_tx, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = answer_tx.send(f(conn));
            }))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` inside one transaction, committed only if `f` succeeds.
    async fn write<T: Send + 'static>(
        &self,
        context: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.call(move |conn| {
            let tx = conn.transaction().map_err(db(context))?;
            let value = f(&tx)?;
            tx.commit().map_err(db(context))?;
            Ok(value)
        })
        .await
    }

    pub async fn create_app(&self, name: &str, now_ms: i64) -> Result<()> {
        let name = name.to_owned();
        self.call(move |conn| {
            conn.prepare_cached("INSERT INTO apps (name, created_at_ms) VALUES (?, ?)")
                .and_then(|mut s| s.execute(params![name, now_ms]))
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict(format!("app {name:?} already exists"))
                    } else {
                        db(format!("creating app {name}"))(e)
                    }
                })?;
            Ok(())
        })
        .await
    }

    pub async fn list_apps(&self) -> Result<Vec<AppRecord>> {
        self.call(|conn| list_apps(conn)).await
    }

    pub async fn get_app(&self, name: &str) -> Result<Option<AppRecord>> {
        Ok(self.list_apps().await?.into_iter().find(|a| a.name == name))
    }

    /// Deletes an app that has no machines left (destroyed ones excepted).
    pub async fn delete_app(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.write("deleting app", move |tx| {
            let live: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM machines WHERE app = ? AND state <> 'destroyed'",
                    [&name],
                    |r| r.get(0),
                )
                .map_err(db("deleting app"))?;
            if live > 0 {
                return Err(StoreError::Conflict(format!(
                    "app {name:?} still has {live} machine(s): destroy them first"
                )));
            }
            let volumes: i64 = tx
                .query_row("SELECT COUNT(*) FROM volumes WHERE app = ?", [&name], |r| r.get(0))
                .map_err(db("deleting app"))?;
            if volumes > 0 {
                return Err(StoreError::Conflict(format!(
                    "app {name:?} still has {volumes} volume(s), deleted ones kept for their retention \
                     included: delete them and wait, or keep the app"
                )));
            }
            for sql in [
                "DELETE FROM events WHERE machine_id IN (SELECT id FROM machines WHERE app = ?)",
                "DELETE FROM machines WHERE app = ?",
                "DELETE FROM secrets WHERE app = ?",
                "DELETE FROM egress_policies WHERE app = ?",
            ] {
                tx.execute(sql, [&name]).map_err(db("deleting app"))?;
            }
            let deleted = tx
                .execute("DELETE FROM apps WHERE name = ?", [&name])
                .map_err(db("deleting app"))?;
            if deleted == 0 {
                return Err(StoreError::NotFound(format!("app {name:?} not found")));
            }
            Ok(())
        })
        .await
    }

    pub async fn put_image(&self, image: &ImageRecord) -> Result<()> {
        let image = image.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO images (reference, digest, image_json) VALUES (?, ?, ?) \
                 ON CONFLICT (reference) DO UPDATE SET digest = excluded.digest, image_json = excluded.image_json",
                params![image.reference, image.digest, image.image_json],
            )
            .map_err(db(format!("recording image {}", image.reference)))?;
            Ok(())
        })
        .await
    }

    /// The image a reference names, if it was pulled or imported.
    pub async fn get_image(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let reference = reference.to_owned();
        self.call(move |conn| {
            conn.query_row(
                "SELECT reference, digest, image_json FROM images WHERE reference = ?",
                [reference],
                image_from_row,
            )
            .optional()
            .map_err(db("reading image"))
        })
        .await
    }

    /// Forgets a reference (the blobs and layers are the image store's).
    pub async fn delete_image(&self, reference: &str) -> Result<()> {
        let reference = reference.to_owned();
        self.call(move |conn| {
            conn.execute("DELETE FROM images WHERE reference = ?", [reference])
                .map_err(db("removing image"))?;
            Ok(())
        })
        .await
    }

    /// Every image, by reference.
    pub async fn list_images(&self) -> Result<Vec<ImageRecord>> {
        self.call(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT reference, digest, image_json FROM images ORDER BY reference")
                .map_err(db("listing images"))?;
            let rows = statement.query_map([], image_from_row).map_err(db("listing images"))?;
            rows.collect::<rusqlite::Result<_>>().map_err(db("reading image"))
        })
        .await
    }

    /// The image with this manifest digest (any reference naming it).
    pub async fn get_image_by_digest(&self, digest: &str) -> Result<Option<ImageRecord>> {
        let digest = digest.to_owned();
        self.call(move |conn| {
            conn.query_row(
                "SELECT reference, digest, image_json FROM images WHERE digest = ? LIMIT 1",
                [digest],
                image_from_row,
            )
            .optional()
            .map_err(db("reading image"))
        })
        .await
    }

    /// Inserts a new machine with its first event, atomically.
    pub async fn insert_machine(&self, m: &MachineRecord, event: &MachineEvent) -> Result<()> {
        let row = MachineRow::from(m);
        let event = event.clone();
        let (name, app) = (m.name.clone(), m.app.clone());
        self.write("creating machine", move |tx| {
            tx.prepare_cached(
                "INSERT INTO machines (id, app, name, state, config_json, image_reference, image_digest, \
                   instance_id, host, created_at_ms, updated_at_ms, run_ms, started_at_ms, restart_count, last_exit_json, \
                   base_checkpoint) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .and_then(|mut s| {
                let m = &row.record;
                s.execute(params![
                    m.id,
                    m.app,
                    m.name,
                    m.state.as_str(),
                    row.config_json,
                    m.image_reference,
                    m.image_digest,
                    m.instance_id,
                    m.host,
                    m.created_at_ms,
                    m.updated_at_ms,
                    m.run_ms,
                    m.started_at_ms,
                    m.restart_count,
                    row.last_exit_json,
                    m.base_checkpoint,
                ])
            })
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!(
                        "a machine named {name:?} already exists in app {app:?}: choose another name or destroy it"
                    ))
                } else {
                    db(format!("creating machine {}", row.record.id))(e)
                }
            })?;
            insert_event(tx, &row.record.id, &event)
        })
        .await
    }

    /// Writes the machine's new state (and everything else that changed)
    /// together with the event that explains it, atomically.
    pub async fn update_machine(&self, m: &MachineRecord, event: Option<&MachineEvent>) -> Result<()> {
        let row = MachineRow::from(m);
        let event = event.cloned();
        self.write("updating machine", move |tx| {
            let m = &row.record;
            let updated = tx
                .prepare_cached(
                    "UPDATE machines SET state = ?, config_json = ?, image_reference = ?, image_digest = ?, \
                       instance_id = ?, updated_at_ms = ?, run_ms = ?, started_at_ms = ?, restart_count = ?, \
                       last_exit_json = ?, base_checkpoint = ? WHERE id = ?",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        m.state.as_str(),
                        row.config_json,
                        m.image_reference,
                        m.image_digest,
                        m.instance_id,
                        m.updated_at_ms,
                        m.run_ms,
                        m.started_at_ms,
                        m.restart_count,
                        row.last_exit_json,
                        m.base_checkpoint,
                        m.id,
                    ])
                })
                .map_err(db(format!("updating machine {}", m.id)))?;
            if updated == 0 {
                return Err(StoreError::NotFound(format!("machine {} not found", m.id)));
            }
            match &event {
                Some(event) => insert_event(tx, &m.id, event),
                None => Ok(()),
            }
        })
        .await
    }

    /// Forgets a machine entirely (used to undo a create that never finished).
    pub async fn purge_machine(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.write("purging machine", move |tx| {
            for sql in [
                "DELETE FROM events WHERE machine_id = ?",
                "DELETE FROM machines WHERE id = ?",
            ] {
                tx.execute(sql, [&id]).map_err(db("purging machine"))?;
            }
            Ok(())
        })
        .await
    }

    pub async fn get_machine(&self, id: &str) -> Result<Option<MachineRecord>> {
        let id = id.to_owned();
        self.call(move |conn| query_machines(conn, &format!("{MACHINE_SELECT} WHERE id = ?"), [id]).map(first))
            .await
    }

    /// The living (not destroyed) machine named `name` in `app`.
    pub async fn get_machine_by_name(&self, app: &str, name: &str) -> Result<Option<MachineRecord>> {
        let (app, name) = (app.to_owned(), name.to_owned());
        self.call(move |conn| {
            let sql = format!("{MACHINE_SELECT} WHERE app = ? AND name = ? AND state <> 'destroyed'");
            query_machines(conn, &sql, [app, name]).map(first)
        })
        .await
    }

    /// Machines of one app (or of all apps), oldest first.
    pub async fn list_machines(&self, app: Option<&str>) -> Result<Vec<MachineRecord>> {
        let app = app.map(str::to_owned);
        self.call(move |conn| match app {
            Some(app) => query_machines(
                conn,
                &format!("{MACHINE_SELECT} WHERE app = ? ORDER BY created_at_ms, id"),
                [app],
            ),
            None => query_machines(conn, &format!("{MACHINE_SELECT} ORDER BY created_at_ms, id"), []),
        })
        .await
    }

    pub async fn list_events(&self, machine_id: &str) -> Result<Vec<MachineEvent>> {
        let machine_id = machine_id.to_owned();
        self.call(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT kind, status, source, timestamp_ms, detail_json FROM events \
                     WHERE machine_id = ? ORDER BY seq",
                )
                .map_err(db("listing events"))?;
            let rows = statement
                .query_map([machine_id], |r| {
                    Ok((
                        MachineEvent {
                            kind: r.get(0)?,
                            status: r.get(1)?,
                            source: r.get(2)?,
                            timestamp: r.get(3)?,
                            detail: None,
                        },
                        r.get::<_, Option<String>>(4)?,
                    ))
                })
                .map_err(db("listing events"))?;
            rows.map(|row| {
                let (mut event, detail) = row.map_err(db("reading event"))?;
                event.detail = detail
                    .map(|d| serde_json::from_str(&d))
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("event detail: {e}")))?;
                Ok(event)
            })
            .collect()
        })
        .await
    }

    /// Appends an event without changing the machine.
    pub async fn add_event(&self, machine_id: &str, event: &MachineEvent) -> Result<()> {
        let (machine_id, event) = (machine_id.to_owned(), event.clone());
        self.write("recording event", move |tx| insert_event(tx, &machine_id, &event))
            .await
    }

    /// A small key/value table for daemon-wide facts (e.g. the host id).
    pub async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        let key = key.to_owned();
        self.call(move |conn| {
            conn.query_row("SELECT value FROM settings WHERE key = ?", [key], |r| r.get(0))
                .optional()
                .map_err(db("reading setting"))
        })
        .await
    }

    pub async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map_err(db("writing setting"))?;
            Ok(())
        })
        .await
    }

    /// Records a checkpoint whose snapshot exists, and makes it its
    /// machine's base, atomically.
    pub async fn insert_checkpoint(&self, c: &CheckpointRecord) -> Result<()> {
        let c = c.clone();
        self.write("recording checkpoint", move |tx| {
            tx.prepare_cached(
                "INSERT INTO checkpoints (id, machine_id, comment, parent_id, created_at_ms, steps) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.id,
                    c.machine_id,
                    c.comment,
                    c.parent_id,
                    c.created_at_ms,
                    c.steps as i64
                ])
            })
            .map_err(db(format!("recording checkpoint {}", c.id)))?;
            tx.execute(
                "UPDATE machines SET base_checkpoint = ? WHERE id = ?",
                params![c.id, c.machine_id],
            )
            .map_err(db("recording checkpoint"))?;
            Ok(())
        })
        .await
    }

    pub async fn get_checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>> {
        let id = id.to_owned();
        self.call(move |conn| query_checkpoints(conn, &format!("{CHECKPOINT_SELECT} WHERE id = ?"), [id]).map(first))
            .await
    }

    /// A machine's checkpoints, oldest first.
    pub async fn list_checkpoints(&self, machine_id: &str) -> Result<Vec<CheckpointRecord>> {
        let id = machine_id.to_owned();
        self.call(move |conn| {
            let sql = format!("{CHECKPOINT_SELECT} WHERE machine_id = ? ORDER BY created_at_ms, id");
            query_checkpoints(conn, &sql, [id])
        })
        .await
    }

    /// Every checkpoint id (for recovery's sweep of the pool).
    pub async fn all_checkpoint_ids(&self) -> Result<Vec<String>> {
        self.call(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT id FROM checkpoints")
                .map_err(db("listing checkpoints"))?;
            let rows = statement
                .query_map([], |r| r.get(0))
                .map_err(db("listing checkpoints"))?;
            rows.collect::<rusqlite::Result<_>>().map_err(db("listing checkpoints"))
        })
        .await
    }

    /// Forgets a checkpoint. Checkpoints that named it as their parent, and
    /// machines based on it, take its parent instead, so chains stay whole.
    pub async fn delete_checkpoint(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.write("removing checkpoint", move |tx| {
            let parent: Option<Option<String>> = tx
                .query_row("SELECT parent_id FROM checkpoints WHERE id = ?", [&id], |r| r.get(0))
                .optional()
                .map_err(db("removing checkpoint"))?;
            let Some(parent) = parent else {
                return Ok(());
            };
            for sql in [
                "UPDATE checkpoints SET parent_id = ?1 WHERE parent_id = ?2",
                "UPDATE machines SET base_checkpoint = ?1 WHERE base_checkpoint = ?2",
            ] {
                tx.execute(sql, params![parent, id])
                    .map_err(db("removing checkpoint"))?;
            }
            tx.execute("DELETE FROM checkpoints WHERE id = ?", [&id])
                .map_err(db("removing checkpoint"))?;
            Ok(())
        })
        .await
    }

    /// Creates or replaces a secret.
    pub async fn put_secret(&self, secret: &SecretRecord) -> Result<()> {
        let s = secret.clone();
        let bindings = serde_json::to_string(&SecretBindings {
            allowed_hosts: s.allowed_hosts.clone(),
            allowed_in: s.allowed_in.clone(),
            inject: s.inject.clone(),
        })
        .expect("bindings serialize");
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO secrets (app, name, sealed, bindings_json, version, created_at_ms, updated_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (app, name) DO UPDATE SET sealed = excluded.sealed, \
                 bindings_json = excluded.bindings_json, version = excluded.version, \
                 updated_at_ms = excluded.updated_at_ms",
                params![
                    s.app,
                    s.name,
                    s.sealed,
                    bindings,
                    s.version,
                    s.created_at_ms,
                    s.updated_at_ms
                ],
            )
            .map_err(db(format!("writing secret {}", s.name)))?;
            Ok(())
        })
        .await
    }

    pub async fn get_secret(&self, app: &str, name: &str) -> Result<Option<SecretRecord>> {
        let (app, name) = (app.to_owned(), name.to_owned());
        self.call(move |conn| {
            conn.query_row(
                &format!("{SECRET_SELECT} WHERE app = ? AND name = ?"),
                [app, name],
                secret_from_row,
            )
            .optional()
            .map_err(db("reading secret"))
        })
        .await
    }

    pub async fn list_secrets(&self, app: &str) -> Result<Vec<SecretRecord>> {
        let app = app.to_owned();
        self.call(move |conn| {
            let mut stmt = conn
                .prepare(&format!("{SECRET_SELECT} WHERE app = ? ORDER BY name"))
                .map_err(db("listing secrets"))?;
            stmt.query_map([app], secret_from_row)
                .and_then(|rows| rows.collect())
                .map_err(db("listing secrets"))
        })
        .await
    }

    /// Whether there was such a secret.
    pub async fn delete_secret(&self, app: &str, name: &str) -> Result<bool> {
        let (app, name) = (app.to_owned(), name.to_owned());
        self.call(move |conn| {
            conn.execute("DELETE FROM secrets WHERE app = ? AND name = ?", [app, name])
                .map(|n| n > 0)
                .map_err(db("deleting secret"))
        })
        .await
    }

    pub async fn get_egress_policy(&self, app: &str) -> Result<Option<hangar_api::egress::EgressPolicy>> {
        let app = app.to_owned();
        let json: Option<String> = self
            .call(move |conn| {
                conn.query_row("SELECT policy_json FROM egress_policies WHERE app = ?", [app], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db("reading egress policy"))
            })
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(format!("egress policy: {e}"))))
            .transpose()
    }

    pub async fn put_egress_policy(
        &self,
        app: &str,
        policy: &hangar_api::egress::EgressPolicy,
        now_ms: i64,
    ) -> Result<()> {
        let (app, json) = (
            app.to_owned(),
            serde_json::to_string(policy).expect("policy serializes"),
        );
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO egress_policies (app, policy_json, updated_at_ms) VALUES (?, ?, ?) \
                 ON CONFLICT (app) DO UPDATE SET policy_json = excluded.policy_json, \
                 updated_at_ms = excluded.updated_at_ms",
                params![app, json, now_ms],
            )
            .map_err(db("writing egress policy"))?;
            Ok(())
        })
        .await
    }

    pub async fn insert_volume(&self, v: &VolumeRecord) -> Result<()> {
        let v = v.clone();
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO volumes (id, app, name, size_gb, attached_machine_id, created_at_ms, deleted_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    v.id,
                    v.app,
                    v.name,
                    v.size_gb as i64,
                    v.attached_machine_id,
                    v.created_at_ms,
                    v.deleted_at_ms
                ])
            })
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!(
                        "a volume named {:?} already exists in app {:?}: choose another name",
                        v.name, v.app
                    ))
                } else {
                    db(format!("creating volume {}", v.id))(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    /// Writes a volume's size, attachment and deletion.
    pub async fn update_volume(&self, v: &VolumeRecord) -> Result<()> {
        let v = v.clone();
        self.call(move |conn| {
            conn.prepare_cached(
                "UPDATE volumes SET size_gb = ?, attached_machine_id = ?, deleted_at_ms = ? WHERE id = ?",
            )
            .and_then(|mut s| s.execute(params![v.size_gb as i64, v.attached_machine_id, v.deleted_at_ms, v.id]))
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!(
                        "a volume named {:?} already exists in app {:?}: delete or rename it first",
                        v.name, v.app
                    ))
                } else {
                    db(format!("updating volume {}", v.id))(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    pub async fn get_volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        let id = id.to_owned();
        self.call(move |conn| query_volumes(conn, &format!("{VOLUME_SELECT} WHERE id = ?"), [id]).map(first))
            .await
    }

    /// The live (not deleted) volume named `name` in `app`.
    pub async fn get_volume_by_name(&self, app: &str, name: &str) -> Result<Option<VolumeRecord>> {
        let (app, name) = (app.to_owned(), name.to_owned());
        self.call(move |conn| {
            let sql = format!("{VOLUME_SELECT} WHERE app = ? AND name = ? AND deleted_at_ms IS NULL");
            query_volumes(conn, &sql, [app, name]).map(first)
        })
        .await
    }

    /// Volumes of one app, or of every app, oldest first.
    pub async fn list_volumes(&self, app: Option<&str>) -> Result<Vec<VolumeRecord>> {
        let app = app.map(str::to_owned);
        self.call(move |conn| match app {
            Some(app) => query_volumes(
                conn,
                &format!("{VOLUME_SELECT} WHERE app = ? ORDER BY created_at_ms, id"),
                [app],
            ),
            None => query_volumes(conn, &format!("{VOLUME_SELECT} ORDER BY created_at_ms, id"), []),
        })
        .await
    }

    /// Forgets a volume and its snapshots' records.
    pub async fn purge_volume(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.write("purging volume", move |tx| {
            for sql in [
                "DELETE FROM volume_snapshots WHERE volume_id = ?",
                "DELETE FROM volumes WHERE id = ?",
            ] {
                tx.execute(sql, [&id]).map_err(db("purging volume"))?;
            }
            Ok(())
        })
        .await
    }

    pub async fn insert_volume_snapshot(&self, s: &VolumeSnapshotRecord) -> Result<()> {
        let s = s.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO volume_snapshots (id, volume_id, created_at_ms) VALUES (?, ?, ?)",
                params![s.id, s.volume_id, s.created_at_ms],
            )
            .map_err(db("recording volume snapshot"))?;
            Ok(())
        })
        .await
    }

    pub async fn list_volume_snapshots(&self, volume_id: &str) -> Result<Vec<VolumeSnapshotRecord>> {
        let id = volume_id.to_owned();
        self.call(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, volume_id, created_at_ms FROM volume_snapshots WHERE volume_id = ? \
                     ORDER BY created_at_ms, id",
                )
                .map_err(db("listing volume snapshots"))?;
            let rows = statement
                .query_map([id], |r| {
                    Ok(VolumeSnapshotRecord {
                        id: r.get(0)?,
                        volume_id: r.get(1)?,
                        created_at_ms: r.get(2)?,
                    })
                })
                .map_err(db("listing volume snapshots"))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(db("listing volume snapshots"))
        })
        .await
    }

    pub async fn delete_volume_snapshot(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.execute("DELETE FROM volume_snapshots WHERE id = ?", [id])
                .map_err(db("removing volume snapshot"))?;
            Ok(())
        })
        .await
    }

    /// Every volume snapshot id (for recovery's sweep of the pool).
    pub async fn all_volume_snapshot_ids(&self) -> Result<Vec<String>> {
        self.call(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT id FROM volume_snapshots")
                .map_err(db("listing volume snapshots"))?;
            let rows = statement
                .query_map([], |r| r.get(0))
                .map_err(db("listing volume snapshots"))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(db("listing volume snapshots"))
        })
        .await
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let opening = || format!("opening {}", path.display());
    make_private(path).map_err(|e| StoreError::Io {
        context: format!("making {} readable by root only", path.display()),
        source: e,
    })?;
    let mut conn = Connection::open(path).map_err(db(opening()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(db(opening()))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         -- FULL: a commit survives power loss, not just a process crash.
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )
    .map_err(db(opening()))?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

/// The database holds machines' environments: only root may read it.
/// SQLite gives its WAL and shared-memory files the database's mode, so
/// creating the database 0600 covers them; older files are made so too.
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        reference: r.get(0)?,
        digest: r.get(1)?,
        image_json: r.get(2)?,
    })
}

fn list_apps(conn: &Connection) -> Result<Vec<AppRecord>> {
    let mut statement = conn
        .prepare_cached(
            "SELECT a.name, a.created_at_ms, \
               (SELECT COUNT(*) FROM machines m WHERE m.app = a.name AND m.state <> 'destroyed') \
             FROM apps a ORDER BY a.name",
        )
        .map_err(db("listing apps"))?;
    let rows = statement
        .query_map([], |r| {
            Ok(AppRecord {
                name: r.get(0)?,
                created_at_ms: r.get(1)?,
                machine_count: r.get::<_, i64>(2)? as u64,
            })
        })
        .map_err(db("listing apps"))?;
    rows.collect::<rusqlite::Result<_>>().map_err(db("reading app"))
}

/// A machine with its JSON columns already serialized, so the work is done
/// on the caller's thread rather than the store's.
struct MachineRow {
    record: MachineRecord,
    config_json: String,
    last_exit_json: Option<String>,
}

impl From<&MachineRecord> for MachineRow {
    fn from(m: &MachineRecord) -> MachineRow {
        MachineRow {
            record: m.clone(),
            config_json: serde_json::to_string(&m.config).expect("config serializes"),
            last_exit_json: m
                .last_exit
                .as_ref()
                .map(|e| serde_json::to_string(e).expect("exit serializes")),
        }
    }
}

const MACHINE_SELECT: &str = "SELECT id, app, name, state, config_json, image_reference, image_digest, instance_id, \
     host, created_at_ms, updated_at_ms, run_ms, started_at_ms, restart_count, last_exit_json, base_checkpoint \
     FROM machines";

const VOLUME_SELECT: &str =
    "SELECT id, app, name, size_gb, attached_machine_id, created_at_ms, deleted_at_ms FROM volumes";

fn query_volumes(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<VolumeRecord>> {
    let mut statement = conn.prepare_cached(sql).map_err(db("reading volumes"))?;
    let rows = statement
        .query_map(params, |r| {
            Ok(VolumeRecord {
                id: r.get(0)?,
                app: r.get(1)?,
                name: r.get(2)?,
                size_gb: r.get::<_, i64>(3)? as u64,
                attached_machine_id: r.get(4)?,
                created_at_ms: r.get(5)?,
                deleted_at_ms: r.get(6)?,
            })
        })
        .map_err(db("reading volumes"))?;
    rows.collect::<rusqlite::Result<_>>().map_err(db("reading volumes"))
}

const CHECKPOINT_SELECT: &str = "SELECT id, machine_id, comment, parent_id, created_at_ms, steps FROM checkpoints";

fn query_checkpoints(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<CheckpointRecord>> {
    let mut statement = conn.prepare_cached(sql).map_err(db("reading checkpoints"))?;
    let rows = statement
        .query_map(params, |r| {
            Ok(CheckpointRecord {
                id: r.get(0)?,
                machine_id: r.get(1)?,
                comment: r.get(2)?,
                parent_id: r.get(3)?,
                created_at_ms: r.get(4)?,
                steps: r.get::<_, i64>(5)? as u64,
            })
        })
        .map_err(db("reading checkpoints"))?;
    rows.collect::<rusqlite::Result<_>>().map_err(db("reading checkpoints"))
}

fn first<T>(items: Vec<T>) -> Option<T> {
    items.into_iter().next()
}

fn query_machines(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<MachineRecord>> {
    let mut statement = conn.prepare_cached(sql).map_err(db("reading machines"))?;
    let mut rows = statement.query(params).map_err(db("reading machines"))?;
    let mut machines = Vec::new();
    while let Some(row) = rows.next().map_err(db("reading machines"))? {
        machines.push(machine_from_row(row)?);
    }
    Ok(machines)
}

/// The most events kept per machine (the newest): a machine whose main
/// process exits and restarts in a loop must not grow the database without
/// end.
pub const MAX_EVENTS_PER_MACHINE: i64 = 1000;

fn insert_event(tx: &Transaction<'_>, machine_id: &str, e: &MachineEvent) -> Result<()> {
    let recording = || db(format!("recording event for machine {machine_id}"));
    tx.prepare_cached(
        "INSERT INTO events (machine_id, kind, status, source, timestamp_ms, detail_json) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .and_then(|mut s| {
        s.execute(params![
            machine_id,
            e.kind,
            e.status,
            e.source,
            e.timestamp,
            e.detail.as_ref().map(|d| d.to_string()),
        ])
    })
    .map_err(recording())?;
    // Pruned now and then, not on every insert (events are on the start
    // path): a machine holds at most 64 more than the cap. Counted per
    // machine, on the store's one thread.
    thread_local! {
        static SINCE_PRUNED: std::cell::RefCell<HashMap<String, u32>> = Default::default();
    }
    let due = SINCE_PRUNED.with_borrow_mut(|counts| {
        let n = counts.entry(machine_id.to_owned()).or_default();
        *n += 1;
        if *n < 64 {
            return false;
        }
        counts.remove(machine_id);
        true
    });
    if due {
        tx.prepare_cached(
            "DELETE FROM events WHERE machine_id = ?1 AND seq <= \
             (SELECT seq FROM events WHERE machine_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
        )
        .and_then(|mut s| s.execute(params![machine_id, MAX_EVENTS_PER_MACHINE]))
        .map_err(recording())?;
    }
    Ok(())
}

fn machine_from_row(r: &Row<'_>) -> Result<MachineRecord> {
    let get = |e| db("reading machine")(e);
    let id: String = r.get("id").map_err(get)?;
    let state: String = r.get("state").map_err(get)?;
    let config: String = r.get("config_json").map_err(get)?;
    let last_exit: Option<String> = r.get("last_exit_json").map_err(get)?;
    let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("machine {id} {what}: {e}"));
    Ok(MachineRecord {
        state: MachineState::from_str(&state).map_err(|e| corrupt("state", &e))?,
        config: serde_json::from_str(&config).map_err(|e| corrupt("config", &e))?,
        last_exit: last_exit
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| corrupt("last exit", &e))?,
        app: r.get("app").map_err(get)?,
        name: r.get("name").map_err(get)?,
        image_reference: r.get("image_reference").map_err(get)?,
        image_digest: r.get("image_digest").map_err(get)?,
        instance_id: r.get("instance_id").map_err(get)?,
        host: r.get("host").map_err(get)?,
        created_at_ms: r.get("created_at_ms").map_err(get)?,
        updated_at_ms: r.get("updated_at_ms").map_err(get)?,
        run_ms: r.get("run_ms").map_err(get)?,
        started_at_ms: r.get("started_at_ms").map_err(get)?,
        restart_count: r.get("restart_count").map_err(get)?,
        base_checkpoint: r.get("base_checkpoint").map_err(get)?,
        id,
    })
}

#[cfg(test)]
mod tests;
