//! Settings: command-line flags and `TRIDENT_*` environment variables win over the YAML
//! config file (`--config`), which wins over the defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use trident_api::ApiConfig;
use trident_core::ManagerConfig;
use trident_gitlab::GitlabConfig;
use trident_http::server::ConnectionLimits;
use trident_images::RegistryConfig;
use trident_jobs::builtin_agent::BuiltinAgentConfig;
use trident_jobs::CoordinatorConfig;
use trident_sandbox::network::NetworkSettings;
use trident_sandbox::{ImageEntry, Images, NativeConfig};

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7200]
    #[arg(long, env = "TRIDENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Require this value in the Poseidon-Token header (all routes but /health and /version)
    #[arg(long, env = "TRIDENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the database and runner state live [default: ./trident-data]
    #[arg(long, env = "TRIDENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A YAML file with the same settings (and the `images:` table)
    #[arg(long, env = "TRIDENT_CONFIG")]
    config: Option<PathBuf>,
    /// Runner agents register with this token on the GitLab Runner API (/api/v4); without
    /// it, registration is refused
    #[arg(long, env = "TRIDENT_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
    /// Do not run jobs on this machine (only external agents take them)
    #[arg(long, env = "TRIDENT_NO_BUILTIN_AGENT")]
    no_builtin_agent: bool,
    /// Tags of the built-in agent (comma-separated); it also runs untagged jobs
    #[arg(long, env = "TRIDENT_BUILTIN_AGENT_TAGS", value_delimiter = ',')]
    builtin_agent_tags: Option<Vec<String>>,
    /// Destroy all runners when stopping (by default they keep running and the next start
    /// takes them over, so clients keep their runners across a restart)
    #[arg(long, env = "TRIDENT_DESTROY_RUNNERS_ON_EXIT")]
    destroy_runners_on_exit: bool,
}

/// The config file. Every key is optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    token: Option<String>,
    registration_token: Option<String>,
    data_dir: Option<PathBuf>,
    /// Image name → `host`, an absolute root filesystem directory, or
    /// `{layers: [bottom, ..., top], env: ["K=V", ...]}` (unpacked layer directories).
    #[serde(default)]
    images: BTreeMap<String, ImageEntry>,
    /// Credentials per registry host (`registry.example.org: {username, password}`).
    #[serde(default)]
    registry_auth: BTreeMap<String, trident_images::Credentials>,
    /// Docker's credentials file; its `auths` are used for registries not in registry_auth.
    docker_config: Option<PathBuf>,
    /// Registries (`host:port`) reached over plain HTTP, as Docker's daemon.json names them.
    #[serde(default)]
    insecure_registries: Vec<String>,
    /// Mirrors tried first for Docker Hub images, as Docker's `registry-mirrors`.
    #[serde(default)]
    registry_mirrors: Vec<String>,
    /// Largest unpacked layer, in MB.
    max_layer_mb: Option<u64>,
    /// How long a claim waits for a runner being created when the pool is empty.
    claim_wait_seconds: Option<u64>,
    /// /health answers 503 PREWARMING_POOL_DEPLETING below this idle/pool ratio (0 = off).
    pool_depletion_threshold: Option<f64>,
    max_concurrent_creations: Option<usize>,
    max_pool_size: Option<u32>,
    max_body_mb: Option<usize>,
    /// Processes per runner (fork bombs stop here).
    pids_limit: Option<u64>,
    /// Memory of runners whose environment has `memoryLimit: 0`, in MB.
    default_memory_limit_mb: Option<u32>,
    /// Processes all runners together may have (default: 3/4 of the host's pid table).
    max_runner_processes: Option<u64>,
    /// Lift fs.file-max to its maximum at start, as systemd does (default true).
    lift_file_max: Option<bool>,
    /// No runner gets less than this share of a core, whatever its cpuLimit.
    min_cpu_cores: Option<f64>,
    /// Clock of one core for the cpuLimit MHz → quota conversion (default: /proc/cpuinfo).
    cpu_mhz_per_core: Option<f64>,
    /// On SIGTERM, how long requests and executions in flight may take before they are cut.
    shutdown_grace_seconds: Option<u64>,
    /// A client must send a whole request header within this long (slow clients are cut).
    http_header_timeout_seconds: Option<u64>,
    /// A keep-alive connection waiting longer than this for its next request is closed.
    http_idle_timeout_seconds: Option<u64>,
    /// Run jobs on this machine with the built-in agent (default true).
    builtin_agent: Option<bool>,
    builtin_agent_tags: Option<Vec<String>>,
    /// Jobs the built-in agent runs at once (default 2).
    builtin_agent_concurrency: Option<usize>,
    /// A running job whose agent sent nothing for this long fails with runner_system_failure.
    job_stale_seconds: Option<u64>,
    /// Largest artifact file accepted, in MB (default 100).
    max_artifacts_mb: Option<u64>,
    /// Largest job trace kept, in MB (default 100, GitLab's); past it the job fails.
    max_trace_mb: Option<u64>,
    /// How long `POST /api/v4/jobs/request` waits for a job (GitLab's proxy: 50 s; 0 = at once).
    job_request_poll_seconds: Option<u64>,
    /// How long a job's final state may wait (202) for the rest of a trace that does not
    /// match the agent's checksum yet (GitLab: 5 minutes).
    trace_accept_timeout_seconds: Option<u64>,
    /// Host id of root in the first runner's user namespace (each runner takes 65536 ids);
    /// give each trident instance on a host its own range.
    runner_id_base: Option<u32>,
    destroy_runners_on_exit: Option<bool>,
    /// Network access for environments with `networkAccess: true`.
    #[serde(default)]
    network: NetworkSettings,
    log: Option<String>,
}

