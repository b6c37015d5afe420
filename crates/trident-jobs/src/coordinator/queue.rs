//! The queue: jobs come in, agents take them by GitLab's rules, clients cancel them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{now, Coordinator, Durability, JOB_TOKEN_PREFIX};
use crate::jobs::{Job, JobSpec, JobState, JobStatus};
use crate::store::{RegisteredAgent, StoreResult};
use crate::tokens;

/// What a poll gets.
#[derive(Debug)]
pub enum Assignment {
    /// The job, now running for the agent, and its fresh job token.
    Job(Box<Job>, String),
    /// Nothing yet; a matching job too young for the agent's `job_age` becomes old enough
    /// after this long.
    Nothing(Option<Duration>),
}

impl Coordinator {
    /// Queues a job (durably: the client is told its id) and wakes the polls of agents that
    /// could take it.
    pub fn submit(&self, spec: JobSpec) -> StoreResult<Job> {
        let created_at = now();
        let state = JobState::default();
        let mut jobs = self.lock();
        let id = self.store.insert_job(created_at, &spec, &state)?;
        let job = Job {
            id,
            created_at,
            spec: Arc::new(spec),
            state,
        };
        jobs.insert(job.clone());
        drop(jobs);
        self.version.fetch_add(1, Ordering::SeqCst);
        self.wake_waiters_for(&job);
        Ok(job)
    }

    /// Cancels a pending or running job (a running job's agent learns it at its next update;
    /// the built-in agent at once).
    pub fn cancel(&self, id: i64) -> StoreResult<Option<Job>> {
        let mut jobs = self.lock();
        let Some(mut job) = jobs.get(&id).cloned() else {
            return Ok(None);
        };
        if !job.state.status.is_finished() {
            job.state.status = JobStatus::Canceled;
            job.state.finished_at = Some(now());
            job.state.token_hash = None;
            job = self.save(&mut jobs, job, Durability::Durable)?;
        }
        Ok(Some(job))
    }

    /// Hands the oldest matching pending job that has waited at least `min_age` (the agent's
    /// `job_age`) to `agent`, with a fresh job token.
    pub fn assign(&self, agent: &RegisteredAgent, min_age: Duration) -> StoreResult<Assignment> {
        if agent.paused {
            return Ok(Assignment::Nothing(None));
        }
        let mut jobs = self.lock();
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
        job.state.status = JobStatus::Running;
        job.state.agent_id = Some(agent.id);
        job.state.started_at = Some(now());
        job.state.last_seen = job.state.started_at;
        job.state.token_hash = Some(tokens::hash(&token));
        if let Some(max) = agent.maximum_timeout {
            job.state.timeout = Some(job.spec.timeout.min(max.max(0) as u64));
        }
        // Stored first: if that fails the job is still pending, in memory as on disk.
        let job = self.save(&mut jobs, job, Durability::Durable)?;
        jobs.ends.insert(job.id, watch::channel(None).0);
        Ok(Assignment::Job(Box::new(job), token))
    }
}

/// GitLab's matching rule: every tag of the job must be one of the agent's; untagged jobs
/// go only to agents that run untagged jobs.
pub(super) fn matches(agent: &RegisteredAgent, job: &Job) -> bool {
    if job.spec.tags.is_empty() {
        return agent.run_untagged;
    }
    job.spec.tags.iter().all(|t| agent.tag_list.contains(t))
}
