//! The manager owns every environment, its prewarmed pool and every claimed runner.
//!
//! Invariants:
//! - A runner is either idle in exactly one pool or used (in `State::used`), never both.
//! - `Pool::creating` counts runner creations in flight; the pool is refilled until
//!   `idle + creating == prewarmingPoolSize + waiting claims`.
//! - Runners made for an older shape of the environment (`generation`) are never handed out.
//! - The lock is never held across an await; the backend is always called without it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, ExecSpec, FileDownload, RunnerSpec, Sandbox};
use crate::error::{Error, Result};
use crate::execution::{self, RunnerEnd, RunningExecution};
use crate::model::{
    EnvironmentId, EnvironmentStatistics, ExecutionEnvironment, ExecutionRequest, FileCopy,
    FileHeader, MappedPort, MAX_DURATION_SECONDS,
};
use crate::store::{RunnerRecord, Store};

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// How long a claim waits for a runner being created when the pool is empty.
    pub claim_wait: Duration,
    /// Runner creations running at once over all environments.
    pub max_concurrent_creations: usize,
    /// Largest accepted `prewarmingPoolSize`.
    pub max_pool_size: u32,
    /// `/health` reports PREWARMING_POOL_DEPLETING when idle/poolSize falls below this (0 = off).
    pub pool_depletion_threshold: f64,
    /// Executions prepared but never connected are forgotten after this long.
    pub pending_execution_ttl: Duration,
    /// Executions a runner may hold prepared but not yet connected...
    pub max_pending_executions: usize,
    /// ... and the bytes of their commands and variables together.
    pub max_pending_bytes: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            claim_wait: Duration::from_secs(10),
            max_concurrent_creations: 4,
            max_pool_size: 1000,
            pool_depletion_threshold: 0.0,
            pending_execution_ttl: Duration::from_secs(600),
            max_pending_executions: 64,
            max_pending_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    store: Arc<dyn Store>,
    config: ManagerConfig,
    state: Mutex<State>,
    creation_slots: Semaphore,
    /// Runner creations and destructions in the background, so that a shutdown that
    /// destroys everything can wait for the ones in flight.
    background: TaskTracker,
}

#[derive(Default)]
struct State {
    pools: BTreeMap<EnvironmentId, Pool>,
    used: HashMap<String, Arc<Runner>>,
    /// Set when the server destroys everything on its way out: no runner is made any more.
    closing: bool,
}

struct Pool {
    env: ExecutionEnvironment,
    /// Unique to this pool: an environment deleted and created again gets a new pool, and
    /// creations still in flight for the old one must not count against the new one.
    incarnation: u64,
    /// Bumped whenever the shape of runners changes; older runners are discarded.
    generation: u64,
    idle: VecDeque<Arc<Runner>>,
    creating: u32,
    waiting: u32,
    used: u32,
    /// After a failed creation, no new one starts before this instant.
    retry_at: Option<Instant>,
    consecutive_failures: u32,
    available: Arc<Notify>,
}

/// A runner: one sandbox plus the bookkeeping the API needs.
pub struct Runner {
    pub id: String,
    pub environment_id: EnvironmentId,
    /// The environment as it was when this runner was made (its shape).
    made_for: ExecutionEnvironment,
    generation: u64,
    sandbox: Box<dyn Sandbox>,
    end: watch::Sender<Option<RunnerEnd>>,
    activity: Mutex<Activity>,
}

struct Activity {
    inactivity_timeout: Option<Duration>,
    last: Instant,
    pending: HashMap<String, (Instant, ExecutionRequest)>,
}

impl Runner {
    /// The runner's activity record. A panic elsewhere while it was held must not make the
    /// runner unusable, so a poisoned lock is taken over as it is (every update to it is a
    /// single assignment or map operation, complete or not started).
    fn activity(&self) -> MutexGuard<'_, Activity> {
        self.activity
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn touch(&self) {
        self.activity().last = Instant::now();
    }

