//! Manifests, indexes and image configs as the registry (or an archive) hands them over:
//! Docker v2 schema 2 and OCI, single images and multi-platform indexes / manifest lists.
//! Parsed here rather than with `oci-client`'s types so a missing `mediaType` (allowed by
//! OCI) and unknown fields are handled the way Docker handles them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ImageError;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Every manifest media type a pull accepts.
pub const ACCEPTED: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// A content descriptor (config, layer, or index entry).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Clone, Debug)]
pub enum Manifest {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Parses a manifest or index; `what` names it in errors.
pub fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest, ImageError> {
    let doc: Document = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::Refused(format!("{what}: malformed manifest: {e}")))?;
    let media_type = doc.media_type.as_deref().unwrap_or("");
    if doc.schema_version != Some(2) {
        return Err(ImageError::Refused(format!(
            "{what}: manifest schema version {:?} is not supported (only Docker v2 schema 2 and \
             OCI; re-push the image with a current Docker or skopeo)",
            doc.schema_version
        )));
    }
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        // OCI allows omitting mediaType: decide by shape.
        "" => doc.manifests.is_some(),
        other => {
            return Err(ImageError::Refused(format!(
                "{what}: manifest media type {other} is not an image"
            )))
        }
    };
    if is_index {
        let entries = doc.manifests.unwrap_or_default();
        return Ok(Manifest::Index(entries));
    }
    let config = doc
        .config
        .ok_or_else(|| ImageError::Refused(format!("{what}: manifest has no config")))?;
    if !matches!(config.media_type.as_str(), OCI_CONFIG | DOCKER_CONFIG | "") {
        return Err(ImageError::Refused(format!(
            "{what}: config media type {} is not a container image (an artifact?)",
            config.media_type
        )));
    }
    let layers = doc.layers.unwrap_or_default();
    for d in std::iter::once(&config).chain(&layers) {
        check_digest(&d.digest).map_err(|e| ImageError::Refused(format!("{what}: {e}")))?;
    }
    Ok(Manifest::Image { config, layers })
}

/// Accepts only `sha256:<64 lowercase hex>`: digests become file names in the store.
pub fn check_digest(d: &str) -> Result<&str, String> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(h)
        }
        _ => Err(format!("digest {d:?} is not sha256:<64 hex digits>")),
    }
}

/// The OCI architecture name of this host.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// Picks the entry of an index for linux and this host's architecture, as Docker does
/// (for arm64 a `v8` or absent variant is preferred over others).
pub fn pick_platform<'a>(
    entries: &'a [Descriptor],
    what: &str,
) -> Result<&'a Descriptor, ImageError> {
    let arch = host_arch();
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    let preferred = candidates.iter().find(|e| {
        let v = e.platform.as_ref().and_then(|p| p.variant.as_deref());
        v.is_none() || (arch == "arm64" && v == Some("v8"))
    });
    if let Some(e) = preferred.or(candidates.first()) {
        return Ok(e);
    }
    let offered: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .filter(|p| p.os != "unknown")
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    Err(ImageError::NotFound(format!(
        "{what} has no linux/{arch} image (it offers: {})",
        if offered.is_empty() {
            "no platforms".to_string()
        } else {
            offered.join(", ")
        }
    )))
}

/// What a runner needs from the image config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `K=V` entries of `config.Env`.
    pub env: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigFile {
    config: Option<ConfigSection>,
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConfigSection {
    env: Option<Vec<String>>,
    user: Option<String>,
    working_dir: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The runner-relevant part of an image config and its `rootfs.diff_ids`.
pub fn parse_config(bytes: &[u8], what: &str) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let f: ConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::Refused(format!("{what}: malformed image config: {e}")))?;
    let c = f.config;
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let config = match c {
        None => ImageConfig::default(),
        Some(c) => ImageConfig {
            env: c.env.unwrap_or_default(),
            user: non_empty(c.user),
            working_dir: non_empty(c.working_dir),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
        },
    };
    Ok((config, f.rootfs.map(|r| r.diff_ids).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, variant: Option<&str>, d: char) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", d.to_string().repeat(64)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: None,
        }
    }

    #[test]
    fn index_picks_the_host_platform() {
        let entries = [
            entry("arm", Some("v7"), 'a'),
            entry("arm64", Some("v8"), 'b'),
            entry("amd64", None, 'c'),
            entry("s390x", None, 'd'),
        ];
        let got = pick_platform(&entries, "x").unwrap();
        assert_eq!(got.platform.as_ref().unwrap().architecture, host_arch());
        let e = pick_platform(&entries[3..], "img").unwrap_err();
        assert!(e.to_string().contains("linux/s390x"), "{e}");
    }

    #[test]
    fn config_fields() {
        let (c, ids) = parse_config(
            br#"{"architecture":"amd64","config":{"Env":["PATH=/bin","A=b"],"User":"",
                "WorkingDir":"/app","Cmd":["sh"],"Entrypoint":null},
                "rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#,
            "x",
        )
        .unwrap();
        assert_eq!(c.env, ["PATH=/bin", "A=b"]);
        assert_eq!(c.user, None);
        assert_eq!(c.working_dir.as_deref(), Some("/app"));
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.cmd, ["sh"]);
        assert_eq!(ids, ["sha256:00"]);
    }

    #[test]
    fn schema1_and_bad_digests_are_refused() {
        let e = parse_manifest(br#"{"schemaVersion":1,"name":"x"}"#, "img").unwrap_err();
        assert!(matches!(e, ImageError::Refused(_)));
        let e = parse_manifest(
            br#"{"schemaVersion":2,"config":{"digest":"sha256:../../etc","size":1},"layers":[]}"#,
            "img",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sha256:<64 hex"), "{e}");
    }
}