/// The settings of the server process itself (the components have theirs).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The config file read, if any.
    pub config_file: Option<PathBuf>,
    /// On SIGTERM, how long requests and executions in flight may take before they are cut.
    pub shutdown_grace: Duration,
    pub connection_limits: ConnectionLimits,
    pub destroy_runners_on_exit: bool,
    /// The log filter when `TRIDENT_LOG` is not set.
    pub log: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 7200)),
            data_dir: PathBuf::from("./trident-data"),
            config_file: None,
            shutdown_grace: Duration::from_secs(10),
            connection_limits: ConnectionLimits::default(),
            destroy_runners_on_exit: false,
            log: "info".into(),
        }
    }
}

/// Everything `serve` composes, each part in its component's own config type. Defaults live
/// only in those types' `Default` (or `NativeConfig::new`); this file maps the flags and the
/// file's keys onto them.
pub struct Settings {
    pub server: ServerSettings,
    pub manager: ManagerConfig,
    pub api: ApiConfig,
    pub gitlab: GitlabConfig,
    pub coordinator: CoordinatorConfig,
    pub agent: BuiltinAgentConfig,
    /// Its `data_dir` is the one configured; `serve` makes it absolute.
    pub native: NativeConfig,
    pub network: NetworkSettings,
    pub images: ImageSettings,
}

/// The image store's part of the settings.
#[derive(Debug, Clone, Default)]
pub struct ImageSettings {
    pub registry: RegistryConfig,
    /// `images:` names loaded from offline archives: name → `docker-archive:/…`,
    /// `oci-archive:/…` or `oci:/…`.
    pub archives: BTreeMap<String, String>,
}

const ARCHIVE_PREFIXES: [&str; 3] = ["docker-archive:", "oci-archive:", "oci:"];

impl FileConfig {
    fn registry(&self) -> RegistryConfig {
        let mut registry = RegistryConfig {
            registry_auth: self.registry_auth.clone(),
            docker_config: self.docker_config.clone(),
            insecure_registries: self.insecure_registries.clone(),
            registry_mirrors: self.registry_mirrors.clone(),
            ..RegistryConfig::default()
        };
        if let Some(mb) = self.max_layer_mb {
            registry.max_layer_bytes = mb.max(1).saturating_mul(MIB);
        }
        registry
    }

    /// Splits the `images:` table: offline archives go to the image store, the rest (`host`,
    /// directories, layer lists) to the sandbox's table.
    fn split_images(&mut self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut archives = BTreeMap::new();
        let names: Vec<String> = self.images.keys().cloned().collect();
        for name in names {
            let ImageEntry::Path(source) = &self.images[&name] else {
                continue;
            };
            if !ARCHIVE_PREFIXES.iter().any(|p| source.starts_with(p)) {
                continue;
            }
            trident_images::normalize_reference(&name).map_err(|e| {
                anyhow::anyhow!("images: {name:?} (an archive) must be named like an image: {e}")
            })?;
            let path = source.split_once(':').map_or("", |(_, p)| p);
            if !path.starts_with('/') {
                anyhow::bail!("images: {name}: the archive path in {source:?} must be absolute");
            }
            archives.insert(name.clone(), source.clone());
            self.images.remove(&name);
        }
        Ok(archives)
    }
}

