//! The content-addressed image store in the data dir.
//!
//! Layout under the store's root (`<data_dir>/images`):
//!
//! ```text
//! blobs/sha256/<hex>     verified blobs: manifests, configs, layer archives (kept so a lost
//!                        layer dir can be unpacked again without the network)
//! partial/<hex>          a blob download in progress; the next attempt (also after a
//!                        restart) continues it with a Range request
//! layers/<hex>/          an unpacked layer, <hex> being its blob's digest; it exists only
//!                        when complete (unpacked aside in tmp/, then renamed)
//! tmp/                   unpacks and blob writes in progress; emptied when the store opens
//! images/<escaped>.json  one record per ready image: manifest digest, config, layers
//! pending.json           names wanted but not ready yet, pulled again by resume_pending()
//! ```
//!
//! Every blob reaches `blobs/` only after its digest checked out, every layer reaches
//! `layers/` only after it unpacked completely and its diff_id matched the config: a crash
//! at any point leaves at worst files in `tmp/` and `partial/`. Work is single-flight: one
//! background task per image name, and one lock per layer digest so a layer shared by
//! two images is downloaded and unpacked once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::RegistryConfig;
use crate::manifest::{self, Descriptor, ImageConfig};
use crate::reference::parse_reference;
use crate::registry::{Endpoint, Registry};
use crate::unpack::{self, Compression, UnpackLimits};
use crate::ImageError;

/// First retry delay of a failed pull; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// No layer has more entries than this (a full JDK has ~30 000).
const MAX_LAYER_ENTRIES: u64 = 4_000_000;

/// A ready image: what a runner needs.
#[derive(Clone, Debug)]
pub struct Image {
    /// The normalised reference.
    pub name: String,
    /// The (platform) manifest's digest.
    pub digest: String,
    /// Compressed bytes of the layers.
    pub size: u64,
    /// The unpacked layer dirs, bottom first.
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
}

/// Where an image stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Pulling,
    Ready,
    Failed,
}

/// An image as operators see it (`GET /api/v1/images`).
#[derive(Clone, Debug, Serialize)]
pub struct ImageStatus {
    pub name: String,
    pub digest: Option<String>,
    pub size: u64,
    pub layers: usize,
    pub state: ImageState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LayerRecord {
    digest: String,
    media_type: String,
    size: u64,
}

/// `images/<escaped>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    digest: String,
    config_digest: String,
    layers: Vec<LayerRecord>,
    config: ImageConfig,
    /// `registry` or the offline source it was imported from.
    source: String,
}

impl Record {
    fn blobs(&self) -> impl Iterator<Item = &str> {
        [self.digest.as_str(), self.config_digest.as_str()]
            .into_iter()
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

struct Entry {
    state: ImageState,
    record: Option<Record>,
    bytes_done: u64,
    bytes_total: u64,
    layers: usize,
    digest: Option<String>,
    error: Option<ImageError>,
    /// Failed attempts so far; `pull()` waits for this to move.
    failures: u64,
    /// Set when a new task takes over (unique in the process, so a name removed and
    /// requested again never matches an old task); a task seeing another value stops.
    generation: u64,
    task: Option<tokio::task::AbortHandle>,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            state: ImageState::Pulling,
            record: None,
            bytes_done: 0,
            bytes_total: 0,
            layers: 0,
            digest: None,
            error: None,
            failures: 0,
            generation: next_generation(),
            task: None,
        }
    }
}

fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    /// Names wanted but not ready (persisted in pending.json).
    pending: BTreeSet<String>,
    /// Blob digests a running pull or import is writing or about to: GC keeps them.
    active: HashMap<String, usize>,
}

/// The image store; share it as `Arc<ImageStore>`.
pub struct ImageStore {
    root: PathBuf,
    registry: Registry,
    limits: UnpackLimits,
    inner: Mutex<Inner>,
    /// Bumped on every state change; waiters watch it.
    changed: tokio::sync::watch::Sender<u64>,
    /// One async lock per blob digest (download + unpack of that layer).
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    tmp_seq: AtomicU64,
}

