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
