//! The image store: resolves an environment's `image` name to a root filesystem.
//!
//! Today an image is the built-in `host` or a local root filesystem directory named in the
//! config's `images:` table. Pulled OCI images will land here as unpacked layer directories
//! (`ImageSource::Layers`), resolved the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::spec::RootfsSource;

/// The image every installation has: the host's own system directories, read-only.
pub const HOST_IMAGE: &str = "host";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Host,
    Directory(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct Images {
    table: BTreeMap<String, ImageSource>,
}

impl Images {
    /// `table` maps image names to `host` or to a root filesystem directory.
    pub fn new(table: BTreeMap<String, String>) -> Result<Images, String> {
        let mut images = Images::default();
        for (name, target) in table {
            let source = if target == HOST_IMAGE {
                ImageSource::Host
            } else {
                let path = PathBuf::from(&target);
                if !path.is_absolute() {
                    return Err(format!(
                        "image {name}: {target} must be `host` or an absolute directory path"
                    ));
                }
                if target.contains([',', ':']) {
                    return Err(format!(
                        "image {name}: the path {target} may not contain ',' or ':'"
                    ));
                }
                ImageSource::Directory(path)
            };
            images.table.insert(name, source);
        }
        Ok(images)
    }

    pub fn resolve(&self, name: &str) -> Result<RootfsSource, String> {
        match self.table.get(name) {
            Some(ImageSource::Host) => Ok(RootfsSource::Host),
            Some(ImageSource::Directory(dir)) => {
                if dir.join("bin").exists() || dir.join("usr").is_dir() {
                    Ok(RootfsSource::Directory(dir.clone()))
                } else {
                    // The directory is named in the operator's config, never to clients.
                    Err(format!(
                        "image {name:?} is not a root filesystem (its directory has no bin/ or \
                         usr/): see the `images:` table of the server's config"
                    ))
                }
            }
            None if name == HOST_IMAGE => Ok(RootfsSource::Host),
            None => Err(format!(
                "image {name:?} is not available on this server: use \"host\", or map the name to \
                 \"host\" or to a root filesystem directory in the `images:` table of the config file"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_built_in_and_unknown_names_explain_themselves() {
        let images = Images::new(BTreeMap::new()).unwrap();
        assert_eq!(images.resolve("host"), Ok(RootfsSource::Host));
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
        assert_eq!(images.resolve("py"), Ok(RootfsSource::Host));
        assert_eq!(
            images.resolve("root"),
            Ok(RootfsSource::Directory("/".into()))
        );
    }
}
