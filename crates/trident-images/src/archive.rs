//! Offline sources for air-gapped sites: `docker-archive:` (what `docker save` and
//! `skopeo copy … docker-archive:` write: `manifest.json` naming a config and layer files),
//! `oci-archive:` (an OCI image layout in a tar) and `oci:` (an OCI image layout dir).
//!
//! Each is read once, sequentially; every blob goes into the store through the store's
//! `put` (which hashes it, checks the digest the layout claims, and marks it in use). The
//! archive is the operator's, but its contents are still only data: entry names are never
//! used as paths, only as keys.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::manifest::{self, Descriptor, Manifest};
use crate::ImageError;

/// Files up to this size are kept in memory while reading an archive (manifests and
/// configs are; layers mostly are not).
const SMALL: u64 = 4 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A parsed offline source string.
#[derive(Clone, Debug)]
pub enum Source {
    DockerArchive {
        path: PathBuf,
        selector: Option<String>,
    },
    OciArchive {
        path: PathBuf,
        selector: Option<String>,
    },
    OciDir {
        path: PathBuf,
        selector: Option<String>,
    },
}

/// What a source yields: an image whose blobs are all in the store.
pub(crate) struct Staged {
    pub digest: String,
    pub config: Descriptor,
    pub config_bytes: Vec<u8>,
    pub layers: Vec<Descriptor>,
}

/// `put(reader, expected digest, what)` stores a blob, returning its digest and size.
pub(crate) type Put<'a> =
    dyn FnMut(&mut dyn Read, Option<&str>, &str) -> Result<(String, u64), ImageError> + 'a;

impl Source {
    /// `docker-archive:/x.tar[:ref]`, `oci-archive:/x.tar[:ref]`, `oci:/dir[:ref]`. The
    /// path is the longest prefix that exists, so paths with `:` work.
    pub fn parse(s: &str) -> Result<Source, ImageError> {
        let (kind, rest) = if let Some(r) = s.strip_prefix("docker-archive:") {
            (0, r)
        } else if let Some(r) = s.strip_prefix("oci-archive:") {
            (1, r)
        } else if let Some(r) = s.strip_prefix("oci:") {
            (2, r)
        } else {
            return Err(ImageError::InvalidReference(format!(
                "{s:?} is not an offline source (docker-archive:/path.tar, \
                 oci-archive:/path.tar or oci:/layout-dir)"
            )));
        };
        let (path, selector) = split_existing(rest).ok_or_else(|| {
            ImageError::NotFound(format!("offline source {s}: {rest} does not exist"))
        })?;
        Ok(match kind {
            0 => Source::DockerArchive { path, selector },
            1 => Source::OciArchive { path, selector },
            _ => Source::OciDir { path, selector },
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::DockerArchive { path, .. } => format!("docker-archive {}", path.display()),
            Source::OciArchive { path, .. } => format!("oci-archive {}", path.display()),
            Source::OciDir { path, .. } => format!("oci layout {}", path.display()),
        }
    }
}

fn split_existing(rest: &str) -> Option<(PathBuf, Option<String>)> {
    if rest.is_empty() {
        return None;
    }
    if Path::new(rest).exists() {
        return Some((rest.into(), None));
    }
    for (i, _) in rest.match_indices(':') {
        let (p, sel) = (&rest[..i], &rest[i + 1..]);
        if !p.is_empty() && Path::new(p).exists() {
            return Some((p.into(), Some(sel.to_string()).filter(|s| !s.is_empty())));
        }
    }
    None
}

/// Reads `source`, storing its blobs through `put`.
pub(crate) fn stage(source: &Source, put: &mut Put<'_>) -> Result<Staged, ImageError> {
    let what = source.describe();
    match source {
        Source::DockerArchive { path, selector } => {
            docker_archive(path, selector.as_deref(), &what, put)
        }
        Source::OciArchive { path, selector } => oci_archive(path, selector.as_deref(), &what, put),
        Source::OciDir { path, selector } => oci_dir(path, selector.as_deref(), &what, put),
    }
}

/// An archive entry name as a key: no `./`, no empty components; `None` for `..`.
fn entry_key(p: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(s.to_str()?.to_string()),
            std::path::Component::CurDir | std::path::Component::RootDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

/// Records the first bytes read, to tell compressed layers from plain tars.
struct Magic<R> {
    inner: R,
    head: Vec<u8>,
}

impl<R: Read> Read for Magic<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.head.len() < 4 {
            let want = (4 - self.head.len()).min(n);
            self.head.extend_from_slice(&buf[..want]);
        }
        Ok(n)
    }
}

