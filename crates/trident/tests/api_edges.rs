//! Bad input gets a clear error with the right status and leaves state intact; auth,
//! health, pools and the WebSocket's edge cases.

mod common;

use std::time::{Duration, Instant};

use common::{b64, exec, Options, Server};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};

async fn status_and_message(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (
        status,
        body["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly_and_change_nothing() {
    let server = Server::start_with(Options {
        config_yaml: Some("max_body_mb: 1\n".into()),
        ..Options::default()
    });
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    server.copy(&runner, &[("keep.txt", "kept")]).await;
    let env_before: Value = server
        .get("/execution-environments/1")
        .await
        .json()
        .await
        .unwrap();

    let cases: Vec<(Method, String, &str, u16)> = vec![
        (
            Method::PUT,
            "/execution-environments/1".into(),
            "{not json",
            400,
        ),
        (
            Method::PUT,
            "/execution-environments/1".into(),
            r#"{"image":"host","prewarmingPoolSize":"x","cpuLimit":20,"memoryLimit":256,"networkAccess":false}"#,
            400,
        ),
        (
            Method::PUT,
            "/execution-environments/1".into(),
            r#"{"image":"host","prewarmingPoolSize":-1,"cpuLimit":20,"memoryLimit":256,"networkAccess":false}"#,
            400,
        ),
        (
            Method::PUT,
            "/execution-environments/1".into(),
            r#"{"id":2,"image":"host","prewarmingPoolSize":1,"cpuLimit":20,"memoryLimit":256,"networkAccess":false}"#,
            400,
        ),
        (
            Method::PUT,
            "/execution-environments/1".into(),
            r#"{"image":"host","prewarmingPoolSize":100000,"cpuLimit":20,"memoryLimit":256,"networkAccess":false}"#,
            400,
        ),
        (
            Method::PUT,
            "/execution-environments/1".into(),
            r#"{"image":"host","prewarmingPoolSize":1,"cpuLimit":20,"memoryLimit":256,"networkAccess":false,"exposedPorts":[0]}"#,
            400,
        ),
        (
            Method::POST,
            "/runners".into(),
            r#"{"executionEnvironmentId":"1"}"#,
            400,
        ),
        (
            Method::POST,
            "/runners".into(),
            r#"{"executionEnvironmentId":1,"inactivityTimeout":-5}"#,
            400,
        ),
        (
            Method::POST,
            format!("/runners/{runner}/execute"),
            r#"{"command":"true","environment":{"1BAD":"x"}}"#,
            400,
        ),
        (
            Method::POST,
            format!("/runners/{runner}/execute"),
            r#"{"command":"true","timeLimit":"soon"}"#,
            400,
        ),
        (
            Method::POST,
            format!("/runners/{runner}/execute"),
            r#"{"commandx":"true"}"#,
            400,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"delete":["keep.txt"],"copy":[{"path":"a.txt","content":"!!!not base64"}]}"#,
            400,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"delete":["keep.txt"],"copy":[{"path":"a.txt","content":12}]}"#,
            400,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"copy":[{"path":"","content":""}]}"#,
            400,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"copy":"nope"}"#,
            400,
        ),
        // Paths the runner's file system refuses: through a file, over a directory, into
        // read-only or image directories. As the reference's `tar` run: 500 `UNKNOWN`, naming
        // the entry (the entries around it are written: see poseidon_fidelity).
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"copy":[{"path":"keep.txt/inside","content":""}]}"#,
            500,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"copy":[{"path":"keep.txt/sub/","content":""}]}"#,
            500,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"copy":[{"path":"/workspace","content":""}]}"#,
            500,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"copy":[{"path":"/sys/planted","content":""}]}"#,
            500,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            r#"{"copy":[{"path":"/etc/planted","content":""}]}"#,
            500,
        ),
    ];
    for (method, path, body, expected) in cases {
        let (status, message) =
            status_and_message(server.send_raw(method.clone(), &path, body).await).await;
        assert_eq!(status, expected, "{method} {path} {body}: {message}");
        assert!(!message.is_empty(), "{method} {path} {body}: no message");
    }

    // Query parameters.
    for path in [
        format!("/runners/{runner}/files?recursive=maybe"),
        format!("/runners/{runner}/files?privilegedExecution=2"),
        format!("/runners/{runner}/files/raw"),
    ] {
        let (status, message) = status_and_message(server.get(&path).await).await;
        assert_eq!(status, 400, "{path}: {message}");
    }

    // A body over the limit: 413, and the request changed nothing.
    let big = "a".repeat(2 << 20);
    let r = server
        .send(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"delete": ["keep.txt"], "copy": [{"path": "big.txt", "content": b64(&big)}]}),
        )
        .await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.headers()["connection"],
        "close",
        "the connection cannot be reused"
    );

    // Unknown routes, wrong methods, unknown ids.
    assert_eq!(server.get("/nothing-here").await.status(), 404);
    assert_eq!(
        server
            .send(Method::DELETE, "/health", Value::Null)
            .await
            .status(),
        405
    );
    assert_eq!(
        server
            .send(Method::POST, "/execution-environments", json!({}))
            .await
            .status(),
        405
    );
    assert_eq!(server.get("/execution-environments/77").await.status(), 404);

    // Nothing changed: the environment, the runner and its files.
    let env_after: Value = server
        .get("/execution-environments/1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(env_before, env_after);
    let names: Vec<String> = server
        .list(&runner, "")
        .await
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["./keep.txt"]);
    assert_eq!(
        server.execute(&runner, exec("cat keep.txt")).await.stdout(),
        "kept"
    );

    // Base64 that JSON spells with escapes (`\/` and `\u003d` for `/` and `=`) is the same
    // base64: "??>" encodes as "Pz8+" and "???" as "Pz8/".
    let r = server
        .send_raw(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            r#"{"copy":[{"path":"escaped.txt","content":"Pz8\/Pz8+YQ\u003d\u003d"}]}"#,
        )
        .await;
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    assert_eq!(
        server
            .execute(&runner, exec("cat escaped.txt"))
            .await
            .stdout(),
        "?????>a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_edge_cases() {
    let server = Server::start();
    server.put_environment(2, 1, 256).await;
    let runner = server.claim(2, 0).await;

    // Unknown execution 404; a used execution 404; not an upgrade 400.
    let r = server
        .get(&format!(
            "/runners/{runner}/websocket?executionID=00000000-0000-0000-0000-000000000000"
        ))
        .await;
    assert_eq!(r.status(), 404);
    let url = server.websocket_url(&runner, exec("true")).await;
    let path = url.split("/api/v1").nth(1).unwrap().to_string();
    assert_eq!(
        server.get(&path).await.status(),
        400,
        "a plain GET is no upgrade"
    );
    let mut ws = server.connect(&url).await;
    let run = common::collect(&mut ws).await;
    run.assert_well_formed();
    assert_eq!(
        server.get(&path).await.status(),
        404,
        "an execution runs once"
    );

    // The URL follows the Host header and X-Forwarded-Proto.
    let r = server
        .request(Method::POST, &format!("/runners/{runner}/execute"))
        .header("Host", "poseidon.example:443")
        .header("X-Forwarded-Proto", "https")
        .json(&exec("true"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let u = v["websocketUrl"].as_str().unwrap();
    assert!(
        u.starts_with(&format!(
            "wss://poseidon.example:443/api/v1/runners/{runner}/websocket?executionID="
        )),
        "{u}"
    );

    // Standard input: text frames reach the process verbatim.
    let run = server
        .execute_with_input(&runner, exec("read line; echo got:$line"), &["abc\n"])
        .await;
    assert!(run.stdout().contains("got:abc"), "{run:?}");

    // A client that goes away cancels the execution; the runner stays usable and nothing of
    // the execution survives.
    let url = server
        .websocket_url(&runner, exec("echo up; (sleep 1011 &); exec sleep 1012"))
        .await;
    let mut ws = server.connect(&url).await;
    while let Some(Ok(m)) = ws.next().await {
        if m.to_text().unwrap_or_default().contains("up") {
            break;
        }
    }
    ws.close(None).await.unwrap();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = server
            .execute(
                &runner,
                json!({"command": "ps -eo args | grep -c ^sleep.101", "privilegedExecution": true}),
            )
            .await;
        if run.stdout().trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled execution lives on: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The runner is deleted during an execution: `error`, then close 1000.
    let url = server
        .websocket_url(&runner, exec("echo up; sleep 30"))
        .await;
    let mut ws = server.connect(&url).await;
    while let Some(Ok(m)) = ws.next().await {
        if m.to_text().unwrap_or_default().contains("up") {
            break;
        }
    }
    let r = server
        .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    let rest = common::collect(&mut ws).await;
    assert_eq!(
        rest.messages.last(),
        Some(&json!({"type": "error", "data": "the allocation stopped as expected"})),
        "{rest:?}"
    );
    assert_eq!(rest.close_code, Some(1000));
    let _ = ws
        .send(tokio_tungstenite::tungstenite::Message::Text("late".into()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_every_route_but_health_and_version() {
    let server = Server::start_with(Options {
        token: Some("s3cret".into()),
        ..Options::default()
    });
    let bare = |path: &str| {
        server
            .http
            .get(format!("http://{}/api/v1{path}", server.address))
    };
    assert_eq!(bare("/health").send().await.unwrap().status(), 204);
    let version = bare("/version").send().await.unwrap();
    assert_eq!(version.status(), 200);
    let version: Value = version.json().await.unwrap();
    assert!(version.is_string(), "{version}");
    for path in [
        "/statistics/execution-environments",
        "/execution-environments",
        "/runners/x/files",
    ] {
        let r = bare(path).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.text().await.unwrap(), "", "{path}");
        let r = bare(path)
            .header("Poseidon-Token", "wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = server
        .http
        .put(format!(
            "http://{}/api/v1/execution-environments/5",
            server.address
        ))
        .json(&common::environment(5, 0, 128))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        server.get("/execution-environments/5").await.status(),
        404,
        "the PUT must not have happened"
    );
    // With the token (the harness sends it), everything works.
    server.put_environment(5, 1, 256).await;
    let runner = server.claim(5, 0).await;
    assert_eq!(
        server.execute(&runner, exec("echo -n ok")).await.stdout(),
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_resize_refill_and_report_depletion() {
    let server = Server::start_with(Options {
        config_yaml: Some("pool_depletion_threshold: 0.5\n".into()),
        ..Options::default()
    });
    assert_eq!(server.get("/health").await.status(), 204);
    server.put_environment(3, 2, 256).await;
    server.wait_idle(3, 2).await;
    assert_eq!(server.get("/health").await.status(), 204);

    // A claim is served from the pool, which refills.
    let runner = server.claim(3, 0).await;
    server.copy(&runner, &[("mine.txt", "still mine")]).await;
    server.wait_idle(3, 2).await;
    let stats: Value = server
        .get("/statistics/execution-environments")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["3"],
        json!({"id": 3, "prewarmingPoolSize": 2, "idleRunners": 2, "usedRunners": 1})
    );

    // Only the pool size changes: the pool grows, the used runner is untouched.
    server.put_environment(3, 4, 256).await;
    server.wait_idle(3, 4).await;
    assert_eq!(
        server.execute(&runner, exec("cat mine.txt")).await.stdout(),
        "still mine"
    );
    // Shrinking destroys idle runners only.
    server.put_environment(3, 1, 256).await;
    server.wait_idle(3, 1).await;
    // A new shape replaces idle runners; used runners stay until released.
    server.put_environment(3, 1, 300).await;
    server.wait_idle(3, 1).await;
    assert_eq!(
        server.execute(&runner, exec("cat mine.txt")).await.stdout(),
        "still mine"
    );

    // Pool size 0: runners are made on demand.
    server.put_environment(4, 0, 256).await;
    let on_demand = server.claim(4, 0).await;
    assert_eq!(
        server
            .execute(&on_demand, exec("echo -n made"))
            .await
            .stdout(),
        "made"
    );

    // A pool far below its size is depleting: 503 with the error code and the id.
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/6",
            common::environment(6, 200, 64),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = server.get("/health").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], "PREWARMING_POOL_DEPLETING");
    assert!(body["message"].as_str().unwrap().contains('6'), "{body}");
    let r = server
        .send(Method::DELETE, "/execution-environments/6", Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(server.get("/health").await.status(), 204);

    // Deleting an environment ends its used runners too.
    let r = server
        .send(Method::DELETE, "/execution-environments/3", Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        server
            .get(&format!("/runners/{runner}/files"))
            .await
            .status(),
        410
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_runners_come_and_go_without_leaks() {
    let server = Server::start();
    server.put_environment(7, 1, 128).await;
    for _ in 0..30 {
        let runner = server.claim(7, 0).await;
        assert_eq!(
            server.execute(&runner, exec("echo -n x")).await.stdout(),
            "x"
        );
        let r = server
            .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
            .await;
        assert_eq!(r.status(), 204);
    }
    server.wait_idle(7, 1).await;
    server.assert_runners_on_host(1).await;
}
