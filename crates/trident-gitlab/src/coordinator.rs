//! The job queue agents take work from: every job in memory (and in the store), the polls
//! waiting for a job, traces in files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::jobs::{now, Job, JobSpec, JobStatus, StoredArtifact};
use crate::store::{CiStore, RegisteredAgent, StoreResult};
use crate::{tokens, trace};

/// The failure reasons GitLab knows (`enums/ci/commit_status.rb`), as agents report them.
pub const FAILURE_REASONS: &[&str] = &[
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "missing_dependency_failure",
    "runner_unsupported",
    "stale_schedule",
    "job_execution_timeout",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
    "forward_deployment_failure",
    "user_blocked",
    "project_deleted",
    "ci_quota_exceeded",
    "pipeline_loop_detected",
    "no_matching_runner",
    "trace_size_exceeded",
    "builds_disabled",
    "environment_creation_failure",
    "deployment_rejected",
    "failed_outdated_deployment_job",
    "job_execution_server_timeout",
    "stuck_pending_with_matching_runners",
    "stuck_pending_no_matching_runners",
    "no_updates_running",
    "no_updates_canceling",
    "server_timeout_running",
    "server_timeout_canceling",
    "runner_configuration_error",
    "runner_external_dependency_failure",
    "runner_interrupted",
];

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
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            trace_accept_timeout: Duration::from_secs(300),
            max_trace_bytes: 100 * 1024 * 1024,
        }
    }
}

/// Every job, plus what makes the hot paths cheap: the pending ones by id (oldest first),
/// so a poll never walks finished jobs, and each running trace's CRC32 so far, so a final
/// update's checksum never rereads the trace.
#[derive(Default)]
struct Jobs {
    all: BTreeMap<i64, Job>,
    pending: BTreeSet<i64>,
    trace_crc: HashMap<i64, crc32fast::Hasher>,
    /// Final updates answered 202 (the trace was incomplete), since when.
    held_back: HashMap<i64, Instant>,
}

impl Jobs {
    fn get(&self, id: &i64) -> Option<&Job> {
        self.all.get(id)
    }

    fn values(&self) -> impl Iterator<Item = &Job> {
        self.all.values()
    }

    /// Records the job's new state in memory, keeping the indexes in step.
    fn insert(&mut self, id: i64, job: Job) {
        if job.status == JobStatus::Pending {
            self.pending.insert(id);
        } else {
            self.pending.remove(&id);
        }
        if job.status.is_finished() {
            self.trace_crc.remove(&id);
            self.held_back.remove(&id);
        }
        self.all.insert(id, job);
    }
}

/// What a poll gets.
#[derive(Debug)]
pub enum Assignment {
    /// The job, now running for the agent, and its fresh job token.
    Job(Box<Job>, String),
    /// Nothing yet; a matching job too young for the agent's `job_age` becomes old enough
    /// after this long.
    Nothing(Option<Duration>),
}

/// What a state update asks for and carries (`PUT /jobs/:id`).
#[derive(Debug, Default)]
pub struct StateUpdate {
    pub state: Option<String>,
    pub exit_code: Option<i64>,
    pub failure_reason: Option<String>,
    /// CRC32 of the whole trace as the agent sent it.
    pub checksum: Option<u32>,
    /// The whole trace's size as the agent sent it.
    pub bytesize: Option<u64>,
}

/// How a state update went.
#[derive(Debug, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Taken (200): the job as it is now.
    Done(Job),
    /// The trace does not yet match the agent's checksum or size: the final state is held
    /// back (202) until the trace is complete or `trace_accept_timeout` passes.
    Accepted(Job),
}

