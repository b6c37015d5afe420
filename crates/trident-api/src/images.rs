//! Operators' view of the server's images (`/api/v1/images`): a trident extension beside
//! the Poseidon routes, behind the same token. The images themselves are the composition's
//! business ([`ImageService`]); this module only parses and shapes.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::AppState;

/// One image as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageView {
    /// The normalised reference (`docker.io/library/python:3.12`) or the `images:` name.
    pub name: String,
    /// The manifest's digest, once known.
    pub digest: Option<String>,
    /// Compressed bytes of its layers.
    pub size: u64,
    pub layers: usize,
    /// `pulling`, `ready` or `failed`.
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
}

/// Why an image operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageOpError {
    /// Not a valid image reference (400).
    Invalid(String),
    /// No such image (404).
    NotFound(String),
    /// An execution environment still uses it (409).
    InUse(String),
    /// Anything else (500).
    Failed(String),
}

/// What the server does with images; implemented over the image store by the binary.
pub trait ImageService: Send + Sync + 'static {
    fn list(&self) -> Vec<ImageView>;
    /// Starts pulling (or retries a failed pull) and answers the image's state at once.
    fn pull(&self, name: &str) -> Result<ImageView, ImageOpError>;
    /// Forgets the image and frees what no other image uses; refused while one of
    /// `environment_images` (the images of existing environments) is this image.
    fn remove(&self, name: &str, environment_images: &[String]) -> Result<(), ImageOpError>;
}

impl From<ImageOpError> for ApiError {
    fn from(e: ImageOpError) -> ApiError {
        match e {
            ImageOpError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            ImageOpError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            ImageOpError::InUse(m) => ApiError::new(StatusCode::CONFLICT, m),
            ImageOpError::Failed(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

fn service(state: &AppState) -> Result<&dyn ImageService, ApiError> {
    state.config.images.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this server has no image store (its engine takes no OCI images)",
        )
    })
}

pub async fn list(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut images = service(&state)?.list();
    images.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(json!({ "images": images })))
}

#[derive(Deserialize)]
pub struct PullBody {
    name: String,
}

pub async fn pull(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<PullBody>,
) -> Result<(StatusCode, Json<ImageView>), ApiError> {
    let view = service(&state)?.pull(&body.name)?;
    let status = if view.state == "ready" {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(view)))
}

/// `DELETE /images/{name}`: the name may hold slashes (`docker.io/library/python:3.12`).
pub async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let images: Vec<String> = state
        .manager
        .environments()
        .into_iter()
        .map(|e| e.image)
        .collect();
    service(&state)?.remove(&name, &images)?;
    Ok(StatusCode::NO_CONTENT)
}
