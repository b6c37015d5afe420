//! Images: the built-in `host`, names mapped to `host` or to a root filesystem directory in
//! the config's `images:` table, and unknown names rejected with a helpful 400.

mod common;

use std::os::unix::fs::symlink;
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
        "sh", "cat", "echo", "id", "ls", "touch", "env", "uname", "true", "rm",
    ] {
        symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/os-release"), "NAME=tiny\n").unwrap();
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
    // Root in the runner is an unprivileged host id: the image's own files (owned by host
    // ids outside its range) stay read-only to it, whatever happens inside.
    let run = server
        .execute(
            &runner,
            json!({"command": "cat hello.txt; touch /etc/new", "privilegedExecution": true}),
        )
        .await;
    assert_eq!(run.stdout(), "from the API");
    assert!(run.stderr().contains("/etc/new"), "{run:?}");
    assert!(
        !rootfs.join("etc/new").exists(),
        "the image directory was written"
    );
    assert!(
        !rootfs.join("workspace").exists(),
        "the image directory was written"
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
