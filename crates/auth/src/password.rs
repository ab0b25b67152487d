//! Password hashing with bcrypt, without bcrypt's silent 72-byte truncation.
//!
//! The password is first hashed with SHA-256 and base64-encoded (44 ASCII
//! bytes, no NUL), and that is what bcrypt sees. Two passwords that share
//! their first 72 bytes therefore get different hashes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::error::AuthError;

fn prehash(password: &str) -> String {
    STANDARD.encode(Sha256::digest(password.as_bytes()))
}

/// bcrypt hash of the password at `cost` (4..=31). Slow by design: blocking.
pub fn hash_password(password: &str, cost: u32) -> Result<String, AuthError> {
    bcrypt::hash(prehash(password), cost).map_err(|e| AuthError::Internal(format!("bcrypt: {e}")))
}

/// Whether `password` matches `hash`. A malformed hash never matches.
pub fn verify_password(password: &str, hash: &str) -> bool {
    bcrypt::verify(prehash(password), hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = hash_password("correct horse battery", 4).unwrap();
        assert!(h.starts_with("$2"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
    }

    #[test]
    fn no_truncation_at_72_bytes() {
        let base = "a".repeat(72);
        let h = hash_password(&format!("{base}one"), 4).unwrap();
        assert!(verify_password(&format!("{base}one"), &h));
        assert!(!verify_password(&format!("{base}two"), &h));
        assert!(!verify_password(&base, &h));
    }

    #[test]
    fn malformed_hash_never_matches() {
        assert!(!verify_password("whatever", "not-a-hash"));
    }
}
