//! `--suite learners`: CodeOcean's shape of work. Each simulated learner, over and over for a
//! fixed time: claims a runner, copies 5 files of a few KiB, runs `python3` on one of them,
//! lists the workspace and deletes the runner. Flows/s and each step's p50/p99, with N
//! learners at once (the pool holds N runners, and refills as they are deleted).

use std::time::{Duration, Instant};

use anyhow::bail;
use base64::Engine;
use serde_json::json;

use super::{own_cpu_time, Client, Environment, JsonBody, Report, Row};

const STEPS: [&str; 5] = [
    "claim (POST /runners)",
    "copy 5 files (PATCH /files)",
    "run `python3 main.py`",
    "list the workspace (GET /files)",
    "delete (DELETE /runners)",
];

pub async fn run(
    client: &Client,
    report: &mut Report,
    env_id: u64,
    image: &str,
    learners: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let env = Environment::create(client, env_id, image, learners).await?;
    let result = async {
        env.wait_idle(learners, Duration::from_secs(60 + learners as u64), |_| {})
            .await?;
        drive(client, env.id, learners, duration).await
    }
    .await;
    env.delete().await;
    let (steps, flows, errors, wall, cpu) = result?;
    let rate = flows as f64 / wall.as_secs_f64();
    report.figure("learners_flows_per_s", rate);
    report.figure("learners_errors", errors as f64);
    let keys = [
        ("learners_claim_p50_ms", "learners_claim_p99_ms"),
        ("learners_copy_p50_ms", "learners_copy_p99_ms"),
        ("learners_python_p50_ms", "learners_python_p99_ms"),
        ("learners_list_p50_ms", "learners_list_p99_ms"),
        ("learners_delete_p50_ms", "learners_delete_p99_ms"),
    ];
    let rows: Vec<Row> = steps
        .into_iter()
        .zip(STEPS)
        .map(|(samples, name)| Row::new(name, samples))
        .collect();
    for (row, (p50, p99)) in rows.iter().zip(keys) {
        report.figure_ms(p50, row.p50());
        report.figure_ms(p99, row.p99());
    }
    report.table(
        &format!(
            "trident bench (learners): {learners} concurrent learners for {:.1} s",
            duration.as_secs_f64()
        ),
        &rows,
        "ratios against the claim",
    );
    report.say(&format!(
        "{flows} flows, {rate:.1} flows/s, {errors} errors; the load generator used {:.0}% \
         of one core\n",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    ));
    Ok(())
}

type Steps = [Vec<Duration>; 5];

async fn drive(
    client: &Client,
    env: u64,
    learners: usize,
    duration: Duration,
) -> anyhow::Result<(Steps, usize, usize, Duration, Duration)> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let helper: String = (0..120)
        .map(|i| format!("def f{i}(x):\n    return x * {i} + 1\n\n"))
        .collect();
    let main = "import helper\nimport os\n\
                total = sum(helper.f7(i) for i in range(1000))\n\
                print('total', total, len(os.listdir('.')))\n";
    let body = JsonBody::new(&json!({"copy": [
        {"path": "main.py", "content": b64(main)},
        {"path": "helper.py", "content": b64(&helper)},
        {"path": "README.md", "content": b64(&"# exercise\n\nWrite a function.\n".repeat(100))},
        {"path": "data/input.txt", "content": b64(&"1 2 3 4 5 6 7 8 9\n".repeat(200))},
        {"path": "test_main.py", "content": b64(&"def test_total():\n    assert True\n".repeat(60))},
    ]}))?;
    let cpu = own_cpu_time();
    let start = Instant::now();
    let end = start + duration;
    let results = futures_util::future::join_all((0..learners).map(|_| {
        let body = &body;
        async move {
            let mut steps: Steps = Default::default();
            let mut flows = 0;
            let mut errors = 0;
            while Instant::now() < end {
                match flow(client, env, body, &mut steps).await {
                    Ok(()) => flows += 1,
                    Err(e) => {
                        if errors == 0 {
                            tracing::warn!(error = %e, "a learner's flow failed");
                        }
                        errors += 1;
                    }
                }
            }
            (steps, flows, errors)
        }
    }))
    .await;
    let wall = start.elapsed();
    let cpu = own_cpu_time().saturating_sub(cpu);
    let mut all: Steps = Default::default();
    let (mut flows, mut errors) = (0, 0);
    for (steps, f, e) in results {
        for (a, s) in all.iter_mut().zip(steps) {
            a.extend(s);
        }
        flows += f;
        errors += e;
    }
    Ok((all, flows, errors, wall, cpu))
}

async fn flow(client: &Client, env: u64, body: &JsonBody, steps: &mut Steps) -> anyhow::Result<()> {
    let t = Instant::now();
    let runner = client.claim(env).await?;
    steps[0].push(t.elapsed());
    let work = async {
        let t = Instant::now();
        client.patch_files(&runner, body).await?;
        steps[1].push(t.elapsed());
        let t = Instant::now();
        let (end, stdout) = client.execute_output(&runner, "python3 main.py").await?;
        steps[2].push(t.elapsed());
        if end != json!({"type": "exit", "data": 0}) || !stdout.contains("total") {
            bail!("python3 main.py ended with {end}: {stdout}");
        }
        let t = Instant::now();
        let files = client.list_files(&runner).await?;
        steps[3].push(t.elapsed());
        if files["files"].as_array().map_or(0, Vec::len) < 5 {
            bail!("the workspace lists fewer than the 5 files copied: {files}");
        }
        anyhow::Ok(())
    }
    .await;
    let t = Instant::now();
    let deleted = client.delete_runner(&runner).await;
    steps[4].push(t.elapsed());
    work.and(deleted)
}
