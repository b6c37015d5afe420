//! `trident image pull|ls|rm`: manage the images of a running server through its API, or,
//! with `--data-dir`, the image store of a stopped one directly.
//!
//! Progress is a bar (indicatif) on a terminal and a plain line every few seconds
//! otherwise, so that logs of scripted pulls stay readable.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use trident_images::{ImageState, ImageStatus, ImageStore};

#[derive(Args)]
pub struct ImageArgs {
    /// The server's URL
    #[arg(long, env = "TRIDENT_URL", default_value = "http://127.0.0.1:7200")]
    server: String,
    /// Its API token (Poseidon-Token)
    #[arg(long, env = "TRIDENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Work on the image store in this data dir instead of asking a server (the server
    /// must not be running on it). Registry settings come from `--config`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The server's config file, for its registry settings (with --data-dir)
    #[arg(long, env = "TRIDENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Pull an image (a registry reference, or docker-archive:/oci-archive:/oci: with
    /// --data-dir) and wait until it is ready
    Pull {
        name: String,
        /// The image name an archive is stored under (what environments then name)
        #[arg(long = "as")]
        store_as: Option<String>,
    },
    /// List the images, their state and size
    Ls,
    /// Remove an image (refused while an execution environment uses it)
    Rm { name: String },
}

pub async fn run(args: ImageArgs) -> anyhow::Result<()> {
    match &args.data_dir {
        Some(dir) => offline(&args, dir).await,
        None => online(&args).await,
    }
}

