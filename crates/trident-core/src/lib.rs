//! The execution core of trident: execution environments, prewarmed runner pools,
//! runners with inactivity timeouts and executions with time limits.
//!
//! **This crate knows nothing about HTTP and makes no system calls of its own**: it talks to an
//! execution engine through the [`backend::Backend`] trait and persists through
//! [`store::Store`]. Both front doors (the Poseidon API directly, the GitLab Runner API through
//! the built-in agent of `trident-jobs`) drive the same [`manager::Manager`].

#![forbid(unsafe_code)]

pub mod backend;
pub mod error;
pub mod execution;
pub mod manager;
pub mod model;
pub mod store;
/// Test doubles (an in-memory store, a recording backend) for this crate's unit tests and,
/// with the `testing` feature, for the front doors' in-process router tests.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod utf8;

pub use error::{Error, Result};
pub use manager::{Manager, ManagerConfig};
