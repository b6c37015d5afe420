//! The coordinator's rules, over an in-memory store: assignment order and tags, `job_age`,
//! the 202 hold-back of a final state, token death, trace limits and masking.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::jobs::{JobSpec, JobState};
use crate::store::{AgentStore, JobStore};

/// Keeps everything in maps; `fail_writes` makes every state write fail (a full disk).
#[derive(Default)]
struct MemoryStore {
    specs: Mutex<BTreeMap<i64, (u64, JobSpec)>>,
    states: Mutex<HashMap<i64, JobState>>,
    fail_writes: std::sync::atomic::AtomicBool,
}

impl JobStore for MemoryStore {
    fn insert_job(&self, created_at: u64, spec: &JobSpec, state: &JobState) -> StoreResult<i64> {
        let mut specs = self.specs.lock().unwrap();
        let id = specs.keys().last().copied().unwrap_or(0) + 1;
        specs.insert(id, (created_at, spec.clone()));
        self.states.lock().unwrap().insert(id, state.clone());
        Ok(id)
    }
    fn save_state(&self, id: i64, state: &JobState, _durable: bool) -> StoreResult<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable(std::io::Error::other("disk full")));
        }
        self.states.lock().unwrap().insert(id, state.clone());
        Ok(())
    }
    fn load_jobs(&self) -> StoreResult<Vec<Job>> {
        let states = self.states.lock().unwrap();
        Ok(self
            .specs
            .lock()
            .unwrap()
            .iter()
            .map(|(id, (created_at, spec))| Job {
                id: *id,
                created_at: *created_at,
                spec: Arc::new(spec.clone()),
                state: states[id].clone(),
            })
            .collect())
    }
}

impl AgentStore for MemoryStore {
    fn insert_agent(&self, _: &RegisteredAgent) -> StoreResult<i64> {
        Ok(1)
    }
    fn agent_by_token_hash(&self, _: &str) -> StoreResult<Option<RegisteredAgent>> {
        Ok(None)
    }
    fn update_agent(&self, _: &RegisteredAgent) -> StoreResult<()> {
        Ok(())
    }
    fn delete_agent(&self, _: i64) -> StoreResult<()> {
        Ok(())
    }
}

fn coordinator(
    config: CoordinatorConfig,
) -> (Arc<Coordinator>, Arc<MemoryStore>, tempfile::TempDir) {
    let store = Arc::new(MemoryStore::default());
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::new(store.clone(), dir.path().join("traces"), config).unwrap();
    (Arc::new(coordinator), store, dir)
}

fn spec(name: &str, tags: &[&str]) -> JobSpec {
    JobSpec {
        name: name.into(),
        script: vec!["true".into()],
        tags: tags.iter().map(|t| t.to_string()).collect(),
        timeout: 3600,
        ..JobSpec::default()
    }
}

fn agent(id: i64, tags: &[&str], run_untagged: bool) -> RegisteredAgent {
    RegisteredAgent {
        id,
        tag_list: tags.iter().map(|t| t.to_string()).collect(),
        run_untagged,
        ..RegisteredAgent::default()
    }
}

fn take(c: &Coordinator, agent: &RegisteredAgent) -> Option<(Job, String)> {
    match c.assign(agent, Duration::ZERO).unwrap() {
        Assignment::Job(job, token) => Some((*job, token)),
        Assignment::Nothing(_) => None,
    }
}

#[test]
fn jobs_go_oldest_first_to_agents_with_every_tag() {
    let (c, _, _dir) = coordinator(CoordinatorConfig::default());
    let first = c.submit(spec("gpu", &["gpu"])).unwrap().id;
    let second = c.submit(spec("plain", &[])).unwrap().id;
    let third = c.submit(spec("gpu-linux", &["gpu", "linux"])).unwrap().id;
    let linux = agent(1, &["linux"], false);
    assert!(
        take(&c, &linux).is_none(),
        "no job has only tags it has, none is untagged for it"
    );
    let gpu_linux = agent(2, &["gpu", "linux"], true);
    assert_eq!(take(&c, &gpu_linux).unwrap().0.id, first);
    assert_eq!(take(&c, &gpu_linux).unwrap().0.id, second);
    assert_eq!(take(&c, &gpu_linux).unwrap().0.id, third);
    assert!(take(&c, &gpu_linux).is_none());
    let paused = RegisteredAgent {
        paused: true,
        ..agent(3, &[], true)
    };
    c.submit(spec("later", &[])).unwrap();
    assert!(take(&c, &paused).is_none(), "paused agents get nothing");
}

#[test]
fn young_jobs_wait_for_an_agents_job_age() {
    let (c, _, _dir) = coordinator(CoordinatorConfig::default());
    c.submit(spec("young", &[])).unwrap();
    let any = agent(1, &[], true);
    match c.assign(&any, Duration::from_secs(3600)).unwrap() {
        Assignment::Nothing(Some(wait)) => assert!(wait > Duration::from_secs(3500), "{wait:?}"),
        other => panic!("{other:?}"),
    }
    assert!(take(&c, &any).is_some());
}

#[test]
fn a_maximum_timeout_caps_the_jobs_timeout() {
    let (c, _, _dir) = coordinator(CoordinatorConfig::default());
    c.submit(spec("long", &[])).unwrap();
    let capped = RegisteredAgent {
        maximum_timeout: Some(900),
        ..agent(1, &[], true)
    };
    let (job, _) = take(&c, &capped).unwrap();
    assert_eq!(job.timeout(), 900);
    assert_eq!(job.spec.timeout, 3600, "the spec stays as submitted");
}

