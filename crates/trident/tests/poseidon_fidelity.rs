//! Where a real Poseidon client can tell trident from the reference server, trident behaves
//! as the reference does (openHPI/poseidon; the file each case matches is named beside it),
//! and hostile input never breaks a runner.

mod common;

use std::time::Duration;

use common::{b64, environment, error_of, eventually, exec, Server};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

/// Reads the server's frames from a raw connection until it closes; returns the close
/// frame's code, if one came. (Server frames are never masked.)
async fn raw_close_code(tcp: &mut tokio::net::TcpStream) -> Option<u16> {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut bytes)).await;
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let opcode = bytes[at] & 0x0f;
        let (len, header) = match bytes[at + 1] & 0x7f {
            126 => (
                u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize,
                4,
            ),
            127 => panic!("no frame here is that long"),
            n => (n as usize, 2),
        };
        let payload = &bytes[at + header..(at + header + len).min(bytes.len())];
        if opcode == 0x8 && payload.len() >= 2 {
            return Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
        at += header + len;
    }
    None
}

/// `internal/api/websocket.go` (close handler) and `internal/api/ws/codeocean_writer.go`:
/// a client's Close is answered with a Close, and the execution is cancelled; a frame that
/// breaks the protocol ends the session with 1002 (gorilla's `handleProtocolError`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_close_handshake_and_protocol_violations() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;

    // The client closes mid-execution (CodeOcean's stop button).
    let url = server
        .websocket_url(&runner, exec("sleep 3071; echo never"))
        .await;
    let mut ws = server.connect(&url).await;
    let start = ws.next().await.unwrap().unwrap();
    assert_eq!(
        start,
        Message::Text(json!({"type": "start"}).to_string().into())
    );
    ws.close(None).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the server answers the close");
    assert!(
        matches!(answer, Some(Ok(Message::Close(_)))),
        "the server must answer a Close with a Close, not drop the connection: {answer:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the execution is cancelled",
        || async { common::host_processes("sleep\u{0}3071") == 0 },
    )
    .await;

    // An unmasked frame from a client is a protocol violation (RFC 6455 §5.1).
    let url = server.websocket_url(&runner, exec("sleep 3072")).await;
    let mut ws = server.connect(&url).await;
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
    let MaybeTlsStream::Plain(tcp) = ws.get_mut() else {
        panic!("plain TCP expected");
    };
    tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(raw_close_code(tcp).await, Some(1002));
    eventually(
        Duration::from_secs(10),
        "the execution is cancelled",
        || async { common::host_processes("sleep\u{0}3072") == 0 },
    )
    .await;

    // The runner is still fine.
    let run = server.execute(&runner, exec("echo -n alive")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "alive");
}

/// `internal/runner/nomad_runner.go` (UpdateFileSystem: one `tar` run) and
/// `internal/api/runners.go` (500 with `UNKNOWN`): an entry that cannot be written does not
/// stop the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_writes_every_entry_it_can_and_names_the_ones_it_cannot() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let r = server
        .send(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"copy": [
                {"path": "before.txt", "content": b64("one")},
                {"path": "/proc/1/environ", "content": b64("x")},
                {"path": "dir/", "content": ""},
                // (The host image's /etc is never idmapped: root in the runner cannot add to
                // it. Its /usr is, and takes new files in the runner's writable layer.)
                {"path": "/etc/planted", "content": b64("x")},
                {"path": "dir/after.txt", "content": b64("two")},
            ]}),
        )
        .await;
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], "UNKNOWN", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("/proc/1/environ: Cannot open")
            && message.contains("/etc/planted: Cannot open"),
        "{message}"
    );
    assert!(
        !message.contains("before.txt") && !message.contains("after.txt"),
        "{message}"
    );
    let run = server
        .execute(&runner, exec("cat before.txt dir/after.txt"))
        .await;
    assert_eq!(run.stdout(), "onetwo", "{run:?}");
}

/// `internal/nomad/nomad_runner.go`: a process the OOM killer takes ends the execution with
/// its exit code; runner-init is never the OOM killer's choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_in_a_living_runner_is_an_ordinary_exit() {
    let server = Server::start();
    server.put_environment(1, 1, 128).await;
    let runner = server.claim(1, 0).await;
    let run = server
        .execute(
            &runner,
            json!({"command": "/usr/bin/python3 -c \"b = bytearray(400 << 20)\"", "timeLimit": 30}),
        )
        .await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "exit", "data": 137}), "{run:?}");

    // The execution's own processes are the OOM killer's first choice... The handler raises
    // the command's score once its exec is through (init.rs, `raise_oom_score`), so this
    // reads it in a process the command forks a moment later: on a busy machine the raise
    // can come after the command's first instructions (a `cat` that bash execs at once read
    // 0 here once in six runs with two CPU hogs beside the debug build), and what the
    // command forks before then keeps the runner's default (docs/SECURITY.md).
    let run = server
        .execute(&runner, exec("sleep 0.2; cat /proc/self/oom_score_adj"))
        .await;
    assert_eq!(run.stdout().trim(), "1000", "{run:?}");
    // ... runner-init and its handlers are not.
    let marker = format!(
        "runner-init\u{0}{}",
        server.data_dir.canonicalize().unwrap().display()
    );
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&marker) {
            let score = std::fs::read_to_string(entry.path().join("oom_score_adj")).unwrap();
            assert!(
                score.trim().parse::<i32>().unwrap() < 1000,
                "{}: {score}",
                entry.path().display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "runner-init processes: {seen}");
    let run = server.execute(&runner, exec("echo -n alive")).await;
    assert_eq!(run.stdout(), "alive", "{run:?}");
}

