//! `/api/v1/jobs`: trident's own jobs API for clients (same `Poseidon-Token` as the rest of
//! `/api/v1`).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::jobs::{Job, JobSpec, JobStatus};
use crate::{tokens, GitlabState};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"message": message.into()}))).into_response()
}

/// A job as clients see it (no token material).
fn view(mut job: Job) -> Value {
    job.token_hash = None;
    serde_json::to_value(job).unwrap_or(Value::Null)
}

pub async fn require_token(
    State(state): State<GitlabState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = state.config.api_token.as_deref() {
        let given = request
            .headers()
            .get("Poseidon-Token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !tokens::same(given, expected) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    next.run(request).await
}

pub async fn create(State(state): State<GitlabState>, request: Request) -> Response {
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    // serde would read a job from a JSON array too.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return error(StatusCode::BAD_REQUEST, "a job must be a JSON object");
    }
    let spec: JobSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid job: {e}")),
    };
    if spec.name.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "a job needs a name");
    }
    if spec.script.is_empty() {
        return error(StatusCode::BAD_REQUEST, "a job needs a script");
    }
    let max = trident_core::model::MAX_DURATION_SECONDS;
    if spec.timeout == 0 || spec.timeout > max {
        return error(
            StatusCode::BAD_REQUEST,
            format!("timeout must be between 1 and {max} seconds"),
        );
    }
    for dependency in &spec.dependencies {
        if state.coordinator.get(*dependency).is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("dependency {dependency} does not exist"),
            );
        }
    }
    match state.coordinator.submit(spec) {
        Ok(job) => (StatusCode::CREATED, Json(view(job))).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

pub async fn list(
    State(state): State<GitlabState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let status = match query.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(s) => match serde_json::from_value::<JobStatus>(json!(s)) {
            Ok(status) => Some(status),
            Err(_) => return error(StatusCode::BAD_REQUEST, format!("unknown status {s:?}")),
        },
    };
    let jobs: Vec<Value> = state
        .coordinator
        .list(status)
        .into_iter()
        .map(view)
        .collect();
    Json(json!({ "jobs": jobs })).into_response()
}

pub async fn get(State(state): State<GitlabState>, Path(id): Path<i64>) -> Response {
    match state.coordinator.get(id) {
        Some(job) => Json(view(job)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("job {id} does not exist")),
    }
}

/// The trace from `offset` (default 0): a client follows a running job by asking again
/// from the size it has.
pub async fn trace(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(job) = state.coordinator.get(id) else {
        return error(StatusCode::NOT_FOUND, format!("job {id} does not exist"));
    };
    let offset = match query.get("offset").map(|o| o.parse::<u64>()) {
        None => 0,
        Some(Ok(offset)) => offset,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "offset must be a number"),
    };
    // Streamed: a trace may be as large as the limit allows, and is never read whole.
    let headers = [
        ("content-type", "text/plain; charset=utf-8".to_string()),
        ("x-trace-size", job.trace_size.to_string()),
        ("x-job-status", job.status.as_str().to_string()),
    ];
    match state.coordinator.open_trace(id, offset) {
        Ok(Some(file)) => {
            // What the job's record counts, no more (the agent may be appending right now).
            let length = job.trace_size.saturating_sub(offset);
            let file = tokio::io::AsyncReadExt::take(tokio::fs::File::from_std(file), length);
            (
                headers,
                axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
            )
                .into_response()
        }
        Ok(None) => (headers, "").into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub async fn cancel(State(state): State<GitlabState>, Path(id): Path<i64>) -> Response {
    match state.coordinator.cancel(id) {
        Ok(Some(job)) => Json(view(job)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("job {id} does not exist")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The job's archive artifact.
pub async fn artifacts(State(state): State<GitlabState>, Path(id): Path<i64>) -> Response {
    match state.coordinator.artifact(id) {
        Some((path, artifact)) => crate::agent_jobs::serve_file(path, artifact).await,
        None => error(StatusCode::NOT_FOUND, format!("job {id} has no artifacts")),
    }
}
