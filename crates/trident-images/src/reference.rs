//! Image references as Docker reads them: `python:3.12` is
//! `docker.io/library/python:3.12`, a reference without tag or digest means `:latest`,
//! `org/img` lives on Docker Hub, and a first component with a `.` or `:` (or `localhost`)
//! names the registry. The parsing itself is `oci-spec`'s (the one `oci-client` uses), so
//! what is pulled is exactly what was normalised.

use std::str::FromStr;

use oci_client::Reference;

use crate::ImageError;

/// Docker's normalisation of an image reference (see the module docs).
///
/// `"python:3.12"` -> `"docker.io/library/python:3.12"`, `"org/img"` ->
/// `"docker.io/org/img:latest"`, `"127.0.0.1:5000/team/img@sha256:…"` is kept;
/// `name:tag@sha256:…` keeps both (the digest decides what is pulled).
pub fn normalize_reference(s: &str) -> Result<String, ImageError> {
    Ok(parse_reference(s)?.whole())
}

/// Parses (and normalises) a reference for `oci-client`.
pub(crate) fn parse_reference(s: &str) -> Result<Reference, ImageError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ImageError::InvalidReference(
            "the image name is empty".to_string(),
        ));
    }
    if t != s || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ImageError::InvalidReference(format!(
            "{s:?} contains whitespace"
        )));
    }
    // Transport prefixes belong to the offline sources (`import`), not to references.
    for transport in ["docker-archive:", "oci-archive:", "oci:", "docker://"] {
        if t.starts_with(transport) {
            return Err(ImageError::InvalidReference(format!(
                "{s:?} is an offline source, not a registry reference (load it with import)"
            )));
        }
    }
    let r = Reference::from_str(t).map_err(|e| {
        ImageError::InvalidReference(format!(
            "{s:?}: {e} (expected [registry[:port]/]repository[:tag][@sha256:<64 hex digits>], \
             lowercase repository)"
        ))
    })?;
    if let Some(d) = r.digest() {
        let ok = d
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(ImageError::InvalidReference(format!(
                "{s:?}: the digest must be sha256:<64 hex digits>"
            )));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_normalisation() {
        let cases = [
            ("python:3.12", "docker.io/library/python:3.12"),
            ("python", "docker.io/library/python:latest"),
            ("library/python:3.12", "docker.io/library/python:3.12"),
            ("docker.io/python:3.12", "docker.io/library/python:3.12"),
            (
                "index.docker.io/library/python",
                "docker.io/library/python:latest",
            ),
            (
                "openhpi/co_execenv_python:3.8",
                "docker.io/openhpi/co_execenv_python:3.8",
            ),
            ("ghcr.io/org/img:tag", "ghcr.io/org/img:tag"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
            ("localhost/x", "localhost/x:latest"),
            ("127.0.0.1:5000/team/img:1", "127.0.0.1:5000/team/img:1"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_reference(input).unwrap(), want, "{input}");
        }
        let d = "sha256:".to_string() + &"ab".repeat(32);
        assert_eq!(
            normalize_reference(&format!("127.0.0.1:5000/team/img@{d}")).unwrap(),
            format!("127.0.0.1:5000/team/img@{d}")
        );
        assert_eq!(
            normalize_reference(&format!("python:3.12@{d}")).unwrap(),
            format!("docker.io/library/python:3.12@{d}")
        );
    }

    #[test]
    fn invalid_references_say_why() {
        for bad in [
            "",
            " python",
            "Python:3",
            "python@sha256:abc",
            "a b",
            "python:",
            "docker-archive:/x.tar",
            "oci:/dir",
        ] {
            let e = normalize_reference(bad).unwrap_err();
            assert!(matches!(e, ImageError::InvalidReference(_)), "{bad}: {e:?}");
            assert!(e.to_string().starts_with("invalid image reference"), "{e}");
        }
    }
}
