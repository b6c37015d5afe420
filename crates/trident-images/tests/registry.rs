//! Pulls from real registries (Debian's docker-registry on loopback) of images built here.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use trident_images::{Credentials, ImageError, ImageState, ImageStore, RegistryConfig};

fn store(config: RegistryConfig) -> (tempfile::TempDir, Arc<ImageStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = ImageStore::open(dir.path().join("images"), config).unwrap();
    (dir, s)
}

fn three_layer_image(tag: &str) -> TestImage {
    TestImage::new(
        vec![
            layer(
                &[("etc/os-release", b"ID=test\n"), ("bin/tool", b"v1")],
                Comp::Gzip,
            ),
            layer(
                &[("usr/share/zstd.txt", format!("zstd {tag}").as_bytes())],
                Comp::Zstd,
            ),
            layer(
                &[("bin/tool", b"v2"), ("srv/plain.txt", b"plain")],
                Comp::None,
            ),
        ],
        &["PATH=/usr/bin:/bin", "LANG=C.UTF-8", &format!("TAG={tag}")],
        host_arch(),
    )
}

#[tokio::test]
async fn pull_by_tag_and_by_digest_with_all_compressions() {
    let reg = TestRegistry::anonymous();
    let img = three_layer_image("1");
    let (digest, _) = reg.push_image("team/app:1", &img).await;
    let docker = three_layer_image("docker").docker();
    let (ddigest, _) = reg.push_image("team/app:docker", &docker).await;
    let (_dir, s) = store(insecure(&[&reg.host]));

    let name = format!("{}/team/app:1", reg.host);
    let image = s.pull(&name).await.unwrap();
    assert_eq!(image.name, name);
    assert_eq!(image.digest, digest);
    assert_eq!(image.layers.len(), 3);
    assert_eq!(
        image.size,
        img.layers.iter().map(|l| l.blob.len() as u64).sum::<u64>()
    );
    assert_eq!(read_in(&image.layers, "bin/tool").unwrap(), b"v2");
    assert_eq!(
        read_in(&image.layers, "etc/os-release").unwrap(),
        b"ID=test\n"
    );
    assert_eq!(
        read_in(&image.layers, "usr/share/zstd.txt").unwrap(),
        b"zstd 1"
    );
    assert_eq!(read_in(&image.layers, "srv/plain.txt").unwrap(), b"plain");
    assert_eq!(
        image.config.env,
        ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "TAG=1"]
    );
    assert_eq!(image.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(image.config.cmd, ["/bin/sh"]);
    let st = s.status(&name).unwrap();
    assert_eq!(st.state, ImageState::Ready);
    assert_eq!(st.digest.as_deref(), Some(digest.as_str()));
    assert_eq!((st.bytes_done, st.layers), (st.bytes_total, 3));
    assert_eq!(
        serde_json::to_value(&st).unwrap()["state"],
        serde_json::json!("ready")
    );

    // By digest: the same layers, no new unpack.
    let by_digest = format!("{}/team/app@{digest}", reg.host);
    let again = s.pull(&by_digest).await.unwrap();
    assert_eq!(again.layers, image.layers);
    assert_eq!(again.digest, digest);

    // A Docker v2 schema 2 manifest (docker media types).
    let d = s
        .pull(&format!("{}/team/app:docker", reg.host))
        .await
        .unwrap();
    assert_eq!(d.digest, ddigest);
    assert_eq!(
        read_in(&d.layers, "usr/share/zstd.txt").unwrap(),
        b"zstd docker"
    );
    assert_eq!(s.list().len(), 3);

    // The store reopens with its images ready.
    drop(s);
    let s2 = ImageStore::open(_dir.path().join("images"), insecure(&[&reg.host])).unwrap();
    assert_eq!(s2.ready(&name).unwrap().layers, image.layers);

    // Unknown image and unknown tag say so.
    let e = s2
        .pull(&format!("{}/team/nope:1", reg.host))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "image {}/team/nope:1 not found in registry {}",
            reg.host, reg.host
        )
    );
    let st = s2.status(&format!("{}/team/nope:1", reg.host)).unwrap();
    assert_eq!(st.state, ImageState::Failed);
    assert!(st.error.unwrap().contains("not found"));
    assert!(matches!(
        s2.remove("docker.io/library/never:1"),
        Err(ImageError::NotFound(_))
    ));
    assert!(matches!(
        s2.request("Bad Name"),
        Err(ImageError::InvalidReference(_))
    ));
}

