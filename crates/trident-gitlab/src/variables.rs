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

/// The predefined variables, then the job's own (which win where names clash, as the
/// later definition does in GitLab).
///
/// `server_url` is how the agent reaches trident (`http://host:port`).
pub fn for_job(job: &Job, token: &str, server_url: &str, agent: &RegisteredAgent) -> Vec<Variable> {
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
    let mut variables = vec![
        public("CI", "true"),
        public("GITLAB_CI", "true"),
        public("CI_SERVER", "yes"),
        public("CI_SERVER_NAME", "trident"),
        public("CI_SERVER_VERSION", env!("CARGO_PKG_VERSION")),
        public("CI_SERVER_URL", url),
        public("CI_SERVER_PROTOCOL", protocol),
        public("CI_SERVER_HOST", host),
        public("CI_SERVER_PORT", port),
        public("CI_API_V4_URL", format!("{url}/api/v4")),
        public("CI_JOB_ID", job.id.to_string()),
        public("CI_JOB_NAME", spec.name.clone()),
        public("CI_JOB_STAGE", "test"),
        public("CI_JOB_URL", format!("{url}/api/v1/jobs/{}", job.id)),
        public("CI_JOB_TIMEOUT", spec.timeout.to_string()),
        Variable {
            key: "CI_JOB_TOKEN".into(),
            value: token.into(),
            public: false,
            masked: true,
        },
        public("CI_PIPELINE_ID", job.id.to_string()),
        public("CI_PIPELINE_IID", job.id.to_string()),
        public("CI_PIPELINE_SOURCE", "api"),
        public("CI_NODE_TOTAL", "1"),
        public("CI_PROJECT_ID", "0"),
        public("CI_PROJECT_NAME", "trident"),
        public("CI_PROJECT_PATH", "trident/jobs"),
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
    variables.extend(spec.variables.iter().map(|(k, v)| public(k, v.clone())));
    variables
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobSpec, JobStatus};

    fn job() -> Job {
        Job {
            id: 42,
            spec: JobSpec {
                name: "build".into(),
                image: Some("python:3.12".into()),
                execution_environment_id: None,
                script: vec!["true".into()],
                after_script: vec![],
                variables: [("CI_JOB_STAGE".to_string(), "deploy".to_string())].into(),
                tags: vec![],
                timeout: 600,
                files: vec![],
                artifacts: None,
                dependencies: vec![],
            },
            status: JobStatus::Running,
            exit_code: None,
            failure_reason: None,
            agent_id: Some(7),
            created_at: 0,
            started_at: None,
            finished_at: None,
            trace_size: 0,
            uploaded_artifacts: Default::default(),
            last_seen: None,
            token_hash: None,
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
        let v = for_job(&job(), "glcbt-secret", "http://10.0.0.1:7200/", &agent);
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

        let v = for_job(&job(), "t", "https://ci.example.org", &agent);
        assert_eq!(value(&v, "CI_SERVER_HOST"), Some("ci.example.org"));
        assert_eq!(value(&v, "CI_SERVER_PORT"), Some("443"));
    }
}
