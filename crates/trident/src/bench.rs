//! `trident bench`: measures a running server end to end over HTTP and WebSocket, and a bare
//! fork+exec on this machine in the same run, so that the ratios mean something on a noisy box.
//! `--suite jobs` measures the GitLab Runner API side (see `bench_jobs.rs`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
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
    /// Iterations per measurement
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    /// Environment id used (created, then deleted)
    #[arg(long, default_value_t = 987_654)]
    environment: u64,
    /// Image of that environment
    #[arg(long, default_value = "host")]
    image: String,
    /// What to measure: the sandbox (claims, files, executions), jobs (the GitLab Runner API:
    /// pickup latency, idle pollers, traces), or all
    #[arg(long, value_enum, default_value_t = Suite::All)]
    suite: Suite,
    /// The server's registration token, for the jobs suite's agents
    #[arg(long, env = "TRIDENT_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
    /// Agents long-polling for jobs that never come, during the jobs suite
    #[arg(long, default_value_t = 1000)]
    idle_agents: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Suite {
    Sandbox,
    Jobs,
    All,
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
        let response = self.request(method, path).json(&body).send().await?;
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

    async fn claim(&self, env: u64) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/runners",
                json!({"executionEnvironmentId": env}),
            )
            .await?;
        Ok(v["runnerId"].as_str().context("no runnerId")?.to_string())
    }

    /// POST execute → WebSocket → read until the terminal message.
    async fn execute(&self, runner: &str, command: &str) -> anyhow::Result<Value> {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/runners/{runner}/execute"),
                json!({"command": command}),
            )
            .await?;
        let url = v["websocketUrl"].as_str().context("no websocketUrl")?;
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
        if let Some(t) = &self.token {
            request.headers_mut().insert("Poseidon-Token", t.parse()?);
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
        while let Some(message) = ws.next().await {
            if let Message::Text(text) = message? {
                let v: Value = serde_json::from_str(&text)?;
                if matches!(v["type"].as_str(), Some("exit" | "timeout" | "error")) {
                    return Ok(v);
                }
            }
        }
        bail!("the WebSocket closed without a terminal message")
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
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Idle agents need a socket each.
    crate::raise_open_files_limit();
    let client = Client {
        // Many idle agents each hold a connection.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(args.idle_agents + 16)
            .build()?,
        base: args.url.trim_end_matches('/').to_string(),
        token: args.token.clone(),
    };
    let n = args.iterations.max(1);
    if args.suite != Suite::Jobs {
        let env = args.environment;
        client
            .call(
                reqwest::Method::PUT,
                &format!("/execution-environments/{env}"),
                json!({"id": env, "image": args.image, "prewarmingPoolSize": 4, "cpuLimit": 0,
                       "memoryLimit": 512, "networkAccess": false, "exposedPorts": []}),
            )
            .await?;
        let result = measure(&client, env, n).await;
        let _ = client
            .call(
                reqwest::Method::DELETE,
                &format!("/execution-environments/{env}"),
                Value::Null,
            )
            .await;
        print_table(
            &format!("trident bench (sandbox): {n} iterations against {}", args.url),
            &result?,
            "ratios against a bare fork+exec of /bin/true on this machine, measured in the same run",
        );
    }
    if args.suite != Suite::Sandbox {
        let Some(registration_token) = args.registration_token.as_deref() else {
            let why = "the jobs suite registers agents: give --registration-token (the server's)";
            if args.suite == Suite::Jobs {
                bail!("{why}");
            }
            println!("jobs suite skipped: {why}");
            return Ok(());
        };
        let jobs = crate::bench_jobs::JobsBench {
            client: &client,
            registration_token,
            iterations: n,
            idle_agents: args.idle_agents,
        };
        let (rows, throughput) = jobs.measure().await?;
        print_table(
            &format!("trident bench (jobs): {n} iterations against {}", args.url),
            &rows,
            "ratios against the plain HTTP round trip of the first row, measured in the same run",
        );
        for t in throughput {
            println!("{:<56} {:>12.1} {}", t.name, t.value, t.unit);
        }
    }
    Ok(())
}

fn print_table(title: &str, rows: &[Row], ratio_note: &str) {
    println!("{title} (times in ms)");
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>12}",
        "operation", "p50", "p99", "mean", "p50 ratio"
    );
    let baseline = {
        let mut s = rows[0].samples.clone();
        s.sort();
        percentile(&s, 0.5)
    };
    for row in rows {
        let mut s = row.samples.clone();
        s.sort();
        let mean = s.iter().sum::<Duration>() / s.len() as u32;
        let p50 = percentile(&s, 0.5);
        println!(
            "{:<48} {:>9} {:>9} {:>9} {:>11.1}x",
            row.name,
            ms(p50),
            ms(percentile(&s, 0.99)),
            ms(mean),
            p50.as_secs_f64() / baseline.as_secs_f64()
        );
    }
    println!("({ratio_note})\n");
}

async fn measure(client: &Client, env: u64, n: usize) -> anyhow::Result<Vec<Row>> {
    let mut baseline = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let status = tokio::process::Command::new("/bin/true").status().await?;
        baseline.push(t.elapsed());
        if !status.success() {
            bail!("/bin/true failed");
        }
    }

    // Wait until the pool is full so that claims measure the warm path.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = client
            .call(
                reqwest::Method::GET,
                "/statistics/execution-environments",
                Value::Null,
            )
            .await?;
        if stats[env.to_string()]["idleRunners"].as_u64() >= Some(4) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut claims = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let runner = client.claim(env).await?;
        claims.push(t.elapsed());
        client
            .call(
                reqwest::Method::DELETE,
                &format!("/runners/{runner}"),
                Value::Null,
            )
            .await?;
    }

    let runner = client.claim(env).await?;
    let files: Vec<Value> = (0..10)
        .map(|i| {
            json!({"path": format!("bench/file{i}.txt"),
                   "content": base64::engine::general_purpose::STANDARD.encode(format!("content {i}\n"))})
        })
        .collect();
    let mut patches = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client
            .call(
                reqwest::Method::PATCH,
                &format!("/runners/{runner}/files"),
                json!({"delete": ["bench"], "copy": files}),
            )
            .await?;
        patches.push(t.elapsed());
    }

    let mut executions = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let end = client.execute(&runner, "true").await?;
        executions.push(t.elapsed());
        if end != json!({"type": "exit", "data": 0}) {
            bail!("`true` ended with {end}");
        }
    }
    client
        .call(
            reqwest::Method::DELETE,
            &format!("/runners/{runner}"),
            Value::Null,
        )
        .await?;

    Ok(vec![
        Row::new("baseline: fork+exec /bin/true (local)", baseline),
        Row::new("POST /runners (claim from a warm pool)", claims),
        Row::new("PATCH /files (delete dir + 10 small files)", patches),
        Row::new("execute round trip (POST+WebSocket+`true`)", executions),
    ])
}
