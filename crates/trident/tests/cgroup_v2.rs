//! The native sandbox on a pure cgroup v2 host, checked from the host side: the files of each
//! runner's cgroup (cpu.max, memory.max, pids.max, memory.events, pids.events, cpu.stat), that
//! the limits bite, that a destroyed or swept runner leaves no cgroup, and that trident works
//! wherever a service manager or a container puts the server's own process.
//!
//! `.ci/vm-cgroup-v2` runs these in a guest booted with `cgroup_no_v1=all` (with
//! TRIDENT_REQUIRE_CGROUP_V2=1, so that they can never skip there). On a v1 or hybrid host they
//! skip with a message: the suites that run everywhere cover the rest.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{environment, eventually, exec, wait_for_stdout, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

const ROOT: &str = "/sys/fs/cgroup";

/// Whether this host is pure cgroup v2. Tests skip (return early) elsewhere, unless the
/// environment demands v2 (the VM step), where anything else is a failure.
fn on_v2(test: &str) -> bool {
    let v2 = Path::new(ROOT).join("cgroup.controllers").exists();
    if !v2 {
        assert!(
            std::env::var_os("TRIDENT_REQUIRE_CGROUP_V2").is_none(),
            "{test}: TRIDENT_REQUIRE_CGROUP_V2 is set but {ROOT} is not a cgroup2 hierarchy"
        );
        eprintln!(
            "skipped {test}: this host is not pure cgroup v2 (.ci/vm-cgroup-v2 runs it in a v2 guest)"
        );
    }
    v2
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.join(file).display()))
        .trim()
        .to_string()
}

/// The value of `key` in a flat-keyed file such as memory.events or cpu.stat.
fn keyed(dir: &Path, file: &str, key: &str) -> u64 {
    let text = read(dir, file);
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {}/{file}: {text}", dir.display()))
}

