//! `--suite scale`: many prewarmed runners. With a pool of 10, claims and executions are
//! timed; then the pool grows to N and the bench reports the creation rate over the whole
//! fill (and over its last tenth, to show whether it holds up), the memory of an idle
//! runner, claims and executions again with N idle, and how long destroying all of them
//! takes (the DELETE of the environment until the last of their cgroups is gone).
//!
//! Memory per runner is read from this host, so it needs the bench beside the server (and
//! root to read other processes' smaps): the PSS of the runner's processes
//! (`/proc/<pid>/smaps_rollup`) plus its cgroup's memory usage. The two overlap (a
//! process's anonymous pages are charged to its cgroup too); both are printed apart as
//! well. Beside them, how much the host's kernel slab grew per runner over the fill: kernel
//! objects of a runner's namespaces, mounts and cgroups that its cgroup is not always
//! charged for (system-wide, so the neighbours' allocations count too).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Client, Environment, Report, Row};

const SMALL_POOL: usize = 10;

pub async fn run(
    client: &Client,
    report: &mut Report,
    env_id: u64,
    image: &str,
    runners: usize,
    iterations: usize,
) -> anyhow::Result<()> {
    let env = Environment::create(client, env_id, image, SMALL_POOL).await?;
    let result = measure(&env, runners, iterations).await;
    let scale = match result {
        Ok(scale) => scale,
        Err(e) => {
            env.delete().await;
            return Err(e);
        }
    };
    // Teardown: everything of the environment goes at once.
    let t = Instant::now();
    env.delete().await;
    if let Some(dir) = &scale.instance_dir {
        let deadline = Instant::now() + Duration::from_secs(600);
        while scale.cgroups.iter().any(|c| dir.join(c).exists()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let teardown = t.elapsed();

    report.figure("scale_runners", runners as f64);
    report.figure("scale_runners_per_s", scale.rate);
    report.figure("scale_runners_per_s_last_tenth", scale.last_tenth_rate);
    report.figure("scale_fill_s", scale.fill.as_secs_f64());
    if let Some(slab) = scale.slab_mib {
        report.figure("scale_kernel_slab_mib_per_runner", slab);
    }
    if let Some(memory) = &scale.memory {
        report.figure("scale_mib_per_runner", memory.per_runner_mib());
        report.figure("scale_pss_mib_per_runner", memory.pss_mib);
        report.figure("scale_cgroup_mib_per_runner", memory.cgroup_mib);
        report.figure(
            "scale_cgroup_unmapped_mib_per_runner",
            memory.cgroup_mib - memory.cgroup_mapped_mib,
        );
        report.figure(
            "scale_pss_plus_cgroup_mib_per_runner",
            memory.pss_mib + memory.cgroup_mib,
        );
    }
    report.figure_ms("scale_claim_p50_ms_small_pool", scale.rows[0].p50());
    report.figure_ms("scale_claim_p50_ms", scale.rows[1].p50());
    report.figure_ms("scale_execute_p50_ms_small_pool", scale.rows[2].p50());
    report.figure_ms("scale_execute_p50_ms", scale.rows[3].p50());
    if scale.instance_dir.is_some() {
        report.figure("scale_teardown_s", teardown.as_secs_f64());
    }
    report.table(
        &format!("trident bench (scale): {runners} idle runners against {SMALL_POOL}"),
        &scale.rows,
        "ratios against the first row",
    );
    let mut summary = format!(
        "prewarming {runners} runners: {:.1} s, {:.0} runners/s over the whole fill ({:.0}/s \
         over its last tenth)\n",
        scale.fill.as_secs_f64(),
        scale.rate,
        scale.last_tenth_rate
    );
    match &scale.memory {
        Some(m) => summary.push_str(&format!(
            "memory per idle runner ({} measured): {:.3} MiB = PSS of its processes {:.3} MiB \
             + its cgroup's usage {:.3} MiB less the {:.3} MiB of it that its processes map \
             (counted in the PSS already); PSS + whole usage: {:.3} MiB\n",
            m.runners,
            m.per_runner_mib(),
            m.pss_mib,
            m.cgroup_mib,
            m.cgroup_mapped_mib,
            m.pss_mib + m.cgroup_mib
        )),
        None => summary.push_str(
            "memory per runner and teardown not measured: the runners' cgroups are not on \
             this host (run the bench beside the server, as root)\n",
        ),
    }
    if let Some(slab) = scale.slab_mib {
        summary.push_str(&format!(
            "the host's kernel slab grew by {slab:.3} MiB per runner over the fill (system-wide, \
             not in the cgroup's usage on every layout)\n"
        ));
    }
    if scale.instance_dir.is_some() {
        summary.push_str(&format!(
            "teardown of all {} runners: {:.2} s\n",
            runners + 1,
            teardown.as_secs_f64()
        ));
    }
    report.say(&summary);
    Ok(())
}

struct Scale {
    rows: Vec<Row>,
    fill: Duration,
    rate: f64,
    last_tenth_rate: f64,
    memory: Option<Memory>,
    instance_dir: Option<PathBuf>,
    /// Names of the runners' cgroups (under `instance_dir`).
    cgroups: BTreeSet<String>,
    /// How much the host's kernel slab grew per runner over the fill (system-wide: other
    /// processes' allocations count too).
    slab_mib: Option<f64>,
}

struct Memory {
    runners: usize,
    /// Mean PSS of a runner's processes: the user pages they map, shared ones split.
    pss_mib: f64,
    /// Mean usage of a runner's memory cgroup: the pages charged to it (user pages, page
    /// cache and its tmpfs, kernel memory).
    cgroup_mib: f64,
    /// The part of that usage which is user pages the runner's processes map (anonymous
    /// and mapped file pages): in the PSS as well.
    cgroup_mapped_mib: f64,
}

impl Memory {
    /// What a runner costs, each page once: the PSS, plus what its cgroup holds that no
    /// process maps (kernel memory, the tmpfs's and other unmapped page cache). Adding the
    /// whole usage would count every mapped page charged to the cgroup twice.
    fn per_runner_mib(&self) -> f64 {
        self.pss_mib + self.cgroup_mib - self.cgroup_mapped_mib
    }
}

async fn measure(env: &Environment<'_>, runners: usize, n: usize) -> anyhow::Result<Scale> {
    let client = env.client;
    let fill_timeout = Duration::from_secs(120 + runners as u64 / 10);
    env.wait_idle(SMALL_POOL, fill_timeout, |_| {}).await?;
    // The runner executions are timed on, the same one before and after the fill.
    let probe = client.claim(env.id).await?;
    env.wait_idle(SMALL_POOL, fill_timeout, |_| {}).await?;
    let instance_dir = find_instance_dir(&probe);

    let claims_small = claims(env, SMALL_POOL, n).await?;
    let executions_small = executions(client, &probe, n).await?;

    let slab_before = slab_kib();
    env.resize(runners).await?;
    let start = Instant::now();
    // When each tenth of the fill was reached.
    let mut marks = [None; 11];
    let total = runners.saturating_sub(SMALL_POOL).max(1);
    env.wait_idle(runners, fill_timeout, |idle| {
        let done = (idle as usize).saturating_sub(SMALL_POOL);
        let tenth = (done * 10 / total).min(10);
        for mark in marks.iter_mut().take(tenth + 1) {
            mark.get_or_insert_with(|| start.elapsed());
        }
    })
    .await?;
    let fill = start.elapsed();
    let slab_mib = match (slab_before, slab_kib()) {
        (Some(before), Some(after)) => Some(after as f64 / 1024.0 - before as f64 / 1024.0),
        _ => None,
    }
    .map(|grown| grown / total as f64);
    let rate = total as f64 / fill.as_secs_f64();
    let nine_tenths = marks[9].unwrap_or_default();
    let last_tenth_rate = (total as f64 / 10.0) / (fill - nine_tenths).as_secs_f64().max(1e-6);

    let cgroups: BTreeSet<String> = match &instance_dir {
        Some(dir) => runner_cgroups(dir, env.id),
        None => BTreeSet::new(),
    };
    let memory = match &instance_dir {
        Some(dir) => {
            let dir = dir.clone();
            let names: Vec<String> = cgroups.iter().filter(|c| **c != probe).cloned().collect();
            tokio::task::spawn_blocking(move || memory(&dir, &names)).await?
        }
        None => None,
    };

    let claims_large = claims(env, runners, n).await?;
    let executions_large = executions(client, &probe, n).await?;
    let _ = client.delete_runner(&probe).await;
    Ok(Scale {
        rows: vec![
            Row::new_owned(format!("claim, {SMALL_POOL} idle"), claims_small),
            Row::new_owned(format!("claim, {runners} idle"), claims_large),
            Row::new_owned(
                format!("execute round trip, {SMALL_POOL} idle"),
                executions_small,
            ),
            Row::new_owned(
                format!("execute round trip, {runners} idle"),
                executions_large,
            ),
        ],
        fill,
        rate,
        last_tenth_rate,
        memory,
        instance_dir,
        cgroups,
        slab_mib,
    })
}

/// The kernel's slab memory (`Slab:` of /proc/meminfo), in KiB.
fn slab_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Claims with `idle` runners idle: each claimed runner is deleted and the pool refilled
/// before the next claim, so that every claim sees the same pool.
async fn claims(env: &Environment<'_>, idle: usize, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let runner = env.client.claim(env.id).await?;
        samples.push(t.elapsed());
        env.client.delete_runner(&runner).await?;
        env.wait_idle(idle, Duration::from_secs(60), |_| {}).await?;
    }
    Ok(samples)
}

async fn executions(client: &Client, runner: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.execute_ok(runner, "true").await?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

/// The cgroup directory (of the memory controller on v1) holding the runner `id`, i.e.
/// `trident/<instance>/`, if it is on this host.
fn find_instance_dir(id: &str) -> Option<PathBuf> {
    for root in ["/sys/fs/cgroup/memory/trident", "/sys/fs/cgroup/trident"] {
        let Ok(instances) = std::fs::read_dir(root) else {
            continue;
        };
        for instance in instances.flatten() {
            if instance.path().join(id).is_dir() {
                return Some(instance.path());
            }
        }
    }
    None
}

/// The cgroups of the bench environment's runners (named `<environment id>-<uuid>`): the
/// server's other environments may have runners beside them, which the fill, the memory
/// figures and the teardown must not count or wait for.
fn runner_cgroups(dir: &Path, env_id: u64) -> BTreeSet<String> {
    let prefix = format!("{env_id}-");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect()
}

/// Mean PSS of the runners' processes and mean cgroup memory usage, in MiB.
fn memory(dir: &Path, names: &[String]) -> Option<Memory> {
    let mut pss_kib = 0u64;
    let mut cgroup_bytes = 0u64;
    let mut mapped_bytes = 0u64;
    let mut counted = 0;
    for name in names {
        let cgroup = dir.join(name);
        let usage = ["memory.usage_in_bytes", "memory.current"]
            .iter()
            .find_map(|f| std::fs::read_to_string(cgroup.join(f)).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        let Some(usage) = usage else { continue };
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            pss_kib += rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        cgroup_bytes += usage;
        mapped_bytes += mapped_user_pages(&cgroup);
        counted += 1;
    }
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0) / counted as f64;
    (counted > 0).then(|| Memory {
        runners: counted,
        pss_mib: pss_kib as f64 / 1024.0 / counted as f64,
        cgroup_mib: mib(cgroup_bytes),
        cgroup_mapped_mib: mib(mapped_bytes),
    })
}

/// Bytes of anonymous and mapped file pages charged to a (leaf) memory cgroup:
/// `rss` + `mapped_file` on v1, `anon` + `file_mapped` on v2.
fn mapped_user_pages(cgroup: &Path) -> u64 {
    let stat = std::fs::read_to_string(cgroup.join("memory.stat")).unwrap_or_default();
    stat.lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(key, _)| matches!(*key, "rss" | "mapped_file" | "anon" | "file_mapped"))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}
