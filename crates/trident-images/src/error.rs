//! The one error type of the crate. Every message names the image, registry or entry it is
//! about and, where there is one, what the operator can do about it: these strings end up in
//! API answers and in the server log.

/// Why an image cannot be had.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// The name is not a reference Docker would accept.
    #[error("invalid image reference: {0}")]
    InvalidReference(String),
    /// The image (or an offline source, or a store entry) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The registry wants (other) credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// The registry cannot be reached (DNS, connection, TLS).
    #[error("{0}")]
    Unreachable(String),
    /// Hostile or malformed content: a digest mismatch, an unsupported manifest, a refused
    /// layer entry. The message names what was refused.
    #[error("{0}")]
    Refused(String),
    /// A layer is bigger than `max_layer_bytes` allows.
    #[error("{0}")]
    Quota(String),
    /// The local store could not be read or written.
    #[error("{0}")]
    Io(String),
    /// `wait_ready` timed out while the pull goes on.
    #[error("{0}")]
    Pending(String),
    /// The registry answered with something else (5xx, rate limits, …).
    #[error("{0}")]
    Registry(String),
}

impl ImageError {
    /// An I/O error with what was being done (`what`) in front.
    pub(crate) fn io(what: impl std::fmt::Display, e: std::io::Error) -> ImageError {
        ImageError::Io(format!("{what}: {e}"))
    }
}