fn procs(dir: &Path) -> Vec<i32> {
    read(dir, "cgroup.procs")
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn words(dir: &Path, file: &str) -> BTreeSet<String> {
    read(dir, file)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn runner_dir(server: &Server, runner: &str) -> PathBuf {
    Path::new(ROOT).join(server.cgroup_parent()).join(runner)
}

fn alive(pid: i32) -> bool {
    // A zombie has left its cgroup already; only a process that can still run counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// A cgroup of the test's own, removed (with whatever is left in it) when dropped.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let dir = Path::new(ROOT).join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TestCgroup(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut walk = vec![self.0.clone()];
        while let Some(dir) = walk.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                walk.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.path()),
                );
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_is_a_pure_cgroup_v2_host() {
    if !on_v2("the_guest_is_a_pure_cgroup_v2_host") {
        return;
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let cgroup_mounts: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split(' ').nth(2).is_some_and(|t| t.starts_with("cgroup")))
        .collect();
    assert!(
        cgroup_mounts
            .iter()
            .all(|l| l.split(' ').nth(2) == Some("cgroup2")),
        "v1 hierarchies mounted: {cgroup_mounts:?}"
    );
    let root = Path::new(ROOT);
    let controllers = words(root, "cgroup.controllers");
    for c in ["cpu", "memory", "pids"] {
        assert!(controllers.contains(c), "{c} missing: {controllers:?}");
    }

    // A runner's cgroup is where trident says, with every controller trident needs enabled
    // down to it, and holds exactly the runner's two runner-init processes.
    let server = Server::start();
    server.put_environment(1, 1, 128).await;
    let runner = server.claim(1, 0).await;
    let dir = runner_dir(&server, &runner);
    let mut ancestor = root.to_path_buf();
    for part in server.cgroup_parent().split('/') {
        let enabled = words(&ancestor, "cgroup.subtree_control");
        for c in ["cpu", "memory", "pids"] {
            assert!(
                enabled.contains(c),
                "{c} not enabled in {}: {enabled:?}",
                ancestor.display()
            );
        }
        ancestor.push(part);
    }
    let runner_controllers = words(&dir, "cgroup.controllers");
    for c in ["cpu", "memory", "pids"] {
        assert!(
            runner_controllers.contains(c),
            "{c} not in the runner's cgroup: {runner_controllers:?}"
        );
    }
    assert_eq!(
        procs(&dir).len(),
        1,
        "the runner's processes (its runner-init)"
    );
    // The server stays where it was started (the test's own cgroup; in the VM the root).
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", server.pid())).unwrap();
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert_eq!(own, mine, "the server's cgroup");
    let run = server.execute(&runner, exec("cat /proc/self/cgroup")).await;
    run.assert_well_formed();
    assert_eq!(
        run.stdout().trim(),
        "0::/",
        "a runner sees its own cgroup as the root"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_written_to_the_runners_cgroup_and_applied() {
    if !on_v2("limits_are_written_to_the_runners_cgroup_and_applied") {
        return;
    }
    let server = Server::start_with(Options {
        config_yaml: Some(
            "cpu_mhz_per_core: 2400\npids_limit: 77\nmax_runner_processes: 5000\n".into(),
        ),
        ..Options::default()
    });
    // 1200 MHz of 2400 per core: half a core.
    let mut env = environment(1, 1, 96);
    env["cpuLimit"] = json!(1200);
    let r = server
        .send(Method::PUT, "/execution-environments/1", env)
        .await;
    assert!(r.status().is_success(), "{}", r.status());
    let runner = server.claim(1, 0).await;
    let dir = runner_dir(&server, &runner);

    assert_eq!(read(&dir, "cpu.max"), "50000 100000");
    assert_eq!(read(&dir, "memory.max"), (96u64 << 20).to_string());
    assert_eq!(read(&dir, "memory.swap.max"), "0");
    assert_eq!(read(&dir, "pids.max"), "77");
    let parent = Path::new(ROOT).join(server.cgroup_parent());
    assert_eq!(read(&parent, "pids.max"), "5000", "all runners together");

    // The runner sees the same limits at its own /sys/fs/cgroup.
    let run = server
        .execute(
            &runner,
            exec("cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max"),
        )
        .await;
    run.assert_well_formed();
    assert_eq!(
        run.stdout().split_whitespace().collect::<Vec<_>>(),
        ["50000", "100000", &(96u64 << 20).to_string(), "77"],
        "{run:?}"
    );

    // The quota bites: two busy loops for two seconds get about half a core between them.
    let usage_before = keyed(&dir, "cpu.stat", "usage_usec");
    let throttled_before = keyed(&dir, "cpu.stat", "nr_throttled");
    let started = Instant::now();
    let run = server
        .execute(
            &runner,
            json!({"command": "timeout 2 sh -c \"while :; do :; done\" & timeout 2 sh -c \"while :; do :; done\"; wait; echo -n done"}),
        )
        .await;
    let wall = started.elapsed().as_micros() as u64;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "done", "{run:?}");
    let used = keyed(&dir, "cpu.stat", "usage_usec") - usage_before;
    let throttled = keyed(&dir, "cpu.stat", "nr_throttled") - throttled_before;
    assert!(
        throttled > 0,
        "never throttled (used {used} us in {wall} us)"
    );
    assert!(
        used < wall * 8 / 10,
        "used {used} us of CPU in {wall} us: more than half a core"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_counted_in_memory_events_and_reported_as_137() {
    if !on_v2("an_oom_kill_is_counted_in_memory_events_and_reported_as_137") {
        return;
    }
    let server = Server::start();
    server.put_environment(1, 1, 64).await;
    let runner = server.claim(1, 0).await;
    let dir = runner_dir(&server, &runner);
    assert_eq!(keyed(&dir, "memory.events", "oom_kill"), 0);
    let inits = procs(&dir);

    // One process that wants three times the limit: the OOM killer takes it.
    let run = server
        .execute(
            &runner,
            exec("python3 -c \"b = bytearray(192 << 20); print(len(b))\""),
        )
        .await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "exit", "data": 137}), "{run:?}");
    assert!(
        keyed(&dir, "memory.events", "oom_kill") >= 1,
        "memory.events: {}",
        read(&dir, "memory.events")
    );
    assert!(
        keyed(&dir, "memory.events", "max") >= 1,
        "memory.events: {}",
        read(&dir, "memory.events")
    );

    // The runner lives on, with the same runner-init and nothing of the execution (its
    // handler leaves the cgroup a moment after the exit is reported; the spare handler
    // cloned for the next connection is the runner's own).
    let (d, i, s) = (dir.clone(), inits.clone(), &server);
    eventually(
        Duration::from_secs(10),
        "only the runner's own processes are left",
        || {
            let (d, i) = (d.clone(), i.clone());
            async move {
                let own = s.runner_processes();
                let now = procs(&d);
                i.iter().all(|pid| now.contains(pid))
                    && now.iter().all(|pid| own.contains(&(*pid as u32)))
            }
        },
    )
    .await;
    let run = server.execute(&runner, exec("echo -n alive")).await;
    assert_eq!(run.stdout(), "alive", "{run:?}");
    let kills = keyed(&dir, "memory.events", "oom_kill");
    // A pipeline whose tail holds all it reads: bash reports its death, the exit is 137.
    let run = server
        .execute(&runner, exec("head -c 80000000 /dev/zero | tail"))
        .await;
    run.assert_well_formed();
    assert_eq!(run.last(), &json!({"type": "exit", "data": 137}), "{run:?}");
    assert!(keyed(&dir, "memory.events", "oom_kill") > kills);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_pids_max_and_destroy_kills_it_all() {
    if !on_v2("a_fork_bomb_stops_at_pids_max_and_destroy_kills_it_all") {
        return;
    }
    let server = Server::start_with(Options {
        config_yaml: Some("pids_limit: 64\n".into()),
        ..Options::default()
    });
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let dir = runner_dir(&server, &runner);
    assert_eq!(read(&dir, "pids.max"), "64");
    assert_eq!(keyed(&dir, "pids.events", "max"), 0);

    let url = server
        .websocket_url(
            &runner,
            json!({"command": "echo bombing; :(){ :|:& };:; while :; do :; done"}),
        )
        .await;
    let mut ws = server.connect(&url).await;
    wait_for_stdout(&mut ws, "bombing").await;
    let d = dir.clone();
    eventually(Duration::from_secs(60), "the bomb reached pids.max", || {
        let d = d.clone();
        async move { keyed(&d, "pids.events", "max") > 0 }
    })
    .await;
    let current: u64 = read(&dir, "pids.current").parse().unwrap();
    assert!(current <= 64, "pids.current {current} above pids.max");
    assert!(current > 16, "the bomb spread to only {current} processes");

    // Destroyed mid-bomb: every process dies and the cgroup goes.
    let bombers = procs(&dir);
    let r = server
        .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    let d = dir.clone();
    eventually(Duration::from_secs(30), "the runner's cgroup went", || {
        let d = d.clone();
        async move { !d.exists() }
    })
    .await;
    let left: Vec<i32> = bombers.into_iter().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "processes of the destroyed runner: {left:?}"
    );
    let rest = common::collect(&mut ws).await;
    assert!(
        matches!(
            rest.messages.last().and_then(|m| m["type"].as_str()),
            Some("exit" | "error" | "timeout")
        ),
        "{rest:?}"
    );

    // The pool refills with a fresh runner, and the server never noticed.
    server.wait_idle(1, 1).await;
    server.assert_runners_on_host(1).await;
    let fresh = server.claim(1, 0).await;
    assert_eq!(
        server.execute(&fresh, exec("echo -n fresh")).await.stdout(),
        "fresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_after_a_kill_9_removes_stale_and_frozen_cgroups() {
    if !on_v2("the_sweep_after_a_kill_9_removes_stale_and_frozen_cgroups") {
        return;
    }
    let mut server = Server::start_with(Options {
        keep_runners_on_exit: true,
        ..Options::default()
    });
    server.put_environment(1, 1, 128).await;
    let used = server.claim(1, 0).await;
    server.wait_idle(1, 1).await;
    server.assert_runners_on_host(2).await;
    let before: BTreeSet<String> = server.runner_cgroups().into_iter().collect();
    server.kill();

    // Debris of the killed server: a runner cgroup nobody knows, frozen with a process in it
    // (a kill that only signals would never see it go), ...
    let parent = Path::new(ROOT).join(server.cgroup_parent());
    let stale = parent.join("1-00000000-dead-beef-0000-000000000000");
    std::fs::create_dir(&stale).unwrap();
    let mut squatter = std::process::Command::new("sleep")
        .arg("8032")
        .spawn()
        .unwrap();
    std::fs::write(stale.join("cgroup.procs"), squatter.id().to_string()).unwrap();
    std::fs::write(stale.join("cgroup.freeze"), "1").unwrap();
    eventually(Duration::from_secs(10), "the stale cgroup froze", || {
        let s = stale.clone();
        async move { keyed(&s, "cgroup.events", "frozen") == 1 }
    })
    .await;
    // ... while another trident instance's runners (another data dir) must be left alone.
    let other = TestCgroup::new("trident/other-instance-test");
    let other_runner = other.0.join("1-11111111-2222-3333-4444-555555555555");
    std::fs::create_dir(&other_runner).unwrap();
    let mut neighbour = std::process::Command::new("sleep")
        .arg("8033")
        .spawn()
        .unwrap();
    std::fs::write(
        other_runner.join("cgroup.procs"),
        neighbour.id().to_string(),
    )
    .unwrap();

    server.set_keep_runners_on_exit(false);
    server.restart();
    let (reaped_tx, reaped_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = reaped_tx.send(squatter.wait());
    });
    let status = reaped_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the frozen debris process survived the start")
        .unwrap();
    assert!(!status.success());
    let s = stale.clone();
    eventually(Duration::from_secs(10), "the stale cgroup went", || {
        let s = s.clone();
        async move { !s.exists() }
    })
    .await;
    // The killed server's runners were taken over; the claimed one is usable.
    server.assert_runners_on_host(2).await;
    let after: BTreeSet<String> = server.runner_cgroups().into_iter().collect();
    assert_eq!(after, before);
    assert_eq!(
        server.execute(&used, exec("echo -n mine")).await.stdout(),
        "mine"
    );
    assert!(
        neighbour.try_wait().unwrap().is_none() && other_runner.exists(),
        "another instance's runner was swept"
    );
    let _ = neighbour.kill();
    let _ = neighbour.wait();

    // Destroying all runners leaves nothing: neither their cgroups nor the instance's parent.
    server.stop();
    assert_eq!(server.runner_cgroups(), Vec::<String>::new());
    assert!(!parent.exists(), "{} is left", parent.display());
    assert_eq!(server.runner_init_processes(), 0);
}

/// The server as a service manager starts it: in a cgroup of its own (systemd's
/// `system.slice/trident.service`, with `Delegate=yes` the controllers are enabled for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_in_a_cgroup_of_its_own_puts_runners_under_trident() {
    if !on_v2("a_server_in_a_cgroup_of_its_own_puts_runners_under_trident") {
        return;
    }
    let slice = TestCgroup::new("trident-test.slice");
    std::fs::write(slice.0.join("cgroup.subtree_control"), "+cpu +memory +pids").unwrap();
    let service = slice.0.join("trident.service");
    std::fs::create_dir(&service).unwrap();
    let mut server = Server::start_with(Options {
        prelude: Some(format!("echo $$ > {}/cgroup.procs", service.display())),
        ..Options::default()
    });
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", server.pid())).unwrap();
    let service_path = format!("0::/{}", service.strip_prefix(ROOT).unwrap().display());
    assert_eq!(own.trim(), service_path, "the server stays in its service");

    server.put_environment(1, 2, 128).await;
    let runner = server.claim(1, 0).await;
    server.wait_idle(1, 2).await;
    server.assert_runners_on_host(3).await;
    let dir = runner_dir(&server, &runner);
    assert_eq!(read(&dir, "memory.max"), (128u64 << 20).to_string());
    let run = server
        .execute(&runner, exec("echo -n out; echo -n err >&2; exit 3"))
        .await;
    run.assert_well_formed();
    assert_eq!((run.stdout(), run.stderr()), ("out".into(), "err".into()));
    assert_eq!(run.last(), &json!({"type": "exit", "data": 3}));
    // Stopping the service kills what is in its cgroup (KillMode=mixed): only the server.
    assert_eq!(
        procs(&service),
        vec![server.pid() as i32],
        "the service's cgroup"
    );

    server.stop();
    assert_eq!(server.runner_cgroups(), Vec::<String>::new());
    assert_eq!(server.runner_init_processes(), 0);
}

