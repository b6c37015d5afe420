//! What the operator configures about registries: credentials (inline or from Docker's
//! `config.json`), plain-HTTP registries, Docker Hub mirrors and the layer quota. The keys
//! are named as Docker's `daemon.json` names them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use serde::Deserialize;

use crate::ImageError;

/// 8 GiB: bigger than any sane layer, small enough to stop a decompression bomb.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 8 << 30;

/// Registry access and unpack limits.
#[derive(Clone, Debug, Deserialize)]
// No `deny_unknown_fields`: the server flattens this into its own config.
#[serde(default)]
pub struct RegistryConfig {
    /// Credentials per registry host\[:port\] as written in a reference (`docker.io` also
    /// matches `index.docker.io` and `registry-1.docker.io`). Wins over `docker_config`.
    pub registry_auth: BTreeMap<String, Credentials>,
    /// Docker's `config.json`; its `auths` entries (`auth` = base64(user:pass), or
    /// `username`/`password`) are used for registries `registry_auth` does not name.
    pub docker_config: Option<PathBuf>,
    /// `host:port` of registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Mirror URLs (`https://mirror.example`, `http://127.0.0.1:5000`) tried in order for
    /// Docker Hub images before Docker Hub itself.
    pub registry_mirrors: Vec<String>,
    /// Unpack quota per layer (uncompressed bytes).
    pub max_layer_bytes: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            registry_auth: BTreeMap::new(),
            docker_config: None,
            insecure_registries: Vec::new(),
            registry_mirrors: Vec::new(),
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
        }
    }
}

/// A username and password (or token) for one registry.
#[derive(Clone, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

// Passwords stay out of logs and `{:?}` of the config.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The canonical spelling of a registry host: no scheme, no path, Docker Hub's aliases
/// folded into `docker.io`.
pub(crate) fn canonical_registry(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// The credentials in effect, resolved once when the store opens.
#[derive(Clone, Debug, Default)]
pub(crate) struct CredentialTable {
    by_host: BTreeMap<String, Credentials>,
}

impl CredentialTable {
    /// `registry_auth` over the `auths` of `docker_config` (which must exist and parse if
    /// named: a typo there would otherwise show up as a puzzling "unauthorized" much later).
    pub(crate) fn load(config: &RegistryConfig) -> Result<CredentialTable, ImageError> {
        let mut by_host = BTreeMap::new();
        if let Some(path) = &config.docker_config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ImageError::io(format!("docker_config {}", path.display()), e))?;
            for (host, creds) in parse_docker_config(&text)
                .map_err(|e| ImageError::Io(format!("docker_config {}: {e}", path.display())))?
            {
                by_host.insert(host, creds);
            }
        }
        for (host, creds) in &config.registry_auth {
            by_host.insert(canonical_registry(host), creds.clone());
        }
        Ok(CredentialTable { by_host })
    }

    pub(crate) fn get(&self, registry: &str) -> Option<&Credentials> {
        self.by_host.get(&canonical_registry(registry))
    }
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
}

#[derive(Deserialize)]
struct DockerAuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The usable `auths` entries of a Docker `config.json` (keys like
/// `https://index.docker.io/v1/` or `registry.example.org:5000`). Entries with neither
/// form (credential helpers, empty `{}`) are skipped.
fn parse_docker_config(text: &str) -> Result<Vec<(String, Credentials)>, String> {
    let file: DockerConfigFile =
        serde_json::from_str(text).map_err(|e| format!("not a Docker config.json: {e}"))?;
    let mut out = Vec::new();
    for (key, entry) in file.auths {
        let creds = if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| format!("auths[{key:?}].auth is not base64: {e}"))?;
            let raw =
                String::from_utf8(raw).map_err(|_| format!("auths[{key:?}].auth is not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| format!("auths[{key:?}].auth is not base64(user:password)"))?;
            Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }
        } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
            Credentials {
                username: u,
                password: p,
            }
        } else {
            continue;
        };
        out.push((canonical_registry(&key), creds));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries_and_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("hub:secret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
                "reg.example:5000":{{"username":"u","password":"p"}},
                "helper.example":{{}}}},"credsStore":"desktop"}}"#
            ),
        )
        .unwrap();
        let mut config = RegistryConfig {
            docker_config: Some(path),
            ..Default::default()
        };
        let t = CredentialTable::load(&config).unwrap();
        assert_eq!(t.get("docker.io").unwrap().username, "hub");
        assert_eq!(t.get("registry-1.docker.io").unwrap().password, "secret");
        assert_eq!(t.get("reg.example:5000").unwrap().username, "u");
        assert!(t.get("helper.example").is_none());
        config.registry_auth.insert(
            "reg.example:5000".into(),
            Credentials {
                username: "inline".into(),
                password: "x".into(),
            },
        );
        let t = CredentialTable::load(&config).unwrap();
        assert_eq!(t.get("reg.example:5000").unwrap().username, "inline");
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn config_keys_and_defaults() {
        let c: RegistryConfig = serde_json::from_str(
            r#"{"insecure_registries":["127.0.0.1:5000"],
                "registry_auth":{"ghcr.io":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        assert_eq!(c.max_layer_bytes, DEFAULT_MAX_LAYER_BYTES);
        assert_eq!(c.insecure_registries, ["127.0.0.1:5000"]);
        let missing = RegistryConfig {
            docker_config: Some("/nonexistent/config.json".into()),
            ..Default::default()
        };
        let e = CredentialTable::load(&missing).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/config.json"), "{e}");
    }
}
