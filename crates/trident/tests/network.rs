//! Network access: runners of environments with `networkAccess: true` reach the outside
//! world through NAT and nothing else; exposed ports are mapped to host ports.
//!
//! "The outside world" here is a test host in a network namespace this test makes itself
//! (198.18.x.1, with an HTTP server and a DNS server). Every address probed exists on this
//! machine, so no packet can leave it even if a rule were wrong.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Options, Server};
use serde_json::{json, Value};

/// A network namespace with a veth link to the host and some addresses.
struct TestHost {
    name: String,
    servers: Vec<Child>,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

impl TestHost {
    /// `host_side` and `inside` are /24 addresses of the link; `extra` are more addresses
    /// inside, routed from the host.
    fn new(tag: &str, host_side: &str, inside: &str, extra: &[&str]) -> TestHost {
        let name = format!("tt{tag}{}", std::process::id() % 100_000);
        let veth = format!("tt{tag}{}", std::process::id() % 100_000);
        // A namespace left by an earlier run that died.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{host_side}/24"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{inside}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", host_side]);
        for address in extra {
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                "lo",
            ]);
            ip(&["route", "add", &format!("{address}/32"), "via", inside]);
        }
        TestHost {
            name,
            servers: Vec::new(),
        }
    }

    fn spawn(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

async fn run(server: &Server, runner: &str, command: &str) -> String {
    let run = server
        .execute(runner, json!({"command": command, "timeLimit": 20}))
        .await;
    run.assert_well_formed();
    if !run.stderr().is_empty() {
        eprintln!("{command}: stderr: {}", run.stderr());
    }
    run.stdout()
}

/// Python one-liner that prints `open` or `blocked` for a TCP connection attempt.
fn probe(address: &str, port: u16) -> String {
    format!(
        "python3 -c \"import socket; s=socket.socket(); s.settimeout(2)\ntry:\n  s.connect(('{address}', {port})); print('open')\nexcept Exception as e: print('blocked')\""
    )
    .replace('\'', "\\\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networked_runners_reach_the_internet_and_nothing_else() {
    let x = 100 + std::process::id() % 100;
    let internet = format!("198.18.{x}.1");
    // Services of the host itself: on loopback and on all addresses.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();

    let server = Server::start_with(Options {
        config_yaml: Some(format!(
            "network:\n  subnet: 10.231.0.0\n  dns: [{internet}]\n  advertise_address: 127.0.0.2\n  host_ports: 31000-31999\n"
        )),
        ..Options::default()
    });
    let mut env = common::environment(1, 2, 256);
    env["networkAccess"] = json!(true);
    env["exposedPorts"] = json!([8080]);
    let r = server
        .send(reqwest::Method::PUT, "/execution-environments/1", env)
        .await;
    assert_eq!(r.status(), 201);
    server.put_environment(2, 1, 256).await; // no network access
                                             // The test hosts appear after trident prepared the host: networks that exist then are
                                             // the host's own, and blocked.
    server.wait_idle(1, 2).await;
    let mut world = TestHost::new("w", &format!("198.18.{x}.254"), &internet, &[]);
    world.spawn(&["python3", "-m", "http.server", "80", "--bind", &internet]);
    world.spawn(&[
        "dnsmasq",
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &format!("--listen-address={internet}"),
        &format!("--address=/internet.test/{internet}"),
    ]);
    // Private and link-local targets that also exist only on this machine.
    let mut private = TestHost::new(
        "p",
        &format!("10.99.{x}.254"),
        &format!("10.99.{x}.1"),
        &["169.254.169.254"],
    );
    private.spawn(&["python3", "-m", "http.server", "80", "--bind", "0.0.0.0"]);

    wait_for_dns(&internet).await;

    // Wait for the servers in the test hosts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect((internet.as_str(), 80)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the test internet host did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (a, mapped_a) = claim_networked(&server).await;
    assert!(mapped_a.starts_with("127.0.0.2:31"), "{mapped_a}");
    let (b, mapped_b) = claim_networked(&server).await;
    assert_ne!(mapped_a, mapped_b);
    let offline = server.claim(2, 0).await;

    // Out to the internet, by name (DNS) and by address.
    let out = run(
        &server,
        &a,
        "python3 -c \"import urllib.request; print(urllib.request.urlopen(\\\"http://internet.test/\\\", timeout=5).status)\"",
    )
    .await;
    assert_eq!(out.trim(), "200", "{out}");
    assert_eq!(run(&server, &a, &probe(&internet, 80)).await.trim(), "open");

    // Nothing else: private ranges, cloud metadata, the host, other runners.
    for (address, port) in [
        (format!("10.99.{x}.1"), 80),
        ("169.254.169.254".to_string(), 80),
        ("10.231.0.1".to_string(), host_port),
        (primary_ipv4(), host_port),
        ("127.0.0.1".to_string(), host_port),
    ] {
        let out = run(&server, &a, &probe(&address, port)).await;
        assert_eq!(out.trim(), "blocked", "{address}:{port}");
    }
    let b_address = run(
        &server,
        &b,
        "ip -4 -o addr show eth0 | tr -s \" \" | cut -d\" \" -f4 | cut -d/ -f1",
    )
    .await;
    let b_address = b_address.trim().to_string();
    assert!(b_address.starts_with("10.231."), "{b_address}");
    let url = server
        .websocket_url(
            &b,
            json!({"command": "exec python3 -m http.server 8080", "timeLimit": 30}),
        )
        .await;
    let mut serving_b = server.connect(&url).await;
    wait_open(&mapped_b).await;
    assert_eq!(
        run(&server, &a, &probe(&b_address, 8080)).await.trim(),
        "blocked"
    );

    // Without network access: not even the internet.
    assert_eq!(
        run(&server, &offline, &probe(&internet, 80)).await.trim(),
        "blocked"
    );

    // Exposed ports: the runner's port 8080 on the mapped host port, gone with the runner.
    let response = reqwest::get(format!("http://{mapped_b}/")).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(serving_b.close(None).await);
    let r = server
        .send(
            reqwest::Method::DELETE,
            &format!("/runners/{b}"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status(), 204);
    assert!(
        std::net::TcpStream::connect_timeout(&mapped_b.parse().unwrap(), Duration::from_secs(2))
            .is_err(),
        "the port mapping outlived its runner"
    );
    drop(host_service);

    // A stop that destroys the runners gives back what this instance added to the host:
    // its bridge and its resolvers in the shared firewall set (keyed by its bridge, so that
    // no other instance's runners could use them anyway).
    let instance = std::fs::read_to_string(server.data_dir.join("instance-id")).unwrap();
    let bridge = format!("tr-{}", &instance.trim()[..12]);
    let dns_set = || {
        let out = std::process::Command::new("nft")
            .args(["list", "set", "inet", "trident", "dns"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        dns_set().contains(&format!("\"{bridge}\" . {internet}")),
        "{}",
        dns_set()
    );
    let mut server = server;
    server.stop();
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists(),
        "the bridge {bridge} outlived its instance"
    );
    assert!(!dns_set().contains(&bridge), "{}", dns_set());
}

/// Claims a runner of environment 1 and returns it with the host address of its port 8080.
async fn claim_networked(server: &Server) -> (String, String) {
    let claim = server
        .send(
            reqwest::Method::POST,
            "/runners",
            json!({"executionEnvironmentId": 1}),
        )
        .await;
    assert_eq!(claim.status(), 200);
    let claim: Value = claim.json().await.unwrap();
    let mapped = claim["mappedPorts"].as_array().unwrap();
    assert_eq!(mapped.len(), 1, "{claim}");
    assert_eq!(mapped[0]["exposedPort"], 8080);
    (
        claim["runnerId"].as_str().unwrap().to_string(),
        mapped[0]["hostAddress"].as_str().unwrap().to_string(),
    )
}

/// Waits until the test host's DNS server answers a query for internet.test.
async fn wait_for_dns(server: &str) {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // A query for internet.test, type A.
    let query: Vec<u8> = [
        &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0][..],
        b"\x08internet\x04test\x00",
        &[0, 1, 0, 1],
    ]
    .concat();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answer = [0u8; 512];
    loop {
        socket.send_to(&query, (server, 53)).unwrap();
        if socket.recv(&mut answer).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the test DNS server never answered"
        );
    }
}

async fn wait_open(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "{address} never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host's address on its default route.
fn primary_ipv4() -> String {
    let output = Command::new("ip")
        .args(["-o", "-4", "route", "get", "192.0.2.255"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "src").expect("a src address");
    words.next().unwrap().to_string()
}
