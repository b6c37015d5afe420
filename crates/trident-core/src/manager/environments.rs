//! Environments: create or replace (resizing or replacing pools), delete, statistics.

use super::*;

impl Manager {
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
        let env_for_engine = env.clone();
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
        // Outside the lock (it may spawn work); a failed image is pulled again at once.
        drop(state);
        inner.backend.prepare(&env_for_engine);
        let mut state = lock(inner);
        inner.reconcile(&mut state, id);
        Ok(created)
    }

    fn validate_environment(&self, env: &ExecutionEnvironment) -> Result<()> {
        if env.id == ONE_OFF_ENVIRONMENT {
            return Err(Error::BadRequest(format!(
                "execution environment id {ONE_OFF_ENVIRONMENT} is reserved for one-off runners"
            )));
        }
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
}
