//! trident's native Linux sandbox: one long-lived runner-init per runner in its own
//! namespaces, cgroup and root filesystem; executions are forked inside it.
//!
//! - [`native`]: the server side (implements `trident_core::backend::Backend`).
//! - [`init`]: the runner side (`trident runner-init`), single-threaded, no async.
//! - [`protocol`]: what the two say to each other over the runner's control socket.

pub mod cgroup;
mod confine;
mod fdio;
mod fileops;
pub mod host_limits;
pub mod images;
pub mod init;
mod lowers;
pub mod native;
pub mod network;
pub mod protocol;
mod rootfs;
pub mod spec;
mod tree;

pub use images::{ImageEntry, ImageResolver, ImageSource, Images, ResolvedImage};
pub use native::{NativeBackend, NativeConfig};
