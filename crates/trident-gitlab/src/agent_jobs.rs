//! `/api/v4/jobs/...`: what agents call to take a job, report on it and stream its trace.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::coordinator::{Assignment, JobRefusal, StateUpdate, TraceError, UpdateOutcome};
use crate::jobs::Job;
use crate::params::{ParamError, Params};
use crate::runners::{authenticate, Refusal};
use crate::store::RegisteredAgent;
use crate::{variables, GitlabState};

fn with_headers(
    status: StatusCode,
    headers: &[(&'static str, String)],
    body: Response,
) -> Response {
    let mut response = body;
    *response.status_mut() = status;
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}

fn refused(refusal: JobRefusal) -> Response {
    match refusal {
        JobRefusal::Forbidden => Refusal::Forbidden.into_response(),
        JobRefusal::Store(e) => Refusal::Internal(e).into_response(),
        JobRefusal::NotRunning(status) => with_headers(
            StatusCode::FORBIDDEN,
            &[("job-status", status.as_str().to_string())],
            Json(json!({"message": "403 Forbidden - Job is not running"})).into_response(),
        ),
    }
}

/// `POST /jobs/request`: a matching job at once, or as soon as one is queued (or, with
/// `job_age`, old enough), or 204 after the long-poll time.
pub async fn request(
    State(state): State<GitlabState>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let agent = match authenticate(&state, &params) {
        Ok((_, agent)) => agent,
        Err(refusal) => return refusal.into_response(),
    };
    let min_age = match params.integer("job_age") {
        Ok(age) => Duration::from_secs(age.unwrap_or(0).max(0) as u64),
        Err(e) => return e.into_response(),
    };
    let coordinator = &state.coordinator;
    let waiter = coordinator.waiter(&agent);
    let deadline = Instant::now() + state.config.request_poll;
    loop {
        let version = coordinator.queue_version();
        let mut wake_at = deadline;
        match coordinator.assign(&agent, min_age) {
            Ok(Assignment::Job(job, token)) => {
                let host = headers
                    .get(axum::http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("localhost");
                // Dependencies are fetched with this job's own token (see download_artifacts).
                let dependencies: Vec<Value> = job
                    .spec
                    .dependencies
                    .iter()
                    .filter_map(|id| coordinator.get(*id))
                    .map(|dependency| {
                        let mut entry = json!({"id": dependency.id, "name": dependency.spec.name,
                                               "token": token});
                        // GitLab (`entities/ci/job_request/dependency.rb`) leaves the key out
                        // when there is nothing to download: agents test for its presence.
                        if let Some(a) = dependency.uploaded_artifacts.get("archive") {
                            entry["artifacts_file"] =
                                json!({"filename": a.filename, "size": a.size});
                        }
                        entry
                    })
                    .collect();
                let mut body = payload(&job, &token, &format!("http://{host}"), &agent);
                body["dependencies"] = Value::Array(dependencies);
                return (StatusCode::CREATED, Json(body)).into_response();
            }
            Ok(Assignment::Nothing(too_young)) => {
                if let Some(wait) = too_young {
                    wake_at = wake_at.min(Instant::now() + wait);
                }
            }
            // GitLab's 409: the job could not be given to this agent (here: storing the
            // assignment failed), it stays queued, and the agent asks again.
            Err(e) => {
                tracing::warn!(agent = agent.id, "could not store a job assignment: {e}");
                return (
                    StatusCode::CONFLICT,
                    Json(json!({"message": "409 Conflict: the job could not be assigned, ask again"})),
                )
                    .into_response();
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return with_headers(
                StatusCode::NO_CONTENT,
                &[("x-gitlab-last-update", version.to_string())],
                ().into_response(),
            );
        }
        tokio::select! {
            () = waiter.notified() => {}
            () = tokio::time::sleep(wake_at.saturating_duration_since(now)) => {}
        }
    }
}

/// The job as agents expect it (the fields the Go agent and the Rust crate read).
fn payload(job: &Job, token: &str, server_url: &str, agent: &RegisteredAgent) -> Value {
    let spec = &job.spec;
    let variables: Vec<Value> = variables::for_job(
        job,
        token,
        server_url,
        agent,
        variables::DEFAULT_PROJECT_DIR,
    )
    .into_iter()
    .map(|v| json!({"key": v.key, "value": v.value, "public": v.public, "masked": v.masked}))
    .collect();
    let mut steps = vec![
        json!({"name": "script", "script": spec.script, "timeout": spec.timeout,
                                "when": "on_success", "allow_failure": false}),
    ];
    if !spec.after_script.is_empty() {
        steps.push(json!({"name": "after_script", "script": spec.after_script,
                          "timeout": spec.timeout, "when": "always", "allow_failure": true}));
    }
    let artifacts = spec.artifacts.as_ref().map(|a| {
        json!([{"name": "artifacts", "untracked": false, "paths": a.paths, "when": a.when,
                "artifact_type": "archive", "artifact_format": "zip", "expire_in": a.expire_in}])
    });
    json!({
        "id": job.id,
        "token": token,
        "allow_git_fetch": false,
        "job_info": {"id": job.id, "name": spec.name, "stage": "test", "project_id": 0,
                     "project_name": "jobs"},
        "git_info": {"repo_url": "", "ref": "main", "sha": variables::BLANK_SHA,
                     "before_sha": variables::BLANK_SHA, "ref_type": "branch",
                     "refspecs": [], "depth": 0},
        "runner_info": {"timeout": spec.timeout, "runner_session_url": null},
        "variables": variables,
        "steps": steps,
        "image": spec.image.as_ref().map(|name| json!({"name": name, "entrypoint": null})),
        "services": [],
        "artifacts": artifacts,
        "cache": [],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": true,
                     "failure_reasons": crate::coordinator::FAILURE_REASONS},
    })
}

/// `PUT /jobs/:id`: the agent reports the job's state. With a final state it may send the
/// CRC32 (`checksum` or `output[checksum]`, as `crc32:<hex>`) and size (`output[bytesize]`) of
/// the whole trace: while the stored trace lacks some of it, the answer is 202 and the agent
/// sends the rest and asks again.
pub async fn update(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    params: Params,
) -> Response {
    let fields = (|| {
        let output = params.object("output")?;
        let output = Params(output.as_object().cloned().unwrap_or_default());
        let checksum = match output.string("checksum")? {
            Some(checksum) => Some(checksum),
            None => params.string("checksum")?,
        };
        let bytesize = output.integer("bytesize")?;
        if bytesize.is_some_and(|b| b < 0) {
            return Err(ParamError("output[bytesize] is invalid".into()));
        }
        Ok::<_, ParamError>((
            params.required_string("token")?,
            StateUpdate {
                // `Ci::UpdateBuildStateService` knows these; anything else is a 400.
                state: params.one_of("state", &["running", "success", "failed", "pending"])?,
                // Exit codes as agents report them: signed 32-bit, or Windows' unsigned ones.
                exit_code: params
                    .integer_in("exit_code", i64::from(i32::MIN)..=i64::from(u32::MAX))?,
                failure_reason: params.string("failure_reason")?,
                checksum: checksum.map(|c| parse_checksum(&c)).transpose()?,
                bytesize: bytesize.map(|b| b as u64),
            },
        ))
    })();
    let (token, update) = match fields {
        Ok(fields) => fields,
        Err(e) => return e.into_response(),
    };
    let (status, job) = match state.coordinator.update(id, &token, update) {
        Ok(UpdateOutcome::Done(job)) => (StatusCode::OK, job),
        Ok(UpdateOutcome::Accepted(job)) => (StatusCode::ACCEPTED, job),
        Err(refusal) => return refused(refusal),
    };
    with_headers(
        status,
        &[
            ("job-status", job.status.as_str().to_string()),
            (
                "x-gitlab-trace-update-interval",
                TRACE_UPDATE_INTERVAL.to_string(),
            ),
        ],
        status.as_u16().to_string().into_response(),
    )
}

/// Seconds agents wait between trace patches (and between retries of a held-back update).
const TRACE_UPDATE_INTERVAL: u64 = 3;

/// A trace checksum as agents send it: `crc32:` and eight hex digits (the prefix optional).
fn parse_checksum(text: &str) -> Result<u32, ParamError> {
    let hex = text.strip_prefix("crc32:").unwrap_or(text);
    u32::from_str_radix(hex, 16)
        .map_err(|_| ParamError(format!("checksum {text:?} is not crc32:<hex>")))
}

/// `PATCH /jobs/:id/trace`: appends `Content-Range: start-end` bytes.
pub async fn trace(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("job-token")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| query.get("token").cloned())
        .unwrap_or_default();
    let start = headers
        .get(axum::http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|range| range.split_once('-'))
        .and_then(|(start, _end)| start.trim().parse::<u64>().ok());
    let Some(start) = start else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Content-Range is missing or malformed"})),
        )
            .into_response();
    };
    match state.coordinator.append_trace(id, &token, start, &body) {
        Ok(size) => with_headers(
            StatusCode::ACCEPTED,
            &[
                ("range", format!("0-{size}")),
                ("job-status", "running".to_string()),
                (
                    "x-gitlab-trace-update-interval",
                    TRACE_UPDATE_INTERVAL.to_string(),
                ),
            ],
            ().into_response(),
        ),
        Err(TraceError::Range(size)) => with_headers(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &[("range", format!("0-{size}"))],
            ().into_response(),
        ),
        Err(TraceError::Refused(refusal)) => refused(refusal),
        Err(TraceError::Io(e)) => Refusal::Internal(e).into_response(),
    }
}

