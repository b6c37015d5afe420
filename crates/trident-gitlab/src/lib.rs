//! The GitLab CI Runner API v4 (`/api/v4`), coordinator side, as GitLab's
//! `lib/api/ci/runner.rb` serves it, so that real runner agents (the `gitlab-runner` agent, custom
//! runners built on the `gitlab-runner` crate) can work for trident.
//!
//! So far: runner registration, verification, deletion and token reset. Jobs (request with
//! long polling, state updates, traces, artifacts), trident's jobs API and the built-in agent
//! are the rest of the issue "GitLab Runner API v4 coordinator, jobs API and built-in agent".

mod params;
mod runners;
pub mod store;
pub mod tokens;

use std::sync::Arc;

use axum::routing::post;
use axum::Router;

pub use store::{AgentStore, RegisteredAgent};

#[derive(Clone)]
pub struct GitlabConfig {
    /// The token agents register with; without one, registration is refused (403).
    pub registration_token: Option<String>,
}

#[derive(Clone)]
pub(crate) struct GitlabState {
    pub store: Arc<dyn AgentStore>,
    pub config: Arc<GitlabConfig>,
}

/// The `/api/v4` routes.
pub fn router(store: Arc<dyn AgentStore>, config: GitlabConfig) -> Router {
    let state = GitlabState {
        store,
        config: Arc::new(config),
    };
    let api = Router::new()
        .route(
            "/runners",
            post(runners::register).delete(runners::unregister),
        )
        .route("/runners/verify", post(runners::verify))
        .route(
            "/runners/reset_authentication_token",
            post(runners::reset_token),
        )
        .with_state(state);
    Router::new().nest("/api/v4", api)
}
