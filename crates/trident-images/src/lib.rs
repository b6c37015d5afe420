//! OCI images for trident's native sandbox: Docker-style references, pulls from registries
//! (auth, mirrors, insecure registries), offline archives, and a content-addressed store in
//! the data dir where each layer is unpacked once and shared by every image and runner.
//!
//! - [`mod@reference`]: `python:3.12` -> `docker.io/library/python:3.12`.
//! - [`config`]: credentials, insecure registries, mirrors, the layer quota.
//! - `registry`: `oci-client` with our endpoint choice, verification and error messages.
//! - [`archive`]: `docker-archive:`, `oci-archive:` and `oci:` sources.
//! - [`store`]: the store (its module docs describe the on-disk layout).
//!
//! Nothing here runs untrusted code; but every layer is a stranger's archive, so
//! [`unpack`] confines each entry to its layer's directory.
#![forbid(unsafe_code)]

pub mod archive;
pub mod config;
mod error;
pub mod manifest;
pub mod reference;
mod registry;
pub mod store;
pub mod unpack;

pub use config::{Credentials, RegistryConfig};
pub use error::ImageError;
pub use manifest::ImageConfig;
pub use reference::normalize_reference;
pub use store::{Image, ImageState, ImageStatus, ImageStore};
