//! What the runner API stores (implemented on SQLite by `trident-store`).

use serde::{Deserialize, Serialize};

pub type StoreResult<T> = Result<T, String>;

/// A registered runner agent: what GitLab calls a runner (trident's runners are sandboxes, so
/// here they are agents). Its token is never stored, only `token_hash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RegisteredAgent {
    pub id: i64,
    pub token_hash: String,
    pub description: Option<String>,
    pub maintenance_note: Option<String>,
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

pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job and returns its id.
    fn insert_job(&self, job: &crate::jobs::Job) -> StoreResult<i64>;
    fn update_job(&self, job: &crate::jobs::Job) -> StoreResult<()>;
    fn load_jobs(&self) -> StoreResult<Vec<crate::jobs::Job>>;
}

pub trait AgentStore: Send + Sync + 'static {
    /// Stores a new runner and returns its id.
    fn insert_agent(&self, runner: &RegisteredAgent) -> StoreResult<i64>;
    fn agent_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<RegisteredAgent>>;
    fn update_agent(&self, runner: &RegisteredAgent) -> StoreResult<()>;
    fn delete_agent(&self, id: i64) -> StoreResult<()>;
}