/// The registry settings of a config file (for `trident image --data-dir`).
pub fn registry_settings(path: Option<&Path>) -> anyhow::Result<RegistryConfig> {
    match path {
        Some(path) => Ok(load(path)?.registry()),
        None => Ok(RegistryConfig::default()),
    }
}

/// `value` seconds, or `default` when the key is absent.
fn seconds(value: Option<u64>, default: Duration) -> Duration {
    value.map_or(default, Duration::from_secs)
}

/// Like [`seconds`], but never below one second (zero would mean "at once" where that
/// makes no sense).
fn seconds_at_least_one(value: Option<u64>, default: Duration) -> Duration {
    value.map_or(default, |s| Duration::from_secs(s.max(1)))
}

const MIB: u64 = 1024 * 1024;

impl Settings {
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Settings> {
        let mut file = match &args.config {
            Some(path) => load(path)?,
            None => FileConfig::default(),
        };
        let images = ImageSettings {
            registry: file.registry(),
            archives: file.split_images()?,
        };

        let mut server = ServerSettings::default();
        server.listen = args.listen.or(file.listen).unwrap_or(server.listen);
        server.data_dir = args.data_dir.or(file.data_dir).unwrap_or(server.data_dir);
        server.config_file = args.config.clone();
        server.shutdown_grace = seconds(file.shutdown_grace_seconds, server.shutdown_grace);
        let limits = &mut server.connection_limits;
        limits.header_timeout =
            seconds_at_least_one(file.http_header_timeout_seconds, limits.header_timeout);
        limits.idle_timeout =
            seconds_at_least_one(file.http_idle_timeout_seconds, limits.idle_timeout);
        server.destroy_runners_on_exit = args.destroy_runners_on_exit
            || file
                .destroy_runners_on_exit
                .unwrap_or(server.destroy_runners_on_exit);
        server.log = file.log.unwrap_or(server.log);

        let mut manager = ManagerConfig::default();
        manager.claim_wait = seconds(file.claim_wait_seconds, manager.claim_wait);
        manager.max_concurrent_creations = file
            .max_concurrent_creations
            .unwrap_or(manager.max_concurrent_creations)
            .max(1);
        manager.max_pool_size = file.max_pool_size.unwrap_or(manager.max_pool_size);
        manager.pool_depletion_threshold = file
            .pool_depletion_threshold
            .unwrap_or(manager.pool_depletion_threshold);
        let threshold = manager.pool_depletion_threshold;
        if !(0.0..=1.0).contains(&threshold) {
            anyhow::bail!("pool_depletion_threshold must be between 0 and 1, not {threshold}");
        }

        let token = args.token.or(file.token).filter(|t| !t.is_empty());
        let mut api = ApiConfig {
            token: token.clone(),
            ..ApiConfig::default()
        };
        if let Some(mb) = file.max_body_mb {
            api.max_body_bytes = mb.saturating_mul(MIB as usize);
        }

        let mut gitlab = GitlabConfig {
            registration_token: args
                .registration_token
                .or(file.registration_token)
                .filter(|t| !t.is_empty()),
            api_token: token,
            ..GitlabConfig::default()
        };
        gitlab.request_poll = seconds(file.job_request_poll_seconds, gitlab.request_poll);
        if let Some(mb) = file.max_artifacts_mb {
            gitlab.max_artifact_bytes = mb.saturating_mul(MIB);
        }

        let mut coordinator = CoordinatorConfig::default();
        coordinator.trace_accept_timeout = seconds(
            file.trace_accept_timeout_seconds,
            coordinator.trace_accept_timeout,
        );
        if let Some(mb) = file.max_trace_mb {
            coordinator.max_trace_bytes = mb.max(1).saturating_mul(MIB);
        }
        coordinator.stale_after =
            seconds_at_least_one(file.job_stale_seconds, coordinator.stale_after);

        let mut agent = BuiltinAgentConfig::default();
        agent.enabled = !args.no_builtin_agent && file.builtin_agent.unwrap_or(agent.enabled);
        agent.tags = args
            .builtin_agent_tags
            .or(file.builtin_agent_tags)
            .unwrap_or(agent.tags);
        agent.concurrency = file
            .builtin_agent_concurrency
            .unwrap_or(agent.concurrency)
            .max(1);

        let table =
            Images::from_entries(std::mem::take(&mut file.images)).map_err(anyhow::Error::msg)?;
        let mut native = NativeConfig::new(server.data_dir.clone(), table);
        native.pids_limit = file.pids_limit.unwrap_or(native.pids_limit);
        // 0 is what the reference's clients send for "no explicit limit": the default.
        if let Some(mb) = file.default_memory_limit_mb.filter(|mb| *mb > 0) {
            native.default_memory_mb = mb;
        }
        native.max_runner_processes = file.max_runner_processes.or(native.max_runner_processes);
        native.lift_file_max = file.lift_file_max.unwrap_or(native.lift_file_max);
        native.min_cpu_cores = file.min_cpu_cores.unwrap_or(native.min_cpu_cores);
        native.cpu_mhz_per_core = file.cpu_mhz_per_core.unwrap_or(native.cpu_mhz_per_core);
        native.first_runner_id = file.runner_id_base.unwrap_or(native.first_runner_id);
        // Root in a runner must never be a real user of the host (least of all root), and
        // the ranges of many runners must fit below the largest id.
        let highest_base = u32::MAX - 65_536 * 1024;
        if !(100_000..=highest_base).contains(&native.first_runner_id) {
            anyhow::bail!(
                "runner_id_base must be between 100000 and {highest_base}, not {}",
                native.first_runner_id
            );
        }
        file.network.host_port_range().map_err(anyhow::Error::msg)?;

        Ok(Settings {
            server,
            manager,
            api,
            gitlab,
            coordinator,
            agent,
            native,
            network: file.network,
            images,
        })
    }
}

fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let config: FileConfig = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("in the config file {}", path.display()))?;
    check_secrets_are_private(path, &config)?;
    Ok(config)
}

/// A config file holding a secret (the API token, the registration token) must not be
/// readable by other users of the host: with it, anyone could run commands in every runner.
fn check_secrets_are_private(path: &Path, config: &FileConfig) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let has_secret = config.token.is_some()
        || config.registration_token.is_some()
        || !config.registry_auth.is_empty();
    if !has_secret {
        return Ok(());
    }
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o004 != 0 {
        anyhow::bail!(
            "the config file {} holds secrets (token, registration_token, registry_auth) and every user of \
             this host can read it (mode {:o}); make it private: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    if mode & 0o040 != 0 {
        // Logging is not set up yet (its level comes from this file).
        eprintln!(
            "warning: the config file {} holds secrets and its group can read it; consider \
             chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.yaml");
        std::fs::write(
            &path,
            "listen: 0.0.0.0:9000\ntoken: from-file\nimages:\n  python: host\nclaim_wait_seconds: 3\n",
        )
        .unwrap();
        // A file holding a token must be private (see check_secrets_are_private).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let args = ServeArgs {
            token: Some("from-flag".into()),
            config: Some(path),
            ..Default::default()
        };
        let s = Settings::resolve(args).unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(s.api.token.as_deref(), Some("from-flag"));
        assert_eq!(s.gitlab.api_token.as_deref(), Some("from-flag"));
        assert_eq!(s.server.data_dir, PathBuf::from("./trident-data"));
        assert!(s.native.images.resolve("python").is_ok());
        assert_eq!(s.manager.claim_wait, Duration::from_secs(3));
        // Untouched keys keep their components' defaults.
        assert_eq!(
            s.coordinator.max_trace_bytes,
            CoordinatorConfig::default().max_trace_bytes
        );
    }

    #[test]
    fn runner_ids_never_reach_real_host_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.yaml");
        std::fs::write(&path, "runner_id_base: 0\n").unwrap();
        let Err(err) = Settings::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        }) else {
            panic!("accepted");
        };
        assert!(err.to_string().contains("runner_id_base"), "{err}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.yaml");
        std::fs::write(&path, "listne: 0.0.0.0:9000\n").unwrap();
        let Err(err) = Settings::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        }) else {
            panic!("accepted");
        };
        assert!(format!("{err:#}").contains("listne"), "{err:#}");
    }
}
