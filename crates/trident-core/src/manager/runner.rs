//! A runner: one sandbox plus what the API needs to know about it.

use super::*;

/// A runner: one sandbox plus the bookkeeping the API needs.
pub struct Runner {
    pub id: String,
    pub environment_id: EnvironmentId,
    /// The environment as it was when this runner was made (its shape).
    pub(super) made_for: ExecutionEnvironment,
    pub(super) generation: u64,
    pub(super) sandbox: Box<dyn Sandbox>,
    pub(super) end: watch::Sender<Option<RunnerEnd>>,
    pub(super) activity: Mutex<Activity>,
}

pub(super) struct Activity {
    pub(super) inactivity_timeout: Option<Duration>,
    pub(super) last: Instant,
    pub(super) pending: HashMap<String, (Instant, ExecutionRequest)>,
}

impl Runner {
    /// A runner of `made_for` in the pool generation `generation`, just made or adopted.
    pub(super) fn new(
        id: String,
        made_for: ExecutionEnvironment,
        generation: u64,
        sandbox: Box<dyn Sandbox>,
        inactivity_timeout: Option<Duration>,
    ) -> Runner {
        Runner {
            id,
            environment_id: made_for.id,
            made_for,
            generation,
            sandbox,
            end: watch::channel(None).0,
            activity: Mutex::new(Activity {
                inactivity_timeout,
                last: Instant::now(),
                pending: HashMap::new(),
            }),
        }
    }

    /// The runner's activity record. A panic elsewhere while it was held must not make the
    /// runner unusable, so a poisoned lock is taken over as it is (every update to it is a
    /// single assignment or map operation, complete or not started).
    pub(super) fn activity(&self) -> MutexGuard<'_, Activity> {
        self.activity
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(super) fn touch(&self) {
        self.activity().last = Instant::now();
    }

    /// When the inactivity timeout fires; `None` for never (also for a timeout so large that
    /// the moment cannot be represented).
    pub(super) fn expiry(&self) -> Option<Instant> {
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

    pub(super) fn record(&self, used: bool, inactivity_timeout: u64) -> RunnerRecord {
        RunnerRecord {
            id: self.id.clone(),
            environment: self.made_for.clone(),
            used,
            inactivity_timeout,
        }
    }
}

/// Ends a runner: its executions hear why, its sandbox goes, then its record (a crash in
/// between leaves a record whose runner is gone, which the next start drops).
pub(super) async fn destroy(store: Arc<dyn Store>, runner: Arc<Runner>, why: RunnerEnd) {
    runner.end.send_replace(Some(why));
    if let Err(e) = runner.sandbox.destroy().await {
        tracing::warn!(runner = %runner.id, error = %e, "destroying a runner left something behind");
    }
    if let Err(e) = store.delete_runner(&runner.id) {
        tracing::error!(runner = %runner.id, error = %e, "forgetting a destroyed runner failed");
    }
    tracing::debug!(runner = %runner.id, ?why, "runner destroyed");
}

/// Destroys the runner once it has seen no activity for its inactivity timeout.
pub(super) async fn inactivity_timer(inner: std::sync::Weak<Inner>, runner: Arc<Runner>) {
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
