//! Filling pools: creations in flight (at most `max_concurrent_creations`), pool
//! incarnations and generations (what a creation still counts for), backoff after failures.

use super::*;

/// Numbers pools over the life of the process.
static POOL_INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Pool {
    pub(super) fn new(env: ExecutionEnvironment) -> Pool {
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
            unavailable: None,
            watching_readiness: false,
        }
    }
}

/// Which pool, in which shape, a runner creation is for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Creation {
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
    pub(super) fn reconcile(self: &Arc<Self>, state: &mut State, env_id: EnvironmentId) {
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
        if pool.idle.len() + (pool.creating as usize) < want && !self.is_ready(pool) {
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

    /// Asks the engine whether runners of the pool can be made; when not, remembers why
    /// (waking claims that should hear it) and watches until that changes.
    fn is_ready(self: &Arc<Self>, pool: &mut Pool) -> bool {
        let unavailable = match self.backend.readiness(&pool.env) {
            Readiness::Ready => {
                pool.unavailable = None;
                return true;
            }
            Readiness::Preparing => None,
            Readiness::Failed(why) => Some(why),
        };
        if unavailable.is_some() && pool.unavailable != unavailable {
            pool.available.notify_waiters();
        }
        pool.unavailable = unavailable;
        if !pool.watching_readiness {
            pool.watching_readiness = true;
            self.background.spawn(watch_readiness(
                Arc::downgrade(self),
                pool.env.id,
                pool.incarnation,
            ));
        }
        false
    }

    pub(super) async fn create_runner(
        self: Arc<Self>,
        env: ExecutionEnvironment,
        creation: Creation,
    ) {
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
        let created =
            if still_wanted {
                let runner_id = format!("{env_id}-{}", uuid::Uuid::new_v4());
                let spec = RunnerSpec {
                    runner_id: runner_id.clone(),
                    environment: env.clone(),
                };
                Some(self.backend.create_runner(spec).await.map(|sandbox| {
                    Arc::new(Runner::new(runner_id, env, generation, sandbox, None))
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
    pub(super) fn release(&self, runner: &Runner) {
        let mut state = lock(self);
        if let Some(pool) = state.pools.get_mut(&runner.environment_id) {
            pool.used = pool.used.saturating_sub(1);
        }
    }

    pub(super) fn destroy_in_background(&self, runner: Arc<Runner>, why: RunnerEnd) {
        let store = self.store.clone();
        self.background.spawn(destroy(store, runner, why));
    }

    pub(super) async fn destroy(&self, runner: Arc<Runner>, why: RunnerEnd) {
        destroy(self.store.clone(), runner, why).await;
    }
}

/// How often a pool that waits for its engine asks again. Readiness is a cheap lookup
/// (an image's state), so polling costs nothing worth a notification channel per engine.
pub(super) const READINESS_POLL: Duration = Duration::from_millis(200);

/// Polls the engine's readiness for a pool until it is ready (then fills the pool) or the
/// pool is gone or wants nothing.
async fn watch_readiness(inner: std::sync::Weak<Inner>, env_id: EnvironmentId, incarnation: u64) {
    loop {
        tokio::time::sleep(READINESS_POLL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut state = lock(&inner);
        if state.closing {
            return;
        }
        let Some(pool) = state
            .pools
            .get_mut(&env_id)
            .filter(|p| p.incarnation == incarnation)
        else {
            return;
        };
        let want = pool.env.prewarming_pool_size as usize + pool.waiting as usize;
        let ready = matches!(inner.backend.readiness(&pool.env), Readiness::Ready);
        if ready || want == 0 {
            pool.watching_readiness = false;
            if ready {
                pool.unavailable = None;
            }
            inner.reconcile(&mut state, env_id);
            return;
        }
        // Still waiting: let `is_ready` record a new failure reason.
        pool.watching_readiness = true;
        let _ = inner.is_ready(pool);
    }
}
