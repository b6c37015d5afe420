//! The Poseidon router in-process (`tower::ServiceExt::oneshot`) over the core's test doubles:
//! the validation and authentication tables that need neither root nor a sandbox run here in
//! milliseconds. The real-binary suite (`crates/trident/tests`) stays the acceptance test and
//! repeats the same tables against a real server.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request};
use axum::Router;
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use trident_core::testing::{MemoryStore, RecordingBackend};
use trident_core::{Manager, ManagerConfig};

use crate::{router, ApiConfig};

const ENV: u64 = 7;

struct Api {
    router: Router,
    backend: Arc<RecordingBackend>,
    token: Option<&'static str>,
}

struct Answer {
    status: u16,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("{} with a non-JSON body {:?}: {e}", self.status, self.text))
    }

    /// The error message, which every error must have.
    fn message(&self) -> String {
        let message = self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!message.is_empty(), "{} without a message", self.status);
        message
    }
}

impl Api {
    fn new(token: Option<&'static str>, max_body_bytes: usize) -> Api {
        Api::with_images(token, max_body_bytes, None)
    }

    fn with_images(
        token: Option<&'static str>,
        max_body_bytes: usize,
        images: Option<Arc<dyn crate::ImageService>>,
    ) -> Api {
        let backend =
            Arc::new(RecordingBackend::with_seed(7).with_images(&["host", "docker.io/org/py:3"]));
        let manager = Manager::new(
            backend.clone(),
            Arc::new(MemoryStore::default()),
            ManagerConfig::default(),
        );
        let config = ApiConfig {
            token: token.map(String::from),
            max_body_bytes,
            images,
            ..ApiConfig::default()
        };
        Api {
            router: router(manager, config),
            backend,
            token,
        }
    }

