//! `trident serve`: wires store, backend, core and API together and runs until a signal.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use anyhow::Context;
use trident_api::ApiConfig;
use trident_core::backend::Backend;
use trident_core::{Manager, ManagerConfig};
use trident_sandbox::{Images, NativeBackend, NativeConfig};
use trident_store::SqliteStore;

use crate::config::Settings;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Installed first: a SIGTERM that arrives while we start must still mean a clean stop.
    let stop_signal = shutdown_signal()?;
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating the data dir {}", settings.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&settings.data_dir)?;
    let store =
        Arc::new(SqliteStore::open(&data_dir.join("trident.db")).context("opening the database")?);

    let images = Images::new(settings.images.clone()).map_err(anyhow::Error::msg)?;
    let mut native = NativeConfig::new(data_dir.clone(), images);
    native.pids_limit = settings.pids_limit;
    native.max_runner_processes = settings.max_runner_processes;
    native.lift_file_max = settings.lift_file_max;
    if let Some(mb) = settings.default_memory_mb.filter(|mb| *mb > 0) {
        native.default_memory_mb = mb;
    }
    native.min_cpu_cores = settings.min_cpu_cores;
    native.first_runner_id = settings.runner_id_base;
    if let Some(mhz) = settings.cpu_mhz_per_core {
        native.cpu_mhz_per_core = mhz;
    }
    native.network = network_config(&settings, &data_dir)?;
    // Runners of the `host` image see /etc and /opt: never trident's own secrets there.
    native.hidden_paths = settings
        .config_file
        .iter()
        .filter_map(|path| std::fs::canonicalize(path).ok())
        .collect();
    let backend = NativeBackend::new(native)
        .context("starting the native sandbox (trident must run as root)")?;
    let cgroup_version = backend.cgroup_version();
    let cgroup_parent = backend.cgroup_parent().to_string();
    let backend = Arc::new(backend);
    let native_backend = backend.clone();
    let backend: Arc<dyn Backend> = backend;

    let manager = Manager::new(
        backend,
        store.clone(),
        ManagerConfig {
            claim_wait: settings.claim_wait,
            max_concurrent_creations: settings.max_concurrent_creations,
            max_pool_size: settings.max_pool_size,
            pool_depletion_threshold: settings.pool_depletion_threshold,
            ..ManagerConfig::default()
        },
    );
    let restored = manager.restore().await?;
    // From here on, whatever appears under this instance without a runner is debris.
    native_backend.start_janitor();

    let coordinator = Arc::new(
        trident_jobs::Coordinator::new(
            store.clone(),
            data_dir.join("traces"),
            trident_jobs::CoordinatorConfig {
                trace_accept_timeout: settings.trace_accept_timeout,
                max_trace_bytes: settings.max_trace_bytes,
            },
        )
        .map_err(anyhow::Error::msg)?,
    );
    let sessions = trident_api::Sessions::default();
    let app = trident_api::router(
        manager.clone(),
        ApiConfig {
            token: settings.token.clone(),
            max_body_bytes: settings.max_body_bytes,
            version: env!("CARGO_PKG_VERSION").to_string(),
            sessions: sessions.clone(),
        },
    )
    .merge(trident_gitlab::router(
        store.clone(),
        coordinator.clone(),
        trident_gitlab::GitlabConfig {
            registration_token: settings.registration_token.clone(),
            api_token: settings.token.clone(),
            request_poll: settings.job_request_poll,
            max_artifact_bytes: settings.max_artifact_bytes,
        },
    ));
    let app = app.layer(axum::middleware::from_fn(trident_http::log_server_errors));
    trident_jobs::watch_for_lost_agents(&coordinator, settings.job_stale_after);
    let listener = listener(&settings).await?;
    let address = listener.local_addr()?;
    if settings.builtin_agent {
        Arc::new(trident_jobs::builtin_agent::BuiltinAgent {
            manager: manager.clone(),
            coordinator,
            tags: settings.builtin_agent_tags.clone(),
            server_url: format!("http://{address}"),
            max_artifact_bytes: settings.max_artifact_bytes,
        })
        .start(settings.builtin_agent_concurrency);
    }
    tracing::info!(
        "trident listening on http://{address}/api/v1 (native sandbox, {cgroup_version}, cgroup {cgroup_parent}, data dir {}, restored {} environments, {} idle and {} used runners{})",
        data_dir.display(),
        restored.environments,
        restored.idle,
        restored.used,
        if settings.token.is_some() { ", token required" } else { "" }
    );
    systemd_ready();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = trident_http::server::serve(
        listener,
        app,
        settings.connection_limits,
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
            let deadline = tokio::time::Instant::now() + settings.shutdown_grace;
            if tokio::time::timeout_at(deadline, &mut server).await.is_err() {
                tracing::warn!(grace = ?settings.shutdown_grace, "cutting connections still open");
            }
            // WebSockets of running executions outlive their HTTP connections and may never
            // end by themselves: they get the same grace period, then are cut, which kills
            // their executions (the runners stay).
            sessions.drain(deadline).await;
        }
    }
    if settings.destroy_runners_on_exit {
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
async fn listener(settings: &Settings) -> anyhow::Result<tokio::net::TcpListener> {
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
    tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))
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

/// Network settings with their defaults filled in from the host.
fn network_config(
    settings: &Settings,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<trident_sandbox::network::NetworkConfig>> {
    let file = &settings.network;
    if !file.enabled {
        return Ok(None);
    }
    let instance = trident_sandbox::native::instance_id(data_dir)?;
    let x = 200 + u8::from_str_radix(&instance[..2], 16).unwrap_or(0) % 50;
    let subnet = file
        .subnet
        .unwrap_or_else(|| std::net::Ipv4Addr::new(10, x, 0, 0));
    let dns = file.dns.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<std::net::Ipv4Addr>().ok())
            .filter(|a| !a.is_loopback())
            .collect()
    });
    let advertise = match &file.advertise_address {
        Some(address) => address.clone(),
        None => primary_ipv4().unwrap_or_else(|| "127.0.0.1".into()),
    };
    Ok(Some(trident_sandbox::network::NetworkConfig {
        bridge: format!(
            "{}{}",
            trident_sandbox::network::IF_PREFIX,
            &instance[..12.min(instance.len())]
        ),
        subnet,
        dns,
        advertise,
        ports: file.host_port_range()?,
    }))
}

/// The source address of the host's default route.
fn primary_ipv4() -> Option<String> {
    let output = std::process::Command::new("ip")
        .args(["-o", "-4", "route", "get", "192.0.2.255"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "src")?;
    words.next().map(String::from)
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
