//! Real parts for the image tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on a free loopback port, images the tests build themselves (tar layers
//! written here, gzip/zstd/plain) pushed through the registry API with oci-client, and a
//! small HTTP proxy in front of a registry that can demand Bearer tokens (serving its own
//! token endpoint), tamper with a blob, cut a download short, and count requests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `docker-registry serve`, killed on drop.
pub struct TestRegistry {
    pub host: String,
    pub auth: Option<(String, String)>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestRegistry {
    pub fn anonymous() -> TestRegistry {
        Self::start(None)
    }

    /// With htpasswd (bcrypt) auth for `user` / `pass`.
    pub fn htpasswd(user: &str, pass: &str) -> TestRegistry {
        Self::start(Some((user.to_string(), pass.to_string())))
    }

    fn start(auth: Option<(String, String)>) -> TestRegistry {
        let bin = which("docker-registry").unwrap_or_else(|| {
            panic!(
                "these tests need Debian's docker-registry (apt-get install docker-registry \
                 apache2-utils skopeo); .ci/run installs them"
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut auth_section = String::new();
        if let Some((u, p)) = &auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd (apache2-utils) is needed for the auth tests");
            assert!(out.status.success(), "htpasswd failed");
            let hp = dir.path().join("htpasswd");
            std::fs::write(&hp, &out.stdout).unwrap();
            auth_section = format!(
                "auth:\n  htpasswd:\n    realm: trident-test\n    path: {}\n",
                hp.display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_section}",
            dir.path().join("data").display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {host}: {}",
                std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        TestRegistry {
            host,
            auth,
            child,
            _dir: dir,
        }
    }

    fn client_auth(&self) -> (Client, RegistryAuth) {
        // oci-client is built without a TLS provider; the store installs ring the same way.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let auth = match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    /// Pushes blobs and a manifest (raw, with its media type) as `repo:tag` (or
    /// `repo@digest` when `tag` starts with `sha256:`). Returns the manifest digest.
    pub async fn push(
        &self,
        repo_tag: &str,
        blobs: &[&[u8]],
        manifest: &[u8],
        media_type: &str,
    ) -> String {
        let (client, auth) = self.client_auth();
        let r: Reference = format!("{}/{repo_tag}", self.host).parse().unwrap();
        client
            .store_auth_if_needed(r.resolve_registry(), &auth)
            .await;
        for b in blobs {
            let d = sha(b);
            if !client.blob_exists(&r, &d).await.unwrap_or(false) {
                client
                    .push_blob(&r, b.to_vec(), &d)
                    .await
                    .expect("push blob");
            }
        }
        client
            .push_manifest_raw(&r, manifest.to_vec(), media_type.parse().unwrap())
            .await
            .expect("push manifest");
        sha(manifest)
    }

    /// Pushes a whole image; returns its manifest digest and length.
    pub async fn push_image(&self, repo_tag: &str, image: &TestImage) -> (String, usize) {
        let mut blobs: Vec<&[u8]> = image.layers.iter().map(|l| &l.blob[..]).collect();
        blobs.push(&image.config);
        let m = image.manifest();
        let d = self.push(repo_tag, &blobs, &m, &image.manifest_type).await;
        (d, m.len())
    }
}

pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

#[derive(Clone, Copy, Debug)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

#[derive(Clone)]
pub struct TestLayer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub diff_id: String,
}

/// A layer of regular files (path, content); directories are made as needed.
pub fn layer(files: &[(&str, &[u8])], comp: Comp) -> TestLayer {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, data) in files {
        let mut p = Path::new(path).parent();
        let mut parents = Vec::new();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            parents.push(d.to_path_buf());
            p = d.parent();
        }
        for d in parents.into_iter().rev() {
            if dirs.insert(d.clone()) {
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_mtime(1_700_000_000);
                h.set_uid(0);
                h.set_gid(0);
                b.append_data(&mut h, format!("{}/", d.display()), &[][..])
                    .unwrap();
            }
        }
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let diff_id = sha(&tar);
    let (blob, media_type) = match comp {
        Comp::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            (
                e.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Comp::Zstd => (
            zstd::encode_all(&tar[..], 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    };
    TestLayer {
        blob,
        media_type: media_type.to_string(),
        diff_id,
    }
}

#[derive(Clone)]
pub struct TestImage {
    pub layers: Vec<TestLayer>,
    pub config: Vec<u8>,
    pub manifest_type: String,
    pub config_type: String,
}

impl TestImage {
    pub fn new(layers: Vec<TestLayer>, env: &[&str], arch: &str) -> TestImage {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": env, "WorkingDir": "/srv", "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        }))
        .unwrap();
        TestImage {
            layers,
            config,
            manifest_type: OCI_MANIFEST.into(),
            config_type: OCI_CONFIG.into(),
        }
    }

    /// The same image as a Docker v2 schema 2 manifest.
    pub fn docker(mut self) -> TestImage {
        self.manifest_type = DOCKER_MANIFEST.into();
        self.config_type = DOCKER_CONFIG.into();
        for l in &mut self.layers {
            if l.media_type.ends_with("+gzip") {
                l.media_type = "application/vnd.docker.image.rootfs.diff.tar.gzip".into();
            }
        }
        self
    }

    pub fn manifest(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": self.manifest_type,
            "config": {"mediaType": self.config_type, "digest": sha(&self.config), "size": self.config.len()},
            "layers": self.layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": sha(&l.blob), "size": l.blob.len()
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }
}

/// An index of (manifest digest, size, architecture, variant).
pub fn index(entries: &[(String, usize, &str, Option<&str>)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries.iter().map(|(d, n, arch, variant)| {
            let mut p = serde_json::json!({"architecture": arch, "os": "linux"});
            if let Some(v) = variant { p["variant"] = serde_json::json!(v); }
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": n, "platform": p})
        }).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// The architecture name of this host as OCI spells it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// What the proxy does besides forwarding.
#[derive(Default)]
pub struct ProxyState {
    /// Demand `Authorization: Bearer tok123` (and serve `/token`).
    pub bearer: bool,
    /// Flip the last byte of this blob's body.
    pub tamper: Option<String>,
    /// Forward only this many body bytes of this blob, once, then close.
    pub cut: Option<(String, usize)>,
    /// Requests seen: "GET /v2/…" -> count; "token" counts token requests.
    pub counts: HashMap<String, usize>,
    /// Request heads seen (lower-cased), for checking `range:`.
    pub heads: Vec<String>,
}

pub struct Proxy {
    pub host: String,
    pub state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Blob GETs of `digest` seen so far.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let st = self.state.lock().unwrap();
        st.counts
            .iter()
            .filter(|(k, _)| k.starts_with("GET ") && k.contains("/blobs/") && k.contains(digest))
            .map(|(_, n)| *n)
            .sum()
    }

    pub fn count(&self, key: &str) -> usize {
        *self.state.lock().unwrap().counts.get(key).unwrap_or(&0)
    }
}

/// Starts a proxy in front of `upstream` (host:port), one request per connection.
pub async fn proxy(upstream: &str, state: ProxyState) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let state = Arc::new(Mutex::new(state));
    let st = state.clone();
    let upstream = upstream.to_string();
    let me = host.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            let upstream = upstream.clone();
            let me = me.clone();
            tokio::spawn(async move {
                let _ = serve_one(conn, &upstream, &me, st).await;
            });
        }
    });
    Proxy { host, state, task }
}