    /// When the inactivity timeout fires; `None` for never (also for a timeout so large that
    /// the moment cannot be represented).
    fn expiry(&self) -> Option<Instant> {
        let a = self.activity();
        a.inactivity_timeout.and_then(|t| a.last.checked_add(t))
    }

    pub fn mapped_ports(&self) -> Vec<MappedPort> {
        self.sandbox.mapped_ports()
    }

    /// How many bytes of files the runner can hold, if its engine knows.
    pub fn writable_bytes(&self) -> Option<u64> {
        self.sandbox.writable_bytes()
    }

    fn record(&self, used: bool, inactivity_timeout: u64) -> RunnerRecord {
        RunnerRecord {
            id: self.id.clone(),
            environment: self.made_for.clone(),
            used,
            inactivity_timeout,
        }
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    inner
        .state
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
}

impl Manager {
    pub fn new(backend: Arc<dyn Backend>, store: Arc<dyn Store>, config: ManagerConfig) -> Manager {
        let slots = config.max_concurrent_creations.max(1);
        Manager {
            inner: Arc::new(Inner {
                backend,
                store,
                config,
                state: Mutex::new(State::default()),
                creation_slots: Semaphore::new(slots),
                background: TaskTracker::new(),
            }),
        }
    }

    /// Loads the stored environments, takes over the runners an earlier life of the server
    /// left running (idle ones back into their pools, used ones with their inactivity timer
    /// restarted in full), removes every other trace of runners, and starts filling pools.
    pub async fn restore(&self) -> Result<RestoreReport> {
        let inner = &self.inner;
        let envs = inner.store.load_environments().map_err(Error::Store)?;
        let records = inner.store.load_runners().map_err(Error::Store)?;
        let mut adopted = Vec::new();
        let mut report = RestoreReport {
            environments: envs.len(),
            ..RestoreReport::default()
        };
        for record in records {
            let current = envs.iter().find(|e| e.id == record.environment.id);
            // Idle runners of an outdated shape are not worth keeping; used ones are the
            // client's and stay.
            let wanted = current
                .is_some_and(|env| record.used || env.same_runner_shape(&record.environment));
            let sandbox = if wanted {
                let spec = RunnerSpec {
                    runner_id: record.id.clone(),
                    environment: record.environment.clone(),
                };
                match inner.backend.adopt(spec).await {
                    Ok(sandbox) => Some(sandbox),
                    Err(e) => {
                        tracing::warn!(runner = %record.id, error = %e, "runner lost while trident was down");
                        None
                    }
                }
            } else {
                None
            };
            match sandbox {
                Some(sandbox) => adopted.push((record, sandbox)),
                None => {
                    report.dropped += 1;
                    inner
                        .store
                        .delete_runner(&record.id)
                        .map_err(Error::Store)?;
                }
            }
        }
        let keep: Vec<String> = adopted.iter().map(|(r, _)| r.id.clone()).collect();
        inner
            .backend
            .sweep(&keep)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;

        let mut timers = Vec::new();
        {
            let mut state = lock(inner);
            for env in envs {
                if let Err(reason) = inner.backend.validate(&env) {
                    tracing::warn!(id = env.id, %reason, "stored environment cannot make runners now");
                }
                state.pools.insert(env.id, Pool::new(env));
            }
            for (record, sandbox) in adopted {
                let timeout = (record.inactivity_timeout > 0)
                    .then(|| Duration::from_secs(record.inactivity_timeout));
                let runner = Arc::new(Runner {
                    id: record.id.clone(),
                    environment_id: record.environment.id,
                    made_for: record.environment,
                    generation: 0,
                    sandbox,
                    end: watch::channel(None).0,
                    activity: Mutex::new(Activity {
                        inactivity_timeout: timeout,
                        last: Instant::now(),
                        pending: HashMap::new(),
                    }),
                });
                let pool = state
                    .pools
                    .get_mut(&runner.environment_id)
                    .expect("checked above");
                if record.used {
                    pool.used += 1;
                    report.used += 1;
                    if timeout.is_some() {
                        timers.push(runner.clone());
                    }
                    state.used.insert(runner.id.clone(), runner);
                } else {
                    report.idle += 1;
                    pool.idle.push_back(runner);
                }
            }
            let ids: Vec<EnvironmentId> = state.pools.keys().copied().collect();
            for id in ids {
                inner.reconcile(&mut state, id);
            }
        }
        for runner in timers {
            tokio::spawn(inactivity_timer(Arc::downgrade(inner), runner));
        }
        Ok(report)
    }

