//! Robustness against the real server: bad input, authentication, health, the files API
//! against planted links, pools, persistence, leaks, crashes, cancelled and noisy executions,
//! fork bombs, and stopping with executions running. Every test starts its own server and
//! uses its own environment ids.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    b64, environment, error_of, eventually, exec, wait_for_stdout, Execution, Options, Server,
};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// ---- helpers ------------------------------------------------------------------------------

async fn stats(server: &Server) -> Value {
    server
        .get("/statistics/execution-environments")
        .await
        .json()
        .await
        .unwrap()
}

async fn environment_json(server: &Server, id: u64) -> Value {
    let r = server.get(&format!("/execution-environments/{id}")).await;
    assert_eq!(r.status(), 200, "environment {id}");
    r.json().await.unwrap()
}

fn names(files: &[Value]) -> Vec<String> {
    files
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

async fn cat(server: &Server, runner: &str, file: &str) -> String {
    let run = server.execute(runner, exec(&format!("cat {file}"))).await;
    run.assert_well_formed();
    run.stdout()
}

async fn as_root(server: &Server, runner: &str, command: &str) -> Execution {
    let run = server
        .execute(
            runner,
            json!({"command": command, "privilegedExecution": true}),
        )
        .await;
    run.assert_well_formed();
    run
}

/// The status of a WebSocket handshake (101 when it succeeded; the socket is then closed,
/// which cancels the execution).
async fn handshake_status(url: &str, token: Option<&str>) -> u16 {
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("Poseidon-Token", token.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut ws, response)) => {
            let _ = ws.close(None).await;
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("handshake to {url} failed: {e}"),
    }
}

/// Processes inside the runner whose command line matches the grep `pattern` (a privileged
/// scan of the runner's /proc; the pattern must not match its own text, e.g. `sleep 913[1]`).
async fn runner_processes(server: &Server, runner: &str, pattern: &str) -> usize {
    let run = as_root(
        server,
        runner,
        &format!(
            "for p in /proc/[0-9]*; do tr \"\\0\" \" \" < $p/cmdline 2>/dev/null; echo; done | grep -c \"{pattern}\"; true"
        ),
    )
    .await;
    run.stdout()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("process scan: {run:?}"))
}

// ---- 1. bad input -------------------------------------------------------------------------

const ENV_BAD: u64 = 101;