fn layer_media_type(head: &[u8]) -> &'static str {
    if head.starts_with(&[0x1f, 0x8b]) {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    }
}

enum Member {
    Small(Vec<u8>),
    /// Already in the store: digest, size, first bytes.
    Staged(String, u64, Vec<u8>),
}

/// Regular files of an archive by entry name, and its links (name -> target name).
type Members = BTreeMap<String, Member>;
type Links = BTreeMap<String, String>;

/// One pass over a tar: small files in memory, big ones streamed into the store (with
/// the digest `expect` derives from the name, if any), symlinks remembered.
fn read_tar(
    path: &Path,
    what: &str,
    put: &mut Put<'_>,
    expect: &dyn Fn(&str) -> Option<String>,
) -> Result<(Members, Links), ImageError> {
    let file = std::fs::File::open(path).map_err(|e| ImageError::io(format!("open {what}"), e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut members = BTreeMap::new();
    let mut links = BTreeMap::new();
    let bad = |e: std::io::Error| ImageError::Refused(format!("{what}: not a readable tar: {e}"));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let Some(key) = entry.path().ok().and_then(|p| entry_key(&p)) else {
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(bad)?;
                if size <= SMALL {
                    let mut buf = Vec::with_capacity(size as usize);
                    entry
                        .read_to_end(&mut buf)
                        .map_err(|e| ImageError::io(format!("read {what}: {key}"), e))?;
                    members.insert(key, Member::Small(buf));
                } else {
                    let mut m = Magic {
                        inner: &mut entry,
                        head: Vec::new(),
                    };
                    let want = expect(&key);
                    let (d, n) = put(&mut m, want.as_deref(), &format!("{what}: {key}"))?;
                    members.insert(key, Member::Staged(d, n, m.head));
                }
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let Some(target) = entry.link_name().ok().flatten() else {
                    continue;
                };
                let target = if entry.header().entry_type() == tar::EntryType::Symlink {
                    Path::new(&key)
                        .parent()
                        .unwrap_or(Path::new(""))
                        .join(target)
                } else {
                    target.into_owned()
                };
                if let Some(t) = normalize_lexically(&target) {
                    links.insert(key, t);
                }
            }
            _ => {}
        }
    }
    Ok((members, links))
}

fn normalize_lexically(p: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(s.to_str()?.to_string()),
            std::path::Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    Some(parts.join("/"))
}

