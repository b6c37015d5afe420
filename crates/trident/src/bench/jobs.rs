//! `--suite jobs`: the GitLab Runner API v4 side of a running server, driven the
//! way agents drive it: how soon a long-polling agent gets a job after it is submitted, what
//! a thousand idle long-polling agents cost the others, and how fast traces append. The
//! baseline is the cheapest HTTP round trip to the same server, measured in the same run.
//!
//! The bench registers its own agents with a tag of its own, so jobs it submits never go to
//! other agents (nor to the built-in one, which takes untagged jobs), and unregisters them at
//! the end. Its jobs stay in the job list, finished.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};

use super::{Report, Row};
use crate::bench::Client;

/// One agent of the bench: its runner token.
#[derive(Clone)]
struct Agent {
    token: String,
}

pub struct JobsBench<'a> {
    pub client: &'a Client,
    pub registration_token: &'a str,
    pub iterations: usize,
    pub idle_agents: usize,
}

const TRACE_4K: &str = "PATCH trace, 4 KiB";
const TRACE_4K_RATE: &str = "trace append, 4 KiB patches";

/// What one measurement of the suite found besides latencies.
struct Throughput {
    name: String,
    value: f64,
    unit: &'static str,
}

impl JobsBench<'_> {
    fn v4(&self, path: &str) -> String {
        format!("{}/api/v4{path}", self.client.base)
    }

    async fn register(&self, tag: &str) -> anyhow::Result<Agent> {
        let r = self
            .client
            .http
            .post(self.v4("/runners"))
            .json(&json!({"token": self.registration_token, "tag_list": [tag],
                          "run_untagged": false, "description": "trident bench"}))
            .send()
            .await?;
        if r.status() != 201 {
            bail!(
                "registering an agent: {} {} (is --registration-token the server's?)",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        let v: Value = r.json().await?;
        Ok(Agent {
            token: v["token"].as_str().context("no token")?.to_string(),
        })
    }

    async fn unregister(&self, agent: &Agent) {
        let _ = self
            .client
            .http
            .delete(self.v4("/runners"))
            .json(&json!({"token": agent.token}))
            .send()
            .await;
    }

    async fn submit(&self, tag: &str) -> anyhow::Result<i64> {
        let v = self
            .client
            .call(
                reqwest::Method::POST,
                "/jobs",
                json!({"name": "bench", "script": ["true"], "tags": [tag]}),
            )
            .await?;
        v["id"].as_i64().context("no job id")
    }

    /// One `POST /jobs/request`: the job id and token, or `None` on 204.
    async fn request(&self, agent: &Agent) -> anyhow::Result<Option<(i64, String)>> {
        let r = self
            .client
            .http
            .post(self.v4("/jobs/request"))
            .json(&json!({"token": agent.token}))
            .send()
            .await?;
        match r.status().as_u16() {
            201 => {
                let v: Value = r.json().await?;
                Ok(Some((
                    v["id"].as_i64().context("no id")?,
                    v["token"].as_str().context("no token")?.to_string(),
                )))
            }
            204 => Ok(None),
            status => bail!("/jobs/request: {status}"),
        }
    }

    async fn finish(&self, id: i64, token: &str) -> anyhow::Result<()> {
        let r = self
            .client
            .http
            .put(self.v4(&format!("/jobs/{id}")))
            .json(&json!({"token": token, "state": "success", "exit_code": 0}))
            .send()
            .await?;
        if r.status() != 200 {
            bail!("finishing job {id}: {}", r.status());
        }
        Ok(())
    }

    async fn patch_trace(
        &self,
        id: i64,
        token: &str,
        start: usize,
        chunk: &[u8],
    ) -> anyhow::Result<()> {
        let r = self
            .client
            .http
            .patch(self.v4(&format!("/jobs/{id}/trace")))
            .header("JOB-TOKEN", token)
            .header(
                "Content-Range",
                format!("{start}-{}", start + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .await?;
        if r.status() != 202 {
            bail!("trace patch at {start}: {}", r.status());
        }
        Ok(())
    }

    /// Submit → a waiting agent's long poll answers with the job.
    async fn pickups(
        &self,
        agent: &Agent,
        tag: &str,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
        let mut pickups = Vec::with_capacity(self.iterations);
        let mut submits = Vec::with_capacity(self.iterations);
        for _ in 0..self.iterations {
            let poll = {
                let bench_agent = agent.clone();
                let http = self.client.http.clone();
                let url = self.v4("/jobs/request");
                tokio::spawn(async move {
                    let r = http
                        .post(url)
                        .json(&json!({"token": bench_agent.token}))
                        .send()
                        .await?;
                    let answered = Instant::now();
                    let status = r.status();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    anyhow::Ok((answered, status, v))
                })
            };
            // Let the poll reach the server and wait there.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let t = Instant::now();
            self.submit(tag).await?;
            submits.push(t.elapsed());
            let (answered, status, v) = poll.await??;
            if status != 201 {
                bail!("the long poll answered {status} instead of the job (is job_request_poll_seconds 0?)");
            }
            pickups.push(answered.duration_since(t));
            let id = v["id"].as_i64().context("no id")?;
            self.finish(id, v["token"].as_str().context("no token")?)
                .await?;
        }
        Ok((submits, pickups))
    }

    /// `POST /jobs/request` answered with a job that is already queued.
    async fn requests(&self, agent: &Agent, tag: &str) -> anyhow::Result<Vec<Duration>> {
        let mut queued = Vec::with_capacity(self.iterations);
        for _ in 0..self.iterations {
            queued.push(self.submit(tag).await?);
        }
        let mut samples = Vec::with_capacity(self.iterations);
        for _ in 0..self.iterations {
            let t = Instant::now();
            let (id, token) = self
                .request(agent)
                .await?
                .context("a queued job was not handed out")?;
            samples.push(t.elapsed());
            self.finish(id, &token).await?;
        }
        Ok(samples)
    }

    /// Keeps `count` agents long-polling for jobs that never come until the returned guard
    /// is dropped.
    async fn idle_pollers(&self, count: usize, tag: &str) -> anyhow::Result<IdlePollers> {
        let agents: Vec<Agent> = stream::iter(0..count)
            .map(|_| self.register(tag))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let polling = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(count);
        for agent in &agents {
            let http = self.client.http.clone();
            let url = self.v4("/jobs/request");
            let token = agent.token.clone();
            let polling = polling.clone();
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                let mut first = true;
                loop {
                    let sent = http.post(&url).json(&json!({"token": token})).send();
                    if first {
                        polling.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                    if sent.await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        while polling.load(Ordering::Relaxed) < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Every request sent; give the server time to take them all into their long polls.
        tokio::time::sleep(Duration::from_secs(1)).await;
        answered.store(0, Ordering::Relaxed);
        Ok(IdlePollers {
            agents,
            tasks,
            answered,
        })
    }

    async fn trace_appends(
        &self,
        agent: &Agent,
        tag: &str,
        chunk: usize,
    ) -> anyhow::Result<(Vec<Duration>, Duration)> {
        self.submit(tag).await?;
        let (id, token) = self
            .request(agent)
            .await?
            .context("no job for the trace bench")?;
        let data: Vec<u8> = (0..chunk)
            .map(|i| b"trace line of a job\n"[i % 20])
            .collect();
        let mut samples = Vec::with_capacity(self.iterations);
        let all = Instant::now();
        for i in 0..self.iterations {
            let t = Instant::now();
            self.patch_trace(id, &token, i * chunk, &data).await?;
            samples.push(t.elapsed());
        }
        let total = all.elapsed();
        self.finish(id, &token).await?;
        Ok((samples, total))
    }

    /// Runs the suite and reports it: the table, the throughputs, and the figures a trace
    /// PATCH is held against (`trace_patch_4k_p50_ms` beside `version_baseline_p50_ms`).
    pub async fn run(&self, report: &mut Report, url: &str) -> anyhow::Result<()> {
        let (rows, throughput) = self.measure().await?;
        report.figure_ms("version_baseline_p50_ms", rows[0].p50());
        if let Some(trace) = rows.iter().find(|r| r.name() == TRACE_4K) {
            report.figure_ms("trace_patch_4k_p50_ms", trace.p50());
            report.figure_ms("trace_patch_4k_p99_ms", trace.p99());
        }
        for t in &throughput {
            if t.name == TRACE_4K_RATE {
                report.figure("trace_append_4k_mib_per_s", t.value);
            }
        }
        report.table(
            &format!(
                "trident bench (jobs): {} iterations against {url}",
                self.iterations
            ),
            &rows,
            "ratios against the plain HTTP round trip of the first row, measured in the same run",
        );
        let lines: Vec<String> = throughput
            .iter()
            .map(|t| format!("{:<56} {:>12.1} {}", t.name, t.value, t.unit))
            .collect();
        report.say(&format!("{}\n", lines.join("\n")));
        Ok(())
    }

    async fn measure(&self) -> anyhow::Result<(Vec<Row>, Vec<Throughput>)> {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let tag = format!("trident-bench-{}", &run[..8]);
        let idle_tag = format!("{tag}-idle");
        let agent = self.register(&tag).await?;
        let result = self.measure_with(&agent, &tag, &idle_tag).await;
        self.unregister(&agent).await;
        result
    }

    async fn measure_with(
        &self,
        agent: &Agent,
        tag: &str,
        idle_tag: &str,
    ) -> anyhow::Result<(Vec<Row>, Vec<Throughput>)> {
        let mut baseline = Vec::with_capacity(self.iterations);
        for _ in 0..self.iterations {
            let t = Instant::now();
            self.client
                .call(reqwest::Method::GET, "/version", Value::Null)
                .await?;
            baseline.push(t.elapsed());
        }
        let (submits, pickups) = self.pickups(agent, tag).await?;
        let requests = self.requests(agent, tag).await?;

        let idle = self.idle_pollers(self.idle_agents, idle_tag).await?;
        let measured = async {
            let (submits_idle, pickups_idle) = self.pickups(agent, tag).await?;
            let requests_idle = self.requests(agent, tag).await?;
            anyhow::Ok((submits_idle, pickups_idle, requests_idle))
        }
        .await;
        // Idle pollers answered during the measurement: each answer is a wasted round trip
        // (their long poll should hold them all along).
        let idle_answers = idle.answered.load(Ordering::Relaxed);
        idle.stop(self).await;
        let (submits_idle, pickups_idle, requests_idle) = measured?;

        let (small, small_total) = self.trace_appends(agent, tag, 4 * 1024).await?;
        let (large, large_total) = self.trace_appends(agent, tag, 64 * 1024).await?;
        let mb = |chunk: usize, total: Duration| {
            (chunk * self.iterations) as f64 / total.as_secs_f64() / (1024.0 * 1024.0)
        };
        let per_second = |samples: &[Duration]| {
            samples.len() as f64 / samples.iter().sum::<Duration>().as_secs_f64()
        };
        let n = self.idle_agents;
        let throughput = vec![
            Throughput {
                name: "POST /jobs/request with a job queued".into(),
                value: per_second(&requests),
                unit: "requests/s",
            },
            Throughput {
                name: format!("... with {n} idle long-polling agents"),
                value: per_second(&requests_idle),
                unit: "requests/s",
            },
            Throughput {
                name: format!("idle agents' polls answered during that ({n} agents)"),
                value: idle_answers as f64,
                unit: "answers",
            },
            Throughput {
                name: TRACE_4K_RATE.into(),
                value: mb(4 * 1024, small_total),
                unit: "MiB/s",
            },
            Throughput {
                name: "trace append, 64 KiB patches".into(),
                value: mb(64 * 1024, large_total),
                unit: "MiB/s",
            },
        ];
        let rows = vec![
            Row::new("baseline: GET /api/v1/version", baseline),
            Row::new("POST /api/v1/jobs (submit)", submits),
            Row::new("pickup: submit -> long-polling agent has it", pickups),
            Row::new("POST /jobs/request, a job queued", requests),
            Row::new_owned(format!("submit, {n} idle agents polling"), submits_idle),
            Row::new_owned(format!("pickup, {n} idle agents polling"), pickups_idle),
            Row::new_owned(
                format!("/jobs/request, {n} idle agents polling"),
                requests_idle,
            ),
            Row::new(TRACE_4K, small),
            Row::new("PATCH trace, 64 KiB", large),
        ];
        Ok((rows, throughput))
    }
}

struct IdlePollers {
    agents: Vec<Agent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    answered: Arc<AtomicUsize>,
}

impl IdlePollers {
    async fn stop(self, bench: &JobsBench<'_>) {
        for task in &self.tasks {
            task.abort();
        }
        stream::iter(&self.agents)
            .for_each_concurrent(16, |agent| bench.unregister(agent))
            .await;
    }
}
