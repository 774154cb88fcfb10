//! Hangar's durable state. Every change a caller makes here is committed
//! (SQLite WAL with `synchronous=FULL`) before the call returns, so the daemon
//! can acknowledge an API request only after its effect is on disk.
//!
//! The SQL is kept portable (no SQLite-only syntax beyond the pragmas in
//! [`Store::open`]) so a Postgres/CockroachDB backend can take the same
//! statements later.

mod schema;

use std::path::Path;
use std::str::FromStr;

use hangar_api::{MachineConfig, MachineEvent, MachineState};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

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
        source: sqlx::Error,
    },
    #[error("state database holds a corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Database { context, source }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
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
}

/// The state store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    pub async fn open(path: &Path) -> Result<Store> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit survives power loss, not just a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            // One connection: SQLite has one writer anyway, and this keeps
            // read-your-writes trivially true across tasks.
            .max_connections(1)
            // The one connection is ours alone and local: a ping before every
            // use would only add a round trip to each statement.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(db(format!("opening {}", path.display())))?;
        schema::migrate(&pool).await?;
        Ok(Store { pool })
    }

    pub async fn create_app(&self, name: &str, now_ms: i64) -> Result<()> {
        sqlx::query("INSERT INTO apps (name, created_at_ms) VALUES (?, ?)")
            .bind(name)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("app {name:?} already exists"))
                } else {
                    db(format!("creating app {name}"))(e)
                }
            })?;
        Ok(())
    }

    pub async fn list_apps(&self) -> Result<Vec<AppRecord>> {
        let rows = sqlx::query(
            "SELECT a.name, a.created_at_ms, \
               (SELECT COUNT(*) FROM machines m WHERE m.app = a.name AND m.state <> 'destroyed') AS n \
             FROM apps a ORDER BY a.name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing apps"))?;
        rows.iter()
            .map(|r| {
                Ok(AppRecord {
                    name: r.try_get("name").map_err(db("reading app"))?,
                    created_at_ms: r.try_get("created_at_ms").map_err(db("reading app"))?,
                    machine_count: r.try_get::<i64, _>("n").map_err(db("reading app"))? as u64,
                })
            })
            .collect()
    }

    pub async fn get_app(&self, name: &str) -> Result<Option<AppRecord>> {
        Ok(self.list_apps().await?.into_iter().find(|a| a.name == name))
    }

    /// Deletes an app that has no machines left (destroyed ones excepted).
    pub async fn delete_app(&self, name: &str) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("deleting app"))?;
        let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM machines WHERE app = ? AND state <> 'destroyed'")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("deleting app"))?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "app {name:?} still has {live} machine(s): destroy them first"
            )));
        }
        for sql in [
            "DELETE FROM events WHERE machine_id IN (SELECT id FROM machines WHERE app = ?)",
            "DELETE FROM machines WHERE app = ?",
        ] {
            sqlx::query(sql)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(db("deleting app"))?;
        }
        let done = sqlx::query("DELETE FROM apps WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db("deleting app"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("app {name:?} not found")));
        }
        tx.commit().await.map_err(db("deleting app"))?;
        Ok(())
    }

    pub async fn put_image(&self, image: &ImageRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO images (reference, digest, image_json) VALUES (?, ?, ?) \
             ON CONFLICT (reference) DO UPDATE SET digest = excluded.digest, image_json = excluded.image_json",
        )
        .bind(&image.reference)
        .bind(&image.digest)
        .bind(&image.image_json)
        .execute(&self.pool)
        .await
        .map_err(db(format!("recording image {}", image.reference)))?;
        Ok(())
    }

    /// The image with this manifest digest (any reference naming it).
    pub async fn get_image_by_digest(&self, digest: &str) -> Result<Option<ImageRecord>> {
        let row = sqlx::query("SELECT reference, digest, image_json FROM images WHERE digest = ? LIMIT 1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading image"))?;
        row.map(|r| {
            Ok(ImageRecord {
                reference: r.try_get("reference").map_err(db("reading image"))?,
                digest: r.try_get("digest").map_err(db("reading image"))?,
                image_json: r.try_get("image_json").map_err(db("reading image"))?,
            })
        })
        .transpose()
    }

    /// Inserts a new machine with its first event, atomically.
    pub async fn insert_machine(&self, m: &MachineRecord, event: &MachineEvent) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("creating machine"))?;
        let config = serde_json::to_string(&m.config).expect("config serializes");
        sqlx::query(
            "INSERT INTO machines (id, app, name, state, config_json, image_reference, image_digest, \
               instance_id, host, created_at_ms, updated_at_ms, run_ms, started_at_ms, restart_count, last_exit_json) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&m.id)
        .bind(&m.app)
        .bind(&m.name)
        .bind(m.state.as_str())
        .bind(config)
        .bind(&m.image_reference)
        .bind(&m.image_digest)
        .bind(&m.instance_id)
        .bind(&m.host)
        .bind(m.created_at_ms)
        .bind(m.updated_at_ms)
        .bind(m.run_ms)
        .bind(m.started_at_ms)
        .bind(m.restart_count as i64)
        .bind(
            m.last_exit
                .as_ref()
                .map(|e| serde_json::to_string(e).expect("serializes")),
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!(
                    "a machine named {:?} already exists in app {:?}: choose another name or destroy it",
                    m.name, m.app
                ))
            } else {
                db(format!("creating machine {}", m.id))(e)
            }
        })?;
        insert_event(&mut tx, &m.id, event).await?;
        tx.commit().await.map_err(db("creating machine"))?;
        Ok(())
    }

    /// Writes the machine's new state (and everything else that changed)
    /// together with the event that explains it, atomically.
    pub async fn update_machine(&self, m: &MachineRecord, event: Option<&MachineEvent>) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("updating machine"))?;
        let config = serde_json::to_string(&m.config).expect("config serializes");
        let done = sqlx::query(
            "UPDATE machines SET state = ?, config_json = ?, instance_id = ?, updated_at_ms = ?, \
               run_ms = ?, started_at_ms = ?, restart_count = ?, last_exit_json = ? WHERE id = ?",
        )
        .bind(m.state.as_str())
        .bind(config)
        .bind(&m.instance_id)
        .bind(m.updated_at_ms)
        .bind(m.run_ms)
        .bind(m.started_at_ms)
        .bind(m.restart_count as i64)
        .bind(
            m.last_exit
                .as_ref()
                .map(|e| serde_json::to_string(e).expect("serializes")),
        )
        .bind(&m.id)
        .execute(&mut *tx)
        .await
        .map_err(db(format!("updating machine {}", m.id)))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("machine {} not found", m.id)));
        }
        if let Some(event) = event {
            insert_event(&mut tx, &m.id, event).await?;
        }
        tx.commit().await.map_err(db("updating machine"))?;
        Ok(())
    }

    /// Forgets a machine entirely (used to undo a create that never finished).
    pub async fn purge_machine(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("purging machine"))?;
        for sql in [
            "DELETE FROM events WHERE machine_id = ?",
            "DELETE FROM machines WHERE id = ?",
        ] {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db("purging machine"))?;
        }
        tx.commit().await.map_err(db("purging machine"))?;
        Ok(())
    }

    pub async fn get_machine(&self, id: &str) -> Result<Option<MachineRecord>> {
        let row = sqlx::query(MACHINE_SELECT_BY_ID)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading machine"))?;
        row.as_ref().map(machine_from_row).transpose()
    }

    /// The living (not destroyed) machine named `name` in `app`.
    pub async fn get_machine_by_name(&self, app: &str, name: &str) -> Result<Option<MachineRecord>> {
        let row = sqlx::query(MACHINE_SELECT_LIVE_BY_NAME)
            .bind(app)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading machine"))?;
        row.as_ref().map(machine_from_row).transpose()
    }

    /// Machines of one app (or of all apps), oldest first.
    pub async fn list_machines(&self, app: Option<&str>) -> Result<Vec<MachineRecord>> {
        let rows = match app {
            Some(app) => sqlx::query(MACHINE_SELECT_BY_APP).bind(app).fetch_all(&self.pool).await,
            None => sqlx::query(MACHINE_SELECT_ALL).fetch_all(&self.pool).await,
        }
        .map_err(db("listing machines"))?;
        rows.iter().map(machine_from_row).collect()
    }

    pub async fn list_events(&self, machine_id: &str) -> Result<Vec<MachineEvent>> {
        let rows = sqlx::query(
            "SELECT kind, status, source, timestamp_ms, detail_json FROM events WHERE machine_id = ? ORDER BY seq",
        )
        .bind(machine_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing events"))?;
        rows.iter()
            .map(|r| {
                let detail: Option<String> = r.try_get("detail_json").map_err(db("reading event"))?;
                Ok(MachineEvent {
                    kind: r.try_get("kind").map_err(db("reading event"))?,
                    status: r.try_get("status").map_err(db("reading event"))?,
                    source: r.try_get("source").map_err(db("reading event"))?,
                    timestamp: r.try_get("timestamp_ms").map_err(db("reading event"))?,
                    detail: detail
                        .map(|d| serde_json::from_str(&d))
                        .transpose()
                        .map_err(|e| StoreError::Corrupt(format!("event detail: {e}")))?,
                })
            })
            .collect()
    }

    /// Appends an event without changing the machine.
    pub async fn add_event(&self, machine_id: &str, event: &MachineEvent) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("recording event"))?;
        insert_event(&mut tx, machine_id, event).await?;
        tx.commit().await.map_err(db("recording event"))?;
        Ok(())
    }

    /// A small key/value table for daemon-wide facts (e.g. the host id).
    pub async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading setting"))
    }

    pub async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(db("writing setting"))?;
        Ok(())
    }
}