/// Why an agent's request about a job is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum JobRefusal {
    /// Wrong token or no such job.
    Forbidden,
    /// The job is not running any more (the agent must stop; it learns why from the status).
    NotRunning(JobStatus),
    /// The update could not be stored: nothing changed, and the agent should try again (a
    /// 403 would tell it to abandon a job it is running).
    Store(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum TraceError {
    Refused(JobRefusal),
    /// The patch does not start at the end of the trace; the trace has this many bytes.
    Range(u64),
    Io(String),
}

impl Coordinator {
    pub fn new(
        store: Arc<dyn CiStore>,
        traces: PathBuf,
        config: CoordinatorConfig,
    ) -> StoreResult<Coordinator> {
        std::fs::create_dir_all(&traces).map_err(|e| e.to_string())?;
        let mut jobs = Jobs::default();
        for job in store.load_jobs()? {
            jobs.insert(job.id, job);
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

    pub fn queue_version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Registers a poll of `agent` for jobs: its `notified()` completes when a job it could
    /// take is queued, also when that happened after registering but before waiting. Wait
    /// first, then look (`assign`), so that no job slips between the two.
    pub fn waiter(self: &Arc<Self>, agent: &RegisteredAgent) -> Waiter {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.waiting
            .lock()
            .unwrap()
            .insert(id, (agent.clone(), notify.clone()));
        Waiter {
            coordinator: self.clone(),
            id,
            notify,
        }
    }

    fn wake_waiters_for(&self, job: &Job) {
        for (agent, notify) in self.waiting.lock().unwrap().values() {
            if !agent.paused && matches(agent, job) {
                notify.notify_one();
            }
        }
    }

    pub fn submit(&self, spec: JobSpec) -> StoreResult<Job> {
        let mut job = Job {
            id: 0,
            spec,
            status: JobStatus::Pending,
            exit_code: None,
            failure_reason: None,
            agent_id: None,
            created_at: now(),
            started_at: None,
            finished_at: None,
            trace_size: 0,
            trace_crc: None,
            last_seen: None,
            uploaded_artifacts: BTreeMap::new(),
            token_hash: None,
        };
        let mut jobs = self.jobs.lock().unwrap();
        job.id = self.store.insert_job(&job)?;
        jobs.insert(job.id, job.clone());
        drop(jobs);
        self.version.fetch_add(1, Ordering::SeqCst);
        self.wake_waiters_for(&job);
        Ok(job)
    }

    pub fn get(&self, id: i64) -> Option<Job> {
        self.jobs.lock().unwrap().get(&id).cloned()
    }

    pub fn list(&self, status: Option<JobStatus>) -> Vec<Job> {
        self.jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| status.is_none_or(|s| j.status == s))
            .cloned()
            .collect()
    }

    fn save(&self, jobs: &mut Jobs, job: Job) -> StoreResult<Job> {
        self.store.update_job(&job)?;
        jobs.insert(job.id, job.clone());
        Ok(job)
    }

    /// Cancels a pending or running job (a running job's agent learns it at its next update).
    pub fn cancel(&self, id: i64) -> StoreResult<Option<Job>> {
        let mut jobs = self.jobs.lock().unwrap();
        let Some(mut job) = jobs.get(&id).cloned() else {
            return Ok(None);
        };
        if !job.status.is_finished() {
            job.status = JobStatus::Canceled;
            job.finished_at = Some(now());
            job.token_hash = None;
            job = self.save(&mut jobs, job)?;
        }
        Ok(Some(job))
    }

    /// Hands the oldest matching pending job that has waited at least `min_age` (the agent's
    /// `job_age`) to `agent`, with a fresh job token.
    pub fn assign(&self, agent: &RegisteredAgent, min_age: Duration) -> StoreResult<Assignment> {
        if agent.paused {
            return Ok(Assignment::Nothing(None));
        }
        let mut jobs = self.jobs.lock().unwrap();
        let now_secs = now();
        let mut too_young: Option<Duration> = None;
        let mut chosen = None;
        for id in &jobs.pending {
            let job = &jobs.all[id];
            if !matches(agent, job) {
                continue;
            }
            let age = Duration::from_secs(now_secs.saturating_sub(job.created_at));
            if age < min_age {
                let wait = min_age - age;
                too_young = Some(too_young.map_or(wait, |w| w.min(wait)));
                continue;
            }
            chosen = Some(job.clone());
            break;
        }
        let Some(mut job) = chosen else {
            return Ok(Assignment::Nothing(too_young));
        };
        let token = tokens::new_token(JOB_TOKEN_PREFIX);
        job.status = JobStatus::Running;
        job.agent_id = Some(agent.id);
        job.started_at = Some(now());
        job.last_seen = job.started_at;
        job.token_hash = Some(tokens::hash(&token));
        if let Some(max) = agent.maximum_timeout {
            job.spec.timeout = job.spec.timeout.min(max.max(0) as u64);
        }
        // Stored first: if that fails the job is still pending, in memory as on disk.
        let job = self.save(&mut jobs, job)?;
        Ok(Assignment::Job(Box::new(job), token))
    }

    /// The running job this job token belongs to.
    fn authenticate(&self, jobs: &Jobs, id: i64, token: &str) -> Result<Job, JobRefusal> {
        let job = jobs.get(&id).ok_or(JobRefusal::Forbidden)?;
        match &job.token_hash {
            Some(hash) if tokens::same(hash, &tokens::hash(token)) => Ok(job.clone()),
            // The token of a finished job is gone: tell the agent the job's state.
            None if job.status.is_finished() && job.agent_id.is_some() => {
                Err(JobRefusal::NotRunning(job.status))
            }
            _ => Err(JobRefusal::Forbidden),
        }
    }

    /// An agent reports the job's state. A final state that comes with a checksum or size
    /// the stored trace does not match yet is held back (the agent retries after sending the
    /// rest of its trace), but not for longer than `trace_accept_timeout`.
    pub fn update(
        &self,
        id: i64,
        token: &str,
        update: StateUpdate,
    ) -> Result<UpdateOutcome, JobRefusal> {
        let mut jobs = self.jobs.lock().unwrap();
        let mut job = self.authenticate(&jobs, id, token)?;
        job.last_seen = Some(now());
        let finished = match update.state.as_deref() {
            Some("success") => Some(JobStatus::Success),
            Some("failed") => Some(JobStatus::Failed),
            _ => None,
        };
        if let Some(status) = finished {
            if self.trace_incomplete(&mut jobs, &job, &update) {
                let since = *jobs.held_back.entry(id).or_insert_with(Instant::now);
                if since.elapsed() < self.config.trace_accept_timeout {
                    let job = self.save(&mut jobs, job).map_err(JobRefusal::Store)?;
                    return Ok(UpdateOutcome::Accepted(job));
                }
                tracing::warn!(
                    job = id,
                    "the trace is still incomplete: the job's final state is taken anyway"
                );
            }
            job.status = status;
            job.finished_at = Some(now());
            job.exit_code = update.exit_code;
            // Like GitLab: a failure without a reason is an `unknown_failure`, and a
            // success has none.
            // A reason GitLab does not know is an `unknown_failure` too
            // (`CommitStatus.failure_reasons[reason]` is nil).
            job.failure_reason = match status {
                JobStatus::Failed => Some(
                    update
                        .failure_reason
                        .filter(|r| FAILURE_REASONS.contains(&r.as_str()))
                        .unwrap_or_else(|| "unknown_failure".into()),
                ),
                _ => None,
            };
            job.token_hash = None;
        }
        self.save(&mut jobs, job)
            .map(UpdateOutcome::Done)
            .map_err(JobRefusal::Store)
    }

    /// Whether the agent says its trace has bytes the stored one lacks. A trace of the right
    /// size with another checksum cannot be mended by waiting: it is taken as it is (and
    /// logged).
    fn trace_incomplete(&self, jobs: &mut Jobs, job: &Job, update: &StateUpdate) -> bool {
        if let Some(size) = update.bytesize {
            if job.trace_size < size {
                return true;
            }
        }
        let Some(expected) = update.checksum else {
            return false;
        };
        let actual = match jobs.trace_crc.get(&job.id) {
            Some(hasher) => hasher.clone().finalize(),
            // After a restart: the checksum of what the agent sent is in the job's record
            // (the stored trace is masked, so it cannot be recomputed from the file).
            None => job
                .trace_crc
                .unwrap_or_else(|| crc32fast::Hasher::new().finalize()),
        };
        if actual == expected {
            return false;
        }
        if update.bytesize.is_some() {
            tracing::warn!(
                job = job.id,
                expected = format!("{expected:08x}"),
                actual = format!("{actual:08x}"),
                "the trace's checksum differs from the agent's"
            );
            return false;
        }
        true
    }

    /// Appends a piece of trace that must start where the trace ends. The job token and the
    /// job's masked variables are masked in what is stored. A trace that reaches
    /// `max_trace_bytes` ends there with a notice, and the job fails
    /// (`trace_size_exceeded`): its agent hears 403 and stops.
    pub fn append_trace(
        &self,
        id: i64,
        token: &str,
        start: u64,
        bytes: &[u8],
    ) -> Result<u64, TraceError> {
        let mut jobs = self.jobs.lock().unwrap();
        let mut job = self
            .authenticate(&jobs, id, token)
            .map_err(TraceError::Refused)?;
        if start != job.trace_size {
            return Err(TraceError::Range(job.trace_size));
        }
        let limit = self.config.max_trace_bytes;
        let room = limit.saturating_sub(job.trace_size);
        let over = bytes.len() as u64 > room;
        let piece = &bytes[..bytes.len().min(room as usize)];
        let secrets: Vec<&[u8]> = std::iter::once(token.as_bytes())
            .chain(
                job.spec
                    .variables
                    .values()
                    .filter(|v| v.masked())
                    .map(|v| v.value().as_bytes()),
            )
            .collect();
        let path = self.trace_path(id);
        trace::append(&path, job.trace_size, piece, &secrets)
            .map_err(|e| TraceError::Io(e.to_string()))?;
        // The checksum is of what the agent sent, which is what it will compare with.
        let hasher = jobs
            .trace_crc
            .entry(id)
            .or_insert_with(|| crc32fast::Hasher::new_with_initial(job.trace_crc.unwrap_or(0)));
        hasher.update(piece);
        job.trace_crc = Some(hasher.clone().finalize());
        job.trace_size += piece.len() as u64;
        job.last_seen = Some(now());
        if over {
            let notice = trace::limit_notice(limit);
            trace::append(&path, job.trace_size, notice.as_bytes(), &[])
                .map_err(|e| TraceError::Io(e.to_string()))?;
            job.trace_size += notice.len() as u64;
            job.status = JobStatus::Failed;
            job.failure_reason = Some("trace_size_exceeded".into());
            job.finished_at = Some(now());
            job.token_hash = None;
            tracing::warn!(job = id, limit, "job failed: its trace reached the limit");
            self.save(&mut jobs, job).map_err(TraceError::Io)?;
            return Err(TraceError::Refused(JobRefusal::NotRunning(
                JobStatus::Failed,
            )));
        }
        let size = job.trace_size;
        self.save(&mut jobs, job).map_err(TraceError::Io)?;
        Ok(size)
    }

    /// Fails running jobs whose agent has been silent for `stale_after` (or, with
    /// `agent` set, every running job of that agent: the built-in agent after a restart).
    /// Returns how many were failed.
    pub fn fail_lost_jobs(&self, stale_after: std::time::Duration, agent: Option<i64>) -> usize {
        let mut jobs = self.jobs.lock().unwrap();
        let limit = now().saturating_sub(stale_after.as_secs());
        let lost: Vec<Job> = jobs
            .values()
            .filter(|j| j.status == JobStatus::Running)
            .filter(|j| match agent {
                Some(agent) => j.agent_id == Some(agent),
                None => j.last_seen.unwrap_or(0) < limit,
            })
            .cloned()
            .collect();
        let mut failed = 0;
        for mut job in lost {
            job.status = JobStatus::Failed;
            job.failure_reason = Some("runner_system_failure".into());
            job.finished_at = Some(now());
            job.token_hash = None;
            tracing::warn!(job = job.id, agent = ?job.agent_id, "job lost its agent");
            if self.save(&mut jobs, job).is_ok() {
                failed += 1;
            }
        }
        failed
    }

    /// Checks that an agent may upload artifacts for this running job.
    pub fn authorize_artifact(&self, id: i64, token: &str) -> Result<(), JobRefusal> {
        let jobs = self.jobs.lock().unwrap();
        self.authenticate(&jobs, id, token).map(|_| ())
    }

    /// Where an upload is written before it is recorded.
    pub fn artifact_upload_path(&self, id: i64) -> PathBuf {
        self.artifacts_dir(id)
            .join(format!(".upload-{}", tokens::new_token("")))
    }

    fn artifacts_dir(&self, id: i64) -> PathBuf {
        self.traces.with_file_name("artifacts").join(id.to_string())
    }

    /// Records an uploaded file as the job's artifact of `kind`, replacing an older one.
    pub fn record_artifact(
        &self,
        id: i64,
        token: &str,
        upload: &std::path::Path,
        kind: &str,
        artifact: StoredArtifact,
    ) -> Result<(), TraceError> {
        let mut jobs = self.jobs.lock().unwrap();
        let mut job = self
            .authenticate(&jobs, id, token)
            .map_err(TraceError::Refused)?;
        let target = self.artifacts_dir(id).join(kind);
        std::fs::rename(upload, &target).map_err(|e| TraceError::Io(e.to_string()))?;
        job.uploaded_artifacts.insert(kind.to_string(), artifact);
        job.last_seen = Some(now());
        self.save(&mut jobs, job).map_err(TraceError::Io)?;
        Ok(())
    }

    /// The job's archive, for the holder of its own job token or of the token of a running
    /// job that depends on it.
    pub fn artifact_for_token(
        &self,
        id: i64,
        token: &str,
    ) -> Result<Option<(PathBuf, StoredArtifact)>, JobRefusal> {
        let jobs = self.jobs.lock().unwrap();
        let hash = tokens::hash(token);
        let allowed = jobs.values().any(|j| {
            j.token_hash
                .as_deref()
                .is_some_and(|h| tokens::same(h, &hash))
                && (j.id == id || j.spec.dependencies.contains(&id))
        });
        if !allowed {
            return Err(JobRefusal::Forbidden);
        }
        Ok(self.archive_of(&jobs, id))
    }

    /// The job's archive, for clients of the jobs API.
    pub fn artifact(&self, id: i64) -> Option<(PathBuf, StoredArtifact)> {
        let jobs = self.jobs.lock().unwrap();
        self.archive_of(&jobs, id)
    }

    fn archive_of(&self, jobs: &Jobs, id: i64) -> Option<(PathBuf, StoredArtifact)> {
        let artifact = jobs.get(&id)?.uploaded_artifacts.get("archive")?.clone();
        Some((self.artifacts_dir(id).join("archive"), artifact))
    }

    /// Removes artifacts past their `expire_in`; returns how many.
    pub fn expire_artifacts(&self) -> usize {
        let mut jobs = self.jobs.lock().unwrap();
        let now = now();
        let expired: Vec<(i64, String)> = jobs
            .values()
            .flat_map(|j| {
                j.uploaded_artifacts
                    .iter()
                    .filter(|(_, a)| a.expire_at.is_some_and(|at| at <= now))
                    .map(move |(kind, _)| (j.id, kind.clone()))
            })
            .collect();
        for (id, kind) in &expired {
            let _ = std::fs::remove_file(self.artifacts_dir(*id).join(kind));
            if let Some(mut job) = jobs.get(id).cloned() {
                job.uploaded_artifacts.remove(kind);
                let _ = self.save(&mut jobs, job);
            }
        }
        expired.len()
    }

    /// The trace from `offset` on, as a file to stream (`None`: nothing written yet).
    pub fn open_trace(&self, id: i64, offset: u64) -> std::io::Result<Option<std::fs::File>> {
        trace::open_at(&self.trace_path(id), offset)
    }

    fn trace_path(&self, id: i64) -> PathBuf {
        self.traces.join(format!("{id}.log"))
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
        self.coordinator.waiting.lock().unwrap().remove(&self.id);
    }
}

/// GitLab's matching rule: every tag of the job must be one of the agent's; untagged jobs
/// go only to agents that run untagged jobs.
fn matches(agent: &RegisteredAgent, job: &Job) -> bool {
    if job.spec.tags.is_empty() {
        return agent.run_untagged;
    }
    job.spec.tags.iter().all(|t| agent.tag_list.contains(t))
}
