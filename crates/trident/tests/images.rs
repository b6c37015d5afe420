//! Images: the built-in `host`, names mapped to `host` or to a root filesystem directory in
//! the config's `images:` table, and unknown names rejected with a helpful 400.

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use common::{exec, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

/// A minimal root filesystem: a static busybox (Debian's busybox-static, installed by
/// .ci/run) and its applet links.
fn busybox_rootfs(dir: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "this test needs a static busybox at /bin/busybox (apt-get install busybox-static)"
    );
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "id", "ls", "touch", "env", "uname", "true", "rm", "stat", "grep",
        "wc", "pwd",
    ] {
        symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/os-release"), "NAME=tiny\n").unwrap();
    // A file of uid 1000 and a setuid-root binary, as images have them.
    std::fs::create_dir_all(dir.join("home")).unwrap();
    std::fs::write(dir.join("home/owned"), "owned\n").unwrap();
    for owned in ["home", "home/owned"] {
        std::os::unix::fs::chown(dir.join(owned), Some(1000), Some(1000)).unwrap();
    }
    // (Named busybox, so that it knows itself as the multi-call binary.)
    std::fs::create_dir_all(dir.join("suid")).unwrap();
    std::fs::copy(busybox, dir.join("suid/busybox")).unwrap();
    std::fs::set_permissions(dir.join("suid/busybox"), PermissionsExt::from_mode(0o4755)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_images_and_aliases_of_host_make_runners() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("tiny");
    busybox_rootfs(&rootfs);
    let server = Server::start_with(Options {
        config_yaml: Some(format!(
            "images:\n  tiny: {}\n  openhpi/co_execenv_python:8.0: host\n",
            rootfs.display()
        )),
        ..Options::default()
    });

    let mut env = common::environment(1, 1, 128);
    env["image"] = json!("tiny");
    let r = server
        .send(Method::PUT, "/execution-environments/1", env)
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(1, 0).await;
    let run = server
        .execute(&runner, exec("cat /etc/os-release; id -un"))
        .await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "NAME=tiny\r\nuser\r\n", "{run:?}");
    // Without bash, commands run under /bin/sh; files land in the runner, not the image.
    server.copy(&runner, &[("hello.txt", "from the API")]).await;
    // The image's lower layer is idmapped: its root-owned files are root's in the runner,
    // uid 1000's are `user`'s, and a setuid binary keeps its mode.
    let run = server
        .execute(
            &runner,
            exec("stat -c \"%u:%g %a %n\" /bin/busybox /suid/busybox /home/owned; /suid/busybox id -u"),
        )
        .await;
    assert_eq!(
        run.stdout(),
        "0:0 755 /bin/busybox\r\n0:0 4755 /suid/busybox\r\n1000:1000 644 /home/owned\r\n1000\r\n",
        "{run:?}"
    );
    // ... but grants nothing: the root is nosuid (and executions have no_new_privs).
    let run = server
        .execute(&runner, exec("grep \" / / \" /proc/self/mountinfo"))
        .await;
    assert!(
        run.stdout().contains("nosuid") && run.stdout().contains("nodev"),
        "{run:?}"
    );
    // Root in the runner owns the image's /etc now and may change it; `user` may change
    // its own file. Either write lands in the runner's writable tmpfs layer: the image
    // directory on the host is never written (its mount is read-only, and an overlay copies
    // up before it writes).
    let run = server
        .execute(
            &runner,
            json!({"command": "cat hello.txt; touch /etc/new && rm /bin/true /etc/os-release && echo root-wrote",
                   "privilegedExecution": true}),
        )
        .await;
    assert_eq!(run.stdout(), "from the APIroot-wrote\r\n", "{run:?}");
    let run = server
        .execute(
            &runner,
            exec("echo mine > /home/owned && rm /home/owned && touch /home/new && ls /home /bin/true /etc/os-release"),
        )
        .await;
    assert!(run.stdout().ends_with("/home:\r\nnew\r\n"), "{run:?}");
    assert!(
        run.stderr().contains("/bin/true") && run.stderr().contains("os-release"),
        "{run:?}"
    );
    for (path, what) in [
        ("etc/new", "a file root made"),
        ("workspace", "the runner's workspace"),
        ("home/new", "a file user made"),
    ] {
        assert!(
            !rootfs.join(path).exists(),
            "{what} reached the image directory"
        );
    }
    assert!(
        rootfs.join("bin/true").is_symlink(),
        "a deletion reached the image"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/os-release")).unwrap(),
        "NAME=tiny\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("home/owned")).unwrap(),
        "owned\n"
    );
    let meta = std::fs::metadata(rootfs.join("home/owned")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1000, 1000),
        "the image's owners changed"
    );

    let mut env = common::environment(2, 1, 128);
    env["image"] = json!("openhpi/co_execenv_python:8.0");
    let r = server
        .send(Method::PUT, "/execution-environments/2", env)
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(2, 0).await;
    let run = server
        .execute(&runner, exec("test -x /usr/bin/python3 && echo -n python"))
        .await;
    assert_eq!(run.stdout(), "python");
    // The host's system directories are idmapped too (/usr/bin/passwd is root's, setuid,
    // and grants nothing); /etc and /opt are not, on purpose: their root-only files
    // (keys, credentials) must stay unreadable to root in the runner. The runner's own
    // account files there are its root's.
    let run = server
        .execute(
            &runner,
            exec("stat -c \"%u:%g %a\" /usr/bin/passwd /etc/debian_version /etc/passwd; id -u"),
        )
        .await;
    assert_eq!(
        run.stdout(),
        "0:0 4755\r\n65534:65534 644\r\n0:0 644\r\n1000\r\n",
        "{run:?}"
    );
    let before = std::fs::metadata("/usr/bin/passwd").unwrap();
    let run = server
        .execute(
            &runner,
            json!({"command": "echo x >> /usr/bin/passwd && touch /usr/trident-was-here && echo wrote",
                   "privilegedExecution": true}),
        )
        .await;
    assert_eq!(run.stdout(), "wrote\r\n", "{run:?}");
    let after = std::fs::metadata("/usr/bin/passwd").unwrap();
    assert_eq!((before.len(), before.mtime()), (after.len(), after.mtime()));
    assert!(
        !Path::new("/usr/trident-was-here").exists(),
        "a runner wrote the host's /usr"
    );

    // A name the table lacks is a registry reference (here Docker Hub's, unreachable from
    // this machine): accepted at once, pulled behind the PUT, and a claim hears why it
    // cannot be had.
    let mut env = common::environment(3, 1, 128);
    env["image"] = json!("openhpi/co_execenv_java:17");
    let r = server
        .send(Method::PUT, "/execution-environments/3", env.clone())
        .await;
    assert_eq!(r.status(), 201);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = server
            .send(
                Method::POST,
                "/runners",
                json!({"executionEnvironmentId": 3}),
            )
            .await;
        let (status, message) = common::error_of(r, "claim").await;
        assert_eq!(status, 500, "{message}");
        if message.contains("could not be pulled") {
            assert!(
                message.contains("docker.io/openhpi/co_execenv_java:17"),
                "{message}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{message}");
    }
    env["image"] = json!("Not A Reference");
    env["id"] = json!(4);
    let r = server
        .send(Method::PUT, "/execution-environments/4", env)
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("images:"), "{message}");
    assert_eq!(server.get("/execution-environments/4").await.status(), 404);
}

