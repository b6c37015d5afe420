//! Persistence as the core needs it; implemented by `trident-store` (SQLite).

use crate::model::{EnvironmentId, ExecutionEnvironment};

pub trait EnvironmentStore: Send + Sync + 'static {
    fn load_environments(&self) -> anyhow_like::Result<Vec<ExecutionEnvironment>>;
    /// Must be durable when it returns: the API acknowledges right after.
    fn save_environment(&self, env: &ExecutionEnvironment) -> anyhow_like::Result<()>;
    fn delete_environment(&self, id: EnvironmentId) -> anyhow_like::Result<()>;
}

/// The store reports failures as plain messages; the core turns them into `Error::Internal`.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, String>;
}

/// A store that keeps nothing, for tools (the bench client) and unit tests of the core.
#[derive(Default)]
pub struct MemoryStore(std::sync::Mutex<Vec<ExecutionEnvironment>>);

impl EnvironmentStore for MemoryStore {
    fn load_environments(&self) -> anyhow_like::Result<Vec<ExecutionEnvironment>> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn save_environment(&self, env: &ExecutionEnvironment) -> anyhow_like::Result<()> {
        let mut all = self.0.lock().unwrap();
        all.retain(|e| e.id != env.id);
        all.push(env.clone());
        Ok(())
    }
    fn delete_environment(&self, id: EnvironmentId) -> anyhow_like::Result<()> {
        self.0.lock().unwrap().retain(|e| e.id != id);
        Ok(())
    }
}
