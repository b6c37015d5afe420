//! A raw-HTTP GitLab runner agent and jobs-API client for the tests: what an agent sends
//! and what a client of trident's jobs API does, in one place.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use super::Server;

/// A server URL under `/api/v4`.
pub fn v4(server: &Server, path: &str) -> String {
    format!("http://{}/api/v4{path}", server.address)
}

/// Registers an agent with the registration token `reg` (plus `extra` parameters); returns
/// its token.
pub async fn register(server: &Server, extra: Value) -> String {
    let mut body = json!({"token": "reg"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let r = server
        .http
        .post(v4(server, "/runners"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// `POST /jobs/request` as `agent`: status, headers and the payload (or null).
pub async fn request_job(server: &Server, agent: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = server
        .http
        .post(v4(server, "/jobs/request"))
        .json(&json!({"token": agent, "info": {"features": {"trace_sections": true}}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// Submits a job through the jobs API; returns the job as answered.
pub async fn submit(server: &Server, job: Value) -> Value {
    let r = server.send(Method::POST, "/jobs", job).await;
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

/// Submits a job; returns its id.
pub async fn submit_id(server: &Server, job: Value) -> i64 {
    submit(server, job).await["id"].as_i64().unwrap()
}

pub async fn patch_trace(
    server: &Server,
    id: i64,
    token: &str,
    range: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut request = server
        .http
        .patch(v4(server, &format!("/jobs/{id}/trace")))
        .header("JOB-TOKEN", token)
        .body(body.to_string());
    if let Some(range) = range {
        request = request.header("Content-Range", range);
    }
    request.send().await.unwrap()
}

pub async fn put_state(server: &Server, id: i64, body: Value) -> reqwest::Response {
    server
        .http
        .put(v4(server, &format!("/jobs/{id}")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

pub async fn job(server: &Server, id: i64) -> Value {
    server
        .get(&format!("/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap()
}

pub async fn job_status(server: &Server, id: i64) -> Value {
    job(server, id).await["status"].clone()
}

pub async fn trace(server: &Server, id: i64) -> String {
    server
        .get(&format!("/jobs/{id}/trace"))
        .await
        .text()
        .await
        .unwrap()
}

/// Waits (up to `bound`) for the job to finish; returns it and its trace.
pub async fn wait_finished_within(server: &Server, id: i64, bound: Duration) -> (Value, String) {
    let deadline = Instant::now() + bound;
    loop {
        let job = job(server, id).await;
        if matches!(
            job["status"].as_str(),
            Some("success" | "failed" | "canceled")
        ) {
            return (job, trace(server, id).await);
        }
        assert!(Instant::now() < deadline, "job {id} never finished: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_finished(server: &Server, id: i64) -> (Value, String) {
    wait_finished_within(server, id, Duration::from_secs(90)).await
}

/// Takes a fresh job as `agent`: its id and token.
pub async fn take(server: &Server, agent: &str, name: &str) -> (i64, String) {
    let job = submit(server, json!({"name": name, "script": ["true"]})).await;
    let (status, _, payload) = request_job(server, agent).await;
    assert_eq!(status, 201);
    assert_eq!(payload["id"], job["id"]);
    (
        payload["id"].as_i64().unwrap(),
        payload["token"].as_str().unwrap().to_string(),
    )
}

/// `crc32:<hex>` of a trace, as agents send it.
pub fn crc(text: &str) -> String {
    format!("crc32:{:08x}", crc32fast::hash(text.as_bytes()))
}