    // ---- environments ------------------------------------------------------------------

    pub fn environments(&self) -> Vec<ExecutionEnvironment> {
        lock(&self.inner)
            .pools
            .values()
            .map(|p| p.env.clone())
            .collect()
    }

    pub fn environment(&self, id: EnvironmentId) -> Result<ExecutionEnvironment> {
        lock(&self.inner)
            .pools
            .get(&id)
            .map(|p| p.env.clone())
            .ok_or(Error::EnvironmentNotFound(id))
    }

    /// Creates or replaces an environment; returns whether it was created. Runners are
    /// replaced only when their shape (image, limits, network) changes; a new pool size
    /// just resizes the pool, and used runners are never touched.
    pub fn put_environment(&self, env: ExecutionEnvironment) -> Result<bool> {
        self.validate_environment(&env)?;
        let inner = &self.inner;
        let mut state = lock(inner);
        // Persist under the lock so concurrent PUTs of one id store in the order they apply.
        inner.store.save_environment(&env).map_err(Error::Store)?;
        let id = env.id;
        let created = match state.pools.get_mut(&id) {
            Some(pool) => {
                if !pool.env.same_runner_shape(&env) {
                    pool.generation += 1;
                    let stale: Vec<_> = pool.idle.drain(..).collect();
                    for runner in stale {
                        inner.destroy_in_background(runner, RunnerEnd::Deleted);
                    }
                    pool.retry_at = None;
                    pool.consecutive_failures = 0;
                }
                pool.env = env;
                false
            }
            None => {
                state.pools.insert(id, Pool::new(env));
                true
            }
        };
        inner.reconcile(&mut state, id);
        Ok(created)
    }

    fn validate_environment(&self, env: &ExecutionEnvironment) -> Result<()> {
        if env.image.trim().is_empty() {
            return Err(Error::BadRequest("image must not be empty".into()));
        }
        if env.prewarming_pool_size > self.inner.config.max_pool_size {
            return Err(Error::BadRequest(format!(
                "prewarmingPoolSize {} is above this server's maximum of {}",
                env.prewarming_pool_size, self.inner.config.max_pool_size
            )));
        }
        // As the reference: anything up to MaxInt32; a memoryLimit of 0 means the server's
        // default (the backend knows it).
        for (name, value) in [
            ("memoryLimit", env.memory_limit),
            ("cpuLimit", env.cpu_limit),
        ] {
            if value > i32::MAX as u32 {
                return Err(Error::BadRequest(format!(
                    "{name} {value} is above the maximum of {}",
                    i32::MAX
                )));
            }
        }
        if env.exposed_ports.contains(&0) {
            return Err(Error::BadRequest(
                "exposedPorts must be between 1 and 65535".into(),
            ));
        }
        self.inner.backend.validate(env).map_err(Error::BadRequest)
    }

    /// Deletes an environment and destroys all its runners, idle and used.
    pub fn delete_environment(&self, id: EnvironmentId) -> Result<()> {
        let inner = &self.inner;
        let mut state = lock(inner);
        if !state.pools.contains_key(&id) {
            return Err(Error::EnvironmentNotFound(id));
        }
        inner.store.delete_environment(id).map_err(Error::Store)?;
        let pool = state.pools.remove(&id).expect("checked above");
        pool.available.notify_waiters();
        let used: Vec<String> = state
            .used
            .iter()
            .filter(|(_, r)| r.environment_id == id)
            .map(|(k, _)| k.clone())
            .collect();
        for runner in pool.idle {
            inner.destroy_in_background(runner, RunnerEnd::Deleted);
        }
        for key in used {
            if let Some(runner) = state.used.remove(&key) {
                inner.destroy_in_background(runner, RunnerEnd::Deleted);
            }
        }
        Ok(())
    }