fn lookup<'m>(
    members: &'m BTreeMap<String, Member>,
    links: &BTreeMap<String, String>,
    key: &str,
) -> Option<&'m Member> {
    let mut k = key.to_string();
    for _ in 0..8 {
        if let Some(m) = members.get(&k) {
            return Some(m);
        }
        k = links.get(&k)?.clone();
    }
    None
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_archive(
    path: &Path,
    selector: Option<&str>,
    what: &str,
    put: &mut Put<'_>,
) -> Result<Staged, ImageError> {
    let (members, links) = read_tar(path, what, put, &|_| None)?;
    let Some(Member::Small(mj)) = members.get("manifest.json") else {
        return Err(ImageError::Refused(format!(
            "{what} has no manifest.json: not a docker-archive (docker save) file"
        )));
    };
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(mj)
        .map_err(|e| ImageError::Refused(format!("{what}: malformed manifest.json: {e}")))?;
    let tags = |e: &DockerManifestEntry| e.repo_tags.clone().unwrap_or_default();
    let entry = match selector {
        Some(sel) => {
            let want = crate::normalize_reference(sel).ok();
            entries
                .iter()
                .find(|e| {
                    tags(e).iter().any(|t| {
                        t == sel || (want.is_some() && crate::normalize_reference(t).ok() == want)
                    })
                })
                .ok_or_else(|| {
                    ImageError::NotFound(format!(
                        "{what} has no image tagged {sel} (it has: {})",
                        entries.iter().flat_map(tags).collect::<Vec<_>>().join(", ")
                    ))
                })?
        }
        None if entries.len() == 1 => &entries[0],
        None => {
            return Err(ImageError::NotFound(format!(
                "{what} holds {} images: name one as docker-archive:{}:<name:tag> (it has: {})",
                entries.len(),
                path.display(),
                entries.iter().flat_map(tags).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    let missing = |k: &str| {
        ImageError::Refused(format!(
            "{what}: manifest.json names {k}, which the archive lacks"
        ))
    };
    let stage_member =
        |put: &mut Put<'_>, key: &str| -> Result<(String, u64, Vec<u8>), ImageError> {
            match lookup(&members, &links, key).ok_or_else(|| missing(key))? {
                Member::Small(b) => {
                    let (d, n) = put(&mut &b[..], None, &format!("{what}: {key}"))?;
                    Ok((d, n, b.iter().take(4).copied().collect()))
                }
                Member::Staged(d, n, head) => Ok((d.clone(), *n, head.clone())),
            }
        };
    let config_bytes =
        match lookup(&members, &links, &entry.config).ok_or_else(|| missing(&entry.config))? {
            Member::Small(b) => b.clone(),
            Member::Staged(..) => {
                return Err(ImageError::Refused(format!(
                    "{what}: config {} is implausibly big",
                    entry.config
                )))
            }
        };
    let (config_digest, config_size, _) = stage_member(put, &entry.config)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (digest, size, head) = stage_member(put, l)?;
        layers.push(Descriptor {
            media_type: layer_media_type(&head).to_string(),
            digest,
            size,
            platform: None,
            annotations: None,
        });
    }
    let config = Descriptor {
        media_type: manifest::OCI_CONFIG.to_string(),
        digest: config_digest,
        size: config_size,
        platform: None,
        annotations: None,
    };
    // docker save has no manifest: write the OCI one it stands for, so every image in the
    // store has a manifest digest.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": config,
        "layers": layers,
    }))
    .expect("json");
    let (digest, _) = put(&mut &manifest[..], None, &format!("{what}: manifest"))?;
    Ok(Staged {
        digest,
        config,
        config_bytes,
        layers,
    })
}

fn blob_key(digest: &str) -> Result<String, ImageError> {
    let hex = manifest::check_digest(digest).map_err(ImageError::Refused)?;
    Ok(format!("blobs/sha256/{hex}"))
}

fn digest_of_key(key: &str) -> Option<String> {
    let hex = key.strip_prefix("blobs/sha256/")?;
    manifest::check_digest(&format!("sha256:{hex}")).ok()?;
    Some(format!("sha256:{hex}"))
}