    /// Sends a request as a real client would (Content-Length set), with the right token
    /// when `token` is None, else with the given header value (`Some(None)`: no header).
    async fn call_as(
        &self,
        token: Option<Option<&str>>,
        method: Method,
        path: &str,
        body: impl Into<Vec<u8>>,
    ) -> Answer {
        let body = body.into();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header("content-type", "application/json")
            .header("content-length", body.len());
        if let Some(t) = token.unwrap_or(self.token) {
            request = request.header("poseidon-token", t);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: impl Into<Vec<u8>>) -> Answer {
        self.call_as(None, method, path, body).await
    }

    async fn environment_json(&self) -> Value {
        self.call(Method::GET, &format!("/execution-environments/{ENV}"), "")
            .await
            .json()
    }

    /// An environment with one idle runner, and that runner claimed.
    async fn claimed_runner(&self) -> String {
        let put = self
            .call(
                Method::PUT,
                &format!("/execution-environments/{ENV}"),
                environment(1).to_string(),
            )
            .await;
        assert_eq!(put.status, 201, "{}", put.text);
        let claim = self
            .call(
                Method::POST,
                "/runners",
                json!({"executionEnvironmentId": ENV}).to_string(),
            )
            .await;
        assert_eq!(claim.status, 200, "{}", claim.text);
        // The pool refills; wait for it so that later counts are stable.
        for _ in 0..500 {
            let stats = self
                .call(Method::GET, "/statistics/execution-environments", "")
                .await
                .json();
            if stats[ENV.to_string()]["idleRunners"] == 1 {
                return claim.json()["runnerId"].as_str().unwrap().to_string();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the pool never refilled");
    }
}

fn environment(pool: u32) -> Value {
    json!({"id": ENV, "image": "host", "prewarmingPoolSize": pool, "cpuLimit": 20,
           "memoryLimit": 256, "networkAccess": false, "exposedPorts": []})
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn bad_input_is_refused_with_a_message_and_changes_nothing() {
    let api = Api::new(None, 1 << 20);
    let runner = api.claimed_runner().await;
    let env_before = api.environment_json().await;
    let created_before = api.backend.created.load(Ordering::SeqCst);
    let env_path = &format!("/execution-environments/{ENV}")[..];
    let execute = &format!("/runners/{runner}/execute")[..];
    let files = &format!("/runners/{runner}/files")[..];
    let with = |key: &str, value: Value| {
        let mut env = environment(3);
        env[key] = value;
        env.to_string()
    };

    // (method, path, body, expected status, text the message must contain)
    let mut cases: Vec<(Method, &str, String, u16, &str)> = [
        "{not json",
        "",
        "null",
        "[]",
        "\"host\"",
        &"[".repeat(100_000),
    ]
    .iter()
    .map(|body| (Method::PUT, env_path, body.to_string(), 400, ""))
    .collect();
    for (key, value, needle) in [
        ("prewarmingPoolSize", json!("x"), ""),
        ("prewarmingPoolSize", json!(-1), ""),
        ("prewarmingPoolSize", Value::Null, ""),
        ("prewarmingPoolSize", json!(1.5), ""),
        ("prewarmingPoolSize", json!(10_001), "maximum"),
        ("cpuLimit", json!(-20), ""),
        ("memoryLimit", json!(-256), ""),
        ("memoryLimit", json!(4294967296u64), ""),
        ("networkAccess", json!("no"), ""),
        ("exposedPorts", json!([70000]), ""),
        ("exposedPorts", json!([-1]), ""),
        ("id", json!(ENV + 1), ""),
        ("id", json!(ENV.to_string()), ""),
        ("image", json!("no-such-image"), "images:"),
    ] {
        cases.push((Method::PUT, env_path, with(key, value), 400, needle));
    }
    let claim = |body: Value| (Method::POST, "/runners", body.to_string(), 400, "");
    cases.extend([
        claim(json!({"executionEnvironmentId": ENV.to_string()})),
        claim(json!({"executionEnvironmentId": -1})),
        claim(json!({"executionEnvironmentId": ENV, "inactivityTimeout": -5})),
        claim(json!({"executionEnvironmentId": ENV, "inactivityTimeout": 3_000_000_000u64})),
        claim(json!({"inactivityTimeout": 5})),
    ]);
    for (body, needle) in [
        (json!({"command": "true", "environment": {"1BAD": "x"}}), ""),
        (json!({"command": "true", "environment": {"A-B": "x"}}), ""),
        (json!({"command": "true", "environment": {"": "x"}}), ""),
        (json!({"command": "true", "environment": {"A": 1}}), ""),
        (json!({"command": "true", "timeLimit": -1}), ""),
        (
            json!({"command": "true", "timeLimit": 3_000_000_000u64}),
            "",
        ),
        (json!({"command": "true", "privilegedExecution": "yes"}), ""),
        (
            json!({"command": "echo 'quoted'"}),
            "use of forbidden character",
        ),
        (json!({}), ""),
        (json!([]), ""),
    ] {
        cases.push((Method::POST, execute, body.to_string(), 400, needle));
    }
    for (body, needle) in [
        // Invalid base64 in the second file: nothing at all reaches the runner, and the
        // answer names the file (its path comes after its content here).
        (
            json!({"delete": ["keep.txt"], "copy": [
                {"path": "first.txt", "content": b64("fine")},
                {"content": "***not base64***", "path": "second.txt"}]}),
            "second.txt",
        ),
        (
            json!({"copy": [{"path": "x", "content": ["not", "a", "string"]}]}),
            "base64",
        ),
        (json!({"copy": "nope"}), ""),
        (json!({"delete": [1, 2]}), ""),
    ] {
        cases.push((Method::PATCH, files, body.to_string(), 400, needle));
    }
    for (method, path, body, expected, needle) in cases {
        let context = format!("{method} {path} {}", &body[..body.len().min(120)]);
        let answer = api.call(method, path, body.clone()).await;
        let message = answer.message();
        assert_eq!(answer.status, expected, "{context}: {message}");
        assert!(
            message.contains(needle),
            "{context}: {message:?} lacks {needle:?}"
        );
        assert_eq!(api.environment_json().await, env_before, "{context}");
        assert_eq!(api.backend.patches.load(Ordering::SeqCst), 0, "{context}");
    }
    let binary = api
        .call(Method::PUT, env_path, vec![0xff, 0xfe, b'{', 0x80])
        .await;
    assert_eq!(binary.status, 400, "{}", binary.message());

    // Query parameters, unknown paths and wrong methods.
    for (method, path, expected) in [
        (Method::GET, format!("{files}?recursive=maybe"), 400),
        (Method::GET, format!("{files}?privilegedExecution=2"), 400),
        (Method::GET, format!("{files}/raw"), 400),
        (Method::GET, format!("{files}/raw?path="), 400),
        (
            Method::GET,
            format!("{files}/raw?path=a&privilegedExecution=maybe"),
            400,
        ),
        (Method::GET, format!("{files}/raw?path=keep%00.txt"), 400),
        (Method::GET, "/nothing-here".into(), 404),
        (Method::GET, format!("/runners/{runner}/unknown"), 404),
        (Method::GET, "/execution-environments/abc".into(), 404),
        (
            Method::GET,
            "/execution-environments/99999999999999999999999".into(),
            400,
        ),
        (Method::GET, "/execution-environments/555".into(), 404),
        (Method::DELETE, "/execution-environments/555".into(), 404),
        (Method::DELETE, "/health".into(), 405),
        (Method::POST, "/execution-environments".into(), 405),
        (Method::PUT, "/runners".into(), 405),
        (Method::GET, format!("/runners/{runner}"), 405),
        (Method::POST, format!("{files}/raw"), 405),
        (Method::GET, execute.to_string(), 405),
    ] {
        let answer = api.call(method.clone(), &path, "").await;
        let message = answer.message();
        assert_eq!(answer.status, expected, "{method} {path}: {message}");
    }
    let body = json!({"command": "true"}).to_string();
    let answer = api
        .call(Method::POST, "/runners/no-such-runner/execute", body)
        .await;
    // Poseidon's answer for a runner it does not know (any more).
    assert_eq!(answer.status, 410, "{}", answer.message());
    // An unknown or missing execution on the WebSocket route is a 404.
    for query in [
        "?executionID=00000000-0000-0000-0000-000000000000",
        "?executionID=",
        "",
    ] {
        let path = format!("/runners/{runner}/websocket{query}");
        let answer = api.call(Method::GET, &path, "").await;
        assert_eq!(answer.status, 404, "{path}: {}", answer.message());
    }

    // Over the body limit (1 MiB here): 413 with a message; just under it is fine.
    let big = b64(&"a".repeat(1 << 20));
    let over = json!({"delete": ["keep.txt"], "copy": [{"path": "big", "content": big}]});
    let answer = api.call(Method::PATCH, files, over.to_string()).await;
    assert_eq!(answer.status, 413, "{}", answer.message());
    let mut env = environment(5);
    env["padding"] = json!(big);
    let answer = api.call(Method::PUT, env_path, env.to_string()).await;
    assert_eq!(answer.status, 413, "{}", answer.message());
    assert_eq!(api.environment_json().await, env_before);
    assert_eq!(api.backend.patches.load(Ordering::SeqCst), 0);
    assert_eq!(api.backend.created.load(Ordering::SeqCst), created_before);

    let under = json!({"copy": [{"path": "big", "content": b64(&"b".repeat(600 << 10))}],
                       "unknown": 1});
    let answer = api.call(Method::PATCH, files, under.to_string()).await;
    assert_eq!(answer.status, 204, "{}", answer.text);
    assert_eq!(api.backend.patches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_token_guards_every_route_but_health_and_version() {
    let api = Api::new(Some("secret"), 1 << 20);
    for token in [None, Some("wrong")] {
        let health = api.call_as(Some(token), Method::GET, "/health", "").await;
        assert_eq!(health.status, 204, "{token:?}");
        let version = api.call_as(Some(token), Method::GET, "/version", "").await;
        assert_eq!(version.status, 200, "{token:?}");
        assert!(version.json().as_str().is_some_and(|v| !v.is_empty()));
    }

    let runner = api.claimed_runner().await;
    let env_before = api.environment_json().await;
    let env_path = format!("/execution-environments/{ENV}");
    let routes: Vec<(Method, String, Value)> = vec![
        (
            Method::GET,
            "/statistics/execution-environments".into(),
            Value::Null,
        ),
        (Method::GET, "/execution-environments".into(), Value::Null),
        (Method::GET, env_path.clone(), Value::Null),
        (
            Method::PUT,
            "/execution-environments/8".into(),
            environment(0),
        ),
        (Method::PUT, env_path.clone(), environment(3)),
        (Method::DELETE, env_path.clone(), Value::Null),
        (
            Method::POST,
            "/runners".into(),
            json!({"executionEnvironmentId": ENV}),
        ),
        (Method::DELETE, format!("/runners/{runner}"), Value::Null),
        (
            Method::POST,
            format!("/runners/{runner}/execute"),
            json!({"command": "true"}),
        ),
        (
            Method::GET,
            format!("/runners/{runner}/websocket?executionID=x"),
            Value::Null,
        ),
        (Method::GET, format!("/runners/{runner}/files"), Value::Null),
        (
            Method::GET,
            format!("/runners/{runner}/files/raw?path=a"),
            Value::Null,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            json!({"copy": [{"path": "x", "content": b64("x")}]}),
        ),
    ];
    let wrong = [
        None,
        Some(""),
        Some("wrong"),
        Some("secre"),
        Some("secret2"),
        Some("SECRET"),
    ];
    for (method, path, body) in &routes {
        for token in wrong {
            let body = if body.is_null() {
                String::new()
            } else {
                body.to_string()
            };
            let answer = api.call_as(Some(token), method.clone(), path, body).await;
            assert_eq!(answer.status, 401, "{method} {path} with {token:?}");
            assert_eq!(answer.text, "", "{method} {path} with {token:?}");
        }
    }
    assert_eq!(api.environment_json().await, env_before);
    assert_eq!(
        api.call(Method::GET, "/execution-environments/8", "")
            .await
            .status,
        404
    );
    assert_eq!(api.backend.patches.load(Ordering::SeqCst), 0);
    let stats = api
        .call(Method::GET, "/statistics/execution-environments", "")
        .await
        .json();
    assert_eq!(stats[ENV.to_string()]["usedRunners"], 1, "{stats}");
}

/// An image service that keeps names in a list: what the router does with its answers.
#[derive(Default)]
struct ListedImages(std::sync::Mutex<Vec<crate::ImageView>>);

impl crate::ImageService for ListedImages {
    fn list(&self) -> Vec<crate::ImageView> {
        self.0.lock().unwrap().clone()
    }
    fn pull(&self, name: &str) -> Result<crate::ImageView, crate::ImageOpError> {
        if name.contains(' ') {
            return Err(crate::ImageOpError::Invalid(format!(
                "invalid reference {name:?}"
            )));
        }
        let view = crate::ImageView {
            name: name.to_string(),
            digest: None,
            size: 0,
            layers: 0,
            state: "pulling".into(),
            bytes_done: 0,
            bytes_total: 0,
            error: None,
        };
        self.0.lock().unwrap().push(view.clone());
        Ok(view)
    }
    fn remove(&self, name: &str, in_use: &[String]) -> Result<(), crate::ImageOpError> {
        if in_use.iter().any(|i| i == name) {
            return Err(crate::ImageOpError::InUse(format!("{name} is in use")));
        }
        let mut images = self.0.lock().unwrap();
        let before = images.len();
        images.retain(|i| i.name != name);
        if images.len() == before {
            return Err(crate::ImageOpError::NotFound(format!("no image {name}")));
        }
        Ok(())
    }
}

#[tokio::test]
async fn images_routes_pull_list_and_remove_behind_the_token() {
    let api = Api::with_images(
        Some("secret"),
        1 << 20,
        Some(Arc::new(ListedImages::default())),
    );
    let denied = api.call_as(Some(None), Method::GET, "/images", "").await;
    assert_eq!(denied.status, 401, "{}", denied.text);

    let pulled = api
        .call(
            Method::POST,
            "/images",
            json!({"name": "docker.io/org/py:3"}).to_string(),
        )
        .await;
    assert_eq!(pulled.status, 202, "{}", pulled.text);
    assert_eq!(pulled.json()["state"], "pulling");
    assert!(pulled.json().get("bytesDone").is_some(), "{}", pulled.text);
    for body in [json!({"name": "not valid"}), json!({}), json!({"name": 3})] {
        let bad = api.call(Method::POST, "/images", body.to_string()).await;
        assert_eq!(bad.status, 400, "{body}: {}", bad.text);
        bad.message();
    }
    let listed = api.call(Method::GET, "/images", "").await.json();
    assert_eq!(
        listed["images"][0]["name"], "docker.io/org/py:3",
        "{listed}"
    );
    assert_eq!(listed["images"].as_array().unwrap().len(), 1, "{listed}");

    // An environment using the image holds it.
    let env = json!({"id": ENV, "image": "docker.io/org/py:3", "prewarmingPoolSize": 0,
        "cpuLimit": 20, "memoryLimit": 64, "networkAccess": false, "exposedPorts": []});
    let put = api
        .call(
            Method::PUT,
            &format!("/execution-environments/{ENV}"),
            env.to_string(),
        )
        .await;
    assert_eq!(put.status, 201, "{}", put.text);
    let held = api
        .call(Method::DELETE, "/images/docker.io/org/py:3", "")
        .await;
    assert_eq!(held.status, 409, "{}", held.text);
    held.message();
    let deleted = api
        .call(
            Method::DELETE,
            &format!("/execution-environments/{ENV}"),
            "",
        )
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    let removed = api
        .call(Method::DELETE, "/images/docker.io/org/py:3", "")
        .await;
    assert_eq!(removed.status, 204, "{}", removed.text);
    let again = api
        .call(Method::DELETE, "/images/docker.io/org/py:3", "")
        .await;
    assert_eq!(again.status, 404, "{}", again.text);
    assert_eq!(
        api.call(Method::GET, "/images", "").await.json()["images"],
        json!([])
    );

    // Without an image store the routes say so.
    let plain = Api::new(None, 1 << 20);
    assert_eq!(plain.call(Method::GET, "/images", "").await.status, 501);
}
