//! The built-in agent: takes jobs from the same queue, by the same matching rules, as
//! external agents, and runs them in fresh sandbox runners through the core's `Manager`, so
//! that one machine needs nothing else. It reports through the same token-checked calls an
//! external agent makes, so both leave identical traces and states.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use trident_core::execution::ExecMessage;
use trident_core::model::{ExecutionRequest, FileCopy};
use trident_core::Manager;

use crate::coordinator::{Assignment, Coordinator, StateUpdate};
use crate::jobs::Job;
use crate::store::RegisteredAgent;
use crate::variables;

/// The built-in agent's id in job records (registered agents start at 1).
pub const BUILTIN_AGENT_ID: i64 = 0;

/// How often a running job says it is alive (well inside any sane `job_stale_seconds`).
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Where jobs run in a runner.
const WORKSPACE: &str = "/workspace";

/// How long after_script may run.
const AFTER_SCRIPT_TIMEOUT: u64 = 300;

/// What an operator chooses about the built-in agent; `Default` holds the defaults.
#[derive(Debug, Clone)]
pub struct BuiltinAgentConfig {
    /// Run jobs on this machine at all (false: only external agents take them).
    pub enabled: bool,
    /// Its tags; it also runs untagged jobs.
    pub tags: Vec<String>,
    /// Jobs it runs at once.
    pub concurrency: usize,
}

impl Default for BuiltinAgentConfig {
    fn default() -> Self {
        BuiltinAgentConfig {
            enabled: true,
            tags: Vec::new(),
            concurrency: 2,
        }
    }
}

