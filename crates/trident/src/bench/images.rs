//! `--suite images`: pulling and unpacking an image from a registry on loopback, beside
//! `skopeo copy` of the same image to a directory (download only) in the same run, and runner
//! creation from that multi-layer image beside creation from `host`.
//!
//! The suite brings its own registry (Debian's `docker-registry` on `--registry-port`) and
//! image (layers of generated files, gzip), so the server must list the registry as insecure:
//! `insecure_registries: ["127.0.0.1:5099"]`. Skipped, with a line saying why, when
//! `docker-registry` or `skopeo` is missing.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{Client, Environment, Report};

const LAYERS: usize = 4;
const LAYER_BYTES: usize = 16 << 20;
const FILES_PER_LAYER: usize = 64;

pub async fn run(
    report: &mut Report,
    client: &Client,
    env_id: u64,
    port: u16,
    pool: usize,
) -> anyhow::Result<()> {
    for tool in ["/usr/bin/docker-registry", "/usr/bin/skopeo"] {
        if !Path::new(tool).exists() {
            report.say(&format!("images suite skipped: {tool} is missing\n"));
            return Ok(());
        }
    }
    let scratch = std::env::temp_dir().join(format!("trident-bench-images-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let registry = start_registry(&scratch, port)?;
    let host = format!("127.0.0.1:{port}");
    let result = measure(report, client, env_id, &host, &scratch, pool).await;
    let mut registry = registry;
    let _ = registry.kill();
    let _ = registry.wait();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn measure(
    report: &mut Report,
    client: &Client,
    env_id: u64,
    host: &str,
    scratch: &Path,
    pool: usize,
) -> anyhow::Result<()> {
    let repo = format!("bench/layers-{}", std::process::id());
    let (reference, compressed) = push_image(host, &repo).await?;
    let mb = compressed as f64 / 1e6;

    // trident: the pull, the digests, the unpack of every layer.
    let started = Instant::now();
    client
        .call(
            reqwest::Method::POST,
            "/images",
            json!({ "name": reference }),
        )
        .await
        .with_context(|| {
            format!("pulling {reference}: does the server list {host} in insecure_registries?")
        })?;
    loop {
        let images = client
            .call(reqwest::Method::GET, "/images", Value::Null)
            .await?;
        let image = images["images"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == reference.as_str()).cloned());
        match image.as_ref().and_then(|i| i["state"].as_str()) {
            Some("ready") => break,
            Some("failed") => bail!("pulling {reference} failed: {}", image.unwrap()["error"]),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("pulling {reference} took over 10 minutes");
        }
    }
    let trident_pull = started.elapsed();

    // skopeo: the same bytes to a directory, no unpack.
    let target = scratch.join("skopeo");
    let started = Instant::now();
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", target.display()))
        .output()?;
    if !out.status.success() {
        bail!("skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
    }
    let skopeo = started.elapsed();

    // Runner creation: `pool` runners of the image, then of `host`, one after the other.
    let layered = fill_rate(client, env_id, &reference, pool).await?;
    let host_rate = fill_rate(client, env_id + 1, "host", pool).await?;
    let _ = client
        .call(
            reqwest::Method::DELETE,
            &format!("/images/{reference}"),
            Value::Null,
        )
        .await;

    let pull_rate = mb / trident_pull.as_secs_f64();
    let skopeo_rate = mb / skopeo.as_secs_f64();
    report.say(&format!(
        "images: {LAYERS} gzip layers, {mb:.1} MB compressed, {} MiB unpacked, from a registry on loopback\n\
         {:<52} {:>9} {:>9}\n\
         {:<52} {:>9.1} {:>9.2}\n\
         {:<52} {:>9.1} {:>9.2}\n\
         {:<52} {:>9.1} {:>9.2}\n\
         {:<52} {:>9.1} {:>9.2}\n",
        (LAYERS * LAYER_BYTES) >> 20,
        "operation", "rate", "ratio",
        "skopeo copy to a dir (download only), MB/s", skopeo_rate, 1.0,
        "trident pull + verify + unpack, MB/s", pull_rate, pull_rate / skopeo_rate,
        "runners/s from `host`", host_rate, 1.0,
        format!("runners/s from the {LAYERS}-layer image"), layered, layered / host_rate,
    ));
    report.figure("images_pull_mb_per_s", pull_rate);
    report.figure("images_skopeo_mb_per_s", skopeo_rate);
    report.figure("images_runners_per_s", layered);
    report.figure("images_host_runners_per_s", host_rate);
    Ok(())
}

/// Runners per second while a fresh environment of `image` fills a pool of `pool`.
async fn fill_rate(client: &Client, id: u64, image: &str, pool: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let env = Environment::create(client, id, image, pool).await?;
    let filled = env.wait_idle(pool, Duration::from_secs(300), |_| {}).await;
    let took = started.elapsed();
    env.delete().await;
    filled?;
    Ok(pool as f64 / took.as_secs_f64())
}

fn start_registry(scratch: &Path, port: u16) -> anyhow::Result<std::process::Child> {
    let config = scratch.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            scratch.join("registry").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("docker-registry did not listen on 127.0.0.1:{port} (--registry-port)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Files of text-like content (compresses about 2:1, like binaries and libraries do).
fn layer(seed: u64) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut x = seed | 1;
    let per_file = LAYER_BYTES / FILES_PER_LAYER;
    for f in 0..FILES_PER_LAYER {
        let mut content = Vec::with_capacity(per_file);
        while content.len() < per_file {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // 16 symbols: about 4 bits of entropy per byte.
            content.extend((0..8).map(|i| b'a' + ((x >> (i * 4)) & 15) as u8));
        }
        content.truncate(per_file);
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(content.len() as u64);
        h.set_mtime(1_600_000_000);
        tar.append_data(&mut h, format!("layer{seed}/file{f}"), &content[..])?;
    }
    let plain = tar.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain)?;
    Ok((plain, gz.finish()?))
}

async fn push_image(host: &str, repo: &str) -> anyhow::Result<(String, u64)> {
    let http = reqwest::Client::new();
    let push_blob = |bytes: Vec<u8>| {
        let http = http.clone();
        async move {
            let digest = sha256(&bytes);
            let start = http
                .post(format!("http://{host}/v2/{repo}/blobs/uploads/"))
                .send()
                .await?;
            let location = start
                .headers()
                .get("location")
                .context("no upload location")?
                .to_str()?
                .to_string();
            let location = if location.starts_with("http") {
                location
            } else {
                format!("http://{host}{location}")
            };
            let sep = if location.contains('?') { '&' } else { '?' };
            let put = http
                .put(format!("{location}{sep}digest={digest}"))
                .body(bytes)
                .send()
                .await?;
            if put.status() != 201 {
                bail!("pushing a blob: {}", put.status());
            }
            anyhow::Ok(digest)
        }
    };
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut compressed = 0u64;
    for i in 0..LAYERS {
        let (plain, gz) = layer(i as u64 + 1)?;
        diff_ids.push(sha256(&plain));
        compressed += gz.len() as u64;
        let size = gz.len();
        let digest = push_blob(gz).await?;
        layers.push(
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": digest, "size": size}),
        );
    }
    let config = json!({"architecture": if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" }, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    .to_string();
    let config_digest = push_blob(config.clone().into_bytes()).await?;
    let manifest = json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layers})
    .to_string();
    let put = http
        .put(format!("http://{host}/v2/{repo}/manifests/1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await?;
    if put.status() != 201 {
        bail!("pushing the manifest: {}", put.status());
    }
    Ok((format!("{host}/{repo}:1"), compressed))
}
