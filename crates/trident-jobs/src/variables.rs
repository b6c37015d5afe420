//! The predefined `CI_*` variables a job sees, the same whichever agent runs it: external
//! agents get them in the job payload, the built-in agent puts them in the environment.
//! Only the ones that mean something without GitLab's projects and pipelines are set; each
//! trident job is its own one-job pipeline.

use crate::jobs::Job;
use crate::store::RegisteredAgent;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub key: String,
    pub value: String,
    /// Whether it may be shown (GitLab's `public`); the job token is not.
    pub public: bool,
    /// Whether agents hide it in traces.
    pub masked: bool,
}

fn public(key: &str, value: impl Into<String>) -> Variable {
    Variable {
        key: key.into(),
        value: value.into(),
        public: true,
        masked: false,
    }
}

/// Where an agent checks the job out by default (gitlab-runner's `/builds/<project path>`);
/// the built-in agent runs jobs in the runner's workspace instead.
pub const DEFAULT_PROJECT_DIR: &str = "/builds/trident/jobs";

/// GitLab's blank commit (`Gitlab::Git::BLANK_SHA`): trident's jobs have no repository.
pub const BLANK_SHA: &str = "0000000000000000000000000000000000000000";

/// The branch every job is said to run on.
const BRANCH: &str = "main";

/// The predefined variables, then the job's own (which win where names clash, as the
/// later definition does in GitLab).
///
/// Every variable GitLab's `Ci::Build#variables` always sends is here (agents crash without
/// some of them), with consistent values for a job without a repository: each trident job
/// is its own one-job pipeline of the project `trident/jobs`, on branch `main` at the blank
/// commit. Variables GitLab sends only under conditions trident never meets (a container
/// registry, Pages, environments, a user, tags) are left out.
///
/// `server_url` is how the agent reaches trident (`http://host:port`); `project_dir` is where
/// the agent runs the job (`CI_PROJECT_DIR`).
pub fn for_job(
    job: &Job,
    token: &str,
    server_url: &str,
    agent: &RegisteredAgent,
    project_dir: &str,
) -> Vec<Variable> {
    let spec = &job.spec;
    let url = server_url.trim_end_matches('/');
    let (protocol, authority) = url.split_once("://").unwrap_or(("http", url));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => (host, port.to_string()),
        _ => (
            authority,
            if protocol == "https" { "443" } else { "80" }.to_string(),
        ),
    };
    let tags = serde_json::to_string(&agent.tag_list).unwrap_or_else(|_| "[]".into());
    let version = env!("CARGO_PKG_VERSION");
    let mut version_parts = version.split('.');
    let mut next_part = || version_parts.next().unwrap_or("0").to_string();
    let (major, minor, patch) = (next_part(), next_part(), next_part());
    let created = rfc3339(job.created_at);
    let started = rfc3339(job.state.started_at.unwrap_or(job.created_at));
    let id = job.id.to_string();
    let job_url = format!("{url}/api/v1/jobs/{}", job.id);
    let project_url = format!("{url}/trident/jobs");
    let mut variables = vec![
        public("CI", "true"),
        public("GITLAB_CI", "true"),
        public("GITLAB_FEATURES", ""),
        public("CI_SERVER", "yes"),
        public("CI_SERVER_NAME", "trident"),
        public("CI_SERVER_VERSION", version),
        public("CI_SERVER_VERSION_MAJOR", major),
        public("CI_SERVER_VERSION_MINOR", minor),
        public("CI_SERVER_VERSION_PATCH", patch),
        public("CI_SERVER_REVISION", ""),
        public("CI_SERVER_URL", url),
        public("CI_SERVER_FQDN", authority),
        public("CI_SERVER_PROTOCOL", protocol),
        public("CI_SERVER_HOST", host),
        public("CI_SERVER_PORT", port),
        public("CI_SERVER_SHELL_SSH_HOST", host),
        public("CI_SERVER_SHELL_SSH_PORT", "22"),
        public("CI_API_V4_URL", format!("{url}/api/v4")),
        public("CI_API_GRAPHQL_URL", format!("{url}/api/graphql")),
        public("CI_TEMPLATE_REGISTRY_HOST", "registry.gitlab.com"),
        public("CI_JOB_ID", id.clone()),
        public("CI_JOB_NAME", spec.name.clone()),
        public("CI_JOB_NAME_SLUG", slug(&spec.name)),
        public("CI_JOB_GROUP_NAME", spec.name.clone()),
        public("CI_JOB_STAGE", "test"),
        public("CI_JOB_URL", job_url.clone()),
        public("CI_JOB_STARTED_AT", started),
        public("CI_JOB_TIMEOUT", job.timeout().to_string()),
        Variable {
            key: "CI_JOB_TOKEN".into(),
            value: token.into(),
            public: false,
            masked: true,
        },
        public("CI_NODE_TOTAL", "1"),
        public("CI_PIPELINE_ID", id.clone()),
        public("CI_PIPELINE_IID", id.clone()),
        public("CI_PIPELINE_URL", job_url),
        public("CI_PIPELINE_SOURCE", "api"),
        public("CI_PIPELINE_CREATED_AT", created.clone()),
        public("CI_PIPELINE_NAME", spec.name.clone()),
        public("CI_CONFIG_PATH", ".gitlab-ci.yml"),
        public("CI_COMMIT_SHA", BLANK_SHA),
        public("CI_COMMIT_SHORT_SHA", &BLANK_SHA[..8]),
        public("CI_COMMIT_BEFORE_SHA", BLANK_SHA),
        public("CI_COMMIT_REF_NAME", BRANCH),
        public("CI_COMMIT_REF_SLUG", BRANCH),
        public("CI_COMMIT_BRANCH", BRANCH),
        public("CI_COMMIT_REF_PROTECTED", "false"),
        public("CI_COMMIT_TITLE", spec.name.clone()),
        public("CI_COMMIT_MESSAGE", spec.name.clone()),
        public("CI_COMMIT_MESSAGE_IS_TRUNCATED", "false"),
        public("CI_COMMIT_DESCRIPTION", ""),
        public("CI_COMMIT_TIMESTAMP", created),
        public("CI_COMMIT_AUTHOR", "trident <trident@localhost>"),
        public("CI_DEFAULT_BRANCH", BRANCH),
        public("CI_PROJECT_ID", "0"),
        public("CI_PROJECT_NAME", "jobs"),
        public("CI_PROJECT_TITLE", "jobs"),
        public("CI_PROJECT_DESCRIPTION", ""),
        public("CI_PROJECT_PATH", "trident/jobs"),
        public("CI_PROJECT_PATH_SLUG", "trident-jobs"),
        public("CI_PROJECT_NAMESPACE", "trident"),
        public("CI_PROJECT_NAMESPACE_ID", "0"),
        public("CI_PROJECT_ROOT_NAMESPACE", "trident"),
        public("CI_PROJECT_URL", project_url.clone()),
        public("CI_PROJECT_VISIBILITY", "private"),
        public("CI_PROJECT_REPOSITORY_LANGUAGES", ""),
        public("CI_PROJECT_CLASSIFICATION_LABEL", ""),
        public("CI_PROJECT_DIR", project_dir),
        public("CI_BUILDS_DIR", builds_dir(project_dir)),
        public("CI_REPOSITORY_URL", format!("{project_url}.git")),
        public("CI_RUNNER_ID", agent.id.to_string()),
        public(
            "CI_RUNNER_DESCRIPTION",
            agent.description.clone().unwrap_or_default(),
        ),
        public("CI_RUNNER_TAGS", tags),
        // Jobs have no repository: without this the Go agent would try to clone the empty
        // `git_info.repo_url` before the script. A job's own variables may still override it.
        public("GIT_STRATEGY", "none"),
    ];
    if let Some(image) = &spec.image {
        variables.push(public("CI_JOB_IMAGE", image.clone()));
    }
    variables.extend(spec.variables.iter().map(|(k, v)| Variable {
        key: k.clone(),
        value: v.value.to_string(),
        public: !v.masked,
        masked: v.masked,
    }));
    variables
}

