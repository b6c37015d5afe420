//! The GitLab front door's one error type: every refusal an agent can get, each with the
//! status and body Grape (GitLab's API framework) gives it. Handlers return
//! `Result<_, GitlabError>` and use `?`; the domain's errors convert into it.
//!
//! Server errors are not logged here (a conversion has no business doing I/O): the
//! response carries what went wrong, and `trident_http::log_server_errors` logs it.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use trident_core::store::StoreError;
use trident_jobs::coordinator::{ArtifactError, JobRefusal, TraceError};
use trident_jobs::jobs::JobStatus;

use crate::params::ParamError;

#[derive(Debug, thiserror::Error)]
pub enum GitlabError {
    /// A parameter is missing or malformed: 400 `{"error": ...}`.
    #[error("{0}")]
    Param(String),
    /// A model validation failed: 400 `{"message": {field: [problem]}}`.
    #[error("{field} {problem}")]
    Invalid {
        field: &'static str,
        problem: &'static str,
    },
    /// A wrong or unknown token: 403.
    #[error("403 Forbidden")]
    Forbidden,
    /// The job is not running any more: 403 with `Job-Status`, which tells an agent to stop.
    #[error("the job is {}", .0.as_str())]
    NotRunning(JobStatus),
    /// A trace piece that does not start at the end: 416 with `Range: 0-<size>`.
    #[error("the trace has {0} bytes")]
    Range(u64),
    /// The job could not be given away (storing the assignment failed): 409, ask again.
    #[error("409 Conflict: {0}")]
    Conflict(String),
    /// Above the artifact limit: 413, and the connection closes.
    #[error("artifacts are limited to {0} bytes")]
    TooLarge(u64),
    /// Nothing there: 404.
    #[error("404 Not Found")]
    NotFound,
    /// The server failed (a store write, a file): 500; the agent tries again.
    #[error("{0}")]
    Internal(String),
}

impl GitlabError {
    pub fn param(message: impl Into<String>) -> GitlabError {
        GitlabError::Param(message.into())
    }
}

impl From<ParamError> for GitlabError {
    fn from(e: ParamError) -> Self {
        GitlabError::Param(e.0)
    }
}

impl From<StoreError> for GitlabError {
    fn from(e: StoreError) -> Self {
        GitlabError::Internal(e.to_string())
    }
}

impl From<std::io::Error> for GitlabError {
    fn from(e: std::io::Error) -> Self {
        GitlabError::Internal(e.to_string())
    }
}

impl From<JobRefusal> for GitlabError {
    fn from(e: JobRefusal) -> Self {
        match e {
            JobRefusal::Forbidden => GitlabError::Forbidden,
            JobRefusal::NotRunning(status) => GitlabError::NotRunning(status),
            JobRefusal::Store(e) => e.into(),
        }
    }
}

impl From<TraceError> for GitlabError {
    fn from(e: TraceError) -> Self {
        match e {
            TraceError::Refused(refusal) => refusal.into(),
            TraceError::Range(size) => GitlabError::Range(size),
            TraceError::Io(e) => e.into(),
        }
    }
}

impl From<ArtifactError> for GitlabError {
    fn from(e: ArtifactError) -> Self {
        match e {
            ArtifactError::Refused(refusal) => refusal.into(),
            ArtifactError::Io(e) => e.into(),
        }
    }
}

impl IntoResponse for GitlabError {
    fn into_response(self) -> Response {
        let mut response = match &self {
            GitlabError::Param(message) => {
                (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
            }
            GitlabError::Invalid { field, problem } => (
                StatusCode::BAD_REQUEST,
                Json(json!({"message": { *field: [problem] }})),
            )
                .into_response(),
            GitlabError::Forbidden => (
                StatusCode::FORBIDDEN,
                Json(json!({"message": "403 Forbidden"})),
            )
                .into_response(),
            GitlabError::NotRunning(status) => (
                StatusCode::FORBIDDEN,
                [("job-status", status.as_str())],
                Json(json!({"message": "403 Forbidden - Job is not running"})),
            )
                .into_response(),
            GitlabError::Range(size) => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [("range", format!("0-{size}"))],
            )
                .into_response(),
            GitlabError::Conflict(_) => (
                StatusCode::CONFLICT,
                Json(json!({"message": "409 Conflict: the job could not be assigned, ask again"})),
            )
                .into_response(),
            GitlabError::TooLarge(max) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                // The rest of the body stays unread: the connection cannot carry another
                // request.
                [("connection", "close")],
                Json(json!({"message": format!("413 Request Entity Too Large: artifacts are limited to {max} bytes")})),
            )
                .into_response(),
            GitlabError::NotFound => (
                StatusCode::NOT_FOUND,
                Json(json!({"message": "404 Not Found"})),
            )
                .into_response(),
            GitlabError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"message": "500 Internal Server Error"})),
            )
                .into_response(),
        };
        if response.status().is_server_error() || response.status() == StatusCode::CONFLICT {
            response
                .extensions_mut()
                .insert(trident_http::ServerError(self.to_string()));
        }
        response
    }
}

/// Adds a header to a successful answer (values are always ASCII here).
pub fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
    response
}

pub type GitlabResult<T = Response> = Result<T, GitlabError>;
