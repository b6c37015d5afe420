//! Claiming a runner from its pool (waiting briefly for one being made), finding and
//! deleting claimed runners.

use super::*;

impl Manager {
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
                let pool = state.pools.get_mut(&env_id).expect("present");
                if let Some(why) = pool.unavailable.clone() {
                    break Err(Error::EnvironmentUnavailable(format!(
                        "no runner of execution environment {env_id} can be had: {why}"
                    )));
                }
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
        self.hand_out(runner, inactivity_timeout)
    }

    /// A fresh runner of `image` with the server's default limits and no network, made for
    /// one job rather than taken from a pool (as GitLab's runners start a container per
    /// job). Waits up to `wait` while the engine prepares the image (pulls it).
    pub async fn create_one_off_runner(
        &self,
        image: &str,
        inactivity_timeout: Duration,
        wait: Duration,
    ) -> Result<Arc<Runner>> {
        check_duration("inactivityTimeout", inactivity_timeout.as_secs())?;
        let inner = &self.inner;
        let env = ExecutionEnvironment {
            id: ONE_OFF_ENVIRONMENT,
            image: image.to_string(),
            prewarming_pool_size: 0,
            cpu_limit: 0,
            memory_limit: 0,
            network_access: false,
            exposed_ports: Vec::new(),
        };
        inner.backend.validate(&env).map_err(Error::BadRequest)?;
        inner.backend.prepare(&env);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match inner.backend.readiness(&env) {
                Readiness::Ready => break,
                Readiness::Failed(why) => {
                    return Err(Error::EnvironmentUnavailable(format!(
                        "no runner of image {image} can be had: {why}"
                    )))
                }
                Readiness::Preparing if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Overloaded(format!(
                        "image {image} was not ready within {wait:?}"
                    )))
                }
                Readiness::Preparing => tokio::time::sleep(pool::READINESS_POLL).await,
            }
        }
        let runner_id = format!("job-{}", uuid::Uuid::new_v4());
        let sandbox = {
            let _permit = inner.creation_slots.acquire().await;
            if lock(inner).closing {
                return Err(Error::Internal("the server is shutting down".into()));
            }
            inner
                .backend
                .create_runner(RunnerSpec {
                    runner_id: runner_id.clone(),
                    environment: env.clone(),
                })
                .await?
        };
        let runner = Arc::new(Runner::new(runner_id, env, 0, sandbox, None));
        lock(inner).used.insert(runner.id.clone(), runner.clone());
        self.hand_out(runner, inactivity_timeout)
    }

    /// Gives a runner just moved to `used` to a client: starts its inactivity clock and
    /// records it as used before the client hears of it.
    fn hand_out(&self, runner: Arc<Runner>, inactivity_timeout: Duration) -> Result<Arc<Runner>> {
        let inner = &self.inner;
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
}
