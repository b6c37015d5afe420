//! The image store behind both doors: the native sandbox asks it for the layers of images
//! its `images:` table does not name (registry references and offline archives), and the
//! `/api/v1/images` routes list, pull and remove through it.
//!
//! Names: an environment's `image` is looked up in the `images:` table first (`host`,
//! directories, layer lists: the sandbox's own), then here. Table names mapped to an offline
//! archive are stored under that name; anything else must be a reference Docker would
//! accept, stored under its normalised form (`python:3.12` is
//! `docker.io/library/python:3.12`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use trident_api::{ImageOpError, ImageService, ImageView};
use trident_core::backend::Readiness;
use trident_images::{normalize_reference, ImageError, ImageState, ImageStatus, ImageStore};
use trident_sandbox::images::{ImageResolver, ImageSource};

pub struct StoreImages {
    store: Arc<ImageStore>,
    /// `images:` names whose image comes from an offline archive: name → source.
    archives: BTreeMap<String, String>,
    /// Imports in flight or failed, by name (the store tracks registry pulls itself).
    imports: Mutex<HashMap<String, Option<String>>>,
}

impl StoreImages {
    pub fn new(store: Arc<ImageStore>, archives: BTreeMap<String, String>) -> Arc<StoreImages> {
        Arc::new(StoreImages {
            store,
            archives,
            imports: Mutex::new(HashMap::new()),
        })
    }

    /// The store's name of an environment's image, or why it cannot be one.
    fn store_name(&self, image: &str) -> Result<String, String> {
        if self.archives.contains_key(image) {
            return Ok(image.to_string());
        }
        normalize_reference(image).map_err(|e| {
            format!(
                "image {image:?} is neither in the server's images: table nor a valid registry \
                 reference: {e}"
            )
        })
    }

    /// Loads an archive of the `images:` table into the store in the background, once at a
    /// time; a failure is kept for claims to report until the next attempt.
    fn import(self: &Arc<Self>, name: &str) {
        let Some(source) = self.archives.get(name).cloned() else {
            return;
        };
        {
            let mut imports = self.imports.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(imports.get(name), Some(None)) {
                return; // already importing
            }
            imports.insert(name.to_string(), None);
        }
        let this = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tracing::info!(image = %name, %source, "loading an image archive");
            let result = this.store.import(&name, &source).await;
            let mut imports = this.imports.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(image) => {
                    tracing::info!(image = %name, digest = %image.digest, "image archive loaded");
                    imports.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(image = %name, %source, error = %e, "loading an image archive failed");
                    imports.insert(name, Some(e.to_string()));
                }
            }
        });
    }

    /// Starts the imports of every archive of the table (at server start).
    pub fn load_archives(self: &Arc<Self>) {
        for name in self.archives.keys() {
            if self.store.ready(name).is_none() {
                self.import(name);
            }
        }
    }

    fn readiness_of(self: &Arc<Self>, key: &str) -> Readiness {
        if self.archives.contains_key(key) {
            if self.store.ready(key).is_some() {
                return Readiness::Ready;
            }
            let state = self
                .imports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .cloned();
            return match state {
                Some(Some(error)) => Readiness::Failed(format!("image {key}: {error}")),
                Some(None) => Readiness::Preparing,
                None => {
                    self.import(key);
                    Readiness::Preparing
                }
            };
        }
        match self.store.status(key) {
            Some(ImageStatus {
                state: ImageState::Ready,
                ..
            }) => Readiness::Ready,
            Some(ImageStatus {
                state: ImageState::Failed,
                error,
                ..
            }) => Readiness::Failed(format!(
                "image {key} could not be pulled: {}",
                error.unwrap_or_default()
            )),
            Some(_) => Readiness::Preparing,
            None => match self.store.request(key) {
                Ok(()) => Readiness::Preparing,
                Err(e) => Readiness::Failed(format!("image {key}: {e}")),
            },
        }
    }
}

