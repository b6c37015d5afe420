//! `/api/v4/jobs/...`: what agents call to take a job, report on it and stream its trace.
//! (Artifacts are in `agent_artifacts.rs`.)

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use trident_jobs::coordinator::{Assignment, StateUpdate, UpdateOutcome};
use trident_jobs::jobs::Job;
use trident_jobs::store::RegisteredAgent;
use trident_jobs::variables;

use crate::agents::authenticate;
use crate::error::{with_header, GitlabError, GitlabResult};
use crate::params::{ParamError, Params};
use crate::GitlabState;

/// Seconds agents wait between trace patches (and between retries of a held-back update).
const TRACE_UPDATE_INTERVAL: &str = "3";

/// The job token of a request: the `JOB-TOKEN` header, or the `token` query parameter.
pub(crate) fn job_token(
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
) -> String {
    headers
        .get("job-token")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| query.get("token").cloned())
        .unwrap_or_default()
}

/// Runs a coordinator call that may wait for the disk (durable writes) off the async
/// workers.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &GitlabState,
    call: impl FnOnce(&trident_jobs::Coordinator) -> T + Send + 'static,
) -> GitlabResult<T> {
    let coordinator = state.coordinator.clone();
    tokio::task::spawn_blocking(move || call(&coordinator))
        .await
        .map_err(|e| GitlabError::Internal(e.to_string()))
}