/// Keeps blob digests marked active for GC while a pull or import runs (also when its
/// task is aborted: dropping the future drops this).
struct ActiveGuard<'a> {
    store: &'a ImageStore,
    digests: Vec<String>,
}

impl ActiveGuard<'_> {
    fn add(&mut self, digest: &str) {
        let mut inner = self.store.lock();
        *inner.active.entry(digest.to_string()).or_default() += 1;
        self.digests.push(digest.to_string());
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.store.lock();
        for d in &self.digests {
            if let Some(n) = inner.active.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    inner.active.remove(d);
                }
            }
        }
    }
}

/// A file name for an image name: everything but `[A-Za-z0-9._-]` percent-encoded.
fn escape_name(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex_of(digest: &str) -> Result<&str, ImageError> {
    manifest::check_digest(digest).map_err(ImageError::Refused)
}

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| ImageError::io(format!("write {}", path.display()), e))
}

impl ImageStore {
    /// Opens (creating) the store under `root`, cleaning what a crash left: `tmp/` is
    /// emptied, records whose layers are missing are dropped and their names marked
    /// pending. Pending pulls restart with [`ImageStore::resume_pending`] (or when
    /// requested). Needs no runtime; `request`/`pull` need a tokio runtime.
    pub fn open(root: PathBuf, config: RegistryConfig) -> Result<Arc<ImageStore>, ImageError> {
        let registry = Registry::new(&config)?;
        // Root only: layers hold strangers' setuid files and device nodes (runners see them
        // through nosuid,nodev mounts; host users must not reach them at all).
        std::fs::create_dir_all(&root)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| ImageError::io(format!("create {}", root.display()), e))?;
        for d in ["blobs/sha256", "partial", "layers", "images"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| ImageError::io(format!("create {}", p.display()), e))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| ImageError::io(format!("clean {}", tmp.display()), e))?;
        }
        std::fs::create_dir_all(&tmp)
            .map_err(|e| ImageError::io(format!("create {}", tmp.display()), e))?;
        let (changed, _) = tokio::sync::watch::channel(0);
        let store = ImageStore {
            root,
            registry,
            limits: UnpackLimits {
                max_bytes: config.max_layer_bytes,
                max_entries: MAX_LAYER_ENTRIES,
            },
            inner: Mutex::new(Inner::default()),
            changed,
            locks: Mutex::new(HashMap::new()),
            tmp_seq: AtomicU64::new(0),
        };
        store.load()?;
        Ok(Arc::new(store))
    }

    fn load(&self) -> Result<(), ImageError> {
        let mut inner = self.lock();
        let pending_path = self.root.join("pending.json");
        if let Ok(text) = std::fs::read_to_string(&pending_path) {
            match serde_json::from_str::<Vec<String>>(&text) {
                Ok(names) => inner.pending.extend(names),
                Err(e) => {
                    tracing::warn!(path = %pending_path.display(), error = %e, "ignoring a damaged pending-pulls record")
                }
            }
        }
        let dir = self.root.join("images");
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
        for de in rd.flatten() {
            let path = de.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                // A record write a crash interrupted.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let record: Record = match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None => {
                    tracing::warn!(path = %path.display(), "dropping an unreadable image record");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            let complete = record.layers.iter().all(|l| {
                hex_of(&l.digest).is_ok_and(|h| self.root.join("layers").join(h).is_dir())
            });
            if !complete {
                tracing::warn!(image = %record.name, "image has missing layers: it will be pulled again");
                let _ = std::fs::remove_file(&path);
                if record.source == "registry" {
                    inner.pending.insert(record.name.clone());
                }
                continue;
            }
            inner.pending.remove(&record.name);
            let mut e = Entry::new();
            e.state = ImageState::Ready;
            e.bytes_total = record.layers.iter().map(|l| l.size).sum();
            e.bytes_done = e.bytes_total;
            e.layers = record.layers.len();
            e.digest = Some(record.digest.clone());
            e.record = Some(record.clone());
            inner.entries.insert(record.name.clone(), e);
        }
        self.save_pending(&inner)?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the store down with it: the state stays usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn save_pending(&self, inner: &Inner) -> Result<(), ImageError> {
        let names: Vec<&String> = inner.pending.iter().collect();
        write_atomic(
            &self.root.join("pending.json"),
            &serde_json::to_vec_pretty(&names).expect("strings serialise"),
        )
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", escape_name(name)))
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    fn layer_path(&self, hex: &str) -> PathBuf {
        self.root.join("layers").join(hex)
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    fn digest_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = locks.get(digest).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(digest.to_string(), Arc::downgrade(&l));
        l
    }

    /// Names pulled when the process stopped (or whose layers went missing): pull them
    /// again. Call once after `open`, inside the runtime.
    pub fn resume_pending(self: &Arc<Self>) {
        let names: Vec<String> = self.lock().pending.iter().cloned().collect();
        for name in names {
            tracing::info!(image = %name, "resuming an interrupted pull");
            if let Err(e) = self.request(&name) {
                tracing::warn!(image = %name, error = %e, "cannot resume pull");
            }
        }
    }

    /// Starts a background pull unless the image is ready or already pulling (a failed
    /// image is retried at once). Failed pulls are retried with backoff (2 s doubling to
    /// 5 min) until the image is removed.
    pub fn request(self: &Arc<Self>, name: &str) -> Result<(), ImageError> {
        let key = parse_reference(name)?.whole();
        let mut inner = self.lock();
        let generation = match inner.entries.get_mut(&key) {
            Some(e) if matches!(e.state, ImageState::Ready | ImageState::Pulling) => return Ok(()),
            Some(e) => {
                // Failed: take over from the task sleeping before its retry.
                if let Some(t) = e.task.take() {
                    t.abort();
                }
                e.generation = next_generation();
                e.state = ImageState::Pulling;
                e.generation
            }
            None => {
                let e = Entry::new();
                let generation = e.generation;
                inner.entries.insert(key.clone(), e);
                generation
            }
        };
        if inner.pending.insert(key.clone()) {
            self.save_pending(&inner)?;
        }
        let store = Arc::clone(self);
        let task_key = key.clone();
        let handle = tokio::spawn(async move { store.pull_loop(task_key, generation).await });
        if let Some(e) = inner.entries.get_mut(&key) {
            e.task = Some(handle.abort_handle());
        }
        drop(inner);
        self.notify();
        Ok(())
    }

    /// Pulls and waits for the outcome of this attempt (single-flight with `request`).
    pub async fn pull(self: &Arc<Self>, name: &str) -> Result<Image, ImageError> {
        let key = parse_reference(name)?.whole();
        let mut rx = self.changed.subscribe();
        // A failure counted before this call is not this call's answer.
        let before = self.lock().entries.get(&key).map(|e| e.failures);
        self.request(&key)?;
        let before = before.unwrap_or(0);
        loop {
            {
                let inner = self.lock();
                match inner.entries.get(&key) {
                    None => {
                        return Err(ImageError::NotFound(format!(
                            "image {key} was removed during its pull"
                        )))
                    }
                    Some(e) if e.state == ImageState::Ready => {
                        return Ok(self.image_of(e.record.as_ref().expect("ready has a record")))
                    }
                    Some(e) if e.failures > before => {
                        return Err(e.error.clone().expect("a failure has an error"))
                    }
                    Some(_) => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(ImageError::Io("image store closed".into()));
            }
        }
    }

    /// Waits until the image is ready; answers at once with the error if its pull failed
    /// (retries go on in the background), and with [`ImageError::Pending`] after `timeout`.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<Image, ImageError> {
        let key = parse_reference(name)?.whole();
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let inner = self.lock();
                match inner.entries.get(&key) {
                    None => {
                        return Err(ImageError::NotFound(format!(
                            "image {key} is not in the store (pull it first)"
                        )))
                    }
                    Some(e) => match e.state {
                        ImageState::Ready => {
                            return Ok(self.image_of(e.record.as_ref().expect("ready has a record")))
                        }
                        ImageState::Failed => {
                            return Err(e.error.clone().expect("a failure has an error"))
                        }
                        ImageState::Pulling => {}
                    },
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ImageError::Io("image store closed".into())),
                Err(_) => {
                    let (done, total) = self
                        .lock()
                        .entries
                        .get(&key)
                        .map(|e| (e.bytes_done, e.bytes_total))
                        .unwrap_or_default();
                    return Err(ImageError::Pending(format!(
                        "image {key} is still being pulled after {timeout:?} ({done} of {total} bytes)"
                    )));
                }
            }
        }
    }

    pub fn status(&self, name: &str) -> Option<ImageStatus> {
        let key = parse_reference(name).ok()?.whole();
        let inner = self.lock();
        inner.entries.get(&key).map(|e| status_of(&key, e))
    }

    pub fn ready(&self, name: &str) -> Option<Image> {
        let key = parse_reference(name).ok()?.whole();
        let inner = self.lock();
        let e = inner.entries.get(&key)?;
        match (&e.state, &e.record) {
            (ImageState::Ready, Some(r)) => Some(self.image_of(r)),
            _ => None,
        }
    }

    pub fn list(&self) -> Vec<ImageStatus> {
        let inner = self.lock();
        inner.entries.iter().map(|(k, e)| status_of(k, e)).collect()
    }

    /// Forgets the image (stopping its pull and retries) and garbage-collects blobs and
    /// layer dirs no remaining image uses. Checking that no environment uses the image is
    /// the caller's business.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let key = parse_reference(name)?.whole();
        {
            let mut inner = self.lock();
            let Some(entry) = inner.entries.remove(&key) else {
                if inner.pending.remove(&key) {
                    self.save_pending(&inner)?;
                    return Ok(());
                }
                return Err(ImageError::NotFound(format!(
                    "image {key} is not in the store"
                )));
            };
            if let Some(t) = entry.task {
                t.abort();
            }
            let path = self.record_path(&key);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io(format!("remove {}", path.display()), e)),
            }
            if inner.pending.remove(&key) {
                self.save_pending(&inner)?;
            }
        }
        tracing::info!(image = %key, "image removed");
        self.notify();
        self.gc()
    }

    /// Deletes every blob, partial download and layer dir that no record and no running
    /// pull refers to.
    fn gc(&self) -> Result<(), ImageError> {
        let mut doomed_dirs = Vec::new();
        {
            let inner = self.lock();
            let mut keep: BTreeSet<String> = inner.active.keys().cloned().collect();
            for e in inner.entries.values() {
                if let Some(r) = &e.record {
                    keep.extend(r.blobs().map(str::to_string));
                }
            }
            let keep_hex: BTreeSet<&str> = keep
                .iter()
                .filter_map(|d| d.strip_prefix("sha256:"))
                .collect();
            for sub in ["blobs/sha256", "partial"] {
                for de in read_dir_names(&self.root.join(sub))? {
                    if !keep_hex.contains(de.as_str()) {
                        let p = self.root.join(sub).join(&de);
                        if let Err(e) = std::fs::remove_file(&p) {
                            tracing::warn!(path = %p.display(), error = %e, "gc: cannot remove blob");
                        }
                    }
                }
            }
            for de in read_dir_names(&self.root.join("layers"))? {
                if !keep_hex.contains(de.as_str()) {
                    // Renamed away under the lock (fast), deleted after it (slow).
                    let to = self.tmp_path("gc");
                    match std::fs::rename(self.root.join("layers").join(&de), &to) {
                        Ok(()) => doomed_dirs.push(to),
                        Err(e) => tracing::warn!(layer = %de, error = %e, "gc: cannot move layer"),
                    }
                }
            }
        }
        for d in doomed_dirs {
            if let Err(e) = std::fs::remove_dir_all(&d) {
                tracing::warn!(path = %d.display(), error = %e, "gc: cannot delete layer");
            }
        }
        Ok(())
    }

    fn image_of(&self, r: &Record) -> Image {
        Image {
            name: r.name.clone(),
            digest: r.digest.clone(),
            size: r.layers.iter().map(|l| l.size).sum(),
            layers: r
                .layers
                .iter()
                .map(|l| self.layer_path(l.digest.trim_start_matches("sha256:")))
                .collect(),
            config: r.config.clone(),
        }
    }

    /// The background task of one image: attempts until success, with backoff between
    /// failures, as long as it is still the image's current task.
    async fn pull_loop(self: Arc<Self>, key: String, generation: u64) {
        let mut delay = RETRY_FIRST;
        loop {
            tracing::info!(image = %key, "pulling image");
            let result = self.pull_once(&key, generation).await;
            {
                let mut inner = self.lock();
                let Some(e) = inner
                    .entries
                    .get_mut(&key)
                    .filter(|e| e.generation == generation)
                else {
                    return;
                };
                match result {
                    Ok(record) => {
                        // Written under the lock so a concurrent remove() cannot interleave.
                        let saved = serde_json::to_vec_pretty(&record)
                            .map_err(|e| ImageError::Io(e.to_string()))
                            .and_then(|b| write_atomic(&self.record_path(&key), &b));
                        match saved {
                            Ok(()) => {
                                tracing::info!(image = %key, digest = %record.digest, layers = record.layers.len(), "image ready");
                                e.state = ImageState::Ready;
                                e.error = None;
                                e.task = None;
                                e.bytes_done = e.bytes_total;
                                e.record = Some(record);
                                inner.pending.remove(&key);
                                if let Err(err) = self.save_pending(&inner) {
                                    tracing::warn!(error = %err, "cannot save pending pulls");
                                }
                                drop(inner);
                                self.notify();
                                return;
                            }
                            Err(err) => {
                                e.state = ImageState::Failed;
                                e.failures += 1;
                                e.error = Some(err);
                            }
                        }
                    }
                    Err(err) => {
                        e.state = ImageState::Failed;
                        e.failures += 1;
                        e.error = Some(err);
                    }
                }
                tracing::warn!(image = %key, error = %e.error.as_ref().expect("set above"), retry_in = ?delay, "image pull failed");
            }
            self.notify();
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
            let mut inner = self.lock();
            match inner.entries.get_mut(&key) {
                Some(e) if e.generation == generation && e.state == ImageState::Failed => {
                    e.state = ImageState::Pulling;
                }
                _ => return,
            }
            drop(inner);
            self.notify();
        }
    }

    fn update(&self, key: &str, generation: u64, f: impl FnOnce(&mut Entry)) {
        let mut inner = self.lock();
        if let Some(e) = inner
            .entries
            .get_mut(key)
            .filter(|e| e.generation == generation)
        {
            f(e);
        }
    }

    async fn pull_once(&self, key: &str, generation: u64) -> Result<Record, ImageError> {
        let reference = parse_reference(key)?;
        let resolved = self.registry.resolve(&reference).await?;
        let (config, diff_ids) = manifest::parse_config(&resolved.config_bytes, key)?;
        check_diff_ids(key, &resolved.layers, &diff_ids)?;
        let mut active = ActiveGuard {
            store: self,
            digests: Vec::new(),
        };
        for d in std::iter::once(&resolved.digest)
            .chain(std::iter::once(&resolved.config.digest))
            .chain(resolved.layers.iter().map(|l| &l.digest))
        {
            active.add(d);
        }
        let total: u64 = resolved.layers.iter().map(|l| l.size).sum();
        self.update(key, generation, |e| {
            e.bytes_total = total;
            e.bytes_done = 0;
            e.layers = resolved.layers.len();
            e.digest = Some(resolved.digest.clone());
        });
        self.notify();
        tracing::info!(image = %key, digest = %resolved.digest, registry = %resolved.endpoint.host, layers = resolved.layers.len(), bytes = total, "resolved image");
        self.put_blob_bytes(&resolved.manifest, &resolved.digest)?;
        self.put_blob_bytes(&resolved.config_bytes, &resolved.config.digest)?;
        // Progress goes to the log at every quarter of the download.
        let logged_quarter = std::sync::atomic::AtomicU64::new(0);
        for (i, layer) in resolved.layers.iter().enumerate() {
            let mut progress = |n: u64| {
                let mut done = 0;
                self.update(key, generation, |e| {
                    e.bytes_done += n;
                    done = e.bytes_done;
                });
                let quarter = (done * 4).checked_div(total).unwrap_or(4);
                if quarter > logged_quarter.swap(quarter, Ordering::Relaxed) {
                    tracing::info!(image = %key, bytes_done = done, bytes_total = total, "pull progress");
                }
            };
            self.ensure_layer(
                layer,
                &diff_ids[i],
                Some((&resolved.endpoint, key)),
                &mut progress,
            )
            .await?;
            tracing::info!(image = %key, layer = i + 1, of = resolved.layers.len(), digest = %layer.digest, bytes = layer.size, "layer ready");
        }
        Ok(Record {
            name: key.to_string(),
            digest: resolved.digest.clone(),
            config_digest: resolved.config.digest.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| LayerRecord {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                })
                .collect(),
            config,
            source: "registry".into(),
        })
    }

    /// Makes `layers/<hex>` exist: downloads the blob if needed (when `fetch` says from
    /// where), unpacks it aside and renames it in. One at a time per digest.
    async fn ensure_layer(
        &self,
        layer: &Descriptor,
        diff_id: &str,
        fetch: Option<(&Endpoint, &str)>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), ImageError> {
        let hex = hex_of(&layer.digest)?.to_string();
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            ImageError::Refused(format!(
                "layer {} has media type {:?}, which is not a layer trident can unpack",
                layer.digest, layer.media_type
            ))
        })?;
        let lock = self.digest_lock(&layer.digest);
        let _held = lock.lock().await;
        let dest = self.layer_path(&hex);
        if dest.is_dir() {
            progress(layer.size);
            return Ok(());
        }
        let blob = self.blob_path(&hex);
        if blob.is_file() {
            progress(layer.size);
        } else {
            let Some((endpoint, image)) = fetch else {
                return Err(ImageError::NotFound(format!(
                    "blob {} is missing from the store",
                    layer.digest
                )));
            };
            let partial = self.root.join("partial").join(&hex);
            self.registry
                .fetch_blob(endpoint, image, layer, &partial, progress)
                .await?;
            std::fs::rename(&partial, &blob)
                .map_err(|e| ImageError::io(format!("store blob {}", layer.digest), e))?;
        }
        let tmp = self.tmp_path(&format!("layer-{hex}"));
        let limits = self.limits.clone();
        let digest = layer.digest.clone();
        let diff_id = diff_id.to_string();
        let max = limits.max_bytes;
        let report = tokio::task::spawn_blocking(move || {
            let result = unpack_aside(&blob, compression, &tmp, &dest, &limits, &diff_id, &digest);
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            result
        })
        .await
        .map_err(|e| ImageError::Io(format!("unpack task of layer {}: {e}", layer.digest)))?;
        report.map_err(|e| match e {
            ImageError::Quota(m) => ImageError::Quota(format!("{m} (max_layer_bytes = {max})")),
            e => e,
        })
    }

    /// Stores `bytes` as the blob `digest` (checked) unless it is there already.
    fn put_blob_bytes(&self, bytes: &[u8], digest: &str) -> Result<(), ImageError> {
        let hex = hex_of(digest)?;
        let got = format!("sha256:{:x}", Sha256::digest(bytes));
        if got != digest {
            return Err(ImageError::Refused(format!(
                "blob {digest} does not match its digest (got {got})"
            )));
        }
        let path = self.blob_path(hex);
        if path.is_file() {
            return Ok(());
        }
        let tmp = self.tmp_path("blob");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ImageError::io(format!("store blob {digest}"), e)
        })
    }

    /// Copies a blob from `reader` into the store, hashing on the way; `expected` (if
    /// given) must match. Marks it active in `active` before it appears. Blocking.
    fn put_blob_reader(
        &self,
        mut reader: impl std::io::Read,
        expected: Option<&str>,
        what: &str,
        active: &mut ActiveGuard<'_>,
    ) -> Result<(String, u64), ImageError> {
        let tmp = self.tmp_path("import");
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)
                .map_err(|e| ImageError::io(format!("create {}", tmp.display()), e))?;
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                let k = reader
                    .read(&mut buf)
                    .map_err(|e| ImageError::io(format!("read {what}"), e))?;
                if k == 0 {
                    break;
                }
                hash.update(&buf[..k]);
                f.write_all(&buf[..k])
                    .map_err(|e| ImageError::io(format!("write {}", tmp.display()), e))?;
                n += k as u64;
            }
            f.sync_all()
                .map_err(|e| ImageError::io(format!("sync {}", tmp.display()), e))?;
            let digest = format!("sha256:{:x}", hash.finalize());
            if let Some(want) = expected {
                if want != digest {
                    return Err(ImageError::Refused(format!(
                        "{what} does not match its digest {want} (got {digest}): refused"
                    )));
                }
            }
            active.add(&digest);
            let hex = digest.trim_start_matches("sha256:");
            std::fs::rename(&tmp, self.blob_path(hex))
                .map_err(|e| ImageError::io(format!("store blob {digest}"), e))?;
            Ok((digest, n))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Loads an offline source into the store under `name`: `docker-archive:/x.tar[:ref]`,
    /// `oci-archive:/x.tar[:ref]` or `oci:/layout-dir[:ref]` (`ref` being a tag of
    /// `org.opencontainers.image.ref.name`; without it the layout's only image, or the
    /// host platform's entry of a multi-platform one).
    pub async fn import(self: &Arc<Self>, name: &str, source: &str) -> Result<Image, ImageError> {
        let key = parse_reference(name)?.whole();
        let parsed = crate::archive::Source::parse(source)?;
        tracing::info!(image = %key, source, "importing image");
        let store = Arc::clone(self);
        let key2 = key.clone();
        let source2 = source.to_string();
        let record = tokio::task::spawn_blocking(move || {
            let mut active = ActiveGuard {
                store: &store,
                digests: Vec::new(),
            };
            let staged = crate::archive::stage(&parsed, &mut |r, want, what| {
                store.put_blob_reader(r, want, what, &mut active)
            })?;
            let (config, diff_ids) = manifest::parse_config(&staged.config_bytes, &key2)?;
            check_diff_ids(&key2, &staged.layers, &diff_ids)?;
            let handle = tokio::runtime::Handle::current();
            for (i, layer) in staged.layers.iter().enumerate() {
                handle.block_on(store.ensure_layer(layer, &diff_ids[i], None, &mut |_| {}))?;
            }
            drop(active);
            Ok::<_, ImageError>(Record {
                name: key2.clone(),
                digest: staged.digest,
                config_digest: staged.config.digest,
                layers: staged
                    .layers
                    .iter()
                    .map(|l| LayerRecord {
                        digest: l.digest.clone(),
                        media_type: l.media_type.clone(),
                        size: l.size,
                    })
                    .collect(),
                config,
                source: source2,
            })
        })
        .await
        .map_err(|e| ImageError::Io(format!("import task: {e}")))?;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(image = %key, source, error = %e, "import failed");
                // Staged blobs nobody refers to go away.
                let _ = self.gc();
                return Err(e);
            }
        };
        {
            let mut inner = self.lock();
            write_atomic(
                &self.record_path(&key),
                &serde_json::to_vec_pretty(&record).map_err(|e| ImageError::Io(e.to_string()))?,
            )?;
            let e = inner.entries.entry(key.clone()).or_insert_with(Entry::new);
            if let Some(t) = e.task.take() {
                t.abort();
            }
            e.generation = next_generation();
            e.state = ImageState::Ready;
            e.error = None;
            e.bytes_total = record.layers.iter().map(|l| l.size).sum();
            e.bytes_done = e.bytes_total;
            e.layers = record.layers.len();
            e.digest = Some(record.digest.clone());
            e.record = Some(record.clone());
            if inner.pending.remove(&key) {
                self.save_pending(&inner)?;
            }
        }
        self.notify();
        // An archive may hold more than this image (other platforms, other tags).
        self.gc()?;
        tracing::info!(image = %key, digest = %record.digest, "image imported");
        Ok(self.image_of(&record))
    }
}

