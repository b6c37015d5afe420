//! Persistence as the core needs it; implemented by `trident-store` (SQLite), which owns the
//! shape of what is stored (its own row types): nothing here is serialized.

use crate::model::{EnvironmentId, ExecutionEnvironment};

/// Why a store could not do what it was asked; the operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (busy, a full disk, an I/O error); trying again may work.
    #[error("the store failed: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored record cannot be read back (damaged, or of a shape this version does not
    /// know).
    #[error("a stored record cannot be read: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Unavailable(Box::new(e))
    }
}

pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// A runner as it must be remembered across a restart of the server.
#[derive(Debug, Clone, PartialEq)]
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
