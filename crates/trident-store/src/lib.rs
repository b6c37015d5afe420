//! trident's durable state in embedded SQLite (WAL mode).
//!
//! Two connections to one file, for two kinds of durability: environments are written with
//! `synchronous=FULL` (an acknowledged PUT survives a power cut); runner records with
//! `synchronous=NORMAL` (they survive a crash of the process, which is all they need: a
//! power cut takes the runners themselves with it), so that claims do not wait for fsync.

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};
use trident_core::model::{EnvironmentId, ExecutionEnvironment};
use trident_core::store::{RunnerRecord, Store, StoreResult};
use trident_gitlab::jobs::Job;
use trident_gitlab::{AgentStore, JobStore, RegisteredAgent};

pub struct SqliteStore {
    /// Environments: synchronous=FULL.
    conn: Mutex<Connection>,
    /// Runner records: synchronous=NORMAL.
    runners: Mutex<Connection>,
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE environments (
        id INTEGER PRIMARY KEY,
        definition TEXT NOT NULL
    )",
    "CREATE TABLE runners (
        id TEXT PRIMARY KEY,
        record TEXT NOT NULL
    )",
    "CREATE TABLE ci_agents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        token_hash TEXT NOT NULL UNIQUE,
        record TEXT NOT NULL
    )",
    "CREATE TABLE ci_jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        record TEXT NOT NULL
    )",
];

fn open_connection(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        // FULL: a commit is on disk when it returns, even across a power cut.
        let conn = open_connection(path, "FULL")?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > MIGRATIONS.len() {
            anyhow::bail!(
                "{} was written by a newer trident (schema {version}); refusing to touch it",
                path.display()
            );
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.execute_batch(migration)?;
            conn.pragma_update(None, "user_version", i + 1)?;
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            runners: Mutex::new(open_connection(path, "NORMAL")?),
        })
    }
}

/// Rows of one JSON text column, decoded.
fn load_json<T: serde::de::DeserializeOwned>(conn: &Connection, sql: &str) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare(sql).map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |row| row.get::<_, String>(0))
        .map_err(|e| e.to_string())?;
    rows.map(|row| {
        let json = row.map_err(|e| e.to_string())?;
        serde_json::from_str(&json).map_err(|e| e.to_string())
    })
    .collect()
}

impl Store for SqliteStore {
    fn load_environments(&self) -> StoreResult<Vec<ExecutionEnvironment>> {
        load_json(
            &self.conn.lock().unwrap(),
            "SELECT definition FROM environments ORDER BY id",
        )
    }

