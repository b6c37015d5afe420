//! The server side of the native sandbox: starts runner-inits, talks to them over their
//! control sockets, and tears runners down through their cgroups.

use std::collections::{BTreeSet, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use trident_core::backend::{
    Backend, BackendError, BackendExecution, BackendResult, ExecSpec, ExitOutcome, FileDownload,
    RunnerSpec, Sandbox,
};
use trident_core::model::{ExecutionEnvironment, FileCopy, FileHeader, MappedPort};

use crate::cgroup::Cgroups;
use crate::fdio::FdStream;
use crate::host_limits;
use crate::images::Images;
use crate::network::{self, NetworkConfig, RunnerNetwork};
use crate::protocol::{recv_frame, send_frame, Request, Response, MAX_FRAME};
use crate::spec::{InitSpec, IDS_PER_RUNNER};

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
    /// Ids of the runners this server is making or holds. Anything else found under our
    /// cgroup parent or runners dir is debris (e.g. a runner-init that an earlier life of the
    /// server started just before it crashed) and the janitor removes it.
    known: Arc<Mutex<HashSet<String>>>,
    janitor_started: AtomicBool,
    /// Id ranges (user namespaces) in use, by slot number; a slot also numbers the
    /// runner's network address.
    id_slots: Arc<Mutex<BTreeSet<u32>>>,
    /// Host ports handed out for exposed ports.
    host_ports: Arc<Mutex<BTreeSet<u16>>>,
    /// The host is prepared for networking (bridge, firewall) on first use.
    network_ready: tokio::sync::OnceCell<()>,
}

