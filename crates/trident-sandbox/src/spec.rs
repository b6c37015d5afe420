//! What the server tells a runner-init about the runner to build (`<runner dir>/spec.json`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a runner's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootfsSource {
    /// The host's own system directories (`/usr`, `/etc`, `/bin`, `/lib*`, `/opt`), each
    /// behind a per-runner overlay so that the runner can write without touching the host.
    Host,
    /// A root filesystem directory, the overlay's lower layer.
    Directory(PathBuf),
    /// An image's unpacked layer directories, bottom first (overlayfs whiteouts and opaque
    /// directories in them are honoured: what an upper layer deleted is gone).
    Layers(Vec<PathBuf>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    pub runner_id: String,
    /// The runner directory on the host: spec, control socket, log, mount points.
    pub dir: PathBuf,
    pub rootfs: RootfsSource,
    /// Relative cgroup path, e.g. `trident/<instance>/<runner>`.
    pub cgroup: String,
    pub memory_bytes: u64,
    pub cpu_cores: Option<f64>,
    pub pids: u64,
    /// Size of the tmpfs holding the writable layer, /workspace and /tmp (/dev/shm gets half
    /// of it). Their pages are charged to the runner's memory cgroup as well.
    pub writable_bytes: u64,
    pub hostname: String,
    pub user_uid: u32,
    pub user_gid: u32,
    /// The runner's user namespace maps its ids 0..65536 to host ids uid_base.. (the same
    /// for groups): root in the runner is this unprivileged id on the host.
    pub uid_base: u32,
    /// Set for environments with network access; loopback only otherwise.
    #[serde(default)]
    pub network: Option<crate::network::RunnerNetwork>,
    /// Host paths a runner of the `host` image must not see (trident's config file and data
    /// dir), should they lie under the host directories it shows.
    #[serde(default)]
    pub hidden_paths: Vec<PathBuf>,
    /// The image's own environment (`K=V`, its config's `Env`): the base environment of
    /// every execution. Empty: trident's defaults.
    #[serde(default)]
    pub image_env: Vec<String>,
}

/// Ids per runner in its user namespace.
pub const IDS_PER_RUNNER: u32 = 65536;

impl InitSpec {
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
}

/// The unprivileged user of every runner.
pub const USER_NAME: &str = "user";
pub const WORKSPACE: &str = "/workspace";
