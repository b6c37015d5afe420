//! OCI images for trident's native sandbox: Docker-style references, pulls from registries
//! (auth, mirrors, insecure registries), offline archives, and a content-addressed store in
//! the data dir where each layer is unpacked once and shared by every image and runner.
//!
//! Nothing here runs untrusted code; but every layer is a stranger's archive, so
//! [`unpack`] confines each entry to its layer's directory.
#![forbid(unsafe_code)]

pub mod unpack;
