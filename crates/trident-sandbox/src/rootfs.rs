//! Builds a runner's root filesystem inside its private mount namespace, then pivots into it.
//!
//! Everything writable lives on one tmpfs per runner (overlay upper dirs, /workspace, /tmp):
//! the host's disk is never written, the runner's memory cgroup pays for it, and it all
//! vanishes with the mount namespace when the runner's last process dies.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::spec::{InitSpec, RootfsSource, USER_NAME, WORKSPACE};

/// Host directories a `host` runner sees (read-only lower layers). Home directories,
/// /root, /var, /srv and the data dir are deliberately absent.
const HOST_DIRS: [&str; 9] = [
    "bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt",
];

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

fn overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    mkdir_mode(upper, 0o755)?;
    mkdir_mode(work, 0o700)?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    ctx(
        format!("overlay on {}", target.display()),
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        ),
    )
}

/// Mounts everything under `<dir>/root` and returns that path. Runs as pid 1 of the runner's
/// pid namespace, in its own (already private) mount namespace.
pub fn build(spec: &InitSpec) -> io::Result<PathBuf> {
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

    match &spec.rootfs {
        RootfsSource::Host => {
            let base = rw.join("root");
            mkdir_mode(&base, 0o755)?;
            ctx(
                "bind root",
                mount(Some(&base), &root, none(), MsFlags::MS_BIND, none()),
            )?;
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
                    overlay(&host, &layer.join("upper"), &layer.join("work"), &target)?;
                }
            }
        }
        RootfsSource::Directory(lower) => {
            overlay(lower, &layers.join("upper"), &layers.join("work"), &root)?;
        }
    }

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
    ] {
        mkdir_mode(&root.join(dir), mode)?;
    }
    // Root in the runner will be host id `uid_base`: give it its home and /run.
    for dir in ["root", "run"] {
        std::os::unix::fs::chown(root.join(dir), Some(spec.uid_base), Some(spec.uid_base))?;
    }
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    ctx(
        "proc",
        mount(
            Some("proc"),
            &root.join("proc"),
            Some("proc"),
            nodev,
            none(),
        ),
    )?;
    limit_sysv_ipc(&root.join("proc"))?;
    mask_proc(&root.join("proc"))?;
    // The kernel's knobs stay read-only for the runner.
    for knob in ["sys", "sysrq-trigger", "irq", "bus"] {
        let p = root.join("proc").join(knob);
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
    build_dev(&root.join("dev"), spec.writable_bytes / 2)?;
    fix_etc(&root.join("etc"), spec)?;
    if spec.rootfs == RootfsSource::Host {
        // The root itself becomes read-only; what stays writable is the writable layer
        // (the overlays), and these directories.
        for dir in WRITABLE_DIRS {
            let path = root.join(dir);
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
    Ok(root)
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

/// Files of /proc that tell about the host's kernel or hardware are hidden, as Docker does.
fn mask_proc(proc: &Path) -> io::Result<()> {
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
                mount(
                    Some("tmpfs"),
                    &path,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some("size=4096"),
                ),
            )?;
        }
    }
    Ok(())
}

fn build_dev(dev: &Path, shm_bytes: u64) -> io::Result<()> {
    ctx(
        "tmpfs /dev",
        mount(
            Some("tmpfs"),
            dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("size=65536,mode=0755"),
        ),
    )?;
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
    let shm = dev.join("shm");
    mkdir_mode(&shm, 0o1777)?;
    ctx(
        "tmpfs /dev/shm",
        mount(
            Some("tmpfs"),
            &shm,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("mode=1777,size={shm_bytes}").as_str()),
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
/// secrets: shadow files and SSH host keys never show through the overlay.
fn fix_etc(etc: &Path, spec: &InitSpec) -> io::Result<()> {
    if !etc.exists() {
        mkdir_mode(etc, 0o755)?;
    }
    let uid = spec.user_uid;
    let gid = spec.user_gid;
    let root_dir = etc.parent().expect("etc has a parent");
    let shell = if root_dir.join("bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let keep = |line: &&str, id: u32| {
        let mut fields = line.split(':');
        let name = fields.next().unwrap_or("");
        let third = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
        name != USER_NAME && third != Some(id)
    };
    let passwd = fs::read_to_string(etc.join("passwd")).unwrap_or_default();
    let mut passwd: Vec<&str> = passwd.lines().filter(|l| keep(l, uid)).collect();
    if !passwd.iter().any(|l| l.starts_with("root:")) {
        passwd.insert(0, "root:x:0:0:root:/root:/bin/sh");
    }
    let user_line = format!("{USER_NAME}:x:{uid}:{gid}:trident user:{WORKSPACE}:{shell}");
    passwd.push(&user_line);
    replace_file(
        etc,
        "passwd",
        &(passwd.join("\n") + "\n"),
        0o644,
        spec.uid_base,
    )?;

    let group = fs::read_to_string(etc.join("group")).unwrap_or_default();
    let mut group: Vec<&str> = group.lines().filter(|l| keep(l, gid)).collect();
    if !group.iter().any(|l| l.starts_with("root:")) {
        group.insert(0, "root:x:0:");
    }
    let group_line = format!("{USER_NAME}:x:{gid}:");
    group.push(&group_line);
    replace_file(
        etc,
        "group",
        &(group.join("\n") + "\n"),
        0o644,
        spec.uid_base,
    )?;

    replace_file(
        etc,
        "shadow",
        &format!("root:*:1::::::\n{USER_NAME}:*:1::::::\n"),
        0o640,
        spec.uid_base,
    )?;
    for secret in ["gshadow", "shadow-", "gshadow-", "passwd-", "group-"] {
        let _ = fs::remove_file(etc.join(secret));
    }
    if let Ok(entries) = fs::read_dir(etc.join("ssh")) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    replace_file(
        etc,
        "hostname",
        &format!("{}\n", spec.hostname),
        0o644,
        spec.uid_base,
    )?;
    let resolv: String = spec
        .network
        .iter()
        .flat_map(|n| n.dns.iter())
        .map(|dns| format!("nameserver {dns}\n"))
        .collect();
    replace_file(etc, "resolv.conf", &resolv, 0o644, spec.uid_base)?;
    replace_file(
        etc,
        "hosts",
        &format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n",
            spec.hostname
        ),
        0o644,
        spec.uid_base,
    )?;
    Ok(())
}

/// Writes a fresh file owned by the runner's root, replacing a symlink rather than
/// following it.
fn replace_file(dir: &Path, name: &str, content: &str, mode: u32, owner: u32) -> io::Result<()> {
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    fs::write(&path, content)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    std::os::unix::fs::chown(&path, Some(owner), Some(owner))
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
