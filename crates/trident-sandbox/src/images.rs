//! The image store: resolves an environment's `image` name to a root filesystem.
//!
//! Today an image is the built-in `host` or a local root filesystem directory named in the
//! config's `images:` table. Pulled OCI images will land here as unpacked layer directories
//! (`ImageSource::Layers`), resolved the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use trident_core::backend::Readiness;

use crate::spec::RootfsSource;

/// The image every installation has: the host's own system directories, read-only.
pub const HOST_IMAGE: &str = "host";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Host,
    Directory(PathBuf),
    /// Unpacked layer directories, bottom first (overlayfs whiteouts and opaque directories
    /// in them), and the image config's `Env` (`K=V`): the base environment of executions.
    Layers {
        layers: Vec<PathBuf>,
        env: Vec<String>,
    },
}

/// What a runner of an image is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub rootfs: RootfsSource,
    /// The image's environment (`K=V`); empty: trident's default environment.
    pub env: Vec<String>,
}

impl ResolvedImage {
    fn bare(rootfs: RootfsSource) -> ResolvedImage {
        ResolvedImage {
            rootfs,
            env: Vec::new(),
        }
    }
}

/// One value of the config's `images:` table: `host`, an absolute root filesystem
/// directory, or `{layers: [bottom, ..., top], env: ["K=V", ...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ImageEntry {
    Path(String),
    Layers(LayersEntry),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayersEntry {
    pub layers: Vec<PathBuf>,
    #[serde(default)]
    pub env: Vec<String>,
}

/// Images known by something other than the table (the image store): asked for names the
/// table does not have. `None`: not one of its images.
pub trait ImageResolver: Send + Sync {
    /// The image's layers once it is there; `Some(Err)` while it is not (yet).
    fn resolve(&self, name: &str) -> Option<Result<ImageSource, String>>;
    /// Whether the name is one this resolver takes (syntax only; nothing is fetched): `None`
    /// when it is not its kind of name at all, `Some(Err)` with why it is malformed.
    fn accepts(&self, name: &str) -> Option<Result<(), String>>;
    /// Whether runners of the image can be made now (pulled), starting to get it if needed.
    fn readiness(&self, name: &str) -> Readiness;
    /// Starts getting the image, retrying at once what failed before.
    fn prepare(&self, name: &str);
}

/// Image names and what they are. Clones share one table: an image registered through any
/// clone (e.g. the integrator's, after a pull) is seen by the backend holding another.
#[derive(Clone, Default)]
pub struct Images {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    table: BTreeMap<String, ImageSource>,
    resolver: Option<Arc<dyn ImageResolver>>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Images")
            .field("table", &inner.table)
            .field("resolver", &inner.resolver.is_some())
            .finish()
    }
}

impl ImageSource {
    /// A pulled (or hand-made) image: its layer directories bottom first, its config's
    /// `Env`. The paths must be absolute; there must be at least one layer.
    pub fn layers(layers: Vec<PathBuf>, env: Vec<String>) -> Result<ImageSource, String> {
        if layers.is_empty() {
            return Err("an image needs at least one layer".into());
        }
        if let Some(bad) = layers.iter().find(|l| !l.is_absolute()) {
            return Err(format!("layer {} must be an absolute path", bad.display()));
        }
        Ok(ImageSource::Layers { layers, env })
    }

    fn from_entry(name: &str, entry: ImageEntry) -> Result<ImageSource, String> {
        match entry {
            ImageEntry::Path(target) if target == HOST_IMAGE => Ok(ImageSource::Host),
            ImageEntry::Path(target) => {
                let path = PathBuf::from(&target);
                if !path.is_absolute() {
                    return Err(format!(
                        "image {name}: {target} must be `host`, an absolute directory path or \
                         {{layers: [...], env: [...]}}"
                    ));
                }
                if target.contains([',', ':']) {
                    return Err(format!(
                        "image {name}: the path {target} may not contain ',' or ':'"
                    ));
                }
                Ok(ImageSource::Directory(path))
            }
            ImageEntry::Layers(LayersEntry { layers, env }) => {
                ImageSource::layers(layers, env).map_err(|e| format!("image {name}: {e}"))
            }
        }
    }
}

impl Images {
    /// `table` maps image names to `host` or to a root filesystem directory.
    pub fn new(table: BTreeMap<String, String>) -> Result<Images, String> {
        Images::from_entries(
            table
                .into_iter()
                .map(|(name, target)| (name, ImageEntry::Path(target)))
                .collect(),
        )
    }