/// The server as a container runtime starts it (Docker on a v2 host): at the root of a cgroup
/// namespace, which is a cgroup like any other. A cgroup that holds processes cannot give
/// controllers to its children ("no internal processes"), so the server moves itself into a
/// leaf before it enables them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_the_root_of_its_cgroup_namespace_moves_itself_to_a_leaf() {
    if !on_v2("a_server_at_the_root_of_its_cgroup_namespace_moves_itself_to_a_leaf") {
        return;
    }
    let container = TestCgroup::new("trident-test-container");
    let mut server = Server::start_with(Options {
        prelude: Some(format!(
            "echo $$ > {}/cgroup.procs\n\
             exec unshare --cgroup --mount --propagation private sh -c \
             'umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"' sh \"$@\"",
            container.0.display()
        )),
        ..Options::default()
    });
    // Seen from the host: the server sits in a leaf of the container's cgroup, and the
    // runners under trident/ of the container's cgroup.
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", server.pid())).unwrap();
    let container_path = container
        .0
        .strip_prefix(ROOT)
        .unwrap()
        .display()
        .to_string();
    let own_dir = own.trim().strip_prefix("0::/").unwrap().to_string();
    assert!(
        own_dir.starts_with(&format!("{container_path}/")),
        "the server's cgroup: {own}"
    );
    assert_eq!(
        procs(&container.0),
        Vec::<i32>::new(),
        "processes left in the container's root"
    );

    server.put_environment(1, 1, 128).await;
    let runner = server.claim(1, 0).await;
    let dir = container.0.join(server.cgroup_parent()).join(&runner);
    assert_eq!(read(&dir, "memory.max"), (128u64 << 20).to_string());
    assert_eq!(procs(&dir).len(), 1);
    let run = server.execute(&runner, exec("echo -n inside")).await;
    run.assert_well_formed();
    assert_eq!(run.stdout(), "inside");
    let r = server
        .send(Method::DELETE, &format!("/runners/{runner}"), Value::Null)
        .await;
    assert_eq!(r.status(), 204);
    let d = dir.clone();
    eventually(
        Duration::from_secs(30),
        "the destroyed runner's cgroup went",
        || {
            let d = d.clone();
            async move { !d.exists() }
        },
    )
    .await;

    server.stop();
    let parent = container.0.join(server.cgroup_parent());
    assert!(!parent.exists(), "{} is left", parent.display());
    assert_eq!(server.runner_init_processes(), 0);
}