#[test]
fn a_bad_images_table_stops_the_server_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("trident.yaml");
    std::fs::write(&config, "images:\n  broken: relative/path\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_trident"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("absolute directory path"), "{stderr}");
}

/// Writes `content` at `rel` in `dir`, owned by `id`.
fn put(dir: &Path, rel: &str, content: &str, id: u32) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    std::os::unix::fs::chown(&path, Some(id), Some(id)).unwrap();
}

/// An overlayfs whiteout (what the image store makes of an OCI `.wh.<name>`).
fn whiteout(dir: &Path, rel: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .unwrap();
}

/// An opaque directory (what the store makes of an OCI `.wh..wh..opq`).
fn opaque(dir: &Path, rel: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(&path).unwrap();
    rustix::fs::setxattr(
        &path,
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layered_images_stack_their_layers_with_their_owners_and_env() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = |n: usize| tmp.path().join(format!("layer{n}"));
    // Bottom: a busybox system with an account of its own, files to delete and hide.
    let bottom = layer(0);
    busybox_rootfs(&bottom);
    std::fs::write(
        bottom.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(bottom.join("etc/group"), "root:x:0:\napp:x:1001:\n").unwrap();
    put(&bottom, "data/gone", "deleted above\n", 0);
    put(&bottom, "data/opq/old", "hidden above\n", 0);
    put(&bottom, "data/keep/a", "bottom\n", 1000);
    // Middle: deletes data/gone, replaces data/opq wholesale.
    let middle = layer(1);
    whiteout(&middle, "data/gone");
    opaque(&middle, "data/opq");
    put(&middle, "data/opq/new", "new\n", 1001);
    put(&middle, "etc/os-release", "NAME=layered\n", 0);
    // Top: overrides a file of the bottom one.
    let top = layer(2);
    put(&top, "data/keep/a", "top\n", 1000);

    // Many layers with long host paths: their lowerdir list would pass mount(2)'s
    // page-sized limit were the layers named by their paths.
    let long = tmp.path().join("a-long-directory-name-".repeat(6));
    let mut deep = vec![bottom.display().to_string()];
    for n in 0..60 {
        let dir = long.join(format!("layer-number-{n:03}"));
        put(&dir, &format!("many/{n}"), "", 0);
        deep.push(dir.display().to_string());
    }
    assert!(deep.iter().map(|d| d.len() + 1).sum::<usize>() > 4096);

    let quote = |dirs: &[String]| {
        dirs.iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let three: Vec<String> = (0..3).map(|n| layer(n).display().to_string()).collect();
    let server = Server::start_with(Options {
        config_yaml: Some(format!(
            "images:\n  layered:\n    layers: [{}]\n    env: [\"PATH=/bin:/opt/tools\", \"GREETING=from the image\", \"JAVA_HOME=/image/java\", \"CODEOCEAN=false\"]\n  deep: {{layers: [{}]}}\n",
            quote(&three),
            quote(&deep)
        )),
        ..Options::default()
    });
    let mut env = common::environment(1, 1, 128);
    env["image"] = json!("layered");
    let r = server
        .send(Method::PUT, "/execution-environments/1", env)
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(1, 0).await;

    // Whiteouts and opaque dirs are honoured; upper layers win; owners are the image's.
    let run = server
        .execute(
            &runner,
            exec("ls -1 /data /data/opq; cat /data/keep/a /etc/os-release; stat -c \"%u:%g %n\" /bin/busybox /data/keep/a /data/opq/new; id -un; pwd"),
        )
        .await;
    assert_eq!(
        run.stdout(),
        "/data:\r\nkeep\r\nopq\r\n\r\n/data/opq:\r\nnew\r\ntop\r\nNAME=layered\r\n\
         0:0 /bin/busybox\r\n1000:1000 /data/keep/a\r\n1001:1001 /data/opq/new\r\nuser\r\n/workspace\r\n",
        "{run:?}"
    );
    // The image's accounts stay, `user` is added.
    let run = server
        .execute(&runner, exec("cat /etc/passwd /etc/group"))
        .await;
    let accounts = run.stdout();
    for line in [
        "root:x:0:0:root:/root:/bin/sh",
        "app:x:1001:1001:app:/home/app:/bin/sh",
        "user:x:1000:1000:",
        "app:x:1001:",
        "user:x:1000:",
    ] {
        assert!(accounts.contains(line), "{line} missing: {accounts}");
    }
    // The image's Env is the base environment, CODEOCEAN=true and the client's on top.
    let run = server
        .execute(
            &runner,
            json!({"command": "env", "environment": {"JAVA_HOME": "/client/java"}}),
        )
        .await;
    let stdout = run.stdout();
    let vars: Vec<&str> = stdout.split("\r\n").collect();
    for var in [
        "PATH=/bin:/opt/tools",
        "GREETING=from the image",
        "JAVA_HOME=/client/java",
        "CODEOCEAN=true",
        "HOME=/workspace",
    ] {
        assert!(vars.contains(&var), "{var} missing: {vars:?}");
    }
    assert!(!vars.iter().any(|v| v.starts_with("LANG=")), "{vars:?}");
    // The overlay's options name no host path.
    let run = server
        .execute(&runner, exec("grep \" / / \" /proc/self/mountinfo"))
        .await;
    let root = run.stdout();
    assert!(root.contains("lowerdir=l/2:l/1:l/0"), "{root}");
    assert!(!root.contains(&tmp.path().display().to_string()), "{root}");

    // Root changes and deletes image files in its writable layer only.
    let run = server
        .execute(
            &runner,
            json!({"command": "echo changed > /data/keep/a && rm -r /data/opq /etc/os-release && touch /data/new && echo done",
                   "privilegedExecution": true}),
        )
        .await;
    assert_eq!(run.stdout(), "done\r\n", "{run:?}");
    assert_eq!(
        std::fs::read_to_string(top.join("data/keep/a")).unwrap(),
        "top\n"
    );
    assert_eq!(
        std::fs::read_to_string(bottom.join("data/keep/a")).unwrap(),
        "bottom\n"
    );
    assert!(middle.join("data/opq/new").exists() && middle.join("etc/os-release").exists());
    assert!(!top.join("data/new").exists() && !top.join("data/opq").exists());
    let gone = std::fs::symlink_metadata(middle.join("data/gone")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &gone.file_type()
    ));

    // 61 layers.
    let mut env = common::environment(2, 1, 128);
    env["image"] = json!("deep");
    let r = server
        .send(Method::PUT, "/execution-environments/2", env)
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(2, 0).await;
    let run = server
        .execute(&runner, exec("ls /many | wc -l; echo $LANG"))
        .await;
    // No Env: trident's default environment.
    assert_eq!(run.stdout(), "60\r\nC.UTF-8\r\n", "{run:?}");
}

/// Unmounts (lazily) what a test mounted, also when it fails.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_the_kernel_cannot_idmap_falls_back_to_plain_lowers() {
    // An image directory that is itself an overlay mount: overlayfs refuses to be idmapped,
    // as older kernels refuse everything and tmpfs before 6.3 does.
    let tmp = tempfile::tempdir().unwrap();
    let (rootfs, empty, image) = (
        tmp.path().join("tiny"),
        tmp.path().join("empty"),
        tmp.path().join("image"),
    );
    busybox_rootfs(&rootfs);
    std::fs::create_dir(&empty).unwrap();
    std::fs::create_dir(&image).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}:{}", rootfs.display(), empty.display()))
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());
    let _mounted = Mounted(image.clone());
    let server = Server::start_with(Options {
        config_yaml: Some(format!("images:\n  tiny: {}\n", image.display())),
        ..Options::default()
    });
    let mut env = common::environment(1, 1, 128);
    env["image"] = json!("tiny");
    let r = server
        .send(Method::PUT, "/execution-environments/1", env)
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(1, 0).await;
    // The runner works as before idmapping: the image's files show as the overflow id,
    // root in the runner cannot change them, and nothing reaches the image.
    let run = server
        .execute(
            &runner,
            json!({"command": "stat -c \"%u:%g\" /bin/busybox /home/owned; id -un; touch /etc/new",
                   "privilegedExecution": true}),
        )
        .await;
    assert_eq!(
        run.stdout(),
        "65534:65534\r\n65534:65534\r\nroot\r\n",
        "{run:?}"
    );
    assert!(run.stderr().contains("/etc/new"), "{run:?}");
    assert!(!rootfs.join("etc/new").exists());
}
