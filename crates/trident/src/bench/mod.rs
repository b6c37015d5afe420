//! `trident bench`: measures a running server end to end over HTTP and WebSocket, each figure
//! beside a baseline measured on this machine in the same run, so that the ratios mean
//! something on a noisy box. One module per suite:
//!
//! - `sandbox`: claim from a warm pool, the execute round trip, beside a local fork+exec and
//!   a local `bash -c true` (their difference is trident's own cost per execution);
//! - `load`: N concurrent clients, each executing `true` in its own runner for a fixed time,
//!   beside N concurrent local `bash -c true` loops;
//! - `scale`: prewarming N runners (rate, memory per idle runner), claims and executions with
//!   N idle against 10 idle, teardown;
//! - `learners`: a CodeOcean-shaped flow (claim, copy 5 files, `python3`, list, delete);
//! - `files`: PATCH of 10 small files, an 8 MiB copy and a 64 MiB download beside a local `cp`;
//! - `jobs`: the GitLab Runner API (pickup, idle pollers, trace appends) against `GET /version`;
//! - `docker`: a raw Docker Engine exec of `true`, when a Docker socket is there;
//! - `images`: pull + unpack from a registry on loopback beside `skopeo copy`, and runner
//!   creation from a multi-layer image beside `host`.
//!
//! With `--json` the tables go to stderr and stdout gets one JSON object of the figures.

mod docker;
mod files;
mod images;
mod jobs;
mod learners;
mod load;
mod sandbox;
mod scale;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Base URL of the server
    #[arg(long, default_value = "http://127.0.0.1:7200")]
    url: String,
    /// Poseidon-Token, if the server requires one
    #[arg(long, env = "TRIDENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Iterations per latency measurement
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    /// First environment id used; each suite takes its own id from there (created, then
    /// deleted)
    #[arg(long, default_value_t = 987_654)]
    environment: u64,
    /// Image of those environments
    #[arg(long, default_value = "host")]
    image: String,
    /// Suites to run, comma-separated: sandbox, load, scale, learners, files, jobs, docker,
    /// or all
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    suite: Vec<Suite>,
    /// The server's registration token, for the jobs suite's agents
    #[arg(long, env = "TRIDENT_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
    /// Agents long-polling for jobs that never come, during the jobs suite
    #[arg(long, default_value_t = 1000)]
    idle_agents: usize,
    /// Concurrent clients of the load suite (one runner each) and learners of the learners
    /// suite
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// How long the load and learners suites (and their baselines) run, in seconds
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Runners the scale suite prewarms (the server's max_pool_size must allow it)
    #[arg(long, default_value_t = 1000)]
    runners: usize,
    /// Image the docker suite runs its container from (it is never pulled)
    #[arg(long, default_value = "debian:stable-slim")]
    docker_image: String,
    /// Loopback port of the registry the images suite starts (the server must list
    /// 127.0.0.1:<port> in insecure_registries)
    #[arg(long, default_value_t = 5099)]
    registry_port: u16,
    /// Runners the images suite makes of each image
    #[arg(long, default_value_t = 20)]
    image_runners: usize,
    /// Print one JSON object of the measured figures on stdout (the tables go to stderr)
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Suite {
    Sandbox,
    Load,
    Scale,
    Learners,
    Files,
    Jobs,
    Docker,
    Images,
    All,
}

impl BenchArgs {
    fn runs(&self, suite: Suite) -> bool {
        self.suite.contains(&suite) || self.suite.contains(&Suite::All)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.1))
    }
}

/// What a run prints: tables (stdout, or stderr under `--json`) and the figures for `--json`.
pub(crate) struct Report {
    json: bool,
    figures: BTreeMap<&'static str, Value>,
}