/// Runtimes size themselves by the runner, read from its cgroup v2 view: the JVM (the host's
/// OpenJDK, visible to `host` runners) finds cgroup v2, the memory limit and the CPU quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jvm_reads_the_runners_limits_from_its_cgroup_v2_view() {
    if !on_v2("the_jvm_reads_the_runners_limits_from_its_cgroup_v2_view") {
        return;
    }
    if !Path::new("/usr/bin/java").exists() {
        assert!(
            std::env::var_os("TRIDENT_REQUIRE_CGROUP_V2").is_none(),
            "no /usr/bin/java (openjdk-17-jre-headless), which this test needs"
        );
        eprintln!("skipped: no /usr/bin/java");
        return;
    }
    let server = Server::start();
    // cpuLimit 20 MHz: the floor of a quarter core.
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let run = server
        .execute(
            &runner,
            json!({"command": "java -XX:+PrintFlagsFinal -XshowSettings:system -version 2>&1 | grep -E \"MaxHeapSize|Provider|Memory Limit|CPU Quota\"", "timeLimit": 110}),
        )
        .await;
    run.assert_well_formed();
    let out = run.stdout();
    assert!(out.contains("Provider: cgroupv2"), "{run:?}");
    assert!(out.contains("Memory Limit: 256.00M"), "{run:?}");
    assert!(out.contains("CPU Quota: 25000us"), "{run:?}");
    let heap: u64 = out
        .split_whitespace()
        .skip_while(|w| *w != "MaxHeapSize")
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MaxHeapSize: {run:?}"));
    assert!(
        heap <= 256 << 20,
        "the JVM sized its heap from the host: {heap}"
    );
}

