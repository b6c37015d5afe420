//! Making a runner: its spec (limits, id range, network, root filesystem), then its
//! runner-init, started and waited for until it says it is ready.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use trident_core::backend::{BackendError, BackendResult, RunnerSpec};

use super::leases::{KnownGuard, Leases, PortLease, SlotLease};
use super::spawn::{self, RunnerInit};
use super::{failed, NativeBackend, NativeSandbox};
use crate::cgroup::{Cgroups, Limits};
use crate::network::{self, RunnerNetwork};
use crate::spec::{InitSpec, IDS_PER_RUNNER};

use crate::init::READY;

impl NativeBackend {
    /// Makes and starts a runner; on any failure everything it took is given back (the
    /// leases free themselves, the sandbox destroys itself).
    pub(super) async fn create(&self, spec: RunnerSpec) -> BackendResult<NativeSandbox> {
        // Known before anything exists on disk, so that the janitor never races a creation.
        let known = KnownGuard::new(&self.known, &spec.runner_id);
        let slot = SlotLease::take(&self.id_slots, self.max_slots()).ok_or_else(|| {
            BackendError::Failed("no free user id range for another runner".into())
        })?;
        let (network, ports) = self
            .runner_network(&spec, slot.slot)
            .map_err(BackendError::Invalid)?;
        let init = self
            .init_spec(&spec, slot.slot, network)
            .map_err(BackendError::Invalid)?;
        if init.network.is_some() {
            self.prepare_network().await?;
        }
        let leases = Leases {
            known,
            slot: Some(slot),
            ports,
        };
        let sandbox = self.start(init, leases).await?;
        if let Some(network) = sandbox.network().cloned() {
            let published = tokio::task::spawn_blocking(move || network::map_ports(&network)).await;
            if !matches!(published, Ok(Ok(()))) {
                let _ = sandbox.destroy_now().await;
                return Err(BackendError::Failed(format!(
                    "publishing exposed ports: {published:?}"
                )));
            }
        }
        Ok(sandbox)
    }

    /// Prepares the host for networked runners (bridge, firewall), once per server start.
    async fn prepare_network(&self) -> BackendResult<()> {
        let Some(config) = &self.config.network else {
            return Err(BackendError::Invalid(
                "network access is not configured on this server".into(),
            ));
        };
        self.network_ready
            .get_or_try_init(|| async {
                let config = config.clone();
                tokio::task::spawn_blocking(move || network::setup_host(&config))
                    .await
                    .map_err(failed)?
                    .map_err(failed)
            })
            .await
            .map(drop)
    }

    /// The network of a new runner: its address (from its slot) and free host ports for
    /// its exposed ports.
    fn runner_network(
        &self,
        spec: &RunnerSpec,
        slot: u32,
    ) -> Result<(Option<RunnerNetwork>, Option<PortLease>), String> {
        let env = &spec.environment;
        if !env.network_access {
            return Ok((None, None));
        }
        let config = self
            .config
            .network
            .as_ref()
            .ok_or("network access is not configured on this server")?;
        let address = config.address(slot).ok_or("no network address left")?;
        let lease = PortLease::take(
            &self.host_ports,
            config.ports.0..=config.ports.1,
            env.exposed_ports.len(),
            network::host_port_free,
        )
        .ok_or("no free host port for an exposed port")?;
        let ports = env
            .exposed_ports
            .iter()
            .copied()
            .zip(lease.ports().iter().copied())
            .collect();
        let host_if = format!(
            "{}{}",
            network::IF_PREFIX,
            &spec.runner_id.replace('-', "")[..12]
        );
        let network = RunnerNetwork {
            bridge: config.bridge.clone(),
            host_if,
            address,
            gateway: config.gateway(),
            dns: config.dns.clone(),
            ports,
        };
        Ok((Some(network), Some(lease)))
    }

