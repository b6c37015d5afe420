//! Per-runner cgroups on cgroup v1 and v2 hosts, behind one small interface.
//!
//! Hand-written rather than `cgroups-rs`: we need five files per version, a hybrid-host
//! detection rule of our own (v1 controllers plus an empty `unified` mount counts as v1), and
//! a kill that survives fork bombs (freeze first); a thin layer is easier to audit.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const SYSTEM_ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "freezer"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "cgroup v1",
            CgroupVersion::V2 => "cgroup v2",
        })
    }
}

/// Resource limits of one runner.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per period, as a fraction of one core (None = unlimited).
    pub cpu_cores: Option<f64>,
    pub pids: u64,
}

const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct Cgroups {
    version: CgroupVersion,
    /// `/sys/fs/cgroup`, or a stand-in directory in unit tests.
    root: PathBuf,
}

impl Cgroups {
    /// Pure cgroup2 hosts have `cgroup.controllers` at the root; anything with v1 controllers
    /// mounted is driven as v1 (hybrid hosts keep their controllers there).
    pub fn detect() -> io::Result<Cgroups> {
        Cgroups::detect_at(Path::new(SYSTEM_ROOT))
    }

    fn detect_at(root: &Path) -> io::Result<Cgroups> {
        let at = |version| Cgroups {
            version,
            root: root.to_path_buf(),
        };
        if root.join("cgroup.controllers").exists() {
            return Ok(at(CgroupVersion::V2));
        }
        if root.join("memory").join("cgroup.procs").exists() {
            for c in V1_CONTROLLERS {
                if !root.join(c).join("cgroup.procs").exists() {
                    return Err(io::Error::other(format!(
                        "cgroup v1 host without the {c} controller mounted at {}/{c}",
                        root.display()
                    )));
                }
            }
            return Ok(at(CgroupVersion::V1));
        }
        // systemd's hybrid layout on a kernel without memory on v1 (CONFIG_MEMCG_V1 off, as
        // in Debian's 6.12): the memory controller sits on the cgroup2 `unified` mount, split
        // from cpu and pids. trident drives all its controllers on one version.
        if root.join("unified").join("cgroup.controllers").exists() {
            return Err(io::Error::other(format!(
                "a hybrid cgroup host without the memory controller on v1 under {} (kernels \
                 built without CONFIG_MEMCG_V1 keep it on cgroup2): boot the host with pure \
                 cgroup v2 (systemd.unified_cgroup_hierarchy=1)",
                root.display()
            )));
        }
        Err(io::Error::other(format!(
            "no usable cgroup hierarchy under {}",
            root.display()
        )))
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V2 => vec![self.root.as_path().join(name)],
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| self.root.as_path().join(c).join(name))
                .collect(),
        }
    }

    fn controller_dir(&self, controller: &str, name: &str) -> PathBuf {
        match self.version {
            CgroupVersion::V2 => self.root.as_path().join(name),
            CgroupVersion::V1 => self.root.as_path().join(controller).join(name),
        }
    }

    /// Creates the cgroup `name` (a relative path such as `trident/<instance>/<runner>`) with
    /// its limits. On v2 the controllers are enabled on every ancestor first.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<()> {
        if self.version == CgroupVersion::V2 {
            let mut path = self.root.clone();
            for part in Path::new(name)
                .parent()
                .into_iter()
                .flat_map(|p| p.components())
            {
                path.push(part);
                fs::create_dir_all(&path)?;
            }
            let mut ancestor = self.root.clone();
            enable_v2_controllers(&ancestor)?;
            for part in Path::new(name)
                .parent()
                .into_iter()
                .flat_map(|p| p.components())
            {
                ancestor.push(part);
                enable_v2_controllers(&ancestor)?;
            }
        }
        for dir in self.dirs(name) {
            fs::create_dir_all(&dir)?;
        }
        for (controller, file, value) in limit_files(self.version, limits) {
            let dir = self.controller_dir(controller, name);
            // Swap files exist only with swap accounting; without it there is nothing to forbid.
            if SWAP_FILES.contains(&file) && !dir.join(file).exists() {
                continue;
            }
            write(&dir, file, &value)?;
        }
        Ok(())
    }

    /// Creates the cgroup `name` (a parent of runners' cgroups) with a pids limit for all it
    /// will hold together.
    pub fn limit_subtree(&self, name: &str, pids: u64) -> io::Result<()> {
        if self.version == CgroupVersion::V2 {
            self.leave_the_root()?;
            let mut ancestor = self.root.clone();
            enable_v2_controllers(&ancestor)?;
            for part in Path::new(name).components() {
                ancestor.push(part);
                fs::create_dir_all(&ancestor)?;
                enable_v2_controllers(&ancestor)?;
            }
        }
        for dir in self.dirs(name) {
            fs::create_dir_all(&dir)?;
        }
        write(
            &self.controller_dir("pids", name),
            "pids.max",
            &pids.to_string(),
        )
    }

    /// On v2 a cgroup that holds processes cannot enable controllers for its children ("no
    /// internal processes"); only the hierarchy's real root is exempt. A server started at
    /// the root of a cgroup namespace (a container's own cgroup, as Docker sets it up on a v2
    /// host) would be such a process: it moves itself into a leaf, `trident-server`, first.
    /// Anywhere else (the real root, or a cgroup of its own such as a systemd service's) the
    /// server stays where it was put.
    fn leave_the_root(&self) -> io::Result<()> {
        // `cgroup.type` exists in every cgroup but the real root.
        if !self.root.join("cgroup.type").exists() {
            return Ok(());
        }
        let own = fs::read_to_string("/proc/self/cgroup")?;
        if own.lines().find_map(|l| l.strip_prefix("0::")) != Some("/") {
            return Ok(());
        }
        let leaf = self.root.join(SERVER_LEAF);
        fs::create_dir_all(&leaf)?;
        write(&leaf, "cgroup.procs", &std::process::id().to_string())?;
        tracing::info!(
            cgroup = SERVER_LEAF,
            "moved the server into a leaf cgroup: the root of its cgroup namespace must hold no processes to give controllers to runners"
        );
        Ok(())
    }

    /// The cgroup's `cgroup.procs` files (one per hierarchy), opened for writing: a process
    /// that writes `0` to each joins the cgroup (what a runner-init does before its exec).
    pub fn open_procs(&self, name: &str) -> io::Result<Vec<OwnedFd>> {
        self.dirs(name)
            .into_iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
            })
            .collect()
    }

    /// Number of processes the kernel's OOM killer has killed in this cgroup so far.
    pub fn oom_kills(&self, name: &str) -> u64 {
        let (file, key) = match self.version {
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
        };
        let path = self.controller_dir("memory", name).join(file);
        fs::read_to_string(path)
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    let (k, v) = line.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok()).flatten()
                })
            })
            .unwrap_or(0)
    }

    pub fn processes(&self, name: &str) -> Vec<i32> {
        read_pids(&self.controller_dir("pids", name))
    }

    /// Kills every process in the cgroup and waits until it is empty. The cgroup is frozen
    /// first so that a fork bomb cannot outrun the kill loop.
    pub fn kill_all(&self, name: &str) {
        match self.version {
            CgroupVersion::V2 => {
                let dir = self.root.as_path().join(name);
                if dir.join("cgroup.kill").exists() {
                    let _ = write(&dir, "cgroup.kill", "1");
                } else {
                    let _ = write(&dir, "cgroup.freeze", "1");
                }
            }
            CgroupVersion::V1 => {
                let _ = write(
                    &self.controller_dir("freezer", name),
                    "freezer.state",
                    "FROZEN",
                );
            }
        }
        for round in 0..2000u32 {
            let pids = self.processes(name);
            // Empty. A runner-init that is still starting joins its cgroup by itself (between
            // its clone and its exec), maybe right now: thaw (a frozen newcomer would hang)
            // and look once more.
            if pids.is_empty() {
                self.thaw(name);
                if self.processes(name).is_empty() {
                    break;
                }
                continue;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // Frozen processes die only when thawed; SIGKILL is delivered on thaw.
            self.thaw(name);
            std::thread::sleep(Duration::from_micros(200 * u64::from(round.min(50) + 1)));
        }
        self.thaw(name);
        if !self.processes(name).is_empty() {
            tracing::warn!(cgroup = name, "processes survived SIGKILL for seconds");
        }
    }

    /// Never leave a cgroup frozen: a process joining it later would hang there for good.
    fn thaw(&self, name: &str) {
        match self.version {
            CgroupVersion::V1 => {
                let _ = write(
                    &self.controller_dir("freezer", name),
                    "freezer.state",
                    "THAWED",
                );
            }
            CgroupVersion::V2 => {
                let _ = write(&self.root.as_path().join(name), "cgroup.freeze", "0");
            }
        }
    }

    /// Removes the cgroup if no process is in it: `false` (and nothing removed) if one is.
    /// In v1 every hierarchy holds the same processes, so the first directory decides.
    pub fn remove_if_empty(&self, name: &str) -> bool {
        for dir in self.dirs(name) {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return false,
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove cgroup");
                }
            }
        }
        true
    }

    /// Removes the cgroup once it is empty. Killed processes leave it a moment after they
    /// die (when their parent reaps them), so a busy cgroup is retried for a while.
    pub fn remove(&self, name: &str) {
        for dir in self.dirs(name) {
            let mut attempt = 0;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 100 => {
                        // Someone may have joined since the kill (a runner-init still
                        // starting up): kill again.
                        attempt += 1;
                        for pid in read_pids(&dir) {
                            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove cgroup");
                        break;
                    }
                }
            }
        }
    }

    /// Names of the child cgroups under `parent` (for the start-up sweep), in any hierarchy:
    /// a server killed while it made a runner's cgroup leaves it in the first hierarchies
    /// only (on v1 one directory per controller, made one after the other).
    pub fn children(&self, parent: &str) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        for dir in self.dirs(parent) {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            names.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| format!("{parent}/{}", e.file_name().to_string_lossy())),
            );
        }
        names.into_iter().collect()
    }
}

