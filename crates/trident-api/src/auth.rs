//! The `Poseidon-Token` check, in constant time.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use subtle::ConstantTimeEq;

use crate::AppState;

const OPEN_ROUTES: [&str; 2] = ["/api/v1/health", "/api/v1/version"];

pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.config.token.as_deref() else {
        return next.run(request).await;
    };
    if OPEN_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get("Poseidon-Token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if bool::from(given.ct_eq(expected.as_bytes())) {
        return next.run(request).await;
    }
    // Drain the body before answering: keep-alive clients break on unread request bodies.
    let limit = state.config.max_body_bytes;
    let body: Body = request.into_body();
    let _ = http_body_util::Limited::new(body, limit).collect().await;
    StatusCode::UNAUTHORIZED.into_response()
}