/// `/builds/trident/jobs` → `/builds` (gitlab-runner's builds dir holds the project path).
fn builds_dir(project_dir: &str) -> &str {
    project_dir
        .strip_suffix("/trident/jobs")
        .filter(|d| !d.is_empty())
        .unwrap_or(project_dir)
}

/// Unix seconds as GitLab's `iso8601` (`2026-12-01T08:57:16Z`).
fn rfc3339(unix_seconds: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_seconds);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// GitLab's `Gitlab::Utils.slugify`: lower case, anything but `a-z0-9` becomes `-`, at most
/// 63 characters, no leading or trailing `-`.
pub fn slug(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    lowered.trim_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobSpec, JobState, JobStatus};

    fn job() -> Job {
        Job {
            id: 42,
            created_at: 0,
            spec: std::sync::Arc::new(JobSpec {
                name: "build".into(),
                image: Some("python:3.12".into()),
                script: vec!["true".into()],
                variables: [("CI_JOB_STAGE".to_string(), "deploy".into())].into(),
                timeout: 600,
                ..JobSpec::default()
            }),
            state: JobState {
                status: JobStatus::Running,
                agent_id: Some(7),
                ..JobState::default()
            },
        }
    }

    fn value<'a>(variables: &'a [Variable], key: &str) -> Option<&'a str> {
        variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }

    #[test]
    fn server_address_parts_and_job_values() {
        let agent = RegisteredAgent {
            id: 7,
            tag_list: vec!["linux".into(), "big".into()],
            ..RegisteredAgent::default()
        };
        let v = for_job(
            &job(),
            "glcbt-secret",
            "http://10.0.0.1:7200/",
            &agent,
            DEFAULT_PROJECT_DIR,
        );
        assert_eq!(value(&v, "CI_SERVER_URL"), Some("http://10.0.0.1:7200"));
        assert_eq!(value(&v, "CI_SERVER_HOST"), Some("10.0.0.1"));
        assert_eq!(value(&v, "CI_SERVER_PORT"), Some("7200"));
        assert_eq!(value(&v, "CI_SERVER_PROTOCOL"), Some("http"));
        assert_eq!(
            value(&v, "CI_API_V4_URL"),
            Some("http://10.0.0.1:7200/api/v4")
        );
        assert_eq!(
            value(&v, "CI_JOB_URL"),
            Some("http://10.0.0.1:7200/api/v1/jobs/42")
        );
        assert_eq!(value(&v, "CI_JOB_TIMEOUT"), Some("600"));
        assert_eq!(value(&v, "CI_JOB_IMAGE"), Some("python:3.12"));
        assert_eq!(value(&v, "CI_RUNNER_TAGS"), Some(r#"["linux","big"]"#));
        assert_eq!(value(&v, "GIT_STRATEGY"), Some("none"));
        // The job's own definition comes last, so it wins.
        assert_eq!(value(&v, "CI_JOB_STAGE"), Some("deploy"));
        let token = v.iter().find(|v| v.key == "CI_JOB_TOKEN").unwrap();
        assert!(token.masked && !token.public);
        assert_eq!(token.value, "glcbt-secret");

        let v = for_job(&job(), "t", "https://ci.example.org", &agent, "/workspace");
        assert_eq!(value(&v, "CI_SERVER_HOST"), Some("ci.example.org"));
        assert_eq!(value(&v, "CI_SERVER_PORT"), Some("443"));
    }
}