/// Mounts, read-only at `target`, the cgroup hierarchies as the calling process's cgroup
/// namespace shows them: inside a runner, its own cgroup is the root. On v2 that is one
/// cgroup2 mount; on v1 one mount per hierarchy the host has, with the same controllers, in
/// a directory of `target` each (as Docker lays it out; the caller keeps `target` read-only).
pub fn mount_view(target: &Path) -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let failed = |what: &str, e: nix::Error| {
        io::Error::other(format!("mounting the cgroup view ({what}): {e}"))
    };
    if Cgroups::detect()?.version() == CgroupVersion::V2 {
        return mount(
            Some("cgroup2"),
            target,
            Some("cgroup2"),
            flags,
            None::<&str>,
        )
        .map_err(|e| failed("cgroup2", e));
    }
    // v1: one directory per hierarchy in `target` (which the caller makes read-only), each
    // with the hierarchy mounted on it.
    for (name, options) in v1_hierarchies()? {
        let at = target.join(&name);
        fs::create_dir_all(&at)?;
        mount(
            Some("cgroup"),
            &at,
            Some("cgroup"),
            flags,
            Some(options.as_str()),
        )
        .map_err(|e| failed(&name, e))?;
    }
    Ok(())
}

/// The host's v1 hierarchies: the name each is mounted under in /sys/fs/cgroup and its
/// controllers (and `name=`), from the mount table.
fn v1_hierarchies() -> io::Result<Vec<(String, String)>> {
    let table = fs::read_to_string("/proc/self/mountinfo")?;
    let mut found = Vec::new();
    for line in table.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let mut after = after.split(' ');
        if after.next() != Some("cgroup") {
            continue;
        }
        let Some(point) = before.split(' ').nth(4) else {
            continue;
        };
        let Some(name) = point.strip_prefix("/sys/fs/cgroup/") else {
            continue;
        };
        if name.contains('/') {
            continue;
        }
        let options: Vec<&str> = after
            .nth(1)
            .unwrap_or_default()
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent"))
            .collect();
        found.push((name.to_string(), options.join(",")));
    }
    Ok(found)
}

