//! A real agent against a running trident: the `gitlab-runner` crate from crates.io, which
//! custom GitLab runners are built on. It takes the payload, runs the steps through a
//! handler, streams the trace, uploads and downloads artifacts, sees cancellations and
//! reports the state, all over trident's `/api/v4`.
//!
//! The handler here is a tiny interpreter (no sandbox: the point is the protocol), so a
//! job's script says what the agent does:
//! `echo WORDS` (with `$VARIABLES`), `write PATH TEXT` (a file to upload), `false`,
//! `show-dependencies`, `until-cancelled`, `stale-trace`.

mod common;

use std::borrow::Cow;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gitlab::{submit_id as submit, wait_finished_within};
use common::{Options, Server};
use gitlab_runner::job::Job;
use gitlab_runner::{
    CancellableJobHandler, GitlabLayer, JobResult, Phase, Runner, RunnerBuilder, UploadableFile,
};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// What the agent saw, for the test to check.
#[derive(Default, Debug)]
struct Seen {
    steps: Vec<(String, Vec<String>)>,
    saw_cancel: bool,
    cleaned_up: bool,
    stale_trace_answer: Option<(u16, String)>,
}

struct MemoryFile {
    path: String,
    data: Vec<u8>,
}

#[async_trait::async_trait]
impl UploadableFile for MemoryFile {
    type Data<'a> = &'a [u8];

    fn get_path(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.path)
    }

    async fn get_data(&self) -> Result<Self::Data<'_>, ()> {
        Ok(&self.data)
    }
}

struct Interpreter {
    job: Job,
    files: Vec<(String, String)>,
    seen: Arc<Mutex<Seen>>,
}