/// `POST /jobs/request`: a matching job at once, or as soon as one is queued (or, with
/// `job_age`, old enough), or 204 after the long-poll time.
pub async fn request(
    State(state): State<GitlabState>,
    headers: HeaderMap,
    params: Params,
) -> GitlabResult {
    let (_, agent) = authenticate(&state, &params)?;
    let min_age = Duration::from_secs(params.integer("job_age")?.unwrap_or(0).max(0) as u64);
    let coordinator = state.coordinator.clone();
    let waiter = coordinator.waiter(&agent);
    let deadline = Instant::now() + state.config.request_poll;
    loop {
        let version = coordinator.queue_version();
        let mut wake_at = deadline;
        let assigning = agent.clone();
        let assignment = blocking(&state, move |c| c.assign(&assigning, min_age))
            .await?
            // GitLab's 409: the job could not be given to this agent (here: storing the
            // assignment failed), it stays queued, and the agent asks again.
            .map_err(|e| GitlabError::Conflict(e.to_string()))?;
        match assignment {
            Assignment::Job(job, token) => {
                let host = headers
                    .get(axum::http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("localhost");
                let mut body = payload(&job, &token, &format!("http://{host}"), &agent);
                body["dependencies"] = Value::Array(dependencies(&state, &job, &token));
                return Ok((StatusCode::CREATED, Json(body)).into_response());
            }
            Assignment::Nothing(too_young) => {
                if let Some(wait) = too_young {
                    wake_at = wake_at.min(Instant::now() + wait);
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(with_header(
                StatusCode::NO_CONTENT.into_response(),
                "x-gitlab-last-update",
                &version.to_string(),
            ));
        }
        tokio::select! {
            () = waiter.notified() => {}
            () = tokio::time::sleep(wake_at.saturating_duration_since(now)) => {}
        }
    }
}

/// The job's dependencies as the payload lists them; their archives are fetched with this
/// job's own token (see `agent_artifacts::download`).
fn dependencies(state: &GitlabState, job: &Job, token: &str) -> Vec<Value> {
    job.spec
        .dependencies
        .iter()
        .filter_map(|id| state.coordinator.get(*id))
        .map(|dependency| {
            let mut entry = json!({"id": dependency.id, "name": dependency.spec.name,
                                   "token": token});
            // GitLab (`entities/ci/job_request/dependency.rb`) leaves the key out when there
            // is nothing to download: agents test for its presence.
            if let Some(a) = dependency.state.uploaded_artifacts.get("archive") {
                let filename = trident_http::disposition::base_name(&a.filename, "artifacts.zip");
                entry["artifacts_file"] = json!({"filename": filename, "size": a.size});
            }
            entry
        })
        .collect()
}

/// The job as agents expect it (the fields the Go agent and the Rust crate read).
fn payload(job: &Job, token: &str, server_url: &str, agent: &RegisteredAgent) -> Value {
    let spec = &job.spec;
    let variables: Vec<Value> = variables::for_job(
        job,
        token,
        server_url,
        agent,
        variables::DEFAULT_PROJECT_DIR,
    )
    .into_iter()
    .map(|v| json!({"key": v.key, "value": v.value, "public": v.public, "masked": v.masked}))
    .collect();
    let mut steps = vec![
        json!({"name": "script", "script": spec.script, "timeout": job.timeout(),
                                "when": "on_success", "allow_failure": false}),
    ];
    if !spec.after_script.is_empty() {
        steps.push(json!({"name": "after_script", "script": spec.after_script,
                          "timeout": job.timeout(), "when": "always", "allow_failure": true}));
    }
    let artifacts = spec.artifacts.as_ref().map(|a| {
        json!([{"name": "artifacts", "untracked": false, "paths": a.paths, "when": a.when.as_str(),
                "artifact_type": "archive", "artifact_format": "zip", "expire_in": a.expire_in}])
    });
    json!({
        "id": job.id,
        "token": token,
        "allow_git_fetch": false,
        "job_info": {"id": job.id, "name": spec.name, "stage": "test", "project_id": 0,
                     "project_name": "jobs"},
        "git_info": {"repo_url": "", "ref": "main", "sha": variables::BLANK_SHA,
                     "before_sha": variables::BLANK_SHA, "ref_type": "branch",
                     "refspecs": [], "depth": 0},
        "runner_info": {"timeout": job.timeout(), "runner_session_url": null},
        "variables": variables,
        "steps": steps,
        "image": spec.image.as_ref().map(|name| json!({"name": name, "entrypoint": null})),
        "services": [],
        "artifacts": artifacts,
        "cache": [],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": true,
                     "failure_reasons": trident_jobs::coordinator::FAILURE_REASONS},
    })
}

/// `PUT /jobs/:id`: the agent reports the job's state. With a final state it may send the
/// CRC32 (`checksum` or `output[checksum]`, as `crc32:<hex>`) and size (`output[bytesize]`) of
/// the whole trace: while the stored trace lacks some of it, the answer is 202 and the agent
/// sends the rest and asks again.
pub async fn update(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    params: Params,
) -> GitlabResult {
    let output = Params(
        params
            .object("output")?
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    let checksum = match output.string("checksum")? {
        Some(checksum) => Some(checksum),
        None => params.string("checksum")?,
    };
    let bytesize = output.integer("bytesize")?;
    if bytesize.is_some_and(|b| b < 0) {
        return Err(GitlabError::param("output[bytesize] is invalid"));
    }
    let token = params.required_string("token")?;
    let update = StateUpdate {
        // `Ci::UpdateBuildStateService` knows these; anything else is a 400.
        state: params.one_of("state", &["running", "success", "failed", "pending"])?,
        // Exit codes as agents report them: signed 32-bit, or Windows' unsigned ones.
        exit_code: params.integer_in("exit_code", i64::from(i32::MIN)..=i64::from(u32::MAX))?,
        failure_reason: params.string("failure_reason")?,
        checksum: checksum.map(|c| parse_checksum(&c)).transpose()?,
        bytesize: bytesize.map(|b| b as u64),
    };
    let (status, job) = match blocking(&state, move |c| c.update(id, &token, update)).await?? {
        UpdateOutcome::Done(job) => (StatusCode::OK, job),
        UpdateOutcome::Accepted(job) => (StatusCode::ACCEPTED, job),
    };
    let response = with_header(
        status.as_u16().to_string().into_response(),
        "job-status",
        job.state.status.as_str(),
    );
    let mut response = with_header(
        response,
        "x-gitlab-trace-update-interval",
        TRACE_UPDATE_INTERVAL,
    );
    *response.status_mut() = status;
    Ok(response)
}

/// A trace checksum as agents send it: `crc32:` and eight hex digits (the prefix optional).
fn parse_checksum(text: &str) -> Result<u32, ParamError> {
    let hex = text.strip_prefix("crc32:").unwrap_or(text);
    u32::from_str_radix(hex, 16)
        .map_err(|_| ParamError(format!("checksum {text:?} is not crc32:<hex>")))
}

/// `PATCH /jobs/:id/trace`: appends `Content-Range: start-end` bytes. The hot path of a
/// running job: it costs a file append and a small state row (no fsync).
pub async fn trace(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> GitlabResult {
    let token = job_token(&headers, &query);
    let start = headers
        .get(axum::http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|range| range.split_once('-'))
        .and_then(|(start, _end)| start.trim().parse::<u64>().ok())
        .ok_or_else(|| GitlabError::param("Content-Range is missing or malformed"))?;
    let size = state.coordinator.append_trace(id, &token, start, &body)?;
    let mut response = StatusCode::ACCEPTED.into_response();
    for (name, value) in [
        ("range", format!("0-{size}")),
        ("job-status", "running".to_string()),
        (
            "x-gitlab-trace-update-interval",
            TRACE_UPDATE_INTERVAL.to_string(),
        ),
    ] {
        response = with_header(response, name, &value);
    }
    Ok(response)
}