impl Report {
    pub fn say(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    pub fn figure(&mut self, key: &'static str, value: f64) {
        // Three decimals are more than any of these figures can mean.
        let rounded = (value * 1000.0).round() / 1000.0;
        self.figures.insert(key, json!(rounded));
    }

    pub fn figure_ms(&mut self, key: &'static str, d: Duration) {
        self.figure(key, d.as_secs_f64() * 1000.0);
    }

    pub fn table(&self, title: &str, rows: &[Row], ratio_note: &str) {
        self.say(&table(title, rows, ratio_note));
    }
}

pub(crate) struct Client {
    pub http: reqwest::Client,
    pub base: String,
    token: Option<String>,
}

impl Client {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base));
        match &self.token {
            Some(t) => r.header("Poseidon-Token", t),
            None => r,
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let mut request = self.request(method, path);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{path}: {status} {text}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    pub async fn claim(&self, env: u64) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/runners",
                json!({"executionEnvironmentId": env}),
            )
            .await?;
        Ok(v["runnerId"].as_str().context("no runnerId")?.to_string())
    }

    pub async fn delete_runner(&self, runner: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/runners/{runner}"),
            Value::Null,
        )
        .await
        .map(drop)
    }

    /// A PATCH of files with a body serialized once beforehand (`json_body`): the client's
    /// own JSON encoding of a large copy is not the server's cost, and would otherwise be
    /// timed with it at every round.
    pub async fn patch_files(&self, runner: &str, body: &JsonBody) -> anyhow::Result<()> {
        let path = format!("/runners/{runner}/files");
        let response = self
            .request(reqwest::Method::PATCH, &path)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.0.clone())
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await?;
            bail!("{path}: {status} {text}");
        }
        response.bytes().await?;
        Ok(())
    }

    pub async fn list_files(&self, runner: &str) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::GET,
            &format!("/runners/{runner}/files?recursive=true"),
            Value::Null,
        )
        .await
    }

    /// POST execute → WebSocket → read until the terminal message; also returns stdout.
    pub async fn execute_output(
        &self,
        runner: &str,
        command: &str,
    ) -> anyhow::Result<(Value, String)> {
        let (end, stdout, _) = self.execute_phases(runner, command).await?;
        Ok((end, stdout))
    }

    /// `execute_output`, with the instants each phase ended at: the POST answered, the
    /// WebSocket upgraded, `start` read, the terminal message read.
    pub async fn execute_phases(
        &self,
        runner: &str,
        command: &str,
    ) -> anyhow::Result<(Value, String, [Instant; 4])> {
        let now = Instant::now();
        let mut phases = [now; 4];
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/runners/{runner}/execute"),
                json!({"command": command}),
            )
            .await?;
        phases[0] = Instant::now();
        let url = v["websocketUrl"].as_str().context("no websocketUrl")?;
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
        if let Some(t) = &self.token {
            request.headers_mut().insert("Poseidon-Token", t.parse()?);
        }
        // A small read buffer: the default 128 KiB is allocated zeroed per connection, which
        // would make the load generator heavier than what it measures.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4 * 1024);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
        phases[1] = Instant::now();
        let mut stdout = String::new();
        while let Some(message) = ws.next().await {
            if let Message::Text(text) = message? {
                let v: Value = serde_json::from_str(&text)?;
                match v["type"].as_str() {
                    Some("start") => phases[2] = Instant::now(),
                    Some("exit" | "timeout" | "error") => {
                        phases[3] = Instant::now();
                        return Ok((v, stdout, phases));
                    }
                    Some("stdout") => stdout.push_str(v["data"].as_str().unwrap_or_default()),
                    _ => {}
                }
            }
        }
        bail!("the WebSocket closed without a terminal message")
    }

    /// An execution that must exit 0.
    pub async fn execute_ok(&self, runner: &str, command: &str) -> anyhow::Result<()> {
        let (end, _) = self.execute_output(runner, command).await?;
        if end != json!({"type": "exit", "data": 0}) {
            bail!("`{command}` ended with {end}");
        }
        Ok(())
    }

    pub async fn idle_runners(&self, env: u64) -> anyhow::Result<u64> {
        let stats = self
            .call(
                reqwest::Method::GET,
                "/statistics/execution-environments",
                Value::Null,
            )
            .await?;
        Ok(stats[env.to_string()]["idleRunners"]
            .as_u64()
            .unwrap_or_default())
    }
}

/// An environment a suite made for itself; `delete` removes it with all its runners.
pub(crate) struct Environment<'a> {
    pub client: &'a Client,
    pub id: u64,
    image: String,
}

impl<'a> Environment<'a> {
    pub async fn create(
        client: &'a Client,
        id: u64,
        image: &str,
        pool: usize,
    ) -> anyhow::Result<Environment<'a>> {
        let env = Environment {
            client,
            id,
            image: image.to_string(),
        };
        env.resize(pool).await?;
        Ok(env)
    }

    pub async fn resize(&self, pool: usize) -> anyhow::Result<()> {
        let id = self.id;
        self.client
            .call(
                reqwest::Method::PUT,
                &format!("/execution-environments/{id}"),
                json!({"id": id, "image": self.image, "prewarmingPoolSize": pool, "cpuLimit": 0,
                       "memoryLimit": 512, "networkAccess": false, "exposedPorts": []}),
            )
            .await
            .map(drop)
    }

    /// Waits until `count` runners are idle; calls `progress` with each new count seen.
    pub async fn wait_idle(
        &self,
        count: usize,
        timeout: Duration,
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let idle = self.client.idle_runners(self.id).await?;
            progress(idle);
            if idle >= count as u64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "environment {}: only {idle} of {count} runners idle after {timeout:?}",
                    self.id
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn delete(self) {
        let _ = self
            .client
            .call(
                reqwest::Method::DELETE,
                &format!("/execution-environments/{}", self.id),
                Value::Null,
            )
            .await;
    }
}

pub(crate) struct Row {
    name: String,
    samples: Vec<Duration>,
}

impl Row {
    pub fn new(name: &str, samples: Vec<Duration>) -> Row {
        Row::new_owned(name.to_string(), samples)
    }

