//! Persistence as the core needs it; implemented by `trident-store` (SQLite).

use serde::{Deserialize, Serialize};

use crate::model::{EnvironmentId, ExecutionEnvironment};

/// Stores report failures as plain messages; the core turns them into `Error::Internal`.
pub type StoreResult<T> = std::result::Result<T, String>;

/// A runner as it must be remembered across a restart of the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerRecord {
    pub id: String,
    /// The environment as it was when the runner was made: its shape decides whether the
    /// runner may still serve the environment after a restart.
    pub environment: ExecutionEnvironment,
    /// Claimed by a client (else idle in its pool).
    pub used: bool,
    /// Seconds; 0 = none.
    pub inactivity_timeout: u64,
}

pub trait Store: Send + Sync + 'static {
    fn load_environments(&self) -> StoreResult<Vec<ExecutionEnvironment>>;
    /// Must be durable when it returns, even across a power cut: the API acknowledges right after.
    fn save_environment(&self, env: &ExecutionEnvironment) -> StoreResult<()>;
    fn delete_environment(&self, id: EnvironmentId) -> StoreResult<()>;

    fn load_runners(&self) -> StoreResult<Vec<RunnerRecord>>;
    /// Must survive a crash of the server process (runners do not survive a power cut).
    fn save_runner(&self, runner: &RunnerRecord) -> StoreResult<()>;
    fn delete_runner(&self, id: &str) -> StoreResult<()>;
}
