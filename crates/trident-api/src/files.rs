//! `/runners/{id}/files`: list, patch (delete then copy), raw download.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use trident_core::model::FileCopy;

use crate::error::{ApiError, ApiResult};
use crate::extract::{list_of_objects, query_bool, JsonBody};
use crate::AppState;

/// How much of a downloaded file is read at a time.
const DOWNLOAD_CHUNK_BYTES: usize = 256 * 1024;

fn check_path(path: &str) -> ApiResult<()> {
    if path.contains('\0') {
        return Err(ApiError::bad_request("paths may not contain NUL bytes"));
    }
    Ok(())
}

pub async fn list(
    State(state): State<AppState>,
    Path(runner_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    state.manager.runner(&runner_id)?;
    let recursive = query_bool(&query, "recursive", true)?;
    let privileged = query_bool(&query, "privilegedExecution", false)?;
    let path = query.get("path").map(String::as_str).unwrap_or("./");
    check_path(path)?;
    let files = state
        .manager
        .list_files(&runner_id, path, recursive, privileged)
        .await?;
    Ok(Json(json!({ "files": files })))
}

#[derive(Deserialize)]
pub struct PatchBody {
    #[serde(default)]
    delete: Option<Vec<String>>,
    #[serde(default, deserialize_with = "list_of_objects")]
    copy: Option<Vec<CopyEntry>>,
}

#[derive(Deserialize)]
pub struct CopyEntry {
    path: String,
    #[serde(default)]
    content: Option<Base64Content>,
}

/// A file's content, decoded from base64 while the body is parsed: straight from the
/// request's bytes when the JSON string has no escapes (base64 never needs one), so a large
/// copy is never held as a `String` too. A decoding error is kept for the handler, which
/// names the file (its path may come after its content).
struct Base64Content(Result<Vec<u8>, base64::DecodeError>);

impl<'de> Deserialize<'de> for Base64Content {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Decoding;
        impl serde::de::Visitor<'_> for Decoding {
            type Value = Base64Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Base64Content, E> {
                Ok(Base64Content(
                    base64::engine::general_purpose::STANDARD.decode(text),
                ))
            }
        }
        deserializer.deserialize_str(Decoding)
    }
}

pub async fn patch(
    State(state): State<AppState>,
    Path(runner_id): Path<String>,
    JsonBody(body): JsonBody<PatchBody>,
) -> ApiResult<StatusCode> {
    state.manager.runner(&runner_id)?;
    let delete = body.delete.unwrap_or_default();
    for path in &delete {
        check_path(path)?;
    }
    let mut copy = Vec::new();
    for entry in body.copy.unwrap_or_default() {
        check_path(&entry.path)?;
        if entry.path.is_empty() {
            return Err(ApiError::bad_request("a file to copy has an empty path"));
        }
        let content = match entry.content {
            Some(Base64Content(decoded)) => decoded,
            None => Ok(Vec::new()),
        };
        let content = content.map_err(|e| {
            ApiError::bad_request(format!(
                "the content of {} is not valid base64: {e}",
                entry.path
            ))
        })?;
        copy.push(FileCopy {
            path: entry.path,
            content,
        });
    }
    state.manager.patch_files(&runner_id, delete, copy).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn download(
    State(state): State<AppState>,
    Path(runner_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    state.manager.runner(&runner_id)?;
    let privileged = query_bool(&query, "privilegedExecution", false)?;
    let path = query
        .get("path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("the query parameter path is required"))?;
    check_path(path)?;
    let file = state
        .manager
        .open_file(&runner_id, path, privileged)
        .await?;

    // Chunks of 256 KiB rather than ReaderStream's default 4 KiB: each read of the file is a
    // hop to a blocking thread, and a 64 MiB download took 16,384 of them.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.content,
        DOWNLOAD_CHUNK_BYTES,
    ));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, file.size.to_string()),
            // The path as the client gave it, as the reference does; made safe for a header.
            (
                header::CONTENT_DISPOSITION,
                trident_http::disposition::attachment(path),
            ),
        ],
        body,
    )
        .into_response())
}
