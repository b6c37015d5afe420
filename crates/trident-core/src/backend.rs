//! The seam between the core and an execution engine (the native sandbox today, Docker
//! Engine hosts later). The core never touches processes, files or namespaces itself.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::model::{ExecutionEnvironment, FileCopy, FileHeader, MappedPort};

pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// What went wrong in an engine, one taxonomy from a runner's file operations through the
/// control protocol (it is serialized there) to the core, which maps it to [`crate::Error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum BackendError {
    /// The path cannot be listed or read inside the runner.
    #[error("{0}")]
    FileUnavailable(String),
    /// The request is not possible as asked (e.g. a listing too large to return).
    #[error("{0}")]
    Invalid(String),
    /// Some entries of a copy could not be written; every other entry was.
    #[error("{0}")]
    CopyFailed(String),
    /// The sandbox itself is gone or broken.
    #[error("{0}")]
    Failed(String),
}

/// Whether runners of an environment can be made now: an engine may first have to get what
/// they need (an image to pull). The core makes no runner before `Ready`, lets claims wait
/// while `Preparing`, and answers claims at once with the reason while `Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Preparing,
    /// Why runners cannot be had; the engine keeps retrying on its own (with backoff).
    Failed(String),
}

/// What the engine needs to know to make one runner.
#[derive(Debug, Clone)]
pub struct RunnerSpec {
    pub runner_id: String,
    pub environment: ExecutionEnvironment,
}

/// How an execution ended, as the engine saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Exit code; a death by signal n is 128 + n.
    Exited(u8),
    /// The runner itself (the engine's processes serving this execution) died of memory.
    /// A process of the execution killed for memory is an ordinary `Exited(137)`.
    OomKilled,
    /// The engine lost the execution.
    Failed(String),
}

pub type ExitFuture = Pin<Box<dyn Future<Output = ExitOutcome> + Send>>;

/// A piece of an execution's output, from one of its two streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
}

/// The output of an execution, in order within each stream (engines such as Docker's exec
/// attach deliver exactly this: one stream of tagged chunks).
pub type OutputStream = Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Output>> + Send>>;

/// What can be done to a running execution from outside.
#[async_trait]
pub trait ExecutionControl: Send + Sync {
    /// Kills the whole process tree of the execution; the runner stays usable. Asynchronous
    /// and fallible: for a remote engine it is a call into the runner.
    async fn kill(&self) -> BackendResult<()>;
}

/// A started execution: its standard input, its output, its end, and control over it.
///
/// `output` ends once every process of the execution is gone, so a reader that drains it
/// before reporting `exit` never loses output.
pub struct BackendExecution {
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    pub output: OutputStream,
    pub exit: ExitFuture,
    pub control: Box<dyn ExecutionControl>,
}

/// What a client needs to know about a spec'd execution.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub command: String,
    pub privileged: bool,
    /// Complete environment additions (CODEOCEAN=true and the client's map).
    pub environment: Vec<(String, String)>,
}

/// A file opened inside a runner, ready to stream out.
pub struct FileDownload {
    pub size: u64,
    pub content: Box<dyn AsyncRead + Send + Unpin>,
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Checks that runners can be made for this environment (e.g. that its image is known),
    /// with a message a client can act on.
    fn validate(&self, environment: &ExecutionEnvironment) -> std::result::Result<(), String>;

    /// Starts getting what runners of this environment need (e.g. pulls its image in the
    /// background), retrying at once what failed before. Never waits. Called when a client
    /// creates or replaces the environment.
    fn prepare(&self, _environment: &ExecutionEnvironment) {}

    /// Whether runners of this environment can be made now. Cheap: the core asks it
    /// whenever it would make a runner, and every few hundred ms while not `Ready`. An
    /// engine that must first prepare starts doing so when first asked.
    fn readiness(&self, _environment: &ExecutionEnvironment) -> Readiness {
        Readiness::Ready
    }

    /// Makes a ready runner: its processes are started and it accepts work.
    async fn create_runner(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>>;

    /// Takes over a runner made by an earlier life of this server, after checking that it is
    /// alive and is the runner it claims to be.
    async fn adopt(&self, spec: RunnerSpec) -> BackendResult<Box<dyn Sandbox>>;

    /// Removes every runner of this server (processes, cgroups, files) not named in `keep`:
    /// what a crash left behind between making a runner and recording it, or the reverse.
    async fn sweep(&self, keep: &[String]) -> BackendResult<()>;
}

/// One runner inside an engine.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn mapped_ports(&self) -> Vec<MappedPort> {
        Vec::new()
    }

    /// How many bytes of files the runner can hold, if the engine knows.
    fn writable_bytes(&self) -> Option<u64> {
        None
    }

    async fn execute(&self, spec: ExecSpec) -> BackendResult<BackendExecution>;

    async fn list_files(
        &self,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> BackendResult<Vec<FileHeader>>;

    /// Deletes (recursively, errors ignored), then copies, in that order.
    async fn patch_files(&self, delete: Vec<String>, copy: Vec<FileCopy>) -> BackendResult<()>;

    async fn open_file(&self, path: &str, privileged: bool) -> BackendResult<FileDownload>;

    /// Writes one file, as a copy would (root-owned, 0744, parents made), from a stream of
    /// any length: nothing of it is held in memory. Returns the bytes written.
    async fn write_file(
        &self,
        path: &str,
        content: Box<dyn AsyncRead + Send + Unpin>,
    ) -> BackendResult<u64>;

    /// Kills every process of the runner and frees everything it held. Idempotent; an error
    /// says what could not be freed (the caller logs it; nothing is retried).
    async fn destroy(&self) -> BackendResult<()>;
}
