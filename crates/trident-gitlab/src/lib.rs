//! The GitLab CI Runner API v4 (`/api/v4`), coordinator side, as GitLab's
//! `lib/api/ci/runner.rb` serves it, so that real runner agents (the `gitlab-runner` agent, custom
//! runners built on the `gitlab-runner` crate) can work for trident.
//!
//! Agents register, verify, reset their token and unregister (`runners.rs`); they long-poll
//! `/jobs/request`, report state and stream traces and artifacts (`agent_jobs.rs`) about jobs
//! that clients submit through trident's jobs API under `/api/v1/jobs` (`client_jobs.rs`). The
//! queue (`coordinator.rs`) is in memory and in SQLite; traces and artifacts are files. The
//! built-in agent (`builtin_agent.rs`) takes jobs from the same queue and runs them in the
//! local sandbox.

#![forbid(unsafe_code)]

mod agent_artifacts;
mod agent_jobs;
mod agents;
mod client_jobs;
mod error;
mod params;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post, put};
use axum::Router;

use trident_jobs::{CiStore, Coordinator};

#[derive(Clone)]
pub struct GitlabConfig {
    /// The token agents register with; without one, registration is refused (403).
    pub registration_token: Option<String>,
    /// The `Poseidon-Token` of `/api/v1` (the jobs API shares it).
    pub api_token: Option<String>,
    /// How long `/jobs/request` waits for a job before answering 204 (0 = at once).
    pub request_poll: Duration,
    /// Largest artifact file accepted (413 above).
    pub max_artifact_bytes: u64,
}

impl Default for GitlabConfig {
    fn default() -> Self {
        GitlabConfig {
            registration_token: None,
            api_token: None,
            // GitLab's own long-poll behind Workhorse.
            request_poll: Duration::from_secs(50),
            // GitLab's default maximum artifacts size.
            max_artifact_bytes: 100 * 1024 * 1024,
        }
    }
}

#[derive(Clone)]
pub(crate) struct GitlabState {
    pub store: Arc<dyn CiStore>,
    pub coordinator: Arc<Coordinator>,
    pub config: Arc<GitlabConfig>,
}

/// Grape's path rule for `/api/v4` (`Grape::Router.normalize_path`: repeated slashes
/// squeezed, a trailing slash dropped), so that an agent configured with a URL ending in `/`
/// reaches `//api/v4/runners`. Runs before routing; other paths pass untouched.
pub fn normalize_path(mut request: axum::extract::Request) -> axum::extract::Request {
    let path = request.uri().path();
    let untidy = path.contains("//") || (path.len() > 1 && path.ends_with('/'));
    if !untidy {
        return request;
    }
    let mut squeezed = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && squeezed.ends_with('/')) {
            squeezed.push(c);
        }
    }
    while squeezed.len() > 1 && squeezed.ends_with('/') {
        squeezed.pop();
    }
    if squeezed != "/api/v4" && !squeezed.starts_with("/api/v4/") {
        return request;
    }
    let rebuilt = match request.uri().query() {
        Some(query) => format!("{squeezed}?{query}"),
        None => squeezed,
    };
    if let Ok(path_and_query) = rebuilt.parse::<axum::http::uri::PathAndQuery>() {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(path_and_query);
        if let Ok(uri) = axum::http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    request
}

/// The `/api/v4` routes and `/api/v1/jobs`.
pub fn router(
    store: Arc<dyn CiStore>,
    coordinator: Arc<Coordinator>,
    config: GitlabConfig,
) -> Router {
    let state = GitlabState {
        store,
        coordinator,
        config: Arc::new(config),
    };
    let jobs_api = Router::new()
        .route(
            "/api/v1/jobs",
            post(client_jobs::create).get(client_jobs::list),
        )
        .route("/api/v1/jobs/{id}", get(client_jobs::get))
        .route("/api/v1/jobs/{id}/trace", get(client_jobs::trace))
        .route("/api/v1/jobs/{id}/cancel", post(client_jobs::cancel))
        .route("/api/v1/jobs/{id}/artifacts", get(client_jobs::artifacts))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            client_jobs::require_token,
        ))
        .with_state(state.clone());
    let api = Router::new()
        .route("/jobs/request", post(agent_jobs::request))
        .route("/jobs/{id}", put(agent_jobs::update))
        .route("/jobs/{id}/trace", axum::routing::patch(agent_jobs::trace))
        .route(
            "/jobs/{id}/artifacts/authorize",
            post(agent_artifacts::authorize),
        )
        .route(
            "/jobs/{id}/artifacts",
            post(agent_artifacts::upload)
                .get(agent_artifacts::download)
                // The upload enforces the artifact limit itself, while streaming to disk.
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/runners",
            post(agents::register).delete(agents::unregister),
        )
        .route("/runners/verify", post(agents::verify))
        .route(
            "/runners/reset_authentication_token",
            post(agents::reset_token),
        )
        .with_state(state);
    Router::new().nest("/api/v4", api).merge(jobs_api)
}

#[cfg(test)]
mod router_tests;

#[cfg(test)]
mod tests {
    use super::normalize_path;

    fn normalized(path: &str) -> String {
        let request = axum::extract::Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        normalize_path(request).uri().to_string()
    }

    #[test]
    fn agent_paths_are_normalized_as_grape_does() {
        assert_eq!(normalized("//api/v4/runners"), "/api/v4/runners");
        assert_eq!(normalized("/api/v4/runners/"), "/api/v4/runners");
        assert_eq!(
            normalized("/api//v4///jobs/request//"),
            "/api/v4/jobs/request"
        );
        assert_eq!(
            normalized("/api/v4/jobs/1/trace/?x=1"),
            "/api/v4/jobs/1/trace?x=1"
        );
        // The Poseidon API keeps its own rules.
        assert_eq!(normalized("/api/v1/runners/"), "/api/v1/runners/");
        assert_eq!(normalized("//api/v1/health"), "//api/v1/health");
        assert_eq!(normalized("/api/v4/runners"), "/api/v4/runners");
    }
}