async fn assert_intact(server: &Server, env_before: &Value, runner: &str, context: &str) {
    assert_eq!(
        &environment_json(server, ENV_BAD).await,
        env_before,
        "{context}: the environment changed"
    );
    let files = server.list(runner, "path=./&recursive=true").await;
    assert_eq!(names(&files), ["./keep.txt"], "{context}: files changed");
    let run = server.execute(runner, exec("cat keep.txt")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "kept", "{context}: the runner broke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_message_and_changes_nothing() {
    let server = Server::start_with(Options {
        config_yaml: Some("max_body_mb: 1\n".into()),
        ..Options::default()
    });
    server.put_environment(ENV_BAD, 1, 256).await;
    let runner = server.claim(ENV_BAD, 0).await;
    server.copy(&runner, &[("keep.txt", "kept")]).await;
    let env_before = environment_json(&server, ENV_BAD).await;
    let env_path = &format!("/execution-environments/{ENV_BAD}")[..];
    let execute = &format!("/runners/{runner}/execute")[..];
    let files = &format!("/runners/{runner}/files")[..];
    let good_env = |key: &str, value: Value| {
        let mut env = environment(ENV_BAD, 3, 128);
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
        ("id", json!(ENV_BAD + 1), ""),
        ("id", json!(ENV_BAD.to_string()), ""),
        ("image", json!("No Such Image"), "images:"),
    ] {
        cases.push((Method::PUT, env_path, good_env(key, value), 400, needle));
    }
    let claim = |body: Value| (Method::POST, "/runners", body.to_string(), 400, "");
    cases.extend([
        claim(json!({"executionEnvironmentId": ENV_BAD.to_string()})),
        claim(json!({"executionEnvironmentId": -1})),
        claim(json!({"executionEnvironmentId": ENV_BAD, "inactivityTimeout": -5})),
        claim(json!({"inactivityTimeout": 5})),
    ]);
    for (body, needle) in [
        (json!({"command": "true", "environment": {"1BAD": "x"}}), ""),
        (json!({"command": "true", "environment": {"A-B": "x"}}), ""),
        (json!({"command": "true", "environment": {"": "x"}}), ""),
        (json!({"command": "true", "environment": {"A": 1}}), ""),
        (json!({"command": "true", "timeLimit": -1}), ""),
        (json!({"command": "true", "privilegedExecution": "yes"}), ""),
        (
            json!({"command": "echo 'quoted'"}),
            "use of forbidden character",
        ),
        (json!({}), ""),
    ] {
        cases.push((Method::POST, execute, body.to_string(), 400, needle));
    }
    for body in [
        // Invalid base64 in the second file: the delete and the first file must not happen.
        json!({"delete": ["keep.txt"], "copy": [
            {"path": "first.txt", "content": b64("fine")},
            {"path": "second.txt", "content": "***not base64***"}]}),
        json!({"copy": "nope"}),
        json!({"delete": [1, 2]}),
    ] {
        cases.push((Method::PATCH, files, body.to_string(), 400, ""));
    }
    for (method, path, body, expected, needle) in cases {
        let context = format!("{method} {path} {}", &body[..body.len().min(120)]);
        let r = server
            .request(method.clone(), path)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let (status, message) = error_of(r, &context).await;
        assert_eq!(status, expected, "{context}: {message}");
        assert!(
            message.contains(needle),
            "{context}: {message:?} lacks {needle:?}"
        );
        assert_intact(&server, &env_before, &runner, &context).await;
    }

    // A body that is not UTF-8 at all.
    let r = server
        .request(Method::PUT, env_path)
        .header("Content-Type", "application/json")
        .body(vec![0xff, 0xfe, b'{', 0x80])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r, "binary body").await.0, 400);
    assert_intact(&server, &env_before, &runner, "binary body").await;

    // Bad query parameters, and paths the router does not know or serve with that method.
    let gets: Vec<(Method, String, u16)> = vec![
        (Method::GET, format!("{files}?recursive=maybe"), 400),
        (Method::GET, format!("{files}?privilegedExecution=2"), 400),
        (Method::GET, format!("{files}/raw"), 400),
        (Method::GET, format!("{files}/raw?path="), 400),
        (
            Method::GET,
            format!("{files}/raw?path=keep.txt&privilegedExecution=maybe"),
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
    ];
    for (method, path, expected) in gets {
        let context = format!("{method} {path}");
        let r = server.request(method, &path).send().await.unwrap();
        let (status, message) = error_of(r, &context).await;
        assert_eq!(status, expected, "{context}: {message}");
        assert_intact(&server, &env_before, &runner, &context).await;
    }
    // Outside /api/v1 too.
    let r = server
        .http
        .get(format!("http://{}/api/v2/health", server.address))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r, "/api/v2").await.0, 404);

    // The WebSocket route: unknown or missing execution 404, no upgrade 400 (which does not
    // use the execution up), used execution 404.
    let ws_path = format!("/runners/{runner}/websocket");
    for query in [
        "?executionID=00000000-0000-0000-0000-000000000000",
        "?executionID=",
        "",
    ] {
        let context = format!("websocket {query}");
        let (status, _) = error_of(server.get(&format!("{ws_path}{query}")).await, &context).await;
        assert_eq!(status, 404, "{context}");
        let url = format!("ws://{}/api/v1{ws_path}{query}", server.address);
        assert_eq!(handshake_status(&url, None).await, 404, "{context}");
    }
    let url = server.websocket_url(&runner, exec("echo -n once")).await;
    let path = url.split("/api/v1").nth(1).unwrap();
    let (status, _) = error_of(server.get(path).await, "plain GET").await;
    assert_eq!(status, 400, "a plain GET is no upgrade");
    let mut ws = server.connect(&url).await;
    let run = common::collect(&mut ws).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "once", "{run:?}");
    assert_eq!(handshake_status(&url, None).await, 404, "a second connect");
    let (status, _) = error_of(server.get(path).await, "used execution").await;
    assert_eq!(status, 404);
    assert_intact(&server, &env_before, &runner, "websocket").await;

    // Bodies over the limit (1 MiB here): 413 with a message, and nothing happened.
    let big = "a".repeat(2 << 20);
    let r = server
        .send(
            Method::PATCH,
            files,
            json!({"delete": ["keep.txt"], "copy": [{"path": "big.txt", "content": b64(&big)}]}),
        )
        .await;
    let (status, _) = error_of(r, "2 MiB PATCH").await;
    assert_eq!(status, 413);
    let mut env = environment(ENV_BAD, 7, 64);
    env["padding"] = json!(big);
    let r = server.send(Method::PUT, env_path, env).await;
    let (status, _) = error_of(r, "2 MiB PUT").await;
    assert_eq!(status, 413);
    assert_intact(&server, &env_before, &runner, "413").await;

    // Just under the limit is fine, and unknown fields are tolerated.
    let content = "b".repeat(600 << 10);
    let r = server
        .send(
            Method::PATCH,
            files,
            json!({"copy": [{"path": "big.txt", "content": b64(&content)}], "unknown": 1}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let r = server
        .get(&format!("{files}/raw?path=big.txt"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(r.len(), content.len());
}

// ---- 2. authentication --------------------------------------------------------------------

const ENV_AUTH: u64 = 201;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_every_route_but_health_and_version() {
    let server = Server::start_with(Options {
        token: Some("secret".into()),
        ..Options::default()
    });
    let bare = |method: Method, path: &str| {
        server
            .http
            .request(method, format!("http://{}/api/v1{path}", server.address))
    };

    // Open routes, with or without a (wrong) token.
    for token in [None, Some("wrong")] {
        let with = |r: reqwest::RequestBuilder| match token {
            Some(t) => r.header("Poseidon-Token", t),
            None => r,
        };
        let r = with(bare(Method::GET, "/health")).send().await.unwrap();
        assert_eq!(r.status(), 204, "{token:?}");
        let r = with(bare(Method::GET, "/version")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{token:?}");
        let version: Value = r.json().await.unwrap();
        assert!(version.as_str().is_some_and(|v| !v.is_empty()), "{version}");
    }

    // Set up with the token (the harness sends it).
    server.put_environment(ENV_AUTH, 1, 256).await;
    let runner = server.claim(ENV_AUTH, 0).await;
    server.copy(&runner, &[("keep.txt", "kept")]).await;
    let pending = server.websocket_url(&runner, exec("echo -n pending")).await;
    let pending_path = pending.split("/api/v1").nth(1).unwrap().to_string();
    let env_path = format!("/execution-environments/{ENV_AUTH}");

    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::GET,
            "/statistics/execution-environments".into(),
            None,
        ),
        (Method::GET, "/execution-environments".into(), None),
        (Method::GET, env_path.clone(), None),
        (
            Method::PUT,
            "/execution-environments/202".into(),
            Some(environment(202, 0, 128)),
        ),
        (
            Method::PUT,
            env_path.clone(),
            Some(environment(ENV_AUTH, 3, 128)),
        ),
        (Method::DELETE, env_path.clone(), None),
        (
            Method::POST,
            "/runners".into(),
            Some(json!({"executionEnvironmentId": ENV_AUTH})),
        ),
        (Method::DELETE, format!("/runners/{runner}"), None),
        (
            Method::POST,
            format!("/runners/{runner}/execute"),
            Some(exec("true")),
        ),
        (Method::GET, pending_path.clone(), None),
        (Method::GET, format!("/runners/{runner}/files"), None),
        (
            Method::GET,
            format!("/runners/{runner}/files/raw?path=keep.txt"),
            None,
        ),
        (
            Method::PATCH,
            format!("/runners/{runner}/files"),
            Some(
                json!({"delete": ["keep.txt"], "copy": [{"path": "x", "content": b64(&"x".repeat(100_000))}]}),
            ),
        ),
    ];
    let wrong_tokens = [
        None,
        Some(""),
        Some("wrong"),
        Some("secre"),
        Some("secret2"),
        Some("SECRET"),
    ];
    for (method, path, body) in &routes {
        for token in wrong_tokens {
            let mut request = bare(method.clone(), path);
            if let Some(t) = token {
                request = request.header("Poseidon-Token", t);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {token:?}");
            assert_eq!(
                r.text().await.unwrap(),
                "",
                "{method} {path} with {token:?}"
            );
        }
    }
    assert_eq!(handshake_status(&pending, None).await, 401);
    assert_eq!(handshake_status(&pending, Some("wrong")).await, 401);

    // Nothing happened.
    assert_eq!(
        server.get("/execution-environments/202").await.status(),
        404
    );
    assert_eq!(
        environment_json(&server, ENV_AUTH).await,
        environment(ENV_AUTH, 1, 256)
    );
    assert_eq!(stats(&server).await[ENV_AUTH.to_string()]["usedRunners"], 1);
    let files = server.list(&runner, "").await;
    assert_eq!(names(&files), ["./keep.txt"]);

    // With the token every route works, the pending execution included.
    let mut ws = server.connect(&pending).await;
    let run = common::collect(&mut ws).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "pending");
    for (method, path, body) in &routes {
        if path == &pending_path || method == Method::DELETE {
            continue;
        }
        let mut request = server.request(method.clone(), path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let r = request.send().await.unwrap();
        assert!(r.status().is_success(), "{method} {path}: {}", r.status());
    }
    let run = server.execute(&runner, exec("cat x | wc -c")).await;
    assert_eq!(run.stdout().trim(), "100000");
    for path in [format!("/runners/{runner}"), env_path] {
        let r = server.send(Method::DELETE, &path, Value::Null).await;
        assert_eq!(r.status(), 204, "{path}");
    }
}

// ---- 3. health ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_depleting_pools_by_id() {
    let server = Server::start_with(Options {
        config_yaml: Some("pool_depletion_threshold: 0.5\n".into()),
        ..Options::default()
    });
    assert_eq!(server.get("/health").await.status(), 204);
    server.put_environment(301, 2, 128).await;
    server.wait_idle(301, 2).await;
    assert_eq!(server.get("/health").await.status(), 204);
    // Pool size 0 never depletes.
    server.put_environment(303, 0, 128).await;
    assert_eq!(server.get("/health").await.status(), 204);

    // 1000 runners are made four at a time: the pool is far below half for a long while.
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/302",
            environment(302, 1000, 64),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = server.get("/health").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], "PREWARMING_POOL_DEPLETING", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("302"), "{message}");
    assert!(!message.contains("301"), "{message}");
    assert!(!message.contains("303"), "{message}");

    let r = server
        .send(Method::DELETE, "/execution-environments/302", Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    let s = &server;
    eventually(
        Duration::from_secs(30),
        "health back to 204",
        || async move { s.get("/health").await.status() == 204 },
    )
    .await;
    // Every runner of the deleted pool (made or being made) goes away.
    server.assert_runners_on_host(2).await;
}

// ---- 4. the files API and the host ----------------------------------------------------------

/// What the root of a `host` runner holds; anything else would come from the host.
const RUNNER_ROOT: [&str; 18] = [
    "bin",
    "sbin",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "usr",
    "etc",
    "opt",
    "proc",
    "dev",
    "sys",
    "tmp",
    "root",
    "home",
    "run",
    "var",
    "workspace",
];

fn assert_runner_root(files: &[Value], prefix: &str, context: &str) {
    let names = names(files);
    assert!(
        names.contains(&format!("{prefix}/workspace")),
        "{context}: {names:?}"
    );
    for name in &names {
        let entry = name.strip_prefix(&format!("{prefix}/")).unwrap_or(name);
        assert!(
            RUNNER_ROOT.contains(&entry),
            "{context}: {name} is not part of a runner: {names:?}"
        );
    }
}

fn assert_not_host_shadow(body: &[u8], host_shadow: &str, context: &str) {
    let text = String::from_utf8_lossy(body);
    assert_ne!(text, host_shadow, "{context}: the host's /etc/shadow");
    for line in host_shadow.lines().filter(|l| !l.is_empty()) {
        assert!(
            !text.lines().any(|l| l == line),
            "{context}: a line of the host's /etc/shadow: {line}"
        );
    }
}

/// One copy of many files that share directories, named in different spellings and through
/// a link `user` planted: each file lands where its own path says (a copy walks to each
/// directory once and reuses it for the files beside it), the planted link is replaced by a
/// real directory for all the files behind it, and what it pointed at is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_copy_of_many_files_puts_each_where_its_path_says() {
    let server = Server::start();
    server.put_environment(402, 1, 256).await;
    let runner = server.claim(402, 0).await;
    let run = server
        .execute(&runner, exec("ln -s /etc userlink && echo -n ok"))
        .await;
    assert_eq!(run.stdout(), "ok", "{run:?}");
    server
        .copy(
            &runner,
            &[
                ("many/a", "A"),
                ("./many/b", "B"),
                ("/workspace/many/c", "C"),
                ("many/sub/d", "D"),
                ("many/sub/../e", "E"),
                ("userlink/x", "X"),
                ("userlink/y", "Y"),
                ("many/a", "A2"),
            ],
        )
        .await;
    let run = server
        .execute(
            &runner,
            exec(
                "cd /workspace; for f in many/a many/b many/c many/sub/d many/e userlink/x userlink/y; \
                 do printf \"%s=%s \" $f $(cat $f); done; test -L userlink || echo userlink-is-a-dir; \
                 ls /etc/x /etc/y 2>&1 | grep -c \"No such file\"",
            ),
        )
        .await;
    assert_eq!(
        run.stdout(),
        "many/a=A2 many/b=B many/c=C many/sub/d=D many/e=E userlink/x=X userlink/y=Y \
         userlink-is-a-dir\r\n2\r\n",
        "{run:?}"
    );

    // More directories than a copy keeps open: each file still lands in its own.
    let spread: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("spread/d{i}/f"), format!("{i} ")))
        .collect();
    let files: Vec<(&str, &str)> = spread
        .iter()
        .map(|(path, content)| (path.as_str(), content.as_str()))
        .collect();
    server.copy(&runner, &files).await;
    let run = server
        .execute(
            &runner,
            exec("ls spread | wc -l; cat spread/d0/f spread/d1/f spread/d1999/f; echo; cat spread/d*/f | wc -w"),
        )
        .await;
    assert_eq!(run.stdout(), "2000\r\n0 1 1999 \r\n2000\r\n", "{run:?}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A copy whose middle file cannot be written still writes the others with their own
/// contents: the bytes of the failed file are consumed, not taken for the next file's, and a
/// file larger than the runner's read buffer arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_file_in_a_copy_leaves_the_others_whole() {
    let server = Server::start();
    server.put_environment(403, 1, 256).await;
    let runner = server.claim(403, 0).await;
    let big: String = (0..300_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let copy = |files: &[(&str, &str)]| -> Value {
        let copy: Vec<Value> = files
            .iter()
            .map(|(path, content)| json!({"path": path, "content": b64(content)}))
            .collect();
        json!({ "copy": copy })
    };
    let path = format!("/runners/{runner}/files");
    let r = server
        .send(
            Method::PATCH,
            &path,
            copy(&[
                ("plain", "P"),
                ("plain/inner", "NOT FOR after"),
                ("after", "AFTER"),
                ("big", &big),
                ("last", "LAST"),
            ]),
        )
        .await;
    let (status, message) = error_of(r, &path).await;
    assert_eq!(status, 500, "{message}");
    assert!(message.contains("plain/inner"), "{message}");
    let run = server
        .execute(
            &runner,
            exec("cat plain after last; echo; wc -c < big; sha256sum < big"),
        )
        .await;
    let expected = sha256_hex(big.as_bytes());
    assert_eq!(
        run.stdout(),
        format!("PAFTERLAST\r\n300000\r\n{expected}  -\r\n"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_api_never_reaches_the_host() {
    let server = Server::start();
    server.put_environment(401, 1, 256).await;
    let runner = server.claim(401, 0).await;
    let host_shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let tmp = server.data_dir.parent().unwrap().to_path_buf();
    let canary = tmp.join("canary.txt");
    let canary_text = format!("host canary {}", std::process::id());
    std::fs::write(&canary, &canary_text).unwrap();
    let data_dir = server.data_dir.canonicalize().unwrap();
    let file = |path: &str, privileged: bool| {
        format!("/runners/{runner}/files/raw?path={path}&privilegedExecution={privileged}")
    };
    let listing = |path: &str, privileged: bool| {
        format!(
            "/runners/{runner}/files?path={path}&recursive=false&privilegedExecution={privileged}"
        )
    };

    let run = as_root(
        &server,
        &runner,
        &format!(
            "ln -s /etc/shadow shadow_link; ln -s / rootlink; ln -s /work hostwork; \
             ln -s /proc/1/root p1root; ln -s {} canary_link; ln -s {} datalink; \
             ln /etc/shadow hl; ln /etc/passwd /etc/hl; echo planted",
            canary.display(),
            data_dir.display()
        ),
    )
    .await;
    assert!(run.stdout().contains("planted"), "{run:?}");

    // (a) Through a link to /etc/shadow: the runner's own file, never the host's.
    let r = server.get(&file("shadow_link", true)).await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_not_host_shadow(&body, &host_shadow, "shadow_link");
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("root:*:"), "{text}");
    assert!(text.contains("\nuser:*:"), "{text}");
    // Unprivileged: the runner's shadow is root's alone.
    assert_eq!(server.get(&file("shadow_link", false)).await.status(), 424);
    for path in [
        "p1root/etc/shadow",
        "rootlink/etc/shadow",
        "/etc/shadow",
        "hl",
    ] {
        let r = server.get(&file(path, true)).await;
        let status = r.status().as_u16();
        assert!(status == 200 || status == 424, "{path}: {status}");
        assert_not_host_shadow(&r.bytes().await.unwrap(), &host_shadow, path);
    }
    // Host files the runner does not have: never there.
    for path in [
        "canary_link",
        "datalink/instance-id",
        "hostwork/main/Cargo.toml",
    ] {
        for privileged in [true, false] {
            let r = server.get(&file(path, privileged)).await;
            assert_eq!(r.status(), 424, "{path} privileged={privileged}");
            let body = r.text().await.unwrap();
            assert!(!body.contains(&canary_text), "{path}: {body}");
        }
    }

    // (b) Listing the root through a link (or directly, or via `..`): the runner's root.
    for privileged in [true, false] {
        for (path, prefix) in [
            ("rootlink/", "rootlink"),
            ("/", ""),
            ("../../../../", "../../../.."),
        ] {
            let r = server.get(&listing(path, privileged)).await;
            assert_eq!(r.status(), 200, "{path}");
            let files: Value = r.json().await.unwrap();
            assert_runner_root(
                files["files"].as_array().unwrap(),
                prefix,
                &format!("{path} privileged={privileged}"),
            );
        }
        let r = server.get(&listing("p1root/", privileged)).await;
        if r.status() == 200 {
            let files: Value = r.json().await.unwrap();
            assert_runner_root(files["files"].as_array().unwrap(), "p1root", "p1root");
        } else {
            assert_eq!(r.status(), 424, "p1root");
        }
    }

    // (c) The host's /work and the data dir: not listed, whatever the path.
    for path in [
        "hostwork",
        "hostwork/",
        "datalink/",
        "/work/",
        "rootlink/work/",
    ] {
        for privileged in [true, false] {
            let r = server
                .get(&format!(
                    "/runners/{runner}/files?path={path}&recursive=true&privilegedExecution={privileged}"
                ))
                .await;
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            if status == 200 {
                let v: Value = serde_json::from_str(&body).unwrap();
                let entries = v["files"].as_array().unwrap();
                // The link itself may be listed (as a link), nothing behind it.
                assert!(
                    entries.iter().all(|f| f["entryType"] == "l"),
                    "{path}: {body}"
                );
            } else {
                assert_eq!(status, 424, "{path}: {body}");
            }
            assert!(!body.contains("Cargo.toml"), "{path}: {body}");
            assert!(!body.contains("instance-id"), "{path}: {body}");
        }
    }
    let files = server.list(&runner, "path=./&recursive=true").await;
    let link = files.iter().find(|f| f["name"] == "./shadow_link").unwrap();
    assert_eq!(link["entryType"], "l");
    assert_eq!(link["linkTarget"], "/etc/shadow");

    // (d) Writing through links and to absolute paths: only the runner's files change.
    let host_etc_passwd = std::fs::read("/etc/passwd").unwrap();
    let marker = format!("trident-robustness-{}", std::process::id());
    let files_path = format!("/runners/{runner}/files");
    let patch = |copy: Value| server.send(Method::PATCH, &files_path, json!({ "copy": [copy] }));
    // Onto the planted link: the link is replaced, its target untouched.
    let r = patch(json!({"path": "shadow_link", "content": b64("overwritten")})).await;
    assert_eq!(r.status(), 204);
    // The runner's own /etc/shadow, through a link to its root: the runner's to change.
    let r = patch(json!({"path": "rootlink/etc/shadow", "content": b64("via link")})).await;
    assert_eq!(r.status(), 204);
    // New files in the image's directories and in host-only places: written into the
    // runner or refused, never onto the host.
    for path in [
        format!("rootlink/etc/{marker}"),
        format!("/usr/{marker}"),
        format!("hostwork/{marker}"),
        format!("datalink/{marker}"),
        format!("p1root/tmp/{marker}"),
    ] {
        let r = patch(json!({"path": path, "content": b64("x")})).await;
        if r.status() != 204 {
            error_of(r, &path).await;
        }
    }
    assert_eq!(std::fs::read_to_string("/etc/shadow").unwrap(), host_shadow);
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), host_etc_passwd);
    for host_path in [
        format!("/tmp/{marker}"),
        format!("/etc/{marker}"),
        format!("/usr/{marker}"),
        format!("/work/{marker}"),
        format!("{}/{marker}", data_dir.display()),
    ] {
        assert!(
            !std::path::Path::new(&host_path).exists(),
            "{host_path} appeared on the host"
        );
    }
    let run = as_root(
        &server,
        &runner,
        "test -L shadow_link && echo still a link; cat shadow_link; echo; cat /etc/shadow",
    )
    .await;
    assert_eq!(run.stdout(), "overwritten\r\nvia link", "{run:?}");

    // (e) `..` and absolute paths are the runner's.
    let r = server.get(&file("../../../../etc/passwd", false)).await;
    assert_eq!(r.status(), 200);
    let passwd = r.text().await.unwrap();
    assert!(passwd.contains("user:x:1000"), "{passwd}");
    assert_ne!(passwd.as_bytes(), host_etc_passwd.as_slice());
    let r = server.get(&file("/etc/hostname", false)).await;
    let hostname = r.text().await.unwrap();
    assert_eq!(hostname, "runner\n");
    assert_ne!(hostname, host_hostname);

    // Deleting links removes the links only.
    let r = server
        .send(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"delete": ["rootlink", "hostwork", "datalink", "p1root", "canary_link"]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert!(std::path::Path::new("/work/main").exists());
    assert!(data_dir.join("instance-id").exists());
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), canary_text);
    assert!(std::path::Path::new("/usr/bin/env").exists());

    // Root-only files and directories: only the privileged files API reads them.
    as_root(
        &server,
        &runner,
        "echo topsecret > private && chmod 600 private && mkdir privdir && touch privdir/inner && chmod 700 privdir",
    )
    .await;
    let r = server.get(&file("private", false)).await;
    let (status, _) = error_of(r, "private").await;
    assert_eq!(status, 424);
    let r = server.get(&file("private", true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "topsecret\n");
    let r = server.get(&listing("privdir", false)).await;
    assert_eq!(r.status(), 424);
    let r = server.get(&listing("privdir", true)).await;
    assert_eq!(r.status(), 200);
    let files: Value = r.json().await.unwrap();
    assert_eq!(names(files["files"].as_array().unwrap()), ["privdir/inner"]);
    // The host file never changed, whatever happened above.
    assert_eq!(std::fs::read_to_string("/etc/shadow").unwrap(), host_shadow);
}

// ---- 5. pools -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_resize_without_touching_used_runners() {
    let server = Server::start();
    server.put_environment(501, 2, 256).await;
    server.wait_idle(501, 2).await;
    let runner = server.claim(501, 0).await;
    assert_eq!(stats(&server).await["501"]["usedRunners"], 1);
    server.wait_idle(501, 2).await;
    assert_eq!(
        stats(&server).await["501"],
        json!({"id": 501, "prewarmingPoolSize": 2, "idleRunners": 2, "usedRunners": 1})
    );
    server.copy(&runner, &[("mine.txt", "still mine")]).await;
    let still_mine = || cat(&server, &runner, "mine.txt");

    // Only the size changes: the pool grows, nothing is replaced.
    let before: BTreeSet<String> = server.runner_cgroups().into_iter().collect();
    assert_eq!(before.len(), 3);
    server.put_environment(501, 3, 256).await;
    assert_eq!(still_mine().await, "still mine");
    server.wait_idle(501, 3).await;
    server.assert_runners_on_host(4).await;
    let grown: BTreeSet<String> = server.runner_cgroups().into_iter().collect();
    assert!(grown.is_superset(&before), "{before:?} -> {grown:?}");

    // A new shape: idle runners are replaced, the used one stays (by design).
    server.put_environment(501, 3, 200).await;
    assert_eq!(still_mine().await, "still mine");
    server.wait_idle(501, 3).await;
    let (s, grown_ref, runner_ref) = (&server, &grown, &runner);
    eventually(
        Duration::from_secs(30),
        "old idle runners gone",
        || async move {
            let now: BTreeSet<String> = s.runner_cgroups().into_iter().collect();
            now.len() == 4
                && now.contains(runner_ref)
                && now.intersection(grown_ref).count() == 1
                && s.runner_dirs() == 4
        },
    )
    .await;
    assert_eq!(still_mine().await, "still mine");
    assert_eq!(
        stats(&server).await["501"],
        json!({"id": 501, "prewarmingPoolSize": 3, "idleRunners": 3, "usedRunners": 1})
    );

    // More claims at once than the pool holds: all are served.
    server.put_environment(503, 1, 128).await;
    server.wait_idle(503, 1).await;
    let claims = futures_util::future::join_all((0..3).map(|_| server.claim(503, 0))).await;
    let distinct: BTreeSet<&String> = claims.iter().collect();
    assert_eq!(distinct.len(), 3);
    for claimed in &claims {
        let run = server.execute(claimed, exec("echo -n up")).await;
        assert_eq!(run.stdout(), "up", "{run:?}");
    }

    // Pool size 0: runners are made on demand, and none is kept idle.
    server.put_environment(502, 0, 128).await;
    let on_demand = server.claim(502, 0).await;
    let run = server.execute(&on_demand, exec("echo -n made")).await;
    assert_eq!(run.stdout(), "made");
    assert_eq!(
        stats(&server).await["502"],
        json!({"id": 502, "prewarmingPoolSize": 0, "idleRunners": 0, "usedRunners": 1})
    );

    // A runner deleted during an execution: `error`, then close 1000.
    let url = server
        .websocket_url(&on_demand, exec("echo started; sleep 30"))
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "started").await;
    let r = server
        .send(
            Method::DELETE,
            &format!("/runners/{on_demand}"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status(), 204);
    let rest = common::collect(&mut ws).await;
    assert_eq!(
        rest.messages.last(),
        Some(&json!({"type": "error", "data": "the allocation stopped as expected"})),
        "{rest:?}"
    );
    assert_eq!(rest.close_code, Some(1000));

    // Deleting the environment ends its used runner, running execution included.
    let url = server
        .websocket_url(&runner, exec("echo started; sleep 30"))
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "started").await;
    let r = server
        .send(Method::DELETE, "/execution-environments/501", Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    let rest = common::collect(&mut ws).await;
    assert_eq!(
        rest.messages.last(),
        Some(&json!({"type": "error", "data": "the allocation stopped as expected"})),
        "{rest:?}"
    );
    assert_eq!(rest.close_code, Some(1000));
    for (method, path) in [
        (Method::GET, format!("/runners/{runner}/files")),
        (Method::DELETE, format!("/runners/{runner}")),
    ] {
        let r = server.send(method, &path, Value::Null).await;
        assert_eq!(error_of(r, &path).await.0, 410, "{path}");
    }
    let r = server
        .send(
            Method::POST,
            &format!("/runners/{runner}/execute"),
            exec("true"),
        )
        .await;
    assert_eq!(r.status(), 410);
    let r = server
        .send(
            Method::POST,
            "/runners",
            json!({"executionEnvironmentId": 501}),
        )
        .await;
    assert_eq!(r.status(), 404);
    // Left: env 503 (1 idle + 3 used), env 502 (nothing).
    server.wait_idle(503, 1).await;
    server.assert_runners_on_host(4).await;
}

