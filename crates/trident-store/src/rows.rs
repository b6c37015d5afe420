//! What is stored, row by row: trident-store's own types, serialized as JSON in their
//! tables. They keep the field names earlier versions wrote, so old rows read as they are;
//! conversions to and from the domain types are here and nowhere else.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use trident_core::model::ExecutionEnvironment;
use trident_core::store::{RunnerRecord, StoreError};
use trident_jobs::jobs::{
    ArtifactsSpec, ArtifactsWhen, Job, JobFile, JobSpec, JobState, JobStatus, JobVariable,
    StoredArtifact,
};
use trident_jobs::RegisteredAgent;

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentRow {
    id: u64,
    image: String,
    prewarming_pool_size: u32,
    cpu_limit: u32,
    memory_limit: u32,
    network_access: bool,
    exposed_ports: Vec<u16>,
}

impl From<&ExecutionEnvironment> for EnvironmentRow {
    fn from(env: &ExecutionEnvironment) -> Self {
        EnvironmentRow {
            id: env.id,
            image: env.image.clone(),
            prewarming_pool_size: env.prewarming_pool_size,
            cpu_limit: env.cpu_limit,
            memory_limit: env.memory_limit,
            network_access: env.network_access,
            exposed_ports: env.exposed_ports.clone(),
        }
    }
}

