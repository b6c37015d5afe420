//! The reference Poseidon's own acceptance scenarios, against the real server over HTTP and
//! WebSocket, with image `host` (see shared/reference/poseidon-behaviour.md).

mod common;

use std::time::{Duration, Instant};

use common::{b64, exec, Server};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_created_updated_listed_and_deleted() {
    let server = Server::start();
    let r = server
        .send_raw(Method::PUT, "/execution-environments/0", "")
        .await;
    assert_eq!(r.status(), 400);
    let r = server
        .send_raw(Method::PUT, "/execution-environments/0", "{}")
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("message"));

    let env = json!({"id": 0, "image": "host", "prewarmingPoolSize": 1, "cpuLimit": 20,
                     "memoryLimit": 100, "networkAccess": false, "exposedPorts": []});
    let r = server
        .send(Method::PUT, "/execution-environments/0", env.clone())
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.text().await.unwrap(), "");

    let mut updated = env.clone();
    updated["networkAccess"] = json!(true);
    updated["exposedPorts"] = json!([42, 1337]);
    let r = server
        .send(Method::PUT, "/execution-environments/0", updated.clone())
        .await;
    assert_eq!(r.status(), 204);
    let got: Value = server
        .get("/execution-environments/0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got, updated, "get returns all seven keys as stored");

    let list: Value = server
        .get("/execution-environments?fetch=false")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["executionEnvironments"], json!([updated]));

    let r = server
        .send(Method::DELETE, "/execution-environments/0", Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(server.get("/execution-environments/0").await.status(), 404);
    let r = server
        .send(Method::DELETE, "/execution-environments/0", Value::Null)
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        server.get("/execution-environments/abc").await.status(),
        404
    );
    assert_eq!(
        server
            .get("/execution-environments/99999999999999999999999")
            .await
            .status(),
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_are_claimed_and_deleted() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 1).await;

    let r = server.send_raw(Method::POST, "/runners", "").await;
    assert_eq!(r.status(), 400);
    let r = server
        .send(
            Method::POST,
            "/runners",
            json!({"executionEnvironmentId": 9999}),
        )
        .await;
    assert_eq!(r.status(), 404);

    let r = server
        .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    let r = server
        .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
        .await;
    assert_eq!(r.status(), 410);
    let body: Value = r.json().await.unwrap();
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("no runner found with this id"));
    let r = server
        .send(Method::DELETE, "/runners/unknown-id", Value::Null)
        .await;
    assert_eq!(r.status(), 410);
    for path in ["/runners/nope/files", "/runners/nope/files/raw?path=a"] {
        assert_eq!(server.get(path).await.status(), 410, "{path}");
    }
    let r = server
        .send(Method::PATCH, "/runners/nope/files", json!({"copy": []}))
        .await;
    assert_eq!(r.status(), 410);
    let r = server
        .send(Method::POST, "/runners/nope/execute", exec("true"))
        .await;
    assert_eq!(r.status(), 410);
    assert_eq!(
        server
            .get("/runners/nope/websocket?executionID=x")
            .await
            .status(),
        410
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_listed_copied_deleted_and_downloaded() {
    let server = Server::start();
    server.put_environment(2, 1, 256).await;
    let runner = server.claim(2, 0).await;

    let r = server.get(&format!("/runners/{runner}/files")).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"files": []}));

    server.copy(&runner, &[("test.txt", "")]).await;
    let files = server.list(&runner, "path=./&recursive=true").await;
    assert_eq!(files.len(), 1, "{files:?}");
    let f = &files[0];
    assert_eq!(f["name"], "./test.txt");
    assert_eq!(f["entryType"], "-");
    assert_eq!(f["owner"], "root");
    assert_eq!(f["group"], "root");
    assert_eq!(f["permissions"], "rwxr--r--");
    assert_eq!(f["size"], 0);
    assert!(f["modificationTime"].as_i64().unwrap() > 1_600_000_000);
    assert!(f.get("linkTarget").is_none());

    server
        .copy(&runner, &[("test.txt", "Hello, Codemoon!")])
        .await;
    let run = server.execute(&runner, exec("cat test.txt")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "Hello, Codemoon!");

    server
        .copy(
            &runner,
            &[("nested/dir/a.txt", "nested"), ("/tmp/abs.txt", "absolute")],
        )
        .await;
    let run = server
        .execute(
            &runner,
            exec("cat /workspace/nested/dir/a.txt /tmp/abs.txt"),
        )
        .await;
    assert_eq!(run.stdout(), "nestedabsolute");
    let files = server.list(&runner, "path=/tmp/&recursive=false").await;
    assert!(
        files.iter().any(|f| f["name"] == "/tmp/abs.txt"),
        "{files:?}"
    );
    let names: Vec<&str> = server
        .list(&runner, "")
        .await
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .leak()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        names,
        [
            "./nested",
            "./nested/dir",
            "./nested/dir/a.txt",
            "./test.txt"
        ]
    );
    let flat = server.list(&runner, "recursive=false").await;
    assert_eq!(flat.len(), 2, "{flat:?}");

    let r = server
        .send(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"delete": ["test.txt"]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let run = server.execute(&runner, exec("cat test.txt")).await;
    assert!(
        run.stderr().contains("No such file or directory"),
        "{run:?}"
    );
    assert_eq!(run.last(), &json!({"type": "exit", "data": 1}));

    let r = server
        .send(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"delete": ["same.txt"], "copy": [{"path": "same.txt", "content": b64("kept")}]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        server.execute(&runner, exec("cat same.txt")).await.stdout(),
        "kept"
    );

    // Download.
    let r = server
        .get(&format!("/runners/{runner}/files/raw?path=missing.txt"))
        .await;
    assert_eq!(r.status(), 424);
    server.copy(&runner, &[("test.txt", "New content")]).await;
    let r = server
        .get(&format!("/runners/{runner}/files/raw?path=test.txt"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "11");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"test.txt\""
    );
    assert_eq!(r.text().await.unwrap(), "New content");

    // The workspace is emptied by CodeOcean's `./*`, dotfiles included.
    server.copy(&runner, &[(".hidden", "x")]).await;
    let r = server
        .send(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"delete": ["./*"]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(server.list(&runner, "").await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_folders_are_protected_from_the_unprivileged_user() {
    let server = Server::start();
    server.put_environment(3, 1, 256).await;
    let runner = server.claim(3, 0).await;
    let r = server
        .send(
            Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"copy": [{"path": "protectedFolder/"},
                            {"path": "protectedFolder/file.txt", "content": b64("original")}]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let folder = server.list(&runner, "").await;
    assert_eq!(folder[0]["name"], "./protectedFolder");
    assert_eq!(folder[0]["entryType"], "d");
    assert_eq!(folder[0]["permissions"], "rwxrwxrwt");

    let run = server
        .execute(
            &runner,
            exec("touch protectedFolder/userfile && echo created"),
        )
        .await;
    assert_eq!(run.stdout(), "created\r\n");
    let run = server
        .execute(&runner, exec("rm -f protectedFolder/file.txt"))
        .await;
    assert!(run.stderr().contains("Operation not permitted"), "{run:?}");
    let run = server
        .execute(&runner, exec("rm -rf protectedFolder"))
        .await;
    assert!(run.stderr().contains("Operation not permitted"), "{run:?}");
    let run = server
        .execute(&runner, exec("echo more >> protectedFolder/file.txt"))
        .await;
    assert!(run.stderr().contains("Permission denied"), "{run:?}");
    let run = server
        .execute(&runner, exec("cat protectedFolder/file.txt"))
        .await;
    assert_eq!(run.stdout(), "original");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_follow_the_websocket_protocol() {
    let server = Server::start();
    server.put_environment(4, 1, 256).await;
    let runner = server.claim(4, 0).await;

    let run = server.execute(&runner, exec("true")).await;
    assert_eq!(
        run.messages,
        vec![json!({"type": "start"}), json!({"type": "exit", "data": 0})]
    );
    assert_eq!(run.close_code, Some(1000));

    let run = server.execute(&runner, exec("echo -n Hello World")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "Hello World");

    let run = server.execute(&runner, exec("cat -invalid")).await;
    run.assert_well_formed();
    assert!(run.stderr().contains("cat: invalid option"), "{run:?}");
    assert_eq!(run.stdout(), "");
    assert_eq!(run.last(), &json!({"type": "exit", "data": 1}));

    let run = server.execute(&runner, exec("exit 42")).await;
    assert_eq!(run.last(), &json!({"type": "exit", "data": 42}));
    let run = server.execute(&runner, exec("kill -TERM $$")).await;
    assert_eq!(
        run.last(),
        &json!({"type": "exit", "data": 143}),
        "signals are 128+n"
    );

    let run = server.execute(&runner, exec("id --name --user")).await;
    assert_eq!(run.stdout().trim(), "user");
    let run = server
        .execute(
            &runner,
            json!({"command": "id --name --user", "privilegedExecution": true}),
        )
        .await;
    assert_eq!(run.stdout().trim(), "root");
    let run = server.execute(&runner, exec("pwd; echo $HOME")).await;
    assert_eq!(run.stdout(), "/workspace\r\n/workspace\r\n");

    // A TTY: the input is echoed, then head prints it.
    let run = server
        .execute_with_input(&runner, exec("head -n 1"), &["Hello World!\n"])
        .await;
    run.assert_well_formed();
    assert_eq!(run.stdout().matches("Hello World!").count(), 2, "{run:?}");

    let run = server
        .execute(
            &runner,
            json!({"command": "env", "environment": {"hello": "world"}}),
        )
        .await;
    let out = run.stdout();
    assert!(out.contains("hello=world"), "{out}");
    assert!(out.contains("CODEOCEAN=true"), "{out}");
    for internal in ["TRIDENT", "NOMAD", "POSEIDON", "CARGO", "RUST"] {
        assert!(!out.contains(internal), "{internal} leaked: {out}");
    }

    // Multi-byte output survives arbitrary chunking.
    let run = server.execute(&runner, exec("printf \"grüße 🐍\"")).await;
    assert_eq!(run.stdout(), "grüße 🐍");

    // The forbidden character of the reference.
    let r = server
        .send(
            Method::POST,
            &format!("/runners/{runner}/execute"),
            exec("echo 'x'"),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("use of forbidden character"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_limits_and_inactivity_timeouts_end_executions() {
    let server = Server::start();
    server.put_environment(5, 2, 256).await;
    let runner = server.claim(5, 0).await;
    let started = Instant::now();
    let run = server
        .execute(&runner, json!({"command": "sleep 4", "timeLimit": 1}))
        .await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "timeout"}));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the limit did not cut the sleep"
    );
    // The runner stays usable.
    assert_eq!(
        server.execute(&runner, exec("echo -n ok")).await.stdout(),
        "ok"
    );

    let runner = server.claim(5, 2).await;
    let run = server.execute(&runner, exec("sleep infinity")).await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "timeout"}));
    let r = server.get(&format!("/runners/{runner}/files")).await;
    assert_eq!(
        r.status(),
        410,
        "the runner is gone after its inactivity timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limits_are_enforced_and_reported() {
    let server = Server::start();
    server.put_environment(6, 1, 100).await;
    let runner = server.claim(6, 0).await;
    let run = server
        .execute(&runner, exec("</dev/zero head -c 110MB | tail"))
        .await;
    run.assert_well_formed();
    let last = run.last().clone();
    assert!(
        last == json!({"type": "error", "data": "the allocation was OOM Killed"})
            || last == json!({"type": "exit", "data": 137}),
        "{run:?}"
    );
    // The runner is still usable afterwards.
    assert_eq!(
        server
            .execute(&runner, exec("echo -n alive"))
            .await
            .stdout(),
        "alive"
    );
}
