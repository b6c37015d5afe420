//! Builds a runner's root filesystem inside its private mount namespace, then pivots into it.
//!
//! Everything writable lives on one tmpfs per runner (overlay upper dirs, /workspace, /tmp):
//! the host's disk is never written, the runner's memory cgroup pays for it, and it all
//! vanishes with the mount namespace when the runner's last process dies.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use rustix::fs::OFlags;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::lowers::{mount_lowers, Mapping};
use crate::spec::{InitSpec, RootfsSource, USER_NAME, WORKSPACE};
use crate::tree::{entries, fd_path, remove_file, replace_file, Tree};

/// Host directories a `host` runner sees (read-only lower layers). Home directories,
/// /root, /var, /srv and the data dir are deliberately absent.
const HOST_DIRS: [&str; 9] = [
    "bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt",
];

/// Host directories that are never idmapped: they hold the host's root-only secrets (TLS
/// keys, credentials, an application's config in /opt). Unmapped, their root-owned files
/// belong to an id outside the runner's range, so that even root in the runner (who has
/// CAP_DAC_OVERRIDE over what its namespace maps) cannot read a 0600 file there.
const HOST_UNMAPPED: [&str; 2] = ["etc", "opt"];

/// Device nodes bound from the host into the runner's minimal /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn none() -> Option<&'static str> {
    None
}

fn ctx<T>(what: impl std::fmt::Display, r: Result<T, nix::Error>) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("{what}: {e}")))
}

fn mkdir_mode(path: &Path, mode: u32) -> io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::other(format!("mkdir {}: {e}", path.display()))),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Mounts an overlay of `lower` with a fresh writable layer made in `layer` (`upper`,
/// `work`) on `target`. The layer paths are given relative to `layer` (the mount is made
/// from there): a runner reads the overlay's options in its /proc/self/mountinfo, and must
/// not learn host paths (the data dir, runner ids) from them.
///
/// nosuid and nodev: the image's setuid binaries and device nodes grant nothing (with
/// idmapped lowers a setuid-root file is owned by the runner's root).
///
/// The merged root takes its owner and mode from the upper dir: it gets those of the
/// topmost lower's root (`lowerdir`'s first entry) as the mapping shows them, so that root
/// in the runner may create files in an idmapped `/usr` or `/` as it would in the image.
fn overlay(lower: &str, layer: &Path, target: &Path) -> io::Result<()> {
    let upper = layer.join("upper");
    mkdir_mode(&upper, 0o755)?;
    mkdir_mode(&layer.join("work"), 0o700)?;
    let top = layer.join(lower.split(':').next().unwrap_or(lower));
    let meta = fs::metadata(&top)?;
    std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid()))?;
    fs::set_permissions(&upper, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    let opts = format!("lowerdir={lower},upperdir=upper,workdir=work");
    let here = std::env::current_dir()?;
    nix::unistd::chdir(layer).map_err(io::Error::other)?;
    let mounted = ctx(
        format!("overlay on {}", target.display()),
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        ),
    );
    nix::unistd::chdir(&here).map_err(io::Error::other)?;
    mounted
}