/// `internal/runner/nomad_runner.go` (`ls -l` in the workspace): link targets read as the
/// runner's programs see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_resolve_links_from_the_workspace() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let files = server.list(&runner, "path=/proc/self/cwd").await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["entryType"], "l");
    assert_eq!(files[0]["linkTarget"], "/workspace", "{files:?}");
}

/// `internal/environment/nomad_environment.go` (SetMemoryLimit rejects only values above
/// MaxInt32): `memoryLimit: 0` is accepted and means the server's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_zero_means_the_servers_default() {
    let server = Server::start_with(common::Options {
        config_yaml: Some("default_memory_limit_mb: 192\n".into()),
        ..common::Options::default()
    });
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/4",
            environment(4, 1, 0),
        )
        .await;
    assert_eq!(r.status(), 201);
    let env: Value = server
        .get("/execution-environments/4")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(env["memoryLimit"], 0, "stored as sent");
    server.claim(4, 0).await;
    let cgroup = server.runner_cgroups().pop().expect("a runner cgroup");
    let limit = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        format!(
            "/sys/fs/cgroup/{}/{cgroup}/memory.max",
            server.cgroup_parent()
        )
    } else {
        format!(
            "/sys/fs/cgroup/memory/{}/{cgroup}/memory.limit_in_bytes",
            server.cgroup_parent()
        )
    };
    assert_eq!(
        std::fs::read_to_string(limit).unwrap().trim(),
        (192u64 << 20).to_string()
    );
    // Above MaxInt32 is refused, as in the reference.
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/5",
            environment(5, 0, 2_147_483_648),
        )
        .await;
    assert_eq!(error_of(r, "memoryLimit above MaxInt32").await.0, 400);
}

