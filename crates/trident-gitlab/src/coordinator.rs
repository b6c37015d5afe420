//! The job queue agents take work from: every job in memory (and in the store), the polls
//! waiting for a job, traces in files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::jobs::{now, Job, JobSpec, JobStatus, StoredArtifact};
use crate::store::{CiStore, RegisteredAgent, StoreResult};
use crate::tokens;

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
    /// How long a final update may be held back (202) for a trace that is still incomplete.
    trace_accept_timeout: Duration,
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
        trace_accept_timeout: Duration,
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
            trace_accept_timeout,
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
        jobs.trace_crc.insert(job.id, crc32fast::Hasher::new());
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
                if since.elapsed() < self.trace_accept_timeout {
                    let job = self
                        .save(&mut jobs, job)
                        .map_err(|_| JobRefusal::Forbidden)?;
                    return Ok(UpdateOutcome::Accepted(job));
                }
                tracing::warn!(
                    job = id,
                    "the trace is still incomplete: the job's final state is taken anyway"
                );
            }
            job.status = status;
            job.finished_at = Some(now());
            job.exit_code = update.exit_code.map(|c| c as i32);
            // Like GitLab: a failure without a reason is an `unknown_failure`, and a
            // success has none.
            job.failure_reason = match status {
                JobStatus::Failed => update
                    .failure_reason
                    .or_else(|| Some("unknown_failure".into())),
                _ => None,
            };
            job.token_hash = None;
        }
        self.save(&mut jobs, job)
            .map(UpdateOutcome::Done)
            .map_err(|_| JobRefusal::Forbidden)
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
            // Not in memory after a restart: computed once from the file.
            None => match self.trace_checksum_from_file(job.id) {
                Ok(hasher) => {
                    let crc = hasher.clone().finalize();
                    jobs.trace_crc.insert(job.id, hasher);
                    crc
                }
                Err(e) => {
                    tracing::warn!(job = job.id, error = %e, "reading the trace for its checksum");
                    return false;
                }
            },
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

    fn trace_checksum_from_file(&self, id: i64) -> std::io::Result<crc32fast::Hasher> {
        let mut hasher = crc32fast::Hasher::new();
        match std::fs::File::open(self.trace_path(id)) {
            Ok(mut file) => {
                let mut buffer = vec![0; 64 * 1024];
                loop {
                    let n = file.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buffer[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(hasher)
    }

    /// Appends a piece of trace that must start where the trace ends.
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
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.trace_path(id))
            .map_err(|e| TraceError::Io(e.to_string()))?;
        file.write_all(bytes)
            .map_err(|e| TraceError::Io(e.to_string()))?;
        if let Some(hasher) = jobs.trace_crc.get_mut(&id) {
            hasher.update(bytes);
        }
        job.trace_size += bytes.len() as u64;
        job.last_seen = Some(now());
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

    /// The trace from `offset` on.
    pub fn read_trace(&self, id: i64, offset: u64) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        match std::fs::File::open(self.trace_path(id)) {
            Ok(mut file) => {
                file.seek(SeekFrom::Start(offset))?;
                file.read_to_end(&mut out)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(out)
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