    fn init_spec(
        &self,
        spec: &RunnerSpec,
        slot: u32,
        network: Option<RunnerNetwork>,
    ) -> Result<InitSpec, String> {
        let env = &spec.environment;
        let image = self.config.images.resolve(&env.image)?;
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
            rootfs: image.rootfs,
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
            network,
            hidden_paths: self
                .config
                .hidden_paths
                .iter()
                .chain(std::iter::once(&self.config.data_dir))
                .cloned()
                .collect(),
            image_env: image.env,
        })
    }

    /// Starts the runner-init of `spec` and waits until it is ready (or says why not).
    async fn start(&self, spec: InitSpec, leases: Leases) -> BackendResult<NativeSandbox> {
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
        // On a blocking thread: the clone suspends its thread until the child's exec, and
        // the child's move into its cgroup can take milliseconds on v1 (the kernel's
        // threadgroup lock waits for an RCU grace period).
        let cgroups = self.cgroups.clone();
        let exe = self.exe.clone();
        let cgroup = spec.cgroup.clone();
        let limits = Limits {
            memory_bytes: spec.memory_bytes,
            cpu_cores: spec.cpu_cores,
            pids: spec.pids,
        };
        let dir_arg = dir.clone();
        let started = tokio::task::spawn_blocking(move || {
            start_runner_init(&cgroups, &cgroup, &limits, &exe, &dir_arg, ready_w, log)
        })
        .await
        .map_err(failed)?;
        let child = started?;

        let sandbox = NativeSandbox::new(
            self,
            &spec.runner_id,
            spec.network.clone(),
            Some(spec.writable_bytes),
            Some(child),
            leases,
        );
        let wait_ready = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            let mut file = std::fs::File::from(ready_r);
            std::io::Read::read_to_string(&mut file, &mut text).map(|_| text)
        });
        let answer = tokio::time::timeout(self.config.start_timeout, wait_ready).await;
        match answer {
            Ok(Ok(Ok(text))) if text.split('\n').next() == Some(READY) => {
                if let Some((_, why)) = text.split_once('\n') {
                    self.idmap_refused.call_once(|| {
                        tracing::warn!(
                            reason = why,
                            "lower layers are not idmapped: image files show as the overflow id \
                             (nobody) in runners and root there cannot change them (see \
                             docs/SECURITY.md)"
                        )
                    });
                }
                Ok(sandbox)
            }
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
                let _ = sandbox.destroy_now().await;
                Err(BackendError::Failed(format!("starting a runner: {reason}")))
            }
        }
    }
}

/// Makes the runner's cgroup and starts its runner-init (pid 1 of the runner's new pid
/// namespace), which joins the cgroup before its exec, so that all of its memory is charged
/// to the runner. Blocking.
fn start_runner_init(
    cgroups: &Cgroups,
    cgroup: &str,
    limits: &Limits,
    exe: &Path,
    dir: &Path,
    ready_w: OwnedFd,
    log: std::fs::File,
) -> BackendResult<RunnerInit> {
    let procs = cgroups
        .create(cgroup, limits)
        .and_then(|()| cgroups.open_procs(cgroup))
        .map_err(|e| {
            cgroups.remove(cgroup);
            BackendError::Failed(format!("making the runner's cgroup: {e}"))
        })?;
    let join: Vec<_> = procs.iter().map(|fd| fd.as_fd()).collect();
    // What a pre_exec step would do, runner-init does as its first steps: its own session
    // (setsid), and the ready pipe, given as its stdout, moved to fd 3 (init::main).
    let spawned = spawn::spawn_in_pid_namespace(&spawn::SpawnSpec {
        join: &join,
        exe,
        args: &[OsStr::new("runner-init"), dir.as_os_str()],
        // Nothing of the server's environment (tokens!) may reach a runner.
        env: &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        stdout: ready_w.as_fd(),
        stderr: log.as_fd(),
    });
    // Our copy of the write end goes with this function, or the ready pipe would never end.
    if spawned.is_err() {
        cgroups.remove(cgroup);
    }
    spawned.map_err(|e| match e.raw_os_error() {
        // The server holds one fd (a pidfd) per runner it started: its own limit on open
        // files is a real bound on how many runners it can hold.
        Some(libc::EMFILE | libc::ENFILE) => BackendError::Failed(format!(
            "starting a runner-init: {e}: the server holds one open file per runner, raise its \
             limit on open files (LimitNOFILE=, ulimit -n; the server lifts its soft limit to \
             the hard one, and as root up to fs.nr_open)"
        )),
        _ => failed(e),
    })
}