const MACHINE_SELECT_BY_ID: &str = "SELECT id, app, name, state, config_json, image_reference, image_digest, instance_id, host, \
     created_at_ms, updated_at_ms, run_ms, started_at_ms, restart_count, last_exit_json FROM machines WHERE id = ?";
const MACHINE_SELECT_LIVE_BY_NAME: &str = "SELECT id, app, name, state, config_json, image_reference, image_digest, instance_id, host, \
     created_at_ms, updated_at_ms, run_ms, started_at_ms, restart_count, last_exit_json FROM machines \
     WHERE app = ? AND name = ? AND state <> 'destroyed'";
const MACHINE_SELECT_BY_APP: &str = "SELECT id, app, name, state, config_json, image_reference, image_digest, instance_id, host, \
     created_at_ms, updated_at_ms, run_ms, started_at_ms, restart_count, last_exit_json FROM machines WHERE app = ? ORDER BY created_at_ms, id";
const MACHINE_SELECT_ALL: &str = "SELECT id, app, name, state, config_json, image_reference, image_digest, instance_id, host, \
     created_at_ms, updated_at_ms, run_ms, started_at_ms, restart_count, last_exit_json FROM machines ORDER BY created_at_ms, id";

async fn insert_event(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, machine_id: &str, e: &MachineEvent) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (machine_id, kind, status, source, timestamp_ms, detail_json) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(machine_id)
    .bind(&e.kind)
    .bind(&e.status)
    .bind(&e.source)
    .bind(e.timestamp)
    .bind(e.detail.as_ref().map(|d| d.to_string()))
    .execute(&mut **tx)
    .await
    .map_err(db(format!("recording event for machine {machine_id}")))?;
    Ok(())
}