/// Wraps the store for the sandbox, which holds it as a trait object.
pub struct Resolver(pub Arc<StoreImages>);

impl ImageResolver for Resolver {
    fn resolve(&self, name: &str) -> Option<Result<ImageSource, String>> {
        let key = self.0.store_name(name).ok()?;
        Some(match self.0.store.ready(&key) {
            Some(image) => ImageSource::layers(image.layers, image.config.env),
            None => Err(format!("image {key} is not pulled yet")),
        })
    }

    fn accepts(&self, name: &str) -> Option<Result<(), String>> {
        Some(self.0.store_name(name).map(|_| ()))
    }

    fn readiness(&self, name: &str) -> Readiness {
        match self.0.store_name(name) {
            Ok(key) => self.0.readiness_of(&key),
            Err(e) => Readiness::Failed(e),
        }
    }

    fn prepare(&self, name: &str) {
        let Ok(key) = self.0.store_name(name) else {
            return;
        };
        if self.0.archives.contains_key(&key) {
            if self.0.store.ready(&key).is_none() {
                self.0.import(&key);
            }
        } else if let Err(e) = self.0.store.request(&key) {
            tracing::warn!(image = %key, error = %e, "cannot pull");
        }
    }
}

fn view(status: ImageStatus) -> ImageView {
    ImageView {
        name: status.name,
        digest: status.digest,
        size: status.size,
        layers: status.layers,
        state: match status.state {
            ImageState::Pulling => "pulling",
            ImageState::Ready => "ready",
            ImageState::Failed => "failed",
        }
        .into(),
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        error: status.error,
    }
}

fn op_error(e: ImageError) -> ImageOpError {
    match e {
        ImageError::InvalidReference(m) => ImageOpError::Invalid(m),
        ImageError::NotFound(m) => ImageOpError::NotFound(m),
        other => ImageOpError::Failed(other.to_string()),
    }
}

impl ImageService for Resolver {
    fn list(&self) -> Vec<ImageView> {
        let mut images: Vec<ImageView> = self.0.store.list().into_iter().map(view).collect();
        // Archives still loading or failed are images too, as far as operators care.
        let imports = self.0.imports.lock().unwrap_or_else(|e| e.into_inner());
        for (name, error) in imports.iter() {
            if images.iter().all(|i| &i.name != name) {
                images.push(ImageView {
                    name: name.clone(),
                    digest: None,
                    size: 0,
                    layers: 0,
                    state: if error.is_some() { "failed" } else { "pulling" }.into(),
                    bytes_done: 0,
                    bytes_total: 0,
                    error: error.clone(),
                });
            }
        }
        images
    }

    fn pull(&self, name: &str) -> Result<ImageView, ImageOpError> {
        let key = self.0.store_name(name).map_err(ImageOpError::Invalid)?;
        if self.0.archives.contains_key(&key) {
            self.prepare(&key);
        } else {
            self.0.store.request(&key).map_err(op_error)?;
        }
        Ok(self
            .list()
            .into_iter()
            .find(|i| i.name == key)
            .unwrap_or(ImageView {
                name: key,
                digest: None,
                size: 0,
                layers: 0,
                state: "pulling".into(),
                bytes_done: 0,
                bytes_total: 0,
                error: None,
            }))
    }

    fn remove(&self, name: &str, environment_images: &[String]) -> Result<(), ImageOpError> {
        let key = self.0.store_name(name).map_err(ImageOpError::Invalid)?;
        let users: Vec<&String> = environment_images
            .iter()
            .filter(|image| self.0.store_name(image).is_ok_and(|k| k == key))
            .collect();
        if !users.is_empty() {
            return Err(ImageOpError::InUse(format!(
                "image {key} is used by an execution environment (as {}): delete or change \
                 the environment first",
                users
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        self.0.store.remove(&key).map_err(op_error)
    }
}