#[tokio::test]
async fn index_picks_the_host_platform() {
    let reg = TestRegistry::anonymous();
    let mut entries = Vec::new();
    for (arch, variant) in [("arm64", Some("v8")), ("amd64", None), ("s390x", None)] {
        let img = TestImage::new(
            vec![layer(&[("arch", arch.as_bytes())], Comp::Gzip)],
            &[&format!("ARCH={arch}")],
            arch,
        );
        let (d, n) = reg.push_image(&format!("multi/img:{arch}"), &img).await;
        entries.push((d, n, arch, variant));
    }
    let idx = index(&entries);
    reg.push("multi/img:latest", &[], &idx, OCI_INDEX).await;
    let (_dir, s) = store(insecure(&[&reg.host]));
    let image = s.pull(&format!("{}/multi/img", reg.host)).await.unwrap();
    assert_eq!(
        read_in(&image.layers, "arch").unwrap(),
        host_arch().as_bytes()
    );
    let want = entries.iter().find(|e| e.2 == host_arch()).unwrap();
    assert_eq!(image.digest, want.0, "the platform manifest's digest");
    assert_eq!(image.config.env, [format!("ARCH={}", host_arch())]);

    // An index without this platform names what it offers.
    let other = index(
        &entries
            .iter()
            .filter(|e| e.2 == "s390x")
            .cloned()
            .collect::<Vec<_>>(),
    );
    reg.push("multi/img:other", &[], &other, OCI_INDEX).await;
    let e = s
        .pull(&format!("{}/multi/img:other", reg.host))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("linux/s390x"), "{e}");
}

#[tokio::test]
async fn credentials_from_config_and_docker_config() {
    let reg = TestRegistry::htpasswd("tuser", "tpass");
    let img = three_layer_image("auth");
    reg.push_image("private/app:1", &img).await;
    let name = format!("{}/private/app:1", reg.host);

    let (_d, s) = store(insecure(&[&reg.host]));
    let e = s.pull(&name).await.unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("registry {} refused access", reg.host)),
        "{msg}"
    );
    assert!(msg.contains("registry_auth"), "{msg}");

    let mut wrong = insecure(&[&reg.host]);
    wrong.registry_auth.insert(
        reg.host.clone(),
        Credentials {
            username: "tuser".into(),
            password: "nope".into(),
        },
    );
    let (_d, s) = store(wrong);
    let e = s.pull(&name).await.unwrap_err();
    assert!(e.to_string().contains("refused the credentials"), "{e}");

    let mut good = insecure(&[&reg.host]);
    good.registry_auth.insert(
        reg.host.clone(),
        Credentials {
            username: "tuser".into(),
            password: "tpass".into(),
        },
    );
    let (_d, s) = store(good);
    let image = s.pull(&name).await.unwrap();
    assert_eq!(read_in(&image.layers, "srv/plain.txt").unwrap(), b"plain");

    let cfg_dir = tempfile::tempdir().unwrap();
    let path = cfg_dir.path().join("config.json");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("tuser:tpass");
    std::fs::write(
        &path,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host),
    )
    .unwrap();
    let mut dc = insecure(&[&reg.host]);
    dc.docker_config = Some(path);
    let (_d, s) = store(dc);
    s.pull(&name).await.unwrap();
}

#[tokio::test]
async fn plain_http_only_when_listed_insecure() {
    let reg = TestRegistry::anonymous();
    reg.push_image("team/app:1", &three_layer_image("x")).await;
    let (_d, s) = store(RegistryConfig::default());
    let e = s
        .pull(&format!("{}/team/app:1", reg.host))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unreachable(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("registry {} unreachable", reg.host)),
        "{msg}"
    );
    assert!(msg.contains("insecure_registries"), "{msg}");

    // Nobody listening: unreachable, connection refused.
    let (_d, s) = store(insecure(&["127.0.0.1:9"]));
    let e = s.pull("127.0.0.1:9/x:1").await.unwrap_err();
    assert!(matches!(e, ImageError::Unreachable(_)), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("connect"), "{e}");
}

#[tokio::test]
async fn docker_hub_images_come_from_a_mirror() {
    let reg = TestRegistry::anonymous();
    let (digest, _) = reg
        .push_image("library/x:1", &three_layer_image("mirror"))
        .await;
    let config = RegistryConfig {
        registry_mirrors: vec![format!("http://{}", reg.host)],
        ..Default::default()
    };
    let (_d, s) = store(config);
    let image = s.pull("x:1").await.unwrap();
    assert_eq!(image.name, "docker.io/library/x:1");
    assert_eq!(image.digest, digest);
    assert_eq!(
        read_in(&image.layers, "usr/share/zstd.txt").unwrap(),
        b"zstd mirror"
    );
    assert!(s.ready("docker.io/library/x:1").is_some());
}

