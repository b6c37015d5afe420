//! Runners and executions survive a restart of trident; nothing is lost or leaked when it
//! crashes (`kill -9`) at any point.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{b64, environment, exec, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

fn keeping() -> Options {
    Options {
        keep_runners_on_exit: true,
        ..Options::default()
    }
}

async fn stats(server: &Server, env: u64) -> Value {
    let all: Value = server
        .get("/statistics/execution-environments")
        .await
        .json()
        .await
        .unwrap();
    all[env.to_string()].clone()
}

/// Waits until the pool holds exactly `idle` idle runners, then checks that the host holds
/// exactly the runners the server knows of: cgroups, directories, runner-init processes (one
/// each, pid 1 of its own pid namespace), and no mount of theirs in the host's mount table.
async fn assert_settled(server: &Server, envs: &[(u64, u64, u64)]) {
    for &(env, idle, used) in envs {
        server.wait_idle(env, idle).await;
        assert_eq!(stats(server, env).await["usedRunners"], used, "env {env}");
    }
    let runners: u64 = envs.iter().map(|(_, i, u)| i + u).sum();
    server.assert_runners_on_host(runners as usize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_runners_keep_their_files_across_a_crash() {
    let mut server = Server::start_with(keeping());
    server.put_environment(1, 2, 256).await;
    let runner = server.claim(1, 300).await;
    server
        .copy(&runner, &[("before.txt", "written before the crash")])
        .await;
    assert_settled(&server, &[(1, 2, 1)]).await;

    server.crash_and_restart();
    assert_settled(&server, &[(1, 2, 1)]).await;
    let run = server.execute(&runner, exec("cat before.txt")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "written before the crash");
    server.copy(&runner, &[("after.txt", "and after")]).await;
    let files = server.list(&runner, "").await;
    assert_eq!(files.len(), 2, "{files:?}");

    // A graceful stop keeps them too, by default.
    server.restart();
    assert_settled(&server, &[(1, 2, 1)]).await;
    assert_eq!(
        server
            .execute(&runner, exec("cat after.txt"))
            .await
            .stdout(),
        "and after"
    );

    // And with --destroy-runners-on-exit nothing is left.
    server.set_keep_runners_on_exit(false);
    server.restart();
    server.stop();
    assert_eq!(server.runner_cgroups().len(), 0);
    assert_eq!(server.runner_dirs(), 0);
    assert_eq!(server.runner_init_processes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_timers_restart_in_full_after_a_crash() {
    let mut server = Server::start_with(keeping());
    server.put_environment(2, 0, 256).await;
    let runner = server.claim(2, 3).await;
    server.crash_and_restart();
    // Immediately after the restart the runner is there...
    assert_eq!(server.list(&runner, "").await, Vec::<Value>::new());
    // ...and it still times out when left alone (statistics are no activity).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if stats(&server, 2).await["usedRunners"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the inactivity timeout never fired after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        server
            .get(&format!("/runners/{runner}/files"))
            .await
            .status(),
        410
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_running_at_the_crash_are_killed_and_the_runner_stays_usable() {
    let mut server = Server::start_with(keeping());
    server.put_environment(3, 1, 256).await;
    let runner = server.claim(3, 0).await;
    let url = server
        .websocket_url(&runner, exec("echo started; exec sleep 987.25"))
        .await;
    let mut ws = server.connect(&url).await;
    // Wait until the command really runs.
    loop {
        use futures_util::StreamExt;
        let message = ws.next().await.expect("message").expect("frame");
        if message.to_text().unwrap_or_default().contains("started") {
            break;
        }
    }
    // "started" comes from bash a moment before its exec makes it the sleep.
    common::eventually(Duration::from_secs(10), "the sleep runs", || async {
        common::host_processes("987.25") == 1
    })
    .await;
    server.crash_and_restart();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::host_processes("987.25") != 0 {
        assert!(
            Instant::now() < deadline,
            "the execution survived the crash of its server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = server.execute(&runner, exec("echo -n still here")).await;
    assert_eq!(run.stdout(), "still here");
    assert_settled(&server, &[(3, 1, 1)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_during_refill_copy_and_put_leave_consistent_state() {
    let mut server = Server::start_with(keeping());

    // During a pool refill: ten creations in flight when the server dies.
    server.put_environment(4, 10, 128).await;
    server.crash_and_restart();
    assert_settled(&server, &[(4, 10, 0)]).await;

    // During a file copy of 8 MiB.
    let runner = server.claim(4, 0).await;
    let big = "x".repeat(8 << 20);
    let patch = server
        .request(Method::PATCH, &format!("/runners/{runner}/files"))
        .json(&json!({"copy": [{"path": "big.txt", "content": b64(&big)}]}))
        .send();
    let patch = tokio::spawn(patch);
    tokio::task::yield_now().await;
    server.crash_and_restart();
    let _ = patch.await;
    // The copy happened or not, but the runner works and its file is whole if present.
    let run = server
        .execute(&runner, exec("test ! -e big.txt || wc -c < big.txt"))
        .await;
    let out = run.stdout();
    assert!(
        out.is_empty() || out.trim() == (8 << 20).to_string(),
        "{out:?}"
    );
    assert_settled(&server, &[(4, 10, 1)]).await;

    // During environment PUTs: whatever was acknowledged exists after the crash.
    let mut acknowledged = Vec::new();
    let puts: Vec<_> = (10..20)
        .map(|id| {
            let request = server
                .request(Method::PUT, &format!("/execution-environments/{id}"))
                .json(&environment(id, 0, 128))
                .send();
            tokio::spawn(async move { (id, request.await) })
        })
        .collect();
    let first = puts.into_iter().collect::<Vec<_>>();
    let mut handles = first.into_iter();
    // Let a few complete, then crash with the rest in flight.
    for handle in handles.by_ref().take(3) {
        let (id, response) = handle.await.unwrap();
        if response.map(|r| r.status().is_success()).unwrap_or(false) {
            acknowledged.push(id);
        }
    }
    server.kill();
    for handle in handles {
        let (id, response) = handle.await.unwrap();
        if response.map(|r| r.status().is_success()).unwrap_or(false) {
            acknowledged.push(id);
        }
    }
    server.restart();
    assert!(acknowledged.len() >= 3);
    for id in acknowledged {
        let r = server.get(&format!("/execution-environments/{id}")).await;
        assert_eq!(r.status(), 200, "acknowledged environment {id} was lost");
    }
}

/// A tiny deterministic generator (xorshift), so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_interleaved_with_crashes_keep_state_consistent() {
    let seed = 0x7121_d3a7_u64;
    let mut rng = Rng(seed);
    let mut server = Server::start_with(keeping());
    // The model: environment id -> pool size; runner id -> (environment, file content).
    let mut envs: BTreeMap<u64, u64> = BTreeMap::new();
    let mut runners: BTreeMap<String, (u64, String)> = BTreeMap::new();

    for step in 0..100 {
        match rng.next(10) {
            0 | 1 => {
                let id = 100 + rng.next(3);
                let pool = rng.next(3);
                server.put_environment(id, pool as u32, 128).await;
                envs.insert(id, pool);
            }
            2 => {
                let id = 100 + rng.next(3);
                let r = server
                    .send(
                        Method::DELETE,
                        &format!("/execution-environments/{id}"),
                        Value::Null,
                    )
                    .await;
                if envs.remove(&id).is_some() {
                    assert_eq!(r.status(), 204, "step {step}");
                    runners.retain(|_, (env, _)| *env != id);
                } else {
                    assert_eq!(r.status(), 404, "step {step}");
                }
            }
            3 | 4 => {
                if let Some(&id) = envs.keys().nth(rng.next(envs.len().max(1) as u64) as usize) {
                    let runner = server.claim(id, 0).await;
                    let content = format!("step {step}");
                    server.copy(&runner, &[("state.txt", &content)]).await;
                    runners.insert(runner, (id, content));
                }
            }
            5 => {
                if let Some(runner) = runners
                    .keys()
                    .nth(rng.next(runners.len().max(1) as u64) as usize)
                    .cloned()
                {
                    let r = server
                        .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
                        .await;
                    assert_eq!(r.status(), 204, "step {step}");
                    runners.remove(&runner);
                }
            }
            6 | 7 => {
                if let Some((runner, (_, content))) = runners
                    .iter()
                    .nth(rng.next(runners.len().max(1) as u64) as usize)
                {
                    let run = server.execute(runner, exec("cat state.txt")).await;
                    assert_eq!(&run.stdout(), content, "step {step}: runner {runner}");
                }
            }
            _ => {
                server.crash_and_restart();
            }
        }
    }
    server.crash_and_restart();

    // Everything the model holds is there, and nothing else.
    let listed: Value = server
        .get("/execution-environments")
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<u64> = listed["executionEnvironments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        envs.keys().copied().collect::<Vec<_>>(),
        "seed {seed:#x}"
    );
    for (runner, (_, content)) in &runners {
        let run = server.execute(runner, exec("cat state.txt")).await;
        assert_eq!(&run.stdout(), content, "runner {runner}");
    }
    let expected: Vec<(u64, u64, u64)> = envs
        .iter()
        .map(|(&id, &pool)| {
            (
                id,
                pool,
                runners.values().filter(|(e, _)| *e == id).count() as u64,
            )
        })
        .collect();
    assert_settled(&server, &expected).await;

    server.set_keep_runners_on_exit(false);
    server.restart();
    server.stop();
    assert_eq!(server.runner_cgroups().len(), 0);
    assert_eq!(server.runner_dirs(), 0);
    assert_eq!(server.runner_init_processes(), 0);
}