// ---- 6. persistence -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_survive_a_restart_and_pools_refill() {
    let mut server = Server::start();
    let first = environment(601, 1, 256);
    let mut second = environment(602, 2, 128);
    second["cpuLimit"] = json!(50);
    second["exposedPorts"] = json!([8080, 80]);
    for (id, env) in [(601, &first), (602, &second)] {
        let r = server
            .send(
                Method::PUT,
                &format!("/execution-environments/{id}"),
                env.clone(),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    server.wait_idle(601, 1).await;
    server.wait_idle(602, 2).await;
    let list_before: Value = server
        .get("/execution-environments")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        list_before["executionEnvironments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let one_before = environment_json(&server, 602).await;
    assert_eq!(one_before["exposedPorts"], json!([80, 8080]));

    server.restart();
    let list_after: Value = server
        .get("/execution-environments")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list_after, list_before);
    assert_eq!(environment_json(&server, 602).await, one_before);
    server.wait_idle(601, 1).await;
    server.wait_idle(602, 2).await;
    server.assert_runners_on_host(3).await;
    let runner = server.claim(602, 0).await;
    assert_eq!(
        server.execute(&runner, exec("echo -n back")).await.stdout(),
        "back"
    );
    // A PUT after the restart is an update (204), a deleted environment stays deleted.
    let r = server
        .send(Method::PUT, "/execution-environments/601", first.clone())
        .await;
    assert_eq!(r.status(), 204);
    let r = server
        .send(Method::DELETE, "/execution-environments/601", Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    server.restart();
    assert_eq!(
        server.get("/execution-environments/601").await.status(),
        404
    );
    assert_eq!(environment_json(&server, 602).await, one_before);
}

// ---- 7. leaks and crashes ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_that_come_and_go_leave_nothing_behind() {
    let mut server = Server::start();
    server.put_environment(701, 1, 128).await;
    for i in 0..30 {
        let runner = server.claim(701, 0).await;
        let run = server.execute(&runner, exec("true")).await;
        run.assert_well_formed();
        assert_eq!(run.last(), &json!({"type": "exit", "data": 0}), "round {i}");
        let r = server
            .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
            .await;
        assert_eq!(r.status(), 204, "round {i}");
    }
    server.wait_idle(701, 1).await;
    server.assert_runners_on_host(1).await;
    assert_eq!(server.runner_cgroups().len(), 1);
    assert_eq!(server.runner_dirs(), 1);

    server.stop();
    assert_eq!(server.runner_cgroups(), Vec::<String>::new());
    assert_eq!(server.runner_dirs(), 0);
    assert_eq!(server.runner_init_processes(), 0);
    assert_eq!(server.host_mounts(), 0);
}

/// The cgroup directories of a runner cgroup on this host (every v1 controller, or the v2
/// directory).
fn cgroup_dirs(name: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        vec![root.join(name)]
    } else {
        ["memory", "cpu", "pids", "freezer"]
            .iter()
            .map(|c| root.join(c).join(name))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_nothing_the_next_start_does_not_take_over_or_sweep() {
    let tmp = tempfile::Builder::new()
        .prefix("trident-robust")
        .tempdir()
        .unwrap();
    let data_dir = tmp.path().join("data");
    let options = || Options {
        data_dir: Some(data_dir.clone()),
        ..Options::default()
    };
    let mut first = Server::start_with(options());
    first.put_environment(801, 2, 128).await;
    let used = first.claim(801, 0).await;
    first.copy(&used, &[("kept.txt", "across the crash")]).await;
    first.wait_idle(801, 2).await;
    first.assert_runners_on_host(3).await;
    let before: BTreeSet<String> = first.runner_cgroups().into_iter().collect();
    // Runners are being made right now, and die with the server mid-way.
    first.put_environment(802, 40, 64).await;
    first.kill();
    let parent = first.cgroup_parent();

    // Debris: a runner cgroup with a live process and a runner dir that no record names.
    let fake = "801-00000000-dead-beef-0000-000000000000";
    for dir in cgroup_dirs(&format!("{parent}/{fake}")) {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut squatter = std::process::Command::new("sleep")
        .arg("8031")
        .spawn()
        .unwrap();
    for dir in cgroup_dirs(&format!("{parent}/{fake}")) {
        std::fs::write(dir.join("cgroup.procs"), squatter.id().to_string()).unwrap();
    }
    std::fs::create_dir_all(data_dir.join("runners").join(fake).join("rw")).unwrap();
    let (reaped_tx, reaped_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = reaped_tx.send(squatter.wait());
    });

    let mut second = Server::start_with(options());
    // The squatter was killed and its cgroup and directory removed.
    let status = reaped_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the debris process survived the start")
        .unwrap();
    assert!(!status.success());
    // Environment 802 is gone for good: whatever was being made for it vanishes.
    let r = second
        .send(Method::DELETE, "/execution-environments/802", Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    second.wait_idle(801, 2).await;
    second.assert_runners_on_host(3).await;
    let after: BTreeSet<String> = second.runner_cgroups().into_iter().collect();
    assert!(!after.contains(fake), "{after:?}");
    assert!(!data_dir.join("runners").join(fake).exists());
    // The runners of the killed server were taken over, the claimed one with its files.
    assert_eq!(after, before, "the runners of the killed server");
    let run = second.execute(&used, exec("cat kept.txt")).await;
    assert_eq!(run.stdout(), "across the crash", "{run:?}");

    second.stop();
    assert_eq!(second.runner_cgroups(), Vec::<String>::new());
    assert_eq!(second.runner_dirs(), 0);
    assert_eq!(second.runner_init_processes(), 0);
    drop(first);
    drop(second);
}

// ---- 8. executions ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_end_cleanly_and_deliver_everything() {
    let server = Server::start();
    server.put_environment(901, 1, 256).await;
    let runner = server.claim(901, 0).await;

    // The client goes away mid-run: everything of that execution dies (a setsid'd nohup'd
    // daemon included), the runner stays usable.
    let url = server
        .websocket_url(
            &runner,
            exec("setsid nohup sleep 9131 >/dev/null 2>&1 & echo started; sleep 9130"),
        )
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "started").await;
    let (s, r) = (&server, runner.as_str());
    eventually(Duration::from_secs(20), "both sleeps run", || async move {
        runner_processes(s, r, "sleep 913[01]").await == 2
    })
    .await;
    ws.close(None).await.unwrap();
    drop(ws);
    eventually(
        Duration::from_secs(20),
        "the cancelled execution died",
        || async move { runner_processes(s, r, "sleep 913[01]").await == 0 },
    )
    .await;
    assert_eq!(common::host_processes("sleep\u{0}9131"), 0);
    assert_eq!(common::host_processes("sleep\u{0}9130"), 0);
    let run = server.execute(&runner, exec("echo -n alive")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "alive");

    // Background processes die when the command ends.
    let run = server
        .execute(
            &runner,
            exec("(sleep 9132 &) ; nohup sleep 9133 >/dev/null 2>&1 & echo done"),
        )
        .await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "exit", "data": 0}));
    assert_eq!(run.stdout(), "done\r\n");
    assert_eq!(runner_processes(&server, &runner, "sleep 913[23]").await, 0);
    assert_eq!(common::host_processes("sleep\u{0}9132"), 0);
    let ps = as_root(&server, &runner, "ps aux").await;
    assert!(!ps.stdout().contains("sleep 913"), "{ps:?}");

    // A lot of output arrives whole (the terminal turns \n into \r\n).
    let run = server
        .execute(
            &runner,
            json!({"command": "head -c 20000000 /dev/zero | base64", "timeLimit": 120}),
        )
        .await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "exit", "data": 0}));
    let stdout = run.stdout();
    let encoded = 20_000_000usize.div_ceil(3) * 4;
    let lines = encoded.div_ceil(76);
    assert_eq!(stdout.len(), encoded + 2 * lines, "bytes of stdout");
    assert!(
        stdout.ends_with("AAA=\r\n"),
        "{:?}",
        &stdout[stdout.len() - 20..]
    );
    assert!(stdout
        .bytes()
        .all(|b| matches!(b, b'A' | b'=' | b'\r' | b'\n')));
    assert_eq!(run.stderr(), "");

    // Standard input reaches the process; stdout and stderr stay apart; signals are 128+n.
    let run = server
        .execute_with_input(&runner, exec("read line; echo got:$line"), &["abc\n"])
        .await;
    run.assert_well_formed();
    assert!(run.stdout().contains("got:abc"), "{run:?}");
    let run = server
        .execute(&runner, exec("echo out; echo err >&2; exit 3"))
        .await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "out\r\n");
    assert_eq!(run.stderr(), "err\n");
    assert_eq!(run.last(), &json!({"type": "exit", "data": 3}));
    let run = server.execute(&runner, exec("kill -9 $$")).await;
    assert_eq!(run.last(), &json!({"type": "exit", "data": 137}), "{run:?}");

    // A time limit cuts a long command off (the bound only proves it did).
    let started = Instant::now();
    let run = server
        .execute(&runner, json!({"command": "sleep 9134", "timeLimit": 1}))
        .await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "timeout"}));
    assert!(started.elapsed() < Duration::from_secs(30));
    eventually(
        Duration::from_secs(20),
        "the timed-out command died",
        || async { common::host_processes("sleep\u{0}9134") == 0 },
    )
    .await;

    // Input still arriving when the process ends never costs the client its output or
    // the terminal message.
    for round in 0..40 {
        let url = server.websocket_url(&runner, exec("echo -n ignored")).await;
        let mut ws = server.connect(&url).await;
        for _ in 0..50 {
            let _ = ws.send(Message::Text("x".repeat(1000).into())).await;
        }
        let run = common::collect(&mut ws).await;
        run.assert_well_formed();
        assert!(run.stdout().contains("ignored"), "round {round}: {run:?}");
        assert_eq!(
            run.last(),
            &json!({"type": "exit", "data": 0}),
            "round {round}"
        );
    }

    // A client that leaves while its input waits for a process that does not read it still
    // counts as gone: the execution (without a time limit) is killed.
    let url = server
        .websocket_url(&runner, exec("stty raw -echo; echo started; sleep 9140"))
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "started").await;
    let flood = async {
        for _ in 0..200 {
            ws.send(Message::Text("y".repeat(1000).into())).await?;
        }
        ws.close(None).await
    };
    tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the server stopped reading the socket")
        .unwrap();
    drop(ws);
    eventually(
        Duration::from_secs(20),
        "the abandoned execution died",
        || async { common::host_processes("sleep\u{0}9140") == 0 },
    )
    .await;
    let run = server.execute(&runner, exec("echo -n alive")).await;
    assert_eq!(run.stdout(), "alive");
}