async fn serve_one(
    mut conn: tokio::net::TcpStream,
    upstream: &str,
    me: &str,
    st: Arc<Mutex<ProxyState>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let request_line = text.lines().next().unwrap_or("").to_string();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let auth = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let (bearer, tamper, cut) = {
        let mut s = st.lock().unwrap();
        s.heads.push(text.to_ascii_lowercase());
        if path.starts_with("/token") {
            *s.counts.entry("token".into()).or_default() += 1;
        } else {
            let key = format!("{method} {}", path.split('?').next().unwrap_or(""));
            *s.counts.entry(key).or_default() += 1;
        }
        let cut = match &s.cut {
            Some((d, n)) if path.contains(d.as_str()) && method == "GET" => {
                let n = *n;
                s.cut = None;
                Some(n)
            }
            _ => None,
        };
        (
            s.bearer,
            s.tamper
                .clone()
                .filter(|d| path.contains(d.as_str()) && method == "GET"),
            cut,
        )
    };
    if path.starts_with("/token") {
        let body = br#"{"token":"tok123","expires_in":300}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(resp.as_bytes()).await?;
        conn.write_all(body).await?;
        return conn.shutdown().await;
    }
    if bearer && auth != "Bearer tok123" {
        let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
        let resp = format!(
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             WWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"test-registry\"\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(resp.as_bytes()).await?;
        conn.write_all(body).await?;
        return conn.shutdown().await;
    }
    // Forward the head (minus auth and keep-alive) and read the whole answer.
    let mut fwd = String::new();
    for (i, line) in text.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if i > 0 && (lower.starts_with("authorization:") || lower.starts_with("connection:")) {
            continue;
        }
        fwd.push_str(line);
        fwd.push_str("\r\n");
    }
    fwd.push_str("Connection: close\r\n\r\n");
    let mut up = tokio::net::TcpStream::connect(upstream).await?;
    up.write_all(fwd.as_bytes()).await?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).await?;
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(resp.len());
    if tamper.is_some() && resp.starts_with(b"HTTP/1.1 200") && resp.len() > body_at {
        let last = resp.len() - 1;
        resp[last] ^= 0xff;
    }
    if let Some(n) = cut {
        resp.truncate((body_at + n).min(resp.len()));
    }
    conn.write_all(&resp).await?;
    conn.shutdown().await
}

/// Reads a file of an unpacked image: the topmost layer that has it.
pub fn read_in(layers: &[PathBuf], path: &str) -> Option<Vec<u8>> {
    layers
        .iter()
        .rev()
        .find_map(|l| std::fs::read(l.join(path)).ok())
}

pub fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A store config reaching `hosts` over plain HTTP.
pub fn insecure(hosts: &[&str]) -> trident_images::RegistryConfig {
    trident_images::RegistryConfig {
        insecure_registries: hosts.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Incompressible bytes (a simple xorshift; no rand crate needed).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