    pub fn statistics(&self) -> Vec<EnvironmentStatistics> {
        lock(&self.inner)
            .pools
            .values()
            .map(|p| EnvironmentStatistics {
                id: p.env.id,
                prewarming_pool_size: p.env.prewarming_pool_size,
                idle_runners: p.idle.len() as u32,
                used_runners: p.used,
            })
            .collect()
    }

    /// Environments whose pool is below the configured depletion threshold.
    pub fn depleted_environments(&self) -> Vec<EnvironmentId> {
        let threshold = self.inner.config.pool_depletion_threshold;
        if threshold <= 0.0 {
            return Vec::new();
        }
        lock(&self.inner)
            .pools
            .values()
            .filter(|p| {
                p.env.prewarming_pool_size > 0
                    && (p.idle.len() as f64 / p.env.prewarming_pool_size as f64) < threshold
            })
            .map(|p| p.env.id)
            .collect()
    }

    // ---- runners -----------------------------------------------------------------------

    /// Hands out an idle runner of the environment, waiting up to `claim_wait` for one being
    /// created when the pool is momentarily empty.
    pub async fn claim_runner(
        &self,
        env_id: EnvironmentId,
        inactivity_timeout: Duration,
    ) -> Result<Arc<Runner>> {
        check_duration("inactivityTimeout", inactivity_timeout.as_secs())?;
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.config.claim_wait;
        // The pool this claim counts as waiting in (by incarnation: the environment may be
        // deleted and created again meanwhile, and the new pool owes this claim nothing).
        let mut registered: Option<u64> = None;
        let unregister = |pool: &mut Pool, registered: &mut Option<u64>| {
            if registered.take() == Some(pool.incarnation) {
                pool.waiting -= 1;
            }
        };
        let result = loop {
            let notified = {
                let mut state = lock(inner);
                let Some(pool) = state.pools.get_mut(&env_id) else {
                    break Err(Error::EnvironmentNotFound(env_id));
                };
                if let Some(runner) = pool.idle.pop_front() {
                    pool.used += 1;
                    unregister(pool, &mut registered);
                    state.used.insert(runner.id.clone(), runner.clone());
                    inner.reconcile(&mut state, env_id);
                    break Ok(runner);
                }
                if registered != Some(pool.incarnation) {
                    unregister(pool, &mut registered);
                    pool.waiting += 1;
                    registered = Some(pool.incarnation);
                    inner.reconcile(&mut state, env_id);
                }
                let pool = state.pools.get(&env_id).expect("present");
                pool.available.clone().notified_owned()
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break Err(Error::Overloaded(format!(
                    "no idle runner of execution environment {env_id} could be had in {:?}",
                    inner.config.claim_wait
                )));
            }
        };
        if registered.is_some() {
            let mut state = lock(inner);
            if let Some(pool) = state.pools.get_mut(&env_id) {
                unregister(pool, &mut registered);
                inner.reconcile(&mut state, env_id);
            }
        }
        let runner = result?;
        {
            let mut activity = runner.activity();
            activity.last = Instant::now();
            activity.inactivity_timeout =
                (!inactivity_timeout.is_zero()).then_some(inactivity_timeout);
        }
        // Recorded before the client hears of it: after a crash, a runner a client holds
        // must come back as used, never as idle for someone else.
        let record = runner.record(true, inactivity_timeout.as_secs());
        if let Err(e) = inner.store.save_runner(&record) {
            if let Some(runner) = lock(inner).used.remove(&runner.id) {
                inner.release(&runner);
                inner.destroy_in_background(runner, RunnerEnd::Deleted);
            }
            return Err(Error::Store(e));
        }
        if !inactivity_timeout.is_zero() {
            tokio::spawn(inactivity_timer(Arc::downgrade(inner), runner.clone()));
        }
        Ok(runner)
    }

