//! `trident serve`: wires store, backend, core and API together and runs until a signal.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use anyhow::Context;
use trident_core::backend::Backend;
use trident_core::Manager;
use trident_sandbox::NativeBackend;
use trident_store::SqliteStore;

use crate::config::Settings;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Installed first: a SIGTERM that arrives while we start must still mean a clean stop.
    let stop_signal = shutdown_signal()?;
    let Settings {
        server: process,
        manager: manager_config,
        api: api_config,
        gitlab: gitlab_config,
        coordinator: coordinator_config,
        agent: agent_config,
        mut native,
        network,
        images: image_settings,
    } = settings;
    std::fs::create_dir_all(&process.data_dir)
        .with_context(|| format!("creating the data dir {}", process.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&process.data_dir)?;
    let store =
        Arc::new(SqliteStore::open(&data_dir.join("trident.db")).context("opening the database")?);

    let instance = trident_sandbox::native::instance_id(&data_dir)?;
    native.data_dir = data_dir.clone();
    native.network = network.resolve(&instance).map_err(anyhow::Error::msg)?;
    // Runners of the `host` image see /etc and /opt: never trident's own secrets there.
    native.hidden_paths = process
        .config_file
        .iter()
        .filter_map(|path| std::fs::canonicalize(path).ok())
        .collect();
    // Images the `images:` table does not name come from the store: pulled from registries
    // or loaded from the table's offline archives.
    let image_store =
        trident_images::ImageStore::open(data_dir.join("images"), image_settings.registry)
            .map_err(|e| anyhow::anyhow!("opening the image store: {e}"))?;
    let store_images =
        crate::images::StoreImages::new(image_store.clone(), image_settings.archives);
    native
        .images
        .set_resolver(Arc::new(crate::images::Resolver(store_images.clone())));
    let mut api_config = api_config;
    api_config.images = Some(Arc::new(crate::images::Resolver(store_images.clone())));
    let backend = NativeBackend::new(native)
        .context("starting the native sandbox (trident must run as root)")?;
    let cgroup_version = backend.cgroup_version();
    let cgroup_parent = backend.cgroup_parent().to_string();
    let backend = Arc::new(backend);
    let native_backend = backend.clone();
    let backend: Arc<dyn Backend> = backend;

    let manager = Manager::new(backend, store.clone(), manager_config);
    // Pulls a crash cut short go on; archives of the table load in the background.
    image_store.resume_pending();
    store_images.load_archives();
    let restored = manager.restore().await?;
    // From here on, whatever appears under this instance without a runner is debris.
    native_backend.start_janitor();

    let coordinator = Arc::new(
        trident_jobs::Coordinator::new(store.clone(), data_dir.join("traces"), coordinator_config)
            .map_err(anyhow::Error::msg)?,
    );
    let sessions = api_config.sessions.clone();
    let token_required = api_config.token.is_some();
    let max_artifact_bytes = gitlab_config.max_artifact_bytes;
    let app = trident_api::router(manager.clone(), api_config)
        .merge(trident_gitlab::router(
            store.clone(),
            coordinator.clone(),
            gitlab_config,
        ))
        .layer(axum::middleware::from_fn(trident_http::log_server_errors));
    trident_jobs::watch_for_lost_agents(&coordinator);
    let listener = listener(process.listen).await?;
    let address = listener.local_addr()?;
    if agent_config.enabled {
        Arc::new(trident_jobs::builtin_agent::BuiltinAgent {
            manager: manager.clone(),
            coordinator,
            tags: agent_config.tags,
            server_url: format!("http://{address}"),
            max_artifact_bytes,
        })
        .start(agent_config.concurrency);
    }
    tracing::info!(
        "trident listening on http://{address}/api/v1 (native sandbox, {cgroup_version}, cgroup {cgroup_parent}, data dir {}, restored {} environments, {} idle and {} used runners{})",
        data_dir.display(),
        restored.environments,
        restored.idle,
        restored.used,
        if token_required { ", token required" } else { "" }
    );
    systemd_ready();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = trident_http::server::serve(
        listener,
        app,
        process.connection_limits,
        trident_gitlab::normalize_path,
        async move {
            let mut stop_rx = stop_rx;
            let _ = stop_rx.wait_for(|stop| *stop).await;
        },
    );
    let mut server = std::pin::pin!(server);
    tokio::select! {
        () = &mut server => {}
        () = stop_signal => {
            tracing::info!("stopping: no new connections; finishing requests in flight");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            let _ = stop_tx.send(true);
            let deadline = tokio::time::Instant::now() + process.shutdown_grace;
            if tokio::time::timeout_at(deadline, &mut server).await.is_err() {
                tracing::warn!(grace = ?process.shutdown_grace, "cutting connections still open");
            }
            // WebSockets of running executions outlive their HTTP connections and may never
            // end by themselves: they get the same grace period, then are cut, which kills
            // their executions (the runners stay).
            sessions.drain(deadline).await;
        }
    }
    if process.destroy_runners_on_exit {
        tracing::info!("destroying all runners (--destroy-runners-on-exit)");
        manager.destroy_all_runners().await;
        // Anything still under our cgroup parent or runners dir is debris (e.g. a runner an
        // earlier life of the server was still starting when it died): leave nothing.
        if let Err(e) = native_backend.sweep(&[]).await {
            tracing::warn!(error = %e, "final sweep failed");
        }
        native_backend.teardown();
    } else {
        tracing::info!("runners keep running; the next start takes them over");
    }
    Ok(())
}

/// A socket handed over by systemd (socket activation: connections queue while trident
/// restarts), or a fresh one.
async fn listener(address: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let mut fds = listenfd::ListenFd::from_env();
    if let Some(std_listener) = fds.take_tcp_listener(0)? {
        // Runner-inits must never inherit it.
        nix::fcntl::fcntl(
            std_listener.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        std_listener.set_nonblocking(true)?;
        tracing::info!("using the listening socket passed by the service manager");
        return Ok(tokio::net::TcpListener::from_std(std_listener)?);
    }
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))
}

/// Tells systemd we are ready and, when it asks for a watchdog, keeps petting it from the
/// runtime (a wedged runtime stops the pets and systemd restarts the service).
fn systemd_ready() {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

/// Resolves on the first SIGTERM or SIGINT; the handlers are in place once this returns.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
