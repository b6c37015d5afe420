//! Offline sources: OCI layouts (dir and tar) written here, a docker-archive made from one
//! by skopeo, and one written by hand in `docker save`'s format.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use trident_images::{ImageError, ImageState, ImageStore, RegistryConfig};

fn store() -> (tempfile::TempDir, Arc<ImageStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = ImageStore::open(dir.path().join("images"), RegistryConfig::default()).unwrap();
    (dir, s)
}

fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    let p = layout
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    std::fs::write(p, bytes).unwrap();
    d
}

/// An OCI layout with images tagged v1 (gzip + a big plain layer) and v2 (zstd).
fn write_layout(layout: &Path) -> (TestImage, TestImage) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let big = noise(5 << 20, 11);
    let v1 = TestImage::new(
        vec![
            layer(&[("etc/hostname", b"offline\n")], Comp::Gzip),
            layer(&[("opt/big", &big)], Comp::None),
        ],
        &["PATH=/bin", "SRC=v1"],
        host_arch(),
    );
    let v2 = TestImage::new(
        vec![layer(&[("v2.txt", b"two")], Comp::Zstd)],
        &["SRC=v2"],
        host_arch(),
    );
    let mut manifests = Vec::new();
    for (tag, img) in [("v1", &v1), ("v2", &v2)] {
        for l in &img.layers {
            put_blob(layout, &l.blob);
        }
        put_blob(layout, &img.config);
        let m = img.manifest();
        let d = put_blob(layout, &m);
        manifests.push(serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": d, "size": m.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }));
    }
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    (v1, v2)
}

fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

#[tokio::test]
async fn oci_layout_dir_and_archive() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let (v1, _v2) = write_layout(&layout);
    let (dir, s) = store();

    let img = s
        .import("local/app:v1", &format!("oci:{}:v1", layout.display()))
        .await
        .unwrap();
    assert_eq!(img.name, "docker.io/local/app:v1");
    assert_eq!(img.digest, sha(&v1.manifest()));
    assert_eq!(read_in(&img.layers, "etc/hostname").unwrap(), b"offline\n");
    assert_eq!(read_in(&img.layers, "opt/big").unwrap().len(), 5 << 20);
    assert_eq!(img.config.env, ["PATH=/bin", "SRC=v1"]);
    let st = s.status("local/app:v1").unwrap();
    assert_eq!(st.state, ImageState::Ready);
    assert_eq!(st.layers, 2);

    // Two images and no ref: say which there are.
    let e = s
        .import("x", &format!("oci:{}", layout.display()))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("holds 2 images") && e.to_string().contains("v2"),
        "{e}"
    );
    let e = s
        .import("x", &format!("oci:{}:v9", layout.display()))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");

    let archive = work.path().join("layout.tar");
    tar_dir(&layout, &archive);
    let img2 = s
        .import(
            "local/app:v2",
            &format!("oci-archive:{}:v2", archive.display()),
        )
        .await
        .unwrap();
    assert_eq!(read_in(&img2.layers, "v2.txt").unwrap(), b"two");
    assert_eq!(img2.config.env, ["SRC=v2"]);
    // The archive's other image did not stay in the store.
    let root = dir.path().join("images");
    assert_eq!(dir_entries(&root.join("layers")).len(), 3);
    assert_eq!(dir_entries(&root.join("blobs/sha256")).len(), 3 + 2 + 2);
    assert_eq!(s.list().len(), 2);

    // A tampered layout blob is refused.
    let victim = sha(&_v2.layers[0].blob);
    let p = layout
        .join("blobs/sha256")
        .join(victim.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&p).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let (_d, fresh) = store();
    let e = fresh
        .import("t:1", &format!("oci:{}:v2", layout.display()))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Refused(_)), "{e:?}");
    assert!(e.to_string().contains("does not match its digest"), "{e}");

    let e = s
        .import("t:1", "oci-archive:/nonexistent/x.tar")
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");
    let e = s.import("t:1", "/x.tar").await.unwrap_err();
    assert!(matches!(e, ImageError::InvalidReference(_)), "{e:?}");
}

#[tokio::test]
async fn docker_archive_made_by_skopeo() {
    assert!(
        which("skopeo").is_some(),
        "this test needs skopeo (apt-get install skopeo)"
    );
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let (v1, _) = write_layout(&layout);
    let archive = work.path().join("img.tar");
    let out = Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker-archive:{}:test/img:v1", archive.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_d, s) = store();
    let img = s
        .import(
            "test/img:v1",
            &format!("docker-archive:{}", archive.display()),
        )
        .await
        .unwrap();
    assert_eq!(read_in(&img.layers, "etc/hostname").unwrap(), b"offline\n");
    assert_eq!(read_in(&img.layers, "opt/big").unwrap().len(), 5 << 20);
    assert_eq!(img.config.env, ["PATH=/bin", "SRC=v1"]);
    assert_eq!(img.layers.len(), v1.layers.len());
    // By tag inside the archive as well.
    let img2 = s
        .import(
            "other:1",
            &format!("docker-archive:{}:test/img:v1", archive.display()),
        )
        .await
        .unwrap();
    assert_eq!(img2.layers, img.layers);
    assert!(s.ready("docker.io/library/other:1").is_some());
}

#[tokio::test]
async fn docker_save_format_written_by_hand() {
    // docker save (before Docker 25): manifest.json, <id>/layer.tar, <config>.json, and a
    // layer repeated as a symlink to the first copy.
    let work = tempfile::tempdir().unwrap();
    let l1 = layer(&[("hello", b"docker save")], Comp::None);
    let l2 = layer(&[("second", b"2")], Comp::None);
    let img = TestImage::new(
        vec![l1.clone(), l2.clone(), l1.clone()],
        &["FROM=save"],
        host_arch(),
    );
    let cfg_name = format!("{}.json", sha(&img.config).trim_start_matches("sha256:"));
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, path, data).unwrap();
    };
    add(&mut b, "aaa/layer.tar", &l1.blob);
    add(&mut b, "bbb/layer.tar", &l2.blob);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    b.append_link(&mut h, "ccc/layer.tar", "../aaa/layer.tar")
        .unwrap();
    add(&mut b, &cfg_name, &img.config);
    let manifest = serde_json::json!([{
        "Config": cfg_name, "RepoTags": ["saved/img:1"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"]
    }]);
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let path = work.path().join("saved.tar");
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();

    let (dir, s) = store();
    let got = s
        .import(
            "saved/img:1",
            &format!("docker-archive:{}:saved/img:1", path.display()),
        )
        .await
        .unwrap();
    assert_eq!(got.layers.len(), 3);
    assert_eq!(
        got.layers[0], got.layers[2],
        "the repeated layer is one dir"
    );
    assert_eq!(read_in(&got.layers, "hello").unwrap(), b"docker save");
    assert_eq!(read_in(&got.layers, "second").unwrap(), b"2");
    assert_eq!(got.config.env, ["FROM=save"]);
    s.remove("saved/img:1").unwrap();
    let root = dir.path().join("images");
    assert!(dir_entries(&root.join("layers")).is_empty());
    assert!(dir_entries(&root.join("blobs/sha256")).is_empty());
}
