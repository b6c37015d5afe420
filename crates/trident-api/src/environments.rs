//! `/execution-environments`: list, get, create-or-replace, delete.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use trident_core::model::{EnvironmentId, ExecutionEnvironment};

use crate::error::{ApiError, ApiResult};
use crate::extract::{query_bool, JsonBody};
use crate::AppState;

/// A path id: not a number at all is an unknown route (404); a number too large is a bad
/// request (400), as in the reference.
pub fn parse_environment_id(raw: &str) -> ApiResult<EnvironmentId> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("execution environment {raw:?} does not exist"),
        ));
    }
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("execution environment id {raw} is too large")))
}

/// `?fetch=` asks the reference to refresh its list from its scheduler first; trident's list
/// is always current, but the parameter is still checked as the reference checks it.
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<serde_json::Value>> {
    query_bool(&query, "fetch", false)?;
    let environments: Vec<EnvironmentView> = state
        .manager
        .environments()
        .into_iter()
        .map(EnvironmentView::from)
        .collect();
    Ok(Json(json!({ "executionEnvironments": environments })))
}

/// An environment as the API shows it: Poseidon's seven keys.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentView {
    id: EnvironmentId,
    image: String,
    prewarming_pool_size: u32,
    cpu_limit: u32,
    memory_limit: u32,
    network_access: bool,
    exposed_ports: Vec<u16>,
}

impl From<ExecutionEnvironment> for EnvironmentView {
    fn from(env: ExecutionEnvironment) -> Self {
        EnvironmentView {
            id: env.id,
            image: env.image,
            prewarming_pool_size: env.prewarming_pool_size,
            cpu_limit: env.cpu_limit,
            memory_limit: env.memory_limit,
            network_access: env.network_access,
            exposed_ports: env.exposed_ports,
        }
    }
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<EnvironmentView>> {
    let id = parse_environment_id(&id)?;
    Ok(Json(state.manager.environment(id)?.into()))
}

/// What a client PUTs; turned into the core's `ExecutionEnvironment` below.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentBody {
    id: Option<EnvironmentId>,
    image: String,
    prewarming_pool_size: u32,
    cpu_limit: u32,
    memory_limit: u32,
    network_access: bool,
    #[serde(default)]
    exposed_ports: Option<Vec<u16>>,
}

pub async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<EnvironmentBody>,
) -> ApiResult<StatusCode> {
    let id = parse_environment_id(&id)?;
    if body.id.is_some_and(|body_id| body_id != id) {
        return Err(ApiError::bad_request(format!(
            "the body's id {} does not match the id {id} in the path",
            body.id.unwrap_or_default()
        )));
    }
    let mut exposed_ports = body.exposed_ports.unwrap_or_default();
    exposed_ports.sort_unstable();
    exposed_ports.dedup();
    let env = ExecutionEnvironment {
        id,
        image: body.image,
        prewarming_pool_size: body.prewarming_pool_size,
        cpu_limit: body.cpu_limit,
        memory_limit: body.memory_limit,
        network_access: body.network_access,
        exposed_ports,
    };
    let manager = state.manager.clone();
    let created = tokio::task::spawn_blocking(move || manager.put_environment(env))
        .await
        .map_err(|e| ApiError::from(trident_core::Error::internal(e)))??;
    Ok(if created {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    })
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_environment_id(&id)?;
    let manager = state.manager.clone();
    tokio::task::spawn_blocking(move || manager.delete_environment(id))
        .await
        .map_err(|e| ApiError::from(trident_core::Error::internal(e)))??;
    Ok(StatusCode::NO_CONTENT)
}