/// Once used, a runner clones the handler of its next connection ahead of it (a spare,
/// waiting in `accept`). Exactly one spare at a time: none leaks, however many connections
/// came, and a connection that arrives while the spare's connection is still served (a
/// listing beside a long execution) gets a handler at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_runner_keeps_one_spare_handler_and_serves_beside_a_long_execution() {
    let server = Server::start();
    server.put_environment(902, 1, 256).await;
    let runner = server.claim(902, 0).await;
    assert_eq!(runner_cgroup_processes(&server, &runner), 1, "never used");
    let (s, r) = (&server, runner.as_str());
    // runner-init and its spare, nothing else; the spare is pid 1 of a pid namespace of its
    // own below the runner's (as every handler).
    let settled = || async move {
        let pids = runner_cgroup_pids(s, r);
        let init_depth = common::pid_namespace_depth("self") + 1;
        let depths: Vec<usize> = pids
            .iter()
            .map(|pid| common::pid_namespace_depth(&pid.to_string()))
            .collect();
        let own = s.runner_processes();
        pids.len() == 2
            && pids.iter().all(|pid| own.contains(pid))
            && depths.contains(&init_depth)
            && depths.contains(&(init_depth + 1))
    };

    let run = server.execute(&runner, exec("echo -n first")).await;
    assert_eq!(run.stdout(), "first", "{run:?}");
    eventually(
        Duration::from_secs(10),
        "runner-init and one spare",
        settled,
    )
    .await;

    // The spare takes a long execution; a listing and another execution beside it are
    // served by handlers of their own meanwhile.
    let url = server
        .websocket_url(&runner, exec("echo started; sleep 9150"))
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "started").await;
    let beside = async {
        server
            .copy(&runner, &[("beside.txt", "written beside")])
            .await;
        assert_eq!(names(&server.list(&runner, "").await), ["./beside.txt"]);
        server.execute(&runner, exec("cat beside.txt")).await
    };
    let run = tokio::time::timeout(Duration::from_secs(20), beside)
        .await
        .expect("a connection beside the long execution was not served");
    assert_eq!(run.stdout(), "written beside", "{run:?}");
    ws.close(None).await.unwrap();
    drop(ws);
    eventually(
        Duration::from_secs(20),
        "the long execution died",
        || async move { runner_processes(s, r, "sleep 915[0]").await == 0 },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "runner-init and one spare again",
        settled,
    )
    .await;

    // Many connections one after the other still leave one spare.
    for i in 0..20 {
        let run = server.execute(&runner, exec(&format!("echo -n {i}"))).await;
        assert_eq!(run.stdout(), i.to_string(), "{run:?}");
    }
    eventually(Duration::from_secs(10), "still one spare", settled).await;
}

