//! The attack battery: each case asserts that the attack fails inside the runner and that
//! the host, the server and other runners are unaffected.

mod common;

use common::{exec, Execution, Server};
use serde_json::{json, Value};

async fn privileged(server: &Server, runner: &str, command: &str) -> Execution {
    let run = server
        .execute(
            runner,
            json!({"command": command, "privilegedExecution": true, "timeLimit": 30}),
        )
        .await;
    run.assert_well_formed();
    run
}

async fn unprivileged(server: &Server, runner: &str, command: &str) -> Execution {
    let run = server
        .execute(runner, json!({"command": command, "timeLimit": 30}))
        .await;
    run.assert_well_formed();
    run
}

fn exit_code(run: &Execution) -> i64 {
    assert_eq!(run.last()["type"], "exit", "{run:?}");
    run.last()["data"].as_i64().unwrap()
}

/// Calls a raw syscall from python (the host image has /usr/bin/python3) and prints errno.
fn syscall(nr: i64, args: &str) -> String {
    format!(
        "/usr/bin/python3 -c \"import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); r=l.syscall({nr}{args}); print(r, ctypes.get_errno())\""
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_interfaces_are_out_of_reach() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;

    // Mounting, new namespaces, device nodes: refused even to root in the runner.
    let run = privileged(&server, &runner, "mount -t tmpfs none /mnt").await;
    assert_ne!(exit_code(&run), 0, "{run:?}");
    let run = privileged(&server, &runner, "mknod /tmp/disk b 254 0").await;
    assert_ne!(exit_code(&run), 0, "{run:?}");
    for command in [
        "unshare -U true",
        "unshare -r true",
        "unshare -m true",
        "unshare -n true",
    ] {
        let run = privileged(&server, &runner, command).await;
        assert_ne!(exit_code(&run), 0, "{command}: {run:?}");
        let run = unprivileged(&server, &runner, command).await;
        assert_ne!(exit_code(&run), 0, "{command}: {run:?}");
    }

    // Syscalls the filter denies answer EPERM (1) or, for clone3, ENOSYS (38).
    let cases = [
        ("keyctl", 250, ", 0, 0, 0, 0, 0", "1"),
        ("bpf", 321, ", 0, 0, 0", "1"),
        ("perf_event_open", 298, ", 0, 0, 0, 0, 0", "1"),
        ("userfaultfd", 323, ", 0", "1"),
        ("io_uring_setup", 425, ", 8, 0", "1"),
        ("kexec_load", 246, ", 0, 0, 0, 0", "1"),
        ("init_module", 175, ", 0, 0, 0", "1"),
        ("clock_settime", 227, ", 0, 0", "1"),
        ("open_by_handle_at", 304, ", 0, 0, 0", "1"),
        ("setns", 308, ", 0, 0", "1"),
        ("clone3", 435, ", 0, 0", "38"),
    ];
    for (name, nr, args, errno) in cases {
        let run = privileged(&server, &runner, &syscall(nr, args)).await;
        assert_eq!(
            run.stdout().trim(),
            format!("-1 {errno}"),
            "{name}: {run:?}"
        );
    }
    // clone with a namespace flag is refused; a plain fork still works.
    let run = privileged(
        &server,
        &runner,
        &syscall(56, ", 0x10000000|17, 0, 0, 0, 0"),
    )
    .await;
    assert_eq!(run.stdout().trim(), "-1 1", "clone(CLONE_NEWUSER): {run:?}");
    assert_eq!(
        exit_code(&privileged(&server, &runner, "(true) && true").await),
        0
    );

    // Sockets: an allow-list of address families. vsock (not separated by network
    // namespaces), AF_ALG (the kernel's crypto API), packet, key and Bluetooth sockets,
    // and netlink beyond NETLINK_ROUTE get EPERM from the filter, for root and user alike.
    let probe = "/usr/bin/python3 -c \"import socket\nfor f, t, p in [(40, 1, 0), (38, 5, 0), (17, 3, 0), (15, 3, 2), (31, 1, 0), (16, 3, 9), (16, 3, 15), (1, 1, 0), (2, 1, 0), (10, 2, 0), (16, 3, 0)]:\n  try:\n    socket.socket(f, t, p).close(); print(f, p, 0)\n  except OSError as e: print(f, p, e.errno)\n\"";
    let expected =
        "40 0 1\n38 0 1\n17 0 1\n15 2 1\n31 0 1\n16 9 1\n16 15 1\n1 0 0\n2 0 0\n10 0 0\n16 0 0";
    for run in [
        privileged(&server, &runner, probe).await,
        unprivileged(&server, &runner, probe).await,
    ] {
        assert_eq!(
            run.stdout().replace("\r\n", "\n").trim(),
            expected,
            "{run:?}"
        );
    }
    // socketpair: local sockets only.
    let run = privileged(
        &server,
        &runner,
        "/usr/bin/python3 -c \"import socket\ntry:\n  socket.socketpair(40)\nexcept OSError as e: print(e.errno)\nsocket.socketpair(); print(0)\"",
    )
    .await;
    assert_eq!(run.stdout().replace("\r\n", "\n").trim(), "1\n0", "{run:?}");
    // The x32 ABI as a whole (x32-only numbers too); Linux AIO is not there (its contexts
    // come from a host-wide table).
    for (name, nr, args, errno) in [
        ("x32 getpid", 0x4000_0000 | 39, "", "1"),
        ("x32-only 528", 0x4000_0000 | 528, ", 0, 0, 0", "1"),
        ("x32-only 540", 0x4000_0000 | 540, ", 0, 0, 0", "1"),
        ("io_setup", 206, ", 1, 0", "38"),
    ] {
        let run = privileged(&server, &runner, &syscall(nr, args)).await;
        assert_eq!(
            run.stdout().trim(),
            format!("-1 {errno}"),
            "{name}: {run:?}"
        );
    }

    // Capabilities: none for the user, no admin-grade ones for root, no new privileges.
    let run = unprivileged(
        &server,
        &runner,
        "grep -E \"^(CapEff|CapBnd|NoNewPrivs)\" /proc/self/status",
    )
    .await;
    let status = run.stdout();
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let run = privileged(&server, &runner, "grep ^CapEff /proc/self/status").await;
    let eff = u64::from_str_radix(run.stdout().trim().rsplit('\t').next().unwrap(), 16).unwrap();
    for (name, bit) in [
        ("SYS_ADMIN", 21),
        ("SYS_PTRACE", 19),
        ("SYS_MODULE", 16),
        ("MKNOD", 27),
        ("DAC_READ_SEARCH", 2),
        ("NET_ADMIN", 12),
        ("SYS_RAWIO", 17),
    ] {
        assert_eq!(eff & (1 << bit), 0, "root in a runner has CAP_{name}");
    }
    assert_ne!(eff & 1, 0, "root keeps CAP_CHOWN");
    // Root's bounding set is exactly the kept set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL,
    // SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, SETFCAP); every execution runs
    // under exactly two seccomp filters: the runner's, loaded once by runner-init (pid 1
    // here) before it served anything, and the execution's own.
    let run = privileged(
        &server,
        &runner,
        "grep -E \"^(CapBnd|Seccomp_filters)\" /proc/self/status",
    )
    .await;
    let status = run.stdout();
    assert!(status.contains("CapBnd:\t00000000800405fb"), "{status}");
    assert!(status.contains("Seccomp_filters:\t2"), "{status}");
    let run = unprivileged(&server, &runner, "grep ^Seccomp_filters /proc/self/status").await;
    assert!(run.stdout().contains("Seccomp_filters:\t2"), "{run:?}");
    let run = unprivileged(&server, &runner, "grep -E \"^Seccomp\" /proc/1/status").await;
    let status = run.stdout();
    assert!(
        status.contains("Seccomp:\t2"),
        "runner-init is not filtered: {run:?}"
    );
    assert!(status.contains("Seccomp_filters:\t1"), "{run:?}");

    // runner-init and its handlers cannot be inspected or ptraced from inside.
    let run = privileged(&server, &runner, "cat /proc/1/environ").await;
    assert_ne!(exit_code(&run), 0, "{run:?}");
    let run = privileged(&server, &runner, "head -c 16 /proc/1/mem").await;
    assert_ne!(exit_code(&run), 0, "{run:?}");

    // Kernel knobs are read-only, host kernel details masked, /sys holds nothing but the
    // runner's own cgroup.
    let run = privileged(&server, &runner, "echo 1 > /proc/sys/vm/drop_caches").await;
    assert!(run.stderr().contains("Read-only file system"), "{run:?}");
    let run = privileged(&server, &runner, "echo c > /proc/sysrq-trigger").await;
    assert_ne!(exit_code(&run), 0, "{run:?}");
    let run = privileged(
        &server,
        &runner,
        "for f in /proc/kcore /proc/keys /proc/timer_list /proc/kallsyms; do [ -e $f ] && cat $f | wc -c; done; ls /sys | grep -vx fs | wc -l; ls /sys/fs | grep -vx cgroup | wc -l",
    )
    .await;
    let sizes: Vec<String> = run.stdout().split_whitespace().map(String::from).collect();
    assert!(sizes.len() >= 2, "{run:?}");
    assert!(
        sizes.iter().all(|s| s == "0"),
        "host kernel details leak: {run:?}"
    );
    // The masked /proc directories are empty, and they and /sys (read-only binds of
    // directories the runner cannot otherwise reach) take no new file.
    let run = privileged(
        &server,
        &runner,
        "ls -A /proc/driver /proc/fs 2>/dev/null | grep -v :$ | grep -c .; for d in /dev /sys /sys/fs /sys/fs/cgroup /proc/driver /proc/fs; do [ -d $d ] && touch $d/planted 2>/dev/null && echo wrote $d; done; echo end",
    )
    .await;
    assert_eq!(
        run.stdout().replace("\r\n", "\n").trim(),
        "0\nend",
        "{run:?}"
    );
    // What /dev offers works for `user`: POSIX shared memory, a pty pair of the runner's own
    // devpts, the devices.
    let run = unprivileged(
        &server,
        &runner,
        "/usr/bin/python3 -c \"import os, pty\nfrom multiprocessing import shared_memory\nm = shared_memory.SharedMemory(create=True, size=4096); m.close(); m.unlink()\nmaster, slave = pty.openpty(); print(os.ttyname(slave))\nprint(len(open(\\\"/dev/urandom\\\", \\\"rb\\\").read(8)), open(\\\"/dev/null\\\", \\\"w\\\").write(\\\"x\\\"))\"",
    )
    .await;
    assert_eq!(exit_code(&run), 0, "{run:?}");
    let out = run.stdout().replace("\r\n", "\n");
    assert!(out.starts_with("/dev/pts/"), "{run:?}");
    assert!(out.trim_end().ends_with("8 1"), "{run:?}");

    // A read-only root; writable workspace, tmp and writable layer.
    let run = privileged(&server, &runner, "touch /newfile").await;
    assert!(run.stderr().contains("Read-only file system"), "{run:?}");
    let run = privileged(
        &server,
        &runner,
        "touch /workspace/a /tmp/b /root/c && echo ok",
    )
    .await;
    assert_eq!(run.stdout().trim(), "ok", "{run:?}");
    // /usr is idmapped: its files are root's in the runner, so root there may change them,
    // in the runner's writable layer only (the host's are never touched). /etc and /opt
    // are not idmapped, so that the host's root-only files there (TLS keys, credentials)
    // stay out of reach: their files belong to host ids outside the runner's range, and
    // even root in the runner can neither add to /etc nor list /etc/ssl/private.
    let run = privileged(
        &server,
        &runner,
        "touch /usr/local/c && echo wrote; touch /etc/c; ls /etc/ssl/private",
    )
    .await;
    assert_eq!(run.stdout().trim(), "wrote", "{run:?}");
    assert!(run.stderr().contains("/etc/c"), "{run:?}");
    if std::path::Path::new("/etc/ssl/private").is_dir() {
        assert!(run.stderr().contains("/etc/ssl/private"), "{run:?}");
    }
    for host in ["/usr/local/c", "/etc/c"] {
        assert!(!std::path::Path::new(host).exists(), "{host} on the host");
    }

    // Root in the runner is an unprivileged id on the host, in a range of its own.
    let run = privileged(
        &server,
        &runner,
        "cat /proc/self/uid_map /proc/self/gid_map",
    )
    .await;
    let maps: Vec<u64> = run
        .stdout()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(maps.len(), 6, "{run:?}");
    assert_eq!((maps[0], maps[2]), (0, 65536), "{run:?}");
    assert!(
        maps[1] >= 100_000,
        "root in the runner is host id {}",
        maps[1]
    );

    // Limits cannot be raised from inside.
    let run = unprivileged(&server, &runner, "ulimit -n 100000").await;
    assert_ne!(exit_code(&run), 0, "{run:?}");
    let run = privileged(&server, &runner, "ulimit -Hn 100000").await;
    assert_ne!(exit_code(&run), 0, "{run:?}");

    // System V shared memory is limited per runner.
    let run = privileged(
        &server,
        &runner,
        "cat /proc/sys/kernel/shmmni /proc/sys/kernel/shmmax",
    )
    .await;
    assert_eq!(
        run.stdout().split_whitespace().collect::<Vec<_>>(),
        ["64", "67108864"]
    );
    let run = unprivileged(
        &server,
        &runner,
        &format!(
            "/usr/bin/python3 -c \"import ctypes; l=ctypes.CDLL(None,use_errno=True); print(l.shmget(0, {}, 0o1600), ctypes.get_errno())\"",
            1u64 << 30
        ),
    )
    .await;
    assert_eq!(run.stdout().trim(), "-1 22", "a 1 GiB segment: {run:?}");

    // The server and the runner are fine after all of it.
    let run = server.execute(&runner, exec("echo -n fine")).await;
    assert_eq!(run.stdout(), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_see_neither_the_host_nor_each_other() {
    let server = Server::start();
    server.put_environment(2, 2, 256).await;
    let a = server.claim(2, 0).await;
    let b = server.claim(2, 0).await;

    // A service on the host's loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let run = privileged(&server, &a, &format!("echo hi > /dev/tcp/127.0.0.1/{port}")).await;
    assert_ne!(exit_code(&run), 0, "reached the host's loopback: {run:?}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "a runner connected to the host");

    // Only loopback inside, and it works.
    let run = privileged(
        &server,
        &a,
        "ls /sys/class/net 2>/dev/null; cat /proc/net/dev | tail -n +3 | cut -d: -f1",
    )
    .await;
    assert_eq!(
        run.stdout().split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{run:?}"
    );

    // Runner b listens on its loopback; runner a cannot reach it.
    let url = server
        .websocket_url(&b, json!({"command": "exec python3 -m http.server 8000 --bind 127.0.0.1", "timeLimit": 20}))
        .await;
    let mut serving = server.connect(&url).await;
    let run = unprivileged(
        &server,
        &a,
        "sleep 1; echo > /dev/tcp/127.0.0.1/8000 && echo reached",
    )
    .await;
    assert!(!run.stdout().contains("reached"), "{run:?}");
    drop(serving.close(None).await);

    // Processes: the host's and the other runner's are invisible, signals cannot reach them.
    let host_pid = std::process::id();
    let run = privileged(
        &server,
        &a,
        &format!("kill -0 {host_pid} && echo visible; ls /proc | grep -c ^[0-9]"),
    )
    .await;
    assert!(!run.stdout().contains("visible"), "{run:?}");
    let visible: u32 = run.stdout().lines().last().unwrap().trim().parse().unwrap();
    assert!(visible < 10, "a runner sees {visible} processes");
    let run = privileged(&server, &b, "cat /etc/hostname; id -un").await;
    assert_eq!(run.stdout(), "runner\r\nroot\r\n");

    // Each runner has an id range of its own on the host.
    let map_a = privileged(&server, &a, "cat /proc/self/uid_map")
        .await
        .stdout();
    let map_b = privileged(&server, &b, "cat /proc/self/uid_map")
        .await
        .stdout();
    assert_ne!(map_a, map_b);
    // The host sees a runner's processes under that range, never as root.
    let host_id: u32 = map_a.split_whitespace().nth(1).unwrap().parse().unwrap();
    let url = server
        .websocket_url(
            &a,
            json!({"command": "echo up; exec sleep 31.5", "timeLimit": 20}),
        )
        .await;
    let mut sleeping = server.connect(&url).await;
    loop {
        use futures_util::StreamExt;
        let message = sleeping.next().await.unwrap().unwrap();
        if message.to_text().unwrap_or_default().contains("up") {
            break;
        }
    }
    // (Polled: a process in the middle of execve shows an empty command line for a moment.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let uids = loop {
        let uids: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains("sleep\u{0}31.5"))
                    .unwrap_or(false)
            })
            .filter_map(|e| {
                let status = std::fs::read_to_string(e.path().join("status")).ok()?;
                let line = status.lines().find(|l| l.starts_with("Uid:"))?;
                line.split_whitespace().nth(1)?.parse().ok()
            })
            .collect();
        if !uids.is_empty() || std::time::Instant::now() > deadline {
            break uids;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        uids,
        vec![host_id + 1000],
        "the runner's `user` on the host"
    );
    drop(sleeping);

    // Host secrets stay hidden even from root in a runner.
    let run = privileged(
        &server,
        &a,
        "cat /etc/shadow; ls /etc/ssh 2>/dev/null | grep -c ssh_host_ || true",
    )
    .await;
    assert!(run.stdout().starts_with("root:*:"), "{run:?}");
    assert!(!run.stdout().contains("$"), "a password hash: {run:?}");
    for path in ["/root/.cargo", "/work", "/home"] {
        let run = privileged(&server, &a, &format!("ls -A {path} 2>/dev/null | wc -l")).await;
        assert_eq!(run.stdout().trim(), "0", "{path} is visible: {run:?}");
    }
    let _: Value = server
        .get("/statistics/execution-environments")
        .await
        .json()
        .await
        .unwrap();
}

async fn assert_healthy(server: &Server, runner: &str) {
    assert_eq!(server.get("/health").await.status(), 204);
    let run = server.execute(runner, exec("echo -n alive")).await;
    assert_eq!(run.stdout(), "alive", "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_floods_and_escapes_are_contained() {
    let server = Server::start();
    server.put_environment(3, 1, 128).await;
    let runner = server.claim(3, 0).await;

    // Fork bomb: the pids limit holds it, the time limit ends it, the runner survives.
    let run = server
        .execute(&runner, json!({"command": ":(){ :|:& };:", "timeLimit": 3}))
        .await;
    run.assert_well_formed();
    assert_healthy(&server, &runner).await;

    // Memory bomb: the cgroup kills it and it is reported as the reference does.
    let run = server
        .execute(
            &runner,
            json!({"command": "/usr/bin/python3 -c \"a=[]\nwhile True: a.append(bytearray(1<<20))\"", "timeLimit": 30}),
        )
        .await;
    run.assert_well_formed();
    let last = run.last().clone();
    assert!(
        last == json!({"type": "error", "data": "the allocation was OOM Killed"})
            || last == json!({"type": "exit", "data": 137}),
        "{run:?}"
    );
    assert_healthy(&server, &runner).await;

    // Disk fill of /workspace and /tmp: the runner's tmpfs and memory limit stop it, the
    // host's disk is never written; removing the file makes room again.
    for dir in ["/workspace", "/tmp"] {
        let run = server
            .execute(
                &runner,
                json!({"command": format!("head -c 2000000000 /dev/zero > {dir}/fill; echo status $?"), "timeLimit": 30}),
            )
            .await;
        run.assert_well_formed();
        assert!(!run.stdout().contains("status 0"), "{dir}: {run:?}");
        let run = server
            .execute(
                &runner,
                exec(&format!("rm -f {dir}/fill && echo -n removed")),
            )
            .await;
        assert_eq!(run.stdout(), "removed", "{run:?}");
    }
    assert_healthy(&server, &runner).await;

    // Escaping the time limit: daemons, double forks and nohup die with the execution.
    let run = server
        .execute(
            &runner,
            json!({"command": "setsid sleep 1001 & (sleep 1002 &) ; nohup sleep 1003 >/dev/null 2>&1 & disown; sleep 1004", "timeLimit": 2}),
        )
        .await;
    assert_eq!(run.last(), &json!({"type": "timeout"}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while [
        "sleep\u{0}1001",
        "sleep\u{0}1002",
        "sleep\u{0}1003",
        "sleep\u{0}1004",
    ]
    .iter()
    .any(|m| common::host_processes(m) > 0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a process outlived its time limit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Limits cannot be changed from inside: no cgroup files to write.
    let run = server
        .execute(
            &runner,
            json!({"command": "ls /sys/fs/cgroup 2>&1; echo 9999999999 > /sys/fs/cgroup/memory/memory.limit_in_bytes", "privilegedExecution": true}),
        )
        .await;
    assert_ne!(run.last(), &json!({"type": "exit", "data": 0}), "{run:?}");

    // Gigabytes of output: the server's memory stays flat (backpressure), the time limit
    // ends the flood, and the client got a well-formed stream.
    let rss_before = server.rss_kib();
    let run = server
        .execute(
            &runner,
            json!({"command": "head -c 3000000000 /dev/zero | tr \"\\0\" x", "timeLimit": 3}),
        )
        .await;
    run.assert_well_formed();
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 100 * 1024,
        "server memory grew from {rss_before} to {rss_after} KiB"
    );

    // A client that never reads: the execution is still ended by its time limit and the
    // server keeps answering everyone else.
    let url = server
        .websocket_url(&runner, json!({"command": "yes flood", "timeLimit": 2}))
        .await;
    let stalled = server.connect(&url).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while common::host_processes("yes\u{0}flood") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the time limit did not hold"
        );
        assert_eq!(server.get("/health").await.status(), 204);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(stalled);
    assert_healthy(&server, &runner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_api_never_reaches_host_files() {
    let server = Server::start();
    server.put_environment(4, 1, 256).await;
    let runner = server.claim(4, 0).await;
    let host_shadow = std::fs::read("/etc/shadow").unwrap();
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();

    // Executed code plants links to host paths (as root in the runner).
    let run = privileged(
        &server,
        &runner,
        "ln -s /etc/shadow shadow_link; ln -s / rootlink; ln -s /work hostwork; ln -s /proc/1/root p1root; ln /etc/passwd hardlink 2>/dev/null; mkdir -p d && ln -s ../../../../../../etc d/up; echo planted",
    )
    .await;
    assert!(run.stdout().contains("planted"), "{run:?}");

    // Download through the links: only ever the runner's own files.
    for (path, privileged_query) in [
        ("shadow_link", true),
        ("shadow_link", false),
        ("p1root/etc/shadow", true),
        ("d/up/shadow", true),
    ] {
        let r = server
            .get(&format!(
                "/runners/{runner}/files/raw?path={path}&privilegedExecution={privileged_query}"
            ))
            .await;
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        assert!(status == 200 || status == 424, "{path}: {status}");
        assert_ne!(
            body.as_ref(),
            host_shadow.as_slice(),
            "{path} served the host's /etc/shadow"
        );
        assert!(
            !String::from_utf8_lossy(&body).contains('$'),
            "{path}: a password hash"
        );
    }
    // `..` and absolute paths resolve inside the runner.
    let r = server
        .get(&format!(
            "/runners/{runner}/files/raw?path=../../../../etc/passwd"
        ))
        .await;
    assert_eq!(r.status(), 200);
    let passwd = r.text().await.unwrap();
    assert!(passwd.contains("user:x:1000:1000"), "{passwd}");
    let r = server
        .get(&format!("/runners/{runner}/files/raw?path=/etc/hostname"))
        .await;
    let hostname = r.text().await.unwrap();
    assert_eq!(hostname, "runner\n");
    assert_ne!(hostname, host_hostname);

    // Listing through the links shows the runner's tree, never the host's.
    let r = server
        .get(&format!(
            "/runners/{runner}/files?path=rootlink/&recursive=false"
        ))
        .await;
    assert_eq!(r.status(), 200);
    let listing: Value = r.json().await.unwrap();
    let names: Vec<&str> = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"rootlink/workspace"), "{names:?}");
    for host_only in [
        "rootlink/work",
        "rootlink/farm",
        "rootlink/boot",
        "rootlink/home/cloudsdk",
    ] {
        assert!(!names.contains(&host_only), "{host_only} listed: {names:?}");
    }
    let r = server
        .get(&format!("/runners/{runner}/files?path=hostwork/"))
        .await;
    assert_eq!(r.status(), 424, "the host's /work through a link");
    let files = server.list(&runner, "").await;
    let link = files.iter().find(|f| f["name"] == "./shadow_link").unwrap();
    assert_eq!(link["entryType"], "l");
    assert_eq!(link["linkTarget"], "/etc/shadow");

    // Copying onto a planted link replaces the link; the host file never changes.
    let r = server
        .send(
            reqwest::Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"copy": [{"path": "shadow_link", "content": common::b64("overwritten")},
                            {"path": "d/up/shadow", "content": common::b64("through a dir link")}]}),
        )
        .await;
    assert!(
        r.status().is_success() || r.status() == 500,
        "{}",
        r.status()
    );
    assert_eq!(
        std::fs::read("/etc/shadow").unwrap(),
        host_shadow,
        "the host's /etc/shadow changed"
    );
    let run = privileged(
        &server,
        &runner,
        "test -L shadow_link && echo link || cat shadow_link",
    )
    .await;
    assert_eq!(run.stdout().trim(), "overwritten");

    // Deleting through links removes the links, not their targets.
    let r = server
        .send(
            reqwest::Method::PATCH,
            &format!("/runners/{runner}/files"),
            json!({"delete": ["rootlink", "hostwork", "./*"]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert!(std::path::Path::new("/work").exists());
    let run = privileged(
        &server,
        &runner,
        "ls /etc/passwd /usr/bin/env > /dev/null && echo intact",
    )
    .await;
    assert_eq!(run.stdout().trim(), "intact");

    // The unprivileged file API cannot read root-only files; the privileged one can.
    privileged(
        &server,
        &runner,
        "echo secret > /workspace/root-only && chmod 600 /workspace/root-only",
    )
    .await;
    let r = server
        .get(&format!("/runners/{runner}/files/raw?path=root-only"))
        .await;
    assert_eq!(r.status(), 424);
    let r = server
        .get(&format!(
            "/runners/{runner}/files/raw?path=root-only&privilegedExecution=true"
        ))
        .await;
    assert_eq!(r.text().await.unwrap(), "secret\n");
    // A FIFO is refused, not waited on.
    privileged(&server, &runner, "mkfifo /workspace/pipe").await;
    let r = server
        .get(&format!(
            "/runners/{runner}/files/raw?path=pipe&privilegedExecution=true"
        ))
        .await;
    assert_eq!(r.status(), 424);
}

/// Python that opens inotify instances until the kernel refuses, prints how many, then holds
/// them for `hold` seconds.
fn inotify_hog(hold: u32) -> String {
    format!(
        "/usr/bin/python3 -c \"import ctypes,time\nl=ctypes.CDLL(None)\nn=0\nwhile n < 100000 and l.inotify_init1(0) >= 0: n += 1\nprint(n, flush=True)\ntime.sleep({hold})\""
    )
}

/// Host-wide tables: one runner exhausting its share of inotify instances leaves the other
/// runners and the host theirs (each runner's user namespace has an owner of its own); all
/// runners together may take at most three quarters of the host's processes; the file
/// table is lifted as systemd lifts it (files are charged to each runner's memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_wide_tables_are_shared_out_per_runner() {
    let server = Server::start();
    server.put_environment(1, 2, 256).await;
    let hog = server.claim(1, 0).await;
    let other = server.claim(1, 0).await;

    let url = server
        .websocket_url(&hog, json!({"command": inotify_hog(30), "timeLimit": 60}))
        .await;
    let mut ws = server.connect(&url).await;
    common::wait_for_stdout(&mut ws, "\n").await;
    // The other runner still has all of its own...
    let run = unprivileged(&server, &other, &inotify_hog(0)).await;
    let theirs: u32 = run.stdout().trim().parse().unwrap();
    assert!(
        theirs >= 100,
        "another runner was starved of inotify instances: {run:?}"
    );
    // ... and so has the host's root.
    let host = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg("import ctypes\nl=ctypes.CDLL(None)\nprint(sum(1 for _ in range(20) if l.inotify_init1(0) >= 0))")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&host.stdout).trim(),
        "20",
        "the host's root was starved"
    );
    drop(ws);

    // trident's cgroup parent bounds the processes of all runners together.
    let parent = server.cgroup_parent();
    let pids_max = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        format!("/sys/fs/cgroup/{parent}/pids.max")
    } else {
        format!("/sys/fs/cgroup/pids/{parent}/pids.max")
    };
    let limit: u64 = std::fs::read_to_string(&pids_max)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(limit <= pid_max * 3 / 4 && limit > 0, "{pids_max}: {limit}");
    let file_max: u64 = std::fs::read_to_string("/proc/sys/fs/file-max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        file_max,
        i64::MAX as u64,
        "fs.file-max is lifted as systemd lifts it"
    );
}

