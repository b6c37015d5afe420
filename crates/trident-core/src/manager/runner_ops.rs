//! What a client does with a claimed runner: files, and executions (prepared, then started
//! when their WebSocket connects).

use super::*;

impl Manager {
    pub async fn list_files(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> Result<Vec<FileHeader>> {
        let runner = self.runner(id)?;
        runner.touch();
        runner
            .sandbox
            .list_files(path, recursive, privileged)
            .await
            .map_err(Error::from)
    }

    pub async fn patch_files(
        &self,
        id: &str,
        delete: Vec<String>,
        copy: Vec<FileCopy>,
    ) -> Result<()> {
        let runner = self.runner(id)?;
        runner.touch();
        runner
            .sandbox
            .patch_files(delete, copy)
            .await
            .map_err(Error::from)
    }

    pub async fn open_file(&self, id: &str, path: &str, privileged: bool) -> Result<FileDownload> {
        let runner = self.runner(id)?;
        runner.touch();
        runner
            .sandbox
            .open_file(path, privileged)
            .await
            .map_err(Error::from)
    }

    /// Writes one file into a runner from a stream (see `Sandbox::write_file`).
    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        content: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64> {
        let runner = self.runner(id)?;
        runner.touch();
        Ok(runner.sandbox.write_file(path, content).await?)
    }

    /// Stores an execution until its WebSocket connects; returns its id. A runner holds a
    /// bounded number (and size) of them: clients that prepare without connecting cannot
    /// grow the server's memory.
    pub fn prepare_execution(&self, id: &str, request: ExecutionRequest) -> Result<String> {
        check_duration("timeLimit", request.time_limit)?;
        let runner = self.runner(id)?;
        let execution_id = uuid::Uuid::new_v4().to_string();
        let config = &self.inner.config;
        let mut activity = runner.activity();
        activity
            .pending
            .retain(|_, (at, _)| at.elapsed() < config.pending_execution_ttl);
        let held: usize = activity.pending.values().map(|(_, r)| r.size()).sum();
        if activity.pending.len() >= config.max_pending_executions
            || held + request.size() > config.max_pending_bytes
        {
            return Err(Error::TooManyPending(format!(
                "runner {id} already holds {} prepared executions ({held} bytes) that were never \
                 connected; at most {} ({} bytes) may wait: connect to their WebSockets first",
                activity.pending.len(),
                config.max_pending_executions,
                config.max_pending_bytes
            )));
        }
        activity
            .pending
            .insert(execution_id.clone(), (Instant::now(), request));
        Ok(execution_id)
    }

    /// Checks that an execution can be started, before the WebSocket upgrade is accepted.
    pub fn has_pending_execution(&self, id: &str, execution_id: &str) -> Result<()> {
        let runner = self.runner(id)?;
        let activity = runner.activity();
        match activity.pending.get(execution_id) {
            Some(_) => Ok(()),
            None => Err(Error::ExecutionNotFound(execution_id.to_string())),
        }
    }

    /// Starts a prepared execution (once). The WebSocket connect counts as activity.
    pub async fn start_execution(&self, id: &str, execution_id: &str) -> Result<RunningExecution> {
        let runner = self.runner(id)?;
        let request = {
            let mut activity = runner.activity();
            activity.last = Instant::now();
            activity
                .pending
                .remove(execution_id)
                .map(|(_, r)| r)
                .ok_or_else(|| Error::ExecutionNotFound(execution_id.to_string()))?
        };
        let mut environment = vec![("CODEOCEAN".to_string(), "true".to_string())];
        environment.extend(request.environment);
        let spec = ExecSpec {
            command: request.command,
            privileged: request.privileged,
            environment,
        };
        let ended = runner.end.subscribe();
        let started = runner.sandbox.execute(spec).await?;
        let limit = (request.time_limit > 0).then(|| Duration::from_secs(request.time_limit));
        Ok(execution::spawn(started, limit, ended))
    }
}
