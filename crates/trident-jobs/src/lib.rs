//! trident's CI jobs domain: what clients submit (`jobs`), the queue agents take work from
//! (`coordinator`), registered agents and their tokens (`store`, `tokens`), job traces on disk
//! (`trace`), GitLab's predefined variables (`variables`), and the built-in agent that runs jobs
//! in the local sandbox through the core's `Manager` (`builtin_agent`).
//!
//! **This crate knows no HTTP**: the GitLab Runner API v4 and trident's jobs API are served by
//! `trident-gitlab` on top of it; `trident-store` implements its store traits.

#![forbid(unsafe_code)]

pub mod builtin_agent;
pub mod coordinator;
pub mod jobs;
pub mod store;
pub mod tokens;
pub mod trace;
pub mod variables;

use std::sync::Arc;
use std::time::Duration;

pub use coordinator::{Coordinator, CoordinatorConfig};
pub use store::{AgentStore, CiStore, JobStore, RegisteredAgent};

/// Fails running jobs whose agent stopped reporting for the coordinator's `stale_after` and
/// removes expired artifacts, checking every so often, for as long as the coordinator lives.
pub fn watch_for_lost_agents(coordinator: &Arc<Coordinator>) {
    let stale_after = coordinator.config().stale_after;
    let coordinator = Arc::downgrade(coordinator);
    let every = (stale_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(coordinator) = coordinator.upgrade() else {
                return;
            };
            coordinator.fail_lost_jobs(stale_after, None);
            coordinator.expire_artifacts();
        }
    });
}