#[test]
fn a_final_state_waits_for_the_rest_of_the_trace_then_the_token_dies() {
    let (c, _, _dir) = coordinator(CoordinatorConfig::default());
    c.submit(spec("traced", &[])).unwrap();
    let (job, token) = take(&c, &agent(1, &[], true)).unwrap();
    c.append_trace(job.id, &token, 0, b"hello ").unwrap();
    let whole = b"hello world";
    let checksum = crc32fast::hash(whole);
    let final_update = || StateUpdate {
        state: Some("success".into()),
        checksum: Some(checksum),
        bytesize: Some(whole.len() as u64),
        ..StateUpdate::default()
    };
    assert!(matches!(
        c.update(job.id, &token, final_update()).unwrap(),
        UpdateOutcome::Accepted(_)
    ));
    assert_eq!(c.get(job.id).unwrap().state.status, JobStatus::Running);
    assert!(matches!(
        c.append_trace(job.id, &token, 3, b"x"),
        Err(TraceError::Range(6))
    ));
    c.append_trace(job.id, &token, 6, b"world").unwrap();
    assert!(matches!(
        c.update(job.id, &token, final_update()).unwrap(),
        UpdateOutcome::Done(_)
    ));
    assert_eq!(c.get(job.id).unwrap().state.status, JobStatus::Success);
    // The token died with the job: the agent is told the job's state.
    assert!(matches!(
        c.append_trace(job.id, &token, 11, b"!"),
        Err(TraceError::Refused(JobRefusal::NotRunning(
            JobStatus::Success
        )))
    ));
    assert!(matches!(
        c.update(job.id + 1, &token, StateUpdate::default()),
        Err(JobRefusal::Forbidden)
    ));
}

#[test]
fn a_held_back_state_is_taken_after_the_accept_timeout() {
    let (c, _, _dir) = coordinator(CoordinatorConfig {
        trace_accept_timeout: Duration::ZERO,
        ..CoordinatorConfig::default()
    });
    c.submit(spec("impatient", &[])).unwrap();
    let (job, token) = take(&c, &agent(1, &[], true)).unwrap();
    let update = StateUpdate {
        state: Some("failed".into()),
        bytesize: Some(100),
        failure_reason: Some("no_such_reason".into()),
        ..StateUpdate::default()
    };
    assert!(matches!(
        c.update(job.id, &token, update).unwrap(),
        UpdateOutcome::Done(_)
    ));
    let state = c.get(job.id).unwrap().state;
    assert_eq!(state.status, JobStatus::Failed);
    assert_eq!(state.failure_reason.as_deref(), Some("unknown_failure"));
}

#[test]
fn a_store_that_fails_leaves_the_job_running_and_says_so() {
    let (c, store, _dir) = coordinator(CoordinatorConfig::default());
    c.submit(spec("stubborn", &[])).unwrap();
    let (job, token) = take(&c, &agent(1, &[], true)).unwrap();
    store.fail_writes.store(true, Ordering::SeqCst);
    let update = StateUpdate {
        state: Some("success".into()),
        ..StateUpdate::default()
    };
    assert!(matches!(
        c.update(job.id, &token, update),
        Err(JobRefusal::Store(_))
    ));
    assert_eq!(c.get(job.id).unwrap().state.status, JobStatus::Running);
    store.fail_writes.store(false, Ordering::SeqCst);
    let update = StateUpdate {
        state: Some("success".into()),
        ..StateUpdate::default()
    };
    assert!(
        c.update(job.id, &token, update).is_ok(),
        "the retry goes through"
    );
}

#[test]
fn traces_stop_at_the_limit_and_hide_the_token() {
    let (c, _, dir) = coordinator(CoordinatorConfig {
        max_trace_bytes: 64,
        ..CoordinatorConfig::default()
    });
    c.submit(spec("chatty", &[])).unwrap();
    let (job, token) = take(&c, &agent(1, &[], true)).unwrap();
    let mut ended = c.end_of(job.id).unwrap();
    let line = format!("{token}\n");
    let size = c.append_trace(job.id, &token, 0, line.as_bytes()).unwrap();
    let stored =
        crate::trace::read_all(&dir.path().join(format!("traces/{}.log", job.id))).unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains(&token));
    assert_eq!(stored.len() as u64, size);
    let more = vec![b'y'; 100];
    assert!(matches!(
        c.append_trace(job.id, &token, size, &more),
        Err(TraceError::Refused(JobRefusal::NotRunning(
            JobStatus::Failed
        )))
    ));
    let state = c.get(job.id).unwrap().state;
    assert_eq!(state.failure_reason.as_deref(), Some("trace_size_exceeded"));
    assert_eq!(
        *ended.borrow_and_update(),
        Some(JobStatus::Failed),
        "the end is signalled"
    );
}

#[test]
fn cancelling_signals_the_end_and_kills_the_token() {
    let (c, _, _dir) = coordinator(CoordinatorConfig::default());
    c.submit(spec("doomed", &[])).unwrap();
    let (job, token) = take(&c, &agent(1, &[], true)).unwrap();
    let ended = c.end_of(job.id).unwrap();
    c.cancel(job.id).unwrap();
    assert_eq!(*ended.borrow(), Some(JobStatus::Canceled));
    assert!(matches!(
        c.update(job.id, &token, StateUpdate::default()),
        Err(JobRefusal::NotRunning(JobStatus::Canceled))
    ));
    assert!(c.end_of(job.id).is_none());
}