    /// The config's `images:` table.
    pub fn from_entries(table: BTreeMap<String, ImageEntry>) -> Result<Images, String> {
        let images = Images::default();
        for (name, entry) in table {
            let source = ImageSource::from_entry(&name, entry)?;
            images.insert(&name, source);
        }
        Ok(images)
    }

    /// Registers (or replaces) an image; runners made from now on use it.
    pub fn insert(&self, name: &str, source: ImageSource) {
        self.write().table.insert(name.to_string(), source);
    }

    /// Forgets an image (runners of it keep running).
    pub fn remove(&self, name: &str) -> Option<ImageSource> {
        self.write().table.remove(name)
    }

    /// Asks `resolver` for names the table does not have.
    pub fn set_resolver(&self, resolver: Arc<dyn ImageResolver>) {
        self.write().resolver = Some(resolver);
    }

    fn lookup(&self, name: &str) -> (Option<ImageSource>, Option<Arc<dyn ImageResolver>>) {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        (inner.table.get(name).cloned(), inner.resolver.clone())
    }

    /// Whether `name` names an image at all (the table's, or one the resolver would get),
    /// with a message a client can act on. Nothing is fetched.
    pub fn check(&self, name: &str) -> Result<(), String> {
        match self.lookup(name) {
            (Some(_), _) => self.resolve(name).map(|_| ()),
            (None, _) if name == HOST_IMAGE => Ok(()),
            (None, Some(resolver)) => match resolver.accepts(name) {
                Some(verdict) => verdict,
                None => self.resolve(name).map(|_| ()),
            },
            (None, None) => self.resolve(name).map(|_| ()),
        }
    }

    /// The table's images are always ready; the resolver's once pulled.
    pub fn readiness(&self, name: &str) -> Readiness {
        match self.lookup(name) {
            (None, Some(resolver)) if name != HOST_IMAGE => resolver.readiness(name),
            _ => Readiness::Ready,
        }
    }