    /// A used runner by id, or 410's error.
    pub fn runner(&self, id: &str) -> Result<Arc<Runner>> {
        lock(&self.inner)
            .used
            .get(id)
            .cloned()
            .ok_or_else(|| Error::RunnerNotFound(id.to_string()))
    }

    pub async fn delete_runner(&self, id: &str) -> Result<()> {
        let runner = lock(&self.inner)
            .used
            .remove(id)
            .ok_or_else(|| Error::RunnerNotFound(id.to_string()))?;
        self.inner.release(&runner);
        self.inner.destroy(runner, RunnerEnd::Deleted).await;
        Ok(())
    }

    pub async fn list_files(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> Result<Vec<FileHeader>> {
        let runner = self.runner(id)?;
        runner.touch();
        runner
            .sandbox
            .list_files(path, recursive, privileged)
            .await
            .map_err(Error::from)
    }

    pub async fn patch_files(
        &self,
        id: &str,
        delete: Vec<String>,
        copy: Vec<FileCopy>,
    ) -> Result<()> {
        let runner = self.runner(id)?;
        runner.touch();
        runner
            .sandbox
            .patch_files(delete, copy)
            .await
            .map_err(Error::from)
    }

    pub async fn open_file(&self, id: &str, path: &str, privileged: bool) -> Result<FileDownload> {
        let runner = self.runner(id)?;
        runner.touch();
        runner
            .sandbox
            .open_file(path, privileged)
            .await
            .map_err(Error::from)
    }

    /// Writes one file into a runner from a stream (see `Sandbox::write_file`).
    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        content: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64> {
        let runner = self.runner(id)?;
        runner.touch();
        Ok(runner.sandbox.write_file(path, content).await?)
    }

    /// Stores an execution until its WebSocket connects; returns its id. A runner holds a
    /// bounded number (and size) of them: clients that prepare without connecting cannot
    /// grow the server's memory.
    pub fn prepare_execution(&self, id: &str, request: ExecutionRequest) -> Result<String> {
        check_duration("timeLimit", request.time_limit)?;
        let runner = self.runner(id)?;
        let execution_id = uuid::Uuid::new_v4().to_string();
        let config = &self.inner.config;
        let mut activity = runner.activity();
        activity
            .pending
            .retain(|_, (at, _)| at.elapsed() < config.pending_execution_ttl);
        let held: usize = activity.pending.values().map(|(_, r)| r.size()).sum();
        if activity.pending.len() >= config.max_pending_executions
            || held + request.size() > config.max_pending_bytes
        {
            return Err(Error::TooManyPending(format!(
                "runner {id} already holds {} prepared executions ({held} bytes) that were never \
                 connected; at most {} ({} bytes) may wait: connect to their WebSockets first",
                activity.pending.len(),
                config.max_pending_executions,
                config.max_pending_bytes
            )));
        }
        activity
            .pending
            .insert(execution_id.clone(), (Instant::now(), request));
        Ok(execution_id)
    }

    /// Checks that an execution can be started, before the WebSocket upgrade is accepted.
    pub fn has_pending_execution(&self, id: &str, execution_id: &str) -> Result<()> {
        let runner = self.runner(id)?;
        let activity = runner.activity();
        match activity.pending.get(execution_id) {
            Some(_) => Ok(()),
            None => Err(Error::ExecutionNotFound(execution_id.to_string())),
        }
    }

    /// Starts a prepared execution (once). The WebSocket connect counts as activity.
    pub async fn start_execution(&self, id: &str, execution_id: &str) -> Result<RunningExecution> {
        let runner = self.runner(id)?;
        let request = {
            let mut activity = runner.activity();
            activity.last = Instant::now();
            activity
                .pending
                .remove(execution_id)
                .map(|(_, r)| r)
                .ok_or_else(|| Error::ExecutionNotFound(execution_id.to_string()))?
        };
        let mut environment = vec![("CODEOCEAN".to_string(), "true".to_string())];
        environment.extend(request.environment);
        let spec = ExecSpec {
            command: request.command,
            privileged: request.privileged,
            environment,
        };
        let ended = runner.end.subscribe();
        let started = runner.sandbox.execute(spec).await?;
        let limit = (request.time_limit > 0).then(|| Duration::from_secs(request.time_limit));
        Ok(execution::spawn(started, limit, ended))
    }

    /// Destroys every runner (idle and used), for a shutdown that leaves nothing behind.
    /// Without it, runners keep running and the next start takes them over.
    pub async fn destroy_all_runners(&self) {
        {
            let mut state = lock(&self.inner);
            state.closing = true;
            for pool in state.pools.values_mut() {
                pool.generation += 1; // queued creations skip, landing ones are destroyed
            }
        }
        self.inner.background.close();
        self.inner.background.wait().await;
        let runners: Vec<Arc<Runner>> = {
            let mut state = lock(&self.inner);
            let mut all: Vec<_> = state.used.drain().map(|(_, r)| r).collect();
            for pool in state.pools.values_mut() {
                pool.used = 0;
                all.extend(pool.idle.drain(..));
            }
            all
        };
        let mut destroys = tokio::task::JoinSet::new();
        for runner in runners {
            let inner = self.inner.clone();
            destroys.spawn(async move { inner.destroy(runner, RunnerEnd::Deleted).await });
        }
        while destroys.join_next().await.is_some() {}
    }
}

/// What `Manager::restore` found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub environments: usize,
    pub idle: usize,
    pub used: usize,
    /// Records of runners that were gone or no longer wanted.
    pub dropped: usize,
}

/// Durations clients give in seconds must stay below [`MAX_DURATION_SECONDS`], so that no
/// deadline computed from them can overflow.
fn check_duration(name: &str, seconds: u64) -> Result<()> {
    if seconds > MAX_DURATION_SECONDS {
        return Err(Error::BadRequest(format!(
            "{name} {seconds} is above the maximum of {MAX_DURATION_SECONDS} seconds"
        )));
    }
    Ok(())
}

/// Numbers pools over the life of the process.
static POOL_INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Pool {
    fn new(env: ExecutionEnvironment) -> Pool {
        Pool {
            env,
            incarnation: POOL_INCARNATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            generation: 0,
            idle: VecDeque::new(),
            creating: 0,
            waiting: 0,
            used: 0,
            retry_at: None,
            consecutive_failures: 0,
            available: Arc::new(Notify::new()),
        }
    }
}

/// Which pool, in which shape, a runner creation is for.
#[derive(Debug, Clone, Copy)]
struct Creation {
    incarnation: u64,
    generation: u64,
}

impl Creation {
    fn is_for(&self, pool: &Pool) -> bool {
        pool.incarnation == self.incarnation
    }
}

impl Inner {
    /// Starts creations or destroys idle runners until the pool has what it should.
    fn reconcile(self: &Arc<Self>, state: &mut State, env_id: EnvironmentId) {
        if state.closing {
            return;
        }
        let Some(pool) = state.pools.get_mut(&env_id) else {
            return;
        };
        let want = pool.env.prewarming_pool_size as usize + pool.waiting as usize;
        while pool.idle.len() > want {
            let runner = pool.idle.pop_back().expect("non-empty");
            self.destroy_in_background(runner, RunnerEnd::Deleted);
        }
        if pool.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        while pool.idle.len() + (pool.creating as usize) < want {
            pool.creating += 1;
            let creation = Creation {
                incarnation: pool.incarnation,
                generation: pool.generation,
            };
            let env = pool.env.clone();
            self.background
                .spawn(self.clone().create_runner(env, creation));
        }
    }

