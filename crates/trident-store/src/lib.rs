//! trident's durable state in embedded SQLite (WAL mode, synchronous writes): what the API
//! acknowledges is on disk before the answer leaves.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};
use trident_core::model::{EnvironmentId, ExecutionEnvironment};
use trident_core::store::{anyhow_like, EnvironmentStore};

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &["CREATE TABLE environments (
        id INTEGER PRIMARY KEY,
        definition TEXT NOT NULL
    )"];

impl SqliteStore {
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk when it returns, even across a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
        })
    }
}

impl EnvironmentStore for SqliteStore {
    fn load_environments(&self) -> anyhow_like::Result<Vec<ExecutionEnvironment>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare("SELECT definition FROM environments ORDER BY id")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(|e| e.to_string())?;
        let mut envs = Vec::new();
        for row in rows {
            let json = row.map_err(|e| e.to_string())?;
            envs.push(serde_json::from_str(&json).map_err(|e| e.to_string())?);
        }
        Ok(envs)
    }

    fn save_environment(&self, env: &ExecutionEnvironment) -> anyhow_like::Result<()> {
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

    fn delete_environment(&self, id: EnvironmentId) -> anyhow_like::Result<()> {
        self.conn
            .lock()
            .unwrap()
            .execute("DELETE FROM environments WHERE id = ?1", params![id as i64])
            .map(|_| ())
            .map_err(|e| e.to_string())
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
}
