//! `/api/v4/jobs/:id/artifacts`: agents authorize, upload and download job artifacts.
//! Uploads are stored as sent, never unpacked; nothing of a body is read before the
//! request is known to be acceptable.

use std::collections::HashMap;
use std::path::PathBuf;

use axum::extract::multipart::Field;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use trident_jobs::coordinator::JobRefusal;
use trident_jobs::jobs::{parse_expire_in, StoredArtifact};

use crate::agent_jobs::{blocking, job_token};
use crate::error::{GitlabError, GitlabResult};
use crate::params::Params;
use crate::GitlabState;

/// Room for a multipart upload's own framing and small fields beside the file.
const MULTIPART_OVERHEAD: u64 = 1024 * 1024;

/// The longest form field beside the file (a token, a type, an expiry).
const MAX_FIELD: usize = 64 * 1024;

/// `POST /jobs/:id/artifacts/authorize`: may this upload of `filesize` bytes proceed?
pub async fn authorize(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    params: Params,
) -> GitlabResult {
    let token = match params.string("token")? {
        Some(token) => token,
        None => job_token(&headers, &HashMap::new()),
    };
    state.coordinator.authorize_artifact(id, &token)?;
    let max = state.config.max_artifact_bytes;
    match params.integer("filesize")? {
        Some(size) if size as u64 > max => Err(GitlabError::TooLarge(max)),
        _ => Ok((StatusCode::OK, Json(json!({"TempPath": ""}))).into_response()),
    }
}

/// The text of a form field beside the file: at most `MAX_FIELD` bytes are read.
async fn small_field(field: &mut Field<'_>) -> GitlabResult<String> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| GitlabError::param(e.body_text()))?
    {
        if bytes.len() + chunk.len() > MAX_FIELD {
            return Err(GitlabError::param(format!(
                "the form field {} is longer than {MAX_FIELD} bytes",
                field.name().unwrap_or_default()
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes).map_err(|_| GitlabError::param("a form field is not UTF-8"))
}

/// Reads and drops what is left of a field (at most `budget` bytes), so that a client still
/// sending it reads the answer instead of a broken connection.
async fn drain_field(field: &mut Field<'_>, budget: u64) {
    let mut read = 0u64;
    while let Ok(Some(chunk)) = field.chunk().await {
        read += chunk.len() as u64;
        if read > budget {
            return;
        }
    }
}

async fn drain(multipart: &mut Multipart) {
    while let Ok(Some(mut field)) = multipart.next_field().await {
        drain_field(&mut field, u64::MAX).await;
    }
}

/// An upload being received; its partial file is removed unless it was recorded.
struct Upload {
    path: Option<PathBuf>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `POST /jobs/:id/artifacts`: a multipart upload (`file`, `artifact_type`,
/// `artifact_format`, `expire_in`). Stored as it came, never unpacked. A refusal may leave
/// the body unread, so it closes the connection (a client must not send its next request
/// on it).
pub async fn upload(
    state: State<GitlabState>,
    id: Path<i64>,
    query: Query<HashMap<String, String>>,
    headers: HeaderMap,
    multipart: Multipart,
) -> Response {
    match receive(state, id, query, headers, multipart).await {
        Ok(response) => response,
        Err(e) => crate::error::with_header(e.into_response(), "connection", "close"),
    }
}

async fn receive(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> GitlabResult {
    let max = state.config.max_artifact_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut token = job_token(&headers, &query);
    let mut authorized = false;
    if !token.is_empty() {
        state.coordinator.authorize_artifact(id, &token)?;
        authorized = true;
    }
    if let Some(length) = declared.filter(|l| *l > max.saturating_add(MULTIPART_OVERHEAD)) {
        // Only an agent's body not far above the limit is read (and dropped) first, so
        // that it hears the answer; a huge one, or a stranger's, is refused unread.
        if authorized && length <= max.saturating_mul(4) {
            drain(&mut multipart).await;
        }
        return Err(GitlabError::TooLarge(max));
    }
    let mut fields: HashMap<String, String> = query.clone();
    let mut upload = Upload { path: None };
    let mut size = None;
    let mut filename = "artifacts.zip".to_string();
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| GitlabError::param(e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        if name != "file" {
            let value = small_field(&mut field).await?;
            if name == "token" && !authorized {
                state.coordinator.authorize_artifact(id, &value)?;
                token = value.clone();
                authorized = true;
            }
            fields.insert(name, value);
            continue;
        }
        if !authorized {
            // The file comes before any token: refused unread.
            return Err(JobRefusal::Forbidden.into());
        }
        if size.is_some() {
            return Err(GitlabError::param("file is given twice"));
        }
        if let Some(name) = field.file_name() {
            filename = name.to_string();
        }
        let path = state.coordinator.artifact_upload_path(id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::File::create(&path)?;
        upload.path = Some(path);
        let mut written = 0u64;
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| GitlabError::param(e.body_text()))?
        {
            written += chunk.len() as u64;
            if written > max {
                drain_field(&mut field, max.saturating_mul(3)).await;
                return Err(GitlabError::TooLarge(max));
            }
            std::io::Write::write_all(&mut file, &chunk)?;
        }
        size = Some(written);
    }
    if !authorized {
        return Err(JobRefusal::Forbidden.into());
    }
    let (Some(size), Some(path)) = (size, upload.path.clone()) else {
        return Err(GitlabError::param("file is missing"));
    };
    let expire_at = parse_expire_in(fields.get("expire_in").map(String::as_str).unwrap_or(""))
        .map_err(GitlabError::Param)?
        .map(|s| trident_jobs::jobs::now().saturating_add(s));
    let kind = fields
        .get("artifact_type")
        .cloned()
        .unwrap_or_else(|| "archive".into());
    if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(GitlabError::param("artifact_type is invalid"));
    }
    let artifact = StoredArtifact {
        filename,
        format: fields
            .get("artifact_format")
            .cloned()
            .unwrap_or_else(|| "zip".into()),
        size,
        expire_at,
    };
    blocking(&state, move |c| {
        c.record_artifact(id, &token, &path, &kind, artifact)
    })
    .await??;
    // Recorded: the file is the job's now.
    upload.path = None;
    Ok((StatusCode::CREATED, Json(json!({}))).into_response())
}

/// `GET /jobs/:id/artifacts`: the archive, for the job itself or a job depending on it.
pub async fn download(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> GitlabResult {
    let (path, artifact) = state
        .coordinator
        .artifact_for_token(id, &job_token(&headers, &query))?
        .ok_or(GitlabError::NotFound)?;
    serve_file(path, artifact)
        .await
        .ok_or(GitlabError::NotFound)
}

/// Streams a stored artifact with its size and a safe name; `None` if its file is gone.
pub(crate) async fn serve_file(path: PathBuf, artifact: StoredArtifact) -> Option<Response> {
    let file = tokio::fs::File::open(&path).await.ok()?;
    // Never the name as sent (`../../x`): its last component, safely quoted.
    let name = trident_http::disposition::base_name(&artifact.filename, "artifacts.zip");
    Some(
        (
            [
                ("content-type", "application/octet-stream".to_string()),
                ("content-length", artifact.size.to_string()),
                (
                    "content-disposition",
                    trident_http::disposition::attachment(name),
                ),
            ],
            axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
        )
            .into_response(),
    )
}