fn job_token(headers: &HeaderMap, query: &std::collections::HashMap<String, String>) -> String {
    headers
        .get("job-token")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| query.get("token").cloned())
        .unwrap_or_default()
}

fn too_large(max: u64) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        // The rest of the body stays unread: the connection cannot carry another request.
        [("connection", "close")],
        Json(json!({"message": format!("413 Request Entity Too Large: artifacts are limited to {max} bytes")})),
    )
        .into_response()
}

/// The text of a form field beside the file, which is never large (a token, a type, an
/// expiry): at most `MAX_FIELD` bytes are read.
async fn small_field(field: &mut axum::extract::multipart::Field<'_>) -> Result<String, Response> {
    const MAX_FIELD: usize = 64 * 1024;
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| crate::params::ParamError(e.body_text()).into_response())?
    {
        if bytes.len() + chunk.len() > MAX_FIELD {
            return Err(crate::params::ParamError(format!(
                "the form field {} is longer than {MAX_FIELD} bytes",
                field.name().unwrap_or_default()
            ))
            .into_response());
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes)
        .map_err(|_| crate::params::ParamError("a form field is not UTF-8".into()).into_response())
}

/// Reads and drops what is left of an upload (at most `budget` bytes of a field), so that a
/// client still sending it reads the answer instead of a broken connection.
async fn drain_field(field: &mut axum::extract::multipart::Field<'_>, budget: u64) {
    let mut read = 0u64;
    while let Ok(Some(chunk)) = field.chunk().await {
        read += chunk.len() as u64;
        if read > budget {
            return;
        }
    }
}

