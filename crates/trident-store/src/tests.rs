//! The store against real SQLite files: what is written is read back after reopening,
//! migrations keep the data of earlier versions, and newer schemas are refused.

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

fn job_spec(name: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        script: vec!["true".into()],
        timeout: 600,
        files: vec![trident_jobs::jobs::JobFile {
            path: "a.txt".into(),
            content_base64: "aGk=".into(),
        }],
        ..JobSpec::default()
    }
}

#[test]
fn jobs_keep_spec_and_state_apart_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trident.db");
    let id = {
        let store = SqliteStore::open(&path).unwrap();
        let id = store
            .insert_job(1000, &job_spec("first"), &JobState::default())
            .unwrap();
        let running = JobState {
            status: trident_jobs::jobs::JobStatus::Running,
            trace_size: 42,
            token_hash: Some("hash".into()),
            ..JobState::default()
        };
        store.save_state(id, &running, false).unwrap();
        id
    };
    let store = SqliteStore::open(&path).unwrap();
    let jobs = store.load_jobs().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, id);
    assert_eq!(jobs[0].created_at, 1000);
    assert_eq!(*jobs[0].spec, job_spec("first"));
    assert_eq!(jobs[0].state.trace_size, 42);
    assert_eq!(jobs[0].state.token_hash.as_deref(), Some("hash"));
}

#[test]
fn jobs_of_the_single_row_schema_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trident.db");
    {
        // A database as the version before the split left it (schema 4).
        let conn = Connection::open(&path).unwrap();
        for sql in [
            "CREATE TABLE environments (id INTEGER PRIMARY KEY, definition TEXT NOT NULL)",
            "CREATE TABLE runners (id TEXT PRIMARY KEY, record TEXT NOT NULL)",
            "CREATE TABLE ci_agents (id INTEGER PRIMARY KEY AUTOINCREMENT, token_hash TEXT NOT NULL UNIQUE, record TEXT NOT NULL)",
            "CREATE TABLE ci_jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL)",
        ] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute(
            "INSERT INTO ci_jobs (id, record) VALUES (7, ?1)",
            params![r#"{"id":0,"name":"old","image":null,"executionEnvironmentId":3,
                "script":["echo hi"],"afterScript":[],"variables":{"A":"b"},"tags":["x"],
                "timeout":900,"files":[{"path":"f","content":"eA=="}],
                "artifacts":{"paths":["out"],"when":"always","expireIn":"1 day"},
                "dependencies":[],"status":"success","exitCode":0,"failureReason":null,
                "agentId":2,"createdAt":1700000000,"startedAt":1700000001,
                "finishedAt":1700000005,"traceSize":12,"traceCrc":99,
                "uploadedArtifacts":{"archive":{"filename":"a.zip","format":"zip","size":5,"expireAt":null}},
                "lastSeen":1700000005}"#],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 4).unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let jobs = store.load_jobs().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];
    assert_eq!(job.id, 7);
    assert_eq!(job.created_at, 1_700_000_000);
    assert_eq!(job.spec.name, "old");
    assert_eq!(job.spec.execution_environment_id, Some(3));
    assert_eq!(job.spec.variables["A"].value, "b");
    assert_eq!(job.spec.files[0].content_base64, "eA==");
    let artifacts = job.spec.artifacts.as_ref().unwrap();
    assert_eq!(artifacts.when, trident_jobs::jobs::ArtifactsWhen::Always);
    assert_eq!(artifacts.expire_in.as_deref(), Some("1 day"));
    assert_eq!(job.state.status, trident_jobs::jobs::JobStatus::Success);
    assert_eq!(job.state.trace_size, 12);
    assert_eq!(job.state.trace_crc, Some(99));
    assert_eq!(job.state.agent_id, Some(2));
    assert_eq!(job.state.uploaded_artifacts["archive"].size, 5);
    assert_eq!(job.timeout(), 900);
    // New jobs continue the ids.
    let next = store
        .insert_job(1, &job_spec("new"), &JobState::default())
        .unwrap();
    assert_eq!(next, 8);
    let version: usize = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, migrations::SCHEMA_VERSION);
}