impl From<EnvironmentRow> for ExecutionEnvironment {
    fn from(row: EnvironmentRow) -> Self {
        ExecutionEnvironment {
            id: row.id,
            image: row.image,
            prewarming_pool_size: row.prewarming_pool_size,
            cpu_limit: row.cpu_limit,
            memory_limit: row.memory_limit,
            network_access: row.network_access,
            exposed_ports: row.exposed_ports,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct RunnerRow {
    id: String,
    environment: EnvironmentRow,
    used: bool,
    inactivity_timeout: u64,
}

impl From<&RunnerRecord> for RunnerRow {
    fn from(r: &RunnerRecord) -> Self {
        RunnerRow {
            id: r.id.clone(),
            environment: (&r.environment).into(),
            used: r.used,
            inactivity_timeout: r.inactivity_timeout,
        }
    }
}

impl From<RunnerRow> for RunnerRecord {
    fn from(row: RunnerRow) -> Self {
        RunnerRecord {
            id: row.id,
            environment: row.environment.into(),
            used: row.used,
            inactivity_timeout: row.inactivity_timeout,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct AgentRow {
    #[serde(default)]
    token_hash: String,
    description: Option<String>,
    maintenance_note: Option<String>,
    #[serde(default)]
    info: serde_json::Value,
    paused: bool,
    locked: bool,
    access_level: String,
    run_untagged: bool,
    tag_list: Vec<String>,
    maximum_timeout: Option<i64>,
}

impl From<&RegisteredAgent> for AgentRow {
    fn from(a: &RegisteredAgent) -> Self {
        AgentRow {
            token_hash: a.token_hash.clone(),
            description: a.description.clone(),
            maintenance_note: a.maintenance_note.clone(),
            info: a.info.clone(),
            paused: a.paused,
            locked: a.locked,
            access_level: a.access_level.clone(),
            run_untagged: a.run_untagged,
            tag_list: a.tag_list.clone(),
            maximum_timeout: a.maximum_timeout,
        }
    }
}

impl AgentRow {
    pub fn into_agent(self, id: i64) -> RegisteredAgent {
        RegisteredAgent {
            id,
            token_hash: self.token_hash,
            description: self.description,
            maintenance_note: self.maintenance_note,
            info: self.info,
            paused: self.paused,
            locked: self.locked,
            access_level: self.access_level,
            run_untagged: self.run_untagged,
            tag_list: self.tag_list,
            maximum_timeout: self.maximum_timeout,
        }
    }
}

/// A job's spec: written once.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecRow {
    name: String,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    execution_environment_id: Option<u64>,
    script: Vec<String>,
    #[serde(default)]
    after_script: Vec<String>,
    #[serde(default)]
    variables: BTreeMap<String, VariableRow>,
    #[serde(default)]
    tags: Vec<String>,
    timeout: u64,
    #[serde(default)]
    files: Vec<FileRow>,
    #[serde(default)]
    artifacts: Option<ArtifactsRow>,
    #[serde(default)]
    dependencies: Vec<i64>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum VariableRow {
    Plain(String),
    Detailed {
        value: String,
        #[serde(default)]
        masked: bool,
    },
}

#[derive(Serialize, Deserialize)]
struct FileRow {
    path: String,
    #[serde(default)]
    content: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactsRow {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    expire_in: Option<String>,
}

impl From<&JobSpec> for SpecRow {
    fn from(spec: &JobSpec) -> Self {
        SpecRow {
            name: spec.name.clone(),
            image: spec.image.clone(),
            execution_environment_id: spec.execution_environment_id,
            script: spec.script.clone(),
            after_script: spec.after_script.clone(),
            variables: spec
                .variables
                .iter()
                .map(|(k, v)| {
                    let row = if v.masked {
                        VariableRow::Detailed {
                            value: v.value.clone(),
                            masked: true,
                        }
                    } else {
                        VariableRow::Plain(v.value.clone())
                    };
                    (k.clone(), row)
                })
                .collect(),
            tags: spec.tags.clone(),
            timeout: spec.timeout,
            files: spec
                .files
                .iter()
                .map(|f| FileRow {
                    path: f.path.clone(),
                    content: f.content_base64.clone(),
                })
                .collect(),
            artifacts: spec.artifacts.as_ref().map(|a| ArtifactsRow {
                paths: a.paths.clone(),
                when: Some(a.when.as_str().into()),
                expire_in: a.expire_in.clone(),
            }),
            dependencies: spec.dependencies.clone(),
        }
    }
}

impl TryFrom<SpecRow> for JobSpec {
    type Error = StoreError;

    fn try_from(row: SpecRow) -> Result<Self, StoreError> {
        let artifacts = match row.artifacts {
            None => None,
            Some(a) => Some(ArtifactsSpec {
                paths: a.paths,
                when: match a.when.as_deref() {
                    None => ArtifactsWhen::default(),
                    Some(w) => ArtifactsWhen::parse(w)
                        .ok_or_else(|| corrupt(format!("artifacts when {w:?}")))?,
                },
                expire_in: a.expire_in,
            }),
        };
        Ok(JobSpec {
            name: row.name,
            image: row.image,
            execution_environment_id: row.execution_environment_id,
            script: row.script,
            after_script: row.after_script,
            variables: row
                .variables
                .into_iter()
                .map(|(k, v)| {
                    let variable = match v {
                        VariableRow::Plain(value) => JobVariable {
                            value,
                            masked: false,
                        },
                        VariableRow::Detailed { value, masked } => JobVariable { value, masked },
                    };
                    (k, variable)
                })
                .collect(),
            tags: row.tags,
            timeout: row.timeout,
            files: row
                .files
                .into_iter()
                .map(|f| JobFile {
                    path: f.path,
                    content_base64: f.content,
                })
                .collect(),
            artifacts,
            dependencies: row.dependencies,
        })
    }
}

/// A job's state: rewritten as the job goes on (a small row).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateRow {
    status: String,
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default)]
    failure_reason: Option<String>,
    #[serde(default)]
    agent_id: Option<i64>,
    #[serde(default)]
    started_at: Option<u64>,
    #[serde(default)]
    finished_at: Option<u64>,
    #[serde(default)]
    last_seen: Option<u64>,
    #[serde(default)]
    trace_size: u64,
    #[serde(default)]
    trace_crc: Option<u32>,
    /// Stored by earlier versions in the spec row (`timeout`, capped at assignment): read
    /// from there by the migration.
    #[serde(default, rename = "runTimeout")]
    timeout: Option<u64>,
    #[serde(default)]
    uploaded_artifacts: BTreeMap<String, ArtifactRow>,
    #[serde(default)]
    token_hash: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactRow {
    filename: String,
    format: String,
    size: u64,
    #[serde(default)]
    expire_at: Option<u64>,
}

impl From<&JobState> for StateRow {
    fn from(s: &JobState) -> Self {
        StateRow {
            status: s.status.as_str().into(),
            exit_code: s.exit_code,
            failure_reason: s.failure_reason.clone(),
            agent_id: s.agent_id,
            started_at: s.started_at,
            finished_at: s.finished_at,
            last_seen: s.last_seen,
            trace_size: s.trace_size,
            trace_crc: s.trace_crc,
            timeout: s.timeout,
            uploaded_artifacts: s
                .uploaded_artifacts
                .iter()
                .map(|(kind, a)| {
                    let row = ArtifactRow {
                        filename: a.filename.clone(),
                        format: a.format.clone(),
                        size: a.size,
                        expire_at: a.expire_at,
                    };
                    (kind.clone(), row)
                })
                .collect(),
            token_hash: s.token_hash.clone(),
        }
    }
}

impl TryFrom<StateRow> for JobState {
    type Error = StoreError;

    fn try_from(row: StateRow) -> Result<Self, StoreError> {
        Ok(JobState {
            status: JobStatus::parse(&row.status)
                .ok_or_else(|| corrupt(format!("job status {:?}", row.status)))?,
            exit_code: row.exit_code,
            failure_reason: row.failure_reason,
            agent_id: row.agent_id,
            started_at: row.started_at,
            finished_at: row.finished_at,
            last_seen: row.last_seen,
            trace_size: row.trace_size,
            trace_crc: row.trace_crc,
            timeout: row.timeout,
            uploaded_artifacts: row
                .uploaded_artifacts
                .into_iter()
                .map(|(kind, a)| {
                    let artifact = StoredArtifact {
                        filename: a.filename,
                        format: a.format,
                        size: a.size,
                        expire_at: a.expire_at,
                    };
                    (kind, artifact)
                })
                .collect(),
            token_hash: row.token_hash,
        })
    }
}

/// A job from its two rows.
pub fn job(id: i64, created_at: u64, spec: SpecRow, state: StateRow) -> Result<Job, StoreError> {
    Ok(Job {
        id,
        created_at,
        spec: Arc::new(spec.try_into()?),
        state: state.try_into()?,
    })
}
