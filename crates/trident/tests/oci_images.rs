//! Environments and jobs of real OCI images: the test builds its own images (layers as
//! tarballs: whiteouts, an opaque dir, symlinks, hard links, a setuid file, files of uid
//! 1000, gzip, zstd and plain layers, a multi-platform index, a config with Env), pushes them
//! to a real registry on loopback, and checks what a runner of them sees.

mod common;
#[path = "common/registry.rs"]
mod registry;

use std::time::{Duration, Instant};

use common::{error_of, exec, Options, Server};
use registry::{busybox_base, push_index, Compression, LayerBuilder, Registry, TestImage};
use reqwest::Method;
use serde_json::{json, Value};

fn image_env(id: u64, image: &str, pool: u32) -> Value {
    json!({"id": id, "image": image, "prewarmingPoolSize": pool, "cpuLimit": 20,
           "memoryLimit": 128, "networkAccess": false, "exposedPorts": []})
}

/// The image of most tests: three layers, the upper two deleting and hiding files of the
/// lowest.
fn app_image() -> TestImage {
    app_image_with(Compression::Zstd)
}

/// `middle`: how the middle layer is compressed (a docker-archive cannot hold zstd).
fn app_image_with(middle: Compression) -> TestImage {
    let base = busybox_base()
        .dir("data", 0o755, 0)
        .file("data/gone.txt", b"deleted above\n", 0o644, 0)
        .file("data/kept.txt", b"kept\n", 0o644, 0)
        .dir("opaque", 0o755, 0)
        .file("opaque/old.txt", b"hidden above\n", 0o644, 0)
        .hardlink("bin/busybox-again", "bin/busybox")
        .symlink("data/link", "kept.txt")
        .build(Compression::Gzip);
    let middle = LayerBuilder::new()
        .dir("data", 0o755, 0)
        .file("data/.wh.gone.txt", b"", 0o644, 0)
        .dir("opaque", 0o755, 0)
        .file("opaque/.wh..wh..opq", b"", 0o644, 0)
        .file("opaque/new.txt", b"new\n", 0o644, 0)
        .build(middle);
    let top = LayerBuilder::new()
        .dir("etc", 0o755, 0)
        .file("etc/motd", b"welcome to the test image\n", 0o644, 0)
        .build(Compression::None);
    TestImage {
        layers: vec![base, middle, top],
        env: vec![
            "PATH=/bin:/usr/bin".into(),
            "LANG=C.UTF-8".into(),
            "IMAGE_VAR=from-image".into(),
            "OVERRIDDEN=by-image".into(),
        ],
        architecture: "amd64",
    }
}

/// An image for another platform: never what this host runs.
fn other_platform_image() -> TestImage {
    TestImage {
        layers: vec![busybox_base()
            .file("wrong-platform", b"arm64\n", 0o644, 0)
            .build(Compression::Gzip)],
        env: vec!["PATH=/bin".into()],
        architecture: "arm64",
    }
}

async fn run(server: &Server, runner: &str, command: &str) -> String {
    let run = server.execute(runner, exec(command)).await;
    assert_eq!(run.last()["type"], "exit", "{command}: {:?}", run.messages);
    // Executions write to a terminal.
    run.stdout().replace("\r\n", "\n")
}

async fn images(server: &Server) -> Vec<Value> {
    let r = server.get("/images").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["images"].as_array().unwrap().clone()
}

