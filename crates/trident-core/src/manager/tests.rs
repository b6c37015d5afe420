//! The Manager's rules over an in-memory store and a backend whose runners are records.
use super::*;
use crate::testing::{MemoryStore, RecordingBackend};
use std::sync::atomic::Ordering;

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
async fn settled(manager: &Manager, backend: &RecordingBackend) -> std::result::Result<(), String> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shape_replaces_idle_runners_but_never_used_ones() {
    let backend = Arc::new(RecordingBackend::with_seed(3));
    let manager = manager(backend.clone());
    manager.put_environment(environment(1, 2, 256)).unwrap();
    settled(&manager, &backend).await.unwrap();
    let used = manager.claim_runner(1, Duration::ZERO).await.unwrap();
    settled(&manager, &backend).await.unwrap();
    let idle_before: Vec<String> = backend.live.lock().unwrap().iter().cloned().collect();

    // Only the pool size changes: the idle runners stay.
    manager.put_environment(environment(1, 3, 256)).unwrap();
    settled(&manager, &backend).await.unwrap();
    for id in &idle_before {
        assert!(
            backend.live.lock().unwrap().contains(id),
            "{id} was replaced by a resize"
        );
    }
    // The memory limit changes: every idle runner is replaced, the used one stays.
    manager.put_environment(environment(1, 3, 512)).unwrap();
    settled(&manager, &backend).await.unwrap();
    let live = backend.live.lock().unwrap().clone();
    assert!(
        live.contains(&used.id),
        "a used runner was destroyed by a PUT"
    );
    for id in idle_before.iter().filter(|id| **id != used.id) {
        assert!(!live.contains(id), "{id} of the old shape is still idle");
    }
    assert_eq!(
        live.len(),
        4,
        "three idle of the new shape and the used one"
    );
    // What the pool hands out now is of the new shape.
    let fresh = manager.claim_runner(1, Duration::ZERO).await.unwrap();
    assert_eq!(fresh.made_for.memory_limit, 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_an_empty_pool_wait_then_give_up_and_failing_creations_back_off() {
    let backend = Arc::new(RecordingBackend::with_seed(5));
    backend
        .fail_creations
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let manager = manager(backend.clone());
    manager.put_environment(environment(1, 1, 256)).unwrap();
    let started = Instant::now();
    let claimed = manager.claim_runner(1, Duration::ZERO).await;
    assert!(
        matches!(claimed, Err(Error::Overloaded(_))),
        "{:?}",
        claimed.err()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(25),
        "the claim waited"
    );
    // Failures back off (0.5 s, 1 s, ...): a broken engine is not hammered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = backend.attempts.load(std::sync::atomic::Ordering::Relaxed);
    assert!(attempts <= 3, "{attempts} attempts in 300 ms");
    // Once the engine works again, the pool fills.
    backend
        .fail_creations
        .store(false, std::sync::atomic::Ordering::Relaxed);
    settled(&manager, &backend).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_used_runners_and_idle_ones_of_the_current_shape_only() {
    let backend = Arc::new(RecordingBackend::with_seed(9));
    let store = Arc::new(MemoryStore::default());
    let first = Manager::new(backend.clone(), store.clone(), ManagerConfig::default());
    first.put_environment(environment(1, 2, 256)).unwrap();
    first.put_environment(environment(2, 1, 256)).unwrap();
    settled(&first, &backend).await.unwrap();
    let used = first
        .claim_runner(1, Duration::from_secs(60))
        .await
        .unwrap();
    settled(&first, &backend).await.unwrap();
    drop(first);
    // While the server was down, environment 2 got a new shape, and one idle runner died.
    store.save_environment(&environment(2, 1, 128)).unwrap();
    let dead = {
        let runners = store.runners.lock().unwrap();
        runners
            .values()
            .find(|r| r.environment.id == 1 && !r.used)
            .unwrap()
            .id
            .clone()
    };
    backend.live.lock().unwrap().remove(&dead);

    let second = Manager::new(backend.clone(), store.clone(), ManagerConfig::default());
    let report = second.restore().await.unwrap();
    assert_eq!(report.environments, 2);
    assert_eq!(report.used, 1, "{report:?}");
    assert_eq!(report.idle, 1, "{report:?}");
    assert_eq!(
        report.dropped, 2,
        "the dead runner and the one of the old shape: {report:?}"
    );
    assert!(
        second.runner(&used.id).is_ok(),
        "the client keeps its runner"
    );
    settled(&second, &backend).await.unwrap();
    let records = store.runners.lock().unwrap().len();
    assert_eq!(
        records,
        backend.live.lock().unwrap().len(),
        "records match runners"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_fill_only_once_the_engine_is_ready_and_claims_hear_why_it_is_not() {
    use crate::backend::Readiness;
    let backend = Arc::new(RecordingBackend::with_seed(11));
    *backend.readiness.lock().unwrap() = Some(Readiness::Preparing);
    let manager = Manager::new(
        backend.clone(),
        Arc::new(MemoryStore::default()),
        ManagerConfig {
            claim_wait: Duration::from_secs(5),
            ..ManagerConfig::default()
        },
    );
    manager.put_environment(environment(1, 2, 64)).unwrap();
    assert_eq!(backend.prepared.load(Ordering::Relaxed), 1, "PUT prepares");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        backend.attempts.load(Ordering::Relaxed),
        0,
        "nothing made yet"
    );

    // A claim while preparing waits; the image becoming ready serves it.
    let claim = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.claim_runner(1, Duration::ZERO).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !claim.is_finished(),
        "the claim waits while the image is pulled"
    );
    *backend.readiness.lock().unwrap() = None;
    let runner = claim.await.unwrap().expect("served once ready");
    settled(&manager, &backend).await.unwrap();

    // A failure is answered at once, with the reason, by claims on an empty pool.
    manager.delete_runner(&runner.id).await.unwrap();
    manager.put_environment(environment(2, 0, 64)).unwrap();
    *backend.readiness.lock().unwrap() = Some(Readiness::Failed("image nope: not found".into()));
    let started = Instant::now();
    let Err(err) = manager.claim_runner(2, Duration::ZERO).await else {
        panic!("a claim on an environment whose image failed was served");
    };
    assert!(matches!(err, Error::EnvironmentUnavailable(_)), "{err:?}");
    assert!(err.to_string().contains("image nope: not found"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "not after claim_wait"
    );
    // Environment 1's idle runners are still handed out: they exist.
    assert!(manager.claim_runner(1, Duration::ZERO).await.is_ok());

    // Ready again (a retry succeeded): claims wait and are served as usual.
    *backend.readiness.lock().unwrap() = Some(Readiness::Preparing);
    manager.put_environment(environment(2, 0, 64)).unwrap();
    assert_eq!(
        backend.prepared.load(Ordering::Relaxed),
        3,
        "a re-PUT prepares again"
    );
    let claim = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.claim_runner(2, Duration::ZERO).await })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    *backend.readiness.lock().unwrap() = None;
    assert!(claim.await.unwrap().is_ok());
}