/// trident's own config (with its tokens) and data dir stay out of sight of `host` runners,
/// even when an operator keeps them under /etc or /opt; a config holding secrets that
/// every host user could read is refused at start, with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_secrets_are_out_of_reach() {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let base = std::path::PathBuf::from(format!("/etc/trident-test-{}", &unique[..8]));
    std::fs::create_dir_all(&base).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(base.clone());
    {
        // The server's parent leaves the config open without close-on-exec (as a careless
        // service wrapper might): runner-init keeps nothing of the server's but its stdio.
        let server = Server::start_with(common::Options {
            data_dir: Some(base.join("data")),
            config_yaml: Some("registration_token: very-secret-registration\n".into()),
            prelude: Some(format!("exec 7<'{}'", base.join("data.yaml").display())),
            ..common::Options::default()
        });
        server.put_environment(1, 1, 128).await;
        let runner = server.claim(1, 0).await;
        // The claim's refill done: a runner-init still building its root holds that root.
        server.wait_idle(1, 1).await;
        let server_fd = std::fs::read_link(format!("/proc/{}/fd/7", server.pid())).unwrap();
        assert!(server_fd.ends_with("data.yaml"), "{server_fd:?}");
        let pids = server.runner_init_pids();
        assert!(pids.len() >= 2, "runner-init processes: {pids:?}");
        for pid in pids {
            for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
            {
                let target = std::fs::read_link(entry.path()).unwrap_or_default();
                assert!(
                    !target.starts_with(&base) || target.ends_with("init.log"),
                    "runner-init {pid} holds the server's {target:?} as fd {:?}",
                    entry.file_name()
                );
                assert!(
                    !target.to_string_lossy().contains("pts") && !target.ends_with("ptmx"),
                    "runner-init {pid} holds a terminal: {target:?}"
                );
            }
        }
        let shown = base.display();
        let run = privileged(
            &server,
            &runner,
            &format!("ls {shown}; cat {shown}/data.yaml; ls {shown}/data; echo end"),
        )
        .await;
        assert!(!run.stdout().contains("very-secret"), "{run:?}");
        assert!(!run.stdout().contains("trident.db"), "{run:?}");
        assert!(run.stderr().contains("No such file"), "{run:?}");
        // The host's copy is untouched.
        assert!(std::fs::read_to_string(base.join("data.yaml"))
            .unwrap()
            .contains("very-secret"));
    }

    // A world-readable config with a token: refused, and the message says how to fix it.
    let config = base.join("open.yaml");
    std::fs::write(&config, "token: world-readable-secret\n").unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_trident"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(base.join("data2"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("chmod 600 {}", config.display())),
        "{stderr}"
    );
}

