//! The Poseidon API v1 (`/api/v1`), a drop-in replacement for openHPI's Poseidon: a thin
//! layer that parses requests, calls the core's `Manager`, and shapes answers the way
//! CodeOcean expects them (status codes and `errorCode`s, never message texts).

#![forbid(unsafe_code)]

mod auth;
mod environments;
mod error;
mod extract;
mod files;
mod images;
mod misc;
mod runners;
mod websocket;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use trident_core::Manager;

pub use error::ApiError;
pub use images::{ImageOpError, ImageService, ImageView};
pub use websocket::Sessions;

#[derive(Clone)]
pub struct ApiConfig {
    /// When set, every route but /health and /version needs it in `Poseidon-Token`.
    pub token: Option<String>,
    /// Largest accepted request body (file uploads come base64-encoded in JSON).
    pub max_body_bytes: usize,
    pub version: String,
    /// The WebSocket sessions of running executions, for a graceful shutdown.
    pub sessions: Sessions,
    /// The server's images, for `/api/v1/images` (none: those routes answer 501).
    pub images: Option<Arc<dyn ImageService>>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token: None,
            // A few files of a learner's exercise, base64-encoded, fit many times over.
            max_body_bytes: 64 * 1024 * 1024,
            version: env!("CARGO_PKG_VERSION").to_string(),
            sessions: Sessions::default(),
            images: None,
        }
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub manager: Manager,
    pub config: Arc<ApiConfig>,
}

/// The whole Poseidon API, to be served at the root (routes carry the `/api/v1` prefix).
pub fn router(manager: Manager, config: ApiConfig) -> Router {
    let state = AppState {
        manager,
        config: Arc::new(config),
    };
    let api = Router::new()
        .route("/health", get(misc::health))
        .route("/version", get(misc::version))
        .route("/statistics/execution-environments", get(misc::statistics))
        .route("/runners", post(runners::claim))
        .route(
            "/runners/{runner_id}",
            axum::routing::delete(runners::delete),
        )
        .route("/runners/{runner_id}/execute", post(runners::execute))
        .route("/runners/{runner_id}/websocket", get(websocket::connect))
        .route(
            "/runners/{runner_id}/files",
            get(files::list).patch(files::patch),
        )
        .route("/runners/{runner_id}/files/raw", get(files::download))
        .route("/execution-environments", get(environments::list))
        .route("/images", get(images::list).post(images::pull))
        .route("/images/{*name}", axum::routing::delete(images::remove))
        .route(
            "/execution-environments/{environment_id}",
            get(environments::get)
                .put(environments::put)
                .delete(environments::delete),
        )
        // After every route: a known path with the wrong method gets a JSON error body too.
        .method_not_allowed_fallback(misc::method_not_allowed);
    Router::new()
        .nest("/api/v1", api)
        .fallback(misc::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::refuse_oversized,
        ))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

#[cfg(test)]
mod tests;
