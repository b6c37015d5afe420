//! `/api/v1/jobs`: trident's own jobs API for clients (same `Poseidon-Token` as the rest of
//! `/api/v1`, and the same error bodies: `{"message": ...}`).
//!
//! [`JobBody`] is what clients send and [`JobView`] what they see; both are turned into and
//! from the domain's `JobSpec`/`Job` here, so that neither the store's rows nor internal
//! state (token hashes, checksums) ever become API.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use trident_jobs::jobs::{
    ArtifactsSpec, ArtifactsWhen, Job, JobFile, JobSpec, JobStatus, JobVariable, DEFAULT_TIMEOUT,
};

use crate::agent_jobs::blocking;
use crate::GitlabState;

/// An error of the jobs API, as the Poseidon API words errors.
pub struct JobsApiError {
    status: StatusCode,
    message: String,
}

impl JobsApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        JobsApiError {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        JobsApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn missing(id: i64) -> Self {
        JobsApiError::new(StatusCode::NOT_FOUND, format!("job {id} does not exist"))
    }
}

impl<E: std::fmt::Display> From<E> for JobsApiError {
    fn from(e: E) -> Self {
        JobsApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for JobsApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"message": self.message}))).into_response();
        if self.status.is_server_error() {
            response
                .extensions_mut()
                .insert(trident_http::ServerError(self.message));
        }
        response
    }
}

type JobsResult<T = Response> = Result<T, JobsApiError>;

/// A job as a client submits it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobBody {
    name: String,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    execution_environment_id: Option<u64>,
    script: Vec<String>,
    #[serde(default)]
    after_script: Vec<String>,
    #[serde(default)]
    variables: BTreeMap<String, VariableBody>,
    #[serde(default)]
    tags: Vec<String>,
    /// Seconds.
    #[serde(default = "default_timeout")]
    timeout: u64,
    #[serde(default)]
    files: Vec<FileBody>,
    #[serde(default)]
    artifacts: Option<ArtifactsBody>,
    #[serde(default)]
    dependencies: Vec<i64>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT
}

/// A variable: a plain value, or `{"value": ..., "masked": true}` for a secret.
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum VariableBody {
    Plain(String),
    Detailed {
        value: String,
        #[serde(default)]
        masked: bool,
    },
}

#[derive(Deserialize, Serialize)]
struct FileBody {
    path: String,
    /// Base64.
    #[serde(default)]
    content: String,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactsBody {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    expire_in: Option<String>,
}

impl JobBody {
    fn into_spec(self) -> Result<JobSpec, JobsApiError> {
        // Refused here, with the file named, rather than failing the job when it runs.
        for file in &self.files {
            if let Err(e) = base64::engine::general_purpose::STANDARD.decode(&file.content) {
                return Err(JobsApiError::bad(format!(
                    "the content of the file {:?} is not valid base64: {e}",
                    file.path
                )));
            }
        }
        let artifacts = match self.artifacts {
            None => None,
            Some(a) => Some(ArtifactsSpec {
                paths: a.paths,
                when: match a.when.as_deref() {
                    None => ArtifactsWhen::default(),
                    Some(when) => ArtifactsWhen::parse(when).ok_or_else(|| {
                        JobsApiError::bad(format!(
                            "artifacts.when must be on_success, on_failure or always, not {when:?}"
                        ))
                    })?,
                },
                expire_in: a.expire_in,
            }),
        };
        Ok(JobSpec {
            name: self.name,
            image: self.image,
            execution_environment_id: self.execution_environment_id,
            script: self.script,
            after_script: self.after_script,
            variables: self
                .variables
                .into_iter()
                .map(|(k, v)| {
                    let variable = match v {
                        VariableBody::Plain(value) => JobVariable {
                            value,
                            masked: false,
                        },
                        VariableBody::Detailed { value, masked } => JobVariable { value, masked },
                    };
                    (k, variable)
                })
                .collect(),
            tags: self.tags,
            timeout: self.timeout,
            files: self
                .files
                .into_iter()
                .map(|f| JobFile {
                    path: f.path,
                    content_base64: f.content,
                })
                .collect(),
            artifacts,
            dependencies: self.dependencies,
        })
    }
}

/// A job as clients see it: what they asked for (masked values shown as masked) and what
/// happened; no token material, no files' contents.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    id: i64,
    name: String,
    image: Option<String>,
    execution_environment_id: Option<u64>,
    script: Vec<String>,
    after_script: Vec<String>,
    variables: BTreeMap<String, VariableBody>,
    tags: Vec<String>,
    timeout: u64,
    files: Vec<String>,
    artifacts: Option<ArtifactsBody>,
    dependencies: Vec<i64>,
    status: &'static str,
    exit_code: Option<i64>,
    failure_reason: Option<String>,
    agent_id: Option<i64>,
    created_at: u64,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    trace_size: u64,
    uploaded_artifacts: BTreeMap<String, ArtifactView>,
    last_seen: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactView {
    filename: String,
    format: String,
    size: u64,
    expire_at: Option<u64>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        let spec = &job.spec;
        JobView {
            id: job.id,
            name: spec.name.clone(),
            image: spec.image.clone(),
            execution_environment_id: spec.execution_environment_id,
            script: spec.script.clone(),
            after_script: spec.after_script.clone(),
            variables: spec
                .variables
                .iter()
                .map(|(k, v)| {
                    let shown = if v.masked {
                        VariableBody::Detailed {
                            value: "[MASKED]".into(),
                            masked: true,
                        }
                    } else {
                        VariableBody::Plain(v.value.clone())
                    };
                    (k.clone(), shown)
                })
                .collect(),
            tags: spec.tags.clone(),
            timeout: job.timeout(),
            files: spec.files.iter().map(|f| f.path.clone()).collect(),
            artifacts: spec.artifacts.as_ref().map(|a| ArtifactsBody {
                paths: a.paths.clone(),
                when: Some(a.when.as_str().into()),
                expire_in: a.expire_in.clone(),
            }),
            dependencies: spec.dependencies.clone(),
            status: job.state.status.as_str(),
            exit_code: job.state.exit_code,
            failure_reason: job.state.failure_reason.clone(),
            agent_id: job.state.agent_id,
            created_at: job.created_at,
            started_at: job.state.started_at,
            finished_at: job.state.finished_at,
            trace_size: job.state.trace_size,
            uploaded_artifacts: job
                .state
                .uploaded_artifacts
                .iter()
                .map(|(kind, a)| {
                    let view = ArtifactView {
                        filename: a.filename.clone(),
                        format: a.format.clone(),
                        size: a.size,
                        expire_at: a.expire_at,
                    };
                    (kind.clone(), view)
                })
                .collect(),
            last_seen: job.state.last_seen,
        }
    }
}

