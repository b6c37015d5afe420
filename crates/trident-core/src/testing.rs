//! Test doubles for the core's unit tests: an in-memory store and a backend whose runners
//! are plain records, so that the Manager's rules (pool sizing, generations, backoff, claims)
//! can be checked in milliseconds, without root. The real-binary suite in `crates/trident`
//! stays the acceptance test.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{
    Backend, BackendError, BackendExecution, BackendResult, ExecSpec, FileDownload, RunnerSpec,
    Sandbox,
};
use crate::model::{EnvironmentId, ExecutionEnvironment, FileCopy, FileHeader};
use crate::store::{RunnerRecord, Store, StoreResult};

/// Keeps everything in maps; never fails.
#[derive(Default)]
pub struct MemoryStore {
    pub environments: Mutex<BTreeMap<EnvironmentId, ExecutionEnvironment>>,
    pub runners: Mutex<BTreeMap<String, RunnerRecord>>,
}

impl Store for MemoryStore {
    fn load_environments(&self) -> StoreResult<Vec<ExecutionEnvironment>> {
        Ok(self
            .environments
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect())
    }
    fn save_environment(&self, env: &ExecutionEnvironment) -> StoreResult<()> {
        self.environments
            .lock()
            .unwrap()
            .insert(env.id, env.clone());
        Ok(())
    }
    fn delete_environment(&self, id: EnvironmentId) -> StoreResult<()> {
        self.environments.lock().unwrap().remove(&id);
        Ok(())
    }
    fn load_runners(&self) -> StoreResult<Vec<RunnerRecord>> {
        Ok(self.runners.lock().unwrap().values().cloned().collect())
    }
    fn save_runner(&self, runner: &RunnerRecord) -> StoreResult<()> {
        self.runners
            .lock()
            .unwrap()
            .insert(runner.id.clone(), runner.clone());
        Ok(())
    }
    fn delete_runner(&self, id: &str) -> StoreResult<()> {
        self.runners.lock().unwrap().remove(id);
        Ok(())
    }
}

/// A backend whose runners are entries in a set; creation takes a (seeded) random moment,
/// so that creations, claims and deletions interleave as they do on a real host.
#[derive(Default)]
pub struct RecordingBackend {
    /// Runners that exist (created and not yet destroyed).
    pub live: Arc<Mutex<HashSet<String>>>,
    pub created: AtomicU64,
    pub destroyed: Arc<AtomicU64>,
    /// Creation delays in microseconds are drawn from this state.
    seed: AtomicU64,
    /// While set, every creation fails (an engine that cannot make runners).
    pub fail_creations: std::sync::atomic::AtomicBool,
    /// Creations attempted (successful or not).
    pub attempts: AtomicU64,
    /// When not empty, environments with another image are refused as the native backend
    /// refuses an image it does not know.
    pub known_images: Vec<String>,
    /// File changes (`patch_files` calls) that reached a runner.
    pub patches: Arc<AtomicU64>,
    /// What `readiness` answers for every environment (`None`: ready), as an engine
    /// pulling an image would.
    pub readiness: Mutex<Option<crate::backend::Readiness>>,
    /// `prepare` calls.
    pub prepared: AtomicU64,
}

impl RecordingBackend {
    pub fn with_seed(seed: u64) -> RecordingBackend {
        RecordingBackend {
            seed: AtomicU64::new(seed | 1),
            ..RecordingBackend::default()
        }
    }

    /// Refuses environments whose image is not one of `images`.
    pub fn with_images(mut self, images: &[&str]) -> RecordingBackend {
        self.known_images = images.iter().map(|i| i.to_string()).collect();
        self
    }

    fn delay(&self) -> Duration {
        let mut x = self.seed.load(Ordering::Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        Duration::from_micros(x % 3000)
    }
}

#[async_trait]
impl Backend for RecordingBackend {
    fn validate(&self, environment: &ExecutionEnvironment) -> Result<(), String> {
        if self.known_images.is_empty() || self.known_images.contains(&environment.image) {
            return Ok(());
        }
        Err(format!(
            "unknown image {:?}: known are {:?} (images: in the config)",
            environment.image, self.known_images
        ))
    }

    fn prepare(&self, _environment: &ExecutionEnvironment) {
        self.prepared.fetch_add(1, Ordering::Relaxed);
    }

    fn readiness(&self, _environment: &ExecutionEnvironment) -> crate::backend::Readiness {
        self.readiness
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(crate::backend::Readiness::Ready)
    }

    async fn create_runner(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>> {
        assert_eq!(
            self.readiness(&spec.environment),
            crate::backend::Readiness::Ready,
            "a runner was made before the engine was ready"
        );
        tokio::time::sleep(self.delay()).await;
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if self.fail_creations.load(Ordering::Relaxed) {
            return Err(BackendError::Failed("the engine is broken".into()));
        }
        self.created.fetch_add(1, Ordering::Relaxed);
        self.live.lock().unwrap().insert(spec.runner_id.clone());
        Ok(Box::new(RecordedSandbox {
            id: spec.runner_id,
            live: self.live.clone(),
            destroyed: self.destroyed.clone(),
            patches: self.patches.clone(),
        }))
    }

    async fn adopt(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>> {
        if !self.live.lock().unwrap().contains(&spec.runner_id) {
            return Err(BackendError::Failed("gone".into()));
        }
        Ok(Box::new(RecordedSandbox {
            id: spec.runner_id,
            live: self.live.clone(),
            destroyed: self.destroyed.clone(),
            patches: self.patches.clone(),
        }))
    }

    async fn sweep(&self, keep: &[String]) -> BackendResult<()> {
        self.live.lock().unwrap().retain(|id| keep.contains(id));
        Ok(())
    }
}

struct RecordedSandbox {
    id: String,
    live: Arc<Mutex<HashSet<String>>>,
    destroyed: Arc<AtomicU64>,
    patches: Arc<AtomicU64>,
}

#[async_trait]
impl Sandbox for RecordedSandbox {
    async fn execute(&self, _spec: ExecSpec) -> BackendResult<BackendExecution> {
        Err(BackendError::Failed(
            "the recording backend runs nothing".into(),
        ))
    }
    async fn list_files(&self, _: &str, _: bool, _: bool) -> BackendResult<Vec<FileHeader>> {
        Ok(Vec::new())
    }
    async fn patch_files(&self, _: Vec<String>, _: Vec<FileCopy>) -> BackendResult<()> {
        self.patches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn open_file(&self, _: &str, _: bool) -> BackendResult<FileDownload> {
        Err(BackendError::FileUnavailable("nothing".into()))
    }
    async fn write_file(
        &self,
        _: &str,
        mut content: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> BackendResult<u64> {
        tokio::io::copy(&mut content, &mut tokio::io::sink())
            .await
            .map_err(|e| BackendError::Failed(e.to_string()))
    }
    async fn destroy(&self) -> BackendResult<()> {
        if self.live.lock().unwrap().remove(&self.id) {
            self.destroyed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
