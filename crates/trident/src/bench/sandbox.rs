//! `--suite sandbox`: claims from a warm pool and the execute round trip (POST execute →
//! WebSocket → `true` → exit frame → close), beside a bare fork+exec of `/bin/true` and a
//! local `bash -c true` measured in the same run. The execute samples and the `bash -c true`
//! samples are taken alternately, so that a noisy neighbour hits both alike; the difference
//! of their medians is trident's own cost per execution.

use std::time::{Duration, Instant};

use anyhow::bail;

use super::{local_bash, Client, Environment, Report, Row};

pub async fn run(
    client: &Client,
    report: &mut Report,
    env_id: u64,
    image: &str,
    n: usize,
    url: &str,
) -> anyhow::Result<()> {
    let env = Environment::create(client, env_id, image, 4).await?;
    let result = measure(&env, n).await;
    env.delete().await;
    let (rows, phases) = result?;
    let [fork, bash, claims, executions] = &rows[..] else {
        unreachable!("four rows")
    };
    report.figure_ms("fork_exec_baseline_p50_ms", fork.p50());
    report.figure_ms("bash_baseline_p50_ms", bash.p50());
    report.figure_ms("claim_p50_ms", claims.p50());
    report.figure_ms("execute_p50_ms", executions.p50());
    report.figure_ms("execute_p99_ms", executions.p99());
    let overhead = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1000.0;
    let overhead_p50 = overhead(executions.p50(), bash.p50());
    let overhead_p99 = overhead(executions.p99(), bash.p99());
    report.figure("execute_overhead_p50_ms", overhead_p50);
    report.figure("execute_overhead_p99_ms", overhead_p99);
    report.table(
        &format!("trident bench (sandbox): {n} iterations against {url}"),
        &rows,
        "ratios against a bare fork+exec of /bin/true on this machine, measured in the same run",
    );
    report.table(
        "the execute round trip in phases, as the client sees them (each from the end of the one before)",
        &phases,
        "ratios against the first phase",
    );
    report.say(&format!(
        "trident's own cost per execution (round trip minus local `bash -c true`): \
         p50 {overhead_p50:.3} ms, p99 {overhead_p99:.3} ms\n"
    ));
    Ok(())
}

async fn measure(env: &Environment<'_>, n: usize) -> anyhow::Result<(Vec<Row>, Vec<Row>)> {
    let client = env.client;
    let fork = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Duration>> {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let status = std::process::Command::new("/bin/true").status()?;
            samples.push(t.elapsed());
            if !status.success() {
                bail!("/bin/true failed");
            }
        }
        Ok(samples)
    })
    .await??;

    // The pool full, so that claims measure the warm path.
    env.wait_idle(4, Duration::from_secs(60), |_| {}).await?;
    let mut claims = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let runner = client.claim(env.id).await?;
        claims.push(t.elapsed());
        client.delete_runner(&runner).await?;
    }

    let runner = client.claim(env.id).await?;
    let mut bash = Vec::with_capacity(n);
    let mut executions = Vec::with_capacity(n);
    let mut phases: [Vec<Duration>; 4] = Default::default();
    let measured = async {
        for _ in 0..n {
            bash.push(tokio::task::spawn_blocking(|| local_bash("true")).await??);
            let t = Instant::now();
            let (end, _, at) = client.execute_phases(&runner, "true").await?;
            executions.push(t.elapsed());
            if end != serde_json::json!({"type": "exit", "data": 0}) {
                bail!("`true` ended with {end}");
            }
            let mut last = t;
            for (samples, at) in phases.iter_mut().zip(at) {
                samples.push(at.duration_since(last));
                last = at;
            }
        }
        anyhow::Ok(())
    }
    .await;
    client.delete_runner(&runner).await?;
    measured?;

    let [post, upgrade, start, end] = phases;
    Ok((
        vec![
            Row::new("baseline: fork+exec /bin/true (local)", fork),
            Row::new("local `bash -c true`", bash),
            Row::new("POST /runners (claim from a warm pool)", claims),
            Row::new("execute round trip (POST+WebSocket+`true`)", executions),
        ],
        vec![
            Row::new("POST /execute answered", post),
            Row::new("WebSocket connected and upgraded", upgrade),
            Row::new("`start` read (the process runs)", start),
            Row::new("terminal message read", end),
        ],
    ))
}
