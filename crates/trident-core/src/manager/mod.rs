//! The manager owns every environment, its prewarmed pool and every claimed runner.
//!
//! Invariants:
//! - A runner is either idle in exactly one pool or used (in `State::used`), never both.
//! - `Pool::creating` counts runner creations in flight; the pool is refilled until
//!   `idle + creating == prewarmingPoolSize + waiting claims`.
//! - Runners made for an older shape of the environment (`generation`) are never handed out.
//! - The lock is never held across an await; the backend is always called without it,
//!   except for its cheap, non-blocking `readiness`.
//! - No runner is made while the engine is not `Ready` for the environment (its image is
//!   still being pulled, or could not be).
//!
//! By operation: `lifecycle.rs` (restore after a restart, destroy everything on the way
//! out), `environments.rs`, `claims.rs` (claiming and deleting runners), `runner_ops.rs`
//! (files and executions of a claimed runner), `pool.rs` (filling pools: creations,
//! generations, backoff, waiting for the engine's readiness), `runner.rs` (a runner, its activity and inactivity timer).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, ExecSpec, FileDownload, Readiness, RunnerSpec, Sandbox};
use crate::error::{Error, Result};
use crate::execution::{self, RunnerEnd, RunningExecution};

mod claims;
mod environments;
mod lifecycle;
mod pool;
mod runner;
mod runner_ops;
#[cfg(test)]
mod tests;

use crate::model::{
    EnvironmentId, EnvironmentStatistics, ExecutionEnvironment, ExecutionRequest, FileCopy,
    FileHeader, MappedPort, MAX_DURATION_SECONDS, ONE_OFF_ENVIRONMENT,
};
use crate::store::{RunnerRecord, Store};
pub use runner::Runner;
use runner::{destroy, inactivity_timer};

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
            max_pool_size: 10_000,
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
    /// Why the engine cannot make runners of this environment now (its last
    /// [`Readiness::Failed`]); claims on an empty pool answer with it at once.
    unavailable: Option<String>,
    /// A task is polling the engine's readiness for this pool.
    watching_readiness: bool,
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