/// Bodies are JSON objects (serde would read a struct from an array); huge durations are
/// refused instead of overflowing; boolean query parameters are checked; prepared
/// executions are bounded. None of it harms the runner it was aimed at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_shapes_and_numbers_are_refused_and_harm_nothing() {
    let server = Server::start();
    server.put_environment(1, 2, 256).await;
    let runner = server.claim(1, 0).await;
    let files = format!("/runners/{runner}/files");
    let execute = format!("/runners/{runner}/execute");
    let cases: Vec<(Method, &str, String)> = vec![
        (Method::PATCH, &files, "[]".into()),
        (
            Method::PATCH,
            &files,
            json!([[], [{"path": "array.txt", "content": b64("x")}]]).to_string(),
        ),
        (
            Method::PATCH,
            &files,
            json!({"copy": [["array.txt", b64("x")]]}).to_string(),
        ),
        (Method::POST, "/runners", "[1, 0]".into()),
        (Method::POST, &execute, r#"["touch array.txt"]"#.into()),
        (
            Method::PUT,
            "/execution-environments/9",
            r#"[9, "host", 1, 20, 256, false, []]"#.into(),
        ),
        (
            Method::POST,
            "/runners",
            json!({"executionEnvironmentId": 1, "inactivityTimeout": u64::MAX}).to_string(),
        ),
        (
            Method::POST,
            "/runners",
            json!({"executionEnvironmentId": 1, "inactivityTimeout": i64::MAX}).to_string(),
        ),
        (
            Method::POST,
            &execute,
            json!({"command": "true", "timeLimit": u64::MAX}).to_string(),
        ),
    ];
    for (method, path, body) in &cases {
        let context = format!("{method} {path} {body}");
        let r = server.send_raw(method.clone(), path, body).await;
        let (status, message) = error_of(r, &context).await;
        assert_eq!(status, 400, "{context}: {message}");
        if body.contains("imeout") || body.contains("timeLimit") {
            assert!(message.contains("2147483647"), "{context}: {message}");
        }
    }
    assert_eq!(
        server.get("/execution-environments/9").await.status(),
        404,
        "no environment from an array"
    );
    let run = server
        .execute(&runner, exec("ls array.txt 2>&1; echo -n ok"))
        .await;
    assert!(
        run.stdout().ends_with("ok") && run.stdout().contains("No such file"),
        "{run:?}"
    );
    // The largest accepted timeout is accepted, and the runner works afterwards.
    let r = server
        .send(
            Method::POST,
            "/runners",
            json!({"executionEnvironmentId": 1, "inactivityTimeout": 2_147_483_647u64}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let far: Value = r.json().await.unwrap();
    let far = far["runnerId"].as_str().unwrap();
    assert_eq!(server.execute(far, exec("echo -n x")).await.stdout(), "x");
    assert_eq!(server.list(far, "").await.len(), 0);

    // `environments.go`: `fetch` is parsed with strconv.ParseBool.
    for (query, status) in [
        ("fetch=garbage", 400),
        ("fetch=0.15", 400),
        ("fetch=true", 200),
        ("fetch=T", 200),
        ("fetch=0", 200),
        ("", 200),
    ] {
        let r = server
            .get(&format!("/execution-environments?{query}"))
            .await;
        assert_eq!(r.status(), status, "{query}");
    }

    // Prepared executions that never connect are bounded per runner, by count and bytes.
    let big = "x".repeat(100_000);
    let mut prepared = Vec::new();
    let mut refused = None;
    for i in 0..100 {
        let r = server
            .send(
                Method::POST,
                &execute,
                json!({"command": format!("echo -n {i}; : {big}")}),
            )
            .await;
        if r.status() != 200 {
            refused = Some((i, error_of(r, "prepare").await));
            break;
        }
        let body: Value = r.json().await.unwrap();
        prepared.push(body["websocketUrl"].as_str().unwrap().to_string());
    }
    let (count, (status, message)) = refused.expect("preparing must be bounded");
    assert_eq!(status, 429, "{message}");
    assert!(count < 64, "the byte bound comes first here: {count}");
    let other = server.claim(1, 0).await;
    let mut refused_at = None;
    for i in 0..100 {
        let r = server
            .send(
                Method::POST,
                &format!("/runners/{other}/execute"),
                exec(&format!("echo {i}")),
            )
            .await;
        if r.status() != 200 {
            assert_eq!(r.status(), 429);
            refused_at = Some(i);
            break;
        }
    }
    assert_eq!(refused_at, Some(64), "the count bound");
    // What was prepared still runs when its client connects.
    let mut ws = server.connect(&prepared[3]).await;
    let run = common::collect(&mut ws).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "3");
}

/// Reads from a raw connection until the server closes it; `None` if it stays open for
/// `bound`.
async fn closed_within(tcp: &mut tokio::net::TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(bound, read).await.ok().map(|()| seen)
}

/// Slow or silent clients cannot hold connections: a header must arrive whole within the
/// header timeout, a kept-alive connection is closed after the idle timeout, and a body
/// declared too large is refused before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off() {
    let server = Server::start_with(common::Options {
        config_yaml: Some(
            "http_header_timeout_seconds: 2\nhttp_idle_timeout_seconds: 3\nmax_body_mb: 1\n".into(),
        ),
        ..common::Options::default()
    });
    let connect = || tokio::net::TcpStream::connect(&server.address);

    // Fifty connections that say nothing at all.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(connect().await.unwrap());
    }
    let started = std::time::Instant::now();
    for tcp in &mut silent {
        assert!(
            closed_within(tcp, Duration::from_secs(10)).await.is_some(),
            "a silent connection stayed open"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(8));

    // A header sent one line a second never completes in time.
    let mut slow = connect().await.unwrap();
    let trickle = async {
        for line in [
            "GET /api/v1/health HTTP/1.1\r\n",
            "Host: x\r\n",
            "X-A: 1\r\n",
            "X-B: 2\r\n",
            "X-C: 3\r\n",
        ] {
            if slow.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(6), trickle).await;
    assert!(closed_within(&mut slow, Duration::from_secs(3))
        .await
        .is_some());

    // A keep-alive client that asks now and then is served; an idle one is let go.
    let mut alive = connect().await.unwrap();
    for _ in 0..3 {
        alive
            .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 256];
        let n = alive.read(&mut answer).await.unwrap();
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 204"),
            "{:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let idle_since = std::time::Instant::now();
    assert!(closed_within(&mut alive, Duration::from_secs(6))
        .await
        .is_some());
    assert!(
        idle_since.elapsed() >= Duration::from_millis(1400),
        "closed too early"
    );

    // A declared body above the limit: 413 at once, no waiting for the body.
    let mut big = connect().await.unwrap();
    big.write_all(
        b"PUT /api/v1/execution-environments/1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{",
    )
    .await
    .unwrap();
    let answer = closed_within(&mut big, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // The server is fine.
    assert_eq!(server.get("/health").await.status(), 204);
}
