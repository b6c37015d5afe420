//! `--suite files`: PATCH of 10 small files (a deletion plus ten copies, as CodeOcean sends
//! them), a copy of one 8 MiB file (PATCH, base64 in JSON) and a download of a 64 MiB file
//! (`GET .../files/raw`), the last two as MB/s beside a local `cp` of the same bytes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::{json, Value};

use super::{Client, Environment, JsonBody, Report, Row};

const COPY_BYTES: usize = 8 * 1024 * 1024;
const DOWNLOAD_BYTES: usize = 64 * 1024 * 1024;

pub async fn run(
    client: &Client,
    report: &mut Report,
    env_id: u64,
    image: &str,
    n: usize,
) -> anyhow::Result<()> {
    let env = Environment::create(client, env_id, image, 1).await?;
    let result = async {
        env.wait_idle(1, Duration::from_secs(60), |_| {}).await?;
        let runner = client.claim(env.id).await?;
        let measured = measure(client, &runner, n).await;
        let _ = client.delete_runner(&runner).await;
        measured
    }
    .await;
    env.delete().await;
    let m = result?;
    let mbps = |bytes: usize, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9);
    let copy_mbps = mbps(COPY_BYTES, m.copy.p50());
    let copy_local = mbps(COPY_BYTES, m.copy_local.p50());
    let download_mbps = mbps(DOWNLOAD_BYTES, m.download.p50());
    let download_local = mbps(DOWNLOAD_BYTES, m.download_local.p50());
    report.figure_ms("patch10_p50_ms", m.patch10.p50());
    report.figure_ms("patch10_p99_ms", m.patch10.p99());
    report.figure("copy_8m_mb_per_s", copy_mbps);
    report.figure("copy_8m_local_cp_mb_per_s", copy_local);
    report.figure("download_64m_mb_per_s", download_mbps);
    report.figure("download_64m_local_cp_mb_per_s", download_local);
    report.table(
        &format!("trident bench (files): {n} iterations of the small PATCH"),
        &[
            m.patch10,
            m.copy_local,
            m.copy,
            m.download_local,
            m.download,
        ],
        "ratios against the first row",
    );
    report.say(&format!(
        "8 MiB copy: {copy_mbps:.0} MB/s (local cp {copy_local:.0} MB/s, {:.0}%); \
         64 MiB download: {download_mbps:.0} MB/s (local cp {download_local:.0} MB/s, {:.0}%)\n",
        100.0 * copy_mbps / copy_local,
        100.0 * download_mbps / download_local
    ));
    Ok(())
}

struct Measured {
    patch10: Row,
    copy: Row,
    copy_local: Row,
    download: Row,
    download_local: Row,
}

async fn measure(client: &Client, runner: &str, n: usize) -> anyhow::Result<Measured> {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let files: Vec<Value> = (0..10)
        .map(|i| json!({"path": format!("bench/file{i}.txt"), "content": b64(format!("content {i}\n").as_bytes())}))
        .collect();
    let body = JsonBody::new(&json!({"delete": ["bench"], "copy": files}))?;
    let mut patch10 = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.patch_files(runner, &body).await?;
        patch10.push(t.elapsed());
    }

    let content: Vec<u8> = (0..COPY_BYTES).map(|i| (i * 7 + i / 4096) as u8).collect();
    let body = JsonBody::new(&json!({"copy": [{"path": "big8.bin", "content": b64(&content)}]}))?;
    let rounds = n.clamp(1, 20);
    let mut copy = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        client.patch_files(runner, &body).await?;
        copy.push(t.elapsed());
    }

    client
        .execute_ok(
            runner,
            &format!("head -c {DOWNLOAD_BYTES} /dev/urandom > big64.bin"),
        )
        .await?;
    let rounds = n.clamp(1, 10);
    let mut download = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let bytes = client
            .request(
                reqwest::Method::GET,
                &format!("/runners/{runner}/files/raw?path=big64.bin"),
            )
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        download.push(t.elapsed());
        if bytes.len() != DOWNLOAD_BYTES {
            bail!("downloaded {} bytes of {DOWNLOAD_BYTES}", bytes.len());
        }
    }

    let copy_local = tokio::task::spawn_blocking(move || local_cp(COPY_BYTES, 20)).await??;
    let download_local =
        tokio::task::spawn_blocking(move || local_cp(DOWNLOAD_BYTES, 10)).await??;
    Ok(Measured {
        patch10: Row::new("PATCH /files (delete dir + 10 small files)", patch10),
        copy: Row::new("PATCH /files: one 8 MiB file", copy),
        copy_local: Row::new("local cp of 8 MiB (baseline)", copy_local),
        download: Row::new("GET /files/raw: a 64 MiB file", download),
        download_local: Row::new("local cp of 64 MiB (baseline)", download_local),
    })
}

/// `cp` of a file of `bytes` bytes in the temp dir, `rounds` times.
fn local_cp(bytes: usize, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let dir = tempdir()?;
    let source = dir.join("source");
    std::fs::write(&source, vec![7u8; bytes])?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let status = std::process::Command::new("cp")
            .arg(&source)
            .arg(dir.join("target"))
            .status()
            .context("running cp")?;
        samples.push(t.elapsed());
        if !status.success() {
            bail!("cp failed: {status}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(samples)
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("trident-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
