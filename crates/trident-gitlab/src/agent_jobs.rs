//! `/api/v4/jobs/...`: what agents call to take a job, report on it and stream its trace.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::coordinator::{JobRefusal, TraceError};
use crate::jobs::Job;
use crate::params::Params;
use crate::runners::{authenticate, Refusal};
use crate::GitlabState;

fn with_headers(
    status: StatusCode,
    headers: &[(&'static str, String)],
    body: Response,
) -> Response {
    let mut response = body;
    *response.status_mut() = status;
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}

fn refused(refusal: JobRefusal) -> Response {
    match refusal {
        JobRefusal::Forbidden => Refusal::Forbidden.into_response(),
        JobRefusal::NotRunning(status) => with_headers(
            StatusCode::FORBIDDEN,
            &[("job-status", status.as_str().to_string())],
            Json(json!({"message": "403 Forbidden - Job is not running"})).into_response(),
        ),
    }
}

/// `POST /jobs/request`: a matching job at once, or as soon as one is queued, or 204 after
/// the long-poll time.
pub async fn request(
    State(state): State<GitlabState>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let agent = match authenticate(&state, &params) {
        Ok((_, agent)) => agent,
        Err(refusal) => return refusal.into_response(),
    };
    let coordinator = &state.coordinator;
    let mut queue = coordinator.subscribe();
    let deadline = Instant::now() + state.config.request_poll;
    loop {
        let version = *queue.borrow_and_update();
        match coordinator.assign(&agent) {
            Ok(Some((job, token))) => {
                let host = headers
                    .get(axum::http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("localhost");
                return (StatusCode::CREATED, Json(payload(&job, &token, host))).into_response();
            }
            Ok(None) => {}
            Err(e) => return Refusal::Internal(e).into_response(),
        }
        let now = Instant::now();
        if now >= deadline {
            return with_headers(
                StatusCode::NO_CONTENT,
                &[("x-gitlab-last-update", version.to_string())],
                ().into_response(),
            );
        }
        tokio::select! {
            _ = queue.changed() => {}
            () = tokio::time::sleep(deadline - now) => {}
        }
    }
}

/// The job as agents expect it (the fields the Go agent and the Rust crate read).
fn payload(job: &Job, token: &str, host: &str) -> Value {
    let spec = &job.spec;
    let mut variables = vec![
        json!({"key": "CI", "value": "true", "public": true, "masked": false}),
        json!({"key": "GITLAB_CI", "value": "true", "public": true, "masked": false}),
        json!({"key": "CI_JOB_ID", "value": job.id.to_string(), "public": true, "masked": false}),
        json!({"key": "CI_JOB_NAME", "value": spec.name, "public": true, "masked": false}),
        json!({"key": "CI_JOB_TOKEN", "value": token, "public": false, "masked": true}),
        json!({"key": "CI_SERVER_URL", "value": format!("http://{host}"), "public": true, "masked": false}),
        json!({"key": "CI_PROJECT_NAME", "value": "trident", "public": true, "masked": false}),
    ];
    for (key, value) in &spec.variables {
        variables.push(json!({"key": key, "value": value, "public": true, "masked": false}));
    }
    let mut steps = vec![
        json!({"name": "script", "script": spec.script, "timeout": spec.timeout,
                                "when": "on_success", "allow_failure": false}),
    ];
    if !spec.after_script.is_empty() {
        steps.push(json!({"name": "after_script", "script": spec.after_script,
                          "timeout": spec.timeout, "when": "always", "allow_failure": true}));
    }
    let artifacts = spec.artifacts.as_ref().map(|a| {
        json!([{"name": "artifacts", "untracked": false, "paths": a.paths, "when": a.when,
                "artifact_type": "archive", "artifact_format": "zip", "expire_in": a.expire_in}])
    });
    json!({
        "id": job.id,
        "token": token,
        "allow_git_fetch": false,
        "job_info": {"id": job.id, "name": spec.name, "stage": "test", "project_id": 0,
                     "project_name": "trident"},
        "git_info": {"repo_url": "", "ref": "", "sha": "", "before_sha": "", "ref_type": "branch",
                     "refspecs": [], "depth": 0},
        "runner_info": {"timeout": spec.timeout, "runner_session_url": null},
        "variables": variables,
        "steps": steps,
        "image": spec.image.as_ref().map(|name| json!({"name": name, "entrypoint": null})),
        "services": [],
        "artifacts": artifacts,
        "cache": [],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": true, "failure_reasons": ["script_failure",
                     "runner_system_failure", "job_execution_timeout", "unknown_failure"]},
    })
}

/// `PUT /jobs/:id`: the agent reports the job's state.
pub async fn update(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    params: Params,
) -> Response {
    let fields = (|| {
        Ok::<_, crate::params::ParamError>((
            params.required_string("token")?,
            params.string("state")?,
            params.integer("exit_code")?,
            params.string("failure_reason")?,
        ))
    })();
    let (token, job_state, exit_code, failure_reason) = match fields {
        Ok(fields) => fields,
        Err(e) => return e.into_response(),
    };
    match state
        .coordinator
        .update(id, &token, job_state.as_deref(), exit_code, failure_reason)
    {
        Ok(job) => with_headers(
            StatusCode::OK,
            &[
                ("job-status", job.status.as_str().to_string()),
                ("x-gitlab-trace-update-interval", "3".to_string()),
            ],
            "200".into_response(),
        ),
        Err(refusal) => refused(refusal),
    }
}

/// `PATCH /jobs/:id/trace`: appends `Content-Range: start-end` bytes.
pub async fn trace(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("job-token")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| query.get("token").cloned())
        .unwrap_or_default();
    let start = headers
        .get(axum::http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|range| range.split_once('-'))
        .and_then(|(start, _end)| start.trim().parse::<u64>().ok());
    let Some(start) = start else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Content-Range is missing or malformed"})),
        )
            .into_response();
    };
    match state.coordinator.append_trace(id, &token, start, &body) {
        Ok(size) => with_headers(
            StatusCode::ACCEPTED,
            &[
                ("range", format!("0-{size}")),
                ("job-status", "running".to_string()),
                ("x-gitlab-trace-update-interval", "3".to_string()),
            ],
            ().into_response(),
        ),
        Err(TraceError::Range(size)) => with_headers(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &[("range", format!("0-{size}"))],
            ().into_response(),
        ),
        Err(TraceError::Refused(refusal)) => refused(refusal),
        Err(TraceError::Io(e)) => Refusal::Internal(e).into_response(),
    }
}
