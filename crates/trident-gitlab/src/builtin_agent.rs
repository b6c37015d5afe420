//! The built-in agent: takes jobs from the same queue, by the same matching rules, as
//! external agents, and runs them in fresh sandbox runners through the core's `Manager`, so
//! that one machine needs nothing else. It reports through the same token-checked calls an
//! external agent makes, so both leave identical traces and states.

use std::sync::Arc;
use std::time::Duration;

use trident_core::execution::ExecMessage;
use trident_core::model::{ExecutionRequest, FileCopy};
use trident_core::Manager;

use crate::coordinator::Coordinator;
use crate::jobs::Job;
use crate::store::RegisteredAgent;

/// The built-in agent's id in job records (registered agents start at 1).
pub const BUILTIN_AGENT_ID: i64 = 0;

/// How often a running job says it is alive (well inside any sane `job_stale_seconds`).
const HEARTBEAT: Duration = Duration::from_secs(30);

/// How long after_script may run.
const AFTER_SCRIPT_TIMEOUT: u64 = 300;

pub struct BuiltinAgent {
    pub manager: Manager,
    pub coordinator: Arc<Coordinator>,
    pub tags: Vec<String>,
}

impl BuiltinAgent {
    /// Starts `concurrency` workers. Jobs it was running when the server last stopped died
    /// with it: they fail first.
    pub fn start(self: Arc<Self>, concurrency: usize) {
        let lost = self
            .coordinator
            .fail_lost_jobs(Duration::ZERO, Some(BUILTIN_AGENT_ID));
        if lost > 0 {
            tracing::warn!(lost, "jobs of the built-in agent died with the last server");
        }
        for _ in 0..concurrency.max(1) {
            tokio::spawn(self.clone().work());
        }
    }

    fn identity(&self) -> RegisteredAgent {
        RegisteredAgent {
            id: BUILTIN_AGENT_ID,
            description: Some("trident built-in agent".into()),
            run_untagged: true,
            tag_list: self.tags.clone(),
            access_level: "not_protected".into(),
            ..RegisteredAgent::default()
        }
    }

