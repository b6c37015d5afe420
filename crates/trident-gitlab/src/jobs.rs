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

/// A variable of a job: a plain value, or `{"value": ..., "masked": true}` for a secret that
/// agents hide in their logs and that trident masks in the stored trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobVariable {
    Plain(String),
    Detailed {
        value: String,
        #[serde(default)]
        masked: bool,
    },
}

impl JobVariable {
    pub fn value(&self) -> &str {
        match self {
            JobVariable::Plain(value) | JobVariable::Detailed { value, .. } => value,
        }
    }

    pub fn masked(&self) -> bool {
        matches!(self, JobVariable::Detailed { masked: true, .. })
    }
}

impl From<&str> for JobVariable {
    fn from(value: &str) -> Self {
        JobVariable::Plain(value.to_string())
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
    pub variables: BTreeMap<String, JobVariable>,
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
    pub exit_code: Option<i64>,
    pub failure_reason: Option<String>,
    /// The agent running or having run it.
    pub agent_id: Option<i64>,
    /// Unix seconds.
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub trace_size: u64,
    /// CRC32 of the trace as its agent sent it (the stored one has its secrets masked).
    #[serde(default)]
    pub trace_crc: Option<u32>,
    /// Uploaded artifacts by type (`archive`, `junit`, ...).
    #[serde(default)]
    pub uploaded_artifacts: BTreeMap<String, StoredArtifact>,
    /// When its agent last reported (unix seconds): a running job silent for too long has
    /// lost its agent.
    #[serde(default)]
    pub last_seen: Option<u64>,
    /// The job token's hash while the job runs (the token dies with the job).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_hash: Option<String>,
}

/// One uploaded artifact file, kept in the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
