//! `/api/v4/runners`: agents register, unregister, verify and reset their token. (GitLab
//! calls them runners; in trident, runners are sandboxes, and these are agents.)

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;
use trident_jobs::store::RegisteredAgent;
use trident_jobs::tokens::{self, RUNNER_TOKEN_PREFIX};

use crate::error::{GitlabError, GitlabResult};
use crate::params::{ParamError, Params};
use crate::GitlabState;

const ACCESS_LEVELS: [&str; 2] = ["not_protected", "ref_protected"];
const MAX_NOTE: usize = 1024;

fn exclusive(params: &Params, a: &str, b: &str) -> Result<(), ParamError> {
    if params.has(a) && params.has(b) {
        return Err(ParamError(format!("{a}, {b} are mutually exclusive")));
    }
    Ok(())
}

/// `POST /runners`: a new agent, if it knows the registration token.
pub async fn register(State(state): State<GitlabState>, params: Params) -> GitlabResult {
    let token = params.required_string("token")?;
    exclusive(&params, "maintainer_note", "maintenance_note")?;
    exclusive(&params, "active", "paused")?;
    let access_level = params
        .string("access_level")?
        .unwrap_or_else(|| "not_protected".into());
    if !ACCESS_LEVELS.contains(&access_level.as_str()) {
        return Err(GitlabError::param(
            "access_level does not have a valid value",
        ));
    }
    let paused = match (params.boolean("paused")?, params.boolean("active")?) {
        (Some(paused), _) => paused,
        (None, Some(active)) => !active,
        (None, None) => false,
    };
    let note = match params.string("maintenance_note")? {
        Some(note) => Some(note),
        None => params.string("maintainer_note")?,
    };
    let agent = RegisteredAgent {
        id: 0,
        token_hash: String::new(),
        description: params.string("description")?,
        maintenance_note: note,
        info: params.object("info")?,
        paused,
        locked: params.boolean("locked")?.unwrap_or(false),
        access_level,
        run_untagged: params.boolean("run_untagged")?.unwrap_or(true),
        tag_list: params.string_list("tag_list")?,
        maximum_timeout: params.integer("maximum_timeout")?,
    };
    let expected = state
        .config
        .registration_token
        .as_deref()
        .unwrap_or_default();
    if expected.is_empty() || !tokens::same(&token, expected) {
        return Err(GitlabError::Forbidden);
    }
    if agent
        .maintenance_note
        .as_ref()
        .is_some_and(|n| n.chars().count() > MAX_NOTE)
    {
        return Err(GitlabError::Invalid {
            field: "maintenance_note",
            problem: "is too long (maximum is 1024 characters)",
        });
    }
    if agent.maximum_timeout.is_some_and(|t| t < 600) {
        return Err(GitlabError::Invalid {
            field: "maximum_timeout",
            problem: "needs to be at least 10 minutes",
        });
    }
    let secret = tokens::new_token(RUNNER_TOKEN_PREFIX);
    let agent = RegisteredAgent {
        token_hash: tokens::hash(&secret),
        ..agent
    };
    let id = state.store.insert_agent(&agent)?;
    tracing::info!(id, description = ?agent.description, "agent registered");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "token": secret, "token_expires_at": null})),
    )
        .into_response())
}

/// The agent the request's `token` authenticates, and that token.
pub(crate) fn authenticate(
    state: &GitlabState,
    params: &Params,
) -> GitlabResult<(String, RegisteredAgent)> {
    let token = params.required_string("token")?;
    let hash = tokens::hash(&token);
    match state.store.agent_by_token_hash(&hash)? {
        Some(agent) if tokens::same(&agent.token_hash, &hash) => Ok((token, agent)),
        _ => Err(GitlabError::Forbidden),
    }
}

/// `DELETE /runners`.
pub async fn unregister(State(state): State<GitlabState>, params: Params) -> GitlabResult {
    let (_, agent) = authenticate(&state, &params)?;
    state.store.delete_agent(agent.id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /runners/verify`.
pub async fn verify(State(state): State<GitlabState>, params: Params) -> GitlabResult {
    let (token, agent) = authenticate(&state, &params)?;
    Ok((
        StatusCode::OK,
        Json(json!({"id": agent.id, "token": token, "token_expires_at": null})),
    )
        .into_response())
}

/// `POST /runners/reset_authentication_token`: a new token; the old one stops working.
pub async fn reset_token(State(state): State<GitlabState>, params: Params) -> GitlabResult {
    let (_, agent) = authenticate(&state, &params)?;
    let secret = tokens::new_token(RUNNER_TOKEN_PREFIX);
    let agent = RegisteredAgent {
        token_hash: tokens::hash(&secret),
        ..agent
    };
    state.store.update_agent(&agent)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": secret, "token_expires_at": null})),
    )
        .into_response())
}