    async fn work(self: Arc<Self>) {
        let agent = self.identity();
        let mut queue = self.coordinator.subscribe();
        loop {
            queue.borrow_and_update();
            match self.coordinator.assign(&agent) {
                Ok(Some((job, token))) => self.run(job, &token).await,
                Ok(None) => {
                    // Woken by a new job, or after a while in case a wake-up was missed.
                    let _ = tokio::time::timeout(Duration::from_secs(5), queue.changed()).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "built-in agent: taking a job failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn trace(&self, job: &Job, token: &str, size: &mut u64, text: &str) {
        match self
            .coordinator
            .append_trace(job.id, token, *size, text.as_bytes())
        {
            Ok(new_size) => *size = new_size,
            Err(e) => tracing::debug!(job = job.id, error = ?e, "trace not appended"),
        }
    }

    async fn run(&self, job: Job, token: &str) {
        let mut size = 0;
        let outcome = self.run_steps(&job, token, &mut size).await;
        let (state, exit_code, reason) = match outcome {
            Outcome::Exited(0) => ("success", Some(0), None),
            Outcome::Exited(code) => ("failed", Some(i64::from(code)), Some("script_failure")),
            Outcome::TimedOut => ("failed", None, Some("job_execution_timeout")),
            Outcome::SystemFailure(message) => {
                self.trace(&job, token, &mut size, &format!("\nERROR: {message}\n"));
                ("failed", None, Some("runner_system_failure"))
            }
            Outcome::Canceled => return,
        };
        if let Err(e) = self.coordinator.update(
            job.id,
            token,
            Some(state),
            exit_code,
            reason.map(String::from),
        ) {
            tracing::debug!(job = job.id, error = ?e, "job state not reported");
        }
    }

    async fn run_steps(&self, job: &Job, token: &str, size: &mut u64) -> Outcome {
        let spec = &job.spec;
        let env_id = match spec.execution_environment_id {
            Some(id) => id,
            None => match self
                .manager
                .environments()
                .into_iter()
                .find(|e| Some(&e.image) == spec.image.as_ref())
            {
                Some(env) => env.id,
                None => {
                    return Outcome::SystemFailure(format!(
                        "no execution environment runs image {:?}: create one, or give executionEnvironmentId",
                        spec.image.as_deref().unwrap_or("")
                    ))
                }
            },
        };
        // The inactivity timeout only matters if the server dies mid-job: the runner it
        // adopts afterwards then goes away on its own.
        let idle = Duration::from_secs(spec.timeout + AFTER_SCRIPT_TIMEOUT + 60);
        let runner = match self.manager.claim_runner(env_id, idle).await {
            Ok(runner) => runner,
            Err(e) => return Outcome::SystemFailure(format!("no runner: {e}")),
        };
        let outcome = self.in_runner(job, token, size, &runner.id).await;
        let _ = self.manager.delete_runner(&runner.id).await;
        outcome
    }

    async fn in_runner(&self, job: &Job, token: &str, size: &mut u64, runner: &str) -> Outcome {
        let spec = &job.spec;
        let files: Vec<FileCopy> = spec
            .files
            .iter()
            .map(|f| FileCopy {
                path: f.path.clone(),
                content_base64: f.content.clone(),
            })
            .collect();
        if let Err(e) = self.manager.patch_files(runner, Vec::new(), files).await {
            return Outcome::SystemFailure(format!("placing the job's files: {e}"));
        }
        let mut environment: Vec<(String, String)> = vec![
            ("CI".into(), "true".into()),
            ("CI_JOB_ID".into(), job.id.to_string()),
            ("CI_JOB_NAME".into(), spec.name.clone()),
            ("CI_JOB_TOKEN".into(), token.to_string()),
        ];
        environment.extend(spec.variables.iter().map(|(k, v)| (k.clone(), v.clone())));
        let script = step_script(&spec.script);
        self.trace(
            job,
            token,
            size,
            &format!("$ {}\n", spec.script.join("\n$ ")),
        );
        let outcome = self
            .execute(
                job,
                token,
                size,
                runner,
                &script,
                &environment,
                spec.timeout,
            )
            .await;
        if matches!(outcome, Outcome::Canceled) || spec.after_script.is_empty() {
            return outcome;
        }
        let after = step_script(&spec.after_script);
        self.trace(job, token, size, "\nRunning after_script\n");
        let _ = self
            .execute(
                job,
                token,
                size,
                runner,
                &after,
                &environment,
                AFTER_SCRIPT_TIMEOUT,
            )
            .await;
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        job: &Job,
        token: &str,
        size: &mut u64,
        runner: &str,
        script: &str,
        environment: &[(String, String)],
        timeout: u64,
    ) -> Outcome {
        let request = ExecutionRequest {
            command: script.to_string(),
            privileged: false,
            environment: environment.to_vec(),
            time_limit: timeout,
        };
        let prepared = self
            .manager
            .prepare_execution(runner, request)
            .map_err(|e| e.to_string());
        let started = match prepared {
            Ok(id) => self
                .manager
                .start_execution(runner, &id)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let mut running = match started {
            Ok(running) => running,
            Err(e) => return Outcome::SystemFailure(e),
        };
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let mut last_heartbeat = std::time::Instant::now();
        loop {
            tokio::select! {
                message = running.messages.recv() => match message {
                    Some(ExecMessage::Stdout(text)) | Some(ExecMessage::Stderr(text)) => {
                        self.trace(job, token, size, &text);
                    }
                    Some(ExecMessage::Exit(code)) => return Outcome::Exited(code),
                    Some(ExecMessage::Timeout) => return Outcome::TimedOut,
                    Some(ExecMessage::Error(message)) => return Outcome::SystemFailure(message),
                    None => return Outcome::SystemFailure("the execution vanished".into()),
                },
                _ = check.tick() => {
                    // Cancelled from the jobs API: dropping the execution kills it.
                    if self.coordinator.get(job.id).is_none_or(|j| j.status.is_finished()) {
                        return Outcome::Canceled;
                    }
                    // A silent job still has its agent.
                    if last_heartbeat.elapsed() >= HEARTBEAT {
                        last_heartbeat = std::time::Instant::now();
                        let _ = self.coordinator.update(job.id, token, None, None, None);
                    }
                }
            }
        }
    }
}

enum Outcome {
    Exited(u8),
    TimedOut,
    Canceled,
    SystemFailure(String),
}

/// One shell script of a step: stops at the first failing line, as GitLab's does.
fn step_script(lines: &[String]) -> String {
    format!("set -eo pipefail\n{}", lines.join("\n"))
}
