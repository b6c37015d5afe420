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

    let mut env = common::environment(3, 1, 128);
    env["image"] = json!("openhpi/co_execenv_java:17");
    let r = server
        .send(Method::PUT, "/execution-environments/3", env)
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("images:"), "{message}");
    assert_eq!(server.get("/execution-environments/3").await.status(), 404);
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