async fn drain(multipart: &mut axum::extract::Multipart) {
    while let Ok(Some(mut field)) = multipart.next_field().await {
        drain_field(&mut field, u64::MAX).await;
    }
}

/// Room for a multipart upload's own framing and small fields beside the file.
const MULTIPART_OVERHEAD: u64 = 1024 * 1024;

/// `POST /jobs/:id/artifacts/authorize`: may this upload of `filesize` bytes proceed?
pub async fn authorize_artifacts(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    params: Params,
) -> Response {
    let token = match params.string("token") {
        Ok(Some(token)) => token,
        Ok(None) => job_token(&headers, &Default::default()),
        Err(e) => return e.into_response(),
    };
    if let Err(refusal) = state.coordinator.authorize_artifact(id, &token) {
        return refused(refusal);
    }
    match params.integer("filesize") {
        Ok(Some(size)) if size as u64 > state.config.max_artifact_bytes => {
            too_large(state.config.max_artifact_bytes)
        }
        Ok(_) => (StatusCode::OK, Json(json!({"TempPath": ""}))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /jobs/:id/artifacts`: a multipart upload (`file`, `artifact_type`,
/// `artifact_format`, `expire_in`). Stored as it came, never unpacked.
pub async fn upload_artifacts(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    mut multipart: axum::extract::Multipart,
) -> Response {
    let max = state.config.max_artifact_bytes;
    // Nothing of the body is read before the request is known to be acceptable: its
    // declared size, then its job token (header, query, or a form field before the file).
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut token = job_token(&headers, &query);
    let mut authorized = false;
    if !token.is_empty() {
        if let Err(refusal) = state.coordinator.authorize_artifact(id, &token) {
            return refused(refusal);
        }
        authorized = true;
    }
    if let Some(length) = declared.filter(|l| *l > max.saturating_add(MULTIPART_OVERHEAD)) {
        // Only an agent's body not far above the limit is read (and dropped) first, so
        // that it hears the answer; a huge one, or a stranger's, is refused unread.
        if authorized && length <= max.saturating_mul(4) {
            drain(&mut multipart).await;
        }
        return too_large(max);
    }
    let mut fields: std::collections::HashMap<String, String> = query.clone();
    let mut upload: Option<std::path::PathBuf> = None;
    let mut size = None;
    let mut filename = "artifacts.zip".to_string();
    let result: Result<(), Response> = async {
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|e| crate::params::ParamError(e.body_text()).into_response())?
        {
            let name = field.name().unwrap_or_default().to_string();
            if name != "file" {
                let value = small_field(&mut field).await?;
                if name == "token" && !authorized {
                    state
                        .coordinator
                        .authorize_artifact(id, &value)
                        .map_err(refused)?;
                    token = value.clone();
                    authorized = true;
                }
                fields.insert(name, value);
                continue;
            }
            if !authorized {
                // The file comes before any token: refuse it unread.
                return Err(refused(JobRefusal::Forbidden));
            }
            if size.is_some() {
                return Err(crate::params::ParamError("file is given twice".into()).into_response());
            }
            if let Some(name) = field.file_name() {
                filename = name.to_string();
            }
            let path = state.coordinator.artifact_upload_path(id);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Refusal::Internal(e.to_string()).into_response())?;
            }
            upload = Some(path.clone());
            let mut file = std::fs::File::create(&path)
                .map_err(|e| Refusal::Internal(e.to_string()).into_response())?;
            let mut written = 0u64;
            while let Some(chunk) = field
                .chunk()
                .await
                .map_err(|e| crate::params::ParamError(e.body_text()).into_response())?
            {
                written += chunk.len() as u64;
                if written > max {
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    drain_field(&mut field, max.saturating_mul(3)).await;
                    return Err(too_large(max));
                }
                std::io::Write::write_all(&mut file, &chunk)
                    .map_err(|e| Refusal::Internal(e.to_string()).into_response())?;
            }
            size = Some(written);
        }
        Ok(())
    }
    .await;
    // Whatever happens from here on, no partial upload stays behind.
    let cleanup = |upload: &Option<std::path::PathBuf>| {
        if let Some(path) = upload {
            let _ = std::fs::remove_file(path);
        }
    };
    if let Err(response) = result {
        cleanup(&upload);
        return response;
    }
    if !authorized {
        return refused(JobRefusal::Forbidden);
    }
    let (Some(size), Some(path)) = (size, upload.clone()) else {
        return crate::params::ParamError("file is missing".into()).into_response();
    };
    let expire_at = match crate::jobs::parse_expire_in(
        fields.get("expire_in").map(String::as_str).unwrap_or(""),
    ) {
        Ok(seconds) => seconds.map(|s| crate::jobs::now().saturating_add(s)),
        Err(e) => {
            cleanup(&upload);
            return crate::params::ParamError(e).into_response();
        }
    };
    let kind = fields
        .get("artifact_type")
        .cloned()
        .unwrap_or_else(|| "archive".into());
    if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        cleanup(&upload);
        return crate::params::ParamError("artifact_type is invalid".into()).into_response();
    }
    let artifact = crate::jobs::StoredArtifact {
        filename,
        format: fields
            .get("artifact_format")
            .cloned()
            .unwrap_or_else(|| "zip".into()),
        size,
        expire_at,
    };
    match state
        .coordinator
        .record_artifact(id, &token, &path, &kind, artifact)
    {
        Ok(()) => (StatusCode::CREATED, Json(json!({}))).into_response(),
        Err(e) => {
            cleanup(&upload);
            match e {
                TraceError::Refused(refusal) => refused(refusal),
                TraceError::Io(e) => Refusal::Internal(e).into_response(),
                TraceError::Range(_) => Refusal::Internal("unexpected".into()).into_response(),
            }
        }
    }
}

/// `GET /jobs/:id/artifacts`: the archive, for the job itself or a job depending on it.
pub async fn download_artifacts(
    State(state): State<GitlabState>,
    Path(id): Path<i64>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    match state
        .coordinator
        .artifact_for_token(id, &job_token(&headers, &query))
    {
        Ok(Some((path, artifact))) => serve_file(path, artifact).await,
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "404 Not Found"})),
        )
            .into_response(),
        Err(refusal) => refused(refusal),
    }
}

/// Streams a stored artifact with its size and name.
pub(crate) async fn serve_file(
    path: std::path::PathBuf,
    artifact: crate::jobs::StoredArtifact,
) -> Response {
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(_) => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"message": "404 Not Found"})),
            )
                .into_response()
        }
    };
    // Never the name as sent (`../../x`): its last component, safely quoted.
    let name = trident_http::disposition::base_name(&artifact.filename, "artifacts.zip");
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
        .into_response()
}