    async fn create_runner(self: Arc<Self>, env: ExecutionEnvironment, creation: Creation) {
        let env_id = env.id;
        let generation = creation.generation;
        let permit = self.creation_slots.acquire().await;
        let still_wanted = {
            let state = lock(&self);
            state
                .pools
                .get(&env_id)
                .is_some_and(|p| creation.is_for(p) && p.generation == generation)
        };
        let created = if still_wanted {
            let runner_id = format!("{env_id}-{}", uuid::Uuid::new_v4());
            let spec = RunnerSpec {
                runner_id: runner_id.clone(),
                environment: env.clone(),
            };
            Some(self.backend.create_runner(spec).await.map(|sandbox| {
                Arc::new(Runner {
                    id: runner_id,
                    environment_id: env_id,
                    made_for: env,
                    generation,
                    sandbox,
                    end: watch::channel(None).0,
                    activity: Mutex::new(Activity {
                        inactivity_timeout: None,
                        last: Instant::now(),
                        pending: HashMap::new(),
                    }),
                })
            }))
        } else {
            None
        };
        drop(permit);

        let mut state = lock(&self);
        // The pool it was made for may be gone, or replaced by a new pool of the same id
        // (whose own creations are counted apart).
        let Some(pool) = state.pools.get_mut(&env_id).filter(|p| creation.is_for(p)) else {
            if let Some(Ok(runner)) = created {
                self.destroy_in_background(runner, RunnerEnd::Deleted);
            }
            return;
        };
        pool.creating -= 1;
        match created {
            Some(Ok(runner)) if runner.generation == pool.generation => {
                match self.store.save_runner(&runner.record(false, 0)) {
                    Ok(()) => {
                        pool.consecutive_failures = 0;
                        pool.idle.push_back(runner);
                        pool.available.notify_waiters();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "recording a new runner failed");
                        self.destroy_in_background(runner, RunnerEnd::Deleted);
                    }
                }
            }
            Some(Ok(runner)) => self.destroy_in_background(runner, RunnerEnd::Deleted),
            Some(Err(e)) => {
                pool.consecutive_failures += 1;
                let backoff = Duration::from_millis(
                    250u64 << pool.consecutive_failures.min(7), // 0.5 s .. 32 s
                );
                tracing::error!(env = env_id, error = %e, ?backoff, "creating a runner failed");
                pool.retry_at = Some(Instant::now() + backoff);
                let weak = Arc::downgrade(&self);
                tokio::spawn(async move {
                    tokio::time::sleep(backoff).await;
                    if let Some(inner) = weak.upgrade() {
                        let mut state = lock(&inner);
                        if let Some(pool) = state.pools.get_mut(&env_id) {
                            if creation.is_for(pool) {
                                pool.retry_at = None;
                            }
                        }
                        inner.reconcile(&mut state, env_id);
                    }
                });
                return;
            }
            None => {}
        }
        self.reconcile(&mut state, env_id);
    }