pub async fn require_token(
    State(state): State<GitlabState>,
    request: Request,
    next: Next,
) -> Response {
    match trident_http::check_token(state.config.api_token.as_deref(), request, 0).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused,
    }
}

pub async fn create(State(state): State<GitlabState>, request: Request) -> JobsResult {
    let body = Bytes::from_request(request, &())
        .await
        .map_err(|r| JobsApiError::new(r.status(), r.body_text()))?;
    // serde would read a job from a JSON array too.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(JobsApiError::bad("a job must be a JSON object"));
    }
    let body: JobBody = serde_json::from_slice(&body)
        .map_err(|e| JobsApiError::bad(format!("invalid job: {e}")))?;
    let spec = body.into_spec()?;
    if spec.name.trim().is_empty() {
        return Err(JobsApiError::bad("a job needs a name"));
    }
    if spec.script.is_empty() {
        return Err(JobsApiError::bad("a job needs a script"));
    }
    let max = trident_core::model::MAX_DURATION_SECONDS;
    if spec.timeout == 0 || spec.timeout > max {
        return Err(JobsApiError::bad(format!(
            "timeout must be between 1 and {max} seconds"
        )));
    }
    for dependency in &spec.dependencies {
        if state.coordinator.get(*dependency).is_none() {
            return Err(JobsApiError::bad(format!(
                "dependency {dependency} does not exist"
            )));
        }
    }
    let job = blocking(&state, move |c| c.submit(spec))
        .await
        .map_err(|e| JobsApiError::from(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(JobView::from(job))).into_response())
}

pub async fn list(
    State(state): State<GitlabState>,
    Query(query): Query<HashMap<String, String>>,
) -> JobsResult {
    let status = match query.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(
            JobStatus::parse(s)
                .ok_or_else(|| JobsApiError::bad(format!("unknown status {s:?}")))?,
        ),
    };
    let jobs: Vec<JobView> = state
        .coordinator
        .list(status)
        .into_iter()
        .map(JobView::from)
        .collect();
    Ok(Json(json!({ "jobs": jobs })).into_response())
}

pub async fn get(State(state): State<GitlabState>, Path(id): Path<i64>) -> JobsResult {
    let job = state
        .coordinator
        .get(id)
        .ok_or_else(|| JobsApiError::missing(id))?;
    Ok(Json(JobView::from(job)).into_response())
}

/// The trace from `offset` (default 0): a client follows a running job by asking again
/// from the size it has. Streamed: a trace may be as large as the limit allows.
pub async fn trace(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<HashMap<String, String>>,
) -> JobsResult {
    let job = state
        .coordinator
        .get(id)
        .ok_or_else(|| JobsApiError::missing(id))?;
    let offset = match query.get("offset").map(|o| o.parse::<u64>()) {
        None => 0,
        Some(Ok(offset)) => offset,
        Some(Err(_)) => return Err(JobsApiError::bad("offset must be a number")),
    };
    let headers = [
        ("content-type", "text/plain; charset=utf-8".to_string()),
        ("x-trace-size", job.state.trace_size.to_string()),
        ("x-job-status", job.state.status.as_str().to_string()),
    ];
    Ok(match state.coordinator.open_trace(id, offset)? {
        Some(file) => {
            // What the job's record counts, no more (the agent may be appending right now).
            let length = job.state.trace_size.saturating_sub(offset);
            let file = tokio::io::AsyncReadExt::take(tokio::fs::File::from_std(file), length);
            (
                headers,
                axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
            )
                .into_response()
        }
        None => (headers, "").into_response(),
    })
}

pub async fn cancel(State(state): State<GitlabState>, Path(id): Path<i64>) -> JobsResult {
    let job = blocking(&state, move |c| c.cancel(id))
        .await
        .map_err(|e| JobsApiError::from(e.to_string()))??
        .ok_or_else(|| JobsApiError::missing(id))?;
    Ok(Json(JobView::from(job)).into_response())
}

/// The job's archive artifact.
pub async fn artifacts(State(state): State<GitlabState>, Path(id): Path<i64>) -> JobsResult {
    let missing = || JobsApiError::new(StatusCode::NOT_FOUND, format!("job {id} has no artifacts"));
    let (path, artifact) = state.coordinator.artifact(id).ok_or_else(missing)?;
    crate::agent_artifacts::serve_file(path, artifact)
        .await
        .ok_or_else(missing)
}
