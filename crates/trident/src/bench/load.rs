//! `--suite load`: N concurrent clients, each executing `true` in its own runner over and
//! over for a fixed time: executions/s, latency p50/p99, errors. The baseline is N
//! concurrent local `bash -c true` loops for the same time, in the same run: the rate this
//! machine manages without trident. The clients are tasks on this process's tokio runtime;
//! the bench reports the CPU it used itself (getrusage), so that a heavy generator would show.

use std::time::{Duration, Instant};

use super::{cores, local_bash, own_cpu_time, Client, Environment, Report, Row};

pub async fn run(
    client: &Client,
    report: &mut Report,
    env_id: u64,
    image: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let baseline = tokio::task::spawn_blocking(move || local_loops(clients, duration)).await??;

    let env = Environment::create(client, env_id, image, clients).await?;
    let result = async {
        env.wait_idle(clients, Duration::from_secs(60 + clients as u64), |_| {})
            .await?;
        let mut runners = Vec::with_capacity(clients);
        for _ in 0..clients {
            runners.push(client.claim(env.id).await?);
        }
        let measured = drive(client, &runners, duration).await;
        for runner in &runners {
            let _ = client.delete_runner(runner).await;
        }
        measured
    }
    .await;
    env.delete().await;
    let load = result?;

    let rate = load.ok as f64 / load.wall.as_secs_f64();
    let base_rate = baseline.ok as f64 / baseline.wall.as_secs_f64();
    let cpu_share = load.cpu.as_secs_f64() / load.wall.as_secs_f64();
    report.figure("load_clients", clients as f64);
    report.figure("load_executions_per_s", rate);
    report.figure("load_baseline_per_s", base_rate);
    report.figure("load_ratio", rate / base_rate);
    report.figure("load_errors", load.errors as f64);
    report.figure_ms("load_p50_ms", load.row.p50());
    report.figure_ms("load_p99_ms", load.row.p99());
    report.figure("load_generator_cpu_cores", cpu_share);
    report.table(
        &format!(
            "trident bench (load): {clients} concurrent clients for {:.1} s",
            duration.as_secs_f64()
        ),
        &[baseline.row, load.row],
        "ratios against the local loops' latency",
    );
    report.say(&format!(
        "executions/s: {rate:.0} through trident, {base_rate:.0} local `bash -c true` \
         ({:.0}%); {} errors; the load generator used {:.0}% of one core ({:.0}% of this \
         machine's {} cores)\n",
        100.0 * rate / base_rate,
        load.errors,
        100.0 * cpu_share,
        100.0 * cpu_share / cores() as f64,
        cores()
    ));
    Ok(())
}

struct Load {
    row: Row,
    ok: usize,
    errors: usize,
    wall: Duration,
    cpu: Duration,
}

/// Each client runs `true` in its runner until the time is up.
async fn drive(client: &Client, runners: &[String], duration: Duration) -> anyhow::Result<Load> {
    let cpu = own_cpu_time();
    let start = Instant::now();
    let end = start + duration;
    let results = futures_util::future::join_all(runners.iter().map(|runner| async move {
        let mut samples = Vec::new();
        let mut errors = 0;
        while Instant::now() < end {
            let t = Instant::now();
            match client.execute_ok(runner, "true").await {
                Ok(()) => samples.push(t.elapsed()),
                Err(e) => {
                    if errors == 0 {
                        tracing::warn!(error = %e, "a load execution failed");
                    }
                    errors += 1;
                }
            }
        }
        (samples, errors)
    }))
    .await;
    let wall = start.elapsed();
    let cpu = own_cpu_time().saturating_sub(cpu);
    let errors = results.iter().map(|(_, e)| e).sum();
    let samples: Vec<Duration> = results.into_iter().flat_map(|(s, _)| s).collect();
    Ok(Load {
        ok: samples.len(),
        row: Row::new("execute round trip under load (trident)", samples),
        errors,
        wall,
        cpu,
    })
}

/// `clients` threads running `bash -c true` back to back until the time is up.
fn local_loops(clients: usize, duration: Duration) -> anyhow::Result<Load> {
    let start = Instant::now();
    let end = start + duration;
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(move || {
                    let mut samples = Vec::new();
                    while Instant::now() < end {
                        samples.push(local_bash("true")?);
                    }
                    Ok(samples)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a baseline thread panicked"))
            .collect()
    });
    let wall = start.elapsed();
    let mut samples = Vec::new();
    for r in results {
        samples.extend(r?);
    }
    Ok(Load {
        ok: samples.len(),
        row: Row::new("baseline: local `bash -c true` loops", samples),
        errors: 0,
        wall,
        cpu: Duration::ZERO,
    })
}
