//! The attack battery, part two: images made by an attacker. A root filesystem whose
//! system directories or account files are links to the host must never make runner-init
//! (host root while it builds the runner) write, chmod, chown, delete or read host files.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use common::{exec, Options, Server};
use reqwest::Method;
use serde_json::json;

/// A minimal root filesystem: Debian's static busybox and a few applet links.
fn busybox_rootfs(dir: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "needs /bin/busybox (busybox-static)");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "ls", "id", "true", "touch"] {
        symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
}

/// Host directories other programs (and other tests) write to: only their mode and owner
/// are compared.
const SHARED_DIRS: [&str; 4] = ["/tmp", "/run", "/root", "/home"];

/// What an attack could change about a host path: its content (files), mode and owner.
fn snapshot(paths: &[PathBuf]) -> BTreeMap<PathBuf, String> {
    paths
        .iter()
        .map(|p| {
            let state = match std::fs::symlink_metadata(p) {
                Ok(meta) => {
                    let content = if meta.is_file() {
                        std::fs::read(p)
                            .map(|b| format!("{b:?}"))
                            .unwrap_or_default()
                    } else if meta.is_dir() && !SHARED_DIRS.contains(&p.to_str().unwrap_or("")) {
                        let mut names: Vec<String> = std::fs::read_dir(p)
                            .unwrap()
                            .flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect();
                        names.sort();
                        names.join(",")
                    } else {
                        String::new()
                    };
                    format!(
                        "mode {:o} owner {}:{} {content}",
                        meta.mode(),
                        meta.uid(),
                        meta.gid()
                    )
                }
                Err(_) => "absent".to_string(),
            };
            (p.clone(), state)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_linking_to_the_host_never_reach_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Host directories the attack aims at; made here so that the test can look at them
    // without risking the machine's own (the runner builds are pointed at the real /etc too).
    let host_dir = tmp.path().join("host-dir");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::set_permissions(
        &host_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    std::fs::write(host_dir.join("passwd"), "host passwd\n").unwrap();
    std::fs::write(host_dir.join("hostname"), "host\n").unwrap();
    std::fs::write(host_dir.join("gshadow"), "host gshadow\n").unwrap();
    let secret = tmp.path().join("root-only-secret");
    std::fs::write(&secret, "TOP-SECRET-HOST-CONTENT\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // 1. System directories of the image are links to host directories.
    let dirs_image = tmp.path().join("dirs");
    busybox_rootfs(&dirs_image);
    symlink("/etc", dirs_image.join("etc")).unwrap();
    for name in [
        "tmp",
        "root",
        "run",
        "workspace",
        "home",
        "dev",
        "proc",
        "sys",
    ] {
        symlink(&host_dir, dirs_image.join(name)).unwrap();
    }
    std::fs::create_dir(dirs_image.join("var")).unwrap();
    symlink(&host_dir, dirs_image.join("var/tmp")).unwrap();
    // 2. The account files are links to host files only root may read.
    let files_image = tmp.path().join("files");
    busybox_rootfs(&files_image);
    std::fs::create_dir(files_image.join("etc")).unwrap();
    symlink(&secret, files_image.join("etc/passwd")).unwrap();
    symlink("/etc/shadow", files_image.join("etc/group")).unwrap();
    symlink(host_dir.join("hostname"), files_image.join("etc/hostname")).unwrap();
    symlink(&host_dir, files_image.join("etc/ssh")).unwrap();
    // 3. The link is one level down: etc is real, its files climb out with ../..
    let climbing_image = tmp.path().join("climbing");
    busybox_rootfs(&climbing_image);
    std::fs::create_dir(climbing_image.join("etc")).unwrap();
    let climb = format!("../../../../../../../../..{}", secret.display());
    symlink(&climb, climbing_image.join("etc/passwd")).unwrap();

    let mut watched: Vec<PathBuf> = [
        "/etc",
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/passwd-",
        "/etc/group-",
        "/etc/hostname",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/root",
        "/tmp",
        "/run",
        "/home",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    watched.extend([host_dir.clone(), secret.clone()]);
    if let Ok(entries) = std::fs::read_dir("/etc/ssh") {
        watched.extend(entries.flatten().map(|e| e.path()));
    }
    let before = snapshot(&watched);

    let server = Server::start_with(Options {
        config_yaml: Some(format!(
            "images:\n  dirs: {}\n  files: {}\n  climbing: {}\n",
            dirs_image.display(),
            files_image.display(),
            climbing_image.display()
        )),
        ..Options::default()
    });
    for (id, image) in [(1, "dirs"), (2, "files"), (3, "climbing")] {
        let mut env = common::environment(id, 1, 128);
        env["image"] = json!(image);
        let r = server
            .send(Method::PUT, &format!("/execution-environments/{id}"), env)
            .await;
        assert_eq!(r.status(), 201, "{image}");
        let runner = server.claim(id, 0).await;
        let run = server
            .execute(
                &runner,
                json!({"command": "cat /etc/passwd /etc/group /etc/hostname; ls /etc /tmp; touch /tmp/x /workspace/y && echo wrote",
                       "privilegedExecution": true}),
            )
            .await;
        run.assert_well_formed();
        let seen = run.stdout();
        assert!(seen.contains("wrote"), "{image}: the runner works: {run:?}");
        assert!(
            seen.contains("root:x:0:0") && seen.contains("user:x:1000:1000"),
            "{image}: the runner has its own accounts: {seen}"
        );
        for leak in ["TOP-SECRET-HOST-CONTENT", "host passwd", "root:$", "root:!"] {
            assert!(!seen.contains(leak), "{image}: host content read: {seen}");
        }
        let shadow_line = std::fs::read_to_string("/etc/shadow")
            .ok()
            .and_then(|s| s.lines().next().map(String::from))
            .unwrap_or_default();
        assert!(
            shadow_line.is_empty() || !seen.contains(&shadow_line),
            "{image}: the host's shadow was copied in: {seen}"
        );
    }
    let after = snapshot(&watched);
    for (path, state) in &before {
        assert_eq!(
            &after[path],
            state,
            "{} was changed by building a runner of a hostile image",
            path.display()
        );
    }
    // The images themselves stay as they were too.
    assert!(dirs_image.join("etc").is_symlink() && files_image.join("etc/passwd").is_symlink());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_never_name_host_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let not_a_rootfs = tmp.path().join("empty-image");
    std::fs::create_dir(&not_a_rootfs).unwrap();
    let server = Server::start_with(Options {
        config_yaml: Some(format!("images:\n  empty: {}\n", not_a_rootfs.display())),
        ..Options::default()
    });
    let mut env = common::environment(1, 1, 128);
    env["image"] = json!("empty");
    let r = server
        .send(Method::PUT, "/execution-environments/1", env)
        .await;
    let (status, message) = common::error_of(r, "empty image").await;
    assert_eq!(status, 400);
    assert!(message.contains("empty"), "{message}");
    assert!(
        !message.contains(&tmp.path().display().to_string()),
        "a host path in an error: {message}"
    );
    let _ = exec("true");
}