impl Interpreter {
    fn expand(&self, words: &str) -> String {
        words
            .split(' ')
            .map(|word| match word.strip_prefix('$') {
                Some(name) => self
                    .job
                    .variable(name)
                    .map(|v| v.value().to_string())
                    .unwrap_or_default(),
                None => word.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn variable(&self, name: &str) -> String {
        self.job
            .variable(name)
            .unwrap_or_else(|| panic!("the payload has no {name}"))
            .value()
            .to_string()
    }

    async fn show_dependencies(&self) -> JobResult {
        for dependency in self.job.dependencies() {
            let mut artifact = dependency.download().await.map_err(|_| ())?.ok_or(())?;
            let names: Vec<String> = artifact.file_names().map(str::to_string).collect();
            for name in names {
                let mut text = String::new();
                artifact
                    .file(&name)
                    .ok_or(())?
                    .read_to_string(&mut text)
                    .map_err(|_| ())?;
                self.job
                    .trace(format!("{} gave {name}: {text}\n", dependency.name()));
            }
        }
        Ok(())
    }

    /// Plays an agent whose trace PATCH reached trident but whose answer got lost: it
    /// appends with the job token behind the crate's back, sends that chunk again from the
    /// old offset (416 with the real end in `Range`) and resumes from there.
    async fn stale_trace(&self) -> JobResult {
        let url = format!(
            "{}/jobs/{}/trace",
            self.variable("CI_API_V4_URL"),
            self.job.id()
        );
        let token = self.variable("CI_JOB_TOKEN");
        let http = reqwest::Client::new();
        let patch = |range: String, body: &'static str| {
            http.patch(&url)
                .header("JOB-TOKEN", &token)
                .header("Content-Range", range)
                .body(body)
                .send()
        };
        let first = "a chunk whose answer was lost\n";
        let r = patch(format!("0-{}", first.len() - 1), first)
            .await
            .map_err(|_| ())?;
        assert_eq!(r.status(), 202);
        let r = patch(format!("0-{}", first.len() - 1), first)
            .await
            .map_err(|_| ())?;
        let status = r.status().as_u16();
        let range = r.headers()["range"].to_str().unwrap().to_string();
        self.seen.lock().unwrap().stale_trace_answer = Some((status, range.clone()));
        let end: usize = range.split('-').nth(1).unwrap().parse().unwrap();
        let rest = "resumed where trident said\n";
        let r = patch(format!("{end}-{}", end + rest.len() - 1), rest)
            .await
            .map_err(|_| ())?;
        assert_eq!(r.status(), 202);
        Ok(())
    }
}

#[async_trait::async_trait]
impl CancellableJobHandler<MemoryFile> for Interpreter {
    async fn step(
        &mut self,
        script: &[String],
        phase: Phase,
        cancel: &CancellationToken,
    ) -> JobResult {
        self.seen
            .lock()
            .unwrap()
            .steps
            .push((format!("{phase:?}"), script.to_vec()));
        for line in script {
            self.job.trace(format!("$ {line}\n"));
            let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
            match command {
                "echo" => self.job.trace(format!("{}\n", self.expand(rest))),
                "write" => {
                    let (path, text) = rest.split_once(' ').unwrap();
                    self.files.push((path.to_string(), text.to_string()));
                }
                "false" => return Err(()),
                "show-dependencies" => self.show_dependencies().await?,
                "stale-trace" => self.stale_trace().await?,
                "until-cancelled" => {
                    // Keep output flowing so that the crate sends trace chunks: trident's
                    // answer to one of them carries the cancellation.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !cancel.is_cancelled() && Instant::now() < deadline {
                        self.job.trace("tick\n");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    self.seen.lock().unwrap().saw_cancel = cancel.is_cancelled();
                    return Err(());
                }
                other => panic!("the interpreter has no command {other:?}"),
            }
        }
        Ok(())
    }

    async fn get_uploadable_files(
        &mut self,
    ) -> Result<Box<dyn Iterator<Item = MemoryFile> + Send>, ()> {
        let files: Vec<MemoryFile> = self
            .files
            .iter()
            .map(|(path, text)| MemoryFile {
                path: path.clone(),
                data: text.as_bytes().to_vec(),
            })
            .collect();
        Ok(Box::new(files.into_iter()))
    }

    async fn cleanup(&mut self) {
        self.seen.lock().unwrap().cleaned_up = true;
    }
}

struct Agent {
    runner: Runner,
    _build_dir: tempfile::TempDir,
}

/// Registers over HTTP (the crate takes an existing token) and builds a crate runner.
async fn agent(server: &Server, tags: &str) -> Agent {
    let r = server
        .http
        .post(format!("http://{}/api/v4/runners", server.address))
        .json(
            &json!({"token": "reg", "tag_list": tags, "run_untagged": tags.is_empty(),
                      "description": "gitlab-runner crate"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let build_dir = tempfile::tempdir().unwrap();
    // Output goes through `Job::trace`; the layer only supplies the crate's list of jobs
    // (one per agent, since every test server numbers its jobs from 1).
    let (_layer, jobs) = GitlabLayer::new::<tracing_subscriber::Registry>();
    let url = url::Url::parse(&format!("http://{}/", server.address)).unwrap();
    let runner = RunnerBuilder::new(url, token, build_dir.path(), jobs)
        .system_id("s_tridenttest")
        .version("0.3.2")
        .build()
        .await;
    Agent {
        runner,
        _build_dir: build_dir,
    }
}

impl Agent {
    /// Takes one job (which must be queued already) and runs it in the background.
    async fn take_job(&mut self) -> Arc<Mutex<Seen>> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let for_handler = seen.clone();
        let took = self
            .runner
            .request_job(move |job| async move {
                Ok(Interpreter {
                    job,
                    files: Vec::new(),
                    seen: for_handler,
                })
            })
            .await
            .expect("the crate could not take trident's job payload");
        assert!(took, "no job for the agent");
        seen
    }
}

fn server() -> Server {
    Server::start_with(Options {
        // No built-in agent: the crate agent is the only one. Short polls keep an
        // unanswered request from holding the test up.
        config_yaml: Some(
            "registration_token: reg\nbuiltin_agent: false\njob_request_poll_seconds: 1\n".into(),
        ),
        ..Options::default()
    })
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crate_runs_a_job_and_a_dependant_gets_its_artifacts() {
    let server = server();
    let mut agent = agent(&server, "").await;

    let build = submit(
        &server,
        json!({"name": "build", "script": ["echo greeting: $GREETING", "echo job $CI_JOB_ID git $GIT_STRATEGY",
                                           "write out/report.txt all green",
                                           "write scratch.txt not an artifact"],
               "afterScript": ["echo after $GREETING"], "variables": {"GREETING": "hello"},
               "artifacts": {"paths": ["out/"], "expireIn": "1 day"}}),
    )
    .await;
    let seen = agent.take_job().await;
    let (job, trace) = wait_finished_within(&server, build, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "success", "{job}\n{trace}");
    assert_eq!(
        trace,
        format!(
            "$ echo greeting: $GREETING\ngreeting: hello\n$ echo job $CI_JOB_ID git $GIT_STRATEGY\njob {build} git none\n\
             $ write out/report.txt all green\n$ write scratch.txt not an artifact\n\
             $ echo after $GREETING\nafter hello\n"
        )
    );
    wait_until("cleanup", || seen.lock().unwrap().cleaned_up).await;
    let steps = seen.lock().unwrap().steps.clone();
    assert_eq!(steps[0].0, "Script");
    assert_eq!(
        steps[1],
        ("AfterScript".into(), vec!["echo after $GREETING".into()])
    );

    // The crate zipped what matched artifacts.paths and trident kept it, with its expiry.
    let archive = &job["uploadedArtifacts"]["archive"];
    assert_eq!(archive["format"], "zip", "{job}");
    let expires = archive["expireAt"].as_u64().unwrap() - job["finishedAt"].as_u64().unwrap();
    assert!((86_000..=86_400).contains(&expires), "{expires}");
    let zip = server
        .get(&format!("/jobs/{build}/artifacts"))
        .await
        .bytes()
        .await
        .unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    assert_eq!(names, vec!["out/report.txt".to_string()]);
    let mut text = String::new();
    zip.by_name("out/report.txt")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "all green");

    // A job that depends on it downloads them with the token in its own payload.
    let test = submit(
        &server,
        json!({"name": "test", "script": ["show-dependencies"], "dependencies": [build]}),
    )
    .await;
    agent.take_job().await;
    let (job, trace) = wait_finished_within(&server, test, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "success", "{job}\n{trace}");
    assert_eq!(
        trace,
        "$ show-dependencies\nbuild gave out/report.txt: all green\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_fails_the_job_and_after_script_still_runs() {
    let server = server();
    let mut agent = agent(&server, "crate").await;
    let id = submit(
        &server,
        json!({"name": "broken", "tags": ["crate"], "script": ["echo before", "false", "echo never"],
               "afterScript": ["echo cleaning up"],
               "artifacts": {"paths": ["*"], "when": "on_success"}}),
    )
    .await;
    agent.take_job().await;
    let (job, trace) = wait_finished_within(&server, id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "failed", "{job}");
    // The crate reports only the state: GitLab calls that an unknown failure.
    assert_eq!(job["failureReason"], "unknown_failure", "{job}");
    assert_eq!(
        trace,
        "$ echo before\nbefore\n$ false\n$ echo cleaning up\ncleaning up\n"
    );
    assert_eq!(
        job["uploadedArtifacts"],
        json!({}),
        "on_success: nothing uploaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crate_sees_a_cancellation_in_trident_s_answer() {
    let server = server();
    let mut agent = agent(&server, "").await;
    let id = submit(
        &server,
        json!({"name": "forever", "script": ["until-cancelled"]}),
    )
    .await;
    let seen = agent.take_job().await;

    // Wait for the first trace chunk (the crate sends one every 3 seconds) and cancel.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job: Value = server
            .get(&format!("/jobs/{id}"))
            .await
            .json()
            .await
            .unwrap();
        if job["traceSize"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no trace arrived: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = server
        .send(Method::POST, &format!("/jobs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(r.status(), 200);

    wait_until("the agent to stop the job", || {
        let seen = seen.lock().unwrap();
        seen.saw_cancel && seen.cleaned_up
    })
    .await;
    let (job, trace) = wait_finished_within(&server, id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "canceled");
    assert!(trace.starts_with("$ until-cancelled\ntick\n"), "{trace}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_trace_offset_gets_416_with_the_end_to_resume_from() {
    let server = server();
    let mut agent = agent(&server, "").await;
    let id = submit(
        &server,
        json!({"name": "flaky-network", "script": ["stale-trace"]}),
    )
    .await;
    let seen = agent.take_job().await;
    let (job, trace) = wait_finished_within(&server, id, Duration::from_secs(60)).await;

    let first = "a chunk whose answer was lost\n";
    assert_eq!(
        seen.lock().unwrap().stale_trace_answer,
        Some((416, format!("0-{}", first.len())))
    );
    // The crate's own buffered output ("$ stale-trace\n") went out from offset 0 after the
    // handler had moved the end: trident refused it with 416 rather than overwrite or
    // interleave, and the crate (which has no 416 handling) drops such a chunk. What the
    // resuming writer sent is intact, and the job still ends with the agent's state.
    assert_eq!(trace, format!("{first}resumed where trident said\n"));
    assert_eq!(job["status"], "success");
}
