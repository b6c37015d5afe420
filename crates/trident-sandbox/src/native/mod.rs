//! The server side of the native sandbox: starts runner-inits, talks to them over their
//! control sockets, and tears runners down through their cgroups.
//!
//! - `create.rs`: making a runner (its spec, its network, starting runner-init).
//! - `adopt.rs`: taking over a runner an earlier life of the server left running.
//! - `janitor.rs`: removing what nobody knows of (a crash's leftovers), at start and every
//!   few seconds.
//! - `sandbox.rs`: one runner: files over its control socket, its destruction.
//! - `execute.rs`: executions (a pty, a pipe, the exit over the socket).
//! - `leases.rs`: the id ranges, host ports and known ids a runner holds, freed by `Drop`.
//! - `spawn.rs`: starting a runner-init as pid 1 of its own pid namespace (a hand-made
//!   vfork-style clone: std's `Command` takes no clone flags).

mod adopt;
mod create;
mod execute;
mod janitor;
mod leases;
mod sandbox;
mod spawn;

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use trident_core::backend::{Backend, BackendError, BackendResult, RunnerSpec, Sandbox};
use trident_core::model::ExecutionEnvironment;

use crate::cgroup::Cgroups;
use crate::host_limits;
use crate::images::Images;
use crate::network::{self, NetworkConfig};
use crate::spec::IDS_PER_RUNNER;

pub use sandbox::NativeSandbox;

#[derive(Debug, Clone)]
pub struct NativeConfig {
    pub data_dir: PathBuf,
    pub images: Images,
    /// Processes (and threads) per runner.
    pub pids_limit: u64,
    /// The memory of runners whose environment says `memoryLimit: 0`, in MB (what the
    /// reference passes on to its scheduler as "no explicit limit"; CodeOcean's default).
    pub default_memory_mb: u32,
    /// Clock of one core, to turn `cpuLimit` MHz into a CPU quota.
    pub cpu_mhz_per_core: f64,
    /// No runner gets less CPU than this fraction of a core, so that a client's tiny MHz
    /// figures (CodeOcean's default is 20 MHz) still leave programs usable.
    pub min_cpu_cores: f64,
    /// The uid and gid of `user` inside runners.
    pub user_uid: u32,
    pub user_gid: u32,
    /// How long a new runner may take to become ready.
    pub start_timeout: Duration,
    /// Host id of root in the first runner; runner n gets the 65536 ids from
    /// `first_runner_id + n * 65536` for its user namespace.
    pub first_runner_id: u32,
    /// How runners of environments with network access reach the outside (None: such
    /// environments are refused).
    pub network: Option<NetworkConfig>,
    /// Host paths no runner may see (the config file; the data dir is always added).
    pub hidden_paths: Vec<PathBuf>,
    /// Processes all runners of this instance may have together (None: three quarters of
    /// the host's process table).
    pub max_runner_processes: Option<u64>,
    /// Lift `fs.file-max` to its maximum at start, as systemd does (see `host_limits`).
    pub lift_file_max: bool,
}

impl NativeConfig {
    pub fn new(data_dir: PathBuf, images: Images) -> NativeConfig {
        NativeConfig {
            data_dir,
            images,
            pids_limit: 512,
            default_memory_mb: 256,
            cpu_mhz_per_core: detect_cpu_mhz(),
            min_cpu_cores: 0.25,
            user_uid: 1000,
            user_gid: 1000,
            start_timeout: Duration::from_secs(30),
            first_runner_id: 1_000_000_000,
            network: None,
            hidden_paths: Vec::new(),
            max_runner_processes: None,
            lift_file_max: true,
        }
    }
}

/// The clock of the first core from /proc/cpuinfo, or 2000 MHz when the kernel does not say.
pub fn detect_cpu_mhz() -> f64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(2000.0)
}

pub struct NativeBackend {
    config: NativeConfig,
    cgroups: Cgroups,
    /// Parent of this server's runner cgroups; unique per data dir, so that several trident
    /// instances on one host never sweep each other's runners.
    cgroup_parent: String,
    runners_dir: PathBuf,
    exe: PathBuf,
    /// Ids of the runners this server is making or holds (each held by a `KnownGuard`).
    /// Anything else found under our cgroup parent or runners dir is debris (e.g. a
    /// runner-init that an earlier life of the server started just before it crashed) and
    /// the janitor removes it.
    known: Arc<Mutex<HashSet<String>>>,
    /// Id ranges (user namespaces) in use, by slot number; a slot also numbers the
    /// runner's network address.
    id_slots: Arc<Mutex<BTreeSet<u32>>>,
    /// Host ports handed out for exposed ports.
    host_ports: Arc<Mutex<BTreeSet<u16>>>,
    /// The host is prepared for networking (bridge, firewall) on first use.
    network_ready: tokio::sync::OnceCell<()>,
    /// The janitor is started once (`start_janitor`).
    janitor: std::sync::Once,
    /// Runners without idmapped lowers are logged once per server life.
    idmap_refused: std::sync::Once,
}

