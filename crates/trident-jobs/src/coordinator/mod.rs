//! The job queue agents take work from: every job in memory (and in the store), the polls
//! waiting for a job, job tokens; traces and artifacts in files.
//!
//! A **blocking** API: its methods take a mutex and may write to the store (SQLite). Call
//! them from `spawn_blocking` (or accept the short block) in async code.
//!
//! - `queue.rs`: submit, assign (GitLab's matching rules), cancel.
//! - `reports.rs`: what agents report: state updates (with the 202 hold-back for
//!   incomplete traces), trace pieces, lost agents.
//! - `artifacts.rs`: uploads, downloads by token, expiry.

mod artifacts;
mod queue;
mod reports;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use trident_core::store::StoreError;

use crate::jobs::{Job, JobStatus};
use crate::store::{CiStore, RegisteredAgent, StoreResult};
use crate::tokens;

pub use queue::Assignment;
pub use reports::{StateUpdate, UpdateOutcome, FAILURE_REASONS};

/// GitLab's prefix for job tokens.
const JOB_TOKEN_PREFIX: &str = "glcbt-";

pub struct Coordinator {
    store: Arc<dyn CiStore>,
    jobs: Mutex<Jobs>,
    /// Bumped whenever a job becomes available (GitLab's `X-GitLab-Last-Update`).
    version: AtomicU64,
    /// The polls waiting for a job, by waiter id: a new job wakes only those of agents it
    /// could go to, so thousands of idle agents with other tags cost nothing.
    waiting: Mutex<HashMap<u64, (RegisteredAgent, Arc<Notify>)>>,
    next_waiter: AtomicU64,
    traces: PathBuf,
    config: CoordinatorConfig,
}

/// The coordinator's knobs; `Default` holds the defaults.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// How long a final update may be held back (202) for a trace that is still incomplete
    /// (GitLab: 5 minutes).
    pub trace_accept_timeout: Duration,
    /// A job's trace stops here: the job fails with `trace_size_exceeded`, as in GitLab, whose
    /// default `ci_jobs_trace_size_limit` this is.
    pub max_trace_bytes: u64,
    /// A running job whose agent sent nothing for this long fails with
    /// `runner_system_failure` (GitLab drops stuck jobs much later; trident's agents report
    /// far more often than this).
    pub stale_after: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            trace_accept_timeout: Duration::from_secs(300),
            max_trace_bytes: 100 * 1024 * 1024,
            stale_after: Duration::from_secs(1800),
        }
    }
}

/// Every job, plus what makes the hot paths cheap: the pending ones by id (oldest first),
/// so a poll never walks finished jobs; each running trace's CRC32 so far, so a final
/// update's checksum never rereads the trace; and a signal per running job that fires when
/// it ends (the built-in agent stops at once when a job is cancelled).
#[derive(Default)]
struct Jobs {
    all: BTreeMap<i64, Job>,
    pending: BTreeSet<i64>,
    trace_crc: HashMap<i64, crc32fast::Hasher>,
    /// Final updates answered 202 (the trace was incomplete), since when.
    held_back: HashMap<i64, Instant>,
    ends: HashMap<i64, watch::Sender<Option<JobStatus>>>,
}

impl Jobs {
    fn get(&self, id: &i64) -> Option<&Job> {
        self.all.get(id)
    }

    fn values(&self) -> impl Iterator<Item = &Job> {
        self.all.values()
    }

    /// Records the job's new state in memory, keeping the indexes in step.
    fn insert(&mut self, job: Job) {
        let id = job.id;
        let status = job.state.status;
        if status == JobStatus::Pending {
            self.pending.insert(id);
        } else {
            self.pending.remove(&id);
        }
        if status.is_finished() {
            self.trace_crc.remove(&id);
            self.held_back.remove(&id);
            if let Some(end) = self.ends.remove(&id) {
                end.send_replace(Some(status));
            }
        }
        self.all.insert(id, job);
    }
}

/// Why an agent's request about a job is refused.
#[derive(Debug, thiserror::Error)]
pub enum JobRefusal {
    /// Wrong token or no such job.
    #[error("403 Forbidden")]
    Forbidden,
    /// The job is not running any more (the agent must stop; it learns why from the status).
    #[error("the job is {}", .0.as_str())]
    NotRunning(JobStatus),
    /// The update could not be stored: nothing changed, and the agent should try again (a
    /// 403 would tell it to abandon a job it is running).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a piece of trace was not appended.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Refused(#[from] JobRefusal),
    /// The patch does not start at the end of the trace; the trace has this many bytes.
    #[error("the trace has {0} bytes")]
    Range(u64),
    #[error("writing the trace: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for TraceError {
    fn from(e: StoreError) -> Self {
        TraceError::Refused(JobRefusal::Store(e))
    }
}