async fn online(args: &ImageArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1", args.server.trim_end_matches('/'));
    let request = |method: reqwest::Method, path: &str| {
        let r = http.request(method, format!("{base}{path}"));
        match &args.token {
            Some(t) => r.header("Poseidon-Token", t),
            None => r,
        }
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or("").to_string();
            bail!("the server answered {status}: {message}");
        }
        Ok(body)
    };
    let list = || async {
        let r = request(reqwest::Method::GET, "/images")
            .send()
            .await
            .with_context(|| format!("reaching the server at {}", args.server))?;
        let body = answer(r).await?;
        let images: Vec<ImageStatus> = body["images"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| status_from_json(&v))
            .collect();
        anyhow::Ok(images)
    };
    match &args.command {
        ImageCommand::Ls => print_table(&list().await?),
        ImageCommand::Rm { name } => {
            let path = format!("/images/{name}");
            let r = request(reqwest::Method::DELETE, &path)
                .send()
                .await
                .with_context(|| format!("reaching the server at {}", args.server))?;
            if r.status() != reqwest::StatusCode::NO_CONTENT {
                answer(r).await?;
            }
            println!("removed {name}");
        }
        ImageCommand::Pull { name, .. } => {
            if is_archive(name) {
                bail!(
                    "{name} is an offline archive: load it with --data-dir (server stopped), or \
                     name it in the images: table of the server's config"
                );
            }
            let r = request(reqwest::Method::POST, "/images")
                .json(&json!({ "name": name }))
                .send()
                .await
                .with_context(|| format!("reaching the server at {}", args.server))?;
            let started = answer(r).await?;
            let full = started["name"].as_str().unwrap_or(name).to_string();
            let mut progress = Progress::new(&full);
            loop {
                let image = list().await?.into_iter().find(|i| i.name == full);
                let Some(image) = image else {
                    bail!("the server forgot image {full} while pulling it");
                };
                progress.show(&image);
                match image.state {
                    ImageState::Ready => return progress.done(&image),
                    ImageState::Failed => {
                        bail!("pulling {full} failed: {}", image.error.unwrap_or_default())
                    }
                    ImageState::Pulling => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        }
    }
    Ok(())
}

async fn offline(args: &ImageArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let registry = crate::config::registry_settings(args.config.as_deref())?;
    let store = ImageStore::open(data_dir.join("images"), registry)
        .map_err(|e| anyhow::anyhow!("opening the image store in {}: {e}", data_dir.display()))?;
    match &args.command {
        ImageCommand::Ls => print_table(&store.list()),
        ImageCommand::Rm { name } => {
            store.remove(name).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("removed {name}");
        }
        ImageCommand::Pull { name, store_as } => {
            let store: Arc<ImageStore> = store;
            let target = match (is_archive(name), store_as) {
                (true, Some(as_name)) => as_name.clone(),
                (true, None) => bail!("{name} is an archive: say which image it is with --as NAME"),
                (false, _) => name.clone(),
            };
            let pull = {
                let store = store.clone();
                let name = name.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    if is_archive(&name) {
                        store.import(&target, &name).await
                    } else {
                        store.pull(&name).await
                    }
                })
            };
            let mut progress = Progress::new(name);
            while !pull.is_finished() {
                if let Some(status) = store
                    .list()
                    .into_iter()
                    .find(|s| s.state == ImageState::Pulling)
                {
                    progress.show(&status);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let image = pull
                .await?
                .map_err(|e| anyhow::anyhow!("pulling {name}: {e}"))?;
            if let Some(status) = store.status(&image.name) {
                progress.done(&status)?;
            }
        }
    }
    Ok(())
}

fn is_archive(name: &str) -> bool {
    ["docker-archive:", "oci-archive:", "oci:"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn status_from_json(v: &Value) -> Option<ImageStatus> {
    let state = match v["state"].as_str()? {
        "ready" => ImageState::Ready,
        "failed" => ImageState::Failed,
        _ => ImageState::Pulling,
    };
    Some(ImageStatus {
        name: v["name"].as_str()?.to_string(),
        digest: v["digest"].as_str().map(String::from),
        size: v["size"].as_u64().unwrap_or(0),
        layers: v["layers"].as_u64().unwrap_or(0) as usize,
        state,
        bytes_done: v["bytesDone"].as_u64().unwrap_or(0),
        bytes_total: v["bytesTotal"].as_u64().unwrap_or(0),
        error: v["error"].as_str().map(String::from),
    })
}

fn print_table(images: &[ImageStatus]) {
    println!(
        "{:<50} {:<8} {:>10} {:>6}  DIGEST",
        "NAME", "STATE", "SIZE", "LAYERS"
    );
    for i in images {
        let state = match i.state {
            ImageState::Ready => "ready",
            ImageState::Pulling => "pulling",
            ImageState::Failed => "failed",
        };
        let digest = i.digest.as_deref().unwrap_or("-");
        println!(
            "{:<50} {:<8} {:>10} {:>6}  {}",
            i.name,
            state,
            human_bytes(i.size),
            i.layers,
            &digest[..digest.len().min(19)]
        );
        if let Some(error) = &i.error {
            println!("    error: {error}");
        }
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A progress bar on a terminal, plain lines (at most every 2 s) otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Instant>,
    started: Instant,
}

impl Progress {
    fn new(name: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("pulling {name}"));
            bar
        });
        if bar.is_none() {
            eprintln!("pulling {name}");
        }
        Progress {
            bar,
            last_line: None,
            started: Instant::now(),
        }
    }

    fn show(&mut self, image: &ImageStatus) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(image.bytes_total);
                bar.set_position(image.bytes_done);
            }
            None => {
                if self
                    .last_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
                {
                    self.last_line = Some(Instant::now());
                    eprintln!(
                        "{}: {} of {}",
                        image.name,
                        human_bytes(image.bytes_done),
                        human_bytes(image.bytes_total)
                    );
                }
            }
        }
    }

    fn done(self, image: &ImageStatus) -> anyhow::Result<()> {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        println!(
            "{} ready: {} layers, {}, {} ({:.1} s)",
            image.name,
            image.layers,
            human_bytes(image.size),
            image.digest.as_deref().unwrap_or("-"),
            self.started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