pub struct BuiltinAgent {
    pub manager: Manager,
    pub coordinator: Arc<Coordinator>,
    pub tags: Vec<String>,
    /// How jobs reach trident (`CI_SERVER_URL` and friends).
    pub server_url: String,
    /// The largest archive it uploads (the limit external agents have too).
    pub max_artifact_bytes: u64,
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
        let waiter = self.coordinator.waiter(&agent);
        loop {
            match self.coordinator.assign(&agent, Duration::ZERO) {
                Ok(Assignment::Job(job, token)) => {
                    // Each job on a task of its own: whatever goes wrong in one (a panic
                    // included) fails that job, and the worker goes on with the next.
                    let id = job.id;
                    let worker = self.clone();
                    let job_token = token.clone();
                    let run = tokio::spawn(async move { worker.run(*job, &job_token).await });
                    if let Err(e) = run.await {
                        tracing::error!(job = id, error = %e, "built-in agent: the job's task failed");
                        let update = StateUpdate {
                            state: Some("failed".into()),
                            failure_reason: Some("runner_system_failure".into()),
                            ..StateUpdate::default()
                        };
                        let _ = self.coordinator.update(id, &token, update);
                    }
                }
                Ok(Assignment::Nothing(_)) => {
                    // Woken by a new job, or after a while in case a wake-up was missed.
                    let _ = tokio::time::timeout(Duration::from_secs(5), waiter.notified()).await;
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
        let update = StateUpdate {
            state: Some(state.into()),
            exit_code,
            failure_reason: reason.map(String::from),
            ..StateUpdate::default()
        };
        if let Err(e) = self.coordinator.update(job.id, token, update) {
            tracing::debug!(job = job.id, error = ?e, "job state not reported");
        }
    }

    async fn run_steps(&self, job: &Job, token: &str, size: &mut u64) -> Outcome {
        let spec = &job.spec;
        // The inactivity timeout only matters if the server dies mid-job: the runner it
        // adopts afterwards then goes away on its own.
        let idle = Duration::from_secs(
            job.timeout()
                .saturating_add(AFTER_SCRIPT_TIMEOUT + 60)
                .min(trident_core::model::MAX_DURATION_SECONDS),
        );
        let pooled = match spec.execution_environment_id {
            Some(id) => Some(id),
            None => self
                .manager
                .environments()
                .into_iter()
                .find(|e| Some(&e.image) == spec.image.as_ref())
                .map(|env| env.id),
        };
        let claimed = match (pooled, spec.image.as_deref()) {
            (Some(env_id), _) => self.manager.claim_runner(env_id, idle).await,
            // A job naming only an image gets a fresh runner of it, as GitLab's runners
            // start a container per job; pulling the image counts against the job's time.
            (None, Some(image)) => {
                self.trace(
                    job,
                    token,
                    size,
                    &format!("Preparing a runner of image {image}\n"),
                );
                let wait = Duration::from_secs(job.timeout());
                self.manager.create_one_off_runner(image, idle, wait).await
            }
            (None, None) => {
                return Outcome::SystemFailure(
                    "the job names neither an image nor executionEnvironmentId".into(),
                )
            }
        };
        let runner = match claimed {
            Ok(runner) => runner,
            Err(e) => return Outcome::SystemFailure(format!("no runner: {e}")),
        };
        let outcome = self.in_runner(job, token, size, &runner.id).await;
        let _ = self.manager.delete_runner(&runner.id).await;
        outcome
    }

    async fn in_runner(&self, job: &Job, token: &str, size: &mut u64, runner: &str) -> Outcome {
        let spec = &job.spec;
        let mut files = Vec::with_capacity(spec.files.len());
        for f in &spec.files {
            match base64::engine::general_purpose::STANDARD.decode(&f.content_base64) {
                Ok(content) => files.push(FileCopy {
                    path: f.path.clone(),
                    content,
                }),
                Err(e) => {
                    return Outcome::SystemFailure(format!(
                        "the content of the job's file {} is not valid base64: {e}",
                        f.path
                    ))
                }
            }
        }
        if let Err(e) = self.manager.patch_files(runner, Vec::new(), files).await {
            return Outcome::SystemFailure(format!("placing the job's files: {e}"));
        }
        let room = self
            .manager
            .runner(runner)
            .ok()
            .and_then(|r| r.writable_bytes())
            .unwrap_or(DEFAULT_ARTIFACT_ROOM);
        let mut placed_bytes = 0;
        for dependency in &spec.dependencies {
            let left = room.saturating_sub(placed_bytes);
            match self.place_dependency(runner, *dependency, left).await {
                Ok((count, bytes)) => {
                    placed_bytes += bytes;
                    self.trace(
                        job,
                        token,
                        size,
                        &format!("Fetched {count} files from job {dependency}'s artifacts\n"),
                    );
                }
                Err(e) => return Outcome::SystemFailure(e),
            }
        }
        // The job runs in the runner's workspace (CI_PROJECT_DIR says so).
        let environment: Vec<(String, String)> =
            variables::for_job(job, token, &self.server_url, &self.identity(), WORKSPACE)
                .into_iter()
                .map(|v| (v.key, v.value))
                .collect();
        let script = step_script(&spec.script);
        let outcome = self
            .execute(
                job,
                token,
                size,
                runner,
                &script,
                &environment,
                job.timeout(),
            )
            .await;
        if matches!(outcome, Outcome::Canceled) {
            return outcome;
        }
        if !spec.after_script.is_empty() {
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
        }
        if let Some(artifacts) = &spec.artifacts {
            let succeeded = matches!(outcome, Outcome::Exited(0));
            let wanted = artifacts.when.applies(succeeded);
            if wanted && !artifacts.paths.is_empty() {
                if let Err(e) = self.upload_artifacts(job, token, runner, artifacts).await {
                    self.trace(
                        job,
                        token,
                        size,
                        &format!("\nERROR: collecting artifacts: {e}\n"),
                    );
                    return Outcome::SystemFailure(format!("collecting artifacts: {e}"));
                }
                self.trace(job, token, size, "\nUploaded artifacts\n");
            }
        }
        outcome
    }

    /// Zips `artifacts.paths` (relative to the workspace) from the runner, reading every file
    /// through the runner's own file API, and uploads it as the job's archive. The zip is
    /// written to its upload file on a blocking thread as the files stream in, a chunk at a
    /// time: no file is ever whole in memory, and the archive is bounded by the artifact
    /// limit.
    async fn upload_artifacts(
        &self,
        job: &Job,
        token: &str,
        runner: &str,
        artifacts: &crate::jobs::ArtifactsSpec,
    ) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let upload = self.coordinator.artifact_upload_path(job.id);
        if let Some(dir) = upload.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<ZipPiece>(8);
        let writer = {
            let upload = upload.clone();
            let max = self.max_artifact_bytes;
            tokio::task::spawn_blocking(move || write_zip(&upload, chunks_rx, max))
        };
        let send = |piece: ZipPiece| {
            let chunks_tx = chunks_tx.clone();
            async move {
                tokio::task::spawn_blocking(move || chunks_tx.send(piece).is_ok())
                    .await
                    .unwrap_or(false)
            }
        };
        let streamed: Result<(), String> = async {
            for path in &artifacts.paths {
                if path.starts_with('/') || path.split('/').any(|part| part == "..") {
                    return Err(format!(
                        "artifact path {path:?} must stay inside the workspace"
                    ));
                }
                let entries = match self.manager.list_files(runner, path, true, true).await {
                    Ok(entries) => entries,
                    Err(trident_core::Error::FileUnavailable(_)) => continue, // nothing there
                    Err(e) => return Err(e.to_string()),
                };
                for entry in entries.into_iter().filter(|e| e.entry_type == "-") {
                    let name = entry.name.trim_start_matches("./").to_string();
                    let mut file = self
                        .manager
                        .open_file(runner, &entry.name, true)
                        .await
                        .map_err(|e| e.to_string())?;
                    if !send(ZipPiece::File(name)).await {
                        return Ok(()); // the writer stopped; it says why
                    }
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = file
                            .content
                            .read(&mut buffer)
                            .await
                            .map_err(|e| e.to_string())?;
                        if n == 0 {
                            break;
                        }
                        if !send(ZipPiece::Bytes(buffer[..n].to_vec())).await {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        drop(chunks_tx);
        let written = writer.await.map_err(|e| e.to_string())?;
        let size = match (streamed, written) {
            (Ok(()), Ok(size)) => size,
            (Err(e), _) | (Ok(()), Err(e)) => {
                let _ = std::fs::remove_file(&upload);
                return Err(e);
            }
        };
        let expire_at = crate::jobs::parse_expire_in(artifacts.expire_in.as_deref().unwrap_or(""))?
            .map(|seconds| crate::jobs::now().saturating_add(seconds));
        let artifact = crate::jobs::StoredArtifact {
            filename: "artifacts.zip".into(),
            format: "zip".into(),
            size,
            expire_at,
        };
        self.coordinator
            .record_artifact(job.id, token, &upload, "archive", artifact)
            .map_err(|e| {
                let _ = std::fs::remove_file(&upload);
                format!("{e:?}")
            })
    }

    /// Places the files of a dependency's archive in the runner's workspace: the zip is read
    /// in a blocking thread, one entry at a time, into a pipe the runner's file API drains,
    /// so memory stays the same whatever the archive inflates to; more than `room` bytes
    /// (the runner's writable space) is refused, by the sizes the archive declares and by
    /// what it really inflates to. Entries that would leave the workspace, links and
    /// directories are skipped; the archive is never unpacked on the host. Returns the
    /// files placed and their bytes.
    async fn place_dependency(
        &self,
        runner: &str,
        dependency: i64,
        room: u64,
    ) -> Result<(usize, u64), String> {
        let Some((path, _)) = self.coordinator.artifact(dependency) else {
            return Ok((0, 0));
        };
        let (entries_tx, mut entries_rx) =
            tokio::sync::mpsc::channel::<(String, std::os::fd::OwnedFd)>(1);
        let inflate = tokio::task::spawn_blocking(move || {
            inflate_entries(&path, dependency, room, entries_tx)
        });
        let mut placed = 0;
        let mut written = 0;
        let mut failure = None;
        while let Some((name, pipe)) = entries_rx.recv().await {
            let content = match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
                Ok(content) => content,
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            };
            match self
                .manager
                .write_file(runner, &name, Box::new(content))
                .await
            {
                Ok(bytes) => {
                    placed += 1;
                    written += bytes;
                }
                Err(e) => {
                    failure = Some(format!("placing job {dependency}'s artifacts: {e}"));
                    break;
                }
            }
        }
        drop(entries_rx);
        let inflated = inflate.await.map_err(|e| e.to_string())?;
        // The reader's reason comes first: a refused archive also breaks the write.
        inflated?;
        match failure {
            Some(e) => Err(e),
            None => Ok((placed, written)),
        }
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
        // The job's end (cancelled from the jobs API, failed for its trace): dropping the
        // execution kills it.
        let Some(mut ended) = self.coordinator.end_of(job.id) else {
            return Outcome::Canceled;
        };
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
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
                _ = ended.wait_for(Option::is_some) => return Outcome::Canceled,
                _ = heartbeat.tick() => {
                    // A silent job still has its agent.
                    let _ = self
                        .coordinator
                        .update(job.id, token, StateUpdate::default());
                }
            }
        }
    }
}

/// What the zip writer is given: the start of a file (its name), then its bytes.
enum ZipPiece {
    File(String),
    Bytes(Vec<u8>),
}

/// Runs on a blocking thread: writes the archive to `path` from the pieces as they come;
/// returns its size. An archive past `max` bytes is refused (the upload limit).
fn write_zip(
    path: &std::path::Path,
    pieces: std::sync::mpsc::Receiver<ZipPiece>,
    max: u64,
) -> Result<u64, String> {
    use std::io::{Seek, Write};
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    // A second handle on the same file tells how large the archive has grown.
    let size_probe = file.try_clone().map_err(|e| e.to_string())?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    for piece in pieces {
        match piece {
            ZipPiece::File(name) => zip.start_file(name, options).map_err(|e| e.to_string())?,
            ZipPiece::Bytes(bytes) => zip.write_all(&bytes).map_err(|e| e.to_string())?,
        }
        let written = size_probe.metadata().map_err(|e| e.to_string())?.len();
        if written > max {
            return Err(format!(
                "the artifacts are larger than the limit of {max} bytes"
            ));
        }
    }
    let mut file = zip.finish().map_err(|e| e.to_string())?;
    file.flush().map_err(|e| e.to_string())?;
    file.stream_position().map_err(|e| e.to_string())
}

/// Room for dependencies' files when the engine does not say how much a runner holds.
const DEFAULT_ARTIFACT_ROOM: u64 = 1 << 30;

/// Runs on a blocking thread: sends each file entry of the zip at `path` as a name and the
/// read end of a pipe, then inflates the entry into the pipe, never more than `room` bytes
/// in all.
fn inflate_entries(
    path: &std::path::Path,
    dependency: i64,
    room: u64,
    entries: tokio::sync::mpsc::Sender<(String, std::os::fd::OwnedFd)>,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| format!("job {dependency}'s artifacts are not a zip: {e}"))?;
    let too_big = |bytes: u64| {
        format!(
            "job {dependency}'s artifacts inflate to more than {room} bytes (at least {bytes}), \
             more than the runner can hold"
        )
    };
    let declared: u64 = (0..archive.len())
        .filter_map(|i| archive.by_index_raw(i).ok().map(|e| e.size()))
        .fold(0u64, u64::saturating_add);
    if declared > room {
        return Err(too_big(declared));
    }
    let mut total = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| e.to_string())?;
        let Some(name) = entry.enclosed_name() else {
            continue;
        };
        if entry.is_dir() || entry.is_symlink() {
            continue;
        }
        let (read_end, write_end) = std::io::pipe().map_err(|e| e.to_string())?;
        let read_end = std::os::fd::OwnedFd::from(read_end);
        if entries
            .blocking_send((name.to_string_lossy().into_owned(), read_end))
            .is_err()
        {
            return Ok(()); // the writer gave up; it says why
        }
        let mut write_end = write_end;
        // One byte beyond the room tells a lying archive from a full one.
        let mut limited = (&mut entry).take(room - total + 1);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = limited.read(&mut buffer).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > room {
                return Err(too_big(total));
            }
            if write_end.write_all(&buffer[..n]).is_err() {
                return Ok(()); // the runner stopped taking it; the writer says why
            }
        }
    }
    Ok(())
}