// ---- 9. fork bombs ----------------------------------------------------------------------------

/// Processes in a runner's cgroup (its runner-init alone when it was never used).
fn runner_cgroup_processes(server: &Server, runner: &str) -> usize {
    runner_cgroup_pids(server, runner).len()
}

/// Processes in a runner's cgroup that are neither its runner-init nor a handler of it (a
/// used runner keeps a spare handler): what is left of executions.
fn execution_processes(server: &Server, runner: &str) -> usize {
    let own = server.runner_processes();
    runner_cgroup_pids(server, runner)
        .into_iter()
        .filter(|pid| !own.contains(pid))
        .count()
}

fn runner_cgroup_pids(server: &Server, runner: &str) -> Vec<u32> {
    let name = format!("{}/{runner}", server.cgroup_parent());
    let root = std::path::Path::new("/sys/fs/cgroup");
    let dir = if root.join("cgroup.controllers").exists() {
        root.join(name)
    } else {
        root.join("pids").join(name)
    };
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap()
        .lines()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// A runner's memory is charged to the runner: runner-init joins its cgroup before its exec,
/// so its anonymous pages are in its cgroup's count, not in the server's cgroup (where they
/// would weigh on the server's own memory limit, runner by runner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runners_own_memory_is_charged_to_its_cgroup() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let name = format!("{}/{runner}", server.cgroup_parent());
    let root = std::path::Path::new("/sys/fs/cgroup");
    let (dir, anon_key) = if root.join("cgroup.controllers").exists() {
        (root.join(&name), "anon")
    } else {
        (root.join("memory").join(&name), "rss")
    };
    // memory.stat is flushed from per-cpu counters every two seconds at the latest.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    let pids: Vec<&str> = pids.lines().collect();
    assert_eq!(pids.len(), 1, "an idle runner is one process: {pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let rss_anon_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap();
    let charged: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{anon_key} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(rss_anon_kib > 0, "{status}");
    assert!(
        charged >= rss_anon_kib * 1024,
        "runner-init maps {rss_anon_kib} KiB of anonymous memory, its cgroup is charged with \
         {charged} bytes of it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_ends_and_harms_nobody_else() {
    let server = Server::start();
    server.put_environment(1001, 1, 256).await;
    server.put_environment(1002, 1, 256).await;
    let bomber = server.claim(1001, 0).await;
    let bystander = server.claim(1002, 0).await;
    let s = &server;
    let b = bomber.as_str();

    // The classic bomb: its shell returns at once, and everything it forked dies with it.
    let run = server
        .execute(&bomber, json!({"command": ":(){ :|:& };:", "timeLimit": 5}))
        .await;
    run.assert_well_formed();
    assert!(
        matches!(run.last()["type"].as_str(), Some("timeout" | "exit")),
        "{run:?}"
    );
    eventually(
        Duration::from_secs(20),
        "the bomb's processes died",
        || async move { execution_processes(s, b) == 0 },
    )
    .await;

    // A bomb whose shell stays: it runs against the pids limit until the time limit ends it,
    // while another runner and the server keep working.
    let started = Instant::now();
    let url = server
        .websocket_url(
            &bomber,
            json!({"command": "echo bombing; :(){ :|:& };:; while :; do :; done", "timeLimit": 5}),
        )
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "bombing").await;
    eventually(Duration::from_secs(5), "the bomb spread", || async move {
        runner_cgroup_processes(s, b) > 100
    })
    .await;
    let run = server.execute(&bystander, exec("echo -n unharmed")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "unharmed");
    assert_eq!(server.get("/health").await.status(), 204);
    let other = server.claim(1002, 0).await;
    assert_eq!(
        server.execute(&other, exec("echo -n new")).await.stdout(),
        "new"
    );
    let rest = common::collect(&mut ws).await;
    assert_eq!(
        rest.messages.last(),
        Some(&json!({"type": "timeout"})),
        "{rest:?}"
    );
    assert_eq!(rest.close_code, Some(1000));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the bomb ran on"
    );
    eventually(
        Duration::from_secs(20),
        "the bomb's processes died",
        || async move { execution_processes(s, b) == 0 },
    )
    .await;

    // The bombed runner is usable again, and so is a new runner of its environment.
    assert_eq!(server.get("/health").await.status(), 204);
    let run = server.execute(&bomber, exec("echo -n survived")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "survived", "{run:?}");
    let fresh = server.claim(1001, 0).await;
    let run = server.execute(&fresh, exec("echo -n fresh")).await;
    assert_eq!(run.stdout(), "fresh");
    // Deleting the bombed runner leaves nothing of it.
    let r = server
        .send(Method::DELETE, &format!("/runners/{bomber}"), Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    server.wait_idle(1001, 1).await;
    server.wait_idle(1002, 1).await;
    // fresh + bystander + other + one idle per pool
    server.assert_runners_on_host(5).await;
}

/// A runner deleted in the middle of a fork bomb goes at once with all its processes: the
/// kill of its runner-init (pid 1 of the runner's pid namespace) takes the whole namespace
/// with it, however fast the bomb forks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_deleted_during_a_fork_bomb_leaves_nothing() {
    let server = Server::start();
    server.put_environment(1011, 1, 256).await;
    let bomber = server.claim(1011, 0).await;
    let url = server
        .websocket_url(
            &bomber,
            json!({"command": "echo bombing; :(){ :|:& };:; while :; do :; done", "timeLimit": 60}),
        )
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "bombing").await;
    let (s, b) = (&server, bomber.as_str());
    eventually(Duration::from_secs(5), "the bomb spread", || async move {
        runner_cgroup_processes(s, b) > 100
    })
    .await;
    let r = server
        .send(Method::DELETE, &format!("/runners/{bomber}"), Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    // The execution hears of it and ends, long before its time limit.
    let rest = tokio::time::timeout(Duration::from_secs(20), common::collect(&mut ws))
        .await
        .expect("the execution of a deleted runner ended");
    assert!(rest.close_code.is_some(), "{rest:?}");
    eventually(
        Duration::from_secs(20),
        "the deleted runner's cgroups are gone",
        || async move { !s.runner_cgroups().iter().any(|c| c.contains(b)) },
    )
    .await;
    server.wait_idle(1011, 1).await;
    server.assert_runners_on_host(1).await;
}

