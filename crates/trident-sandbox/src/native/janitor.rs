//! Debris: runner cgroups and directories of this instance that belong to no runner it
//! knows (a runner-init an earlier life of the server started just before it crashed, a
//! runner whose record was lost). Removed by the start-up sweep and by a janitor that looks
//! again every few seconds.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trident_core::backend::BackendResult;

use super::{failed, NativeBackend};
use crate::cgroup::Cgroups;

/// How often leftovers nobody knows of are looked for.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);

/// Finds and removes runners of this instance that are not in a given set.
#[derive(Clone)]
struct Debris {
    cgroups: Cgroups,
    parent: String,
    runners_dir: PathBuf,
    known: Arc<Mutex<HashSet<String>>>,
    /// Named to keep by the caller of a sweep, besides the known ones.
    keep: Arc<HashSet<String>>,
}

impl Debris {
    /// Removes what belongs to no known runner; returns how many runner cgroups went.
    /// `known` is consulted after listing: an id is known before its runner touches the
    /// disk, so a runner being made right now is never mistaken for debris.
    fn remove_unknown(&self) -> usize {
        let is_known = |name: &str| {
            self.keep.contains(name)
                || self
                    .known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(name)
        };
        let leftovers: Vec<String> = self
            .cgroups
            .children(&self.parent)
            .into_iter()
            .filter(|name| !is_known(name.rsplit('/').next().unwrap_or_default()))
            .collect();
        for name in &leftovers {
            self.cgroups.kill_all(name);
            self.cgroups.remove(name);
        }
        if let Ok(entries) = std::fs::read_dir(&self.runners_dir) {
            for entry in entries.flatten() {
                if !is_known(entry.file_name().to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        leftovers.len()
    }
}

impl NativeBackend {
    fn debris(&self, keep: &[String]) -> Debris {
        Debris {
            cgroups: self.cgroups.clone(),
            parent: self.cgroup_parent.clone(),
            runners_dir: self.runners_dir.clone(),
            known: self.known.clone(),
            keep: Arc::new(keep.iter().cloned().collect()),
        }
    }

    /// Removes everything of this instance but the runners it knows and those in `keep`.
    pub(super) async fn sweep_unknown(&self, keep: &[String]) -> BackendResult<()> {
        let debris = self.debris(keep);
        let removed = tokio::task::spawn_blocking(move || debris.remove_unknown())
            .await
            .map_err(failed)?;
        if removed > 0 {
            tracing::info!(count = removed, "removed runners nobody knows of");
        }
        Ok(())
    }

    /// Starts the janitor (once): every few seconds it removes debris that appeared since
    /// the start-up sweep. Call it after the runners of an earlier life were adopted.
    pub fn start_janitor(&self) {
        let debris = self.debris(&[]);
        self.janitor.call_once(|| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(JANITOR_INTERVAL).await;
                    let debris = debris.clone();
                    let removed = tokio::task::spawn_blocking(move || debris.remove_unknown())
                        .await
                        .unwrap_or(0);
                    if removed > 0 {
                        tracing::info!(count = removed, "janitor removed runner debris");
                    }
                }
            });
        });
    }
}