/// The image of an OCI layout's index: by `selector` (ref name), else the only one, else
/// the host platform's. Returns (manifest digest, manifest bytes, config, layers).
fn resolve_layout(
    index: &[u8],
    selector: Option<&str>,
    what: &str,
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>, ImageError>,
) -> Result<(String, Vec<u8>, Descriptor, Vec<Descriptor>), ImageError> {
    let Manifest::Index(entries) = manifest::parse_manifest(index, &format!("{what}: index.json"))?
    else {
        return Err(ImageError::Refused(format!(
            "{what}: index.json is not an index"
        )));
    };
    let names = |e: &Descriptor| -> Vec<String> {
        let a = e.annotations.clone().unwrap_or_default();
        [a.get(REF_NAME).cloned(), a.get(CONTAINERD_NAME).cloned()]
            .into_iter()
            .flatten()
            .collect()
    };
    let all_names = || {
        entries
            .iter()
            .flat_map(names)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match selector {
        Some(sel) => {
            let want = crate::normalize_reference(sel).ok();
            entries
                .iter()
                .find(|e| {
                    names(e).iter().any(|n| {
                        n == sel || (want.is_some() && crate::normalize_reference(n).ok() == want)
                    })
                })
                .ok_or_else(|| {
                    ImageError::NotFound(format!(
                        "{what} has no image named {sel} (it has: {})",
                        all_names()
                    ))
                })?
        }
        None if entries.len() == 1 => &entries[0],
        None if entries.iter().all(|e| e.platform.is_some()) && !entries.is_empty() => {
            manifest::pick_platform(&entries, what)?
        }
        None => {
            return Err(ImageError::NotFound(format!(
                "{what} holds {} images: name one with :<ref> (it has: {})",
                entries.len(),
                all_names()
            )))
        }
    };
    let mut digest = chosen.digest.clone();
    let mut bytes = read(&digest)?;
    for _ in 0..2 {
        match manifest::parse_manifest(&bytes, what)? {
            Manifest::Image { config, layers } => return Ok((digest, bytes, config, layers)),
            Manifest::Index(inner) => {
                digest = manifest::pick_platform(&inner, what)?.digest.clone();
                bytes = read(&digest)?;
            }
        }
    }
    Err(ImageError::Refused(format!(
        "{what}: indexes nested too deep"
    )))
}

fn check(bytes: &[u8], digest: &str, what: &str) -> Result<(), ImageError> {
    use sha2::{Digest, Sha256};
    let got = format!("sha256:{:x}", Sha256::digest(bytes));
    if got != digest {
        return Err(ImageError::Refused(format!(
            "{what}: blob {digest} does not match its digest (got {got}): refused"
        )));
    }
    Ok(())
}

fn oci_archive(
    path: &Path,
    selector: Option<&str>,
    what: &str,
    put: &mut Put<'_>,
) -> Result<Staged, ImageError> {
    let (members, _) = read_tar(path, what, put, &digest_of_key)?;
    let Some(Member::Small(index)) = members.get("index.json") else {
        return Err(ImageError::Refused(format!(
            "{what} has no index.json: not an OCI layout"
        )));
    };
    let mut read = |d: &str| -> Result<Vec<u8>, ImageError> {
        match members.get(&blob_key(d)?) {
            Some(Member::Small(b)) => {
                check(b, d, what)?;
                Ok(b.clone())
            }
            _ => Err(ImageError::Refused(format!(
                "{what}: blob {d} is missing or implausibly big"
            ))),
        }
    };
    let (digest, mbytes, config, layers) = resolve_layout(index, selector, what, &mut read)?;
    let config_bytes = read(&config.digest)?;
    put(
        &mut &mbytes[..],
        Some(&digest),
        &format!("{what}: manifest"),
    )?;
    put(
        &mut &config_bytes[..],
        Some(&config.digest),
        &format!("{what}: config"),
    )?;
    for l in &layers {
        match members.get(&blob_key(&l.digest)?) {
            Some(Member::Small(b)) => {
                put(
                    &mut &b[..],
                    Some(&l.digest),
                    &format!("{what}: layer {}", l.digest),
                )?;
            }
            Some(Member::Staged(..)) => {}
            None => {
                return Err(ImageError::Refused(format!(
                    "{what}: layer {} is missing",
                    l.digest
                )))
            }
        }
    }
    Ok(Staged {
        digest,
        config,
        config_bytes,
        layers,
    })
}

fn oci_dir(
    path: &Path,
    selector: Option<&str>,
    what: &str,
    put: &mut Put<'_>,
) -> Result<Staged, ImageError> {
    let index = std::fs::read(path.join("index.json"))
        .map_err(|e| ImageError::io(format!("{what}: index.json"), e))?;
    let blob_path = |d: &str| -> Result<PathBuf, ImageError> { Ok(path.join(blob_key(d)?)) };
    let mut read = |d: &str| -> Result<Vec<u8>, ImageError> {
        let p = blob_path(d)?;
        let f =
            std::fs::File::open(&p).map_err(|e| ImageError::io(format!("{what}: blob {d}"), e))?;
        let mut b = Vec::new();
        f.take(SMALL + 1)
            .read_to_end(&mut b)
            .map_err(|e| ImageError::io(format!("{what}: blob {d}"), e))?;
        check(&b, d, what)?;
        Ok(b)
    };
    let (digest, mbytes, config, layers) = resolve_layout(&index, selector, what, &mut read)?;
    let config_bytes = read(&config.digest)?;
    put(
        &mut &mbytes[..],
        Some(&digest),
        &format!("{what}: manifest"),
    )?;
    put(
        &mut &config_bytes[..],
        Some(&config.digest),
        &format!("{what}: config"),
    )?;
    for l in &layers {
        let p = blob_path(&l.digest)?;
        let mut f = std::fs::File::open(&p)
            .map_err(|e| ImageError::io(format!("{what}: layer {}", l.digest), e))?;
        put(
            &mut f,
            Some(&l.digest),
            &format!("{what}: layer {}", l.digest),
        )?;
    }
    Ok(Staged {
        digest,
        config,
        config_bytes,
        layers,
    })
}