/// Deleting a runner kills whatever is in its cgroup, even a process that is not in its pid
/// namespace (which killing its runner-init alone would miss): the cgroup is then busy, and
/// the cgroup-wide kill takes over. Here the test moves a process of its own into the
/// runner's cgroup; in a runner nothing can get out of its pid namespace, so this is the
/// defence in depth the destruction must keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_runner_kills_a_stranger_in_its_cgroup_too() {
    let server = Server::start();
    server.put_environment(1012, 1, 256).await;
    let runner = server.claim(1012, 0).await;
    let mut stranger = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let dirs = cgroup_dirs(&format!("{}/{runner}", server.cgroup_parent()));
    for dir in &dirs {
        std::fs::write(dir.join("cgroup.procs"), stranger.id().to_string()).unwrap();
    }
    assert_eq!(runner_cgroup_processes(&server, &runner), 2);
    let r = server
        .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    // The DELETE returns once the runner is gone: nothing is left to wait for.
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "the runner's cgroup is left: {left:?}");
    use std::os::unix::process::ExitStatusExt;
    let status = stranger.try_wait().unwrap();
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(9),
        "the stranger was killed: {status:?}"
    );
}

// ---- 10. stopping -----------------------------------------------------------------------------

/// Completes the close handshake the server started, as a browser would (reading on sends
/// tungstenite's queued answer), until the server drops the connection.
async fn answer_close(ws: &mut common::Ws) {
    let rest = async { while let Some(Ok(_)) = ws.next().await {} };
    tokio::time::timeout(Duration::from_secs(30), rest)
        .await
        .expect("the server kept the connection");
}

