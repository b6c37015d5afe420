//! `trident serve`: wires store, backend, core and API together and runs until a signal.

use std::sync::Arc;

use anyhow::Context;
use trident_api::ApiConfig;
use trident_core::backend::Backend;
use trident_core::{Manager, ManagerConfig};
use trident_sandbox::{Images, NativeBackend, NativeConfig};
use trident_store::SqliteStore;

use crate::config::Settings;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating the data dir {}", settings.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&settings.data_dir)?;
    let store = SqliteStore::open(&data_dir.join("trident.db")).context("opening the database")?;

    let images = Images::new(settings.images.clone()).map_err(anyhow::Error::msg)?;
    let mut native = NativeConfig::new(data_dir.clone(), images);
    native.pids_limit = settings.pids_limit;
    native.min_cpu_cores = settings.min_cpu_cores;
    if let Some(mhz) = settings.cpu_mhz_per_core {
        native.cpu_mhz_per_core = mhz;
    }
    let backend = NativeBackend::new(native)
        .context("starting the native sandbox (trident must run as root)")?;
    let cgroup_version = backend.cgroup_version();
    let cgroup_parent = backend.cgroup_parent().to_string();
    let backend: Arc<dyn Backend> = Arc::new(backend);
    backend.sweep().await?;

    let manager = Manager::new(
        backend,
        Arc::new(store),
        ManagerConfig {
            claim_wait: settings.claim_wait,
            max_concurrent_creations: settings.max_concurrent_creations,
            max_pool_size: settings.max_pool_size,
            pool_depletion_threshold: settings.pool_depletion_threshold,
            ..ManagerConfig::default()
        },
    );
    let restored = manager.restore()?;

    let app = trident_api::router(
        manager.clone(),
        ApiConfig {
            token: settings.token.clone(),
            max_body_bytes: settings.max_body_bytes,
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
    );
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(
        "trident listening on http://{address}/api/v1 (native sandbox, {cgroup_version}, cgroup {cgroup_parent}, data dir {}, {restored} environments restored{})",
        data_dir.display(),
        if settings.token.is_some() { ", token required" } else { "" }
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("shutting down: destroying runners");
    manager.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
