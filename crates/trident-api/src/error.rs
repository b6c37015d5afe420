//! Maps core errors to Poseidon's status codes and JSON error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use trident_core::Error;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub error_code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            error_code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let message = e.to_string();
        let (status, code) = match e {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, None),
            Error::EnvironmentNotFound(_) | Error::ExecutionNotFound(_) => {
                (StatusCode::NOT_FOUND, None)
            }
            // 410, never 404: it is the client's only signal to claim a new runner.
            Error::RunnerNotFound(_) => (StatusCode::GONE, None),
            Error::Overloaded(_) => (StatusCode::INTERNAL_SERVER_ERROR, Some("NOMAD_OVERLOAD")),
            Error::TooManyPending(_) => (StatusCode::TOO_MANY_REQUESTS, None),
            Error::FileUnavailable(_) => (StatusCode::FAILED_DEPENDENCY, None),
            // As the reference's failed `tar` run.
            Error::FileCopyFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, Some("UNKNOWN")),
            Error::Internal(_) | Error::Store(_) | Error::EnvironmentUnavailable(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("NOMAD_INTERNAL_SERVER_ERROR"),
            ),
        };
        ApiError {
            status,
            message,
            error_code: code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.error_code {
            Some(code) => json!({ "message": self.message, "errorCode": code }),
            None => json!({ "message": self.message }),
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status.is_server_error() {
            // Logged once, by `trident_http::log_server_errors`.
            response
                .extensions_mut()
                .insert(trident_http::ServerError(self.message.clone()));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body stays unread, so this connection cannot carry another
            // request: say so, and keep-alive clients open a fresh one instead of failing.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