/// Stops the server (SIGTERM) on a blocking thread while the test goes on with its client;
/// the server comes back when it has exited.
fn stop_in_background(mut server: Server) -> tokio::task::JoinHandle<Server> {
    tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_running_executions_finish_within_the_grace_period() {
    // The product's default: runners outlive a stop and the next start takes them over.
    let server = Server::start_with(Options {
        config_yaml: Some("shutdown_grace_seconds: 20\n".into()),
        keep_runners_on_exit: true,
        ..Options::default()
    });
    server.put_environment(1101, 1, 128).await;
    let runner = server.claim(1101, 0).await;
    let url = server
        .websocket_url(&runner, exec("echo started; sleep 2; echo finished"))
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "started").await;
    let stopping = stop_in_background(server);
    let rest = common::collect(&mut ws).await;
    answer_close(&mut ws).await;
    assert!(rest.stdout().contains("finished"), "{rest:?}");
    assert_eq!(
        rest.messages.last(),
        Some(&json!({"type": "exit", "data": 0})),
        "{rest:?}"
    );
    assert_eq!(rest.close_code, Some(1000), "{rest:?}");
    let mut server = stopping.await.unwrap();

    server.set_keep_runners_on_exit(false);
    server.restart();
    let run = server.execute(&runner, exec("echo -n taken over")).await;
    assert_eq!(run.stdout(), "taken over", "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_cuts_executions_past_the_grace_period_with_an_error() {
    let server = Server::start_with(Options {
        config_yaml: Some("shutdown_grace_seconds: 1\n".into()),
        keep_runners_on_exit: true,
        ..Options::default()
    });
    server.put_environment(1201, 1, 128).await;
    let runner = server.claim(1201, 0).await;
    let url = server
        .websocket_url(&runner, exec("echo started; sleep 1201"))
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "started").await;
    let started = Instant::now();
    let stopping = stop_in_background(server);
    let rest = common::collect(&mut ws).await;
    answer_close(&mut ws).await;
    assert_eq!(
        rest.messages.last(),
        Some(&json!({"type": "error", "data": "Error executing the request"})),
        "{rest:?}"
    );
    assert_eq!(rest.close_code, Some(1000), "{rest:?}");
    let mut server = stopping.await.unwrap();
    // The harness kills after 30 s: a stop well before proves the grace period cut it.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    eventually(
        Duration::from_secs(20),
        "the cut execution died",
        || async { common::host_processes("sleep\u{0}1201") == 0 },
    )
    .await;

    server.set_keep_runners_on_exit(false);
    server.restart();
    let run = server.execute(&runner, exec("echo -n still usable")).await;
    assert_eq!(run.stdout(), "still usable", "{run:?}");
}
