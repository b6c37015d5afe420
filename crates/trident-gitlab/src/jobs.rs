//! Jobs: what clients submit through trident's jobs API and agents run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Success | JobStatus::Failed | JobStatus::Canceled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }
}

/// A file placed in the job's working directory before it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFile {
    pub path: String,
    /// Base64.
    #[serde(default)]
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactsSpec {
    #[serde(default)]
    pub paths: Vec<String>,
    /// on_success (default), on_failure or always.
    #[serde(default = "on_success")]
    pub when: String,
    #[serde(default)]
    pub expire_in: Option<String>,
}

fn on_success() -> String {
    "on_success".into()
}

fn default_timeout() -> u64 {
    3600
}

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub execution_environment_id: Option<u64>,
    pub script: Vec<String>,
    #[serde(default)]
    pub after_script: Vec<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Seconds.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    #[serde(default)]
    pub files: Vec<JobFile>,
    #[serde(default)]
    pub artifacts: Option<ArtifactsSpec>,
    #[serde(default)]
    pub dependencies: Vec<i64>,
}

/// A job and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: i64,
    #[serde(flatten)]
    pub spec: JobSpec,
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub failure_reason: Option<String>,
    /// The agent running or having run it.
    pub agent_id: Option<i64>,
    /// Unix seconds.
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub trace_size: u64,
    /// When its agent last reported (unix seconds): a running job silent for too long has
    /// lost its agent.
    #[serde(default)]
    pub last_seen: Option<u64>,
    /// The job token's hash while the job runs (the token dies with the job).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_hash: Option<String>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