/// Mounts everything under `<dir>/root` and returns that path, and how the lowers were
/// mapped. Runs as pid 1 of the runner's pid namespace, in its own (already private) mount
/// namespace. `userns` (a namespace with the runner's id maps) idmaps the lower layers.
///
/// Until the root is mounted, every path is trident's own (the runner directory, the
/// writable tmpfs, the host's system directories). From then on the tree may be an image's,
/// made by a stranger: everything is done through [`Tree`], inside it.
pub fn build(spec: &InitSpec, userns: Option<&OwnedFd>) -> io::Result<(PathBuf, Mapping)> {
    let rw = spec.dir.join("rw");
    let root = spec.dir.join("root");
    mkdir_mode(&rw, 0o700)?;
    mkdir_mode(&root, 0o755)?;
    let size = format!("size={},mode=0755", spec.writable_bytes);
    ctx(
        "tmpfs for the writable layer",
        mount(
            Some("tmpfs"),
            &rw,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some(size.as_str()),
        ),
    )?;
    let layers = rw.join("layers");
    mkdir_mode(&layers, 0o700)?;
    // Directories the runner's /sys and the masks of /proc are bound from: parts of this
    // tmpfs that no path of the runner reaches, owned by the host's root, bound read-only.
    // Binds instead of a tmpfs each: every superblock registers a shrinker, and the kernel
    // sizes every memory cgroup's shrinker table by the number of shrinkers the host has
    // ever had, so that each superblock of each runner costs memory in every runner's cgroup
    // (docs/PERFORMANCE.md, "Running 10,000 runners").
    let skeleton = rw.join("skeleton");
    mkdir_mode(&skeleton, 0o755)?;

    let mapping = match &spec.rootfs {
        RootfsSource::Host => {
            let base = rw.join("root");
            mkdir_mode(&base, 0o755)?;
            ctx(
                "bind root",
                mount(Some(&base), &root, none(), MsFlags::MS_BIND, none()),
            )?;
            let (mut mapped, mut unmapped) = (Vec::new(), Vec::new());
            for name in HOST_DIRS {
                let host = Path::new("/").join(name);
                let Ok(meta) = fs::symlink_metadata(&host) else {
                    continue;
                };
                let target = root.join(name);
                if meta.file_type().is_symlink() {
                    symlink(fs::read_link(&host)?, &target)?;
                } else if meta.is_dir() {
                    mkdir_mode(&target, 0o755)?;
                    let layer = layers.join(name);
                    mkdir_mode(&layer, 0o700)?;
                    mkdir_mode(&layer.join("lower"), 0o755)?;
                    let pair = (host, layer.join("lower"));
                    if HOST_UNMAPPED.contains(&name) {
                        unmapped.push(pair);
                    } else {
                        mapped.push(pair);
                    }
                }
            }
            let mapping = mount_lowers(&mapped, userns)?;
            mount_lowers(&unmapped, None)?;
            for (_, lower) in mapped.iter().chain(&unmapped) {
                let layer = lower.parent().expect("made above");
                let name = layer.file_name().expect("made above");
                overlay("lower", layer, &root.join(name))?;
            }
            mapping
        }
        RootfsSource::Directory(lower) => {
            // The image directory is mounted beside the writable layer, so that the
            // overlay names it `image`, not by its host path.
            let image = layers.join("image");
            mkdir_mode(&image, 0o755)?;
            let mapping = mount_lowers(&[(lower.clone(), image)], userns)?;
            overlay("image", &layers, &root)?;
            mapping
        }
        RootfsSource::Layers(dirs) => {
            if dirs.is_empty() {
                return Err(io::Error::other("the image has no layers"));
            }
            // Short names (`l/0` the bottom layer) keep the overlay's options far below
            // the page-sized limit of mount(2)'s data however many layers an image has,
            // and name no host path.
            let l = layers.join("l");
            mkdir_mode(&l, 0o700)?;
            let mut pairs = Vec::new();
            for (i, dir) in dirs.iter().enumerate() {
                let target = l.join(i.to_string());
                mkdir_mode(&target, 0o755)?;
                pairs.push((dir.clone(), target));
            }
            let mapping = mount_lowers(&pairs, userns)?;
            // overlayfs lists the topmost lower first.
            let lower: Vec<String> = (0..dirs.len()).rev().map(|i| format!("l/{i}")).collect();
            overlay(&lower.join(":"), &layers, &root)?;
            mapping
        }
    };

    // From here on: inside the tree only.
    let tree = Tree::open(&root)?;
    let mut dirs = Vec::new();
    for (dir, mode) in [
        ("proc", 0o555),
        ("dev", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("home", 0o755),
        ("run", 0o755),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("workspace", 0o1777),
        ("etc", 0o755),
    ] {
        dirs.push((dir, tree.real_dir(dir, mode)?));
    }
    let dir_fd =
        |name: &str| -> &OwnedFd { &dirs.iter().find(|(d, _)| *d == name).expect("made above").1 };
    // Root in the runner will be host id `uid_base`: give it its home and /run.
    for dir in ["root", "run"] {
        let id = Some(rustix::fs::Uid::from_raw(spec.uid_base));
        let gid = Some(rustix::fs::Gid::from_raw(spec.uid_base));
        rustix::fs::fchown(dir_fd(dir), id, gid)?;
    }
    fix_etc(&tree, dir_fd("etc"), spec)?;
    hide_host_paths(&tree, spec)?;

    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_on(
        "proc",
        dir_fd("proc"),
        Some("proc"),
        Some("proc"),
        nodev,
        None,
    )?;
    // The fresh procfs, through its mount point (the fd above holds the directory under it).
    let proc = tree.resolve("proc", OFlags::DIRECTORY | OFlags::PATH)?;
    let proc = fd_path(&proc);
    limit_sysv_ipc(&proc)?;
    let empty = skeleton.join("empty");
    mkdir_mode(&empty, 0o555)?;
    mask_proc(&proc, &empty)?;
    // The kernel's knobs stay read-only for the runner.
    for knob in ["sys", "sysrq-trigger", "irq", "bus"] {
        let p = proc.join(knob);
        if p.exists() {
            ctx(
                "bind /proc knob",
                mount(Some(&p), &p, none(), MsFlags::MS_BIND, none()),
            )?;
            ctx(
                "read-only /proc knob",
                mount(
                    none(),
                    &p,
                    none(),
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    none(),
                ),
            )?;
        }
    }
    // /dev: a directory of the runner's tmpfs too, filled, then bound read-only (its devices,
    // devpts and /dev/shm are mounts of their own, which keep their flags).
    let dev_skeleton = skeleton.join("dev");
    mkdir_mode(&dev_skeleton, 0o755)?;
    let dev_skeleton = dev_skeleton.to_string_lossy().into_owned();
    mount_on(
        "bind /dev",
        dir_fd("dev"),
        Some(dev_skeleton.as_str()),
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    let dev = tree.resolve("dev", OFlags::DIRECTORY | OFlags::PATH)?;
    // /dev/shm's files count against the runner's writable space with all its other files.
    let shm = rw.join("shm");
    mkdir_mode(&shm, 0o1777)?;
    build_dev(&fd_path(&dev), &shm)?;
    ctx(
        "read-only /dev",
        mount(
            none(),
            &fd_path(&dev),
            none(),
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            none(),
        ),
    )?;
    // /sys holds only the runner's own cgroup, read-only (its cgroup namespace makes it the
    // root): runtimes such as the JVM find their limits where they look for them.
    let sys_skeleton = skeleton.join("sys");
    mkdir_mode(&sys_skeleton, 0o755)?;
    for dir in ["fs", "fs/cgroup"] {
        mkdir_mode(&sys_skeleton.join(dir), 0o755)?;
    }
    let sys_skeleton = sys_skeleton.to_string_lossy().into_owned();
    mount_on(
        "bind /sys",
        dir_fd("sys"),
        Some(sys_skeleton.as_str()),
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    let sys = tree.resolve("sys", OFlags::DIRECTORY | OFlags::PATH)?;
    crate::cgroup::mount_view(&fd_path(&sys).join("fs/cgroup"))?;
    // MS_BIND: the flags of this mount only, not of the tmpfs it shows a part of.
    ctx(
        "read-only /sys",
        mount(
            none(),
            &fd_path(&sys),
            none(),
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nodev,
            none(),
        ),
    )?;
    if spec.rootfs == RootfsSource::Host {
        // The root itself becomes read-only; what stays writable is the writable layer
        // (the overlays), and these directories.
        for dir in WRITABLE_DIRS {
            let path = fd_path(dir_fd(dir));
            ctx(
                format!("keep /{dir} writable"),
                mount(Some(&path), &path, none(), MsFlags::MS_BIND, none()),
            )?;
        }
        ctx(
            "read-only root",
            mount(
                none(),
                &root,
                none(),
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none(),
            ),
        )?;
    }
    Ok((root, mapping))
}

/// Mounts onto the directory an fd holds (its `/proc/self/fd` path), so that no name in the
/// tree can redirect the mount.
fn mount_on(
    what: &str,
    target: &OwnedFd,
    source: Option<&str>,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    ctx(what, mount(source, &fd_path(target), fstype, flags, data))
}

/// Directories of a read-only root that programs expect to write.
const WRITABLE_DIRS: [&str; 5] = ["workspace", "tmp", "var/tmp", "root", "run"];

/// Per-namespace kernel settings, written while /proc/sys is still writable. The runner's
/// own IPC namespace gets small System V limits (its memory cgroup pays for
/// segments anyway; this stops a runner from hoarding ids and pinning memory).
fn limit_sysv_ipc(proc: &Path) -> io::Result<()> {
    for (knob, value) in [
        ("shmmax", "67108864"),
        ("shmall", "16384"),
        ("shmmni", "64"),
        ("msgmni", "64"),
        ("sem", "250 8000 32 64"),
    ] {
        let path = proc.join("sys/kernel").join(knob);
        fs::write(&path, value)
            .map_err(|e| io::Error::other(format!("setting {}: {e}", path.display())))?;
    }
    // Root in the runner has no say over the network namespace (its owner is the host's
    // user namespace): let anyone bind low ports there.
    fs::write(proc.join("sys/net/ipv4/ip_unprivileged_port_start"), "0")?;
    Ok(())
}

/// Files of /proc that tell about the host's kernel or hardware are hidden, as Docker does
/// (directories behind a read-only bind of the empty directory `empty`).
fn mask_proc(proc: &Path, empty: &Path) -> io::Result<()> {
    for file in [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "latency_stats",
        "kallsyms",
        "kmsg",
    ] {
        let path = proc.join(file);
        if path.exists() {
            ctx(
                format!("mask /proc/{file}"),
                mount(Some("/dev/null"), &path, none(), MsFlags::MS_BIND, none()),
            )?;
        }
    }
    for dir in ["acpi", "scsi", "driver", "fs"] {
        let path = proc.join(dir);
        if path.is_dir() {
            ctx(
                format!("mask /proc/{dir}"),
                mount(Some(empty), &path, none(), MsFlags::MS_BIND, none()),
            )?;
            ctx(
                format!("read-only mask of /proc/{dir}"),
                mount(
                    none(),
                    &path,
                    none(),
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC,
                    none(),
                ),
            )?;
        }
    }
    Ok(())
}

/// Fills the runner's /dev (bound by the caller, still writable); `shm` is the directory of
/// the runner's tmpfs to bind at /dev/shm.
fn build_dev(dev: &Path, shm: &Path) -> io::Result<()> {
    for name in DEVICES {
        let target = dev.join(name);
        fs::write(&target, b"")?;
        let source = Path::new("/dev").join(name);
        ctx(
            format!("bind /dev/{name}"),
            mount(Some(&source), &target, none(), MsFlags::MS_BIND, none()),
        )?;
    }
    let pts = dev.join("pts");
    mkdir_mode(&pts, 0o755)?;
    ctx(
        "devpts",
        mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
    )?;
    symlink("pts/ptmx", dev.join("ptmx"))?;
    let shm_point = dev.join("shm");
    mkdir_mode(&shm_point, 0o1777)?;
    ctx(
        "bind /dev/shm",
        mount(Some(shm), &shm_point, none(), MsFlags::MS_BIND, none()),
    )?;
    ctx(
        "nodev /dev/shm",
        mount(
            none(),
            &shm_point,
            none(),
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            none(),
        ),
    )?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link))?;
    }
    Ok(())
}