/// A runner sees its own cgroup (a cgroup namespace, read-only), so runtimes size themselves
/// by the runner's limits; and nothing of the host's paths, ids or data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_see_their_runner_and_no_host_paths() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let run = privileged(&server, &runner, "cat /proc/self/cgroup").await;
    for line in run.stdout().lines() {
        assert!(
            line.trim_end().ends_with(":/"),
            "a host cgroup path: {run:?}"
        );
    }
    let run = privileged(
        &server,
        &runner,
        "cat /proc/self/mountinfo /proc/self/mounts",
    )
    .await;
    let instance = std::fs::read_to_string(server.data_dir.join("instance-id")).unwrap();
    for secret in [
        server
            .data_dir
            .canonicalize()
            .unwrap()
            .display()
            .to_string(),
        "runners/".to_string(),
        instance.trim().to_string(),
        runner.clone(),
    ] {
        assert!(!run.stdout().contains(&secret), "{secret} in {run:?}");
    }
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let limit_file = if v2 {
        "/sys/fs/cgroup/memory.max"
    } else {
        "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    };
    let run = unprivileged(&server, &runner, &format!("cat {limit_file}")).await;
    assert_eq!(run.stdout().trim(), (256u64 << 20).to_string(), "{run:?}");
    let run = privileged(&server, &runner, &format!("echo 1073741824 > {limit_file}")).await;
    assert_ne!(
        exit_code(&run),
        0,
        "the cgroup view must be read-only: {run:?}"
    );

    // The JVM (the machine's OpenJDK, visible to `host` runners) sizes its heap by the
    // runner's memory, not the host's.
    let run = unprivileged(
        &server,
        &runner,
        "java -XX:+PrintFlagsFinal -version 2>/dev/null | grep -w MaxHeapSize; java -XshowSettings:system -version 2>&1 | grep -i \"memory limit\"",
    )
    .await;
    let out = run.stdout();
    let heap: u64 = out
        .split_whitespace()
        .skip_while(|w| *w != "=")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MaxHeapSize from java: {run:?}"));
    assert!(
        heap <= 256 << 20,
        "the JVM sized its heap from the host: {heap}"
    );
    assert!(out.contains("256.00M"), "{run:?}");
}

