//! What trident's two HTTP front doors (`trident-api`, `trident-gitlab`) share, so that each
//! rule of the wire is written once.

#![forbid(unsafe_code)]

pub mod disposition;
pub mod server;
