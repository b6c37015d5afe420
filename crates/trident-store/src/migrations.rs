//! Schema migrations, applied in order; `PRAGMA user_version` records how many ran. A
//! database written by a newer trident is refused, never touched.

use std::path::Path;

use rusqlite::{params, Connection};

use crate::rows::{SpecRow, StateRow};

enum Migration {
    Sql(&'static str),
    Rust(fn(&rusqlite::Transaction) -> anyhow::Result<()>),
}

const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
        "CREATE TABLE environments (
            id INTEGER PRIMARY KEY,
            definition TEXT NOT NULL
        )",
    ),
    Migration::Sql(
        "CREATE TABLE runners (
            id TEXT PRIMARY KEY,
            record TEXT NOT NULL
        )",
    ),
    Migration::Sql(
        "CREATE TABLE ci_agents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            token_hash TEXT NOT NULL UNIQUE,
            record TEXT NOT NULL
        )",
    ),
    Migration::Sql(
        "CREATE TABLE ci_jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            record TEXT NOT NULL
        )",
    ),
    // Each job's spec apart from its state, so that progress never rewrites the spec (its
    // files, base64); jobs of earlier versions are split as they are.
    Migration::Rust(split_jobs),
];

fn split_jobs(tx: &rusqlite::Transaction) -> anyhow::Result<()> {
    tx.execute_batch(
        "CREATE TABLE ci_job_specs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at INTEGER NOT NULL,
            spec TEXT NOT NULL
        );
        CREATE TABLE ci_job_states (
            id INTEGER PRIMARY KEY REFERENCES ci_job_specs(id),
            state TEXT NOT NULL
        );",
    )?;
    let old: Vec<(i64, String)> = {
        let mut stmt = tx.prepare("SELECT id, record FROM ci_jobs ORDER BY id")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for (id, record) in old {
        // The old record held spec and state in one flat object, under the names the new
        // rows read.
        let value: serde_json::Value = serde_json::from_str(&record)?;
        let created_at = value["createdAt"].as_u64().unwrap_or(0);
        let spec: SpecRow = serde_json::from_value(value.clone())?;
        let state: StateRow = serde_json::from_value(value)?;
        tx.execute(
            "INSERT INTO ci_job_specs (id, created_at, spec) VALUES (?1, ?2, ?3)",
            params![id, created_at as i64, serde_json::to_string(&spec)?],
        )?;
        tx.execute(
            "INSERT INTO ci_job_states (id, state) VALUES (?1, ?2)",
            params![id, serde_json::to_string(&state)?],
        )?;
    }
    tx.execute_batch("DROP TABLE ci_jobs")?;
    Ok(())
}

pub fn apply(conn: &mut Connection, path: &Path) -> anyhow::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        anyhow::bail!(
            "{} was written by a newer trident (schema {version}); refusing to touch it",
            path.display()
        );
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        match migration {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Rust(run) => run(&tx)?,
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// How many migrations there are (the schema version of this trident).
#[cfg(test)]
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();
