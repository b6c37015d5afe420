//! Runner tokens: random secrets handed out once, stored only as SHA-256 hashes.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// GitLab's prefix for runner authentication tokens (agents and admins recognise it).
pub const RUNNER_TOKEN_PREFIX: &str = "glrt-";

/// A fresh token: the prefix and 160 random bits, URL-safe.
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).expect("the kernel's random source");
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
    let body: String = bytes
        .iter()
        .flat_map(|b| [b >> 2, b & 0x3f])
        .take(26)
        .map(|i| ALPHABET[i as usize] as char)
        .collect();
    format!("{prefix}{body}")
}

/// What is stored instead of a token.
pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares secrets without leaking where they differ.
pub fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed() {
        let a = new_token(RUNNER_TOKEN_PREFIX);
        let b = new_token(RUNNER_TOKEN_PREFIX);
        assert!(a.starts_with("glrt-") && a.len() == 31, "{a}");
        assert_ne!(a, b);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a).len(), 64);
        assert!(same(&a, &a.clone()) && !same(&a, &b));
    }
}