enum Outcome {
    Exited(u8),
    TimedOut,
    Canceled,
    SystemFailure(String),
}

/// One shell script of a step: stops at the first failing line, as GitLab's does.
/// One step's shell script. Like GitLab's shell executor, each command is announced as
/// `$ command` right before it runs, from inside the script, so that the trace shows every
/// command next to its own output; a multi-line command is announced by its first line.
fn step_script(lines: &[String]) -> String {
    // pipefail where the shell has it (bash, busybox; not dash).
    let mut script = String::from("set -e\n(set -o pipefail) 2>/dev/null && set -o pipefail\n");
    for line in lines {
        let shown = match line.split_once('\n') {
            Some((first, _)) => format!("$ {first} # collapsed multi-line command"),
            None => format!("$ {line}"),
        };
        script.push_str(&format!("printf '%s\\n' {}\n", shell_quote(&shown)));
        script.push_str(line);
        script.push('\n');
    }
    script
}

/// Single-quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::step_script;

    #[test]
    fn each_command_is_announced_right_before_it_runs() {
        let script = step_script(&[
            "echo 'it''s' \"$HOME\"".into(),
            "for i in 1 2\ndo echo $i; done".into(),
        ]);
        for shell in ["bash", "sh"] {
            let output = std::process::Command::new(shell)
                .arg("-c")
                .arg(&script)
                .env("HOME", "/home/x")
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8(output.stdout).unwrap(),
                "$ echo 'it''s' \"$HOME\"\nits /home/x\n\
                 $ for i in 1 2 # collapsed multi-line command\n1\n2\n",
                "{shell}"
            );
        }
    }
}
