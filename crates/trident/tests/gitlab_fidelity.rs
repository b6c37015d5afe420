//! The GitLab Runner API v4 as Grape serves it, where third-party agents can tell: paths,
//! booleans, payload keys, predefined variables, masked secrets, parameter checks, file
//! names; and the agent-facing attacks: uploads without a token, endless traces, a store
//! that refuses a write. Each case names the GitLab file it matches.

mod common;

use std::time::Duration;

use common::gitlab::{
    job, patch_trace, put_state, register, request_job, submit, submit_id, take, trace, v4,
};
use common::{Options, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn agents_only(extra: &str) -> Options {
    Options {
        config_yaml: Some(format!(
            "registration_token: reg\njob_request_poll_seconds: 0\nbuiltin_agent: false\n{extra}"
        )),
        ..Options::default()
    }
}

/// `Grape::Router.normalize_path` squeezes slashes and drops a trailing one; dry-types'
/// `Params::Bool` reads `False`, `no`, `on`...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_booleans_are_read_as_grape_reads_them() {
    let server = Server::start_with(agents_only(""));
    let base = format!("http://{}", server.address);
    for path in ["//api/v4/runners", "/api/v4/runners/", "/api//v4/runners//"] {
        let r = server
            .http
            .post(format!("{base}{path}"))
            .form(&[("token", "reg"), ("run_untagged", "False")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{path}");
    }
    // A Python agent's `run_untagged=False` is false: an untagged job is not for it.
    let r = server
        .http
        .post(v4(&server, "/runners"))
        .form(&[
            ("token", "reg"),
            ("run_untagged", "False"),
            ("locked", "on"),
        ])
        .send()
        .await
        .unwrap();
    let agent: Value = r.json().await.unwrap();
    let agent = agent["token"].as_str().unwrap().to_string();
    submit(&server, json!({"name": "untagged", "script": ["true"]})).await;
    assert_eq!(request_job(&server, &agent).await.0, 204);
    let tagged = register(&server, json!({"run_untagged": "yes"})).await;
    assert_eq!(request_job(&server, &tagged).await.0, 201);
    // The trailing-slash path of a job request works too.
    let r = server
        .http
        .post(v4(&server, "/jobs/request/"))
        .json(&json!({"token": tagged}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for (value, status) in [("maybe", 400), ("TRUE", 201), ("n", 201), ("2", 400)] {
        let r = server
            .http
            .post(v4(&server, "/runners"))
            .form(&[("token", "reg"), ("paused", value)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "paused={value}");
    }
}

/// `entities/ci/job_request/dependency.rb` leaves `artifacts_file` out when there is none;
/// `Ci::Build#variables` always sends the commit, pipeline and project variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_carry_what_gitlab_always_sends_and_nothing_it_leaves_out() {
    let server = Server::start_with(agents_only(""));
    let agent = register(&server, json!({})).await;
    let (first, token) = take(&server, &agent, "first").await;
    put_state(&server, first, json!({"token": token, "state": "success"})).await;
    submit(
        &server,
        json!({"name": "second", "script": ["true"], "dependencies": [first]}),
    )
    .await;
    let (status, _, payload) = request_job(&server, &agent).await;
    assert_eq!(status, 201);
    let dependency = &payload["dependencies"][0];
    assert_eq!(dependency["id"], first);
    assert!(
        dependency.get("artifacts_file").is_none(),
        "no artifacts, no key: {dependency}"
    );
    let variables: std::collections::HashMap<String, String> = payload["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["key"].as_str().unwrap().to_string(),
                v["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (key, expected) in [
        (
            "CI_COMMIT_SHA",
            Some("0000000000000000000000000000000000000000"),
        ),
        ("CI_COMMIT_SHORT_SHA", Some("00000000")),
        (
            "CI_COMMIT_BEFORE_SHA",
            Some("0000000000000000000000000000000000000000"),
        ),
        ("CI_COMMIT_REF_NAME", Some("main")),
        ("CI_COMMIT_BRANCH", Some("main")),
        ("CI_COMMIT_REF_SLUG", Some("main")),
        ("CI_DEFAULT_BRANCH", Some("main")),
        ("CI_CONFIG_PATH", Some(".gitlab-ci.yml")),
        ("CI_PROJECT_PATH", Some("trident/jobs")),
        ("CI_PROJECT_NAME", Some("jobs")),
        ("CI_PROJECT_NAMESPACE", Some("trident")),
        ("CI_PROJECT_DIR", Some("/builds/trident/jobs")),
        ("CI_PIPELINE_ID", None),
        ("CI_PIPELINE_IID", None),
        ("CI_PIPELINE_URL", None),
        ("CI_PIPELINE_CREATED_AT", None),
        ("CI_COMMIT_TIMESTAMP", None),
        ("CI_COMMIT_TITLE", Some("second")),
        ("CI_JOB_STARTED_AT", None),
        ("CI_SERVER_VERSION_MAJOR", None),
        ("CI_PROJECT_URL", None),
        ("CI_REPOSITORY_URL", None),
    ] {
        let value = variables
            .get(key)
            .unwrap_or_else(|| panic!("{key} is missing"));
        if let Some(expected) = expected {
            assert_eq!(value, expected, "{key}");
        }
    }
    assert!(variables["CI_PIPELINE_CREATED_AT"].ends_with('Z'));
    assert_eq!(payload["git_info"]["sha"], variables["CI_COMMIT_SHA"]);
}

/// `lib/gitlab/ci/trace.rb` (`hide_secrets`) masks the job token as `x`s when a trace is
/// appended; here also when it is split across two pieces, and a job's masked variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_stored_trace() {
    let server = Server::start_with(agents_only(""));
    let agent = register(&server, json!({})).await;
    submit(
        &server,
        json!({"name": "secretive", "script": ["true"],
               "variables": {"PLAIN": "visible-value", "PASSWORD": {"value": "s3cr3t-hunter2", "masked": true}}}),
    )
    .await;
    let (_, _, payload) = request_job(&server, &agent).await;
    let id = payload["id"].as_i64().unwrap();
    let token = payload["token"].as_str().unwrap().to_string();
    let password = payload["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["key"] == "PASSWORD")
        .unwrap()
        .clone();
    assert_eq!(password["value"], "s3cr3t-hunter2");
    assert_eq!(password["masked"], true);

    let (head, tail) = token.split_at(9);
    let pieces = [
        format!("token={token}\nsplit={head}"),
        format!("{tail}\npassword=s3cr3t-"),
        "hunter2 plain=visible-value\n".to_string(),
    ];
    let mut at = 0;
    for piece in &pieces {
        let range = format!("{at}-{}", at + piece.len() - 1);
        let r = patch_trace(&server, id, &token, Some(&range), piece).await;
        assert_eq!(r.status(), 202);
        at += piece.len();
    }
    let stored = trace(&server, id).await;
    assert_eq!(stored.len(), at, "masking keeps every offset");
    assert!(!stored.contains(&token), "{stored}");
    assert!(!stored.contains(head) || !stored.contains(tail), "{stored}");
    assert!(!stored.contains("s3cr3t"), "{stored}");
    let xs = "x".repeat(token.len());
    assert_eq!(
        stored,
        format!("token={xs}\nsplit={xs}\npassword=xxxxxxxxxxxxxx plain=visible-value\n")
    );
    // The agent's own checksum (of what it sent) still completes the job.
    let sent: String = pieces.concat();
    let r = put_state(
        &server,
        id,
        json!({"token": token, "state": "success",
               "output": {"checksum": common::gitlab::crc(&sent), "bytesize": sent.len()}}),
    )
    .await;
    assert_eq!(r.status(), 200);
}

/// `lib/api/ci/runner.rb` `PUT /jobs/:id`: 400 for what it cannot take ("Unknown
/// parameters"), and a store that refuses a write is the server's error, never a 403 (which
/// makes a real agent abandon the job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_updates_are_checked_and_a_failed_write_is_not_a_refusal() {
    let server = Server::start_with(agents_only(""));
    let agent = register(&server, json!({})).await;
    let (id, token) = take(&server, &agent, "checked").await;
    for body in [
        json!({"token": token, "state": "bogus"}),
        json!({"token": token, "state": "success", "exit_code": 1_099_511_627_776u64}),
        json!({"token": token, "state": "failed", "exit_code": "one"}),
    ] {
        let r = put_state(&server, id, body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
    }
    assert_eq!(job(&server, id).await["status"], "running");
    let r = put_state(
        &server,
        id,
        json!({"token": token, "state": "running", "exit_code": 3_221_225_477u64}),
    )
    .await;
    assert_eq!(r.status(), 200, "a Windows exit code is a valid one");

    // The database refuses every write to jobs (a real SQLite failure).
    let db = rusqlite::Connection::open(server.data_dir.join("trident.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_updates BEFORE UPDATE ON ci_job_states
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    let r = put_state(&server, id, json!({"token": token, "state": "success"})).await;
    assert_eq!(r.status(), 500, "the agent must retry, not stop");
    db.execute_batch("DROP TRIGGER refuse_updates").unwrap();
    assert_eq!(job(&server, id).await["status"], "running");
    let r = put_state(&server, id, json!({"token": token, "state": "success"})).await;
    assert_eq!(r.status(), 200, "the retry goes through");
    assert_eq!(job(&server, id).await["status"], "success");
}

/// Artifact file names are the client's: a download gets their last component, safely
/// quoted (Rails' `ContentDisposition`), whatever they hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_name_files_safely() {
    let server = Server::start_with(agents_only(""));
    let agent = register(&server, json!({})).await;
    for (sent, expected) in [
        ("../../../../tmp/x", "attachment; filename=\"x\""),
        // (A raw newline cannot arrive in a multipart header; a tab can.)
        (
            "tab\there.zip",
            "attachment; filename=\"tab_here.zip\"; filename*=UTF-8''tab%09here.zip",
        ),
        (
            "résumé.zip",
            "attachment; filename=\"r_sum_.zip\"; filename*=UTF-8''r%C3%A9sum%C3%A9.zip",
        ),
    ] {
        let (id, token) = take(&server, &agent, "named").await;
        let part = reqwest::multipart::Part::bytes(b"PK\x05\x06".to_vec()).file_name(sent);
        let form = reqwest::multipart::Form::new().part("file", part);
        let r = server
            .http
            .post(v4(&server, &format!("/jobs/{id}/artifacts")))
            .header("JOB-TOKEN", &token)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{sent:?}");
        let r = server.get(&format!("/jobs/{id}/artifacts")).await;
        assert_eq!(r.status(), 200, "{sent:?}");
        assert_eq!(r.headers()["content-disposition"], expected, "{sent:?}");
    }

    // The Poseidon download of a file whose name holds a newline.
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let run = server
        .execute(&runner, common::exec("printf x > \"$(printf \"a\\nb\")\""))
        .await;
    run.assert_well_formed();
    let r = server
        .get(&format!("/runners/{runner}/files/raw?path=a%0Ab"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"a b\"; filename*=UTF-8''a%0Ab"
    );
    assert_eq!(r.text().await.unwrap(), "x");
}

/// An upload without a valid job token is refused before a byte of the file is read, and
/// leaves nothing on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_authenticated_before_their_body_is_read() {
    let server = Server::start_with(agents_only(""));
    let artifacts = server.data_dir.join("artifacts");
    for (id, token_header) in [(999, ""), (999, "JOB-TOKEN: glcbt-wrong\r\n")] {
        let mut tcp = tokio::net::TcpStream::connect(&server.address)
            .await
            .unwrap();
        let head = format!(
            "POST /api/v4/jobs/{id}/artifacts HTTP/1.1\r\nHost: x\r\n{token_header}\
             Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 104857600\r\n\r\n\
             --B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&vec![0u8; 64 * 1024]).await.unwrap();
        // ...and the other 100 MB never come: the answer must not wait for them.
        let mut answer = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
            .await
            .expect("answered without the rest of the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    }
    let leftovers = std::fs::read_dir(&artifacts)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        leftovers,
        0,
        "nothing may stay behind in {}",
        artifacts.display()
    );

    // A declared size far above the limit is refused before it is read, too.
    let agent = register(&server, json!({})).await;
    let (id, token) = take(&server, &agent, "big").await;
    let mut tcp = tokio::net::TcpStream::connect(&server.address)
        .await
        .unwrap();
    let head = format!(
        "POST /api/v4/jobs/{id}/artifacts HTTP/1.1\r\nHost: x\r\nJOB-TOKEN: {token}\r\n\
         Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 1099511627776\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"));
    assert_eq!(job(&server, id).await["status"], "running");
}

/// A trace stops at the limit: the job fails with `trace_size_exceeded` (GitLab's
/// `Ci::AppendBuildTraceService`), its agent hears 403 and the trace says why. Downloads of
/// a trace are streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_that_reaches_the_limit_fails_its_job() {
    let server = Server::start_with(agents_only("max_trace_mb: 1\n"));
    let agent = register(&server, json!({})).await;
    let (id, token) = take(&server, &agent, "chatty").await;
    let chunk = "y\n".repeat(100 * 1024); // 200 KiB
    let mut at = 0;
    let mut refused = None;
    for _ in 0..10 {
        let range = format!("{at}-{}", at + chunk.len() - 1);
        let r = patch_trace(&server, id, &token, Some(&range), &chunk).await;
        if r.status() != 202 {
            refused = Some((r.status().as_u16(), r.headers().get("job-status").cloned()));
            break;
        }
        at += chunk.len();
    }
    let (status, job_status) = refused.expect("the limit must stop the trace");
    assert_eq!(status, 403);
    assert_eq!(job_status.unwrap(), "failed");
    let finished = job(&server, id).await;
    assert_eq!(finished["status"], "failed");
    assert_eq!(finished["failureReason"], "trace_size_exceeded");
    let stored = trace(&server, id).await;
    assert!(
        stored.len() > 1 << 20 && stored.len() < (1 << 20) + 1024,
        "{}",
        stored.len()
    );
    assert!(stored.contains("Job's log exceeded limit of 1048576 bytes"));
    assert_eq!(
        finished["traceSize"].as_u64().unwrap() as usize,
        stored.len()
    );
    // Later pieces and the final update are refused the same way.
    let range = format!("{}-{}", stored.len(), stored.len());
    assert_eq!(
        patch_trace(&server, id, &token, Some(&range), "z")
            .await
            .status(),
        403
    );
    let r = server
        .get(&format!("/jobs/{id}/trace?offset=1048000"))
        .await;
    assert_eq!(r.text().await.unwrap().len(), stored.len() - 1_048_000);
    submit_id(&server, json!({"name": "after", "script": ["true"]})).await;
}

/// A job whose numbers are out of range is refused with the maximum named; the built-in
/// agent is never handed one, and keeps taking jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_jobs_are_refused_and_the_builtin_agent_goes_on() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    for timeout in [
        json!(9_223_372_036_854_775_808u64),
        json!(u64::MAX),
        json!(0),
    ] {
        let r = server
            .send(
                reqwest::Method::POST,
                "/jobs",
                json!({"name": "huge", "script": ["true"], "executionEnvironmentId": 1,
                       "timeout": timeout}),
            )
            .await;
        assert_eq!(r.status(), 400, "{timeout}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("2147483647"),
            "{body}"
        );
    }
    for bad in ["[\"x\", [\"true\"]]", "[]"] {
        let r = server.send_raw(reqwest::Method::POST, "/jobs", bad).await;
        assert_eq!(r.status(), 400, "{bad}");
    }
    let id = submit_id(
        &server,
        json!({"name": "fine", "script": ["echo ok"], "executionEnvironmentId": 1,
               "timeout": 2_147_483_647u64}),
    )
    .await;
    let (job, trace) = common::gitlab::wait_finished(&server, id).await;
    assert_eq!(job["status"], "success", "{trace}");
}