#[tokio::test]
async fn bearer_token_challenge() {
    let reg = TestRegistry::anonymous();
    reg.push_image("t/x:1", &three_layer_image("bearer")).await;
    let p = proxy(
        &reg.host,
        ProxyState {
            bearer: true,
            ..Default::default()
        },
    )
    .await;
    let (_d, s) = store(insecure(&[&p.host]));
    let image = s.pull(&format!("{}/t/x:1", p.host)).await.unwrap();
    assert_eq!(read_in(&image.layers, "bin/tool").unwrap(), b"v2");
    assert!(p.count("token") >= 1, "the token endpoint was asked");
    let st = p.state.lock().unwrap();
    let token_req = st
        .heads
        .iter()
        .find(|h| h.starts_with("get /token"))
        .unwrap();
    assert!(
        token_req.contains("scope=repository%3at%2fx%3apull"),
        "{token_req}"
    );
}

#[tokio::test]
async fn tampered_blob_is_refused_and_not_kept() {
    let reg = TestRegistry::anonymous();
    let img = three_layer_image("tamper");
    reg.push_image("t/x:1", &img).await;
    let bad = sha(&img.layers[1].blob);
    let p = proxy(
        &reg.host,
        ProxyState {
            tamper: Some(bad.clone()),
            ..Default::default()
        },
    )
    .await;
    let (dir, s) = store(insecure(&[&p.host]));
    let e = s.pull(&format!("{}/t/x:1", p.host)).await.unwrap_err();
    assert!(matches!(e, ImageError::Refused(_)), "{e:?}");
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    let hex = bad.trim_start_matches("sha256:");
    let root = dir.path().join("images");
    assert!(!root.join("blobs/sha256").join(hex).exists());
    assert!(!root.join("partial").join(hex).exists());
    assert!(!root.join("layers").join(hex).exists());
    assert!(s.ready(&format!("{}/t/x:1", p.host)).is_none());
}

#[tokio::test]
async fn concurrent_pulls_download_once_and_shared_layers_unpack_once() {
    let reg = TestRegistry::anonymous();
    let base = layer(&[("base.txt", b"shared base")], Comp::Gzip);
    let a = TestImage::new(
        vec![base.clone(), layer(&[("a", b"a")], Comp::Gzip)],
        &[],
        host_arch(),
    );
    let b = TestImage::new(
        vec![base.clone(), layer(&[("b", b"b")], Comp::Zstd)],
        &[],
        host_arch(),
    );
    reg.push_image("t/a:1", &a).await;
    reg.push_image("t/b:1", &b).await;
    let p = proxy(&reg.host, ProxyState::default()).await;
    let (dir, s) = store(insecure(&[&p.host]));
    let (na, nb) = (format!("{}/t/a:1", p.host), format!("{}/t/b:1", p.host));

    s.request(&na).unwrap();
    let (x, y, z, w) = tokio::join!(s.pull(&na), s.pull(&na), s.pull(&nb), s.pull(&nb));
    let (x, y, z, w) = (x.unwrap(), y.unwrap(), z.unwrap(), w.unwrap());
    assert_eq!(x.layers, y.layers);
    assert_eq!(z.layers, w.layers);
    assert_eq!(x.layers[0], z.layers[0], "the shared layer is one dir");
    for l in a.layers.iter().chain(&b.layers) {
        assert_eq!(p.blob_gets(&sha(&l.blob)), 1, "one download per blob");
    }
    let root = dir.path().join("images");
    assert_eq!(dir_entries(&root.join("layers")).len(), 3);

    // remove() keeps what the other image uses.
    s.remove(&na).unwrap();
    assert!(s.status(&na).is_none());
    assert!(z.layers.iter().all(|l| l.is_dir()));
    assert!(!x.layers[1].exists());
    assert_eq!(dir_entries(&root.join("layers")).len(), 2);
    assert!(!root
        .join("blobs/sha256")
        .join(sha(&a.layers[1].blob).trim_start_matches("sha256:"))
        .exists());
    s.remove(&nb).unwrap();
    assert!(dir_entries(&root.join("layers")).is_empty());
    assert!(dir_entries(&root.join("blobs/sha256")).is_empty());
    assert!(dir_entries(&root.join("images")).is_empty());
}