fn status_of(name: &str, e: &Entry) -> ImageStatus {
    ImageStatus {
        name: name.to_string(),
        digest: e.digest.clone(),
        size: e.bytes_total,
        layers: e.layers,
        state: e.state,
        bytes_done: e.bytes_done,
        bytes_total: e.bytes_total,
        error: if e.state == ImageState::Failed {
            e.error.as_ref().map(|e| e.to_string())
        } else {
            None
        },
    }
}

fn check_diff_ids(
    image: &str,
    layers: &[Descriptor],
    diff_ids: &[String],
) -> Result<(), ImageError> {
    if layers.len() != diff_ids.len() {
        return Err(ImageError::Refused(format!(
            "{image}: the manifest has {} layers but the config lists {} diff_ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    Ok(())
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, ImageError> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
    Ok(rd
        .flatten()
        .filter_map(|de| de.file_name().into_string().ok())
        .collect())
}

/// Unpacks `blob` into the new dir `tmp`, checks its diff_id, renames it to `dest`.
fn unpack_aside(
    blob: &Path,
    compression: Compression,
    tmp: &Path,
    dest: &Path,
    limits: &UnpackLimits,
    diff_id: &str,
    digest: &str,
) -> Result<(), ImageError> {
    use std::os::unix::fs::DirBuilderExt;
    // 0755 unless the layer's own `./` entry says otherwise.
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(tmp)
        .map_err(|e| ImageError::io(format!("create {}", tmp.display()), e))?;
    let file =
        std::fs::File::open(blob).map_err(|e| ImageError::io(format!("open blob {digest}"), e))?;
    let report = unpack::unpack_layer(std::io::BufReader::new(file), compression, tmp, limits)
        .map_err(|e| unpack_error(digest, e))?;
    if report.diff_id != diff_id {
        return Err(ImageError::Refused(format!(
            "layer {digest} unpacks to {} but the image config says {diff_id}: refused",
            report.diff_id
        )));
    }
    match std::fs::rename(tmp, dest) {
        Ok(()) => Ok(()),
        // Someone else finished the same layer meanwhile (an aborted task's unpack).
        Err(_) if dest.is_dir() => {
            let _ = std::fs::remove_dir_all(tmp);
            Ok(())
        }
        Err(e) => Err(ImageError::io(
            format!("rename layer {digest} into place"),
            e,
        )),
    }
}

fn unpack_error(digest: &str, e: unpack::UnpackError) -> ImageError {
    use unpack::UnpackError as U;
    let text = crate::registry::error_chain(&e);
    match e {
        U::TooLarge { .. } | U::TooManyEntries { .. } => {
            ImageError::Quota(format!("layer {digest}: {text}"))
        }
        U::Io { .. } | U::Dest { .. } => ImageError::Io(format!("layer {digest}: {text}")),
        U::Refused { .. } | U::Read { .. } | U::MetadataTooLarge { .. } | U::TrailingData => {
            ImageError::Refused(format!("layer {digest} refused: {text}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_are_file_names() {
        let e = escape_name("127.0.0.1:5000/team/img@sha256:ab");
        assert_eq!(e, "127.0.0.1%3A5000%2Fteam%2Fimg%40sha256%3Aab");
        assert!(!e.contains('/'));
    }
}