/// Why an artifact was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Refused(#[from] JobRefusal),
    #[error("storing the artifact: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for ArtifactError {
    fn from(e: StoreError) -> Self {
        ArtifactError::Refused(JobRefusal::Store(e))
    }
}

/// How durable a change must be when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// On disk, even across a power cut: what an agent or client is told is final.
    Durable,
    /// Survives a crash of the process (trace progress, heartbeats): a power cut may lose
    /// the last of it, which agents recover from (416 with the stored size).
    Process,
}

impl Coordinator {
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    pub fn new(
        store: Arc<dyn CiStore>,
        traces: PathBuf,
        config: CoordinatorConfig,
    ) -> Result<Coordinator, StoreError> {
        std::fs::create_dir_all(&traces).map_err(StoreError::unavailable)?;
        let mut jobs = Jobs::default();
        for job in store.load_jobs()? {
            if job.state.status == JobStatus::Running {
                // A trace may have reached the disk ahead of its recorded size (a power cut
                // between the two): cut it back, and the agent resends from there.
                crate::trace::truncate(
                    &traces.join(format!("{}.log", job.id)),
                    job.state.trace_size,
                )
                .map_err(StoreError::unavailable)?;
                jobs.ends.insert(job.id, watch::channel(None).0);
            }
            jobs.insert(job);
        }
        Ok(Coordinator {
            store,
            jobs: Mutex::new(jobs),
            version: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            next_waiter: AtomicU64::new(0),
            traces,
            config,
        })
    }

    /// The jobs, whatever a panic elsewhere left behind (every change to them is applied
    /// whole, after the store took it).
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<u64, (RegisteredAgent, Arc<Notify>)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn queue_version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Registers a poll of `agent` for jobs: its `notified()` completes when a job it could
    /// take is queued, also when that happened after registering but before waiting. Wait
    /// first, then look (`assign`), so that no job slips between the two.
    pub fn waiter(self: &Arc<Self>, agent: &RegisteredAgent) -> Waiter {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.waiting().insert(id, (agent.clone(), notify.clone()));
        Waiter {
            coordinator: self.clone(),
            id,
            notify,
        }
    }

    fn wake_waiters_for(&self, job: &Job) {
        for (agent, notify) in self.waiting().values() {
            if !agent.paused && queue::matches(agent, job) {
                notify.notify_one();
            }
        }
    }

    pub fn get(&self, id: i64) -> Option<Job> {
        self.lock().get(&id).cloned()
    }

    pub fn list(&self, status: Option<JobStatus>) -> Vec<Job> {
        self.lock()
            .values()
            .filter(|j| status.is_none_or(|s| j.state.status == s))
            .cloned()
            .collect()
    }

    /// A signal that fires when the running job `id` ends (finished, failed, cancelled);
    /// `None` if it is not running.
    pub fn end_of(&self, id: i64) -> Option<watch::Receiver<Option<JobStatus>>> {
        self.lock().ends.get(&id).map(watch::Sender::subscribe)
    }

    /// Stores the job's state, then applies it in memory.
    fn save(&self, jobs: &mut Jobs, job: Job, durability: Durability) -> StoreResult<Job> {
        self.store
            .save_state(job.id, &job.state, durability == Durability::Durable)?;
        jobs.insert(job.clone());
        Ok(job)
    }

    /// The running job this job token belongs to.
    fn authenticate(&self, jobs: &Jobs, id: i64, token: &str) -> Result<Job, JobRefusal> {
        let job = jobs.get(&id).ok_or(JobRefusal::Forbidden)?;
        match &job.state.token_hash {
            Some(hash) if tokens::same(hash, &tokens::hash(token)) => Ok(job.clone()),
            // The token of a finished job is gone: tell the agent the job's state.
            None if job.state.status.is_finished() && job.state.agent_id.is_some() => {
                Err(JobRefusal::NotRunning(job.state.status))
            }
            _ => Err(JobRefusal::Forbidden),
        }
    }

    fn trace_path(&self, id: i64) -> PathBuf {
        self.traces.join(format!("{id}.log"))
    }

    /// The trace from `offset` on, as a file to stream (`None`: nothing written yet).
    pub fn open_trace(&self, id: i64, offset: u64) -> std::io::Result<Option<std::fs::File>> {
        crate::trace::open_at(&self.trace_path(id), offset)
    }
}

/// A poll waiting for a job; unregistered when dropped.
pub struct Waiter {
    coordinator: Arc<Coordinator>,
    id: u64,
    notify: Arc<Notify>,
}

impl Waiter {
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.coordinator.waiting().remove(&self.id);
    }
}

/// Unix seconds now.
fn now() -> u64 {
    crate::jobs::now()
}

#[cfg(test)]
mod tests;