    pub fn new_owned(name: String, samples: Vec<Duration>) -> Row {
        Row { name, samples }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn p50(&self) -> Duration {
        self.quantile(0.5)
    }

    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    fn quantile(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        percentile(&s, p)
    }
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn table(title: &str, rows: &[Row], ratio_note: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{title} (times in ms)");
    let _ = writeln!(
        out,
        "{:<52} {:>9} {:>9} {:>9} {:>10}",
        "operation", "p50", "p99", "mean", "p50 ratio"
    );
    let baseline = rows.first().map(Row::p50).unwrap_or_default();
    for row in rows {
        let mut s = row.samples.clone();
        s.sort();
        let mean = if s.is_empty() {
            Duration::ZERO
        } else {
            s.iter().sum::<Duration>() / s.len() as u32
        };
        let p50 = percentile(&s, 0.5);
        let _ = writeln!(
            out,
            "{:<52} {:>9} {:>9} {:>9} {:>9.1}x",
            row.name,
            ms(p50),
            ms(percentile(&s, 0.99)),
            ms(mean),
            p50.as_secs_f64() / baseline.as_secs_f64().max(1e-9)
        );
    }
    let _ = writeln!(out, "({ratio_note})");
    out
}

/// CPU time (user + system) this process has used so far.
pub(crate) fn own_cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(usage) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
            };
            tv(usage.user_time()) + tv(usage.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// Cores of this machine (the share of the machine a CPU time is measured against).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A request body serialized once, sent many times (cloning it shares the bytes).
pub struct JsonBody(bytes::Bytes);

impl JsonBody {
    pub fn new(value: &Value) -> anyhow::Result<Self> {
        Ok(Self(serde_json::to_vec(value)?.into()))
    }
}

/// What a runner's execution finds in its environment by default (the sandbox's defaults
/// for `user` and the `host` image, plus CODEOCEAN=true, as the core adds it; HOME is a
/// directory of this host instead of the runner's workspace).
const EXECUTION_ENVIRONMENT: [(&str, &str); 7] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/tmp"),
    ("USER", "user"),
    ("LOGNAME", "user"),
    ("LANG", "C.UTF-8"),
    ("TERM", "xterm"),
    ("CODEOCEAN", "true"),
];

/// One local `bash -c <command>`, timed (a blocking call: run it on a blocking thread).
pub(crate) fn local_bash(command: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let status = std::process::Command::new("bash")
        .args(["-c", command])
        // The environment an execution gets from trident (a locale among it, which bash
        // loads at start), so that the baseline is the same shell with the same work, not
        // whatever the bench's own environment happens to be.
        .env_clear()
        .envs(EXECUTION_ENVIRONMENT.iter().copied())
        .stdin(std::process::Stdio::null())
        .status()
        .context("running bash")?;
    let elapsed = t.elapsed();
    if !status.success() {
        bail!("local `bash -c {command}` failed: {status}");
    }
    Ok(elapsed)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Idle agents, load clients and their runners need a socket each.
    let _ = crate::raise_open_files_limit();
    let client = Client {
        // Many idle agents each hold a connection.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(args.idle_agents.max(args.clients) + 16)
            .tcp_nodelay(true)
            .build()?,
        base: args.url.trim_end_matches('/').to_string(),
        token: args.token.clone(),
    };
    let mut report = Report {
        json: args.json,
        figures: BTreeMap::new(),
    };
    let n = args.iterations.max(1);
    // Each suite has its own environment, so that one suite's pool never serves another.
    let env = |offset: u64| args.environment + offset;
    if args.runs(Suite::Sandbox) {
        sandbox::run(&client, &mut report, env(0), &args.image, n, &args.url).await?;
    }
    if args.runs(Suite::Files) {
        files::run(&client, &mut report, env(1), &args.image, n).await?;
    }
    if args.runs(Suite::Load) {
        load::run(
            &client,
            &mut report,
            env(2),
            &args.image,
            args.clients.max(1),
            args.duration(),
        )
        .await?;
    }
    if args.runs(Suite::Learners) {
        learners::run(
            &client,
            &mut report,
            env(3),
            &args.image,
            args.clients.max(1),
            args.duration(),
        )
        .await?;
    }
    if args.runs(Suite::Scale) {
        scale::run(
            &client,
            &mut report,
            env(4),
            &args.image,
            args.runners.max(1),
            n.min(200),
        )
        .await?;
    }
    if args.runs(Suite::Docker) {
        docker::run(&mut report, &args.docker_image, n).await?;
    }
    if args.runs(Suite::Images) {
        let result = images::run(
            &mut report,
            &client,
            env(5),
            args.registry_port,
            args.image_runners.max(1),
        )
        .await;
        match result {
            Err(e) if !args.suite.contains(&Suite::Images) => {
                report.say(&format!("images suite skipped: {e:#}\n"));
            }
            other => other?,
        }
    }
    if args.runs(Suite::Jobs) {
        match args.registration_token.as_deref() {
            Some(registration_token) => {
                let jobs = jobs::JobsBench {
                    client: &client,
                    registration_token,
                    iterations: n,
                    idle_agents: args.idle_agents,
                };
                jobs.run(&mut report, &args.url).await?;
            }
            None => {
                let why =
                    "the jobs suite registers agents: give --registration-token (the server's)";
                if args.suite.contains(&Suite::Jobs) {
                    bail!("{why}");
                }
                report.say(&format!("jobs suite skipped: {why}\n"));
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.figures)?);
    }
    Ok(())
}
