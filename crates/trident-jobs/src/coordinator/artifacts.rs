//! Artifacts: uploads recorded under their job, downloads for the job's own token or a
//! dependant's, expiry.

use std::path::PathBuf;

use super::{now, ArtifactError, Coordinator, Durability, JobRefusal, Jobs};
use crate::jobs::StoredArtifact;
use crate::tokens;

impl Coordinator {
    /// Checks that an agent may upload artifacts for this running job.
    pub fn authorize_artifact(&self, id: i64, token: &str) -> Result<(), JobRefusal> {
        let jobs = self.lock();
        self.authenticate(&jobs, id, token).map(|_| ())
    }

    /// Where an upload is written before it is recorded.
    pub fn artifact_upload_path(&self, id: i64) -> PathBuf {
        self.artifacts_dir(id)
            .join(format!(".upload-{}", tokens::new_token("")))
    }

    fn artifacts_dir(&self, id: i64) -> PathBuf {
        self.traces.with_file_name("artifacts").join(id.to_string())
    }

    /// Records an uploaded file as the job's artifact of `kind`, replacing an older one.
    pub fn record_artifact(
        &self,
        id: i64,
        token: &str,
        upload: &std::path::Path,
        kind: &str,
        artifact: StoredArtifact,
    ) -> Result<(), ArtifactError> {
        let mut jobs = self.lock();
        let mut job = self.authenticate(&jobs, id, token)?;
        let target = self.artifacts_dir(id).join(kind);
        std::fs::File::open(upload)?.sync_all()?;
        std::fs::rename(upload, &target)?;
        job.state
            .uploaded_artifacts
            .insert(kind.to_string(), artifact);
        job.state.last_seen = Some(now());
        self.save(&mut jobs, job, Durability::Durable)?;
        Ok(())
    }

    /// The job's archive, for the holder of its own job token or of the token of a running
    /// job that depends on it.
    pub fn artifact_for_token(
        &self,
        id: i64,
        token: &str,
    ) -> Result<Option<(PathBuf, StoredArtifact)>, JobRefusal> {
        let jobs = self.lock();
        let hash = tokens::hash(token);
        let allowed = jobs.values().any(|j| {
            j.state
                .token_hash
                .as_deref()
                .is_some_and(|h| tokens::same(h, &hash))
                && (j.id == id || j.spec.dependencies.contains(&id))
        });
        if !allowed {
            return Err(JobRefusal::Forbidden);
        }
        Ok(self.archive_of(&jobs, id))
    }

    /// The job's archive, for clients of the jobs API.
    pub fn artifact(&self, id: i64) -> Option<(PathBuf, StoredArtifact)> {
        let jobs = self.lock();
        self.archive_of(&jobs, id)
    }

    fn archive_of(&self, jobs: &Jobs, id: i64) -> Option<(PathBuf, StoredArtifact)> {
        let artifact = jobs
            .get(&id)?
            .state
            .uploaded_artifacts
            .get("archive")?
            .clone();
        Some((self.artifacts_dir(id).join("archive"), artifact))
    }

    /// Removes artifacts past their `expire_in`; returns how many.
    pub fn expire_artifacts(&self) -> usize {
        let mut jobs = self.lock();
        let now = now();
        let expired: Vec<(i64, String)> = jobs
            .values()
            .flat_map(|j| {
                j.state
                    .uploaded_artifacts
                    .iter()
                    .filter(|(_, a)| a.expire_at.is_some_and(|at| at <= now))
                    .map(move |(kind, _)| (j.id, kind.clone()))
            })
            .collect();
        for (id, kind) in &expired {
            let _ = std::fs::remove_file(self.artifacts_dir(*id).join(kind));
            if let Some(mut job) = jobs.get(id).cloned() {
                job.state.uploaded_artifacts.remove(kind);
                let _ = self.save(&mut jobs, job, Durability::Durable);
            }
        }
        expired.len()
    }
}