    pub fn prepare(&self, name: &str) {
        if let (None, Some(resolver)) = self.lookup(name) {
            if name != HOST_IMAGE {
                resolver.prepare(name);
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn resolve(&self, name: &str) -> Result<ResolvedImage, String> {
        let (source, resolver) = self.lookup(name);
        let source = match source {
            Some(source) => source,
            None if name == HOST_IMAGE => ImageSource::Host,
            None => match resolver.and_then(|r| r.resolve(name)) {
                Some(found) => found?,
                None => {
                    return Err(format!(
                        "image {name:?} is not available on this server: use \"host\", or map \
                         the name to \"host\" or to a root filesystem directory in the \
                         `images:` table of the config file"
                    ))
                }
            },
        };
        match source {
            ImageSource::Host => Ok(ResolvedImage::bare(RootfsSource::Host)),
            ImageSource::Directory(dir) => {
                if dir.join("bin").exists() || dir.join("usr").is_dir() {
                    Ok(ResolvedImage::bare(RootfsSource::Directory(dir)))
                } else {
                    // The directory is named in the operator's config, never to clients.
                    Err(format!(
                        "image {name:?} is not a root filesystem (its directory has no bin/ or \
                         usr/): see the `images:` table of the server's config"
                    ))
                }
            }
            ImageSource::Layers { layers, env } => {
                // Layer paths are the store's (or the operator's), never told to clients.
                if let Some(i) = layers.iter().position(|l| !l.is_dir()) {
                    return Err(format!(
                        "image {name:?} is incomplete: its layer {} of {} is missing",
                        i + 1,
                        layers.len()
                    ));
                }
                if layers.is_empty() {
                    return Err(format!("image {name:?} has no layers"));
                }
                Ok(ResolvedImage {
                    rootfs: RootfsSource::Layers(layers),
                    env,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_built_in_and_unknown_names_explain_themselves() {
        let images = Images::new(BTreeMap::new()).unwrap();
        assert_eq!(images.resolve("host").unwrap().rootfs, RootfsSource::Host);
        let err = images.resolve("python:3.12").unwrap_err();
        assert!(err.contains("images:"), "{err}");
    }

    #[test]
    fn names_can_map_to_host_or_directories() {
        let table = BTreeMap::from([
            (
                "openhpi/co_execenv_python:8.0".to_string(),
                "host".to_string(),
            ),
            ("bad".to_string(), "relative/dir".to_string()),
        ]);
        assert!(Images::new(table).is_err());
        let table = BTreeMap::from([
            ("py".to_string(), "host".to_string()),
            ("root".to_string(), "/".to_string()),
        ]);
        let images = Images::new(table).unwrap();
        assert_eq!(images.resolve("py").unwrap().rootfs, RootfsSource::Host);
        assert_eq!(
            images.resolve("root").unwrap(),
            ResolvedImage {
                rootfs: RootfsSource::Directory("/".into()),
                env: vec![]
            }
        );
    }

    #[test]
    fn layered_images_are_registered_at_run_time_and_seen_by_every_clone() {
        let tmp = tempfile::tempdir().unwrap();
        let (bottom, top) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&bottom).unwrap();
        std::fs::create_dir(&top).unwrap();
        let images = Images::new(BTreeMap::new()).unwrap();
        let backends_copy = images.clone();
        assert!(backends_copy.resolve("python:3.12").is_err());
        let env = vec!["PATH=/usr/local/bin:/usr/bin".to_string()];
        images.insert(
            "python:3.12",
            ImageSource::layers(vec![bottom.clone(), top.clone()], env.clone()).unwrap(),
        );
        assert_eq!(
            backends_copy.resolve("python:3.12").unwrap(),
            ResolvedImage {
                rootfs: RootfsSource::Layers(vec![bottom, top.clone()]),
                env
            }
        );
        // A layer gone (collected, or a half-removed store) is an error naming no path.
        std::fs::remove_dir(&top).unwrap();
        let err = backends_copy.resolve("python:3.12").unwrap_err();
        assert!(err.contains("layer 2 of 2") && !err.contains('/'), "{err}");
        assert!(images.remove("python:3.12").is_some());
        assert!(backends_copy.resolve("python:3.12").is_err());
        assert!(ImageSource::layers(vec![], vec![]).is_err());
        assert!(ImageSource::layers(vec!["rel".into()], vec![]).is_err());
    }

    #[test]
    fn a_resolver_answers_for_names_the_table_lacks() {
        struct Store;
        impl ImageResolver for Store {
            fn resolve(&self, name: &str) -> Option<Result<ImageSource, String>> {
                (name == "pulling").then(|| Err("still being pulled".to_string()))
            }
            fn accepts(&self, name: &str) -> Option<Result<(), String>> {
                match name {
                    "pulling" => Some(Ok(())),
                    "Bad Ref" => Some(Err("invalid reference".into())),
                    _ => None,
                }
            }
            fn readiness(&self, _name: &str) -> Readiness {
                Readiness::Preparing
            }
            fn prepare(&self, _name: &str) {}
        }
        let images = Images::new(BTreeMap::from([("py".to_string(), "host".to_string())])).unwrap();
        images.set_resolver(Arc::new(Store));
        assert_eq!(images.resolve("pulling").unwrap_err(), "still being pulled");
        assert!(images.resolve("other").unwrap_err().contains("images:"));
        assert_eq!(images.resolve("host").unwrap().rootfs, RootfsSource::Host);
        // Checks are syntax only: an image being pulled is a valid choice already.
        assert_eq!(images.check("pulling"), Ok(()));
        assert_eq!(images.check("Bad Ref"), Err("invalid reference".into()));
        assert!(images.check("other").unwrap_err().contains("images:"));
        // The table's images never wait; the resolver's say where they stand.
        assert_eq!(images.readiness("py"), Readiness::Ready);
        assert_eq!(images.readiness("host"), Readiness::Ready);
        assert_eq!(images.readiness("pulling"), Readiness::Preparing);
    }

    #[test]
    fn the_config_table_takes_layers_and_env() {
        let yaml = r#"{"a": "host", "b": {"layers": ["/l/0", "/l/1"], "env": ["K=V"]}}"#;
        let table: BTreeMap<String, ImageEntry> = serde_json::from_str(yaml).unwrap();
        let images = Images::from_entries(table).unwrap();
        let inner = images.inner.read().unwrap();
        assert_eq!(
            inner.table["b"],
            ImageSource::Layers {
                layers: vec!["/l/0".into(), "/l/1".into()],
                env: vec!["K=V".into()]
            }
        );
        let bad = r#"{"b": {"layers": ["/l/0"], "envs": []}}"#;
        assert!(serde_json::from_str::<BTreeMap<String, ImageEntry>>(bad).is_err());
    }
}