impl NativeBackend {
    pub fn new(config: NativeConfig) -> anyhow::Result<NativeBackend> {
        let cgroups = Cgroups::detect()?;
        let instance = instance_id(&config.data_dir)?;
        let runners_dir = config.data_dir.join("runners");
        std::fs::create_dir_all(&runners_dir)?;
        std::fs::set_permissions(&runners_dir, std::fs::Permissions::from_mode(0o700))?;
        let cgroup_parent = format!("trident/{instance}");
        // All runners together can never take the host's whole process table.
        let processes = config
            .max_runner_processes
            .unwrap_or_else(host_limits::runner_processes);
        cgroups
            .limit_subtree(&cgroup_parent, processes)
            .map_err(|e| anyhow::anyhow!("limiting the processes of all runners: {e}"))?;
        // An idle runner is one process (its runner-init), a running execution two more (its
        // handler and command): this bounds how many runners the instance can hold, and a
        // creation past it fails with EAGAIN.
        tracing::info!(
            processes,
            idle_runners = processes,
            "all runners together may have this many processes (three quarters of \
             kernel.pid_max or threads-max, or max_runner_processes): raise kernel.pid_max \
             for more runners"
        );
        if config.lift_file_max {
            match host_limits::lift_file_max() {
                Ok(Some(before)) => tracing::info!(
                    before,
                    "fs.file-max lifted to its maximum, as systemd does (open files are charged to each runner's memory)"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot lift fs.file-max: one runner may exhaust the host's file table"),
            }
        }
        Ok(NativeBackend {
            cgroups,
            cgroup_parent,
            runners_dir,
            exe: std::env::current_exe()?,
            config,
            known: Arc::default(),
            janitor: std::sync::Once::new(),
            idmap_refused: std::sync::Once::new(),
            id_slots: Arc::default(),
            host_ports: Arc::default(),
            network_ready: tokio::sync::OnceCell::new(),
        })
    }

    pub fn cgroup_version(&self) -> crate::cgroup::CgroupVersion {
        self.cgroups.version()
    }

    /// Gives back what this instance set up on the host for networking, once no runner
    /// needs it (after all runners were destroyed).
    pub fn teardown(&self) {
        if let Some(config) = &self.config.network {
            network::teardown_host(config);
        }
        if self.cgroups.children(&self.cgroup_parent).is_empty() {
            self.cgroups.remove(&self.cgroup_parent);
        }
    }

    /// The image table runners are made from: shared with every clone of it, so that images
    /// registered there at run time (`Images::insert`) are used by the next creations.
    pub fn images(&self) -> &Images {
        &self.config.images
    }

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    fn max_slots(&self) -> u32 {
        ((u32::MAX - self.config.first_runner_id) / IDS_PER_RUNNER).saturating_sub(1)
    }
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

/// A random id kept in the data dir, naming this installation's cgroups.
pub fn instance_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(id.to_string());
        }
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(&path, &id)?;
    Ok(id)
}

#[async_trait]
impl Backend for NativeBackend {
    fn validate(&self, environment: &ExecutionEnvironment) -> Result<(), String> {
        if environment.network_access && self.config.network.is_none() {
            return Err(
                "network access is not configured on this server (see `network:` in the config)"
                    .into(),
            );
        }
        self.config.images.check(&environment.image)
    }

    fn prepare(&self, environment: &ExecutionEnvironment) {
        self.config.images.prepare(&environment.image);
    }

    fn readiness(&self, environment: &ExecutionEnvironment) -> trident_core::backend::Readiness {
        self.config.images.readiness(&environment.image)
    }

    async fn create_runner(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>> {
        Ok(Box::new(self.create(spec).await?))
    }

    async fn adopt(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>> {
        Ok(Box::new(self.adopt_runner(spec).await?))
    }

    async fn sweep(&self, keep: &[String]) -> BackendResult<()> {
        self.sweep_unknown(keep).await
    }
}