/// The files API writes as root: a symlink the learner (`user`) planted in a path never
/// redirects it. Where a directory is needed the link is replaced by one, as GNU tar does;
/// a deletion through it deletes nothing. Root's own links are followed, inside the runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_links_never_redirect_the_files_api() {
    let server = Server::start();
    server.put_environment(1, 1, 256).await;
    let runner = server.claim(1, 0).await;
    let run = unprivileged(
        &server,
        &runner,
        "ln -s /root link && ln -s /etc etclink && ln -s /etc dellink && mkdir sub && ln -s /root sub/deep && echo planted",
    )
    .await;
    assert_eq!(run.stdout().trim(), "planted", "{run:?}");
    privileged(&server, &runner, "ln -s /tmp rootlink").await;

    let files = format!("/runners/{runner}/files");
    let r = server
        .send(
            reqwest::Method::PATCH,
            &files,
            json!({"delete": ["dellink/hostname"], "copy": [
                {"path": "link/planted.txt", "content": common::b64("a")},
                {"path": "etclink/", "content": ""},
                {"path": "etclink/also.txt", "content": common::b64("b")},
                {"path": "sub/deep/x.txt", "content": common::b64("c")},
                {"path": "rootlink/followed.txt", "content": common::b64("d")},
            ]}),
        )
        .await;
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let run = privileged(
        &server,
        &runner,
        "ls /root/planted.txt /etc/also.txt /root/x.txt 2>&1; test -e /etc/hostname && echo hostname-kept; \
         test -d link -a ! -L link && cat link/planted.txt; test -d etclink && cat etclink/also.txt; \
         cat sub/deep/x.txt; cat /tmp/followed.txt",
    )
    .await;
    let out = run.stdout();
    assert_eq!(
        out.matches("No such file").count(),
        3,
        "a write went through a planted link: {run:?}"
    );
    assert!(
        out.contains("hostname-kept"),
        "a delete went through a planted link: {run:?}"
    );
    assert!(out.ends_with("abcd"), "{run:?}");
}