    fn save_environment(&self, env: &ExecutionEnvironment) -> StoreResult<()> {
        let json = serde_json::to_string(env).map_err(|e| e.to_string())?;
        self.conn
            .lock()
            .unwrap()
            .execute(
                "INSERT INTO environments (id, definition) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET definition = excluded.definition",
                params![env.id as i64, json],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn delete_environment(&self, id: EnvironmentId) -> StoreResult<()> {
        self.conn
            .lock()
            .unwrap()
            .execute("DELETE FROM environments WHERE id = ?1", params![id as i64])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn load_runners(&self) -> StoreResult<Vec<RunnerRecord>> {
        load_json(
            &self.runners.lock().unwrap(),
            "SELECT record FROM runners ORDER BY id",
        )
    }

    fn save_runner(&self, runner: &RunnerRecord) -> StoreResult<()> {
        let json = serde_json::to_string(runner).map_err(|e| e.to_string())?;
        self.runners
            .lock()
            .unwrap()
            .execute(
                "INSERT INTO runners (id, record) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                params![runner.id, json],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn delete_runner(&self, id: &str) -> StoreResult<()> {
        self.runners
            .lock()
            .unwrap()
            .execute("DELETE FROM runners WHERE id = ?1", params![id])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Registered runner agents of the GitLab Runner API (synchronous=FULL: a registration
/// the agent was told about must not be lost).
impl AgentStore for SqliteStore {
    fn insert_agent(&self, runner: &RegisteredAgent) -> StoreResult<i64> {
        let conn = self.conn.lock().unwrap();
        let json = serde_json::to_string(runner).map_err(|e| e.to_string())?;
        conn.execute(
            "INSERT INTO ci_agents (token_hash, record) VALUES (?1, ?2)",
            params![runner.token_hash, json],
        )
        .map_err(|e| e.to_string())?;
        Ok(conn.last_insert_rowid())
    }

    fn agent_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<RegisteredAgent>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare("SELECT id, record FROM ci_agents WHERE token_hash = ?1")
            .map_err(|e| e.to_string())?;
        let mut rows = stmt
            .query_map(params![token_hash], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(|e| e.to_string())?;
        match rows.next() {
            None => Ok(None),
            Some(row) => {
                let (id, json) = row.map_err(|e| e.to_string())?;
                let runner: RegisteredAgent =
                    serde_json::from_str(&json).map_err(|e| e.to_string())?;
                Ok(Some(RegisteredAgent { id, ..runner }))
            }
        }
    }

    fn update_agent(&self, runner: &RegisteredAgent) -> StoreResult<()> {
        let json = serde_json::to_string(runner).map_err(|e| e.to_string())?;
        self.conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE ci_agents SET token_hash = ?1, record = ?2 WHERE id = ?3",
                params![runner.token_hash, json, runner.id],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn delete_agent(&self, id: i64) -> StoreResult<()> {
        self.conn
            .lock()
            .unwrap()
            .execute("DELETE FROM ci_agents WHERE id = ?1", params![id])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Jobs of the jobs API (synchronous=FULL: an acknowledged job is never lost).
impl JobStore for SqliteStore {
    fn insert_job(&self, job: &Job) -> StoreResult<i64> {
        let conn = self.conn.lock().unwrap();
        let json = serde_json::to_string(job).map_err(|e| e.to_string())?;
        conn.execute("INSERT INTO ci_jobs (record) VALUES (?1)", params![json])
            .map_err(|e| e.to_string())?;
        Ok(conn.last_insert_rowid())
    }

    fn update_job(&self, job: &Job) -> StoreResult<()> {
        let json = serde_json::to_string(job).map_err(|e| e.to_string())?;
        self.conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE ci_jobs SET record = ?1 WHERE id = ?2",
                params![json, job.id],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn load_jobs(&self) -> StoreResult<Vec<Job>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare("SELECT id, record FROM ci_jobs ORDER BY id")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(|e| e.to_string())?;
        rows.map(|row| {
            let (id, json) = row.map_err(|e| e.to_string())?;
            let job: Job = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            Ok(Job { id, ..job })
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: u64, pool: u32) -> ExecutionEnvironment {
        ExecutionEnvironment {
            id,
            image: "host".into(),
            prewarming_pool_size: pool,
            cpu_limit: 20,
            memory_limit: 256,
            network_access: false,
            exposed_ports: vec![80],
        }
    }

    #[test]
    fn environments_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.save_environment(&env(1, 3)).unwrap();
            store.save_environment(&env(2, 0)).unwrap();
            store.save_environment(&env(1, 5)).unwrap();
            store.delete_environment(2).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.load_environments().unwrap(), vec![env(1, 5)]);
    }

    #[test]
    fn runner_records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.db");
        let record = |id: &str, used: bool| RunnerRecord {
            id: id.into(),
            environment: env(1, 2),
            used,
            inactivity_timeout: 60,
        };
        {
            let store = SqliteStore::open(&path).unwrap();
            store.save_runner(&record("1-a", false)).unwrap();
            store.save_runner(&record("1-b", false)).unwrap();
            store.save_runner(&record("1-a", true)).unwrap();
            store.delete_runner("1-b").unwrap();
            store.delete_runner("never-there").unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.load_runners().unwrap(), vec![record("1-a", true)]);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.db");
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = SqliteStore::open(&path).err().expect("refused");
        assert!(err.to_string().contains("newer trident"), "{err}");
    }
}
