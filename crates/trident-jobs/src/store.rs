//! What the CI side stores (implemented on SQLite by `trident-store`, which owns the shape of
//! the rows).

use crate::jobs::{Job, JobSpec, JobState};

pub use trident_core::store::{StoreError, StoreResult};

/// A registered runner agent: what GitLab calls a runner (trident's runners are sandboxes, so
/// here they are agents). Its token is never stored, only `token_hash`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RegisteredAgent {
    pub id: i64,
    pub token_hash: String,
    pub description: Option<String>,
    pub maintenance_note: Option<String>,
    /// What the agent said about itself (`info`: name, version, platform...), as it sent it.
    pub info: serde_json::Value,
    pub paused: bool,
    pub locked: bool,
    pub access_level: String,
    pub run_untagged: bool,
    pub tag_list: Vec<String>,
    pub maximum_timeout: Option<i64>,
}

/// Everything the CI side stores.
pub trait CiStore: AgentStore + JobStore {}
impl<T: AgentStore + JobStore> CiStore for T {}

/// Jobs: a spec that never changes once stored, and a state that does. Keeping them apart
/// means an update (a trace piece, a heartbeat) writes a small row, never the spec with its
/// files.
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job durably (its spec and first state) and returns its id.
    fn insert_job(&self, created_at: u64, spec: &JobSpec, state: &JobState) -> StoreResult<i64>;
    /// Stores a job's state. `durable`: on disk, even across a power cut, when this returns
    /// (a final state, an assignment); otherwise it survives a crash of the process only.
    fn save_state(&self, id: i64, state: &JobState, durable: bool) -> StoreResult<()>;
    fn load_jobs(&self) -> StoreResult<Vec<Job>>;
}

pub trait AgentStore: Send + Sync + 'static {
    /// Stores a newly registered agent and returns its id.
    fn insert_agent(&self, agent: &RegisteredAgent) -> StoreResult<i64>;
    fn agent_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<RegisteredAgent>>;
    fn update_agent(&self, agent: &RegisteredAgent) -> StoreResult<()>;
    fn delete_agent(&self, id: i64) -> StoreResult<()>;
}
