//! What agents report about the jobs they run: state updates, trace pieces; and the
//! watch for agents that went silent.

use std::time::Instant;

use trident_core::store::StoreError;

use super::{now, Coordinator, Durability, JobRefusal, Jobs, TraceError};
use crate::jobs::{Job, JobStatus};
use crate::trace;

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
#[derive(Debug)]
pub enum UpdateOutcome {
    /// Taken (200): the job as it is now.
    Done(Job),
    /// The trace does not yet match the agent's checksum or size: the final state is held
    /// back (202) until the trace is complete or `trace_accept_timeout` passes.
    Accepted(Job),
}

impl Coordinator {
    /// An agent reports the job's state. A final state that comes with a checksum or size
    /// the stored trace does not match yet is held back (the agent retries after sending the
    /// rest of its trace), but not for longer than `trace_accept_timeout`.
    pub fn update(
        &self,
        id: i64,
        token: &str,
        update: StateUpdate,
    ) -> Result<UpdateOutcome, JobRefusal> {
        let mut jobs = self.lock();
        let mut job = self.authenticate(&jobs, id, token)?;
        job.state.last_seen = Some(now());
        let finished = match update.state.as_deref() {
            Some("success") => Some(JobStatus::Success),
            Some("failed") => Some(JobStatus::Failed),
            _ => None,
        };
        if let Some(status) = finished {
            if self.trace_incomplete(&mut jobs, &job, &update) {
                let since = *jobs.held_back.entry(id).or_insert_with(Instant::now);
                if since.elapsed() < self.config.trace_accept_timeout {
                    let job = self.save(&mut jobs, job, Durability::Process)?;
                    return Ok(UpdateOutcome::Accepted(job));
                }
                tracing::warn!(
                    job = id,
                    "the trace is still incomplete: the job's final state is taken anyway"
                );
            }
            job.state.status = status;
            job.state.finished_at = Some(now());
            job.state.exit_code = update.exit_code;
            // Like GitLab: a failure without a reason is an `unknown_failure`, and a
            // success has none.
            // A reason GitLab does not know is an `unknown_failure` too
            // (`CommitStatus.failure_reasons[reason]` is nil).
            job.state.failure_reason = match status {
                JobStatus::Failed => Some(
                    update
                        .failure_reason
                        .filter(|r| FAILURE_REASONS.contains(&r.as_str()))
                        .unwrap_or_else(|| "unknown_failure".into()),
                ),
                _ => None,
            };
            job.state.token_hash = None;
        }
        // A final state is acknowledged only once the trace it ends is on disk too.
        let durability = if job.state.status.is_finished() {
            crate::trace::sync(&self.trace_path(id)).map_err(StoreError::unavailable)?;
            Durability::Durable
        } else {
            Durability::Process
        };
        Ok(UpdateOutcome::Done(self.save(&mut jobs, job, durability)?))
    }

    /// Whether the agent says its trace has bytes the stored one lacks. A trace of the right
    /// size with another checksum cannot be mended by waiting: it is taken as it is (and
    /// logged).
    fn trace_incomplete(&self, jobs: &mut Jobs, job: &Job, update: &StateUpdate) -> bool {
        if let Some(size) = update.bytesize {
            if job.state.trace_size < size {
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
                .state
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
        let mut jobs = self.lock();
        let mut job = self
            .authenticate(&jobs, id, token)
            .map_err(TraceError::Refused)?;
        if start != job.state.trace_size {
            return Err(TraceError::Range(job.state.trace_size));
        }
        let limit = self.config.max_trace_bytes;
        let room = limit.saturating_sub(job.state.trace_size);
        let over = bytes.len() as u64 > room;
        let piece = &bytes[..bytes.len().min(room as usize)];
        let secrets: Vec<&[u8]> = std::iter::once(token.as_bytes())
            .chain(
                job.spec
                    .variables
                    .values()
                    .filter(|v| v.masked)
                    .map(|v| v.value.as_bytes()),
            )
            .collect();
        let path = self.trace_path(id);
        trace::append(&path, job.state.trace_size, piece, &secrets)?;
        // The checksum is of what the agent sent, which is what it will compare with.
        let hasher = jobs.trace_crc.entry(id).or_insert_with(|| {
            crc32fast::Hasher::new_with_initial(job.state.trace_crc.unwrap_or(0))
        });
        hasher.update(piece);
        job.state.trace_crc = Some(hasher.clone().finalize());
        job.state.trace_size += piece.len() as u64;
        job.state.last_seen = Some(now());
        if over {
            let notice = trace::limit_notice(limit);
            trace::append(&path, job.state.trace_size, notice.as_bytes(), &[])?;
            trace::sync(&path)?;
            job.state.trace_size += notice.len() as u64;
            job.state.status = JobStatus::Failed;
            job.state.failure_reason = Some("trace_size_exceeded".into());
            job.state.finished_at = Some(now());
            job.state.token_hash = None;
            tracing::warn!(job = id, limit, "job failed: its trace reached the limit");
            self.save(&mut jobs, job, Durability::Durable)?;
            return Err(TraceError::Refused(JobRefusal::NotRunning(
                JobStatus::Failed,
            )));
        }
        let size = job.state.trace_size;
        self.save(&mut jobs, job, Durability::Process)?;
        Ok(size)
    }

    /// Fails running jobs whose agent has been silent for `stale_after` (or, with
    /// `agent` set, every running job of that agent: the built-in agent after a restart).
    /// Returns how many were failed.
    pub fn fail_lost_jobs(&self, stale_after: std::time::Duration, agent: Option<i64>) -> usize {
        let mut jobs = self.lock();
        let limit = now().saturating_sub(stale_after.as_secs());
        let lost: Vec<Job> = jobs
            .values()
            .filter(|j| j.state.status == JobStatus::Running)
            .filter(|j| match agent {
                Some(agent) => j.state.agent_id == Some(agent),
                None => j.state.last_seen.unwrap_or(0) < limit,
            })
            .cloned()
            .collect();
        let mut failed = 0;
        for mut job in lost {
            job.state.status = JobStatus::Failed;
            job.state.failure_reason = Some("runner_system_failure".into());
            job.state.finished_at = Some(now());
            job.state.token_hash = None;
            tracing::warn!(job = job.id, agent = ?job.state.agent_id, "job lost its agent");
            if self.save(&mut jobs, job, Durability::Durable).is_ok() {
                failed += 1;
            }
        }
        failed
    }
}
