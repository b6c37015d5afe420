//! Across lives of the server: taking over what the last one left running, and destroying
//! everything on the way out.

use super::*;

impl Manager {
    /// Loads the stored environments, takes over the runners an earlier life of the server
    /// left running (idle ones back into their pools, used ones with their inactivity timer
    /// restarted in full), removes every other trace of runners, and starts filling pools.
    pub async fn restore(&self) -> Result<RestoreReport> {
        let inner = &self.inner;
        let envs = inner.store.load_environments().map_err(Error::Store)?;
        let records = inner.store.load_runners().map_err(Error::Store)?;
        // Images being pulled when the server stopped are pulled on (resumed).
        for env in &envs {
            inner.backend.prepare(env);
        }
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
                let generation = state
                    .pools
                    .get(&record.environment.id)
                    .map_or(0, |p| p.generation);
                let runner = Arc::new(Runner::new(
                    record.id.clone(),
                    record.environment,
                    generation,
                    sandbox,
                    timeout,
                ));
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
