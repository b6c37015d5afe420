//! What trident's two HTTP front doors (`trident-api`, `trident-gitlab`) share, so that each
//! rule of the wire is written once.

#![forbid(unsafe_code)]

pub mod disposition;
pub mod server;

/// What went wrong behind a server error, carried by its response to the one place that
/// logs it ([`log_server_errors`]), so that error conversions stay free of side effects.
#[derive(Debug, Clone)]
pub struct ServerError(pub String);

/// Middleware: logs every answer with a 5xx (or 409) status, with the error its response
/// carries.
pub async fn log_server_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    if status.is_server_error() || status == axum::http::StatusCode::CONFLICT {
        let error = response
            .extensions()
            .get::<ServerError>()
            .map(|e| e.0.as_str())
            .unwrap_or("");
        tracing::error!(%method, %path, status = status.as_u16(), error, "request failed");
    }
    response
}

/// The `Poseidon-Token` check both `/api/v1` routers share, in constant time. Without a
/// configured token every request passes. A refused request's body is read (up to
/// `drain_limit` bytes) before the 401: keep-alive clients break on unread bodies.
pub async fn check_token(
    expected: Option<&str>,
    request: axum::extract::Request,
    drain_limit: usize,
) -> Result<axum::extract::Request, axum::response::Response> {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    use subtle::ConstantTimeEq;
    let Some(expected) = expected else {
        return Ok(request);
    };
    let given = request
        .headers()
        .get("Poseidon-Token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if bool::from(given.ct_eq(expected.as_bytes())) {
        return Ok(request);
    }
    if drain_limit > 0 {
        let _ = http_body_util::Limited::new(request.into_body(), drain_limit)
            .collect()
            .await;
    }
    Err(axum::http::StatusCode::UNAUTHORIZED.into_response())
}
