//! The `Poseidon-Token` check, in constant time.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::AppState;

const OPEN_ROUTES: [&str; 2] = ["/api/v1/health", "/api/v1/version"];

/// A body whose declared length is above the limit is refused before a byte of it is read
/// (413, and the connection closes: its unread rest cannot carry another request).
pub async fn refuse_oversized(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = state.config.max_body_bytes as u64;
    match declared {
        Some(length) if length > limit => {
            // A client still sending its body when the answer comes and the connection
            // closes never reads the answer: a body not far above the limit is read (and
            // dropped) first; a huge one is refused at once.
            if length <= limit.saturating_mul(DRAIN_FACTOR) {
                let body: Body = request.into_body();
                let _ = http_body_util::Limited::new(body, length as usize)
                    .collect()
                    .await;
            }
            crate::ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body of {length} bytes is above this server's limit of {limit}"
                ),
            )
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// Bodies up to this many times the limit are read and dropped before a 413.
const DRAIN_FACTOR: u64 = 4;

pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if OPEN_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let limit = state.config.max_body_bytes;
    match trident_http::check_token(state.config.token.as_deref(), request, limit).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused,
    }
}
