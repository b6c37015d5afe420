//! trident's durable state in embedded SQLite (WAL mode).
//!
//! Two connections to one file, for two kinds of durability: what the API acknowledges
//! (environments, agents, jobs submitted, assigned and finished) is written with
//! `synchronous=FULL` (it survives a power cut); runner records and a running job's progress
//! (trace size, heartbeats) with `synchronous=NORMAL` (they survive a crash of the process,
//! which is all they need: a power cut takes the runners with it, and an agent resends a
//! trace from the size it is told), so that claims and trace pieces do not wait for fsync.
//!
//! **This crate knows no HTTP**; its row types (`rows.rs`) are its own, converted to and
//! from the domain types of `trident-core` and `trident-jobs`.

#![forbid(unsafe_code)]

mod migrations;
mod rows;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use trident_core::model::{EnvironmentId, ExecutionEnvironment};
use trident_core::store::{RunnerRecord, Store, StoreError, StoreResult};
use trident_jobs::jobs::{Job, JobSpec, JobState};
use trident_jobs::{AgentStore, JobStore, RegisteredAgent};

use rows::{AgentRow, EnvironmentRow, RunnerRow, SpecRow, StateRow};

pub struct SqliteStore {
    /// Acknowledged state: synchronous=FULL.
    durable: Mutex<Connection>,
    /// Runner records and job progress: synchronous=NORMAL.
    fast: Mutex<Connection>,
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::unavailable(e)
}

fn json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

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
        let mut conn = open_connection(path, "FULL")?;
        migrations::apply(&mut conn, path)?;
        Ok(SqliteStore {
            durable: Mutex::new(conn),
            fast: Mutex::new(open_connection(path, "NORMAL")?),
        })
    }

    fn durable(&self) -> MutexGuard<'_, Connection> {
        self.durable.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fast(&self) -> MutexGuard<'_, Connection> {
        self.fast.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Rows of one JSON text column, decoded into `Row`, then converted.
fn load<Row: serde::de::DeserializeOwned, T: From<Row>>(
    conn: &Connection,
    sql: &str,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare(sql).map_err(db)?;
    let rows = stmt
        .query_map([], |row| row.get::<_, String>(0))
        .map_err(db)?;
    rows.map(|row| parse::<Row>(&row.map_err(db)?).map(T::from))
        .collect()
}

impl Store for SqliteStore {
    fn load_environments(&self) -> StoreResult<Vec<ExecutionEnvironment>> {
        load::<EnvironmentRow, _>(
            &self.durable(),
            "SELECT definition FROM environments ORDER BY id",
        )
    }

    fn save_environment(&self, env: &ExecutionEnvironment) -> StoreResult<()> {
        let row = json(&EnvironmentRow::from(env))?;
        self.durable()
            .execute(
                "INSERT INTO environments (id, definition) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET definition = excluded.definition",
                params![env.id as i64, row],
            )
            .map(drop)
            .map_err(db)
    }

    fn delete_environment(&self, id: EnvironmentId) -> StoreResult<()> {
        self.durable()
            .execute("DELETE FROM environments WHERE id = ?1", params![id as i64])
            .map(drop)
            .map_err(db)
    }

    fn load_runners(&self) -> StoreResult<Vec<RunnerRecord>> {
        load::<RunnerRow, _>(&self.fast(), "SELECT record FROM runners ORDER BY id")
    }

    fn save_runner(&self, runner: &RunnerRecord) -> StoreResult<()> {
        let row = json(&RunnerRow::from(runner))?;
        self.fast()
            .execute(
                "INSERT INTO runners (id, record) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                params![runner.id, row],
            )
            .map(drop)
            .map_err(db)
    }

    fn delete_runner(&self, id: &str) -> StoreResult<()> {
        self.fast()
            .execute("DELETE FROM runners WHERE id = ?1", params![id])
            .map(drop)
            .map_err(db)
    }
}

/// Registered agents of the GitLab Runner API (synchronous=FULL: a registration the agent
/// was told about must not be lost).
impl AgentStore for SqliteStore {
    fn insert_agent(&self, agent: &RegisteredAgent) -> StoreResult<i64> {
        let conn = self.durable();
        conn.execute(
            "INSERT INTO ci_agents (token_hash, record) VALUES (?1, ?2)",
            params![agent.token_hash, json(&AgentRow::from(agent))?],
        )
        .map_err(db)?;
        Ok(conn.last_insert_rowid())
    }

    fn agent_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<RegisteredAgent>> {
        let found: Option<(i64, String)> = self
            .durable()
            .query_row(
                "SELECT id, record FROM ci_agents WHERE token_hash = ?1",
                params![token_hash],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        found
            .map(|(id, row)| Ok(parse::<AgentRow>(&row)?.into_agent(id)))
            .transpose()
    }

    fn update_agent(&self, agent: &RegisteredAgent) -> StoreResult<()> {
        self.durable()
            .execute(
                "UPDATE ci_agents SET token_hash = ?1, record = ?2 WHERE id = ?3",
                params![agent.token_hash, json(&AgentRow::from(agent))?, agent.id],
            )
            .map(drop)
            .map_err(db)
    }

    fn delete_agent(&self, id: i64) -> StoreResult<()> {
        self.durable()
            .execute("DELETE FROM ci_agents WHERE id = ?1", params![id])
            .map(drop)
            .map_err(db)
    }
}

/// Jobs: the spec in one table (written once), the state in another (a small row, written
/// as the job goes on).
impl JobStore for SqliteStore {
    fn insert_job(&self, created_at: u64, spec: &JobSpec, state: &JobState) -> StoreResult<i64> {
        let mut conn = self.durable();
        let tx = conn.transaction().map_err(db)?;
        tx.execute(
            "INSERT INTO ci_job_specs (created_at, spec) VALUES (?1, ?2)",
            params![created_at as i64, json(&SpecRow::from(spec))?],
        )
        .map_err(db)?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO ci_job_states (id, state) VALUES (?1, ?2)",
            params![id, json(&StateRow::from(state))?],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(id)
    }

    fn save_state(&self, id: i64, state: &JobState, durable: bool) -> StoreResult<()> {
        let conn = if durable { self.durable() } else { self.fast() };
        conn.execute(
            "UPDATE ci_job_states SET state = ?1 WHERE id = ?2",
            params![json(&StateRow::from(state))?, id],
        )
        .map(drop)
        .map_err(db)
    }

    fn load_jobs(&self) -> StoreResult<Vec<Job>> {
        let conn = self.durable();
        let mut stmt = conn
            .prepare(
                "SELECT s.id, s.created_at, s.spec, t.state
                 FROM ci_job_specs s JOIN ci_job_states t ON t.id = s.id ORDER BY s.id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(db)?;
        rows.map(|row| {
            let (id, created_at, spec, state) = row.map_err(db)?;
            rows::job(id, created_at as u64, parse(&spec)?, parse(&state)?)
        })
        .collect()
    }
}

#[cfg(test)]
mod tests;
