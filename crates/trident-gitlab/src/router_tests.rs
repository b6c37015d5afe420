//! The `/api/v4` and jobs routers in-process (`tower::ServiceExt::oneshot`) over a real
//! SQLite store in a temporary directory: the validation tables that need no sandbox run here
//! in milliseconds. The real-binary suite (`crates/trident/tests/gitlab_*.rs`) stays the
//! acceptance test.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use trident_jobs::{Coordinator, CoordinatorConfig};
use trident_store::SqliteStore;

use crate::{normalize_path, router, GitlabConfig};

struct Coordinated {
    router: Router,
    dir: tempfile::TempDir,
}

struct Answer {
    status: u16,
    body: Value,
}

enum Payload {
    Json(Value),
    Form(&'static [(&'static str, &'static str)]),
}

impl Coordinated {
    fn new() -> Coordinated {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("trident.db")).unwrap());
        let coordinator = Arc::new(
            Coordinator::new(
                store.clone(),
                dir.path().join("traces"),
                CoordinatorConfig::default(),
            )
            .unwrap(),
        );
        let config = GitlabConfig {
            registration_token: Some("reg".into()),
            request_poll: Duration::ZERO,
            ..GitlabConfig::default()
        };
        Coordinated {
            router: router(store, coordinator, config),
            dir,
        }
    }

    /// Sends a request through Grape's path normalization, as the server does.
    async fn send(&self, method: Method, path: &str, payload: Payload) -> Answer {
        let (content_type, body) = match payload {
            Payload::Json(v) => ("application/json", v.to_string()),
            Payload::Form(pairs) => (
                "application/x-www-form-urlencoded",
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(pairs)
                    .finish(),
            ),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(Body::from(body))
            .unwrap();
        let response = self
            .router
            .clone()
            .oneshot(normalize_path(request))
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Payload::Json(body)).await
    }

    async fn register(&self) -> String {
        let answer = self.post("/api/v4/runners", json!({"token": "reg"})).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        answer.body["token"].as_str().unwrap().to_string()
    }

    /// A job submitted and taken by a new agent: its id and job token.
    async fn running_job(&self) -> (i64, String) {
        let submitted = self
            .post(
                "/api/v1/jobs",
                json!({"name": "checked", "script": ["true"]}),
            )
            .await;
        assert_eq!(submitted.status, 201, "{}", submitted.body);
        let agent = self.register().await;
        let taken = self
            .post("/api/v4/jobs/request", json!({"token": agent}))
            .await;
        assert_eq!(taken.status, 201, "{}", taken.body);
        (
            taken.body["id"].as_i64().unwrap(),
            taken.body["token"].as_str().unwrap().to_string(),
        )
    }

    async fn status_of(&self, id: i64) -> Value {
        self.send(
            Method::GET,
            &format!("/api/v1/jobs/{id}"),
            Payload::Json(Value::Null),
        )
        .await
        .body["status"]
            .clone()
    }
}

#[tokio::test]
async fn registrations_are_validated_as_gitlab_does() {
    let gitlab = Coordinated::new();
    for (body, expected) in [
        (json!({"token": "wrong"}), 403),
        (json!({}), 400),
        (
            json!({"token": "reg", "active": true, "paused": false}),
            400,
        ),
        (
            json!({"token": "reg", "maintainer_note": "a", "maintenance_note": "b"}),
            400,
        ),
        (json!({"token": "reg", "access_level": "everyone"}), 400),
        (
            json!({"token": "reg", "maintenance_note": "x".repeat(1025)}),
            400,
        ),
        (json!({"token": "reg", "maximum_timeout": 60}), 400),
        (json!({"token": "reg", "tag_list": 5}), 400),
        (json!({"token": "reg", "paused": "maybe"}), 400),
        (json!({"token": "reg", "paused": "2"}), 400),
        (json!({"token": "reg", "paused": "TRUE"}), 201),
        (json!({"token": "reg", "paused": "n"}), 201),
    ] {
        let answer = gitlab.post("/api/v4/runners", body.clone()).await;
        assert_eq!(answer.status, expected, "{body}: {}", answer.body);
    }
    let missing = gitlab.post("/api/v4/runners", json!({})).await;
    assert_eq!(missing.body, json!({"error": "token is missing"}));

    // Grape's paths and form bodies: squeezed slashes, a trailing one, `False`.
    for path in ["//api/v4/runners", "/api/v4/runners/", "/api//v4/runners//"] {
        let form = Payload::Form(&[("token", "reg"), ("run_untagged", "False")]);
        let answer = gitlab.send(Method::POST, path, form).await;
        assert_eq!(answer.status, 201, "{path}: {}", answer.body);
    }
    let unknown = gitlab
        .post("/api/v4/runners/verify", json!({"token": "glrt-unknown"}))
        .await;
    assert_eq!(unknown.status, 403);
}

#[tokio::test]
async fn jobs_and_state_updates_are_checked() {
    let gitlab = Coordinated::new();
    for bad in [
        json!({"name": "x", "script": []}),
        json!({"script": ["true"]}),
        json!({"name": "x", "script": ["true"], "dependencies": [999]}),
        json!({"name": "x", "script": ["true"], "files": [{"path": "a", "content": "not base64!"}]}),
        json!([]),
    ] {
        let answer = gitlab.post("/api/v1/jobs", bad.clone()).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
    }
    let request = gitlab
        .post("/api/v4/jobs/request", json!({"token": "glrt-unknown"}))
        .await;
    assert_eq!(request.status, 403);

    let (id, token) = gitlab.running_job().await;
    let put = |body: Value| {
        let gitlab = &gitlab;
        async move {
            gitlab
                .send(
                    Method::PUT,
                    &format!("/api/v4/jobs/{id}"),
                    Payload::Json(body),
                )
                .await
        }
    };
    for (body, expected) in [
        (json!({"token": token, "state": "bogus"}), 400),
        (
            json!({"token": token, "state": "success", "exit_code": 1_099_511_627_776u64}),
            400,
        ),
        (
            json!({"token": token, "state": "failed", "exit_code": "one"}),
            400,
        ),
        (
            json!({"token": token, "state": "success", "checksum": "crc32:xyz"}),
            400,
        ),
        (
            json!({"token": token, "state": "success", "output": {"bytesize": -1}}),
            400,
        ),
        (
            json!({"token": token, "state": "success", "output": "big"}),
            400,
        ),
        (json!({"token": "wrong", "state": "success"}), 403),
        (json!({"state": "success"}), 400),
    ] {
        let answer = put(body.clone()).await;
        assert_eq!(answer.status, expected, "{body}: {}", answer.body);
        assert_eq!(gitlab.status_of(id).await, "running", "{body}");
    }
    // A Windows exit code is a valid one.
    let running = json!({"token": token, "state": "running", "exit_code": 3_221_225_477u64});
    assert_eq!(put(running).await.status, 200);

    // The database refuses every write to job states (a real SQLite failure): the agent
    // must hear a 5xx and retry, not a 403 that makes it abandon the job.
    let db = rusqlite::Connection::open(gitlab.dir.path().join("trident.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_updates BEFORE UPDATE ON ci_job_states
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    let success = json!({"token": token, "state": "success"});
    assert_eq!(put(success.clone()).await.status, 500);
    db.execute_batch("DROP TRIGGER refuse_updates").unwrap();
    assert_eq!(gitlab.status_of(id).await, "running");
    assert_eq!(put(success).await.status, 200);
    assert_eq!(gitlab.status_of(id).await, "success");
}
