//! A real CNCF distribution registry (Debian's `docker-registry`) on loopback, and images
//! the tests build themselves (layers written as tarballs here) pushed to it through the
//! registry's own HTTP API, as `docker push` does.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub struct Registry {
    /// `127.0.0.1:<port>`: the registry's host as it appears in references.
    pub host: String,
    child: Child,
    _dir: tempfile::TempDir,
    auth: Option<(String, String)>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl Registry {
    /// Starts a registry; with `auth`, it wants that user and password (htpasswd, bcrypt).
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        let binary = "/usr/bin/docker-registry";
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: apt-get install docker-registry (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: trident-tests\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&host).is_err() {
            assert!(Instant::now() < deadline, "the registry never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            host,
            child,
            _dir: dir,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = reqwest::Client::new().request(method, url);
        match &self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    /// Uploads a blob (monolithic upload) and returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let start = self
            .request(
                reqwest::Method::POST,
                &format!("http://{}/v2/{repo}/blobs/uploads/", self.host),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(start.status(), 202, "{:?}", start.text().await);
        let location = start.headers()["location"].to_str().unwrap().to_string();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("http://{}{location}", self.host)
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = self
            .request(
                reqwest::Method::PUT,
                &format!("{location}{sep}digest={digest}"),
            )
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 201, "{:?}", put.text().await);
        digest
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let put = self
            .request(
                reqwest::Method::PUT,
                &format!("http://{}/v2/{repo}/manifests/{reference}", self.host),
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 201, "{:?}", put.text().await);
        sha256(body)
    }

    /// Pushes `image` as `repo:tag` (an OCI manifest).
    pub async fn push(&self, repo: &str, tag: &str, image: &TestImage) -> Pushed {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for layer in &image.layers {
            let (blob, media_type) = layer.encoded();
            let digest = self.push_blob(repo, &blob).await;
            layers.push(json!({"mediaType": media_type, "digest": digest, "size": blob.len()}));
            diff_ids.push(sha256(&layer.tar));
        }
        let config = json!({
            "architecture": image.architecture, "os": "linux",
            "config": {"Env": image.env, "WorkingDir": "/", "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string();
        let config_digest = self.push_blob(repo, config.as_bytes()).await;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()},
            "layers": layers,
        })
        .to_string();
        let digest = self
            .push_manifest(
                repo,
                tag,
                "application/vnd.oci.image.manifest.v1+json",
                manifest.as_bytes(),
            )
            .await;
        Pushed {
            digest,
            size: manifest.len(),
        }
    }
}

/// A manifest in the registry.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub digest: String,
    pub size: usize,
}

#[derive(Clone, Copy)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One layer: an uncompressed tar built by the test, and how it is sent.
pub struct Layer {
    pub tar: Vec<u8>,
    pub compression: Compression,
}

impl Layer {
    fn encoded(&self) -> (Vec<u8>, &'static str) {
        match self.compression {
            Compression::None => (self.tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&self.tar).unwrap();
                (
                    e.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Compression::Zstd => (
                zstd::encode_all(&self.tar[..], 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        }
    }
}

pub struct TestImage {
    pub layers: Vec<Layer>,
    pub env: Vec<String>,
    /// `amd64`, `arm64`...
    pub architecture: &'static str,
}

/// Builds one layer's tar, entry by entry.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32, uid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn file(mut self, path: &str, content: &[u8], mode: u32, uid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid);
        h.set_size(content.len() as u64);
        self.tar.append_data(&mut h, path, content).unwrap();
        self
    }

    /// A file whose name the tar crate would refuse (`..`): the bytes go into the header as
    /// they are, as a hostile layer's would.
    pub fn raw_file(mut self, path: &str, content: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, 0);
        h.set_size(content.len() as u64);
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        self.tar.append(&h, content).unwrap();
        self
    }

    /// A hard link whose target the tar crate would refuse (`..`).
    pub fn raw_hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        h.set_path(path).unwrap();
        let link = &mut h.as_old_mut().linkname;
        link[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.tar.append(&h, std::io::empty()).unwrap();
        self
    }

    /// A directory with PAX records (e.g. xattrs as `SCHILY.xattr.<name>`).
    pub fn pax_dir(&mut self, path: &str, records: &[(&str, &[u8])]) {
        self.tar
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
    }

    /// A character device node.
    pub fn device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    /// A host file (e.g. the static busybox) copied in, owned by root.
    pub fn host_file(self, path: &str, host: &Path, mode: u32) -> Self {
        let content = std::fs::read(host).unwrap();
        self.file(path, &content, mode, 0)
    }

    pub fn build(self, compression: Compression) -> Layer {
        Layer {
            tar: self.tar.into_inner().unwrap(),
            compression,
        }
    }
}

/// A base layer with a static busybox as /bin/sh and its applets, /etc with an image
/// account (`app`, uid 1001), /usr/bin/passwd-like setuid file and files owned by uid 1000.
pub fn busybox_base() -> LayerBuilder {
    let busybox = PathBuf::from("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: apt-get install busybox-static (.ci/run does)"
    );
    let mut layer =
        LayerBuilder::new()
            .dir("bin", 0o755, 0)
            .host_file("bin/busybox", &busybox, 0o755);
    for applet in [
        "sh", "ls", "cat", "stat", "env", "id", "echo", "rm", "touch", "mkdir", "test", "pwd",
        "readlink", "sleep", "true", "wc", "grep",
    ] {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer
        .dir("etc", 0o755, 0)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001:app:/home/app:/bin/sh\n",
            0o644,
            0,
        )
        .file("etc/group", b"root:x:0:\napp:x:1001:\n", 0o644, 0)
        .dir("usr", 0o755, 0)
        .dir("usr/bin", 0o755, 0)
        .host_file("usr/bin/busybox-suid", &busybox, 0o4755)
        .dir("home", 0o755, 0)
        .dir("home/learner", 0o750, 1000)
        .file("home/learner/notes.txt", b"mine\n", 0o640, 1000)
}

/// A multi-platform index over manifests already pushed (`(architecture, digest, size)`),
/// pushed as `repo:tag`; returns its digest.
pub async fn push_index(
    registry: &Registry,
    repo: &str,
    tag: &str,
    entries: &[(&str, Pushed)],
) -> String {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(arch, pushed)| {
            json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": pushed.digest, "size": pushed.size,
                   "platform": {"architecture": arch, "os": "linux"}})
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    })
    .to_string();
    registry
        .push_manifest(
            repo,
            tag,
            "application/vnd.oci.image.index.v1+json",
            index.as_bytes(),
        )
        .await
}

/// A TCP proxy in front of a registry that forwards at most `bytes_per_second` towards the
/// client, so that a pull takes long enough to be interrupted.
pub struct SlowProxy {
    pub host: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowProxy {
    pub async fn start(target: &str, bytes_per_second: usize) -> SlowProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let target = target.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut up_read, mut up_write) = upstream.into_split();
                    let to_upstream = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
                    });
                    // 10 slices a second.
                    let slice = (bytes_per_second / 10).max(1);
                    let mut buf = vec![0u8; slice];
                    loop {
                        let n = match up_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    to_upstream.abort();
                });
            }
        });
        SlowProxy { host, task }
    }
}

/// `len` bytes that no compressor shrinks (xorshift).
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