/// Beside other processes at the root of its cgroup namespace (an init such as `tini` in a
/// container), the server cannot give runners controllers: it refuses to start, naming them
/// and saying what to do, instead of failing on a bare EBUSY.
#[test]
fn a_server_beside_other_processes_at_a_namespace_root_says_what_to_do() {
    if !on_v2("a_server_beside_other_processes_at_a_namespace_root_says_what_to_do") {
        return;
    }
    let container = TestCgroup::new("trident-test-crowded");
    let data = tempfile::tempdir().unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs\n\
         sleep 8034 > /dev/null 2>&1 &\n\
         echo \"neighbour $!\" >&2\n\
         exec unshare --cgroup --mount --propagation private sh -c \
         'umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"' \
         sh \"$0\" serve --listen 127.0.0.1:0 --data-dir \"$1\" --destroy-runners-on-exit",
        container.0.display()
    );
    let output = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_trident"))
        .arg(data.path().join("data"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "trident started: {stderr}");
    let neighbour = stderr
        .lines()
        .find_map(|l| l.strip_prefix("neighbour "))
        .unwrap_or_else(|| panic!("{stderr}"))
        .trim()
        .to_string();
    assert!(
        stderr.contains("no internal processes") && stderr.contains(&neighbour),
        "{stderr}"
    );
    assert!(stderr.contains("leaf cgroup"), "{stderr}");
}
