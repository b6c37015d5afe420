//! Talking to registries through `oci-client`: which endpoint to ask (mirrors first for
//! Docker Hub images), with which credentials, over which scheme, and turning its errors
//! into messages an operator can act on. Blobs are streamed into a partial file that a
//! later attempt continues with a `Range` request, and verified against their digest.

use std::path::Path;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::{canonical_registry, CredentialTable, RegistryConfig};
use crate::manifest::{self, Descriptor, Manifest};
use crate::ImageError;

/// One place to ask for an image: the registry itself or a mirror of it.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// The reference as `oci-client` resolves it (a mirror set if this is one).
    pub reference: Reference,
    /// host\[:port\] actually contacted, for messages.
    pub host: String,
    pub auth: RegistryAuth,
    has_credentials: bool,
    insecure: bool,
}

/// An image resolved to its manifest (the platform's, if the reference named an index).
pub(crate) struct Resolved {
    pub endpoint: Endpoint,
    pub digest: String,
    pub manifest: Vec<u8>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    pub config_bytes: Vec<u8>,
}

pub(crate) struct Registry {
    client: Client,
    creds: CredentialTable,
    insecure: Vec<String>,
    /// (host, plain http?) of each configured mirror.
    mirrors: Vec<(String, bool)>,
}

/// Installs rustls' ring provider once per process (oci-client is built without one).
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means some other part of the process installed one already: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Registry {
    pub(crate) fn new(config: &RegistryConfig) -> Result<Registry, ImageError> {
        install_crypto_provider();
        let creds = CredentialTable::load(config)?;
        let insecure: Vec<String> = config
            .insecure_registries
            .iter()
            .map(|h| canonical_registry(h))
            .collect();
        let mut mirrors = Vec::new();
        for m in &config.registry_mirrors {
            let plain = m.trim().starts_with("http://");
            if !plain && !m.trim().starts_with("https://") {
                return Err(ImageError::InvalidReference(format!(
                    "registry mirror {m:?} must be an http:// or https:// URL"
                )));
            }
            let host = canonical_registry(m);
            if host.is_empty() {
                return Err(ImageError::InvalidReference(format!(
                    "registry mirror {m:?} has no host"
                )));
            }
            mirrors.push((host, plain));
        }
        let mut plain_hosts = insecure.clone();
        plain_hosts.extend(mirrors.iter().filter(|m| m.1).map(|m| m.0.clone()));
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_hosts),
            // Index resolution is ours (variants, messages).
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        });
        Ok(Registry {
            client,
            creds,
            insecure,
            mirrors,
        })
    }

    /// Where to look for `r`, in order: the mirrors (Docker Hub images only), then the
    /// registry of the reference.
    pub(crate) fn endpoints(&self, r: &Reference) -> Vec<Endpoint> {
        let mut out = Vec::new();
        if r.registry() == "docker.io" {
            for (host, plain) in &self.mirrors {
                let mut reference = r.clone();
                reference.set_mirror_registry(host.clone());
                out.push(self.endpoint(reference, host.clone(), *plain));
            }
        }
        let host = r.registry().to_string();
        let insecure = self.insecure.contains(&canonical_registry(&host));
        out.push(self.endpoint(r.clone(), host, insecure));
        out
    }

    fn endpoint(&self, reference: Reference, host: String, insecure: bool) -> Endpoint {
        let creds = self.creds.get(&host);
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        Endpoint {
            reference,
            host,
            auth,
            has_credentials: creds.is_some(),
            insecure,
        }
    }

    /// Resolves `r` to an image manifest and its config, trying each endpoint in turn
    /// (a mirror that fails is skipped, as Docker does; the last error is reported).
    pub(crate) async fn resolve(&self, r: &Reference) -> Result<Resolved, ImageError> {
        let image = r.whole();
        let mut last = None;
        for ep in self.endpoints(r) {
            match self.resolve_at(&ep, &image).await {
                Ok(res) => return Ok(res),
                Err(e) => {
                    tracing::warn!(image = %image, registry = %ep.host, error = %e, "manifest fetch failed");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least the registry itself is an endpoint"))
    }

    async fn resolve_at(&self, ep: &Endpoint, image: &str) -> Result<Resolved, ImageError> {
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(&ep.reference, &ep.auth, manifest::ACCEPTED)
            .await
            .map_err(|e| self.explain(e, ep, image))?;
        check_bytes_digest(&bytes, ep.reference.digest(), image)?;
        let (bytes, digest, parsed) = match manifest::parse_manifest(&bytes, image)? {
            Manifest::Index(entries) => {
                let chosen = manifest::pick_platform(&entries, image)?;
                manifest::check_digest(&chosen.digest)
                    .map_err(|e| ImageError::Refused(format!("{image}: {e}")))?;
                let by_digest = ep.reference.clone_with_digest(chosen.digest.clone());
                let (bytes, digest) = self
                    .client
                    .pull_manifest_raw(&by_digest, &ep.auth, manifest::ACCEPTED)
                    .await
                    .map_err(|e| self.explain(e, ep, image))?;
                check_bytes_digest(&bytes, Some(&chosen.digest), image)?;
                match manifest::parse_manifest(&bytes, image)? {
                    Manifest::Index(_) => {
                        return Err(ImageError::Refused(format!(
                            "{image}: the index entry for this platform is another index"
                        )))
                    }
                    m => (bytes, digest, m),
                }
            }
            m => (bytes, digest, m),
        };
        let Manifest::Image { config, layers } = parsed else {
            unreachable!("indexes were resolved above")
        };
        let mut config_bytes = Vec::new();
        self.client
            .pull_blob(&ep.reference, &oci_descriptor(&config), &mut config_bytes)
            .await
            .map_err(|e| self.explain(e, ep, image))?;
        check_bytes_digest(&config_bytes, Some(&config.digest), image)?;
        Ok(Resolved {
            endpoint: ep.clone(),
            digest,
            manifest: bytes.to_vec(),
            config,
            layers,
            config_bytes,
        })
    }

    /// Downloads `desc` into `partial`, continuing a previous attempt's bytes if the
    /// registry honours `Range`; `progress` gets the bytes added. Returns once the whole
    /// file is there and matches the digest; a mismatch removes the file.
    pub(crate) async fn fetch_blob(
        &self,
        ep: &Endpoint,
        image: &str,
        desc: &Descriptor,
        partial: &Path,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), ImageError> {
        let od = oci_descriptor(desc);
        let mut have = tokio::fs::metadata(partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have > desc.size {
            have = 0;
        }
        let (stream, append) = if have > 0 {
            match self
                .client
                .pull_blob_stream_partial(&ep.reference, &od, have, None)
                .await
                .map_err(|e| self.explain(e, ep, image))?
            {
                oci_client::client::BlobResponse::Partial(s) => (s, true),
                oci_client::client::BlobResponse::Full(s) => (s, false),
            }
        } else {
            let s = self
                .client
                .pull_blob_stream(&ep.reference, &od)
                .await
                .map_err(|e| self.explain(e, ep, image))?;
            (s, false)
        };
        let mut hash = Sha256::new();
        let mut file = if append {
            // The bytes already there count towards the digest.
            hash_file_into(partial, &mut hash).await?;
            progress(have);
            tracing::info!(image, blob = %desc.digest, offset = have, "resuming blob download");
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(partial)
                .await
                .map_err(|e| ImageError::io(format!("open {}", partial.display()), e))?
        } else {
            have = 0;
            tokio::fs::File::create(partial)
                .await
                .map_err(|e| ImageError::io(format!("create {}", partial.display()), e))?
        };
        let mut stream = stream.stream;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = file.flush().await;
                    if is_digest_error(&e) {
                        let _ = tokio::fs::remove_file(partial).await;
                        return Err(mismatch(image, &desc.digest, &ep.host, "its digest"));
                    }
                    return Err(ImageError::Unreachable(format!(
                        "registry {} unreachable: the download of {} for {image} broke off \
                         after {have} of {} bytes: {} (the next attempt resumes)",
                        ep.host,
                        desc.digest,
                        desc.size,
                        error_chain(&e)
                    )));
                }
            };
            have += chunk.len() as u64;
            if have > desc.size {
                drop(file);
                let _ = tokio::fs::remove_file(partial).await;
                return Err(mismatch(image, &desc.digest, &ep.host, "its size"));
            }
            hash.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ImageError::io(format!("write {}", partial.display()), e))?;
            progress(chunk.len() as u64);
        }
        file.sync_all()
            .await
            .map_err(|e| ImageError::io(format!("sync {}", partial.display()), e))?;
        drop(file);
        let got = format!("sha256:{:x}", hash.finalize());
        if have != desc.size || got != desc.digest {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(mismatch(image, &desc.digest, &ep.host, "its digest"));
        }
        Ok(())
    }

    /// Turns an `oci-client` error into one that says what to do.
    pub(crate) fn explain(
        &self,
        e: OciDistributionError,
        ep: &Endpoint,
        image: &str,
    ) -> ImageError {
        let host = &ep.host;
        let unauthorized = |detail: &str| {
            if ep.has_credentials {
                ImageError::Unauthorized(format!(
                    "registry {host} refused the credentials for {image} ({detail}): check \
                     registry_auth (or docker_config) for {host}"
                ))
            } else {
                ImageError::Unauthorized(format!(
                    "registry {host} refused access to {image} ({detail}): it needs \
                     credentials (set registry_auth or docker_config for {host}), or the \
                     image does not exist"
                ))
            }
        };
        let not_found =
            || ImageError::NotFound(format!("image {image} not found in registry {host}"));
        match e {
            OciDistributionError::UnauthorizedError { .. } => unauthorized("unauthorized"),
            OciDistributionError::AuthenticationFailure(reason) => {
                unauthorized(&format!("token request failed: {}", reason.trim()))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let code = envelope.errors.first().map(|e| &e.code);
                let msg = envelope
                    .errors
                    .iter()
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                match code {
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown,
                    ) => not_found(),
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                        unauthorized(&format!("denied: {msg}"))
                    }
                    Some(OciErrorCode::Toomanyrequests) => ImageError::Registry(format!(
                        "registry {host} rate-limits pulls of {image} (toomanyrequests: {msg}): \
                         set credentials for it or a registry mirror"
                    )),
                    _ => ImageError::Registry(format!("registry {host} refused {image}: {msg}")),
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                404 => not_found(),
                401 | 403 => unauthorized(&format!("HTTP {code}")),
                _ => ImageError::Registry(format!(
                    "registry {host} answered HTTP {code} for {image}: {}",
                    message.chars().take(200).collect::<String>().trim()
                )),
            },
            OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
            OciDistributionError::DigestError(_) => {
                mismatch(image, "the manifest", host, "its digest")
            }
            OciDistributionError::RequestError(re) => {
                let chain = error_chain(&re);
                let hint = if !ep.insecure
                    && (chain.contains("InvalidContentType")
                        || chain.contains("corrupt message")
                        || chain.to_ascii_lowercase().contains("tls")
                        || chain.contains("certificate"))
                {
                    format!(
                        " (trident speaks https to it; if {host} serves plain HTTP, list it in \
                         insecure_registries)"
                    )
                } else {
                    String::new()
                };
                ImageError::Unreachable(format!("registry {host} unreachable: {chain}{hint}"))
            }
            OciDistributionError::IoError(io) => ImageError::Unreachable(format!(
                "registry {host} unreachable: {}",
                error_chain(&io)
            )),
            other => ImageError::Registry(format!("registry {host}, image {image}: {other}")),
        }
    }
}

fn mismatch(image: &str, what: &str, host: &str, check: &str) -> ImageError {
    ImageError::Refused(format!(
        "{what} of {image} from registry {host} does not match {check}: refused (corrupt \
         or tampered content)"
    ))
}

fn is_digest_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| {
        inner
            .downcast_ref::<oci_client::errors::DigestError>()
            .is_some()
    })
}

/// "outer: inner: innermost", skipping repeats (reqwest repeats itself).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// oci-client checks a manifest against the digest it asked for; this checks again (the
/// store names files after digests, so it must be sure).
fn check_bytes_digest(bytes: &[u8], want: Option<&str>, image: &str) -> Result<(), ImageError> {
    if let Some(want) = want {
        let got = format!("sha256:{:x}", Sha256::digest(bytes));
        if got != want {
            return Err(ImageError::Refused(format!(
                "content {want} of {image} does not match its digest (got {got}): refused"
            )));
        }
    }
    Ok(())
}

async fn hash_file_into(path: &Path, hash: &mut Sha256) -> Result<(), ImageError> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok(());
        }
        hash.update(&buf[..n]);
    }
}

fn oci_descriptor(d: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        ..Default::default()
    }
}