/// Gives the runner its own accounts (root, `user`) and host name, and hides the host's
/// secrets: shadow files and SSH host keys never show through the overlay. The image's
/// files are read inside the tree (an `etc/passwd` linked to a host file reads as missing).
fn fix_etc(tree: &Tree, etc: &OwnedFd, spec: &InitSpec) -> io::Result<()> {
    let uid = spec.user_uid;
    let gid = spec.user_gid;
    let shell = if tree.has_file("bin/bash") {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let text = |rel: &str| -> io::Result<String> {
        Ok(tree
            .read(rel, ACCOUNTS_LIMIT)?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default())
    };
    let accounts = merge_accounts(&text("etc/passwd")?, &text("etc/group")?, uid, gid, shell);
    let owner = spec.uid_base;
    replace_file(etc, "passwd", accounts.passwd.as_bytes(), 0o644, owner)?;
    replace_file(etc, "group", accounts.group.as_bytes(), 0o644, owner)?;
    replace_file(etc, "shadow", accounts.shadow.as_bytes(), 0o640, owner)?;
    for secret in ["gshadow", "shadow-", "gshadow-", "passwd-", "group-"] {
        remove_file(etc, secret);
    }
    // SSH host keys, in the runner's real etc/ssh only (a link there is not followed).
    let ssh = rustix::fs::openat(
        etc,
        "ssh",
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    );
    if let Ok(ssh) = ssh {
        for name in entries(&ssh)? {
            if name.starts_with("ssh_host_") {
                remove_file(&ssh, &name);
            }
        }
    }
    let hostname = format!("{}\n", spec.hostname);
    replace_file(etc, "hostname", hostname.as_bytes(), 0o644, owner)?;
    let resolv: String = spec
        .network
        .iter()
        .flat_map(|n| n.dns.iter())
        .map(|dns| format!("nameserver {dns}\n"))
        .collect();
    replace_file(etc, "resolv.conf", resolv.as_bytes(), 0o644, owner)?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n",
        spec.hostname
    );
    replace_file(etc, "hosts", hosts.as_bytes(), 0o644, owner)?;
    Ok(())
}

