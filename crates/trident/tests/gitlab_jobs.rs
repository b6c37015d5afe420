//! Jobs through trident's jobs API and the GitLab Runner API v4, with a raw-HTTP agent.

mod common;

use common::gitlab::{
    crc, job_status, patch_trace, put_state, register, request_job, submit, take, v4,
};
use common::{Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_take_jobs_stream_traces_and_report() {
    let mut server = Server::start_with(Options {
        config_yaml: Some(
            "registration_token: reg\njob_request_poll_seconds: 1\nbuiltin_agent: false\n".into(),
        ),
        ..Options::default()
    });
    let linux = register(
        &server,
        json!({"tag_list": "linux,docker", "run_untagged": true}),
    )
    .await;
    let gpu = register(&server, json!({"tag_list": ["gpu"], "run_untagged": false})).await;
    let paused = register(&server, json!({"paused": true})).await;

    // Bad jobs are refused.
    for bad in [
        json!({"name": "x", "script": []}),
        json!({"script": ["true"]}),
        json!({"name": "x", "script": ["true"], "dependencies": [999]}),
    ] {
        let r = server.send(Method::POST, "/jobs", bad.clone()).await;
        assert_eq!(r.status(), 400, "{bad}");
    }

    // Nothing queued: 204 with the queue's version.
    let (status, headers, _) = request_job(&server, &linux).await;
    assert_eq!(status, 204);
    assert!(headers.contains_key("x-gitlab-last-update"));
    let (status, _, _) = request_job(&server, "glrt-unknown").await;
    assert_eq!(status, 403);

    // A long poll answers as soon as a job is queued.
    let waiting = {
        let http = server.http.clone();
        let url = v4(&server, "/jobs/request");
        let token = linux.clone();
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"token": token}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        })
    };
    let job = submit(
        &server,
        json!({"name": "build", "script": ["echo hi"], "afterScript": ["echo bye"],
               "variables": {"GREETING": "hello"}, "timeout": 120}),
    )
    .await;
    assert_eq!(job["status"], "pending");
    let id = job["id"].as_i64().unwrap();
    let (status, payload) = waiting.await.unwrap();
    let payload = if status == 201 {
        payload
    } else {
        // The poll ended just before the job arrived: ask again.
        let (status, _, payload) = request_job(&server, &linux).await;
        assert_eq!(status, 201);
        payload
    };
    assert_eq!(payload["id"], id);
    let token = payload["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("glcbt-"));
    assert_eq!(payload["steps"][0]["name"], "script");
    assert_eq!(payload["steps"][0]["script"], json!(["echo hi"]));
    assert_eq!(payload["steps"][1]["name"], "after_script");
    assert_eq!(payload["runner_info"]["timeout"], 120);
    let variables = payload["variables"].as_array().unwrap();
    for (key, value) in [
        ("CI_JOB_ID", id.to_string()),
        ("GREETING", "hello".into()),
        ("CI_JOB_TOKEN", token.clone()),
    ] {
        assert!(
            variables
                .iter()
                .any(|v| v["key"] == key && v["value"] == value),
            "{key}"
        );
    }
    let running: Value = server
        .get(&format!("/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(running["status"], "running");
    assert!(
        running.get("tokenHash").is_none(),
        "token material leaked: {running}"
    );

    // Traces: appended at the end only; 416 tells where the end is.
    let r = patch_trace(&server, id, &token, Some("0-4"), "hello").await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-5");
    assert_eq!(r.headers()["job-status"], "running");
    assert!(r.headers().contains_key("x-gitlab-trace-update-interval"));
    let r = patch_trace(&server, id, &token, Some("3-5"), "xyz").await;
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["range"], "0-5");
    assert_eq!(
        patch_trace(&server, id, &token, None, "x").await.status(),
        400
    );
    assert_eq!(
        patch_trace(&server, id, "glcbt-wrong", Some("5-5"), "x")
            .await
            .status(),
        403
    );
    assert_eq!(
        patch_trace(&server, id, &token, Some("5-10"), " world")
            .await
            .status(),
        202
    );
    let trace = server.get(&format!("/jobs/{id}/trace")).await;
    assert_eq!(trace.headers()["x-trace-size"], "11");
    assert_eq!(trace.text().await.unwrap(), "hello world");
    let tail = server
        .get(&format!("/jobs/{id}/trace?offset=6"))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(tail, "world");

    // The end: success, and the job token dies with the job.
    let r = put_state(
        &server,
        id,
        json!({"token": token, "state": "success", "exit_code": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let done: Value = server
        .get(&format!("/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "success");
    assert_eq!(done["exitCode"], 0);
    let r = patch_trace(&server, id, &token, Some("11-11"), "x").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["job-status"], "success");

    // Tags: a gpu job goes to the gpu agent only; untagged jobs never to it; paused agents get nothing.
    let gpu_job = submit(
        &server,
        json!({"name": "train", "script": ["true"], "tags": ["gpu"]}),
    )
    .await;
    assert_eq!(request_job(&server, &linux).await.0, 204);
    assert_eq!(request_job(&server, &paused).await.0, 204);
    let (status, _, payload) = request_job(&server, &gpu).await;
    assert_eq!(status, 201);
    assert_eq!(payload["id"], gpu_job["id"]);
    let untagged = submit(&server, json!({"name": "lint", "script": ["true"]})).await;
    assert_eq!(request_job(&server, &gpu).await.0, 204);

    // Cancellation reaches the agent through 403 + Job-Status: canceled.
    let (status, _, payload) = request_job(&server, &linux).await;
    assert_eq!(status, 201);
    assert_eq!(payload["id"], untagged["id"]);
    let cancel_id = payload["id"].as_i64().unwrap();
    let cancel_token = payload["token"].as_str().unwrap().to_string();
    let r = server
        .send(
            Method::POST,
            &format!("/jobs/{cancel_id}/cancel"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = patch_trace(&server, cancel_id, &cancel_token, Some("0-0"), "x").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["job-status"], "canceled");
    let r = put_state(
        &server,
        cancel_id,
        json!({"token": cancel_token, "state": "success"}),
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["job-status"], "canceled");

    // Filters, 404s, and durability across a restart.
    let list: Value = server
        .get("/jobs?status=success")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(server.get("/jobs?status=bogus").await.status(), 400);
    assert_eq!(server.get("/jobs/4242").await.status(), 404);
    server.restart();
    let again: Value = server
        .get(&format!("/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again, done);
    assert_eq!(
        server
            .get(&format!("/jobs/{id}/trace"))
            .await
            .text()
            .await
            .unwrap(),
        "hello world"
    );
    let database = std::fs::read(server.data_dir.join("trident.db")).unwrap();
    let wal = std::fs::read(server.data_dir.join("trident.db-wal")).unwrap_or_default();
    for bytes in [&database, &wal] {
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "a job token in plain text"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_api_shares_the_poseidon_token() {
    let server = Server::start_with(Options {
        token: Some("t0ken".into()),
        config_yaml: Some("job_request_poll_seconds: 0\nbuiltin_agent: false\n".into()),
        ..Options::default()
    });
    let bare = server
        .http
        .get(format!("http://{}/api/v1/jobs", server.address))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 401);
    let r = server.get("/jobs").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_agent_goes_silent_fail() {
    let server = Server::start_with(Options {
        config_yaml: Some(
            "registration_token: reg\njob_request_poll_seconds: 0\nbuiltin_agent: false\njob_stale_seconds: 1\n"
                .into(),
        ),
        ..Options::default()
    });
    let agent = register(&server, json!({})).await;
    let job = submit(&server, json!({"name": "orphan", "script": ["true"]})).await;
    let (status, _, payload) = request_job(&server, &agent).await;
    assert_eq!(status, 201);
    assert_eq!(payload["id"], job["id"]);
    let id = job["id"].as_i64().unwrap();
    // The agent never reports again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let job: Value = server
            .get(&format!("/jobs/{id}"))
            .await
            .json()
            .await
            .unwrap();
        if job["status"] == "failed" {
            assert_eq!(job["failureReason"], "runner_system_failure");
            break;
        }
        assert_eq!(job["status"], "running");
        assert!(
            std::time::Instant::now() < deadline,
            "the job kept running without its agent"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_stored_served_to_dependants_and_expire() {
    let server = Server::start_with(Options {
        config_yaml: Some(
            "registration_token: reg\njob_request_poll_seconds: 0\nbuiltin_agent: false\nmax_artifacts_mb: 1\njob_stale_seconds: 8\n"
                .into(),
        ),
        ..Options::default()
    });
    let agent = register(&server, json!({})).await;
    let a = submit(
        &server,
        json!({"name": "build", "script": ["true"], "artifacts": {"paths": ["out/"]}}),
    )
    .await;
    let a_id = a["id"].as_i64().unwrap();
    let (_, _, payload) = request_job(&server, &agent).await;
    assert_eq!(payload["artifacts"][0]["paths"], json!(["out/"]));
    let a_token = payload["token"].as_str().unwrap().to_string();

    // Authorize: size limit and token.
    let authorize = |token: &str, size: u64| {
        server
            .http
            .post(v4(&server, &format!("/jobs/{a_id}/artifacts/authorize")))
            .header("JOB-TOKEN", token)
            .json(&json!({"token": token, "filesize": size, "artifact_type": "archive"}))
            .send()
    };
    assert_eq!(authorize(&a_token, 100).await.unwrap().status(), 200);
    assert_eq!(authorize(&a_token, 2 << 20).await.unwrap().status(), 413);
    assert_eq!(authorize("glcbt-wrong", 100).await.unwrap().status(), 403);

    // Upload: stored as sent (a zip with a `../` entry is never unpacked by trident).
    let archive: Vec<u8> = b"PK\x03\x04 ../../etc/passwd pretend-zip".to_vec();
    let upload = |token: &str, bytes: Vec<u8>, expire_in: &str| {
        let form = reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name("artifacts.zip"),
            )
            .text("artifact_type", "archive")
            .text("artifact_format", "zip")
            .text("expire_in", expire_in.to_string());
        server
            .http
            .post(v4(&server, &format!("/jobs/{a_id}/artifacts")))
            .header("JOB-TOKEN", token)
            .multipart(form)
            .send()
    };
    assert_eq!(
        upload(&a_token, vec![0u8; 2 << 20], "1 week")
            .await
            .unwrap()
            .status(),
        413
    );
    assert_eq!(
        upload("glcbt-wrong", archive.clone(), "1 week")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        upload(&a_token, archive.clone(), "whenever")
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        upload(&a_token, archive.clone(), "1 week")
            .await
            .unwrap()
            .status(),
        201
    );

    let download = |id: i64, token: &str| {
        server
            .http
            .get(v4(&server, &format!("/jobs/{id}/artifacts")))
            .header("JOB-TOKEN", token)
            .send()
    };
    let r = download(a_id, &a_token).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], archive.len().to_string());
    assert_eq!(r.bytes().await.unwrap().as_ref(), archive.as_slice());
    assert!(!server
        .data_dir
        .join("artifacts")
        .join(a_id.to_string())
        .join("etc")
        .exists());

    // A job that depends on it may fetch it with its own token; others may not.
    let b = submit(
        &server,
        json!({"name": "test", "script": ["true"], "dependencies": [a_id]}),
    )
    .await;
    let (_, _, payload_b) = request_job(&server, &agent).await;
    assert_eq!(payload_b["id"], b["id"]);
    assert_eq!(payload_b["dependencies"][0]["id"], a_id);
    assert_eq!(payload_b["dependencies"][0]["name"], "build");
    assert_eq!(
        payload_b["dependencies"][0]["artifacts_file"]["size"],
        archive.len()
    );
    assert_eq!(payload_b["dependencies"][0]["token"], payload_b["token"]);
    let b_token = payload_b["token"].as_str().unwrap().to_string();
    let c = submit(&server, json!({"name": "other", "script": ["true"]})).await;
    let (_, _, payload_c) = request_job(&server, &agent).await;
    assert_eq!(payload_c["id"], c["id"]);
    let c_token = payload_c["token"].as_str().unwrap().to_string();
    assert_eq!(download(a_id, &c_token).await.unwrap().status(), 403);
    let r = put_state(
        &server,
        a_id,
        json!({"token": a_token, "state": "success", "exit_code": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        download(a_id, &a_token).await.unwrap().status(),
        403,
        "a finished job's token is dead"
    );
    let r = download(a_id, &b_token).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), archive.as_slice());
    let r = server.get(&format!("/jobs/{a_id}/artifacts")).await;
    assert_eq!(r.status(), 200);
    let c_id = c["id"].as_i64().unwrap();
    assert_eq!(
        server
            .get(&format!("/jobs/{c_id}/artifacts"))
            .await
            .status(),
        404
    );

    // Expiry: an artifact that expires goes away by itself.
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"soon gone".to_vec()).file_name("a.zip"),
        )
        .text("expire_in", "1 sec");
    let r = server
        .http
        .post(v4(&server, &format!("/jobs/{c_id}/artifacts")))
        .header("JOB-TOKEN", &c_token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for (id, token) in [(c_id, &c_token), (b["id"].as_i64().unwrap(), &b_token)] {
        let r = put_state(
            &server,
            id,
            json!({"token": token, "state": "success", "exit_code": 0}),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        server
            .get(&format!("/jobs/{c_id}/artifacts"))
            .await
            .status(),
        200
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server
        .get(&format!("/jobs/{c_id}/artifacts"))
        .await
        .status()
        != 404
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the artifact never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(!server
        .data_dir
        .join("artifacts")
        .join(c_id.to_string())
        .join("archive")
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_update_waits_for_the_whole_trace() {
    let mut server = Server::start_with(Options {
        config_yaml: Some(
            "registration_token: reg\njob_request_poll_seconds: 0\nbuiltin_agent: false\ntrace_accept_timeout_seconds: 2\n"
                .into(),
        ),
        ..Options::default()
    });
    let agent = register(&server, json!({})).await;

    // The agent says its trace is "hello world" while trident has "hello": 202, the job
    // keeps running; once the rest arrives the same update is taken (200).
    let (id, token) = take(&server, &agent, "complete").await;
    assert_eq!(
        patch_trace(&server, id, &token, Some("0-4"), "hello")
            .await
            .status(),
        202
    );
    let final_update = json!({"token": token, "state": "success", "exit_code": 0,
                              "output": {"checksum": crc("hello world"), "bytesize": 11}});
    let r = put_state(&server, id, final_update.clone()).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["job-status"], "running");
    assert!(r.headers().contains_key("x-gitlab-trace-update-interval"));
    assert_eq!(job_status(&server, id).await, "running");
    // A checksum that is not one is refused and changes nothing.
    for bad in [
        json!({"token": token, "state": "success", "checksum": "crc32:xyz"}),
        json!({"token": token, "state": "success", "output": {"bytesize": -1}}),
        json!({"token": token, "state": "success", "output": "big"}),
    ] {
        let r = put_state(&server, id, bad.clone()).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }
    assert_eq!(job_status(&server, id).await, "running");
    assert_eq!(
        patch_trace(&server, id, &token, Some("5-10"), " world")
            .await
            .status(),
        202
    );
    let r = put_state(&server, id, final_update).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["job-status"], "success");
    assert_eq!(job_status(&server, id).await, "success");

    // The top-level checksum alone, form-encoded the way Grape takes it, without the prefix.
    let (id, token) = take(&server, &agent, "form").await;
    patch_trace(&server, id, &token, Some("0-2"), "abc").await;
    let form = |checksum: String| {
        server
            .http
            .put(v4(&server, &format!("/jobs/{id}")))
            .form(&[
                ("token", token.clone()),
                ("state", "failed".into()),
                ("checksum", checksum),
                ("failure_reason", "script_failure".into()),
            ])
            .send()
    };
    let wrong = format!("{:08x}", crc32fast::hash(b"abcd"));
    assert_eq!(form(wrong).await.unwrap().status(), 202);
    let right = format!("{:08x}", crc32fast::hash(b"abc"));
    assert_eq!(form(right).await.unwrap().status(), 200);
    let job: Value = server
        .get(&format!("/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failureReason"], "script_failure");

    // The whole size arrived but the bytes differ: waiting cannot mend it, so it is taken.
    let (id, token) = take(&server, &agent, "corrupt").await;
    patch_trace(&server, id, &token, Some("0-2"), "abc").await;
    let r = put_state(
        &server,
        id,
        json!({"token": token, "state": "success",
               "output": {"checksum": crc("xyz"), "bytesize": 3}}),
    )
    .await;
    assert_eq!(r.status(), 200);

    // The rest never comes: after trace_accept_timeout the final state is taken anyway.
    let (id, token) = take(&server, &agent, "gave-up").await;
    patch_trace(&server, id, &token, Some("0-2"), "abc").await;
    let hopeful = json!({"token": token, "state": "success",
                         "output": {"checksum": crc("abcdef"), "bytesize": 6}});
    assert_eq!(put_state(&server, id, hopeful.clone()).await.status(), 202);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(put_state(&server, id, hopeful).await.status(), 200);
    assert_eq!(job_status(&server, id).await, "success");

    // After a restart the checksum comes from the trace file.
    let (id, token) = take(&server, &agent, "restarted").await;
    patch_trace(&server, id, &token, Some("0-3"), "abcd").await;
    server.restart();
    patch_trace(&server, id, &token, Some("4-5"), "ef").await;
    let update = |text: &str| json!({"token": token, "state": "success", "checksum": crc(text)});
    assert_eq!(
        put_state(&server, id, update("abcdefg")).await.status(),
        202
    );
    assert_eq!(put_state(&server, id, update("abcdef")).await.status(), 200);
    assert_eq!(job_status(&server, id).await, "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_age_holds_young_jobs_back() {
    let server = Server::start_with(Options {
        config_yaml: Some(
            "registration_token: reg\njob_request_poll_seconds: 40\nbuiltin_agent: false\n".into(),
        ),
        ..Options::default()
    });
    let patient = register(&server, json!({})).await;
    let ask = |job_age: Value| {
        server
            .http
            .post(v4(&server, "/jobs/request"))
            .json(&json!({"token": patient, "job_age": job_age}))
            .send()
    };
    assert_eq!(ask(json!("soon")).await.unwrap().status(), 400);

    let job = submit(&server, json!({"name": "aged", "script": ["true"]})).await;
    let id = job["id"].as_i64().unwrap();
    // Too young for an hour's age: the poll holds on and the job stays pending.
    let held = tokio::time::timeout(std::time::Duration::from_secs(2), ask(json!(3600))).await;
    assert!(
        held.is_err(),
        "answered: {:?}",
        held.map(|r| r.map(|r| r.status()))
    );
    assert_eq!(job_status(&server, id).await, "pending");
    // Five seconds: nothing else changes in the queue, so only the poll waking up when the
    // job is old enough answers this well before the 40 s poll ends.
    let r = tokio::time::timeout(std::time::Duration::from_secs(25), ask(json!(5)))
        .await
        .expect("the poll did not wake up when the job came of age")
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id);
    let age: Value = server
        .get(&format!("/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    let waited = age["startedAt"].as_u64().unwrap() - age["createdAt"].as_u64().unwrap();
    assert!(waited >= 4, "taken after {waited} s");
}

/// GitLab answers 409 when a job cannot be given to the agent that asked; trident does
/// when it cannot store the assignment. The job stays queued and the next request gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_that_cannot_be_stored_is_a_conflict_and_the_job_stays_queued() {
    let server = Server::start_with(Options {
        config_yaml: Some(
            "registration_token: reg\njob_request_poll_seconds: 0\nbuiltin_agent: false\n".into(),
        ),
        ..Options::default()
    });
    let agent = register(&server, json!({})).await;
    let id = submit(&server, json!({"name": "x", "script": ["true"]})).await["id"]
        .as_i64()
        .unwrap();

    // Make the database refuse to mark any job running (a real SQLite failure).
    let db = rusqlite::Connection::open(server.data_dir.join("trident.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_assignments BEFORE UPDATE ON ci_job_states
         WHEN json_extract(NEW.state, '$.status') = 'running'
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    let (status, _, body) = request_job(&server, &agent).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(job_status(&server, id).await, "pending");

    db.execute_batch("DROP TRIGGER refuse_assignments").unwrap();
    let (status, _, payload) = request_job(&server, &agent).await;
    assert_eq!(status, 201);
    assert_eq!(payload["id"], id);
    assert_eq!(job_status(&server, id).await, "running");
}