fn server_for(registry_hosts: &[&str], extra: &str) -> Server {
    let insecure: Vec<String> = registry_hosts.iter().map(|h| format!("\"{h}\"")).collect();
    Server::start_with(Options {
        config_yaml: Some(format!(
            "claim_wait_seconds: 60\ninsecure_registries: [{}]\n{extra}",
            insecure.join(", ")
        )),
        ..Options::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_of_a_pulled_image_sees_its_layers_owners_and_environment() {
    let registry = Registry::start(None);
    let amd64 = registry.push("team/app", "amd64", &app_image()).await;
    let arm64 = registry
        .push("team/app", "arm64", &other_platform_image())
        .await;
    push_index(
        &registry,
        "team/app",
        "1",
        &[("arm64", arm64), ("amd64", amd64.clone())],
    )
    .await;
    let server = server_for(&[&registry.host], "");
    let reference = format!("{}/team/app:1", registry.host);

    // The PUT answers at once; the pull runs behind it and the claim waits for it.
    let started = Instant::now();
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/10",
            image_env(10, &reference, 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let put_took = started.elapsed();
    let runner = server.claim(10, 0).await;
    assert!(
        put_took < Duration::from_secs(5),
        "the PUT waited for the pull: {put_took:?}"
    );

    // Layers stacked, topmost first: whiteouts and the opaque dir applied.
    assert_eq!(
        run(&server, &runner, "cat /etc/motd").await,
        "welcome to the test image\n"
    );
    assert_eq!(
        run(
            &server,
            &runner,
            "test -e /data/gone.txt && echo present || echo gone"
        )
        .await,
        "gone\n"
    );
    assert_eq!(run(&server, &runner, "ls /opaque").await, "new.txt\n");
    assert_eq!(run(&server, &runner, "cat /data/link").await, "kept\n");
    assert_eq!(
        run(&server, &runner, "readlink /data/link").await,
        "kept.txt\n"
    );
    assert_eq!(
        run(
            &server,
            &runner,
            "test -e /wrong-platform && echo arm64 || echo amd64"
        )
        .await,
        "amd64\n",
        "the index entry of this host's platform"
    );
    // Owners as in the image, seen from inside (idmapped layers), modes kept.
    assert_eq!(
        run(
            &server,
            &runner,
            "stat -c %u:%g /bin/busybox /home/learner/notes.txt"
        )
        .await,
        "0:0\n1000:1000\n"
    );
    assert_eq!(
        run(&server, &runner, "stat -c %a /usr/bin/busybox-suid").await,
        "4755\n"
    );
    assert_eq!(
        run(&server, &runner, "stat -c %h /bin/busybox-again").await,
        "2\n",
        "a hard link inside the layer stays one"
    );
    // nosuid: the setuid file gives no privileges.
    assert_eq!(
        run(&server, &runner, "/usr/bin/busybox-suid id -u").await,
        "1000\n"
    );
    // The image's accounts stay, `user` is added.
    let passwd = run(&server, &runner, "cat /etc/passwd").await;
    assert!(passwd.contains("app:x:1001:1001"), "{passwd}");
    assert!(passwd.lines().any(|l| l.starts_with("user:")), "{passwd}");
    // The image's Env is the base, CODEOCEAN and the client's variables on top.
    let run_env = server
        .execute(
            &runner,
            json!({"command": "env; pwd", "environment": {"OVERRIDDEN": "by-client"}}),
        )
        .await;
    let out = run_env.stdout().replace("\r\n", "\n");
    for line in [
        "IMAGE_VAR=from-image",
        "LANG=C.UTF-8",
        "CODEOCEAN=true",
        "OVERRIDDEN=by-client",
        "/workspace",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing from {out}");
    }
    // Writes land in the runner's own layer, never in the shared layer dirs.
    // Root in the runner owns the image's files (idmapped), and its writes stay its own.
    let root = server
        .execute(
            &runner,
            json!({"command": "echo changed > /etc/motd && rm -f /data/kept.txt && cat /etc/motd",
                   "privilegedExecution": true}),
        )
        .await;
    assert_eq!(
        root.stdout().replace("\r\n", "\n"),
        "changed\n",
        "{:?}",
        root.messages
    );
    let fresh = server.claim(10, 0).await;
    assert_eq!(
        run(&server, &fresh, "cat /etc/motd /data/kept.txt").await,
        "welcome to the test image\nkept\n"
    );

    // Operators see the image.
    let listed = images(&server).await;
    let image = listed
        .iter()
        .find(|i| i["name"] == reference.as_str())
        .unwrap_or_else(|| panic!("{reference} not listed: {listed:?}"));
    assert_eq!(image["state"], "ready", "{image}");
    assert_eq!(image["layers"], 3, "{image}");
    assert!(
        image["digest"].as_str().unwrap().starts_with("sha256:"),
        "{image}"
    );
    assert!(image["size"].as_u64().unwrap() > 100_000, "{image}");

    // In use: not removable; once the environment is gone, it is.
    let path = format!("/images/{reference}");
    let (status, message) = error_of(
        server.request(Method::DELETE, &path).send().await.unwrap(),
        "rm",
    )
    .await;
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("10") || message.contains("environment"),
        "{message}"
    );
    assert_eq!(
        server
            .request(Method::DELETE, "/execution-environments/10")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        server
            .request(Method::DELETE, &path)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert!(images(&server)
        .await
        .iter()
        .all(|i| i["name"] != reference.as_str()));
    let layers_left = std::fs::read_dir(server.data_dir.join("images/layers"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(layers_left, 0, "the image's layers are collected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_are_400_and_failed_pulls_answer_claims_at_once() {
    let registry = Registry::start(None);
    let server = server_for(&[&registry.host], "");
    for bad in ["Python:3", "a b", "x:", "@sha256:00", "host/:tag"] {
        let r = server
            .send(
                Method::PUT,
                "/execution-environments/11",
                image_env(11, bad, 1),
            )
            .await;
        let (status, message) = error_of(r, bad).await;
        assert_eq!(status, 400, "{bad}: {message}");
    }
    assert_eq!(server.get("/execution-environments/11").await.status(), 404);

    let missing = format!("{}/team/missing:1", registry.host);
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/11",
            image_env(11, &missing, 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        let r = server
            .send(
                Method::POST,
                "/runners",
                json!({"executionEnvironmentId": 11}),
            )
            .await;
        let (status, message) = error_of(r, "claim").await;
        assert_eq!(status, 500, "{message}");
        if message.contains("not found") || message.contains("unknown") {
            break message;
        }
        assert!(Instant::now() < deadline, "{message}");
    };
    assert!(message.contains("team/missing"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let listed = images(&server).await;
    let entry = listed
        .iter()
        .find(|i| i["name"] == missing.as_str())
        .unwrap();
    assert_eq!(entry["state"], "failed", "{entry}");
    assert!(
        entry["error"].as_str().unwrap().contains("not found"),
        "{entry}"
    );

    // Once the image exists, a PUT of the same environment retries at once.
    registry.push("team/missing", "1", &app_image()).await;
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/11",
            image_env(11, &missing, 1),
        )
        .await;
    assert_eq!(r.status(), 204);
    let runner = server.claim(11, 0).await;
    assert_eq!(
        run(&server, &runner, "cat /etc/motd").await,
        "welcome to the test image\n"
    );

    // The API pulls too, and says what it is doing.
    let r = server
        .send(
            Method::POST,
            "/images",
            json!({"name": "no spaces allowed"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = server
        .send(
            Method::POST,
            "/images",
            json!({"name": format!("{}/team/app:amd64", registry.host)}),
        )
        .await;
    assert!(r.status() == 202 || r.status() == 200, "{}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_the_config_or_a_docker_config_file() {
    let registry = Registry::start(Some(("learner", "s3cret")));
    registry.push("private/app", "1", &app_image()).await;
    let reference = format!("{}/private/app:1", registry.host);

    // Without credentials: refused, and the reason says so.
    let server = server_for(&[&registry.host], "");
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/12",
            image_env(12, &reference, 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = server
            .send(
                Method::POST,
                "/runners",
                json!({"executionEnvironmentId": 12}),
            )
            .await;
        let (status, message) = error_of(r, "claim").await;
        assert_eq!(status, 500);
        if message.contains("unauthorized") || message.contains("credentials") {
            assert!(message.contains(&registry.host), "{message}");
            break;
        }
        assert!(Instant::now() < deadline, "{message}");
    }
    drop(server);

    // registry_auth in the config.
    let server = server_for(
        &[&registry.host],
        &format!(
            "registry_auth:\n  \"{}\": {{username: learner, password: s3cret}}\n",
            registry.host
        ),
    );
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/12",
            image_env(12, &reference, 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(12, 0).await;
    assert_eq!(
        run(&server, &runner, "cat /etc/motd").await,
        "welcome to the test image\n"
    );
    drop(server);

    // A Docker credentials file.
    let dir = tempfile::tempdir().unwrap();
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        json!({"auths": {registry.host.clone(): {"auth": common::b64("learner:s3cret")}}})
            .to_string(),
    )
    .unwrap();
    let server = server_for(
        &[&registry.host],
        &format!("docker_config: {}\n", docker_config.display()),
    );
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/12",
            image_env(12, &reference, 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(12, 0).await;
    assert_eq!(run(&server, &runner, "cat /data/kept.txt").await, "kept\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_naming_only_an_image_runs_in_a_fresh_runner_of_it() {
    let registry = Registry::start(None);
    registry.push("ci/tools", "1", &app_image()).await;
    let server = server_for(&[&registry.host], "");
    let reference = format!("{}/ci/tools:1", registry.host);
    let id = common::gitlab::submit_id(
        &server,
        json!({"name": "in-image", "image": reference,
               "script": ["cat /etc/motd", "echo var=$IMAGE_VAR"]}),
    )
    .await;
    let (job, trace) = common::gitlab::wait_finished(&server, id).await;
    assert_eq!(job["status"], "success", "{job} {trace}");
    assert!(trace.contains("welcome to the test image"), "{trace}");
    assert!(trace.contains("var=from-image"), "{trace}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_saved_by_docker_loads_offline() {
    let registry = Registry::start(None);
    registry
        .push("team/app", "1", &app_image_with(Compression::Gzip))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("app.tar");
    let out = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/team/app:1", registry.host),
            &format!("docker-archive:{}:team/app:1", archive.display()),
        ])
        .output()
        .expect("skopeo (apt-get install skopeo; .ci/run does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(registry);

    let server = Server::start_with(Options {
        config_yaml: Some(format!(
            "claim_wait_seconds: 60\nimages:\n  offline-app: docker-archive:{}\n",
            archive.display()
        )),
        ..Options::default()
    });
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/13",
            image_env(13, "offline-app", 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(13, 0).await;
    assert_eq!(
        run(&server, &runner, "cat /etc/motd; ls /opaque").await,
        "welcome to the test image\nnew.txt\n"
    );
    drop(server);

    // The same archive loaded into a stopped server's data dir with the CLI, then named
    // by environments like any image.
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trident"))
        .args(["image", "--data-dir"])
        .arg(&data_dir)
        .args([
            "pull",
            &format!("docker-archive:{}", archive.display()),
            "--as",
            "team/offline:1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("docker.io/team/offline:1 ready: 3 layers"),
        "{stdout}"
    );
    let server = Server::start_with(Options {
        config_yaml: Some("claim_wait_seconds: 60\n".into()),
        data_dir: Some(data_dir),
        ..Options::default()
    });
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/13",
            image_env(13, "team/offline:1", 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(13, 0).await;
    assert_eq!(run(&server, &runner, "cat /data/kept.txt").await, "kept\n");
}

/// Waits until claims on `env` fail with a message naming a layer entry; returns it.
async fn refused_pull(server: &Server, env: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = server
            .send(
                Method::POST,
                "/runners",
                json!({"executionEnvironmentId": env}),
            )
            .await;
        let (status, message) = error_of(r, "claim").await;
        assert_eq!(status, 500, "{message}");
        if message.contains("layer entry") {
            return message;
        }
        assert!(Instant::now() < deadline, "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_fail_the_pull_by_name_or_stay_inside_and_touch_nothing_outside() {
    let registry = Registry::start(None);
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "host secret\n").unwrap();
    let outside_path = outside.path().to_str().unwrap().to_string();
    let snapshot = || {
        let mut names: Vec<String> = std::fs::read_dir(outside.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        (names, std::fs::read_to_string(&secret).unwrap())
    };
    let before = snapshot();
    let server = server_for(&[&registry.host], "max_layer_mb: 8\n");

    // Refused, each naming the entry that was.
    let refused: Vec<(&str, registry::Layer, &str)> = vec![
        (
            "symlink-then-write",
            LayerBuilder::new()
                .symlink("escape", &outside_path)
                .file("escape/pwned", b"written through a symlink\n", 0o644, 0)
                .build(Compression::Gzip),
            "escape/pwned",
        ),
        (
            "hardlink-outside",
            LayerBuilder::new()
                .hardlink("stolen", &format!("{outside_path}/secret"))
                .build(Compression::Gzip),
            "stolen",
        ),
        (
            "hardlink-up",
            LayerBuilder::new()
                .raw_hardlink("shadow", "../../../../etc/shadow")
                .build(Compression::Gzip),
            "shadow",
        ),
        (
            "over-quota",
            LayerBuilder::new()
                .file("big.bin", &registry::incompressible(10 << 20, 3), 0o644, 0)
                .build(Compression::Zstd),
            "quota",
        ),
    ];
    for (i, (name, layer, needle)) in refused.into_iter().enumerate() {
        let image = TestImage {
            layers: vec![busybox_base().build(Compression::Gzip), layer],
            env: vec![],
            architecture: "amd64",
        };
        registry.push("evil/app", name, &image).await;
        let env = 30 + i as u64;
        let reference = format!("{}/evil/app:{name}", registry.host);
        let r = server
            .send(
                Method::PUT,
                &format!("/execution-environments/{env}"),
                image_env(env, &reference, 1),
            )
            .await;
        assert_eq!(r.status(), 201);
        let message = refused_pull(&server, env).await;
        assert!(message.contains(needle), "{name}: {message}");
        assert_eq!(snapshot(), before, "{name} changed the host");
    }
    assert!(!std::path::Path::new("/tmp/trident-climbed").exists());

    // Confined: `..` and absolute names land inside the layer, a device node is useless
    // behind nodev, and a forged opaque xattr hides nothing.
    let mut forged = LayerBuilder::new();
    forged.pax_dir("keep", &[("SCHILY.xattr.trusted.overlay.opaque", b"y")]);
    let confined = TestImage {
        layers: vec![
            busybox_base()
                .dir("keep", 0o755, 0)
                .file("keep/lower.txt", b"still here\n", 0o644, 0)
                .build(Compression::Gzip),
            forged
                .raw_file("../../../../climbed.txt", b"climbed\n")
                .raw_file("/abs/inside.txt", b"absolute\n")
                .device("nodes/null", 1, 3)
                .build(Compression::Gzip),
        ],
        env: vec![],
        architecture: "amd64",
    };
    registry.push("evil/app", "confined", &confined).await;
    let reference = format!("{}/evil/app:confined", registry.host);
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/40",
            image_env(40, &reference, 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    let runner = server.claim(40, 0).await;
    assert_eq!(
        run(
            &server,
            &runner,
            "cat /climbed.txt /abs/inside.txt /keep/lower.txt"
        )
        .await,
        "climbed\nabsolute\nstill here\n"
    );
    let out = run(
        &server,
        &runner,
        "stat -c %t:%T /nodes/null; cat /nodes/null && echo opened || echo refused",
    )
    .await;
    // The node exists (as containerd makes them) but opens nothing: the mounts are nodev.
    assert!(
        out.starts_with("1:3\n") && out.ends_with("refused\n"),
        "{out}"
    );
    assert_eq!(snapshot(), before);
    assert!(!std::path::Path::new("/climbed.txt").exists());
    assert!(!std::path::Path::new("/abs/inside.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_cut_by_kill_9_finishes_after_the_restart() {
    let registry = Registry::start(None);
    let mut image = app_image();
    // 12 MiB at 2 MiB/s through the proxy: the kill comes mid-pull.
    image.layers.push(
        LayerBuilder::new()
            .file("big.bin", &registry::incompressible(12 << 20, 7), 0o644, 0)
            .build(Compression::Gzip),
    );
    registry.push("team/big", "1", &image).await;
    let proxy = registry::SlowProxy::start(&registry.host, 2 << 20).await;
    let mut server = server_for(&[&proxy.host], "");
    let reference = format!("{}/team/big:1", proxy.host);
    let r = server
        .send(
            Method::PUT,
            "/execution-environments/15",
            image_env(15, &reference, 1),
        )
        .await;
    assert_eq!(r.status(), 201);
    common::eventually(Duration::from_secs(30), "the pull under way", || async {
        images(&server).await.iter().any(|i| {
            i["name"] == reference.as_str()
                && i["state"] == "pulling"
                && i["bytesDone"].as_u64().unwrap_or(0) > (1 << 20)
        })
    })
    .await;
    server.crash_and_restart();
    let runner = server.claim(15, 0).await;
    assert_eq!(
        run(&server, &runner, "wc -c < /big.bin").await.trim(),
        (12 << 20).to_string()
    );
    assert_eq!(
        run(&server, &runner, "cat /etc/motd").await,
        "welcome to the test image\n"
    );
    let image = images(&server)
        .await
        .into_iter()
        .find(|i| i["name"] == reference.as_str())
        .unwrap();
    assert_eq!(image["state"], "ready", "{image}");
    assert_eq!(image["layers"], 4, "{image}");
}

/// `trident image pull|ls|rm` against the running server, as an operator types them.
fn cli(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trident"))
        .arg("image")
        .args(["--server", &format!("http://{}", server.address)])
        .args(args)
        .env_remove("TRIDENT_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_command_pulls_lists_and_removes_through_the_server() {
    let registry = Registry::start(None);
    registry.push("team/cli", "1", &app_image()).await;
    let server = server_for(&[&registry.host], "");
    let reference = format!("{}/team/cli:1", registry.host);

    let (ok, stdout, stderr) = cli(&server, &["pull", &reference]);
    assert!(ok, "{stdout} {stderr}");
    assert!(
        stdout.contains(&format!("{reference} ready: 3 layers")),
        "{stdout}"
    );
    // Not a terminal: plain progress lines, no bar.
    assert!(stderr.contains(&format!("pulling {reference}")), "{stderr}");
    let (ok, stdout, _) = cli(&server, &["ls"]);
    assert!(ok);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&reference))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("ready") && line.contains("sha256:"), "{line}");

    let missing = format!("{}/team/absent:1", registry.host);
    let (ok, _, stderr) = cli(&server, &["pull", &missing]);
    assert!(!ok);
    assert!(stderr.contains("not found"), "{stderr}");
    let (ok, _, stderr) = cli(&server, &["pull", "Not Valid"]);
    assert!(!ok);
    assert!(stderr.contains("400"), "{stderr}");

    let (ok, stdout, stderr) = cli(&server, &["rm", &reference]);
    assert!(ok, "{stdout} {stderr}");
    let (_, stdout, _) = cli(&server, &["ls"]);
    assert!(!stdout.contains(&format!("{reference} ")), "{stdout}");
}