/// A runner's account files.
#[derive(Debug, PartialEq)]
struct Accounts {
    passwd: String,
    group: String,
    shadow: String,
}

/// The image's accounts (what its own software expects: `nobody`, `www-data`, `node`...),
/// a `root` if it has none, and `user` with trident's ids: an account of the image named
/// `user` is replaced, and `user` comes before any other account with its uid (or group
/// with its gid), so that its id reads as `user`. The shadow file names every account
/// without a password (no login by password; the image's hashes are never copied).
fn merge_accounts(passwd: &str, group: &str, uid: u32, gid: u32, shell: &str) -> Accounts {
    let merge = |text: &str, id: u32, ours: String, root: &str| -> Vec<String> {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && l.split(':').next() != Some(USER_NAME))
            .map(str::to_string)
            .collect();
        if !lines.iter().any(|l| l.starts_with("root:")) {
            lines.insert(0, root.to_string());
        }
        let same_id = lines
            .iter()
            .position(|l| l.split(':').nth(2).and_then(|f| f.parse::<u32>().ok()) == Some(id));
        lines.insert(same_id.unwrap_or(lines.len()), ours);
        lines
    };
    let passwd = merge(
        passwd,
        uid,
        format!("{USER_NAME}:x:{uid}:{gid}:trident user:{WORKSPACE}:{shell}"),
        "root:x:0:0:root:/root:/bin/sh",
    );
    let group = merge(group, gid, format!("{USER_NAME}:x:{gid}:"), "root:x:0:");
    let mut names: Vec<&str> = Vec::new();
    for name in passwd.iter().filter_map(|l| l.split(':').next()) {
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    let shadow: String = names.iter().map(|n| format!("{n}:*:1::::::\n")).collect();
    Accounts {
        passwd: passwd.join("\n") + "\n",
        group: group.join("\n") + "\n",
        shadow,
    }
}

