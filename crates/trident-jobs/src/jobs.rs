//! Jobs: what clients submit through trident's jobs API and agents run.
//!
//! In-memory domain types only: the jobs API (`trident-gitlab`) and the store
//! (`trident-store`) each have their own serialized forms of them.

use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobStatus {
    #[default]
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Success,
        JobStatus::Failed,
        JobStatus::Canceled,
    ];

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

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A variable of a job; a masked one is a secret that agents hide in their logs and that
/// trident masks in the stored trace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobVariable {
    pub value: String,
    pub masked: bool,
}

impl From<&str> for JobVariable {
    fn from(value: &str) -> Self {
        JobVariable {
            value: value.to_string(),
            masked: false,
        }
    }
}

/// A file placed in the job's working directory before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    pub path: String,
    pub content_base64: String,
}

/// When a job's artifacts are collected (GitLab's `artifacts:when`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArtifactsWhen {
    #[default]
    OnSuccess,
    OnFailure,
    Always,
}

impl ArtifactsWhen {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactsWhen::OnSuccess => "on_success",
            ArtifactsWhen::OnFailure => "on_failure",
            ArtifactsWhen::Always => "always",
        }
    }

    pub fn parse(text: &str) -> Option<ArtifactsWhen> {
        [
            ArtifactsWhen::OnSuccess,
            ArtifactsWhen::OnFailure,
            ArtifactsWhen::Always,
        ]
        .into_iter()
        .find(|w| w.as_str() == text)
    }

    /// Whether artifacts are collected after a job that `succeeded` or not.
    pub fn applies(self, succeeded: bool) -> bool {
        match self {
            ArtifactsWhen::OnSuccess => succeeded,
            ArtifactsWhen::OnFailure => !succeeded,
            ArtifactsWhen::Always => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArtifactsSpec {
    pub paths: Vec<String>,
    pub when: ArtifactsWhen,
    pub expire_in: Option<String>,
}

/// What a client asks for; never changes once submitted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobSpec {
    pub name: String,
    pub image: Option<String>,
    pub execution_environment_id: Option<u64>,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    pub variables: BTreeMap<String, JobVariable>,
    pub tags: Vec<String>,
    /// Seconds.
    pub timeout: u64,
    pub files: Vec<JobFile>,
    pub artifacts: Option<ArtifactsSpec>,
    pub dependencies: Vec<i64>,
}

/// The default job timeout (GitLab's: one hour).
pub const DEFAULT_TIMEOUT: u64 = 3600;

/// What happens to a job: changes as it runs (the store keeps it apart from the spec, so
/// that an update never rewrites what was submitted).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobState {
    pub status: JobStatus,
    pub exit_code: Option<i64>,
    pub failure_reason: Option<String>,
    /// The agent running or having run it.
    pub agent_id: Option<i64>,
    /// Unix seconds.
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// When its agent last reported (unix seconds): a running job silent for too long has
    /// lost its agent.
    pub last_seen: Option<u64>,
    pub trace_size: u64,
    /// CRC32 of the trace as its agent sent it (the stored one has its secrets masked).
    pub trace_crc: Option<u32>,
    /// The timeout it runs with (the spec's, capped by its agent's `maximum_timeout`).
    pub timeout: Option<u64>,
    /// Uploaded artifacts by type (`archive`, `junit`, ...).
    pub uploaded_artifacts: BTreeMap<String, StoredArtifact>,
    /// The job token's hash while the job runs (the token dies with the job).
    pub token_hash: Option<String>,
}

/// A job: what was asked and what happened to it so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    /// Unix seconds.
    pub created_at: u64,
    pub spec: Arc<JobSpec>,
    pub state: JobState,
}

impl Job {
    /// The timeout the job runs with.
    pub fn timeout(&self) -> u64 {
        self.state.timeout.unwrap_or(self.spec.timeout)
    }
}

/// One uploaded artifact file, kept in the data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    pub filename: String,
    pub format: String,
    pub size: u64,
    /// Unix seconds; gone after that.
    pub expire_at: Option<u64>,
}

/// GitLab's `expire_in` ("30 minutes", "1 week", "2 days 4 hours", "never") in seconds;
/// `None` for never, `Err` for what cannot be read.
pub fn parse_expire_in(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim().to_ascii_lowercase();
    if text.is_empty() || text == "never" {
        return Ok(None);
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut total = 0u64;
    let mut i = 0;
    while i < words.len() {
        let (number, unit) = match words[i].find(|c: char| !c.is_ascii_digit()) {
            Some(0) | None if i + 1 < words.len() => (words[i], words[i + 1]),
            Some(at) if at > 0 => (&words[i][..at], &words[i][at..]),
            _ => return Err(format!("cannot read expire_in {text:?}")),
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("cannot read expire_in {text:?}"))?;
        let seconds = match unit.trim_end_matches('s') {
            "sec" | "second" => 1,
            "min" | "minute" => 60,
            "h" | "hr" | "hour" => 3600,
            "d" | "day" => 86_400,
            "w" | "week" => 604_800,
            "mo" | "month" => 2_592_000,
            "y" | "yr" | "year" => 31_536_000,
            _ => return Err(format!("unknown unit in expire_in {text:?}")),
        };
        total += n * seconds;
        i += if words[i].len() > number.len() { 1 } else { 2 };
    }
    Ok(Some(total))
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::parse_expire_in;

    #[test]
    fn expire_in_reads_like_gitlab() {
        assert_eq!(parse_expire_in("never"), Ok(None));
        assert_eq!(parse_expire_in("30 minutes"), Ok(Some(1800)));
        assert_eq!(parse_expire_in("1 week"), Ok(Some(604_800)));
        assert_eq!(parse_expire_in("2 days 4 hours"), Ok(Some(187_200)));
        assert_eq!(parse_expire_in("1h"), Ok(Some(3600)));
        assert_eq!(parse_expire_in("3 sec"), Ok(Some(3)));
        assert!(parse_expire_in("soon").is_err());
        assert!(parse_expire_in("3 fortnights").is_err());
    }
}