/// The leaf a server at the root of its cgroup namespace moves itself into (v2).
const SERVER_LEAF: &str = "trident-server";

const SWAP_FILES: [&str; 2] = ["memory.memsw.limit_in_bytes", "memory.swap.max"];

/// The files that carry `limits`, per version: (controller, file, value), in write order.
fn limit_files(
    version: CgroupVersion,
    limits: &Limits,
) -> Vec<(&'static str, &'static str, String)> {
    let memory = limits.memory_bytes.to_string();
    let quota = limits
        .cpu_cores
        .map(|cores| ((cores * CPU_PERIOD_US as f64) as u64).max(1000));
    let pids = limits.pids.to_string();
    match version {
        CgroupVersion::V1 => vec![
            ("memory", "memory.limit_in_bytes", memory.clone()),
            ("memory", "memory.memsw.limit_in_bytes", memory),
            ("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
            (
                "cpu",
                "cpu.cfs_quota_us",
                quota.map_or("-1".to_string(), |q| q.to_string()),
            ),
            ("pids", "pids.max", pids),
        ],
        CgroupVersion::V2 => vec![
            ("memory", "memory.max", memory),
            ("memory", "memory.swap.max", "0".to_string()),
            (
                "cpu",
                "cpu.max",
                format!(
                    "{} {CPU_PERIOD_US}",
                    quota.map_or("max".to_string(), |q| q.to_string())
                ),
            ),
            ("pids", "pids.max", pids),
        ],
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn enable_v2_controllers(dir: &Path) -> io::Result<()> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in ["memory", "cpu", "pids"] {
        if !available.split_whitespace().any(|a| a == c) {
            return Err(io::Error::other(format!(
                "the {c} controller is not available in {}",
                dir.display()
            )));
        }
        if !enabled.split_whitespace().any(|a| a == c) {
            let value = format!("+{c}");
            fs::write(dir.join("cgroup.subtree_control"), &value).map_err(|e| {
                let held = read_pids(dir);
                let what = format!(
                    "writing {value} to {}: {e}",
                    dir.join("cgroup.subtree_control").display()
                );
                if e.raw_os_error() != Some(libc::EBUSY) || held.is_empty() {
                    return io::Error::new(e.kind(), what);
                }
                io::Error::other(format!(
                    "{what}: {} holds processes ({held:?}), and a cgroup v2 cgroup with processes \
                     cannot give controllers to its children (\"no internal processes\"); \
                     start trident in a cgroup of its own (systemd: a service with \
                     Delegate=yes) or move those processes into a leaf cgroup",
                    dir.display()
                ))
            })?;
        }
    }
    Ok(())
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    fs::write(dir.join(file), value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value} to {}: {e}", dir.join(file).display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        memory_bytes: 256 << 20,
        cpu_cores: Some(0.25),
        pids: 512,
    };

    #[test]
    fn limits_are_written_in_each_versions_format() {
        let v2 = limit_files(CgroupVersion::V2, &LIMITS);
        assert!(v2.contains(&("memory", "memory.max", "268435456".into())));
        assert!(v2.contains(&("memory", "memory.swap.max", "0".into())));
        assert!(v2.contains(&("cpu", "cpu.max", "25000 100000".into())));
        assert!(v2.contains(&("pids", "pids.max", "512".into())));
        let v1 = limit_files(CgroupVersion::V1, &LIMITS);
        assert!(v1.contains(&("memory", "memory.limit_in_bytes", "268435456".into())));
        assert!(v1.contains(&("cpu", "cpu.cfs_quota_us", "25000".into())));
        assert!(v1.contains(&("pids", "pids.max", "512".into())));
        let unlimited = Limits {
            cpu_cores: None,
            ..LIMITS
        };
        assert!(limit_files(CgroupVersion::V2, &unlimited).contains(&(
            "cpu",
            "cpu.max",
            "max 100000".into()
        )));
        assert!(limit_files(CgroupVersion::V1, &unlimited).contains(&(
            "cpu",
            "cpu.cfs_quota_us",
            "-1".into()
        )));
    }

    #[test]
    fn pure_v2_hybrid_and_v1_hosts_are_told_apart() {
        let v2 = tempfile::tempdir().unwrap();
        fs::write(v2.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert_eq!(
            Cgroups::detect_at(v2.path()).unwrap().version(),
            CgroupVersion::V2
        );

        // A hybrid host (v1 controllers, an empty cgroup2 at `unified`) is driven as v1.
        let hybrid = tempfile::tempdir().unwrap();
        for c in V1_CONTROLLERS {
            fs::create_dir_all(hybrid.path().join(c)).unwrap();
            fs::write(hybrid.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        fs::create_dir_all(hybrid.path().join("unified")).unwrap();
        fs::write(hybrid.path().join("unified/cgroup.controllers"), "").unwrap();
        assert_eq!(
            Cgroups::detect_at(hybrid.path()).unwrap().version(),
            CgroupVersion::V1
        );

        fs::remove_file(hybrid.path().join("freezer/cgroup.procs")).unwrap();
        let err = Cgroups::detect_at(hybrid.path()).unwrap_err();
        assert!(err.to_string().contains("freezer"), "{err}");
        assert!(Cgroups::detect_at(tempfile::tempdir().unwrap().path()).is_err());

        // Hybrid, but memory is on cgroup2 (a kernel without memory on v1).
        fs::remove_dir_all(hybrid.path().join("memory")).unwrap();
        let err = Cgroups::detect_at(hybrid.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("systemd.unified_cgroup_hierarchy=1"),
            "{err}"
        );
    }

    #[test]
    fn this_host_is_detected() {
        // Whatever this machine is, detection must succeed on it (the sandbox depends on it).
        Cgroups::detect().expect("a usable cgroup hierarchy");
    }
}