/// How much of an image's passwd or group file is read.
const ACCOUNTS_LIMIT: u64 = 4 * 1024 * 1024;

/// Paths of the host a runner must not see although they lie in the host directories a
/// `host` runner shows (trident's own config file and data dir, when an operator put them
/// under /etc or /opt): removed from the runner's view (the overlay records a whiteout; the
/// host's files are untouched).
fn hide_host_paths(tree: &Tree, spec: &InitSpec) -> io::Result<()> {
    if spec.rootfs != RootfsSource::Host {
        return Ok(());
    }
    for hidden in &spec.hidden_paths {
        let Ok(rel) = hidden.strip_prefix("/") else {
            continue;
        };
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        let shown = HOST_DIRS
            .iter()
            .any(|dir| rel.starts_with(dir) && rel != Path::new(dir));
        if !shown {
            continue;
        }
        let Ok(dir) = tree.resolve(&parent.to_string_lossy(), OFlags::DIRECTORY | OFlags::PATH)
        else {
            continue;
        };
        let inside = fd_path(&dir).join(name);
        let removed = match fs::symlink_metadata(&inside) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&inside),
            Ok(_) => fs::remove_file(&inside),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| io::Error::other(format!("hiding {}: {e}", hidden.display())))?;
    }
    Ok(())
}

/// Makes `root` the root of the mount namespace and drops every host mount from view.
pub fn pivot(root: &Path) -> io::Result<()> {
    nix::unistd::chdir(root).map_err(io::Error::other)?;
    ctx("pivot_root", nix::unistd::pivot_root(".", "."))?;
    ctx("detach old root", umount2(".", MntFlags::MNT_DETACH))?;
    nix::unistd::chdir("/").map_err(io::Error::other)?;
    Ok(())
}

/// Brings up the loopback interface of the runner's fresh network namespace.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain ioctls on a socket we own, with a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        let name = CString::new("lo").expect("no NUL");
        for (i, b) in name.as_bytes_with_nul().iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let result = if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            Err(io::Error::last_os_error())
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(sock);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_keeps_its_accounts_and_gains_user() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/sbin/nologin\n\
                      node:x:1000:1000::/home/node:/bin/sh\nuser:x:1234:1234::/home/user:/bin/sh\n";
        let group = "root:x:0:\nnode:x:1000:\nuser:x:1234:\n";
        let accounts = merge_accounts(passwd, group, 1000, 1000, "/bin/bash");
        assert_eq!(
            accounts.passwd,
            "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/sbin/nologin\n\
             user:x:1000:1000:trident user:/workspace:/bin/bash\n\
             node:x:1000:1000::/home/node:/bin/sh\n"
        );
        assert_eq!(accounts.group, "root:x:0:\nuser:x:1000:\nnode:x:1000:\n");
        assert_eq!(
            accounts.shadow,
            "root:*:1::::::\nnobody:*:1::::::\nuser:*:1::::::\nnode:*:1::::::\n"
        );
    }

    #[test]
    fn an_image_without_accounts_gets_root_and_user() {
        let accounts = merge_accounts("", "garbage without colons\n", 1000, 1000, "/bin/sh");
        assert_eq!(
            accounts.passwd,
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:trident user:/workspace:/bin/sh\n"
        );
        assert_eq!(
            accounts.group,
            "root:x:0:\ngarbage without colons\nuser:x:1000:\n"
        );
    }
}