    /// Bookkeeping when a used runner leaves: its pool counts one fewer.
    fn release(&self, runner: &Runner) {
        let mut state = lock(self);
        if let Some(pool) = state.pools.get_mut(&runner.environment_id) {
            pool.used = pool.used.saturating_sub(1);
        }
    }

    fn destroy_in_background(&self, runner: Arc<Runner>, why: RunnerEnd) {
        let store = self.store.clone();
        self.background.spawn(destroy(store, runner, why));
    }

    async fn destroy(&self, runner: Arc<Runner>, why: RunnerEnd) {
        destroy(self.store.clone(), runner, why).await;
    }
}

/// Ends a runner: its executions hear why, its sandbox goes, then its record (a crash in
/// between leaves a record whose runner is gone, which the next start drops).
async fn destroy(store: Arc<dyn Store>, runner: Arc<Runner>, why: RunnerEnd) {
    runner.end.send_replace(Some(why));
    runner.sandbox.destroy().await;
    if let Err(e) = store.delete_runner(&runner.id) {
        tracing::error!(runner = %runner.id, error = %e, "forgetting a destroyed runner failed");
    }
    tracing::debug!(runner = %runner.id, ?why, "runner destroyed");
}

/// Destroys the runner once it has seen no activity for its inactivity timeout.
async fn inactivity_timer(inner: std::sync::Weak<Inner>, runner: Arc<Runner>) {
    let mut ended = runner.end.subscribe();
    loop {
        let Some(expiry) = runner.expiry() else {
            return;
        };
        let now = Instant::now();
        if expiry <= now {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(expiry - now) => {}
            _ = ended.wait_for(|e| e.is_some()) => return,
        }
    }
    let Some(inner) = inner.upgrade() else { return };
    let removed = lock(&inner).used.remove(&runner.id);
    if let Some(runner) = removed {
        tracing::info!(runner = %runner.id, "inactivity timeout: destroying runner");
        inner.release(&runner);
        inner.destroy(runner, RunnerEnd::InactivityTimeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{MemoryStore, RecordingBackend};

    fn environment(id: EnvironmentId, pool: u32, memory_mb: u32) -> ExecutionEnvironment {
        ExecutionEnvironment {
            id,
            image: "host".into(),
            prewarming_pool_size: pool,
            cpu_limit: 20,
            memory_limit: memory_mb,
            network_access: false,
            exposed_ports: Vec::new(),
        }
    }

    /// xorshift64: a seeded, repeatable sequence without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn manager(backend: Arc<RecordingBackend>) -> Manager {
        Manager::new(
            backend,
            Arc::new(MemoryStore::default()),
            ManagerConfig {
                claim_wait: Duration::from_millis(30),
                ..ManagerConfig::default()
            },
        )
    }

    /// Waits until every pool holds exactly its size, nothing is being made, and the backend
    /// holds exactly the runners the manager knows of.
    async fn settled(
        manager: &Manager,
        backend: &RecordingBackend,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = manager.statistics();
            let pools_full = stats
                .iter()
                .all(|s| s.idle_runners == s.prewarming_pool_size);
            let known: u32 = stats.iter().map(|s| s.idle_runners + s.used_runners).sum();
            let creating: u32 = lock(&manager.inner)
                .pools
                .values()
                .map(|p| p.creating)
                .sum();
            let live = backend.live.lock().unwrap().len() as u32;
            if pools_full && creating == 0 && live == known {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not settled: {stats:?}, creating {creating}, live {live}, known {known}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Four clients issue seeded random PUTs (pool 0–3, sometimes a new shape), DELETEs,
    /// claims and runner deletions over three environments at once; afterwards every pool
    /// must hold exactly its size, with no runner lost or leaked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn interleaved_operations_leave_every_pool_at_its_size() {
        for seed in 1..=8u64 {
            let backend = Arc::new(RecordingBackend::with_seed(seed));
            let manager = manager(backend.clone());
            let mut clients = tokio::task::JoinSet::new();
            for client in 0..4u64 {
                let manager = manager.clone();
                clients.spawn(async move {
                    let mut rng = Rng(seed * 7919 + client * 104_729 + 1);
                    let mut held: Vec<String> = Vec::new();
                    for _ in 0..200 {
                        let id = rng.below(3);
                        match rng.below(4) {
                            0 => {
                                let memory = if rng.below(4) == 0 { 128 } else { 256 };
                                let env = environment(id, rng.below(4) as u32, memory);
                                let _ = manager.put_environment(env);
                            }
                            1 => {
                                let _ = manager.delete_environment(id);
                            }
                            2 => {
                                if let Ok(runner) = manager.claim_runner(id, Duration::ZERO).await {
                                    held.push(runner.id.clone());
                                }
                            }
                            _ => {
                                if let Some(runner) = held.pop() {
                                    let _ = manager.delete_runner(&runner).await;
                                }
                            }
                        }
                        if rng.below(3) == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    held
                });
            }
            let mut held = Vec::new();
            while let Some(result) = clients.join_next().await {
                held.extend(result.unwrap());
            }
            settled(&manager, &backend)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}, runners still held: {e}"));
            for runner in held {
                let _ = manager.delete_runner(&runner).await;
            }
            settled(&manager, &backend)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}, after deleting held runners: {e}"));
            // Every pool still refills: a claim is answered, and the pool is full again.
            for env in manager.environments() {
                if env.prewarming_pool_size > 0 {
                    let runner = manager.claim_runner(env.id, Duration::ZERO).await.unwrap();
                    manager.delete_runner(&runner.id).await.unwrap();
                }
            }
            settled(&manager, &backend)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}, after a claim per pool: {e}"));
        }
    }
}
