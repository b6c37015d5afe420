//! Test harness: starts the real `trident` binary on a free port with its own data dir, and
//! talks to it with real HTTP and WebSocket clients.
#![allow(dead_code)]

pub mod gitlab;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub struct Server {
    child: Option<Child>,
    pub address: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub token: Option<String>,
    pub http: reqwest::Client,
    config: Option<PathBuf>,
    keep_runners_on_exit: bool,
    /// Whether the last started process keeps its runners when it stops.
    started_keeping: bool,
    prelude: Option<String>,
}

#[derive(Default)]
pub struct Options {
    pub token: Option<String>,
    pub config_yaml: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Leave runners running on SIGTERM (the product's default); tests default to
    /// `--destroy-runners-on-exit` so that no runner outlives its test.
    pub keep_runners_on_exit: bool,
    /// Shell commands the server's own process runs before it becomes trident (`exec`), e.g.
    /// to join a cgroup as a service manager would put it there, or to enter namespaces.
    pub prelude: Option<String>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Server {
        let (tmp, data_dir) = match options.data_dir {
            Some(dir) => (None, dir),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("trident-test")
                    .tempdir()
                    .unwrap();
                let dir = tmp.path().join("data");
                (Some(tmp), dir)
            }
        };
        std::fs::create_dir_all(&data_dir).unwrap();
        let config = options.config_yaml.map(|yaml| {
            let path = data_dir.with_extension("yaml");
            std::fs::write(&path, yaml).unwrap();
            // Private, as trident demands of a config holding secrets.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            path
        });
        let mut server = Server {
            child: None,
            address: String::new(),
            data_dir,
            _tmp: tmp,
            token: options.token,
            http: reqwest::Client::new(),
            config,
            keep_runners_on_exit: options.keep_runners_on_exit,
            started_keeping: false,
            prelude: options.prelude,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = match &self.prelude {
            // The shell execs trident: the server keeps the shell's pid.
            Some(prelude) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(format!("{prelude}\nexec \"$@\""))
                    .arg("sh")
                    .arg(env!("CARGO_BIN_EXE_trident"));
                cmd
            }
            None => Command::new(env!("CARGO_BIN_EXE_trident")),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env_remove("TRIDENT_TOKEN")
            .env_remove("TRIDENT_CONFIG")
            .env("TRIDENT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = &self.token {
            cmd.arg("--token").arg(token);
        }
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        if !self.keep_runners_on_exit {
            cmd.arg("--destroy-runners-on-exit");
        }
        self.started_keeping = self.keep_runners_on_exit;
        let mut child = cmd.spawn().expect("start trident");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split('/').next().unwrap().to_string();
                        let _ = tx.send(Ok(addr));
                        sent = true;
                    }
                }
                eprintln!("[trident] {line}");
            }
            if !sent {
                let _ = tx.send(Err("trident exited before listening".to_string()));
            }
        });
        self.address = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("trident did not start in time")
            .expect("trident failed to start");
        self.child = Some(child);
    }

    /// Stops the server with SIGTERM and waits for it (it destroys its runners unless
    /// `keep_runners_on_exit`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Kills the server with SIGKILL: nothing is cleaned up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Kills the server with SIGKILL and starts a new one on the same data dir.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Chooses what SIGTERM does to runners, from the next start of the server on. (Tests
    /// that keep runners set it back before they end, so that the final stop cleans up.)
    pub fn set_keep_runners_on_exit(&mut self, keep: bool) {
        self.keep_runners_on_exit = keep;
    }

    /// Processes of this server's runners outside their executions: runner-inits and their
    /// handlers (0 means no runner of this data dir lives).
    pub fn runner_init_processes(&self) -> usize {
        self.runner_processes().len()
    }

    /// The host pids of this server's runner-init processes (each pid 1 of its runner's pid
    /// namespace, one pid namespace below the test's), without their handlers (each pid 1 of
    /// a pid namespace below that: a used runner keeps a spare one).
    pub fn runner_init_pids(&self) -> Vec<u32> {
        let depth = pid_namespace_depth("self") + 1;
        self.runner_processes()
            .into_iter()
            .filter(|pid| pid_namespace_depth(&pid.to_string()) == depth)
            .collect()
    }

    /// The host pids of this server's runner-inits and their handlers: the processes whose
    /// command line is runner-init's.
    pub fn runner_processes(&self) -> Vec<u32> {
        let marker = format!(
            "runner-init\u{0}{}",
            self.data_dir.canonicalize().unwrap().display()
        );
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|entry| {
                std::fs::read(entry.path().join("cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&marker))
            })
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Host mounts that mention this server's data dir (runner mounts must all live in the
    /// runners' own mount namespaces).
    pub fn host_mounts(&self) -> usize {
        let dir = self.data_dir.canonicalize().unwrap().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&dir))
            .count()
    }

    /// Runner directories in the data dir.
    pub fn runner_dirs(&self) -> usize {
        std::fs::read_dir(self.data_dir.join("runners"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.address)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.header("Poseidon-Token", t),
            None => r,
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> reqwest::Response {
        self.request(method, path).json(&body).send().await.unwrap()
    }

    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> reqwest::Response {
        self.request(method, path)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn put_environment(&self, id: u64, pool: u32, memory_mb: u32) {
        let response = self
            .send(
                reqwest::Method::PUT,
                &format!("/execution-environments/{id}"),
                environment(id, pool, memory_mb),
            )
            .await;
        assert!(
            response.status().is_success(),
            "PUT environment: {}",
            response.status()
        );
    }

    pub async fn claim(&self, env: u64, inactivity_timeout: u64) -> String {
        let response = self
            .send(
                reqwest::Method::POST,
                "/runners",
                json!({"executionEnvironmentId": env, "inactivityTimeout": inactivity_timeout}),
            )
            .await;
        assert_eq!(response.status(), 200, "claim");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["mappedPorts"], json!([]));
        body["runnerId"].as_str().unwrap().to_string()
    }

    pub async fn copy(&self, runner: &str, files: &[(&str, &str)]) {
        let copy: Vec<Value> = files
            .iter()
            .map(|(path, content)| json!({"path": path, "content": b64(content)}))
            .collect();
        let response = self
            .send(
                reqwest::Method::PATCH,
                &format!("/runners/{runner}/files"),
                json!({"copy": copy}),
            )
            .await;
        assert_eq!(response.status(), 204, "copy files");
    }

    pub async fn list(&self, runner: &str, query: &str) -> Vec<Value> {
        let response = self.get(&format!("/runners/{runner}/files?{query}")).await;
        assert_eq!(response.status(), 200, "list files");
        let body: Value = response.json().await.unwrap();
        body["files"].as_array().unwrap().clone()
    }

    /// Prepares and runs an execution; returns every message and the close code.
    pub async fn execute(&self, runner: &str, body: Value) -> Execution {
        self.execute_with_input(runner, body, &[]).await
    }

    pub async fn execute_with_input(&self, runner: &str, body: Value, input: &[&str]) -> Execution {
        let url = self.websocket_url(runner, body).await;
        let mut ws = self.connect(&url).await;
        for text in input {
            ws.send(Message::Text((*text).into())).await.unwrap();
        }
        collect(&mut ws).await
    }

    pub async fn websocket_url(&self, runner: &str, body: Value) -> String {
        let response = self
            .send(
                reqwest::Method::POST,
                &format!("/runners/{runner}/execute"),
                body,
            )
            .await;
        assert_eq!(response.status(), 200, "execute");
        let v: Value = response.json().await.unwrap();
        v["websocketUrl"].as_str().unwrap().to_string()
    }

    pub async fn connect(&self, url: &str) -> Ws {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        if let Some(t) = &self.token {
            request
                .headers_mut()
                .insert("Poseidon-Token", t.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connect")
            .0
    }

    /// Waits until the environment's pool reports `idle` idle runners.
    pub async fn wait_idle(&self, env: u64, idle: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stats: Value = self
                .get("/statistics/execution-environments")
                .await
                .json()
                .await
                .unwrap();
            if stats[env.to_string()]["idleRunners"].as_u64() == Some(idle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pool of {env} never reached {idle} idle: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn cgroup_parent(&self) -> String {
        let id = std::fs::read_to_string(self.data_dir.join("instance-id")).unwrap();
        format!("trident/{}", id.trim())
    }

    /// Runner cgroups of this server that exist right now.
    pub fn runner_cgroups(&self) -> Vec<String> {
        // In every hierarchy: a runner's cgroup half made or half removed counts too.
        let root = Path::new("/sys/fs/cgroup");
        let roots = if root.join("cgroup.controllers").exists() {
            vec![root.to_path_buf()]
        } else {
            ["memory", "cpu", "pids", "freezer"]
                .iter()
                .map(|c| root.join(c))
                .collect()
        };
        let mut names = std::collections::BTreeSet::new();
        for root in roots {
            if let Ok(entries) = std::fs::read_dir(root.join(self.cgroup_parent())) {
                names.extend(
                    entries
                        .flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
        }
        names.into_iter().collect()
    }
}

impl Server {
    /// Waits until the host holds exactly `runners` runners of this server (cgroups,
    /// directories, one runner-init process each) and none of their mounts.
    pub async fn assert_runners_on_host(&self, runners: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = (
                self.runner_cgroups().len(),
                self.runner_dirs(),
                self.runner_init_pids().len(),
            );
            if found == (runners, runners, runners) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "expected {runners} runners; found (cgroups, dirs, runner-inits) {found:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.host_mounts(), 0, "runner mounts leaked into the host");
        // An idle runner is its runner-init alone, pid 1 of a pid namespace of its own.
        for pid in self.runner_init_pids() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let nspid: Vec<&str> = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .unwrap()
                .split_whitespace()
                .collect();
            assert_eq!(nspid, [pid.to_string().as_str(), "1"], "{status}");
        }
    }
}

/// How many pid namespaces `pid` (a /proc name) is in: the entries of its `NSpid` (0 once
/// it is gone).
pub fn pid_namespace_depth(pid: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            Some(line.split_whitespace().count())
        })
        .unwrap_or(0)
}

/// Host processes whose command line contains `marker` (arguments are separated by NUL).
pub fn host_processes(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
        })
        .count()
}

impl Drop for Server {
    /// No runner outlives its test: a server that keeps its runners (or was killed) is
    /// followed by one that takes them over and destroys them.
    fn drop(&mut self) {
        if self.started_keeping {
            self.stop();
            self.keep_runners_on_exit = false;
            self.spawn();
        }
        self.stop();
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug)]
pub struct Execution {
    pub messages: Vec<Value>,
    pub close_code: Option<u16>,
}

impl Execution {
    pub fn stdout(&self) -> String {
        self.stream("stdout")
    }
    pub fn stderr(&self) -> String {
        self.stream("stderr")
    }
    fn stream(&self, kind: &str) -> String {
        self.messages
            .iter()
            .filter(|m| m["type"] == kind)
            .map(|m| m["data"].as_str().unwrap().to_string())
            .collect()
    }
    pub fn last(&self) -> &Value {
        self.messages.last().expect("messages")
    }
    /// Checks the protocol: `start` first, exactly one terminal message, last, then 1000.
    pub fn assert_well_formed(&self) {
        assert_eq!(
            self.messages.first(),
            Some(&json!({"type": "start"})),
            "{self:?}"
        );
        let terminals = self
            .messages
            .iter()
            .filter(|m| matches!(m["type"].as_str(), Some("exit" | "timeout" | "error")))
            .count();
        assert_eq!(terminals, 1, "{self:?}");
        assert!(matches!(
            self.last()["type"].as_str(),
            Some("exit" | "timeout" | "error")
        ));
        assert_eq!(self.close_code, Some(1000), "{self:?}");
        for m in &self.messages {
            let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
            match m["type"].as_str().unwrap() {
                "start" | "timeout" => assert_eq!(keys.len(), 1, "{m}"),
                _ => assert_eq!(keys.len(), 2, "{m}"),
            }
        }
    }
}

pub async fn collect(ws: &mut Ws) -> Execution {
    let mut messages = Vec::new();
    let mut close_code = None;
    let read = async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Text(text)) => messages.push(serde_json::from_str(&text).unwrap()),
                Ok(Message::Close(frame)) => {
                    close_code = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    };
    // A bound so that a hang fails the test instead of the CI run.
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("execution did not finish");
    Execution {
        messages,
        close_code,
    }
}

/// Status and `message` of an error answer; the body must be a JSON object with a non-empty
/// `message`.
pub async fn error_of(response: reqwest::Response, context: &str) -> (u16, String) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{context}: {status} with a non-JSON body {text:?}: {e}"));
    let message = body["message"].as_str().unwrap_or_default().to_string();
    assert!(
        !message.is_empty(),
        "{context}: {status} without a message: {text}"
    );
    (status, message)
}

/// Polls `check` until it holds, failing after `bound`.
pub async fn eventually<F, Fut>(bound: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads messages until a stdout chunk contains `marker` (the execution is then known to run).
pub async fn wait_for_stdout(ws: &mut Ws, marker: &str) {
    let wait = async {
        let mut seen = String::new();
        while let Some(message) = ws.next().await {
            if let Ok(Message::Text(text)) = message {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert!(
                    matches!(v["type"].as_str(), Some("start" | "stdout" | "stderr")),
                    "ended before printing {marker:?}: {v}"
                );
                if v["type"] == "stdout" {
                    seen.push_str(v["data"].as_str().unwrap());
                    if seen.contains(marker) {
                        return;
                    }
                }
            }
        }
        panic!("the socket closed before {marker:?} was printed");
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("the marker never came");
}

pub fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

pub fn environment(id: u64, pool: u32, memory_mb: u32) -> Value {
    json!({"id": id, "image": "host", "prewarmingPoolSize": pool, "cpuLimit": 20,
           "memoryLimit": memory_mb, "networkAccess": false, "exposedPorts": []})
}

pub fn exec(command: &str) -> Value {
    json!({"command": command})
}
