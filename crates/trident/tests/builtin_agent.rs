//! The built-in agent runs jobs on the local sandbox: scripts, variables, files,
//! after_script, failures, time limits and cancellation, reported like any agent's.

mod common;

use std::time::{Duration, Instant};

use common::gitlab::{submit_id as submit, wait_finished};
use common::{b64, Server};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_agent_runs_jobs_in_sandbox_runners() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;

    let ok = submit(
        &server,
        json!({"name": "greet", "executionEnvironmentId": 1,
               "script": ["echo hello $GREETING", "cat input.txt", "id -un",
                          "echo \"job=$CI_JOB_ID url=$CI_JOB_URL dir=$CI_PROJECT_DIR tags=$CI_RUNNER_TAGS\""],
               "afterScript": ["echo cleanup"], "variables": {"GREETING": "world"},
               "files": [{"path": "input.txt", "content": b64("from a file")}]}),
    )
    .await;
    let failing = submit(
        &server,
        json!({"name": "fail", "image": "host", "script": ["echo before", "false", "echo never"]}),
    )
    .await;
    let slow = submit(
        &server,
        json!({"name": "slow", "executionEnvironmentId": 1, "script": ["sleep 30"], "timeout": 1}),
    )
    .await;
    let unknown = submit(
        &server,
        json!({"name": "odd", "image": "no-such-image", "script": ["true"]}),
    )
    .await;

    let (job, trace) = wait_finished(&server, ok).await;
    assert_eq!(job["status"], "success", "{job} {trace}");
    assert_eq!(job["exitCode"], 0);
    assert_eq!(job["agentId"], 0, "the built-in agent");
    // The same predefined variables an external agent gets in its payload.
    let variables = format!(
        "job={ok} url=http://{}/api/v1/jobs/{ok} dir=/workspace tags=[]",
        server.address
    );
    for expected in ["hello world", "from a file", "user", "cleanup", &variables] {
        assert!(
            trace.contains(expected),
            "{expected} missing from {trace:?}"
        );
    }
    assert_eq!(job["traceSize"].as_u64().unwrap() as usize, trace.len());

    let (job, trace) = wait_finished(&server, failing).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["exitCode"], 1);
    assert_eq!(job["failureReason"], "script_failure");
    // Like GitLab's shell: each command shown right before its output, nothing after the
    // failing one.
    assert!(
        trace.ends_with("$ echo before\r\nbefore\r\n$ false\r\n"),
        "{trace:?}"
    );

    let (job, _) = wait_finished(&server, slow).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failureReason"], "job_execution_timeout");

    let (job, trace) = wait_finished(&server, unknown).await;
    assert_eq!(job["failureReason"], "runner_system_failure");
    assert!(trace.contains("no-such-image"), "{trace:?}");

    // Cancellation kills the job's processes.
    let cancel = submit(
        &server,
        json!({"name": "long", "executionEnvironmentId": 1, "script": ["echo started", "sleep 1013"]}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let trace = server
            .get(&format!("/jobs/{cancel}/trace"))
            .await
            .text()
            .await
            .unwrap();
        if trace.contains("started") {
            break;
        }
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = server
        .send(Method::POST, &format!("/jobs/{cancel}/cancel"), Value::Null)
        .await;
    assert_eq!(r.status(), 200);
    let (job, _) = wait_finished(&server, cancel).await;
    assert_eq!(job["status"], "canceled");
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::host_processes("sleep\u{0}1013") > 0 {
        assert!(
            Instant::now() < deadline,
            "a cancelled job's process lives on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Jobs for tags the built-in agent lacks wait for an agent that has them.
    let tagged = submit(
        &server,
        json!({"name": "gpu", "image": "host", "script": ["true"], "tags": ["gpu"]}),
    )
    .await;
    let after = submit(
        &server,
        json!({"name": "after", "image": "host", "script": ["true"]}),
    )
    .await;
    let (job, _) = wait_finished(&server, after).await;
    assert_eq!(job["status"], "success");
    let waiting: Value = server
        .get(&format!("/jobs/{tagged}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(waiting["status"], "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_crashed_server_fail_instead_of_running_for_ever() {
    let mut server = Server::start();
    server.put_environment(2, 1, 256).await;
    let id = submit(
        &server,
        json!({"name": "long", "executionEnvironmentId": 2, "script": ["echo started", "sleep 1014"]}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server
        .get(&format!("/jobs/{id}/trace"))
        .await
        .text()
        .await
        .unwrap()
        .contains("started")
    {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.crash_and_restart();
    let (job, _) = wait_finished(&server, id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failureReason"], "runner_system_failure");
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::host_processes("sleep\u{0}1014") > 0 {
        assert!(
            Instant::now() < deadline,
            "the job's process outlived its server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_flow_from_a_job_to_the_jobs_that_depend_on_it() {
    let server = Server::start();
    server.put_environment(3, 1, 256).await;
    let build = submit(
        &server,
        json!({"name": "build", "executionEnvironmentId": 3,
               "script": ["mkdir -p out/deep", "echo built > out/deep/result.txt", "echo top > top.txt"],
               "artifacts": {"paths": ["out/", "top.txt", "missing/"], "expireIn": "1 week"}}),
    )
    .await;
    let (job, trace) = wait_finished(&server, build).await;
    assert_eq!(job["status"], "success", "{trace}");
    let r = server.get(&format!("/jobs/{build}/artifacts")).await;
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let mut names: Vec<String> = (0..archive.len())
        .map(|i| archive.by_index(i).unwrap().name().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["out/deep/result.txt", "top.txt"]);

    let test = submit(
        &server,
        json!({"name": "test", "executionEnvironmentId": 3, "dependencies": [build],
               "script": ["cat out/deep/result.txt top.txt"]}),
    )
    .await;
    let (job, trace) = wait_finished(&server, test).await;
    assert_eq!(job["status"], "success", "{trace}");
    assert!(trace.contains("built\r\ntop\r\n"), "{trace:?}");

    // `when` decides: failed jobs keep artifacts only when asked to.
    let kept = submit(
        &server,
        json!({"name": "k", "executionEnvironmentId": 3, "script": ["echo log > log.txt", "false"],
               "artifacts": {"paths": ["log.txt"], "when": "on_failure"}}),
    )
    .await;
    let dropped = submit(
        &server,
        json!({"name": "d", "executionEnvironmentId": 3, "script": ["echo log > log.txt", "false"],
               "artifacts": {"paths": ["log.txt"]}}),
    )
    .await;
    assert_eq!(wait_finished(&server, kept).await.0["status"], "failed");
    assert_eq!(wait_finished(&server, dropped).await.0["status"], "failed");
    assert_eq!(
        server
            .get(&format!("/jobs/{kept}/artifacts"))
            .await
            .status(),
        200
    );
    assert_eq!(
        server
            .get(&format!("/jobs/{dropped}/artifacts"))
            .await
            .status(),
        404
    );
}

/// A zip an agent uploads is stored and served byte for byte and never unpacked on the
/// host; when the built-in agent hands it to a dependant, entries that would leave the
/// workspace (`../`, absolute) and symlinks are left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_artifacts_are_kept_as_sent_and_never_unpacked_on_the_host() {
    use std::io::Write;
    let server = Server::start_with(common::Options {
        config_yaml: Some("registration_token: reg\njob_request_poll_seconds: 0\n".into()),
        ..common::Options::default()
    });
    server.put_environment(4, 1, 256).await;
    let v4 = |path: &str| format!("http://{}/api/v4{path}", server.address);

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, text) in [
        ("../../escape-trident-test.txt", "out"),
        ("/escape-trident-test.txt", "abs"),
        ("ok.txt", "fine"),
    ] {
        zip.start_file(name, options).unwrap();
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.add_symlink("link", "/etc/shadow", options).unwrap();
    let hostile = zip.finish().unwrap().into_inner();

    // An external agent (tagged, so the built-in agent leaves the job alone) uploads it.
    let r = server
        .http
        .post(v4("/runners"))
        .json(&json!({"token": "reg", "tag_list": ["external"], "run_untagged": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let agent = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let build = submit(
        &server,
        json!({"name": "hostile", "tags": ["external"], "script": ["true"],
               "artifacts": {"paths": ["*"]}}),
    )
    .await;
    let r = server
        .http
        .post(v4("/jobs/request"))
        .json(&json!({"token": agent}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(hostile.clone()).file_name("artifacts.zip"),
        )
        .text("artifact_type", "archive")
        .text("artifact_format", "zip");
    let r = server
        .http
        .post(v4(&format!("/jobs/{build}/artifacts")))
        .header("JOB-TOKEN", &token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = server
        .http
        .put(v4(&format!("/jobs/{build}")))
        .json(&json!({"token": token, "state": "success"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let served = server.get(&format!("/jobs/{build}/artifacts")).await;
    assert_eq!(served.status(), 200);
    assert_eq!(served.bytes().await.unwrap().as_ref(), hostile.as_slice());

    // The built-in agent gives a dependant only what stays inside its workspace.
    let test = submit(
        &server,
        json!({"name": "test", "executionEnvironmentId": 4, "dependencies": [build],
               "script": ["cat ok.txt", "test ! -e link", "test ! -e ../escape-trident-test.txt",
                          "test ! -e /escape-trident-test.txt", "ls -A | wc -l"]}),
    )
    .await;
    let (job, trace) = wait_finished(&server, test).await;
    assert_eq!(job["status"], "success", "{trace}");
    assert!(trace.contains("fine"), "{trace:?}");
    assert!(
        trace.contains("\n1\r\n"),
        "only ok.txt in the workspace: {trace:?}"
    );

    // Nothing was written on the host, wherever a careless unpacker would have put it.
    let tmp = server.data_dir.parent().unwrap();
    for dir in [
        std::path::Path::new("/"),
        tmp,
        &server.data_dir,
        &server.data_dir.join("artifacts"),
    ] {
        assert!(!dir.join("escape-trident-test.txt").exists(), "{dir:?}");
        assert!(!dir.join("link").exists(), "{dir:?}");
    }
}

/// A zip bomb among a dependency's artifacts never inflates in the server's memory: entries
/// stream into the runner, and an archive that inflates beyond what the runner can hold is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_bomb_in_a_dependency_is_refused_without_inflating_on_the_host() {
    let server = Server::start_with(common::Options {
        config_yaml: Some("registration_token: reg\njob_request_poll_seconds: 0\n".into()),
        ..common::Options::default()
    });
    server.put_environment(1, 1, 128).await;
    let tmp = tempfile::tempdir().unwrap();
    let bomb = tmp.path().join("bomb.zip");
    // 200 MB of zeros in one entry, a few hundred KB on disk (python's zlib is quick).
    let made = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import zipfile\nz = zipfile.ZipFile({:?}, 'w', zipfile.ZIP_DEFLATED)\nw = z.open('zeros', 'w', force_zip64=True)\nchunk = bytes(1 << 20)\nfor _ in range(200): w.write(chunk)\nw.close(); z.close()",
            bomb.display().to_string()
        ))
        .status()
        .unwrap();
    assert!(made.success());
    let bomb = std::fs::read(&bomb).unwrap();
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());

    let agent = common::gitlab::register(
        &server,
        json!({"tag_list": ["external"], "run_untagged": false}),
    )
    .await;
    let (status, _, payload) = {
        let id = submit(
            &server,
            json!({"name": "bomb", "tags": ["external"], "script": ["true"]}),
        )
        .await;
        let answer = common::gitlab::request_job(&server, &agent).await;
        assert_eq!(answer.2["id"], id);
        answer
    };
    assert_eq!(status, 201);
    let bomb_job = payload["id"].as_i64().unwrap();
    let token = payload["token"].as_str().unwrap().to_string();
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bomb).file_name("artifacts.zip"),
    );
    let r = server
        .http
        .post(common::gitlab::v4(
            &server,
            &format!("/jobs/{bomb_job}/artifacts"),
        ))
        .header("JOB-TOKEN", &token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = common::gitlab::put_state(
        &server,
        bomb_job,
        json!({"token": token, "state": "success"}),
    )
    .await;
    assert_eq!(r.status(), 200);

    let rss_before = server.rss_kib();
    let victim = submit(
        &server,
        json!({"name": "victim", "script": ["ls -l"], "executionEnvironmentId": 1,
               "dependencies": [bomb_job]}),
    )
    .await;
    let (job, trace) = wait_finished(&server, victim).await;
    assert_eq!(job["status"], "failed", "{trace}");
    assert_eq!(job["failureReason"], "runner_system_failure");
    assert!(trace.contains("inflate to more than"), "{trace}");
    let grown = server.rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "the server grew by {grown} KiB");
}