#[tokio::test]
async fn request_answers_at_once_and_failed_pulls_retry() {
    let reg = TestRegistry::anonymous();
    let (_d, s) = store(insecure(&[&reg.host]));
    let name = format!("{}/late/img:1", reg.host);
    s.request(&name).unwrap();
    // Not there yet: fails, and is retried in the background (2 s later).
    let e = s.wait_ready(&name, Duration::from_secs(10)).await;
    let e = match e {
        Err(e) => e,
        Ok(_) => panic!("not pushed yet"),
    };
    assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");
    assert_eq!(s.status(&name).unwrap().state, ImageState::Failed);
    reg.push_image("late/img:1", &three_layer_image("late"))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while s.ready(&name).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry did not pull it: {:?}",
            s.status(&name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = s.status(&name).unwrap();
    assert_eq!((st.state, st.error), (ImageState::Ready, None));
}

#[tokio::test]
async fn quota_stops_a_big_layer() {
    let reg = TestRegistry::anonymous();
    let big = noise(256 << 10, 7);
    let img = TestImage::new(vec![layer(&[("big", &big)], Comp::Gzip)], &[], host_arch());
    reg.push_image("t/big:1", &img).await;
    let mut cfg = insecure(&[&reg.host]);
    cfg.max_layer_bytes = 64 << 10;
    let (dir, s) = store(cfg);
    let e = s.pull(&format!("{}/t/big:1", reg.host)).await.unwrap_err();
    assert!(matches!(e, ImageError::Quota(_)), "{e:?}");
    assert!(e.to_string().contains("max_layer_bytes"), "{e}");
    let root = dir.path().join("images");
    assert!(dir_entries(&root.join("layers")).is_empty());
    assert!(
        dir_entries(&root.join("tmp")).is_empty(),
        "no half-unpacked layer left"
    );
}

#[test]
fn interrupted_pull_resumes_after_restart() {
    let rt = || tokio::runtime::Runtime::new().unwrap();
    let main = rt();
    let reg = TestRegistry::anonymous();
    let small = layer(&[("small", b"first")], Comp::Gzip);
    let big = layer(&[("big", &noise(2 << 20, 3))], Comp::None);
    let img = TestImage::new(vec![small.clone(), big.clone()], &["K=V"], host_arch());
    main.block_on(reg.push_image("t/x:1", &img));
    let (big_d, small_d) = (sha(&big.blob), sha(&small.blob));
    let p = main.block_on(proxy(
        &reg.host,
        ProxyState {
            cut: Some((big_d.clone(), 700_000)),
            ..Default::default()
        },
    ));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let name = format!("{}/t/x:1", p.host);

    // The first process: the connection breaks mid-blob; then it "dies" (its runtime and
    // tasks are dropped without any cleanup, as a kill -9 would).
    {
        let crashed = rt();
        let s = ImageStore::open(root.clone(), insecure(&[&p.host])).unwrap();
        let e = crashed.block_on(s.pull(&name)).unwrap_err();
        assert!(matches!(e, ImageError::Unreachable(_)), "{e:?}");
        assert!(e.to_string().contains("broke off"), "{e}");
        let partial = root
            .join("partial")
            .join(big_d.trim_start_matches("sha256:"));
        let have = std::fs::metadata(&partial).unwrap().len();
        assert!(
            have > 0 && have < big.blob.len() as u64,
            "partial has {have} bytes"
        );
        drop(crashed);
    }
    // Leftovers of a crash in tmp/ go away at open.
    std::fs::create_dir_all(root.join("tmp/layer-junk")).unwrap();

    let s = ImageStore::open(root.clone(), insecure(&[&p.host])).unwrap();
    assert!(!root.join("tmp/layer-junk").exists());
    let image = main.block_on(async {
        s.resume_pending();
        s.wait_ready(&name, Duration::from_secs(30)).await
    });
    let image = image.unwrap();
    assert_eq!(read_in(&image.layers, "small").unwrap(), b"first");
    assert_eq!(read_in(&image.layers, "big").unwrap().len(), 2 << 20);
    assert_eq!(
        p.blob_gets(&small_d),
        1,
        "the fetched blob is not fetched again"
    );
    assert_eq!(p.blob_gets(&big_d), 2);
    let st = p.state.lock().unwrap();
    assert!(
        st.heads
            .iter()
            .any(|h| h.contains(&big_d) && h.contains("range: bytes=")),
        "the second attempt continues with a Range request"
    );
    drop(st);
    let pending: Vec<String> =
        serde_json::from_slice(&std::fs::read(root.join("pending.json")).unwrap()).unwrap();
    assert!(pending.is_empty(), "{pending:?}");
}
