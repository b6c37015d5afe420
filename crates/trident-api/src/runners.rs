//! `/runners`: claim, delete, and prepare executions.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use trident_core::model::{EnvironmentId, ExecutionRequest};

use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimBody {
    execution_environment_id: EnvironmentId,
    /// Seconds; 0 = none.
    #[serde(default)]
    inactivity_timeout: u64,
}

pub async fn claim(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<ClaimBody>,
) -> ApiResult<Json<Value>> {
    let runner = state
        .manager
        .claim_runner(
            body.execution_environment_id,
            Duration::from_secs(body.inactivity_timeout),
        )
        .await?;
    Ok(Json(json!({
        "runnerId": runner.id,
        "mappedPorts": runner.mapped_ports(),
    })))
}

/// Never a 5xx: CodeOcean's event loop can die on one here.
pub async fn delete(
    State(state): State<AppState>,
    Path(runner_id): Path<String>,
) -> ApiResult<StatusCode> {
    state.manager.delete_runner(&runner_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteBody {
    command: String,
    #[serde(default)]
    privileged_execution: bool,
    #[serde(default)]
    environment: Option<HashMap<String, String>>,
    #[serde(default)]
    time_limit: u64,
}

fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub async fn execute(
    State(state): State<AppState>,
    Path(runner_id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ExecuteBody>,
) -> ApiResult<Json<Value>> {
    state.manager.runner(&runner_id)?;
    if body.command.contains('\'') {
        // A legacy rule of the reference, which clients still rely on.
        return Err(ApiError::bad_request("use of forbidden character"));
    }
    if body.command.contains('\0') {
        return Err(ApiError::bad_request(
            "the command may not contain NUL bytes",
        ));
    }
    let mut environment: Vec<(String, String)> =
        body.environment.unwrap_or_default().into_iter().collect();
    environment.sort();
    for (name, value) in &environment {
        if !valid_variable_name(name) {
            return Err(ApiError::bad_request(format!(
                "invalid environment variable name {name:?}: use letters, digits and _, not starting with a digit"
            )));
        }
        if value.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "the value of environment variable {name} contains a NUL byte"
            )));
        }
    }
    let request = ExecutionRequest {
        command: body.command,
        privileged: body.privileged_execution,
        environment,
        time_limit: body.time_limit,
    };
    let execution_id = state.manager.prepare_execution(&runner_id, request)?;
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some(proto) if proto.eq_ignore_ascii_case("https") => "wss",
        _ => "ws",
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::bad_request("the request has no Host header"))?;
    Ok(Json(json!({
        "websocketUrl": format!(
            "{scheme}://{host}/api/v1/runners/{runner_id}/websocket?executionID={execution_id}"
        )
    })))
}

#[cfg(test)]
mod tests {
    use super::valid_variable_name;

    #[test]
    fn variable_names() {
        for good in ["hello", "_X", "A1", "x"] {
            assert!(valid_variable_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "Ä"] {
            assert!(!valid_variable_name(bad), "{bad}");
        }
    }
}
