//! Settings: command-line flags and `TRIDENT_*` environment variables win over the YAML
//! config file (`--config`), which wins over the defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

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
    /// Image name → `host` or an absolute root filesystem directory.
    #[serde(default)]
    images: BTreeMap<String, String>,
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
    network: NetworkFileConfig,
    log: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NetworkFileConfig {
    /// false: environments with network access are refused.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The /16 runners of this instance get addresses from (default: 10.x.0.0 with x
    /// derived from the instance id).
    pub subnet: Option<std::net::Ipv4Addr>,
    /// Resolvers for runners (default: the host's non-loopback IPv4 nameservers).
    pub dns: Option<Vec<std::net::Ipv4Addr>>,
    /// The address in `mappedPorts[].hostAddress` (default: the host's first non-loopback
    /// IPv4 address).
    pub advertise_address: Option<String>,
    /// Host ports for exposed ports, e.g. `30000-39999`.
    pub host_ports: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for NetworkFileConfig {
    fn default() -> Self {
        NetworkFileConfig {
            enabled: true,
            subnet: None,
            dns: None,
            advertise_address: None,
            host_ports: None,
        }
    }
}

impl NetworkFileConfig {
    pub fn host_port_range(&self) -> anyhow::Result<(u16, u16)> {
        let Some(range) = &self.host_ports else {
            return Ok((30000, 39999));
        };
        let parsed = range
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
            .filter(|(a, b): &(u16, u16)| a <= b && *a > 0);
        parsed.ok_or_else(|| {
            anyhow::anyhow!("network.host_ports must look like 30000-39999, not {range:?}")
        })
    }
}

#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub registration_token: Option<String>,
    pub data_dir: PathBuf,
    /// The config file read, if any.
    pub config_file: Option<PathBuf>,
    pub images: BTreeMap<String, String>,
    pub claim_wait: Duration,
    pub pool_depletion_threshold: f64,
    pub max_concurrent_creations: usize,
    pub max_pool_size: u32,
    pub max_body_bytes: usize,
    pub pids_limit: u64,
    pub default_memory_mb: Option<u32>,
    pub max_runner_processes: Option<u64>,
    pub lift_file_max: bool,
    pub min_cpu_cores: f64,
    pub cpu_mhz_per_core: Option<f64>,
    pub shutdown_grace: Duration,
    pub connection_limits: trident_http::server::ConnectionLimits,
    pub runner_id_base: u32,
    pub job_request_poll: Duration,
    pub trace_accept_timeout: Duration,
    pub builtin_agent: bool,
    pub builtin_agent_tags: Vec<String>,
    pub builtin_agent_concurrency: usize,
    pub job_stale_after: Duration,
    pub max_artifact_bytes: u64,
    pub max_trace_bytes: u64,
    pub destroy_runners_on_exit: bool,
    pub network: NetworkFileConfig,
    pub log: String,
}

impl Settings {
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => load(path)?,
            None => FileConfig::default(),
        };
        let runner_id_base = file.runner_id_base.unwrap_or(1_000_000_000);
        // Root in a runner must never be a real user of the host (least of all root), and
        // the ranges of many runners must fit below the largest id.
        if !(100_000..=u32::MAX - 65_536 * 1024).contains(&runner_id_base) {
            anyhow::bail!(
                "runner_id_base must be between 100000 and {}, not {runner_id_base}",
                u32::MAX - 65_536 * 1024
            );
        }
        let threshold = file.pool_depletion_threshold.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&threshold) {
            anyhow::bail!("pool_depletion_threshold must be between 0 and 1, not {threshold}");
        }
        Ok(Settings {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7200".parse().expect("valid")),
            token: args.token.or(file.token).filter(|t| !t.is_empty()),
            registration_token: args
                .registration_token
                .or(file.registration_token)
                .filter(|t| !t.is_empty()),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./trident-data")),
            config_file: args.config.clone(),
            images: file.images,
            claim_wait: Duration::from_secs(file.claim_wait_seconds.unwrap_or(10)),
            pool_depletion_threshold: threshold,
            max_concurrent_creations: file.max_concurrent_creations.unwrap_or(4).max(1),
            max_pool_size: file.max_pool_size.unwrap_or(1000),
            max_body_bytes: file.max_body_mb.unwrap_or(64) * 1024 * 1024,
            pids_limit: file.pids_limit.unwrap_or(512),
            default_memory_mb: file.default_memory_limit_mb,
            max_runner_processes: file.max_runner_processes,
            lift_file_max: file.lift_file_max.unwrap_or(true),
            min_cpu_cores: file.min_cpu_cores.unwrap_or(0.25),
            cpu_mhz_per_core: file.cpu_mhz_per_core,
            shutdown_grace: Duration::from_secs(file.shutdown_grace_seconds.unwrap_or(10)),
            connection_limits: {
                let defaults = trident_http::server::ConnectionLimits::default();
                trident_http::server::ConnectionLimits {
                    header_timeout: file
                        .http_header_timeout_seconds
                        .map_or(defaults.header_timeout, |s| Duration::from_secs(s.max(1))),
                    idle_timeout: file
                        .http_idle_timeout_seconds
                        .map_or(defaults.idle_timeout, |s| Duration::from_secs(s.max(1))),
                }
            },
            runner_id_base,
            job_request_poll: Duration::from_secs(file.job_request_poll_seconds.unwrap_or(50)),
            trace_accept_timeout: Duration::from_secs(
                file.trace_accept_timeout_seconds.unwrap_or(300),
            ),
            builtin_agent: !args.no_builtin_agent && file.builtin_agent.unwrap_or(true),
            builtin_agent_tags: args
                .builtin_agent_tags
                .or(file.builtin_agent_tags)
                .unwrap_or_default(),
            builtin_agent_concurrency: file.builtin_agent_concurrency.unwrap_or(2).max(1),
            job_stale_after: Duration::from_secs(file.job_stale_seconds.unwrap_or(1800).max(1)),
            max_artifact_bytes: file.max_artifacts_mb.unwrap_or(100) * 1024 * 1024,
            max_trace_bytes: file.max_trace_mb.unwrap_or(100).max(1) * 1024 * 1024,
            destroy_runners_on_exit: args.destroy_runners_on_exit
                || file.destroy_runners_on_exit.unwrap_or(false),
            network: file.network,
            log: file.log.unwrap_or_else(|| "info".into()),
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
    let has_secret = config.token.is_some() || config.registration_token.is_some();
    if !has_secret {
        return Ok(());
    }
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o004 != 0 {
        anyhow::bail!(
            "the config file {} holds secrets (token, registration_token) and every user of \
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
        assert_eq!(s.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(s.token.as_deref(), Some("from-flag"));
        assert_eq!(s.data_dir, PathBuf::from("./trident-data"));
        assert_eq!(s.images.get("python").map(String::as_str), Some("host"));
        assert_eq!(s.claim_wait, Duration::from_secs(3));
    }

    #[test]
    fn runner_ids_never_reach_real_host_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.yaml");
        std::fs::write(&path, "runner_id_base: 0\n").unwrap();
        let err = Settings::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("runner_id_base"), "{err}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trident.yaml");
        std::fs::write(&path, "listne: 0.0.0.0:9000\n").unwrap();
        let err = Settings::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("listne"), "{err:#}");
    }
}
