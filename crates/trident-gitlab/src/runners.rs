//! `/api/v4/runners`: registration, deletion, verification and token reset.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::params::{ParamError, Params};
use crate::store::RegisteredAgent;
use crate::tokens::{self, RUNNER_TOKEN_PREFIX};
use crate::GitlabState;

const ACCESS_LEVELS: [&str; 2] = ["not_protected", "ref_protected"];
const MAX_NOTE: usize = 1024;

/// Why a request is refused, as GitLab words it.
pub(crate) enum Refusal {
    Forbidden,
    Param(ParamError),
    /// A model validation error: field and problem.
    Invalid(&'static str, &'static str),
    Internal(String),
}

impl From<ParamError> for Refusal {
    fn from(e: ParamError) -> Refusal {
        Refusal::Param(e)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Forbidden => (
                StatusCode::FORBIDDEN,
                Json(json!({"message": "403 Forbidden"})),
            )
                .into_response(),
            Refusal::Param(e) => e.into_response(),
            Refusal::Invalid(field, problem) => (
                StatusCode::BAD_REQUEST,
                Json(json!({"message": { field: [problem] }})),
            )
                .into_response(),
            Refusal::Internal(e) => {
                tracing::error!(error = %e, "agent store");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"message": "500 Internal Server Error"})),
                )
                    .into_response()
            }
        }
    }
}

fn reply(result: Result<Response, Refusal>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

fn exclusive(params: &Params, a: &str, b: &str) -> Result<(), ParamError> {
    if params.has(a) && params.has(b) {
        return Err(ParamError(format!("{a}, {b} are mutually exclusive")));
    }
    Ok(())
}

pub async fn register(State(state): State<GitlabState>, params: Params) -> Response {
    reply(register_inner(&state, &params))
}

fn register_inner(state: &GitlabState, params: &Params) -> Result<Response, Refusal> {
    fn p<T>(r: Result<T, ParamError>) -> Result<T, Refusal> {
        r.map_err(Refusal::Param)
    }
    let token = p(params.required_string("token"))?;
    p(exclusive(params, "maintainer_note", "maintenance_note"))?;
    p(exclusive(params, "active", "paused"))?;
    let access_level = p(params.string("access_level"))?.unwrap_or_else(|| "not_protected".into());
    if !ACCESS_LEVELS.contains(&access_level.as_str()) {
        return Err(ParamError("access_level does not have a valid value".into()).into());
    }
    let paused = match (p(params.boolean("paused"))?, p(params.boolean("active"))?) {
        (Some(paused), _) => paused,
        (None, Some(active)) => !active,
        (None, None) => false,
    };
    let note = match p(params.string("maintenance_note"))? {
        Some(note) => Some(note),
        None => p(params.string("maintainer_note"))?,
    };
    let runner = RegisteredAgent {
        id: 0,
        token_hash: String::new(),
        description: p(params.string("description"))?,
        maintenance_note: note,
        info: p(params.object("info"))?,
        paused,
        locked: p(params.boolean("locked"))?.unwrap_or(false),
        access_level,
        run_untagged: p(params.boolean("run_untagged"))?.unwrap_or(true),
        tag_list: p(params.string_list("tag_list"))?,
        maximum_timeout: p(params.integer("maximum_timeout"))?,
    };
    let expected = state
        .config
        .registration_token
        .as_deref()
        .unwrap_or_default();
    if expected.is_empty() || !tokens::same(&token, expected) {
        return Err(Refusal::Forbidden);
    }
    if runner
        .maintenance_note
        .as_ref()
        .is_some_and(|n| n.chars().count() > MAX_NOTE)
    {
        return Err(Refusal::Invalid(
            "maintenance_note",
            "is too long (maximum is 1024 characters)",
        ));
    }
    if runner.maximum_timeout.is_some_and(|t| t < 600) {
        return Err(Refusal::Invalid(
            "maximum_timeout",
            "needs to be at least 10 minutes",
        ));
    }
    let secret = tokens::new_token(RUNNER_TOKEN_PREFIX);
    let runner = RegisteredAgent {
        token_hash: tokens::hash(&secret),
        ..runner
    };
    let id = state
        .store
        .insert_agent(&runner)
        .map_err(Refusal::Internal)?;
    tracing::info!(id, description = ?runner.description, "agent registered");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "token": secret, "token_expires_at": null})),
    )
        .into_response())
}

/// The agent the request's `token` authenticates.
pub(crate) fn authenticate(
    state: &GitlabState,
    params: &Params,
) -> Result<(String, RegisteredAgent), Refusal> {
    let token = params.required_string("token")?;
    let hash = tokens::hash(&token);
    match state
        .store
        .agent_by_token_hash(&hash)
        .map_err(Refusal::Internal)?
    {
        Some(agent) if tokens::same(&agent.token_hash, &hash) => Ok((token, agent)),
        _ => Err(Refusal::Forbidden),
    }
}

pub async fn unregister(State(state): State<GitlabState>, params: Params) -> Response {
    reply(authenticate(&state, &params).and_then(|(_, agent)| {
        state
            .store
            .delete_agent(agent.id)
            .map_err(Refusal::Internal)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }))
}

pub async fn verify(State(state): State<GitlabState>, params: Params) -> Response {
    reply(authenticate(&state, &params).map(|(token, agent)| {
        (
            StatusCode::OK,
            Json(json!({"id": agent.id, "token": token, "token_expires_at": null})),
        )
            .into_response()
    }))
}

pub async fn reset_token(State(state): State<GitlabState>, params: Params) -> Response {
    reply(authenticate(&state, &params).and_then(|(_, agent)| {
        let secret = tokens::new_token(RUNNER_TOKEN_PREFIX);
        let agent = RegisteredAgent {
            token_hash: tokens::hash(&secret),
            ..agent
        };
        state
            .store
            .update_agent(&agent)
            .map_err(Refusal::Internal)?;
        Ok((
            StatusCode::CREATED,
            Json(json!({"token": secret, "token_expires_at": null})),
        )
            .into_response())
    }))
}
