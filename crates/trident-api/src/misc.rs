//! Health, version, statistics and the fallback.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use trident_core::model::EnvironmentStatistics;

use crate::error::ApiError;
use crate::AppState;

pub async fn health(State(state): State<AppState>) -> Response {
    let depleted = state.manager.depleted_environments();
    if depleted.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    let ids: Vec<String> = depleted.iter().map(u64::to_string).collect();
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "the prewarming pools of execution environments {} are depleting",
            ids.join(", ")
        ),
        error_code: Some("PREWARMING_POOL_DEPLETING"),
    }
    .into_response()
}

pub async fn version(State(state): State<AppState>) -> Json<String> {
    Json(state.config.version.clone())
}

pub async fn statistics(
    State(state): State<AppState>,
) -> Json<BTreeMap<String, EnvironmentStatistics>> {
    Json(
        state
            .manager
            .statistics()
            .into_iter()
            .map(|s| (s.id.to_string(), s))
            .collect(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not allow that method",
    )
}
