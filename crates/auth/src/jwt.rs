//! HS256 access tokens. The algorithm is pinned: a token signed with any
//! other algorithm (or `none`) is refused before its claims are looked at.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use muse_core::Secret;
use serde::{Deserialize, Serialize};

use crate::error::AuthError;

/// The claims of a Muse access token. All are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// Unique token id.
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    /// The session (refresh-token family) this token belongs to.
    pub sid: String,
}

/// Signing and verification keys plus the expected issuer and audience.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("secret", &"[redacted]")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtKeys {
    pub fn new(secret: &Secret<String>, issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        validation.validate_exp = true;
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| AuthError::Internal(format!("jwt encode: {e}")))
    }

    /// Verifies signature, algorithm, issuer, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        match decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => Err(AuthError::TokenExpired),
                _ => Err(AuthError::Unauthenticated),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        JwtKeys::new(&Secret::new("k".repeat(32)), "muse", "muse-api")
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "muse".into(),
            aud: "muse-api".into(),
            sub: "u1".into(),
            jti: "j1".into(),
            iat: 0,
            exp,
            sid: "s1".into(),
        }
    }

    #[test]
    fn encodes_and_verifies() {
        let k = keys();
        let far = 4_102_444_800; // 2100-01-01
        let t = k.sign(&claims(far)).unwrap();
        assert_eq!(t.split('.').count(), 3);
        assert_eq!(k.verify(&t).unwrap(), claims(far));
    }

    #[test]
    fn refuses_expired_other_audience_other_key_and_other_alg() {
        let k = keys();
        let expired = k.sign(&claims(1_000)).unwrap();
        assert!(matches!(k.verify(&expired), Err(AuthError::TokenExpired)));

        let mut c = claims(4_102_444_800);
        c.aud = "elsewhere".into();
        assert!(matches!(
            k.verify(&k.sign(&c).unwrap()),
            Err(AuthError::Unauthenticated)
        ));
        let mut c = claims(4_102_444_800);
        c.iss = "someone-else".into();
        assert!(matches!(
            k.verify(&k.sign(&c).unwrap()),
            Err(AuthError::Unauthenticated)
        ));

        let other_key = JwtKeys::new(&Secret::new("x".repeat(32)), "muse", "muse-api");
        let t = other_key.sign(&claims(4_102_444_800)).unwrap();
        assert!(matches!(k.verify(&t), Err(AuthError::Unauthenticated)));

        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &claims(4_102_444_800),
            &EncodingKey::from_secret("k".repeat(32).as_bytes()),
        )
        .unwrap();
        let r = k.verify(&hs512);
        assert!(matches!(r, Err(AuthError::Unauthenticated)), "{r:?}");
    }
}