fn machine_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<MachineRecord> {
    let get = |e| db("reading machine")(e);
    let id: String = r.try_get("id").map_err(get)?;
    let state: String = r.try_get("state").map_err(get)?;
    let config: String = r.try_get("config_json").map_err(get)?;
    let last_exit: Option<String> = r.try_get("last_exit_json").map_err(get)?;
    let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("machine {id} {what}: {e}"));
    Ok(MachineRecord {
        state: MachineState::from_str(&state).map_err(|e| corrupt("state", &e))?,
        config: serde_json::from_str(&config).map_err(|e| corrupt("config", &e))?,
        last_exit: last_exit
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| corrupt("last exit", &e))?,
        app: r.try_get("app").map_err(get)?,
        name: r.try_get("name").map_err(get)?,
        image_reference: r.try_get("image_reference").map_err(get)?,
        image_digest: r.try_get("image_digest").map_err(get)?,
        instance_id: r.try_get("instance_id").map_err(get)?,
        host: r.try_get("host").map_err(get)?,
        created_at_ms: r.try_get("created_at_ms").map_err(get)?,
        updated_at_ms: r.try_get("updated_at_ms").map_err(get)?,
        run_ms: r.try_get("run_ms").map_err(get)?,
        started_at_ms: r.try_get("started_at_ms").map_err(get)?,
        restart_count: r.try_get::<i64, _>("restart_count").map_err(get)? as u32,
        id,
    })
}

#[cfg(test)]
mod tests;