/// How often leftovers nobody knows of are looked for.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);

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
            janitor_started: AtomicBool::new(false),
            id_slots: Arc::default(),
            host_ports: Arc::default(),
            network_ready: tokio::sync::OnceCell::new(),
        })
    }

    pub fn cgroup_version(&self) -> crate::cgroup::CgroupVersion {
        self.cgroups.version()
    }

    fn advertise(&self) -> String {
        self.config
            .network
            .as_ref()
            .map(|n| n.advertise.clone())
            .unwrap_or_default()
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

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    fn max_slots(&self) -> u32 {
        ((u32::MAX - self.config.first_runner_id) / IDS_PER_RUNNER).saturating_sub(1)
    }

    /// Takes the lowest free id range.
    fn take_slot(&self) -> Result<u32, String> {
        let mut slots = self.id_slots.lock().unwrap();
        let slot = (0..self.max_slots())
            .find(|s| !slots.contains(s))
            .ok_or("no free user id range for another runner")?;
        slots.insert(slot);
        Ok(slot)
    }

    /// The network of a new runner: its address (from its slot) and free host ports for
    /// its exposed ports.
    fn runner_network(
        &self,
        spec: &RunnerSpec,
        slot: u32,
    ) -> Result<Option<RunnerNetwork>, String> {
        let env = &spec.environment;
        if !env.network_access {
            return Ok(None);
        }
        let config = self
            .config
            .network
            .as_ref()
            .ok_or("network access is not configured on this server")?;
        let address = config.address(slot).ok_or("no network address left")?;
        let mut taken = self.host_ports.lock().unwrap();
        let mut ports = Vec::new();
        let mut candidates = config.ports.0..=config.ports.1;
        for &inside in &env.exposed_ports {
            let host = candidates
                .by_ref()
                .find(|p| !taken.contains(p) && network::host_port_free(*p))
                .ok_or("no free host port for an exposed port")?;
            ports.push((inside, host));
        }
        taken.extend(ports.iter().map(|(_, host)| *host));
        let host_if = format!(
            "{}{}",
            network::IF_PREFIX,
            &spec.runner_id.replace('-', "")[..12]
        );
        Ok(Some(RunnerNetwork {
            bridge: config.bridge.clone(),
            host_if,
            address,
            gateway: config.gateway(),
            dns: config.dns.clone(),
            ports,
        }))
    }

    fn release_network(&self, network: &Option<RunnerNetwork>) {
        if let Some(network) = network {
            let mut taken = self.host_ports.lock().unwrap();
            for (_, host) in &network.ports {
                taken.remove(host);
            }
        }
    }

    fn init_spec(&self, spec: &RunnerSpec, slot: u32) -> Result<InitSpec, String> {
        let env = &spec.environment;
        let rootfs = self.config.images.resolve(&env.image)?;
        let memory_mb = match env.memory_limit {
            0 => self.config.default_memory_mb,
            mb => mb,
        };
        let memory_bytes = u64::from(memory_mb) * 1024 * 1024;
        let cpu_cores = (env.cpu_limit > 0).then(|| {
            (f64::from(env.cpu_limit) / self.config.cpu_mhz_per_core).max(self.config.min_cpu_cores)
        });
        Ok(InitSpec {
            runner_id: spec.runner_id.clone(),
            dir: self.runners_dir.join(&spec.runner_id),
            rootfs,
            cgroup: format!("{}/{}", self.cgroup_parent, spec.runner_id),
            memory_bytes,
            cpu_cores,
            pids: self.config.pids_limit,
            // Files live in memory charged to the runner: a full disk must still leave room
            // for processes (to remove the files, for one), so files get half the limit
            // and /dev/shm a quarter.
            writable_bytes: (memory_bytes / 2).max(8 * 1024 * 1024),
            hostname: "runner".into(),
            user_uid: self.config.user_uid,
            user_gid: self.config.user_gid,
            uid_base: self.config.first_runner_id + slot * IDS_PER_RUNNER,
            network: self.runner_network(spec, slot)?,
            hidden_paths: self
                .config
                .hidden_paths
                .iter()
                .chain(std::iter::once(&self.config.data_dir))
                .cloned()
                .collect(),
        })
    }

    async fn start(&self, spec: InitSpec, slot: u32) -> BackendResult<NativeSandbox> {
        // Known before anything exists on disk, so that the janitor never races a creation.
        self.known.lock().unwrap().insert(spec.runner_id.clone());
        let result = self.start_known(spec.clone(), slot).await;
        if result.is_err() {
            self.known.lock().unwrap().remove(&spec.runner_id);
            self.id_slots.lock().unwrap().remove(&slot);
            self.release_network(&spec.network);
        }
        result
    }

    async fn start_known(&self, spec: InitSpec, slot: u32) -> BackendResult<NativeSandbox> {
        let dir = spec.dir.clone();
        std::fs::create_dir_all(&dir).map_err(failed)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
        std::fs::write(
            dir.join("spec.json"),
            serde_json::to_vec(&spec).map_err(failed)?,
        )
        .map_err(failed)?;
        let log = std::fs::File::create(dir.join("init.log")).map_err(failed)?;
        let (ready_r, ready_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(failed)?;
        let ready_w_raw = ready_w.as_raw_fd();

        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("runner-init")
            .arg(&dir)
            // Nothing of the server's environment (tokens!) may reach a runner.
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Its own session: a Ctrl-C or a signal to the server's group spares runners.
                if libc::setsid() < 0 || libc::dup2(ready_w_raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(failed)?;
        drop(ready_w);

        let sandbox = NativeSandbox {
            id: spec.runner_id.clone(),
            cgroups: self.cgroups.clone(),
            cgroup: spec.cgroup.clone(),
            socket: spec.socket_path(),
            dir: dir.clone(),
            child: Mutex::new(Some(child)),
            destroyed: AtomicBool::new(false),
            known: self.known.clone(),
            id_slot: Some((slot, self.id_slots.clone())),
            network: spec.network.clone().map(|n| (n, self.host_ports.clone())),
            advertise: self.advertise(),
            writable_bytes: Some(spec.writable_bytes),
        };
        let wait_ready = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            let mut file = std::fs::File::from(ready_r);
            std::io::Read::read_to_string(&mut file, &mut text).map(|_| text)
        });
        let answer = tokio::time::timeout(self.config.start_timeout, wait_ready).await;
        match answer {
            Ok(Ok(Ok(text))) if text == "ok" => Ok(sandbox),
            other => {
                let reason = match other {
                    Ok(Ok(Ok(text))) if !text.is_empty() => text,
                    Ok(Ok(Ok(_))) => {
                        let log = std::fs::read_to_string(dir.join("init.log")).unwrap_or_default();
                        format!("runner-init ended without a word: {}", log.trim())
                    }
                    Err(_) => format!("not ready within {:?}", self.config.start_timeout),
                    Ok(Ok(Err(e))) => e.to_string(),
                    Ok(Err(e)) => e.to_string(),
                };
                sandbox.destroy().await;
                Err(BackendError::Failed(format!("starting a runner: {reason}")))
            }
        }
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
        self.config.images.resolve(&environment.image).map(|_| ())
    }

    async fn create_runner(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>> {
        let slot = self.take_slot().map_err(BackendError::Failed)?;
        let init = match self.init_spec(&spec, slot) {
            Ok(init) => init,
            Err(e) => {
                self.id_slots.lock().unwrap().remove(&slot);
                return Err(BackendError::Invalid(e));
            }
        };
        if let Some(config) = &self.config.network {
            if init.network.is_some() {
                let prepared = self
                    .network_ready
                    .get_or_try_init(|| async {
                        let config = config.clone();
                        tokio::task::spawn_blocking(move || network::setup_host(&config))
                            .await
                            .map_err(failed)?
                            .map_err(failed)
                    })
                    .await;
                if let Err(e) = prepared {
                    self.release_network(&init.network);
                    self.id_slots.lock().unwrap().remove(&slot);
                    return Err(e);
                }
            }
        }
        // On failure the sandbox was destroyed, which freed the slot and the ports.
        let network = init.network.clone();
        let sandbox = self.start(init, slot).await?;
        if let Some(network) = &network {
            let published = {
                let network = network.clone();
                tokio::task::spawn_blocking(move || network::map_ports(&network)).await
            };
            if !matches!(published, Ok(Ok(()))) {
                sandbox.destroy().await;
                return Err(BackendError::Failed(format!(
                    "publishing exposed ports: {published:?}"
                )));
            }
        }
        Ok(Box::new(sandbox))
    }

    async fn adopt(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>> {
        // The runner's id range is in its spec; it stays taken while the runner lives.
        let dir = self.runners_dir.join(&spec.runner_id);
        let init: Option<InitSpec> = std::fs::read(dir.join("spec.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let network = init.as_ref().and_then(|init| init.network.clone());
        let writable_bytes = init.as_ref().map(|init| init.writable_bytes);
        if let Some(network) = &network {
            let mut taken = self.host_ports.lock().unwrap();
            taken.extend(network.ports.iter().map(|(_, host)| *host));
        }
        let slot = init.and_then(|init| {
            let offset = init.uid_base.checked_sub(self.config.first_runner_id)?;
            Some(offset / IDS_PER_RUNNER)
        });
        let id_slot = slot.map(|slot| {
            self.id_slots.lock().unwrap().insert(slot);
            (slot, self.id_slots.clone())
        });
        let sandbox = NativeSandbox {
            id: spec.runner_id.clone(),
            cgroups: self.cgroups.clone(),
            cgroup: format!("{}/{}", self.cgroup_parent, spec.runner_id),
            socket: self.runners_dir.join(&spec.runner_id).join("control.sock"),
            dir: self.runners_dir.join(&spec.runner_id),
            // Its runner-init is no child of ours any more: the cgroup is how we end it.
            child: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            known: self.known.clone(),
            id_slot,
            network: network.map(|n| (n, self.host_ports.clone())),
            advertise: self.advertise(),
            writable_bytes,
        };
        // A live runner-init answers on its socket with its own id; a dead one's socket
        // refuses the connection (pids may be reused, sockets are not).
        let answer =
            tokio::time::timeout(Duration::from_secs(5), sandbox.call(Request::Ping)).await;
        match answer {
            Ok(Ok((Response::Pong { runner_id }, _))) if runner_id == spec.runner_id => {
                self.known.lock().unwrap().insert(runner_id);
                Ok(Box::new(sandbox))
            }
            Ok(Ok((other, _))) => Err(BackendError::Failed(format!(
                "runner {} answered as {other:?}",
                spec.runner_id
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BackendError::Failed(format!(
                "runner {} did not answer",
                spec.runner_id
            ))),
        }
    }

    async fn sweep(&self, keep: &[String]) -> BackendResult<()> {
        let debris = Debris {
            cgroups: self.cgroups.clone(),
            parent: self.cgroup_parent.clone(),
            runners_dir: self.runners_dir.clone(),
            known: self.known.clone(),
        };
        // Adopted runners are known already; `keep` names them for backends without a
        // registry of their own.
        self.known.lock().unwrap().extend(keep.iter().cloned());
        let removed = {
            let debris = debris.clone();
            tokio::task::spawn_blocking(move || debris.remove_unknown())
                .await
                .map_err(failed)?
        };
        if removed > 0 {
            tracing::info!(count = removed, "removed runners nobody knows of");
        }
        if !self.janitor_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(JANITOR_INTERVAL).await;
                    let debris = debris.clone();
                    let removed = tokio::task::spawn_blocking(move || debris.remove_unknown())
                        .await
                        .unwrap_or(0);
                    if removed > 0 {
                        tracing::info!(count = removed, "janitor removed runner debris");
                    }
                }
            });
        }
        Ok(())
    }
}

/// Finds and removes runners of this instance that are not in a given set.
#[derive(Clone)]
struct Debris {
    cgroups: Cgroups,
    parent: String,
    runners_dir: PathBuf,
    known: Arc<Mutex<HashSet<String>>>,
}

impl Debris {
    /// Removes what belongs to no known runner; returns how many runner cgroups went.
    /// `known` is consulted after listing: an id is known before its runner touches the
    /// disk, so a runner being made right now is never mistaken for debris.
    fn remove_unknown(&self) -> usize {
        let is_known = |name: &str| self.known.lock().unwrap().contains(name);
        let leftovers: Vec<String> = self
            .cgroups
            .children(&self.parent)
            .into_iter()
            .filter(|name| !is_known(name.rsplit('/').next().unwrap_or_default()))
            .collect();
        for name in &leftovers {
            self.cgroups.kill_all(name);
            self.cgroups.remove(name);
        }
        if let Ok(entries) = std::fs::read_dir(&self.runners_dir) {
            for entry in entries.flatten() {
                if !is_known(entry.file_name().to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        leftovers.len()
    }
}

pub struct NativeSandbox {
    id: String,
    /// Its network (if it has one) and the host ports pool to give its ports back to.
    network: Option<(RunnerNetwork, Arc<Mutex<BTreeSet<u16>>>)>,
    advertise: String,
    /// The id range of its user namespace, freed when it is destroyed.
    id_slot: Option<(u32, Arc<Mutex<BTreeSet<u32>>>)>,
    known: Arc<Mutex<HashSet<String>>>,
    cgroups: Cgroups,
    cgroup: String,
    socket: PathBuf,
    dir: PathBuf,
    child: Mutex<Option<tokio::process::Child>>,
    destroyed: AtomicBool,
    /// Room for files in the runner (its writable tmpfs), if known.
    writable_bytes: Option<u64>,
}

impl NativeSandbox {
    /// One request, one answer, on a fresh connection (blocking I/O on a pool thread).
    async fn call(&self, request: Request) -> BackendResult<(Response, Vec<OwnedFd>)> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(BackendError::Failed("the runner is gone".into()));
        }
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || {
            let stream = UnixStream::connect(&socket)?;
            send_frame(&stream, &request, &[])?;
            recv_frame::<Response>(&stream)?
                .ok_or_else(|| std::io::Error::other("runner-init closed the connection"))
        })
        .await
        .map_err(failed)?
        .map_err(|e| BackendError::Failed(format!("runner control socket: {e}")))
    }
}

fn unexpected(r: Response) -> BackendError {
    match r {
        Response::Error(e) => e,
        other => BackendError::Failed(format!("unexpected answer from runner-init: {other:?}")),
    }
}

#[async_trait]
impl Sandbox for NativeSandbox {
    fn writable_bytes(&self) -> Option<u64> {
        self.writable_bytes
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.network
            .iter()
            .flat_map(|(network, _)| network.ports.iter())
            .map(|(inside, host)| MappedPort {
                exposed_port: *inside,
                host_address: format!("{}:{host}", self.advertise),
            })
            .collect()
    }

    async fn execute(&self, spec: ExecSpec) -> BackendResult<BackendExecution> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(BackendError::Failed("the runner is gone".into()));
        }
        // stdin and stdout share a terminal (as the reference does); stderr stays a pipe so
        // that clients can tell the two apart.
        let pty = nix::pty::openpty(None, None).map_err(failed)?;
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(failed)?;
        }
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(failed)?;
        let oom_before = self.cgroups.oom_kills(&self.cgroup);
        let socket = self.socket.clone();
        let request = Request::Exec {
            command: spec.command,
            privileged: spec.privileged,
            environment: spec.environment,
            tty: true,
        };
        let slave = pty.slave;
        let stream = tokio::task::spawn_blocking(move || -> std::io::Result<UnixStream> {
            let stream = UnixStream::connect(&socket)?;
            let fds = [slave.as_raw_fd(), slave.as_raw_fd(), err_w.as_raw_fd()];
            send_frame(&stream, &request, &fds)?;
            // Our copies must close now, or the streams would never reach end-of-file.
            drop(slave);
            drop(err_w);
            match recv_frame::<Response>(&stream)? {
                Some((Response::Started, _)) => Ok(stream),
                Some((other, _)) => Err(std::io::Error::other(format!("{other:?}"))),
                None => Err(std::io::Error::other("runner-init closed the connection")),
            }
        })
        .await
        .map_err(failed)?
        .map_err(|e| BackendError::Failed(format!("starting the execution: {e}")))?;
        stream.set_nonblocking(true).map_err(failed)?;
        let mut stream = tokio::net::UnixStream::from_std(stream).map_err(failed)?;

        let master_for_stdin = pty.master.try_clone().map_err(failed)?;
        let stdin = FdStream::new(master_for_stdin, true).map_err(failed)?;
        let stdout = FdStream::new(pty.master, true).map_err(failed)?;
        let stderr = FdStream::new(err_r, false).map_err(failed)?;

        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
        let cgroups = self.cgroups.clone();
        let cgroup = self.cgroup.clone();
        let exit = Box::pin(async move {
            tokio::select! {
                // As the reference: a process the OOM killer took while the runner lives on
                // just ends the execution with its code (137); only a runner whose own
                // processes died of memory (its control connection broke) is an OOM error.
                frame = read_frame(&mut stream) => match frame {
                    Ok(Response::Exited { code }) => ExitOutcome::Exited(code),
                    Ok(other) => ExitOutcome::Failed(format!("{other:?}")),
                    Err(_) if cgroups.oom_kills(&cgroup) > oom_before => ExitOutcome::OomKilled,
                    Err(e) => ExitOutcome::Failed(e.to_string()),
                },
                // Dropping the connection tells the handler to kill the execution.
                _ = kill_rx => ExitOutcome::Failed("killed".into()),
            }
        });
        Ok(BackendExecution {
            stdin: Box::new(stdin),
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            exit,
            kill: Box::new(move || {
                let _ = kill_tx.send(());
            }),
        })
    }

    async fn list_files(
        &self,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> BackendResult<Vec<FileHeader>> {
        let request = Request::ListFiles {
            path: path.to_string(),
            recursive,
            privileged,
        };
        match self.call(request).await?.0 {
            Response::Files(files) => Ok(files),
            other => Err(unexpected(other)),
        }
    }

    async fn patch_files(&self, delete: Vec<String>, copy: Vec<FileCopy>) -> BackendResult<()> {
        match self.call(Request::PatchFiles { delete, copy }).await?.0 {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn open_file(&self, path: &str, privileged: bool) -> BackendResult<FileDownload> {
        let request = Request::OpenFile {
            path: path.to_string(),
            privileged,
        };
        match self.call(request).await? {
            (Response::Opened { size }, mut fds) if fds.len() == 1 => {
                let file = std::fs::File::from(fds.remove(0));
                let content = tokio::fs::File::from_std(file).take(size);
                Ok(FileDownload {
                    size,
                    content: Box::new(content),
                })
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn write_file(
        &self,
        path: &str,
        mut content: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> BackendResult<u64> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(BackendError::Failed("the runner is gone".into()));
        }
        // The content flows through a pipe into a handler inside the runner, which writes
        // the file there: a chunk at a time, never whole in the server's memory.
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(failed)?;
        let socket = self.socket.clone();
        let request = Request::WriteFile {
            path: path.to_string(),
        };
        let answer = tokio::task::spawn_blocking(move || {
            let stream = UnixStream::connect(&socket)?;
            send_frame(&stream, &request, &[read_end.as_raw_fd()])?;
            drop(read_end);
            recv_frame::<Response>(&stream)?
                .ok_or_else(|| std::io::Error::other("runner-init closed the connection"))
        });
        let mut sink = FdStream::new(write_end, false).map_err(failed)?;
        let copied = tokio::io::copy(&mut content, &mut sink).await;
        drop(sink); // the end of the file
        let answer = answer
            .await
            .map_err(failed)?
            .map_err(|e| BackendError::Failed(format!("runner control socket: {e}")))?;
        // The runner's word first: if it stopped early, that is why the copy broke off.
        match (answer.0, copied) {
            (Response::Written { bytes }, Ok(_)) => Ok(bytes),
            (Response::Written { .. }, Err(e)) => {
                Err(BackendError::CopyFailed(format!("{path}: {e}")))
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        let cgroups = self.cgroups.clone();
        let cgroup = self.cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || cgroups.kill_all(&cgroup)).await;
        // A dead but unreaped runner-init still pins its cgroup: reap before removing it.
        let child = self.child.lock().unwrap().take();
        if let Some(mut child) = child {
            let _ = child.wait().await;
        }
        let cgroups = self.cgroups.clone();
        let cgroup = self.cgroup.clone();
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            cgroups.remove(&cgroup);
            let _ = std::fs::remove_dir_all(&dir);
        })
        .await;
        self.known.lock().unwrap().remove(&self.id);
        if let Some((slot, slots)) = &self.id_slot {
            slots.lock().unwrap().remove(slot);
        }
        if let Some((network, ports)) = &self.network {
            let unmapped = network.clone();
            let _ = tokio::task::spawn_blocking(move || network::unmap_ports(&unmapped)).await;
            let mut taken = ports.lock().unwrap();
            for (_, host) in &network.ports {
                taken.remove(host);
            }
        }
    }
}

async fn read_frame(stream: &mut tokio::net::UnixStream) -> std::io::Result<Response> {
    let len = stream.read_u32_le().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("control frame too large"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}
