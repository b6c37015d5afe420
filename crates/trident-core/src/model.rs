//! The data model shared by every front door and backend.

use serde::{Deserialize, Serialize};

pub type EnvironmentId = u64;

/// The environment id of one-off runners (a CI job naming only an image): reserved, so no
/// client can create an environment with it.
pub const ONE_OFF_ENVIRONMENT: EnvironmentId = u64::MAX;

/// The largest duration in seconds a client may ask for (inactivity timeouts, time limits,
/// job timeouts): Go's MaxInt32, about 68 years. Anything above is refused with a 400, so that
/// no deadline computed from a client's number can overflow.
pub const MAX_DURATION_SECONDS: u64 = i32::MAX as u64;

/// A template for runners, with the fields of the Poseidon `ExecutionEnvironment` schema.
/// Not serialized here: the API and the store each have their own representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionEnvironment {
    pub id: EnvironmentId,
    pub image: String,
    pub prewarming_pool_size: u32,
    /// CPU limit of one runner in MHz.
    pub cpu_limit: u32,
    /// Memory limit of one runner in MB.
    pub memory_limit: u32,
    pub network_access: bool,
    pub exposed_ports: Vec<u16>,
}

impl ExecutionEnvironment {
    /// Whether runners made for `self` can serve `other` unchanged: everything but the pool
    /// size shapes the sandbox itself.
    pub fn same_runner_shape(&self, other: &ExecutionEnvironment) -> bool {
        self.image == other.image
            && self.cpu_limit == other.cpu_limit
            && self.memory_limit == other.memory_limit
            && self.network_access == other.network_access
            && self.exposed_ports == other.exposed_ports
    }
}

/// One entry of a file listing, as CodeOcean reads it. This and the other serializable types
/// below are Poseidon's own schema, the same on the API and on the runner's control socket. (`permissions`, `owner` and `group` are
/// not in the seed schema but the client needs them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileHeader {
    pub name: String,
    pub entry_type: String,
    pub size: u64,
    pub modification_time: i64,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub link_target: Option<String>,
}

/// One file to place in a runner, its content decoded (the API decodes a client's base64
/// once; a backend carries the bytes as they are).
#[derive(Clone)]
pub struct FileCopy {
    pub path: String,
    pub content: Vec<u8>,
}

impl std::fmt::Debug for FileCopy {
    /// The path and the size: a copy may carry megabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCopy")
            .field("path", &self.path)
            .field("bytes", &self.content.len())
            .finish()
    }
}

/// What to run, as a client asked for it.
#[derive(Debug, Clone, Default)]
pub struct ExecutionRequest {
    pub command: String,
    pub privileged: bool,
    pub environment: Vec<(String, String)>,
    /// Seconds; 0 = no limit.
    pub time_limit: u64,
}

impl ExecutionRequest {
    /// Bytes it holds while it waits for its WebSocket.
    pub fn size(&self) -> usize {
        self.command.len()
            + self
                .environment
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// An exposed port of a runner and where it is reachable from outside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MappedPort {
    pub exposed_port: u16,
    pub host_address: String,
}

/// Pool figures of one environment, as `/statistics/execution-environments` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatistics {
    pub id: EnvironmentId,
    pub prewarming_pool_size: u32,
    pub idle_runners: u32,
    pub used_runners: u32,
}
